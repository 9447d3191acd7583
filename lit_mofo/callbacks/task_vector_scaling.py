r"""
Task-vector scaling
^^^^^^^^^^^^^^^^^^^

After fine-tuning, move along the trade-off between the task and what the pre-trained model knew without training
again: edit the task vector Δ = θ - θ₀ (WiSE-FT, LiNeS; see :mod:`lit_mofo.task_vectors`), measure every edit with
the :class:`~lit_mofo.callbacks.forgetting_monitor.ForgettingMonitor`'s probes, report the curve, and keep the
fine-tuned weights or apply the edit a rule picks.

This module is the Lightning wiring; the edits, the curve's points, the Pareto front and the rules are in
:mod:`lit_mofo.task_vectors`, the report section and its figure in :mod:`lit_mofo.report`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lit_mofo._validation import as_bool, as_choice, as_float
from lit_mofo.blocks import detect_layout
from lit_mofo.callbacks.forgetting_monitor import ForgettingMonitor, forgetting, retention
from lit_mofo.params import initial_requires_grad
from lit_mofo.report import FitReport, ReportSection, edit_sweep_section
from lit_mofo.snapshot import PretrainedSnapshot
from lit_mofo.strategy import StrategyAdapter
from lit_mofo.task_vectors import (
    RULES,
    EditPoint,
    EditSweep,
    LiNeS,
    Rule,
    TaskVectorEdit,
    TaskVectorEditor,
    applied_edit,
    apply_edit,
    edit_grid,
    mark_pareto,
    pareto_front,
    select_point,
    split_metric,
    task_vector_names,
)

# The curve's types and rules live in lit_mofo.task_vectors; they are re-exported here, where they were first defined.
__all__ = ["RULES", "EditPoint", "Rule", "TaskVectorScaling", "applied_edit", "pareto_front", "select_point"]


class TaskVectorScaling(Callback):
    r"""At the end of fit, measure a grid of task-vector edits with the monitor's probes; keep or apply one.

    With θ₀ the pre-trained weights and Δ = θ - θ₀ what the fit learnt, each edit of the grid sets the weights to
    θ₀ + λ·Δ (:mod:`lit_mofo.task_vectors`):

    - **WiSE-FT** (Wortsman et al., CVPR 2022): λ = alpha for every tensor; alpha = 0 is the pre-trained model,
      alpha = 1 the fine-tune. The paper plots alpha over {0, 0.1, ..., 1} and recommends alpha = 0.5 when nothing
      is held out to choose by.
    - **LiNeS** (Wang et al., ICLR 2025, arXiv 2410.17146): block l = 1..L gets λ(l) = alpha + beta·(l - 1)/(L - 1),
      so shallow blocks stay near θ₀ and deep blocks keep the update; everything outside the blocks (embeddings,
      final norm, the LM head) gets alpha, as in the reference code. Its single-task setting is beta = 1 - alpha
      with alpha in {0, 0.1, ..., 1}, chosen on validation by 2·task/task_finetuned + mean(control /
      control_pretrained); the example notebook uses alpha = 0.1.

    **When.** ``on_train_end``: the fine-tune is measured (the monitor's own end-of-fit measurement is reused when
    it already ran at this step), then every edit in turn; the fine-tuned weights are put back bit for bit
    afterwards (:class:`~lit_mofo.task_vectors.TaskVectorEditor`), so the monitor's and
    :class:`~lit_mofo.ParameterDrift`'s end-of-fit figures are those of the fine-tune whatever the order of the
    callbacks. If a rule picks an edit, it is applied in ``on_fit_end``, after every callback's ``on_train_end``
    and before the LightningModule's ``on_fit_end`` (where ``CausalLMModule`` exports with ``export_dir``), and the
    checkpoints that hold the final step's weights are written again with it: each
    :class:`~lightning.pytorch.callbacks.ModelCheckpoint`'s ``last`` checkpoint (``save_last``; a ``"link"`` is
    replaced by a file, so the linked top-k checkpoint keeps its scored weights) and, for a ``ModelCheckpoint``
    without ``monitor`` (which keeps the newest checkpoints), the one saved at the final step. Checkpoints ranked by
    a monitored metric keep the weights their score was measured on. The module keeps the applied edit after fit.

    **Resume.** A checkpoint rewritten with an applied edit holds the edited weights next to the fine-tune's
    optimizer state (:func:`~lit_mofo.task_vectors.applied_edit` tells): a fit resumed from it is refused when the
    restore reaches this callback (``lit-mofo fit --ckpt_path`` refuses it up front, with or without the callback),
    since training on would mix the two and the end-of-fit sweep would edit the edit. Resume from a checkpoint written
    before the edit; ``validate`` and ``test`` from an edited checkpoint are fine.

    **Measured**: every probe of the trainer's :class:`~lit_mofo.callbacks.forgetting_monitor.ForgettingMonitor`
    (the same evaluation as the monitor's, through
    :meth:`~lit_mofo.callbacks.forgetting_monitor.ForgettingMonitor.evaluate_probes`), each value with its
    forgetting against the monitor's pre-trained baseline. ``task`` names the probe metric that scores the
    fine-tuning task; ``forgetting`` the one whose forgetting the rule bounds or minimises.

    **Logged** (every logger, at the final step, and ``trainer.callback_metrics``), for each edit key ``<edit>``
    (``wise_ft_a0.5``, ``lines_a0.2_b0.8``): ``probe/<probe>/<metric>/<edit>``,
    ``forgetting/<probe>/<metric>/<edit>`` and ``retention/<probe>/<metric>/<edit>`` - the monitor's names with the
    edit as a last part; the unedited values are the monitor's own ``probe/<probe>/<metric>``.

    **Report** (with the monitor's, see :mod:`lit_mofo.report`): a table of the task score and forgetting of every
    edit with the Pareto front and the applied edit marked, every value in the JSON (section
    ``task_vector_scaling``, with the sweep's and the fit's seconds), and ``forgetting_report_task_vector_scaling.png``:
    the task score against forgetting, one panel per forgetting metric (``forgetting``, else every metric of the
    other probes), the WiSE-FT and LiNeS curves, the unedited fine-tune and the pre-trained model marked, the Pareto
    front dashed and the applied edit circled (matplotlib needed).

    **Rules** (``apply``): ``"none"`` keeps the fine-tuned weights (default); ``"best_task"``: the best task score
    whose forgetting is at most ``max_forgetting``; ``"least_forgetting"``: the least forgetting whose task score
    is at most ``max_task_drop`` worse than the fine-tune's. The fine-tune itself is a candidate, so a rule may keep
    it; when no point qualifies, the fine-tune is kept with a warning. See :func:`~lit_mofo.task_vectors.select_point`.

    **θ₀** comes from the shared :class:`~lit_mofo.snapshot.PretrainedSnapshot`, captured at the start of fit for
    every tensor the module left trainable (the task vector; frozen tensors do not move) and carried in
    checkpoints. On a PEFT model the edits scale the effective weights: a LoRA layer's B·A through B alone (see
    :func:`~lit_mofo.task_vectors.task_vector_names`); DoRA and non-linear adapters are refused at setup. In a
    continual run (:mod:`lit_mofo.continual`, the stages of one fit) the start of fit is before stage 1, so the task
    vector is the whole sequence's and the edits run once, after the last stage; add the stages' task probes to the
    monitor to see what each edit gives back on every task.

    **Cost.** One probe evaluation per edit (plus one for the fine-tune when the monitor did not measure the final
    step), and per edit one pass over the edited tensors; memory: a CPU copy of each tensor an edit changes
    (released when the fine-tune is restored). The report gives the sweep's seconds against the training's.

    Call :meth:`sweep` from Python to measure the grid on a module outside of a fit.

    .. warning:: Sharded strategies (FSDP2, FSDP, DeepSpeed) are refused: an edit needs whole tensors. Under DDP
        every process applies the same edits to its replica and runs the probes on its share of the data, so the
        curve is the single-process one.

    Args:
        wise_ft: the WiSE-FT alpha grid, in [0, 1] (each an edit); ``[]`` for none.
        lines: the LiNeS ``(alpha, beta)`` pairs (in YAML ``[[0.0, 1.0], [0.5, 0.5]]``), with alpha in [0, 1],
            beta >= 0 and alpha + beta <= 1; ``[]`` for none. The paper's single-task pairs are ``(λ, 1 - λ)``.
        task: the probe metric that scores the task, ``"<probe>/<metric>"`` (e.g. ``"task/exact_match"``); needed
            by the rules and the plot.
        forgetting: the probe metric whose forgetting the rule uses, ``"<probe>/<metric>"`` (e.g.
            ``"knowledge/accuracy"``); needed by the rules.
        apply: ``"none"``, ``"best_task"`` or ``"least_forgetting"`` (see above).
        max_forgetting: ``best_task``'s budget, in the forgetting metric's units (>= 0).
        max_task_drop: ``least_forgetting``'s tolerance below the fine-tune's task score, in the task metric's units
            (>= 0; 0.01 is one point of exact match).
        allow_extrapolation: accept alpha (and LiNeS factors) outside [0, 1].
        report: add the curve to the end-of-fit report.

    Example::

        monitor = ForgettingMonitor({"task": TaskProbe(), "knowledge": KnowledgeProbe()})
        scaling = TaskVectorScaling(
            wise_ft=[0.25, 0.5, 0.75],
            lines=[[0.0, 1.0], [0.25, 0.75], [0.5, 0.5]],
            task="task/exact_match",
            forgetting="knowledge/accuracy",
            apply="least_forgetting",
            max_task_drop=0.01,  # within one point of the fine-tune's exact match
        )
        trainer = Trainer(callbacks=[monitor, scaling])
    """

    def __init__(
        self,
        wise_ft: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
        lines: Sequence[Sequence[float]] = ((0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25)),
        task: str | None = None,
        forgetting: str | None = None,
        apply: Rule = "none",
        max_forgetting: float | None = None,
        max_task_drop: float | None = None,
        allow_extrapolation: bool = False,
        report: bool = True,
    ) -> None:
        where, error = "TaskVectorScaling()", MisconfigurationException
        self.allow_extrapolation = as_bool(
            allow_extrapolation, where=where, argument="allow_extrapolation", error=error
        )
        for argument, value in (("wise_ft", wise_ft), ("lines", lines)):
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise MisconfigurationException(
                    f"{where}: {argument}={value!r} is invalid; the valid range is a list"
                    + (
                        " of alpha values in [0, 1], e.g. [0.25, 0.5, 0.75]."
                        if argument == "wise_ft"
                        else " of (alpha, beta) pairs, e.g. [[0.0, 1.0], [0.5, 0.5]]."
                    )
                )
        try:
            self.edits: tuple[TaskVectorEdit, ...] = edit_grid(
                list(wise_ft),
                [tuple(pair) if isinstance(pair, list) else pair for pair in lines],
                allow_extrapolation=self.allow_extrapolation,
            )
        except ValueError as err:
            raise MisconfigurationException(
                f"{where}: {err} (wise_ft={list(wise_ft)!r}, lines={[list(p) for p in lines]!r})"
            ) from err
        self.task = self._metric_name(task, "task", "'task/exact_match'")
        self.forgetting = self._metric_name(forgetting, "forgetting", "'knowledge/accuracy'")
        self.apply = as_choice(
            apply,
            where=where,
            argument="apply",
            choices=RULES,
            fix="'none' keeps the fine-tuned weights; 'best_task' and 'least_forgetting' pick an edit.",
            error=error,
        )
        bound = {"best_task": "max_forgetting", "least_forgetting": "max_task_drop"}.get(self.apply)
        for argument, value in (("max_forgetting", max_forgetting), ("max_task_drop", max_task_drop)):
            if value is not None and argument != bound:
                user = "apply='best_task'" if argument == "max_forgetting" else "apply='least_forgetting'"
                raise MisconfigurationException(
                    f"{where}: {argument}={value!r} is used by {user} only, and apply={self.apply!r}. Set {user} or "
                    f"drop {argument}."
                )
        if bound is not None:
            missing = [name for name, value in (("task", task), ("forgetting", forgetting)) if value is None]
            if missing:
                raise MisconfigurationException(
                    f"{where}: apply={self.apply!r} compares the edits' task scores and forgetting, so it needs "
                    f"{' and '.join(f'`{name}`' for name in missing)}: name the probe metrics as '<probe>/<metric>' "
                    "of the ForgettingMonitor, e.g. task='task/exact_match', forgetting='knowledge/accuracy'."
                )
            given = max_forgetting if bound == "max_forgetting" else max_task_drop
            if given is None:
                raise MisconfigurationException(
                    f"{where}: apply={self.apply!r} needs {bound}, in the "
                    + (
                        "forgetting metric's units, e.g. max_forgetting=0.05."
                        if bound == "max_forgetting"
                        else "task metric's units, e.g. max_task_drop=0.01 (one point of exact match)."
                    )
                )
            as_float(given, where=where, argument=bound, minimum=0.0, error=error)
        self.max_forgetting = None if max_forgetting is None else float(max_forgetting)
        self.max_task_drop = None if max_task_drop is None else float(max_task_drop)
        self.report = as_bool(report, where=where, argument="report", error=error)
        self._monitor: ForgettingMonitor | None = None
        self._names: list[str] = []
        self._points: list[EditPoint] = []
        self._chosen: EditPoint | None = None
        self._applied: TaskVectorEdit | None = None
        self._baselines: dict[str, dict[str, float]] = {}
        self._directions: dict[str, dict[str, bool]] = {}
        self._step = 0
        self._fit_start: float | None = None
        self._fit_seconds: float | None = None
        self._sweep_seconds: float | None = None

    @staticmethod
    def _metric_name(value: str | None, argument: str, example: str) -> str | None:
        if value is None:
            return None
        probe, _, metric = value.partition("/") if isinstance(value, str) else ("", "", "")
        if not probe or not metric or any(c.isspace() for c in value):
            raise MisconfigurationException(
                f"TaskVectorScaling(): {argument}={value!r} is invalid; the valid range is a probe metric of the "
                f"ForgettingMonitor as '<probe>/<metric>', e.g. {example}."
            )
        return value

    # ------------------------------------------------------------------ results
    @property
    def points(self) -> list[EditPoint]:
        """The curve of the last sweep: the unedited fine-tune first, then every edit of the grid, in order."""
        return list(self._points)

    @property
    def chosen(self) -> EditPoint | None:
        """The point the rule picked in the last sweep (None: no rule, or none qualified)."""
        return self._chosen

    @property
    def applied(self) -> TaskVectorEdit | None:
        """The edit the module holds after fit (None: the fine-tuned weights)."""
        return self._applied

    @property
    def sweep_seconds(self) -> float | None:
        """Wall-clock seconds of the last sweep (the fine-tune's measurement, every edit, the restore)."""
        return self._sweep_seconds

    @property
    def fit_seconds(self) -> float | None:
        """Wall-clock seconds of the last fit up to the sweep (from ``on_fit_start`` to ``on_train_end``: training,
        validation, the monitor's evaluations), the reference of the sweep's cost."""
        return self._fit_seconds

    @property
    def state_key(self) -> str:
        return self._generate_state_key(edits=[edit.key for edit in self.edits], task=self.task, apply=self.apply)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        adapter = StrategyAdapter.of(trainer, user=type(self).__name__)
        if adapter.sharded:
            raise MisconfigurationException(
                f"TaskVectorScaling does not support `{adapter.name}` yet: it shards the "
                "parameters, and an edit needs whole tensors on every process. Use a single device or "
                "`strategy='ddp'`, or edit a saved checkpoint on one device with lit_mofo.task_vectors."
            )
        monitors = [c for c in trainer.callbacks if isinstance(c, ForgettingMonitor)]  # type: ignore[attr-defined]
        if len(monitors) != 1:
            raise MisconfigurationException(
                "TaskVectorScaling measures every edit with the probes of the trainer's ForgettingMonitor, and the "
                + (
                    "trainer has none: add one, e.g. callbacks=[ForgettingMonitor({'task': TaskProbe(), "
                    "'knowledge': KnowledgeProbe()}), TaskVectorScaling(...)]."
                    if not monitors
                    else f"trainer has {len(monitors)}: keep one ForgettingMonitor with every probe to measure."
                )
            )
        self._monitor = monitor = monitors[0]
        self._check_metrics(monitor)
        try:
            task_vector_names(pl_module)  # refuses adapters that no edit scales exactly
            if any(isinstance(edit, LiNeS) for edit in self.edits):
                if not detect_layout(pl_module).blocks:
                    raise ValueError(
                        f"LiNeS scales the task vector per transformer block, and {type(pl_module).__name__} has none "
                        "that lit_mofo.blocks.detect_layout recognises; drop the LiNeS edits (lines=[]) and use "
                        "WiSE-FT."
                    )
        except ValueError as err:
            raise MisconfigurationException(f"TaskVectorScaling: {err}") from err
        if self.report:
            FitReport.attach(trainer, self)

    def _check_metrics(self, monitor: ForgettingMonitor) -> None:
        probes = monitor.probes
        for argument in ("task", "forgetting"):
            value = getattr(self, argument)
            if value is None:
                continue
            probe, metric = split_metric(value)
            if probe not in probes:
                raise MisconfigurationException(
                    f"TaskVectorScaling(): {argument}={value!r} names probe {probe!r}, which the ForgettingMonitor "
                    f"does not have; its probes are {sorted(probes)}. Name one of them as '<probe>/<metric>'."
                )
            metrics = probes[probe].higher_is_better
            if metrics and metric not in metrics:  # an empty declaration (lm-eval) is checked once measured
                raise MisconfigurationException(
                    f"TaskVectorScaling(): {argument}={value!r} names metric {metric!r}, which probe {probe!r} does "
                    f"not declare; its metrics are {sorted(metrics)}. (A CallableProbe given one flag for all its "
                    "metrics learns their names as it returns them: give it higher_is_better={metric: flag}.)"
                )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainable = initial_requires_grad(pl_module)  # the module's choice, also when HalfFineTuning ran first
        try:
            names = task_vector_names(pl_module, [name for name, flag in trainable.items() if flag])
        except ValueError as err:
            raise MisconfigurationException(f"TaskVectorScaling: {err}") from err
        if not names:
            raise MisconfigurationException(
                f"TaskVectorScaling: no parameter of {type(pl_module).__name__} is trainable at the start of fit, so "
                "there is no task vector to edit. Unfreeze what the fit should train, or drop the callback."
            )
        snapshot = PretrainedSnapshot.attach(pl_module, owner=self)
        snapshot.capture(trainer, pl_module, names)
        self._names = names
        self._points, self._chosen, self._applied = [], None, None
        self._fit_seconds = self._sweep_seconds = None
        self._fit_start = time.perf_counter()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:  # θ₀ is final once every on_fit_start has run (another callback may widen its dtype there)
            task_vector_names(pl_module, self._names, self._theta0(pl_module))
        except ValueError as err:
            raise MisconfigurationException(f"TaskVectorScaling: {err}") from err

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._monitor is not None
        if self._fit_start is not None:
            self._fit_seconds = time.perf_counter() - self._fit_start
        if trainer.global_step == 0:
            rank_zero_info("TaskVectorScaling: the fit took no optimizer step, so there is no task vector to edit.")
            if self.report:
                FitReport.attach(trainer, self).submit(trainer, self, self.report_section())
            return
        start = time.perf_counter()
        finetuned = self._monitor_final_values(trainer)
        self._measure(pl_module, self._theta0(pl_module), self._monitor, trainer, finetuned)
        self._sweep_seconds = time.perf_counter() - start
        self._chosen = self.select()
        if self.apply != "none" and self._chosen is None:
            rank_zero_warn(
                f"TaskVectorScaling(apply={self.apply!r}): no point of the curve qualifies "
                f"({self._bound_text()}), so the fine-tuned weights are kept."
            )
        self._log(trainer)
        if self.report:
            FitReport.attach(trainer, self).submit(trainer, self, self.report_section())

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        edit = None if self._chosen is None else self._chosen.edit
        if edit is None:
            return
        apply_edit(pl_module, self._theta0(pl_module), edit)
        self._applied = edit
        rewritten = self._rewrite_checkpoints(trainer)
        where = f"; checkpoints written again with it: {rewritten}" if rewritten else ""
        rank_zero_info(f"TaskVectorScaling: applied {edit.label} (rule {self.apply!r}: {self._bound_text()}){where}.")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        PretrainedSnapshot.detach(pl_module, owner=self)
        FitReport.detach(trainer, self)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        PretrainedSnapshot.save_to(pl_module, checkpoint)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        edit = applied_edit(checkpoint)
        if edit is not None and trainer.state.fn == TrainerFn.FITTING:
            raise MisconfigurationException(
                f"TaskVectorScaling: the checkpoint {trainer.ckpt_path} holds the weights this callback edited at the "
                f"end of its fit ({edit}: θ₀ + λ·Δ), not the fine-tune's, while its optimizer state is the "
                "fine-tune's: training on from it would mix the two, and the sweep at the end would edit the edit. "
                "To train further, resume from a checkpoint written before the edit (one of an earlier step, or of a "
                "ModelCheckpoint with a monitor, which keeps the weights its score was measured on); to fine-tune "
                "the edited model anew, load its weights without ckpt_path (e.g. "
                "CausalLMModule.load_from_checkpoint); to evaluate it, use trainer.validate/test(ckpt_path=...)."
            )
        PretrainedSnapshot.on_load_checkpoint(pl_module, checkpoint, owner=self)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "applied": None if self._applied is None else self._applied.key,
            "chosen": None if self._chosen is None else self._chosen.key,
            "points": [point.as_dict() for point in self._points],
            "sweep_seconds": self._sweep_seconds,
            "fit_seconds": self._fit_seconds,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the saved curve is for reading the checkpoint, and a resumed fit measures its own."""

    # ------------------------------------------------------------------ the sweep
    def sweep(
        self,
        pl_module: nn.Module,
        theta0: PretrainedSnapshot | Mapping[str, Tensor] | None,
        monitor: ForgettingMonitor,
        trainer: pl.Trainer | None = None,
    ) -> list[EditPoint]:
        """Measure the module as it is and under every edit of the grid with ``monitor``'s probes, then put the
        fine-tuned weights back bit for bit; return the curve (also kept for :meth:`select` and
        :meth:`report_section`). Nothing is applied, logged or reported.

        For use outside of a fit: ``theta0`` is the pre-trained value of each tensor to edit, by the names of
        ``pl_module.named_parameters()`` (a :class:`~lit_mofo.snapshot.PretrainedSnapshot`, or e.g. the state of the
        module before fine-tuning); ``monitor`` a ForgettingMonitor holding the pre-trained baselines (after a fit
        with it, or restored with ``load_state_dict``); ``trainer`` None runs the probes on one process.
        """
        if theta0 is None:
            raise ValueError(
                "TaskVectorScaling.sweep() needs θ₀ (theta0=): the shared PretrainedSnapshot of the fit, or the "
                "pre-trained value of each parameter by name, e.g. {name: p.detach().clone() for name, p in "
                "module.named_parameters()} taken before fine-tuning."
            )
        if not monitor.baselines:
            raise ValueError(
                "TaskVectorScaling.sweep() measures forgetting against the monitor's pre-trained baselines, and this "
                "ForgettingMonitor has none: pass the monitor of the fit (or restore its state with load_state_dict)."
            )
        theta0 = self._as_mapping(theta0)
        params = {name for name, _ in pl_module.named_parameters()}
        names = task_vector_names(pl_module, [name for name in theta0 if name in params], theta0)
        self._measure(pl_module, {name: theta0[name] for name in names}, monitor, trainer, None)
        self._chosen = self.select()
        return self.points

    @staticmethod
    def _as_mapping(theta0: PretrainedSnapshot | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        if isinstance(theta0, PretrainedSnapshot):
            return {name: theta0[name] for name in theta0}
        return theta0

    def _theta0(self, pl_module: nn.Module) -> dict[str, Tensor]:
        snapshot = PretrainedSnapshot.get(pl_module)
        missing = [] if snapshot is None else [name for name in self._names if name not in snapshot]
        if snapshot is None or missing:
            raise MisconfigurationException(
                "TaskVectorScaling: the pre-trained snapshot "
                + ("is gone" if snapshot is None else f"lacks {missing[:3]}")
                + "; it is captured in on_fit_start and released in teardown. Use the callback inside a fit, or call "
                "sweep() with θ₀ outside of one."
            )
        return {name: snapshot[name] for name in self._names}

    def _monitor_final_values(self, trainer: pl.Trainer) -> dict[str, dict[str, float]] | None:
        """The monitor's measurement of the current step, if it has one for every probe (the weights are final)."""
        assert self._monitor is not None
        values: dict[str, dict[str, float]] = {}
        for record in self._monitor.history:
            if record["step"] == trainer.global_step:
                values.setdefault(record["probe"], {})[record["metric"]] = record["value"]
        return values if set(values) == set(self._monitor.probes) else None

    def _measure(
        self,
        pl_module: nn.Module,
        theta0: Mapping[str, Tensor],
        monitor: ForgettingMonitor,
        trainer: pl.Trainer | None,
        finetuned: dict[str, dict[str, float]] | None,
    ) -> None:
        self._baselines = monitor.baselines
        self._step = 0 if trainer is None else trainer.global_step
        start = time.perf_counter()
        if finetuned is None:
            finetuned = monitor.evaluate_probes(trainer, pl_module)
        # Read once the probes have run: some name their metrics as they return them (lm-eval, CallableProbe).
        self._directions = {name: dict(probe.higher_is_better) for name, probe in monitor.probes.items()}
        for argument in ("task", "forgetting"):
            metric = getattr(self, argument)
            if metric is not None and split_metric(metric)[1] not in finetuned.get(split_metric(metric)[0], {}):
                measured = sorted(f"{p}/{m}" for p, values in finetuned.items() for m in values)
                raise MisconfigurationException(
                    f"TaskVectorScaling(): {argument}={metric!r} was not measured; the monitor's probes returned "
                    f"{measured}. Name one of them."
                )
        points = [self._point(None, finetuned, time.perf_counter() - start)]
        with TaskVectorEditor(pl_module, theta0) as editor:  # leaving it restores θ bit for bit, also on errors
            for edit in self.edits:
                start = time.perf_counter()
                editor.apply(edit)
                values = monitor.evaluate_probes(trainer, pl_module)
                points.append(self._point(edit, values, time.perf_counter() - start))
        self._points = self._mark_pareto(points)

    def _point(
        self, edit: TaskVectorEdit | None, values: Mapping[str, Mapping[str, float]], seconds: float
    ) -> EditPoint:
        lost: dict[str, dict[str, float]] = {}
        kept: dict[str, dict[str, float]] = {}
        for probe, metrics in values.items():
            for metric, value in metrics.items():
                baseline = self._baselines.get(probe, {}).get(metric)
                higher = self._directions.get(probe, {}).get(metric)
                if baseline is None or higher is None:  # no pre-trained value to compare with (the monitor warned)
                    lost_value = kept_value = math.nan
                else:
                    lost_value, kept_value = forgetting(value, baseline, higher), retention(value, baseline, higher)
                lost.setdefault(probe, {})[metric] = lost_value
                kept.setdefault(probe, {})[metric] = kept_value
        return EditPoint(edit, {p: dict(m) for p, m in values.items()}, lost, kept, seconds)

    def _panels(self) -> list[str]:
        """The forgetting metrics of the plot and the table: ``forgetting``, else every metric of the probes other
        than the task's."""
        if self.forgetting is not None:
            return [self.forgetting]
        task_probe = None if self.task is None else split_metric(self.task)[0]
        measured = self._points[0].values if self._points else {}
        return [f"{probe}/{metric}" for probe, metrics in measured.items() if probe != task_probe for metric in metrics]

    def _task_higher(self) -> bool:
        assert self.task is not None
        probe, metric = split_metric(self.task)
        return self._directions[probe][metric]

    def _mark_pareto(self, points: list[EditPoint]) -> list[EditPoint]:
        if self.task is None:
            return points
        return mark_pareto(points, self.task, self._panels(), self._task_higher())

    def select(self, points: Sequence[EditPoint] | None = None) -> EditPoint | None:
        """The point this callback's rule picks (see :func:`~lit_mofo.task_vectors.select_point`) among ``points``
        (default: the last sweep's); None for ``apply="none"`` or when none qualifies."""
        if self.apply == "none":
            return None
        return select_point(
            self._points if points is None else points,
            self.apply,  # type: ignore[arg-type]
            task=self.task,
            forgetting=self.forgetting,
            task_higher_is_better=self._task_higher(),
            max_forgetting=self.max_forgetting,
            max_task_drop=self.max_task_drop,
        )

    def _bound_text(self) -> str:
        if self.apply == "best_task":
            return f"best {self.task} with forgetting of {self.forgetting} <= {self.max_forgetting:g}"
        if self.apply == "least_forgetting":
            return (
                f"least forgetting of {self.forgetting} with {self.task} within {self.max_task_drop:g} of the "
                "fine-tune's"
            )
        return "keep the fine-tune"

    # ------------------------------------------------------------------ outputs
    def _log(self, trainer: pl.Trainer) -> None:
        metrics: dict[str, float] = {}
        for point in self._points:
            if point.edit is None:
                continue
            for probe, values in point.values.items():
                for metric, value in values.items():
                    metrics[f"probe/{probe}/{metric}/{point.key}"] = value
                    metrics[f"forgetting/{probe}/{metric}/{point.key}"] = point.forgetting[probe][metric]
                    metrics[f"retention/{probe}/{metric}/{point.key}"] = point.retention[probe][metric]
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _rewrite_checkpoints(self, trainer: pl.Trainer) -> list[str]:
        """Write the checkpoints that hold the final step's weights again, now with the applied edit."""
        targets: dict[str, bool] = {}  # path -> weights only
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint):
                continue
            if getattr(callback, "_last_global_step_saved", None) != trainer.global_step:
                continue  # its newest checkpoint is of an earlier step
            paths = [callback.last_model_path]
            if callback.monitor is None:  # it keeps the newest checkpoints: the latest one is the final step's
                paths.append(callback.best_model_path)
            for path in paths:
                if path and path not in targets:
                    targets[path] = callback.save_weights_only
        for path, weights_only in targets.items():
            if trainer.is_global_zero and os.path.islink(path):
                os.remove(path)  # a `save_last="link"`: the linked checkpoint keeps its own weights
            trainer.save_checkpoint(path, weights_only=weights_only)
        return list(targets)

    def report_section(self) -> ReportSection:
        """This callback's part of the end-of-fit report (see :func:`lit_mofo.report.edit_sweep_section`)."""
        sweep = EditSweep(
            points=self._points,
            step=self._step,
            task=self.task,
            panels=self._panels() if self._points else [],
            baselines=self._baselines,
            directions=self._directions,
            picked=None if self._chosen is None else self._chosen.key,
        )
        settings = {
            "forgetting": self.forgetting,
            "apply": self.apply,
            "max_forgetting": self.max_forgetting,
            "max_task_drop": self.max_task_drop,
        }
        return edit_sweep_section(sweep, settings, self._sweep_seconds, self._fit_seconds)
