"""The end-of-fit report of lit_mofo's measuring callbacks: one JSON, one Markdown file, one PNG and a console table.

:class:`~lit_mofo.callbacks.forgetting_monitor.ForgettingMonitor` and
:class:`~lit_mofo.callbacks.parameter_drift.ParameterDrift` each hand a :class:`ReportSection` to the trainer's
shared :class:`FitReport`; when the last callback of the fit has handed in its section, rank zero writes

- ``<dir>/forgetting_report.json``: every measurement of every section (non-finite values as ``null``), plus the
  run's metadata (:func:`run_metadata`: step, epoch, method, optimizers, model, strategy);
- ``<dir>/forgetting_report.md``: the summary tables and the measurement history as Markdown tables;
- ``<dir>/forgetting_report.png``: one panel per curve (a metric against the optimizer step, with the pre-trained
  baseline as a dashed line), titled with the method, the optimizer and the model (``matplotlib``, a dependency;
  in an environment without it the PNG is skipped with an info message, once);
- ``<dir>/forgetting_report_<name>.png``: a section's own figures (e.g. ``task_vector_scaling``, drawn by
  :func:`draw_edit_sweep`; the continual run's accuracy matrix, by :func:`draw_heatmap`), if it has any;

and prints the summary tables to the console. ``<dir>`` is ``trainer.log_dir`` (the logger's version directory, or
``default_root_dir`` without a logger) unless a callback names another one; when that is the current directory only
because no logger and no ``default_root_dir`` were given, a warning says so at the start of fit.

The building blocks (:class:`Table`, :class:`Curve`, :func:`markdown_table`, :func:`console_table`,
:func:`write_report`) work without a trainer, for scripts that summarise several runs. Every figure is drawn here, with
matplotlib's object API (no pyplot, no global backend switch); :func:`edit_sweep_section` builds the section of a
task-vector sweep (:class:`~lit_mofo.task_vectors.EditSweep`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lit_mofo.probes.base import find_language_model
from lit_mofo.task_vectors import EditSweep, LiNeS, WiSEFT

__all__ = [
    "REPORT_STEM",
    "Curve",
    "FitReport",
    "ReportSection",
    "Table",
    "console_table",
    "draw_edit_sweep",
    "draw_heatmap",
    "edit_sweep_section",
    "epoch_of_last_step",
    "format_value",
    "json_safe",
    "markdown_table",
    "report_title",
    "run_metadata",
    "write_report",
]

REPORT_STEM = "forgetting_report"


@dataclass
class Table:
    """A titled table: ``rows`` hold plain values (floats are formatted by :func:`format_value`)."""

    title: str
    headers: list[str]
    rows: list[list[Any]]


@dataclass
class Curve:
    """One panel of the PNG: ``lines`` maps a label to ``(step, value)`` points; ``baseline`` draws a dashed line;
    ``boundaries`` marks ``(step, label)`` points of the step axis with a dotted vertical line each (the starts of a
    continual run's stages, :mod:`lit_mofo.continual`)."""

    title: str
    lines: dict[str, list[tuple[int, float]]]
    baseline: float | None = None
    ylabel: str = ""
    boundaries: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class ReportSection:
    """What one callback contributes: ``records`` (every measurement, JSON-serialisable dicts) go to the JSON under
    ``key``; ``summary`` tables go to the console and the Markdown; ``history`` tables to the Markdown only;
    ``curves`` to the PNG. ``meta`` adds key/value lines (e.g. the baselines) to the JSON section. ``figures`` are
    plots of their own, beside the PNG: ``{name: draw}``, where ``draw(path)`` writes ``<stem>_<name>.png`` and
    returns whether it did (False without matplotlib)."""

    key: str
    title: str
    records: list[dict[str, Any]]
    summary: list[Table] = field(default_factory=list)
    history: list[Table] = field(default_factory=list)
    curves: list[Curve] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Callable[[Path], bool]] = field(default_factory=dict)


def format_value(value: Any) -> str:
    """Numbers for tables: 4 significant digits (scientific below 1e-3 and from 1e5), ``nan``/``inf`` as such."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0.0:
            return "0"
        if abs(value) < 1e-3 or abs(value) >= 1e5:
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None`` (strict JSON has no NaN/Infinity), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def markdown_table(table: Table) -> str:
    """``table`` as a GitHub-flavoured Markdown table under a ``###`` heading."""
    cells = [[format_value(v).replace("|", "\\|") for v in row] for row in table.rows]
    lines = [f"### {table.title}", "", "| " + " | ".join(table.headers) + " |"]
    lines.append("|" + "|".join("---" for _ in table.headers) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def console_table(table: Table) -> str:
    """``table`` as aligned plain text (numbers right-aligned), for the console."""
    cells = [[format_value(v) for v in row] for row in table.rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(table.headers)]
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] is None for row in table.rows) for i in range(len(widths))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True))

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([table.title, rule, line(table.headers), rule, *(line(row) for row in cells), rule])


_NO_MATPLOTLIB_NOTED = False
# Overlapping lines stay apart: each line of a panel has its own colour, marker and dash pattern, and the later a line,
# the thinner it is and the higher it sits (z-order), so a line drawn over an equal one shows inside it; the dashed
# pre-trained baseline, thinnest of all, goes on top.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DASHES = ("-", "--", "-.", ":")


def _figure_class(path: Path) -> Any:
    """matplotlib's ``Figure`` (the object API: no pyplot, no global backend switch), or None without matplotlib,
    which is said once per process (not once per fit)."""
    global _NO_MATPLOTLIB_NOTED
    try:
        from matplotlib.figure import Figure
    except ImportError:
        if not _NO_MATPLOTLIB_NOTED:
            _NO_MATPLOTLIB_NOTED = True
            rank_zero_info(
                f"matplotlib is not installed, so {path.name} is not drawn (the JSON and Markdown reports are "
                "written): `pip install matplotlib` (a dependency of lit-mofo that this environment lacks)."
            )
        return None
    return Figure


def _plot(path: Path, curves: Sequence[Curve], title: str | None = None) -> bool:
    Figure = _figure_class(path)
    if Figure is None:
        return False
    columns = min(3, len(curves))
    rows = math.ceil(len(curves) / columns)
    figure = Figure(figsize=(5.2 * columns, 3.6 * rows + (0.6 if title else 0.0)), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, curve in zip(axes, curves, strict=False):
        for index, (label, points) in enumerate(curve.lines.items()):
            steps = [s for s, _ in points]
            values = [v if math.isfinite(v) else float("nan") for _, v in points]
            ax.plot(
                steps,
                values,
                label=label,
                color=f"C{index % 10}",
                linestyle=_DASHES[index % len(_DASHES)],
                linewidth=max(0.8, 2.4 - 0.3 * index),
                marker=_MARKERS[index % len(_MARKERS)],
                markersize=max(3.0, 7.5 - 0.8 * index),
                markerfacecolor="none" if index % 2 else f"C{index % 10}",
                zorder=2 + index,
            )
        for step, label in curve.boundaries:  # stage starts: behind the lines, labelled at the top
            ax.axvline(step, color="0.55", linestyle=":", linewidth=1, zorder=1)
            ax.annotate(
                label,
                (step, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -2),
                textcoords="offset points",
                fontsize=6,
                color="0.35",
                va="top",
                rotation=90,
            )
        if curve.baseline is not None and math.isfinite(curve.baseline):  # thinnest, so on top of the lines
            top = 2 + len(curve.lines)
            ax.axhline(curve.baseline, color="0.3", linestyle=(0, (4, 3)), linewidth=1, label="pre-trained", zorder=top)
        ax.set_title(curve.title, fontsize=10)
        ax.set_xlabel("optimizer step")
        if curve.ylabel:
            ax.set_ylabel(curve.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(curves) :]:
        ax.set_visible(False)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.savefig(path, dpi=100)
    return True


def draw_heatmap(
    path: Path,
    matrix: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    title: str = "",
    higher: bool = True,
) -> bool:
    """Write ``matrix`` as an annotated heatmap PNG to ``path`` (rows top to bottom, columns left to right; greener is
    better, by ``higher``); returns False without matplotlib (see :func:`write_report`)."""
    Figure = _figure_class(path)
    if Figure is None:
        return False
    values = [[v if v is not None and math.isfinite(v) else float("nan") for v in row] for row in matrix]
    figure = Figure(
        figsize=(2.2 + 1.1 * max(1, len(column_labels)), 1.4 + 0.55 * max(1, len(row_labels))), layout="constrained"
    )
    ax = figure.subplots()
    image = ax.imshow(values, cmap="RdYlGn" if higher else "RdYlGn_r", aspect="auto")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(j, i, format_value(value), ha="center", va="center", fontsize=8, color="black")
    ax.set_xticks(range(len(column_labels)), labels=list(column_labels), fontsize=8)
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels), fontsize=8)
    ax.set_xlabel("task (the stage it was trained in)")
    ax.set_ylabel("model")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    figure.colorbar(image, ax=ax, shrink=0.8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=100)
    return True


def draw_edit_sweep(path: Path, sweep: EditSweep) -> bool:
    """Write a task-vector sweep as a PNG to ``path``: the task score against forgetting, one panel per forgetting
    metric of ``sweep.panels``, the WiSE-FT and LiNeS curves (labelled alpha, or alpha/beta), the unedited fine-tune
    and the pre-trained model marked, the Pareto front dashed and the picked edit circled. Returns False without
    matplotlib or without a task metric."""
    Figure = _figure_class(path)
    if Figure is None or sweep.task is None or not sweep.panels:
        return False
    task, higher = sweep.task, sweep.task_higher_is_better
    figure = Figure(figsize=(6.0 * len(sweep.panels), 4.8), layout="constrained")
    axes = figure.subplots(1, len(sweep.panels), squeeze=False).ravel()
    for ax, panel in zip(axes, sweep.panels, strict=True):
        # WiSE-FT's labels above its points, LiNeS's below, so that two curves that meet stay readable.
        for method, edit_type, color, marker, offset in (
            ("WiSE-FT", WiSEFT, "C0", "o", (4, 5)),
            ("LiNeS", LiNeS, "C1", "s", (4, -11)),
        ):
            points = sorted((p for p in sweep.points if isinstance(p.edit, edit_type)), key=lambda p: p.alpha)
            if not points:
                continue
            xs, ys = [p.lost(panel) for p in points], [p.value(task) for p in points]
            ax.plot(xs, ys, color=color, marker=marker, linewidth=1.2, label=method, zorder=3)
            for p, x, y in zip(points, xs, ys, strict=True):
                text = f"{p.alpha:g}" if p.beta is None else f"{p.alpha:g}/{p.beta:g}"
                ax.annotate(text, (x, y), textcoords="offset points", xytext=offset, fontsize=7)
        finetuned = sweep.points[0]
        ax.plot(
            [finetuned.lost(panel)],
            [finetuned.value(task)],
            marker="*",
            markersize=14,
            color="C3",
            linestyle="none",
            label="fine-tuned (unedited)",
            zorder=5,
        )
        ax.plot(
            [0.0],
            [sweep.task_baseline],
            marker="P",
            markersize=10,
            color="0.3",
            linestyle="none",
            label="pre-trained",
            zorder=4,
        )
        front = sorted((p for p in sweep.points if p.pareto.get(panel)), key=lambda p: p.lost(panel))
        if front:
            ax.plot(
                [p.lost(panel) for p in front],
                [p.value(task) for p in front],
                color="0.2",
                linestyle=(0, (4, 3)),
                linewidth=1,
                drawstyle="steps-post",
                label="Pareto front",
                zorder=2,
            )
        picked = next((p for p in sweep.points if p.key == sweep.picked), None)
        if picked is not None:
            ax.plot(
                [picked.lost(panel)],
                [picked.value(task)],
                marker="o",
                markersize=18,
                markerfacecolor="none",
                markeredgecolor="C2",
                markeredgewidth=2,
                linestyle="none",
                label=f"picked: {picked.label}",
                zorder=6,
            )
        ax.set_xlabel(f"forgetting of {panel} (positive = worse than pre-trained)")
        ax.set_ylabel(f"{task} ({'higher' if higher else 'lower'} is better)")
        ax.set_title(f"task against forgetting of {panel}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle(
        f"Post-hoc task-vector edits at step {sweep.step} (labels: alpha, or alpha/beta for LiNeS)", fontsize=11
    )
    figure.savefig(path, dpi=100)
    return True


def edit_sweep_section(
    sweep: EditSweep,
    settings: dict[str, Any] | None = None,
    sweep_seconds: float | None = None,
    fit_seconds: float | None = None,
) -> ReportSection:
    """The report section of a task-vector sweep (key ``task_vector_scaling``): a table of the task score and the
    forgetting of every point with the Pareto front and the picked edit marked, every probe metric under every edit,
    every value in the JSON with ``settings`` (the rule and its bounds), the sweep's and the fit's seconds, and the
    figure of :func:`draw_edit_sweep`."""
    title = "Post-hoc task-vector edits (WiSE-FT, LiNeS)"
    if not sweep.points:
        return ReportSection(key="task_vector_scaling", title=title, records=[])
    task, panels, picked = sweep.task, sweep.panels, sweep.picked
    headers = ["edit", "alpha", "beta"]
    if task is not None:
        headers.append(f"task {task}")
    headers += [f"forgetting {panel}" for panel in panels]
    if task is not None:
        headers.append("Pareto")
    headers.append("picked")
    rows: list[list[Any]] = []
    if task is not None:
        rows.append(["pre-trained (baseline)", 0.0, None, sweep.task_baseline, *([0.0] * len(panels)), None, None])
    for point in sweep.points:
        row: list[Any] = [point.key, point.alpha, point.beta]
        if task is not None:
            row.append(point.value(task))
        row += [point.lost(panel) for panel in panels]
        if task is not None:
            on_front = [panel for panel, on in point.pareto.items() if on]
            row.append(" ".join(on_front) if len(panels) > 1 else any(point.pareto.values()))
        row.append(point.key == picked)
        rows.append(row)
    summary = Table(
        title=f"Task-vector edits at step {sweep.step}: task score and forgetting (positive = worse than pre-trained)",
        headers=headers,
        rows=rows,
    )
    records = [
        {
            "edit": point.key,
            "label": point.label,
            "alpha": point.alpha,
            "beta": point.beta,
            "probe": probe,
            "metric": metric,
            "value": value,
            "baseline": sweep.baselines.get(probe, {}).get(metric),
            "forgetting": point.forgetting[probe][metric],
            "retention": point.retention[probe][metric],
            "higher_is_better": sweep.directions.get(probe, {}).get(metric),
            "picked": point.key == picked,
        }
        for point in sweep.points
        for probe, values in point.values.items()
        for metric, value in values.items()
    ]
    history = Table(
        title="Every probe metric under every edit",
        headers=["edit", "probe", "metric", "value", "forgetting", "retention"],
        rows=[[r["edit"], r["probe"], r["metric"], r["value"], r["forgetting"], r["retention"]] for r in records],
    )
    ratio = sweep_seconds / fit_seconds if sweep_seconds is not None and fit_seconds else None
    figures: dict[str, Callable[[Path], bool]] = {}
    if task is not None and panels:
        figures["task_vector_scaling"] = lambda path: draw_edit_sweep(path, sweep)
    return ReportSection(
        key="task_vector_scaling",
        title=title,
        records=records,
        summary=[summary],
        history=[history],
        figures=figures,
        meta={
            "step": sweep.step,
            "task": task,
            **(settings or {}),
            "picked": picked,
            "pareto": {panel: [p.key for p in sweep.points if p.pareto.get(panel)] for panel in panels},
            "edits": [point.as_dict() for point in sweep.points],
            "sweep_seconds": sweep_seconds,
            "fit_seconds": fit_seconds,
            "sweep_to_fit_ratio": ratio,
            "metric_names": [
                "probe/<probe>/<metric>/<edit>",
                "forgetting/<probe>/<metric>/<edit>",
                "retention/<probe>/<metric>/<edit>",
            ],
        },
    )


def report_title(meta: dict[str, Any]) -> str | None:
    """The report's title from the run metadata: the method, the optimizer and the model (what is known)."""
    parts = [
        f"{label}: {meta[key]}" for key, label in (("optimizers", "optimizer"), ("model", "model")) if meta.get(key)
    ]
    if not meta.get("method") and not parts:
        return None
    first = f"Forgetting while fine-tuning with {meta['method']}" if meta.get("method") else "Forgetting report"
    if meta.get("stages"):
        first += f", in stages {meta['stages']}"
    return "\n".join([first, "  ·  ".join(parts)]) if parts else first


def write_report(
    directory: str | Path,
    sections: Sequence[ReportSection],
    meta: dict[str, Any] | None = None,
    stem: str = REPORT_STEM,
) -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.md`` and (with matplotlib) ``<stem>.png`` into ``directory``.

    The PNG's title comes from ``meta`` (``method``, ``optimizers``, ``model``; see :func:`run_metadata`). Returns
    the written paths by suffix (``"json"``, ``"md"``, ``"png"``), and each section figure's path by its name. Call
    it on one process only.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    payload: dict[str, Any] = {"meta": meta}
    for section in sections:
        payload[section.key] = {**section.meta, "measurements": section.records}
    paths = {"json": directory / f"{stem}.json", "md": directory / f"{stem}.md"}
    paths["json"].write_text(json.dumps(json_safe(payload), indent=2) + "\n")

    lines = ["# Forgetting report", ""]
    lines += [f"- **{key}**: {format_value(value)}" for key, value in meta.items()]
    for section in sections:
        lines += ["", f"## {section.title}", ""]
        for table in [*section.summary, *section.history]:
            lines += [markdown_table(table)]
    paths["md"].write_text("\n".join(lines).rstrip() + "\n")

    curves = [curve for section in sections for curve in section.curves]
    if curves and _plot(directory / f"{stem}.png", curves, report_title(meta)):
        paths["png"] = directory / f"{stem}.png"
    for section in sections:
        for name, draw in section.figures.items():
            if draw(directory / f"{stem}_{name}.png"):
                paths[name] = directory / f"{stem}_{name}.png"
    return paths


_REPORTS: weakref.WeakKeyDictionary[pl.Trainer, FitReport] = weakref.WeakKeyDictionary()


class FitReport:
    """The report of one fit, shared by the measuring callbacks of a trainer so it is written (and printed) once.

    Each callback :meth:`attach`\\ es in ``setup``, hands in its section with :meth:`submit` at the end of training
    (on every rank: the directory lookup is a collective) and :meth:`detach`\\ es in ``teardown``. The callback
    that submits last triggers the writing on rank zero; with one callback that is the only one.
    """

    def __init__(self) -> None:
        self._owners: dict[int, str | None] = {}
        self._sections: dict[int, ReportSection] = {}

    @classmethod
    def attach(cls, trainer: pl.Trainer, owner: object, directory: str | None = None) -> FitReport:
        """The trainer's report, created on first use; ``directory`` (optional) overrides ``trainer.log_dir``."""
        report = _REPORTS.get(trainer)
        if report is None:
            report = _REPORTS[trainer] = cls()
            report._warn_if_current_directory(trainer)
        report._owners[id(owner)] = directory
        return report

    @staticmethod
    def _warn_if_current_directory(trainer: pl.Trainer) -> None:
        """Say so when the report would land in the current directory only because nothing chose another one."""
        chosen = any(getattr(c, "report", False) and getattr(c, "report_dir", None) for c in trainer.callbacks)
        if chosen or trainer.loggers or os.path.realpath(trainer.default_root_dir) != os.path.realpath(os.getcwd()):
            return
        rank_zero_warn(
            f"The run has no logger and no `default_root_dir`, so the forgetting report will be written to the "
            f"current directory ({os.getcwd()}). Pass `Trainer(default_root_dir=...)`, a logger, or the callback's "
            "`report_dir=` to put it elsewhere."
        )

    @classmethod
    def detach(cls, trainer: pl.Trainer, owner: object) -> None:
        report = _REPORTS.get(trainer)
        if report is None:
            return
        report._owners.pop(id(owner), None)
        report._sections.pop(id(owner), None)
        if not report._owners:
            del _REPORTS[trainer]

    def submit(self, trainer: pl.Trainer, owner: object, section: ReportSection, print_summary: bool = True) -> None:
        """Hand in ``owner``'s section; when every attached owner has, write the files and print the tables."""
        self._sections[id(owner)] = section
        if set(self._sections) != set(self._owners):
            return
        directories = [d for d in self._owners.values() if d is not None]
        # trainer.log_dir broadcasts from rank zero: every rank must ask for it.
        directory = directories[0] if directories else (trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        order = {"continual": 0, "forgetting": 1, "drift": 2}
        sections = sorted(self._sections.values(), key=lambda s: (order.get(s.key, len(order)), s.key))
        meta = run_metadata(trainer)
        paths = write_report(directory, sections, meta)
        if print_summary:
            header = (
                f"lit_mofo report, step {meta['global_step']}: {meta['method']}; optimizer: {meta['optimizers']}; "
                f"model: {meta['model']}"
            )
            tables = [console_table(table) for s in sections for table in s.summary]
            print("\n\n".join([header, *tables, f"Report: {', '.join(str(p) for p in paths.values())}"]))


def epoch_of_last_step(trainer: pl.Trainer) -> int:
    """The index of the epoch the latest training step ran in, once training has ended (``on_train_end``): the
    ``epoch`` of a checkpoint saved at that step.

    ``trainer.current_epoch`` counts the *completed* epochs, and training always ends by ending an epoch (also a
    fit stopped by ``max_steps`` mid-epoch), so it is then one ahead of the checkpoint's ``epoch=0-step=20``. Inside
    an epoch (batch and validation hooks) ``trainer.current_epoch`` itself is the epoch. Lightning's count of
    *started* epochs cannot serve: after a resume from a checkpoint written at the last step of an epoch (before the
    epoch ended, e.g. by ``ModelCheckpoint(every_n_train_steps=...)``) it lags one behind.
    """
    return max(0, trainer.current_epoch - 1)


_METHOD_SETTINGS = ("ratio", "strength", "norm", "fraction")


def _describe(obj: object, settings: dict[str, Any]) -> str:
    shown = [f"{k}={v}" for k, v in settings.items() if isinstance(v, (int, float, str, bool)) and v is not None]
    return f"{type(obj).__name__}({', '.join(shown)})" if shown else type(obj).__name__


def _method_callbacks(trainer: pl.Trainer) -> list[str]:
    """The callbacks that change what trains or how: Half Fine-Tuning, the L2-to-θ₀ penalty and Lightning's
    ``BaseFinetuning`` ones. Measuring callbacks, ``MoFOCallback`` (its MoFO is the optimizer's part) and callbacks
    that only run the fit (progress bars, loggers' helpers, a CLI's own) are not the method."""
    from lit_mofo.callbacks.half_finetuning import HalfFineTuning
    from lit_mofo.callbacks.l2_to_pretrained import L2ToPretrained

    return [
        _describe(c, {k: getattr(c, k) for k in _METHOD_SETTINGS if hasattr(c, k)})
        for c in trainer.callbacks
        if isinstance(c, (HalfFineTuning, L2ToPretrained, BaseFinetuning))
        and not callable(getattr(c, "report_section", None))
    ]


def _adapters(module: nn.Module | None) -> list[str]:
    """The PEFT adapters the model trains, e.g. ``LoRA(r=8, alpha=16)`` (``peft_config`` of a ``PeftModel``)."""
    model = find_language_model(module) if module is not None else None
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return []
    labels = []
    for config in configs.values():
        kind = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", "adapter")))
        if kind == "LORA":
            dora = ", DoRA" if getattr(config, "use_dora", False) else ""
            labels.append(f"LoRA(r={getattr(config, 'r', '?')}, alpha={getattr(config, 'lora_alpha', '?')}{dora})")
        else:
            labels.append(f"{kind} adapters")
    return labels


def _method(trainer: pl.Trainer, module: nn.Module | None) -> str:
    """The fine-tuning method, as the user chose it: MoFO (with its update fraction) when a lit_mofo MoFO steps the
    model, Half Fine-Tuning, the L2-to-θ₀ penalty, Lightning ``BaseFinetuning`` callbacks and PEFT adapters (LoRA
    with its rank), joined by ``+``; without any of them "full fine-tuning", or the share of the parameters that
    trains when the module froze some."""
    parts = [
        _describe(optimizer, {"fraction": optimizer.defaults.get("fraction")})
        for optimizer in trainer.optimizers
        if type(optimizer).__module__.startswith("lit_mofo.optim")
    ]
    parts += _method_callbacks(trainer) + _adapters(module)
    if parts:
        return " + ".join(dict.fromkeys(parts))
    if module is not None:
        numel = [(p.numel(), p.requires_grad) for p in module.parameters()]
        total, trained = sum(n for n, _ in numel), sum(n for n, grad in numel if grad)
        if total and trained < total:
            return f"fine-tuning {100 * trained / total:.3g}% of the parameters"
    return "full fine-tuning"


def _model(module: nn.Module | None) -> str | None:
    """The model's class, and its ``name_or_path`` (the last two parts of a local path) when it has one."""
    if module is None:
        return None
    model = find_language_model(module)
    config = getattr(model, "config", None)
    source = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if not isinstance(source, str) or not source:
        return type(model).__name__
    if os.path.isabs(source):
        source = "/".join(Path(source).parts[-2:])
    return f"{type(model).__name__} ({source})"


def run_metadata(trainer: pl.Trainer) -> dict[str, Any]:
    """The run facts a report starts with: when, how far (the step, and the epoch as checkpoints number it), the
    method (MoFO and its fraction, Half Fine-Tuning, L2-to-θ₀, LoRA: what the user chose, never the callbacks that
    only run the fit), the optimizers with their key settings, the model, the strategy, and in a continual run
    (:mod:`lit_mofo.continual`) its ``stages`` in order."""
    import lit_mofo

    optimizers = []
    for optimizer in trainer.optimizers:
        hyper = {k: v for k, v in optimizer.defaults.items() if isinstance(v, (int, float, str, bool))}
        optimizers.append(_describe(optimizer, {k: hyper[k] for k in ("lr", "fraction", "weight_decay") if k in hyper}))
    module = getattr(trainer.strategy, "lightning_module", None)
    from lit_mofo.continual.callback import continual_learning  # here: lit_mofo.continual imports this module

    continual = continual_learning(trainer)
    stages = {"stages": " → ".join(continual.stage_names)} if continual is not None and continual.stage_names else {}
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lit_mofo_version": lit_mofo.__version__,
        "global_step": trainer.global_step,
        "epoch": epoch_of_last_step(trainer),
        "method": _method(trainer, module),
        "optimizers": ", ".join(optimizers) or None,
        "model": _model(module),
        "strategy": type(trainer.strategy).__name__,
        "world_size": trainer.world_size,
        **stages,
    }
