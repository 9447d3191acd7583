"""Forgetting benchmark: task score against forgetting and drift for every lit_mofo method, two scenarios, seeds.

Usage::

    python benchmarks/forgetting.py                      # full mode: both scenarios, LR sweep + 5 seeds x 11 fits
    python benchmarks/forgetting.py --workers 2          # two runs at a time (each on one thread)
    python benchmarks/forgetting.py --scenarios disjoint --methods full_ft mofo_0.15 full_ft+lines --seeds 1 2 3
    python benchmarks/forgetting.py --quick --out-dir /tmp/forgetting   # smoke run of every method (1-2 min, tested)

**Scenarios** (``lit_mofo.scenario``; ``--scenarios``, both by default, reported side by side): a pre-trained
1.1M-parameter Llama that knows the 512 facts of a generated world and can copy a word list is fine-tuned on the
``cipher`` task, which it cannot do (exact match 0). In ``overlap`` (base model ``scenario:base``) the task is
written in the names of 64 of the world's 128 entities, the subjects of half the facts; in ``disjoint`` (base model
``scenario:disjoint``, pre-trained the same way with the copying skill over the task's words) in 64 names no fact is
about. Every method gets the same budget - ``--steps`` optimizer steps of ``--batch-size`` problems, cosine
schedule with 3% warm-up (``CausalLMModule``'s default), the same data order per seed - and differs only in the
optimizer, the callbacks or the adapters.

**Methods** are YAML files in ``benchmarks/methods/`` (``method_config.py``): each holds the ``class_path``/
``init_args`` blocks ``lit-mofo fit`` reads - ``model.init_args.optimizer``, ``model.init_args.peft``,
``trainer.callbacks`` - checked against the constructors they name, and a ``label``. ``--methods`` takes their
names (default below) or paths to files of that form; the LR is the benchmark's (the sweep's), whatever a file says,
and a callback that re-draws on a step schedule re-draws every ``steps // 4`` steps (four rounds of the budget):

===================  =====================================================================================
``full_ft``          AdamW (weight decay 0): full fine-tuning, the reference.
``mofo_0.05``        MoFO, fraction 0.05 (5% of each matrix's entries move per step).
``mofo_0.15``        MoFO, fraction 0.15 (the paper's setting).
``hft_once``         AdamW + ``HalfFineTuning()``: one category-level half drawn at the start of fit.
``hft_redraw``       AdamW + ``HalfFineTuning(redraw_every_n_steps=steps // 4)``: four rounds, each a new half.
``hft_reset``        as ``hft_redraw`` with ``reset=True``: matrices frozen by a re-draw go back to pre-trained.
``mofo_hft``         MoFO (0.15) + ``HalfFineTuning()`` once.
``l2_0.1``/``l2_1`` AdamW + ``L2ToPretrained(strength=λ)``: the MoFO paper's L2 regulariser baseline, at λ = 0.1 and
                     1 (the regulariser's own trade-off: λ is a second knob, shown as two methods rather than chosen
                     by a rule that would need a forgetting measurement); another λ is another file.
``lora_8``,          LoRA through PEFT (``CausalLMModule(peft=LoraConfig(r, lora_alpha=2r,
``lora_64``          target_modules="all-linear"))``: every linear layer of the blocks; embeddings and head frozen),
                     AdamW over the adapters; ranks 8 and 64.
``full_ft+wise_ft``  the ``full_ft`` fits edited after training with WiSE-FT, θ₀ + alpha·(θ - θ₀).
``full_ft+lines``    the ``full_ft`` fits edited with LiNeS (per-block factors, the paper's single-task pairs).
``mofo_0.15+lines``  the ``mofo_0.15`` fits edited with LiNeS.
===================  =====================================================================================

**Learning rate.** Each fitted method's LR comes from the same small sweep (``--lrs``, default 3e-4, 1e-3, 3e-3),
run on its own seed (``--sweep-seed``, 0) that the reported seeds (``--seeds``, 1 to 5) do not include. The rule uses
the task only, as a user without a forgetting probe would: the LR with the highest task exact match; LRs within
``--tie-points`` (1 point) of the best count as tied, and the smallest of them wins (the gentlest setting that
reaches the best score). A post-hoc row uses its base method's LR and fits.

**Post-hoc edits** (``lit_mofo.TaskVectorScaling``, no extra fits): at the end of their sweep-seed fits,
``full_ft`` and ``mofo_0.15`` measure with the monitor's probes the grid of their rows' families - WiSE-FT alpha in
{0.1, ..., 0.9}, LiNeS (λ, 1 - λ) for λ in {0, 0.1, ..., 0.9}: the papers' grids without the ends already measured
(alpha = 1 is the fine-tune, 0 the pre-trained model). A rule fixed before any result was seen picks one edit per row
on the sweep seed at the chosen LR: the least knowledge forgetting among the edits of that family whose task exact
match is within 1 point of the unedited fit's (``TaskVectorScaling``'s ``least_forgetting`` rule; the unedited fit
itself qualifies, so the rule may keep it). That edit is applied unchanged to the fit of every reported seed
(measured by the same callback, the fine-tuned weights restored afterwards).

**Measured** with lit_mofo's own callbacks, at the end of fit: the task's exact match on 256 held-out problems
(``TaskProbe``); forgetting on the knowledge probe (``KnowledgeProbe``: accuracy points lost on the 512 facts,
and the rise of their loss in nats) and on the copying skill (``TaskProbe(kind="repeat", min_length=2,
max_length=5)``, the lengths the base models were pre-trained on), each as ``ForgettingMonitor`` computes it
(pre-trained value minus final value, positive = forgot); drift from the pre-trained weights (``ParameterDrift``:
relative L2 distance and fraction of entries changed, all parameters; for LoRA the effective weights, adapters
merged; for the post-hoc edits ``ParameterDrift.compute`` on the edited weights at the end of the fit). Also the
median wall time of a training step (forward, backward, callbacks' hooks, optimizer step; evaluation excluded), the
post-hoc sweep's seconds against the fit's, and memory: the process's peak RSS (each run in a fresh process; mostly
the Python/torch runtime at this model size) and the training state the method holds - parameters, the largest set
of gradients, optimizer state, and the pre-trained copy the method's callbacks keep (``L2ToPretrained``'s
``regularised_names``, ``HalfFineTuning(reset=True)``'s ``resettable_names``, the post-hoc edits; ``ParameterDrift``'s
measuring copy is not counted). The base models' build metadata (their own
measured knowledge and copying figures, the machine, torch) go into the JSON: base-model builds differ between
machines, so figures to compare must come from one machine's builds.

**Output** (``--out-dir``, default ``benchmarks/results``; ``forgetting_quick.*`` in quick mode): a JSON of every
run (sweep and seeds, both scenarios), a Markdown summary (both scenarios side by side, then per scenario: mean +-
sample std over the seeds, the sweep, the post-hoc curves, the issue's targets checked), and a PNG per scenario of
task score against knowledge forgetting with error bars and the post-hoc curves (needs matplotlib: the ``plot``
extra). Every run uses one torch thread: at this model size that is several times faster than two on a 2-core
machine, and ``--workers`` then runs that many fits side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import method_config  # noqa: E402  (benchmarks/method_config.py: the methods' YAML files)
import worker_pool  # noqa: E402  (benchmarks/worker_pool.py: runs in fresh processes)

SCENARIO_NAMES = ("overlap", "disjoint")
# The default methods, in the order of the tables: the files benchmarks/methods/<name>.yaml.
METHODS = (
    "full_ft",
    "mofo_0.05",
    "mofo_0.15",
    "hft_once",
    "hft_redraw",
    "hft_reset",
    "mofo_hft",
    "l2_0.1",
    "l2_1",
    "lora_8",
    "lora_64",
    "full_ft+wise_ft",
    "full_ft+lines",
    "mofo_0.15+lines",
)
# A post-hoc row: (the fitted method whose weights it edits, the edit family), from its file's `post_hoc`.
POST_HOC: dict[str, tuple[str, str]] = {
    m: post_hoc for m in METHODS if (post_hoc := method_config.method_info(m).post_hoc) is not None
}
FITTED_METHODS = tuple(m for m in METHODS if m not in POST_HOC)
HFT_ROUNDS = 4  # a method that re-draws on a step schedule (hft_redraw/hft_reset) re-draws every steps // HFT_ROUNDS
# The post-hoc rule, fixed before any result: least knowledge forgetting within 1 task point of the unedited fit.
POST_HOC_RULE = {"apply": "least_forgetting", "forgetting": "knowledge/accuracy", "max_task_drop": 0.01}


@dataclass(frozen=True)
class Budget:
    """What every method gets: the same steps, batch, schedule and evaluation."""

    steps: int = 200
    batch_size: int = 32
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    knowledge_limit_batches: int | None = None  # None: all 512 facts
    task_examples: int = 256
    copy_examples: int = 256
    train_examples: int | None = None  # problems generated for training; None: the data module's default (8192)
    knowledge_split: bool = True  # knowledge forgetting on the task's words and the others (2 passes over the facts)


@dataclass(frozen=True)
class PostHocGrid:
    """The edits the sweep-seed fits of the post-hoc rows' base methods measure."""

    wise_ft: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 10))  # 0.1 ... 0.9
    lines: tuple[tuple[float, float], ...] = tuple((round(0.1 * i, 1), round(1 - 0.1 * i, 1)) for i in range(10))


@dataclass(frozen=True)
class RunSpec:
    method: str
    lr: float
    seed: int
    phase: str  # "sweep" or "seeds"
    budget: Budget = field(default_factory=Budget)
    scenario: str = "overlap"
    wise_ft: tuple[float, ...] = ()  # post-hoc edits this fit measures at its end
    lines: tuple[tuple[float, float], ...] = ()


# ---------------------------------------------------------------------------------------------------------- one run
def post_hoc_of(method: str) -> tuple[str, str] | None:
    """``(base method, edit family)`` of a post-hoc row (a shipped one or a file given by path), None for a fitted
    method."""
    return POST_HOC[method] if method in POST_HOC else method_config.method_info(method).post_hoc


def _row(row: str) -> tuple[str, str]:
    """``(base method, edit family)`` of the post-hoc row ``row``."""
    pair = post_hoc_of(row)
    if pair is None:
        raise ValueError(f"{row!r} is a fitted method, not a post-hoc row")
    return pair


def label(method: str) -> str:
    """The method's name in tables and the plot: its file's ``label`` (the name itself for a method whose file is
    gone, e.g. one given as a path when a JSON is redrawn elsewhere)."""
    try:
        return method_config.method_info(method).label
    except ValueError:
        return method


def _method_name(value: str) -> str:
    """argparse type of ``--methods``: a file of ``benchmarks/methods/`` by name, or a path to a method file (its
    name is then the file's stem)."""
    try:
        info = method_config.method_info(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return info.name if info.path.parent == method_config.METHODS_DIR else str(info.path)


def make_step_meter() -> Any:
    """A callback that times training steps and records the training state's bytes (defined lazily: the parent
    process of a ``--workers`` run never imports Lightning)."""
    import lightning.pytorch as pl
    import torch

    class StepMeter(pl.Callback):
        def __init__(self) -> None:
            self.step_seconds: list[float] = []
            self.max_grad_bytes = 0
            self.optimizer_state_bytes = 0
            self._start = 0.0

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            self._start = time.perf_counter()

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            grads = sum(p.grad.nbytes for p in pl_module.parameters() if p.grad is not None)
            self.max_grad_bytes = max(self.max_grad_bytes, grads)

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            self.step_seconds.append(time.perf_counter() - self._start)

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.optimizer_state_bytes = sum(
                value.nbytes
                for optimizer in trainer.optimizers
                for state in optimizer.state.values()
                for value in state.values()
                if isinstance(value, torch.Tensor)
            )

    return StepMeter()


def _theta0_bytes(module: Any, callbacks: Sequence[Any]) -> int:
    """Bytes of the pre-trained copy the method's callbacks keep for themselves (one copy, shared between them; not
    ParameterDrift's measuring copy): what ``L2ToPretrained`` regularises and what ``HalfFineTuning(reset=True)``
    may reset, as they report it after the fit."""
    from lit_mofo import HalfFineTuning, L2ToPretrained

    names: set[str] = set()
    for callback in callbacks:
        if isinstance(callback, L2ToPretrained):
            names.update(callback.regularised_names)
        elif isinstance(callback, HalfFineTuning) and callback.reset:
            names.update(callback.resettable_names)
    return sum(param.nbytes for name, param in module.named_parameters() if name in names)


def _knowledge_by_subject(model: Any, scenario: str) -> dict[str, float | None]:
    """Knowledge accuracy (%) on the facts whose entity is one of the task's words, and on the others.

    A diagnostic for the analysis: in ``overlap`` the task's problems are written in entity names (the first 64 of
    the 128), so half of the facts share their subject token with the fine-tuning data; in ``disjoint`` none does
    (``task_words`` is None there, ``other_words`` every fact).
    """
    from lit_mofo.scenario import evaluate_knowledge, get_scenario
    from lit_mofo.scenario.corpus import generate_facts

    entities = {fact.entity for fact in generate_facts()}
    task_words = set(get_scenario(scenario).task().words) & entities
    split: dict[str, float | None] = {
        "task_words": 100 * evaluate_knowledge(model, entities=task_words)["accuracy"] if task_words else None
    }
    split["other_words"] = 100 * evaluate_knowledge(model, entities=entities - task_words)["accuracy"]
    return split


_PRETRAINED_SPLIT: dict[str, dict[str, float | None]] = {}


def drift_figures(groups: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """This script's drift figures from ``ParameterDrift.compute``'s groups: relative L2 and % of entries changed
    overall, relative L2 per role."""
    overall = groups["overall"]["all"]
    return {
        "drift_relative_l2": overall.relative_l2,
        "drift_fraction_changed": 100 * overall.fraction_changed,
        "drift_relative_l2_by_role": {role: stats.relative_l2 for role, stats in groups["role"].items()},
    }


def _make_edit_drift(drift: Any, scaling: Any, theta0: Mapping[str, Any]) -> Any:
    """A callback that, at the end of training (after ``scaling``'s sweep, before ParameterDrift lets its snapshot
    go), applies every edit of ``scaling``'s curve in turn and records ``drift.compute``'s figures of the edited
    weights in ``.figures`` (by edit key), restoring the fine-tune after each."""
    import lightning.pytorch as pl

    from lit_mofo.task_vectors import TaskVectorEditor, task_vector_names

    class EditDrift(pl.Callback):
        def __init__(self) -> None:
            self.figures: dict[str, dict[str, Any]] = {}

        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            names = task_vector_names(pl_module, list(theta0), theta0)
            for point in scaling.points:
                with TaskVectorEditor(pl_module, {name: theta0[name] for name in names}) as editor:
                    if point.edit is not None:
                        editor.apply(point.edit)
                    self.figures[point.key] = drift_figures(drift.compute(pl_module))

    return EditDrift()


def _edit_of(entry: Mapping[str, Any]) -> Any:
    """The ``lit_mofo.task_vectors`` edit a curve entry (``EditPoint.as_dict()``) describes; None if unedited."""
    from lit_mofo.task_vectors import LiNeS, WiSEFT

    if entry["method"] is None:
        return None
    return WiSEFT(entry["alpha"]) if entry["method"] == "wise_ft" else LiNeS(entry["alpha"], entry["beta"])


def _post_hoc_figures(
    scaling: Any,
    edit_drift: Mapping[str, Mapping[str, Any]],
    module: Any,
    theta0: Mapping[str, Any],
    scenario: str,
    split: bool,
) -> dict[str, dict[str, Any]]:
    """Every point of TaskVectorScaling's curve in this script's units, with the drift of the edited weights
    (``edit_drift``: ParameterDrift's, measured at the end of the fit) and, when ``split``, the knowledge split,
    measured by applying each edit to the fitted module again and restoring it."""
    from lit_mofo.task_vectors import TaskVectorEditor, task_vector_names

    names = task_vector_names(module, list(theta0), theta0)
    figures = {}
    for point in scaling.points:
        entry = point.as_dict()
        values, lost = entry["values"], entry["forgetting"]
        figures[entry["edit"]] = {
            "method": entry["method"],
            "alpha": entry["alpha"],
            "beta": entry["beta"],
            "task_exact_match": 100 * values["task"]["exact_match"],
            "task_loss": values["task"]["loss"],
            "knowledge_accuracy": 100 * values["knowledge"]["accuracy"],
            "forgetting_knowledge_accuracy": 100 * lost["knowledge"]["accuracy"],
            "forgetting_knowledge_loss": lost["knowledge"]["loss"],
            "forgetting_copy_exact_match": 100 * lost["copy"]["exact_match"],
            "seconds": entry["seconds"],
            **edit_drift[entry["edit"]],
        }
        if split:
            with TaskVectorEditor(module, {name: theta0[name] for name in names}) as editor:
                if point.edit is not None:
                    editor.apply(point.edit)
                figures[entry["edit"]]["split"] = _knowledge_by_subject(module.model, scenario)
    return figures


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Fine-tune a scenario's base model with one method, one LR and one seed; return the measurements."""
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    import lightning.pytorch as pl
    import transformers

    # Quiet: Lightning's and lit_mofo's per-fit info lines would repeat for every run.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()

    from lit_mofo import ForgettingMonitor, ParameterDrift, TaskVectorScaling
    from lit_mofo.modules import CausalLMModule
    from lit_mofo.scenario import KnowledgeProbe, ScenarioDataModule, TaskProbe, get_scenario

    budget = spec.budget
    scenario = get_scenario(spec.scenario)
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    method = method_config.build_method(spec.method, spec.lr, redraw_every_n_steps=max(1, budget.steps // HFT_ROUNDS))
    module = CausalLMModule(
        model=scenario.model,
        optimizer=method.optimizer,
        schedule=budget.schedule,  # type: ignore[arg-type]
        warmup_ratio=budget.warmup_ratio,
        peft=method.peft,
    )
    sizes = {} if budget.train_examples is None else {"num_train": budget.train_examples}
    data = ScenarioDataModule(batch_size=budget.batch_size, num_val=0, scenario=scenario.name, **sizes)  # type: ignore[arg-type]
    monitor = ForgettingMonitor(
        {
            "task": TaskProbe(num_examples=budget.task_examples, scenario=scenario.name),  # type: ignore[arg-type]
            "knowledge": KnowledgeProbe(limit_batches=budget.knowledge_limit_batches),
            "copy": TaskProbe(
                kind="repeat",
                num_examples=budget.copy_examples,
                min_length=2,
                max_length=5,
                name="copy",
                scenario=scenario.name,  # type: ignore[arg-type]
            ),
        },
        every_n_train_steps=None,
        evaluate_on_validation=False,
        report=False,
    )
    # On a LoRA model ParameterDrift measures the effective weights, adapters merged.
    drift = ParameterDrift(every_n_train_steps=None, report=False)
    scaling = edit_drift = None
    theta0: dict[str, Any] = {}
    if spec.wise_ft or spec.lines:
        scaling = TaskVectorScaling(wise_ft=spec.wise_ft, lines=spec.lines, task="task/exact_match", report=False)
        theta0 = {name: param.detach().clone() for name, param in module.named_parameters()}  # the edits' θ₀
        edit_drift = _make_edit_drift(drift, scaling, theta0)
    meter = make_step_meter()
    method_callbacks = method.callbacks
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=budget.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[c for c in (meter, *method_callbacks, monitor, drift, scaling, edit_drift) if c is not None],
    )
    no_split: dict[str, float | None] = {"task_words": None, "other_words": None}
    if budget.knowledge_split:
        split_before = _PRETRAINED_SPLIT.get(scenario.name) or _knowledge_by_subject(module.model, scenario.name)
        _PRETRAINED_SPLIT[scenario.name] = split_before  # the same base model for every run of the process
    else:
        split_before = no_split
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    sweep_seconds = scaling.sweep_seconds if scaling is not None else 0.0
    fit_seconds = time.perf_counter() - start - (sweep_seconds or 0.0)
    split_after = _knowledge_by_subject(module.model, scenario.name) if budget.knowledge_split else no_split

    final: dict[tuple[str, str], dict[str, Any]] = {}
    for record in monitor.history:  # the last measurement of each metric is the end-of-fit one
        final[(record["probe"], record["metric"])] = record
    overall = [record for record in drift.history if record["scope"] == "overall"][-1]
    drifted = {
        "drift_relative_l2": overall["relative_l2"],
        "drift_fraction_changed": 100 * overall["fraction_changed"],
        "drift_relative_l2_by_role": {
            record["group"]: record["relative_l2"] for record in drift.history if record["scope"] == "role"
        },
    }
    param_bytes = sum(p.nbytes for p in module.parameters())
    theta0_bytes = _theta0_bytes(module, method_callbacks)
    steady = meter.step_seconds[min(5, len(meter.step_seconds) - 1) :]  # the first steps load kernels and caches
    mib = 1 / 2**20

    def lost_on(before: float | None, after: float | None) -> float | None:
        return None if before is None or after is None else before - after

    result = {
        **{key: value for key, value in asdict(spec).items() if key not in ("budget", "wise_ft", "lines")},
        "steps_done": trainer.global_step,
        "task_exact_match": 100 * final[("task", "exact_match")]["value"],
        "task_loss": final[("task", "loss")]["value"],
        "knowledge_accuracy_pretrained": 100 * final[("knowledge", "accuracy")]["baseline"],
        "knowledge_accuracy": 100 * final[("knowledge", "accuracy")]["value"],
        "forgetting_knowledge_accuracy": 100 * final[("knowledge", "accuracy")]["forgetting"],
        "forgetting_knowledge_loss": final[("knowledge", "loss")]["forgetting"],
        "copy_exact_match_pretrained": 100 * final[("copy", "exact_match")]["baseline"],
        "forgetting_copy_exact_match": 100 * final[("copy", "exact_match")]["forgetting"],
        "forgetting_knowledge_task_words": lost_on(split_before["task_words"], split_after["task_words"]),
        "forgetting_knowledge_other_words": lost_on(split_before["other_words"], split_after["other_words"]),
        **drifted,
        "step_ms": 1000 * statistics.median(steady),
        "fit_seconds": fit_seconds,
        "evaluation_seconds": monitor_seconds(monitor),
        "train_state_mib": (param_bytes + meter.max_grad_bytes + meter.optimizer_state_bytes + theta0_bytes) * mib,
        "optimizer_state_mib": meter.optimizer_state_bytes * mib,
        "max_grad_mib": meter.max_grad_bytes * mib,
        "theta0_mib": theta0_bytes * mib,
        "trainable_mib": sum(p.nbytes for p in module.parameters() if p.requires_grad) * mib,
        "peak_rss_mib": peak_rss_mib(),
    }
    if scaling is not None:
        edits = [point for point in scaling.points if point.edit is not None]
        split = spec.phase == "seeds" and budget.knowledge_split
        assert edit_drift is not None
        result["post_hoc"] = _post_hoc_figures(scaling, edit_drift.figures, module, theta0, scenario.name, split=split)
        for figures in result["post_hoc"].values():
            split = figures.pop("split", None)
            if split is not None:
                figures["forgetting_knowledge_task_words"] = lost_on(split_before["task_words"], split["task_words"])
                figures["forgetting_knowledge_other_words"] = lost_on(split_before["other_words"], split["other_words"])
        result["post_hoc_edits"] = len(edits)
        result["post_hoc_sweep_seconds"] = sweep_seconds
        result["post_hoc_fit_seconds"] = scaling.fit_seconds
        result["post_hoc_theta0_mib"] = param_bytes * mib  # TaskVectorScaling's θ₀: every trained tensor
    return result


def peak_rss_mib() -> float | None:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes); None where unavailable."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def monitor_seconds(monitor: Any) -> float:
    """Seconds the probes took (baseline and final evaluation), as the monitor recorded them."""
    seen: dict[tuple[int, str], float] = {}
    for record in monitor.history:
        seen[(record["step"], record["probe"])] = record["seconds"]
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------------------- driver
def run_all(specs: Sequence[RunSpec], workers: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run every spec: in this process (``workers=0``) or each in a fresh process, ``workers`` at a time
    (``worker_pool.run_all``: forked from a fork server that has imported the libraries once)."""
    count = 0

    def done(result: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        log(
            f"  [{count:>3}/{len(specs)}] {result['scenario']:<8} {result['phase']:<5} {result['method']:<10} "
            f"lr={result['lr']:<7g} "
            f"seed={result['seed']}: task {result['task_exact_match']:5.1f}, knowledge forgetting "
            f"{result['forgetting_knowledge_accuracy']:5.1f} pts, drift {result['drift_relative_l2']:.3f}, "
            f"{result['step_ms']:.0f} ms/step, fit {result['fit_seconds']:.0f} s"
            + (
                f", post-hoc sweep of {result['post_hoc_edits']} edit(s) {result['post_hoc_sweep_seconds']:.1f} s"
                if "post_hoc" in result
                else ""
            )
        )

    return worker_pool.run_all(specs, workers, run_one, done)


def choose_lrs(sweep: Sequence[dict[str, Any]], tie_points: float) -> dict[str, float]:
    """Per method: the smallest LR whose task exact match is within ``tie_points`` of the method's best."""
    chosen = {}
    for method in dict.fromkeys(run["method"] for run in sweep):
        runs = [run for run in sweep if run["method"] == method]
        best = max(run["task_exact_match"] for run in runs)
        chosen[method] = min(run["lr"] for run in runs if run["task_exact_match"] >= best - tie_points)
    return chosen


def choose_edits(sweep: Sequence[dict[str, Any]], chosen_lrs: Mapping[str, float], rows: Sequence[str]) -> dict:
    """Per post-hoc row: the edit the fixed rule (:data:`POST_HOC_RULE`) picks on its base method's sweep-seed fit at
    the chosen LR, among the unedited fit and the edits of the row's family; ``{row: curve entry}``, whose
    ``"edit"`` is ``"finetuned"`` when the rule keeps the fit as it is."""
    from lit_mofo.callbacks.task_vector_scaling import EditPoint, select_point

    picks = {}
    for row in rows:
        base, family = _row(row)
        (run,) = [r for r in sweep if r["method"] == base and r["lr"] == chosen_lrs[base]]
        entries = {key: entry for key, entry in run["post_hoc"].items() if entry["method"] in (None, family)}
        points = [
            EditPoint(
                _edit_of(entry),
                {"task": {"exact_match": entry["task_exact_match"] / 100}},
                {"knowledge": {"accuracy": entry["forgetting_knowledge_accuracy"] / 100}},
                {},
            )
            for entry in entries.values()
        ]
        pick = select_point(
            points,
            POST_HOC_RULE["apply"],  # type: ignore[arg-type]
            task="task/exact_match",
            forgetting=POST_HOC_RULE["forgetting"],  # type: ignore[arg-type]
            max_task_drop=POST_HOC_RULE["max_task_drop"],  # type: ignore[arg-type]
        )
        assert pick is not None  # the unedited fit always qualifies
        picks[row] = {"edit": pick.key, **entries[pick.key]}
    return picks


def edits_for(
    method: str, picks: Mapping[str, Mapping[str, Any]]
) -> tuple[tuple[float, ...], tuple[tuple[float, float], ...]]:
    """The (WiSE-FT, LiNeS) edits a seed fit of ``method`` measures: the picks of the post-hoc rows based on it."""
    wise_ft: list[float] = []
    lines: list[tuple[float, float]] = []
    for row, pick in picks.items():
        if _row(row)[0] != method or pick["method"] is None:
            continue
        if pick["method"] == "wise_ft":
            wise_ft.append(pick["alpha"])
        else:
            lines.append((pick["alpha"], pick["beta"]))
    return tuple(wise_ft), tuple(lines)


POST_HOC_KEYS = (
    "task_exact_match",
    "task_loss",
    "knowledge_accuracy",
    "forgetting_knowledge_accuracy",
    "forgetting_knowledge_loss",
    "forgetting_copy_exact_match",
    "forgetting_knowledge_task_words",
    "forgetting_knowledge_other_words",
    "drift_relative_l2",
    "drift_fraction_changed",
    "drift_relative_l2_by_role",
)


def post_hoc_runs(runs: Sequence[dict[str, Any]], picks: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The seed runs of each post-hoc row: its base method's runs with the measurements of the picked edit (the
    unedited ones when the rule kept the fit), and the pre-trained copy the edit needs added to the state."""
    rows = []
    for row, pick in picks.items():
        base = _row(row)[0]
        for run in runs:
            if run["method"] != base:
                continue
            edited = run["post_hoc"][pick["edit"]] if pick["method"] is not None else run
            theta0 = run["post_hoc_theta0_mib"] if "post_hoc_theta0_mib" in run else 0.0
            rows.append(
                {
                    **{key: value for key, value in run.items() if key != "post_hoc"},
                    **{key: edited.get(key) for key in POST_HOC_KEYS},
                    "method": row,
                    "edit": pick["edit"],
                    "train_state_mib": run["train_state_mib"] + theta0,
                    "theta0_mib": run["theta0_mib"] + theta0,
                }
            )
    return rows


SUMMARY_KEYS = (
    "task_exact_match",
    "task_loss",
    "forgetting_knowledge_accuracy",
    "forgetting_knowledge_loss",
    "forgetting_copy_exact_match",
    "forgetting_knowledge_task_words",
    "forgetting_knowledge_other_words",
    "knowledge_accuracy",
    "drift_relative_l2",
    "drift_fraction_changed",
    "step_ms",
    "fit_seconds",
    "train_state_mib",
    "peak_rss_mib",
    "post_hoc_sweep_seconds",
)


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {metric: {mean, std, n}}}`` over the seeds (sample std; 0 for a single seed)."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for method in dict.fromkeys(run["method"] for run in runs):
        rows = [run for run in runs if run["method"] == method]
        summary[method] = {}
        for key in SUMMARY_KEYS:
            values = [row[key] for row in rows if row.get(key) is not None]
            if values:
                summary[method][key] = mean_std(values)
    return summary


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{mean, std, n}`` of the seeds' values (sample std; 0 for a single seed)."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def check_targets(
    summary: dict[str, dict[str, dict[str, float]]], sweep: Sequence[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """The issues' targets, each with the measured figures (means over the seeds) and whether it is met: MoFO and
    HFT against full fine-tuning; with ``l2_0.1`` in the summary, whether a lit_mofo recipe beats it; with post-hoc
    sweeps among the ``sweep`` runs, their cost against the fit."""
    extra = _l2_check(summary) + _post_hoc_cost_check(sweep)
    if "full_ft" not in summary:
        return extra
    ref = summary["full_ft"]
    ref_task = ref["task_exact_match"]["mean"]
    ref_forget = ref["forgetting_knowledge_accuracy"]["mean"]
    ref_drift = ref["drift_relative_l2"]["mean"]
    checks = []

    def ratio(value: float, reference: float) -> float:
        return value / reference if reference > 0 else math.inf

    if "mofo_0.15" in summary:
        mofo = summary["mofo_0.15"]
        task = mofo["task_exact_match"]["mean"]
        forget = mofo["forgetting_knowledge_accuracy"]["mean"]
        drift = mofo["drift_relative_l2"]["mean"]
        checks += [
            {
                "method": "mofo_0.15",
                "target": "task >= full FT - 1 point",
                "measured": f"{task:.1f} vs {ref_task:.1f} ({task - ref_task:+.1f} points)",
                "met": task >= ref_task - 1,
            },
            {
                "method": "mofo_0.15",
                "target": "knowledge forgetting <= 0.5x full FT",
                "measured": f"{forget:.1f} vs {ref_forget:.1f} points ({ratio(forget, ref_forget):.2f}x)",
                "met": forget <= 0.5 * ref_forget,
            },
            {
                "method": "mofo_0.15",
                "target": "drift (relative L2) clearly below full FT (<= 0.8x)",
                "measured": f"{drift:.3f} vs {ref_drift:.3f} ({ratio(drift, ref_drift):.2f}x)",
                "met": drift <= 0.8 * ref_drift,
            },
        ]
    for method in ("hft_once", "hft_redraw", "hft_reset"):
        if method not in summary:
            continue
        task = summary[method]["task_exact_match"]["mean"]
        forget = summary[method]["forgetting_knowledge_accuracy"]["mean"]
        checks += [
            {
                "method": method,
                "target": "task >= full FT - 2 points",
                "measured": f"{task:.1f} vs {ref_task:.1f} ({task - ref_task:+.1f} points)",
                "met": task >= ref_task - 2,
            },
            {
                "method": method,
                "target": "knowledge forgetting below full FT",
                "measured": f"{forget:.1f} vs {ref_forget:.1f} points ({ratio(forget, ref_forget):.2f}x)",
                "met": forget < ref_forget,
            },
        ]
    return checks + extra


def _is_recipe(method: str) -> bool:
    """A lit_mofo recipe: a method of this kit (MoFO, HFT, their mix, a post-hoc edit), not a baseline (its file's
    ``baseline: true``: full fine-tuning, L2, LoRA)."""
    return not method_config.method_info(method).baseline


def _l2_check(summary: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    if "l2_0.1" not in summary:
        return []
    l2_task = summary["l2_0.1"]["task_exact_match"]["mean"]
    l2_forget = summary["l2_0.1"]["forgetting_knowledge_accuracy"]["mean"]
    reaching = [m for m in summary if _is_recipe(m) and summary[m]["task_exact_match"]["mean"] >= l2_task]
    best = min(reaching, key=lambda m: summary[m]["forgetting_knowledge_accuracy"]["mean"], default=None)
    if best is None:
        measured = f"no lit_mofo recipe reaches its task score ({l2_task:.1f})"
        met = False
    else:
        task = summary[best]["task_exact_match"]["mean"]
        forget = summary[best]["forgetting_knowledge_accuracy"]["mean"]
        measured = (
            f"best at its task score or above: {label(best)}, task {task:.1f} vs {l2_task:.1f}, forgetting "
            f"{forget:.1f} vs {l2_forget:.1f} points"
        )
        met = forget < l2_forget
    target = "a lit_mofo recipe forgets less at the same or better task score"
    return [{"method": "l2_0.1", "target": target, "measured": measured, "met": met}]


def post_hoc_cost_ratios(sweep: Sequence[dict[str, Any]]) -> list[float]:
    """The post-hoc sweep's seconds over the fit's (up to the sweep), for every sweep-seed fit that measured the
    whole grid."""
    return [run["post_hoc_sweep_seconds"] / run["post_hoc_fit_seconds"] for run in sweep if "post_hoc" in run]


def _post_hoc_cost_check(sweep: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    ratios = post_hoc_cost_ratios(sweep)
    if not ratios:
        return []
    edits = max(run["post_hoc_edits"] for run in sweep if "post_hoc" in run)
    per_edit = statistics.median(
        run["post_hoc_sweep_seconds"] / run["post_hoc_edits"] for run in sweep if "post_hoc" in run
    )
    median = statistics.median(ratios)
    return [
        {
            "method": "post_hoc",
            "kind": "cost",
            "target": "post-hoc sweep <= 10% of the fit's time",
            "measured": f"{100 * median:.0f}% (median of {len(ratios)} fits; {edits} edits, {per_edit:.2f} s each)",
            "met": median <= 0.10,
        }
    ]


# ---------------------------------------------------------------------------------------------------------- output
def pm(stats: Mapping[str, float] | None, digits: int, signed: bool = False) -> str:
    """``mean ± std`` of :func:`mean_std`'s figures (``-`` for none); ``signed`` writes the mean's sign always."""
    if stats is None:
        return "-"
    sign = "+" if signed else ""
    return f"{stats['mean']:{sign}.{digits}f} ± {stats['std']:.{digits}f}"


def sweep_table(
    sweep: Sequence[dict[str, Any]],
    lrs: Sequence[float],
    chosen: Mapping[str, float],
    cell: Callable[[dict[str, Any]], str],
    label: Callable[[str], str],
) -> list[str]:
    """The LR sweep as a Markdown table: a method per row, an LR per column, ``cell(run)`` in each (``-`` for an LR
    not run), the chosen LR's cell in bold."""
    lines = ["| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
    for method in dict.fromkeys(run["method"] for run in sweep):
        cells = []
        for lr in lrs:
            run = next((r for r in sweep if r["method"] == method and r["lr"] == lr), None)
            if run is None:
                cells.append("-")
                continue
            cells.append(f"**{cell(run)}**" if lr == chosen.get(method) else cell(run))
        lines.append(f"| {label(method)} | " + " | ".join(cells) + " |")
    return lines


def _edit_label(key: str) -> str:
    """``wise_ft_a0.7`` -> ``WiSE-FT alpha=0.7``, ``lines_a0.3_b0.7`` -> ``LiNeS alpha=0.3, beta=0.7``."""
    if key == "finetuned":
        return "none (the rule kept the fit)"
    if key.startswith("wise_ft_a"):
        return f"WiSE-FT alpha={key.removeprefix('wise_ft_a')}"
    alpha, beta = key.removeprefix("lines_a").split("_b")
    return f"LiNeS alpha={alpha}, beta={beta}"


def _base_model_line(name: str, scenario: dict[str, Any]) -> str:
    meta = scenario.get("base_model") or {}
    if not meta:
        return f"`{name}`: no build metadata recorded"
    versions = meta.get("versions", {})
    return (
        f"`{name}` (`{meta.get('model', '?')}`, build `{meta.get('key', '?')}`): knowledge accuracy "
        f"{100 * meta.get('knowledge_accuracy', math.nan):.1f}%, copying exact match "
        f"{100 * meta.get('copy_exact_match', math.nan):.1f}% (the build's own figures), built in "
        f"{meta.get('train_seconds', math.nan):.0f} s on {meta.get('machine', '?')} with "
        f"{meta.get('num_threads', '?')} thread(s), torch {versions.get('torch', '?')}"
    )


def markdown(result: dict[str, Any]) -> str:
    """The whole report: settings, both scenarios side by side, the issues' goals, then each scenario in full."""
    settings = result["settings"]
    budget = settings["budget"]
    scenarios = result["scenarios"]
    names = list(scenarios)
    runs = sum(len(s["runs"]) for s in scenarios.values())
    sweeps = sum(len(s["sweep"]) for s in scenarios.values())
    grid = settings.get("post_hoc_grid", {})
    lines = [
        f"Scenarios {', '.join(f'`{n}`' for n in names)}: each base model fine-tuned on `cipher`, {budget['steps']} "
        f"steps x batch {budget['batch_size']}, {budget['schedule']} schedule with {budget['warmup_ratio']:.0%} "
        f"warm-up, one torch thread per run; LR sweep {settings['lrs']} on seed {settings['sweep_seed']} (task-only "
        f"rule: best exact match, ties within {settings['tie_points']:g} point to the smallest LR), reported seeds "
        f"{settings['seeds']}. Post-hoc rows: the grid (WiSE-FT alpha {list(grid.get('wise_ft', []))}, LiNeS "
        f"(alpha, beta) {[list(pair) for pair in grid.get('lines', [])]}) measured on the sweep seed, the edit "
        "picked by the fixed rule (least knowledge forgetting within 1 task point of the unedited fit) applied to "
        "every seed. "
        f"{result['machine']}. Wall time {result['wall_seconds'] / 60:.1f} min ({sweeps} sweep runs + {runs} seed "
        f"runs, {settings['workers']} worker(s)).",
        "",
        "Base models: " + "; ".join(_base_model_line(n, scenarios[n]) for n in names) + ".",
        "",
    ]
    if len(names) > 1:
        lines += [
            "Both scenarios side by side (mean ± sample std over the seeds): task exact match (%) and knowledge "
            "forgetting (accuracy points lost on the 512 facts).",
            "",
            "| method | " + " | ".join(f"{n}: task EM | {n}: knowledge forgetting" for n in names) + " |",
            "|---|" + "---:|---:|" * len(names),
        ]
        methods = list(dict.fromkeys(m for n in names for m in scenarios[n]["summary"]))
        for method in methods:
            cells = []
            for n in names:
                stats = scenarios[n]["summary"].get(method)
                cells += [
                    pm(stats and stats["task_exact_match"], 1),
                    pm(stats and stats["forgetting_knowledge_accuracy"], 1),
                ]
            lines.append(f"| {label(method)} | " + " | ".join(cells) + " |")
        lines.append("")
    for n in names:
        lines += [f"### Scenario `{n}`", "", scenario_markdown(scenarios[n], settings)]
    return "\n".join(lines).rstrip() + "\n"


def scenario_markdown(result: dict[str, Any], settings: dict[str, Any]) -> str:
    """One scenario's tables: the summary, where it forgets, the LR sweep, the post-hoc curves, the targets."""
    budget = settings["budget"]
    summary = result["summary"]
    lines = [
        f"Mean ± sample std over the seeds. Task: exact match on {budget['task_examples']} held-out problems (%). "
        "Forgetting: pre-trained minus final, positive = forgot - knowledge accuracy on "
        f"{'all 512' if budget['knowledge_limit_batches'] is None else 'the first 256 of the 512'} facts "
        "(points; pre-trained "
        f"{_pretrained(result, 'knowledge_accuracy_pretrained')}), knowledge loss (nats), copying skill "
        "(`repeat` exact match on 2-5 words, points; pre-trained "
        f"{_pretrained(result, 'copy_exact_match_pretrained')}). Drift: relative L2 distance to the pre-trained "
        "weights and entries changed (%), all parameters (LoRA: the merged weights; post-hoc rows: the edited "
        "weights). Step: median training step. State: parameters + "
        "gradients + optimizer state + the pre-trained copy the method needs.",
        "",
        "| method | LR | task EM | knowledge forgetting (pts) | knowledge loss rise | copy forgetting (pts) "
        "| relative L2 | changed (%) | step (ms) | state (MiB) | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, stats in summary.items():
        lines.append(
            f"| {label(method)} | {result['lr'][method]:g} | {pm(stats['task_exact_match'], 1)} "
            f"| {pm(stats['forgetting_knowledge_accuracy'], 1)} | {pm(stats['forgetting_knowledge_loss'], 2)} "
            f"| {pm(stats['forgetting_copy_exact_match'], 1)} | {pm(stats['drift_relative_l2'], 3)} "
            f"| {pm(stats['drift_fraction_changed'], 1)} | {pm(stats['step_ms'], 1)} "
            f"| {stats['train_state_mib']['mean']:.1f} | {pm(stats.get('peak_rss_mib'), 0)} |"
        )
    roles = list(dict.fromkeys(role for run in result["runs"] for role in run["drift_relative_l2_by_role"]))
    lines += [
        "",
        "Where it forgets (diagnostic): knowledge forgetting (points) on the facts about the 64 entities whose names "
        "the task's problems are written in (none in `disjoint`), and on the facts about the others; relative L2 "
        "drift per role.",
        "",
        "| method | facts on task words | other facts | " + " | ".join(f"drift {role}" for role in roles) + " |",
        "|---|---:|---:|" + "---:|" * len(roles),
    ]
    for method, stats in summary.items():
        rows = [run for run in result["runs"] if run["method"] == method]
        drift = [
            statistics.fmean(run["drift_relative_l2_by_role"][role] for run in rows)
            if all(role in run["drift_relative_l2_by_role"] for run in rows)
            else None
            for role in roles
        ]
        lines.append(
            f"| {label(method)} | {pm(stats.get('forgetting_knowledge_task_words'), 1)} "
            f"| {pm(stats.get('forgetting_knowledge_other_words'), 1)} | "
            + " | ".join("-" if value is None else f"{value:.3f}" for value in drift)
            + " |"
        )
    if result["sweep"]:
        lrs = settings["lrs"]
        lines += [
            "",
            f"LR sweep (seed {settings['sweep_seed']}): task EM / knowledge forgetting (points); **bold** = chosen.",
            "",
            *sweep_table(
                result["sweep"],
                lrs,
                result["lr"],
                lambda run: f"{run['task_exact_match']:.1f} / {run['forgetting_knowledge_accuracy']:.1f}",
                label,
            ),
        ]
    picks = result.get("post_hoc", {}).get("picks", {})
    if picks:
        lines += ["", *post_hoc_markdown(result, picks)]
    if result["targets"]:
        lines += ["", "| method | target | measured (mean over seeds) | met |", "|---|---|---|---|"]
        for check in result["targets"]:
            who = "post-hoc sweep" if check["method"] == "post_hoc" else label(check["method"])
            lines.append(f"| {who} | {check['target']} | {check['measured']} | {'yes' if check['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def post_hoc_markdown(result: dict[str, Any], picks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The post-hoc grid on the sweep seed (each base method at its chosen LR) with the picks in bold, and the
    sweep's cost."""
    lines = [
        "Post-hoc edits on the sweep seed: task EM / knowledge forgetting (points) of every edit of the grid; "
        "**bold** = picked by the rule (least forgetting within 1 task point of the unedited fit).",
        "",
    ]
    for base in dict.fromkeys(_row(row)[0] for row in picks):
        (run,) = [r for r in result["sweep"] if r["method"] == base and r["lr"] == result["lr"][base]]
        chosen = {pick["edit"] for row, pick in picks.items() if _row(row)[0] == base}
        entries = run["post_hoc"]
        unedited = entries["finetuned"]
        lines += [
            f"{label(base)} (lr {run['lr']:g}, unedited: {unedited['task_exact_match']:.1f} / "
            f"{unedited['forgetting_knowledge_accuracy']:.1f}{', kept by a rule' if 'finetuned' in chosen else ''}; "
            f"the sweep took {run['post_hoc_sweep_seconds']:.1f} s against {run['post_hoc_fit_seconds']:.1f} s for the "
            "fit):",
            "",
        ]
        for family, title, factor in (
            ("wise_ft", "WiSE-FT alpha", "alpha"),
            ("lines", "LiNeS alpha (beta = 1 - alpha)", "alpha"),
        ):
            family_entries = [(key, e) for key, e in entries.items() if e["method"] == family]
            if not family_entries:
                continue
            lines += [
                f"| {title} | " + " | ".join(f"{e[factor]:g}" for _, e in family_entries) + " |",
                "|---|" + "---:|" * len(family_entries),
            ]
            cells = []
            for key, entry in family_entries:
                cell = f"{entry['task_exact_match']:.1f} / {entry['forgetting_knowledge_accuracy']:.1f}"
                cells.append(f"**{cell}**" if key in chosen else cell)
            lines += ["| task / forgetting | " + " | ".join(cells) + " |", ""]
    lines.append(
        "Picked: " + "; ".join(f"{label(row)}: {_edit_label(pick['edit'])}" for row, pick in picks.items()) + "."
    )
    return lines


def _pretrained(result: dict[str, Any], key: str) -> str:
    values = sorted({run[key] for run in result["runs"]})
    return ", ".join(f"{value:.1f}" for value in values)


def plot(result: dict[str, Any], path: Path, title: str = "") -> str | None:
    """Task score against knowledge forgetting, a point per method with std error bars; a second panel zooms on
    the methods that reach the task (mean >= 95%), where the points crowd; a third shows the post-hoc curves
    measured on the sweep seed. Returns why not, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    summary = result["summary"]
    markers = "osD^v<>Pp*Xh"
    colors = plt.get_cmap("tab20").colors
    picks = result.get("post_hoc", {}).get("picks", {})
    figure, axes = plt.subplots(1, 3 if picks else 2, figsize=(19 if picks else 13, 5.8), dpi=110)
    overview, zoom = axes[0], axes[1]
    reached = []
    for index, (method, stats) in enumerate(summary.items()):
        x, y = stats["forgetting_knowledge_accuracy"], stats["task_exact_match"]
        style = {
            "fmt": markers[index % len(markers)],
            "color": colors[index % len(colors)],
            "markersize": 8,
            "capsize": 4,
        }
        overview.errorbar(
            x["mean"],
            y["mean"],
            xerr=x["std"],
            yerr=y["std"],
            label=f"{label(method)} (lr {result['lr'][method]:g})",
            **style,
        )
        if y["mean"] >= 95:
            reached.append(y["mean"] - y["std"])
            zoom.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], **style)
            zoom.annotate(
                label(method),
                (x["mean"], y["mean"]),
                textcoords="offset points",
                xytext=(6, 6 if len(reached) % 2 else -12),
                fontsize=8,
            )
    budget = result.get("budget") or {}
    seeds = len({run["seed"] for run in result["runs"]})
    overview.set_title(f"All methods: {budget.get('steps', '?')} steps, mean ± std over {seeds} seeds", fontsize=10)
    zoom.set_title("Zoom: the methods that reach the task (task EM >= 95%)", fontsize=10)
    if reached:
        zoom.set_ylim(max(95.0, min(reached) - 0.5), 100.4)
    for axis in axes:
        axis.set_xlabel("knowledge forgetting: accuracy points lost on the facts (lower is better)")
        axis.grid(alpha=0.3)
    overview.set_ylabel("task exact match after fine-tuning, % (higher is better)")
    overview.legend(fontsize=7, loc="best")
    if picks:
        curves = axes[2]
        for base_index, base in enumerate(dict.fromkeys(_row(row)[0] for row in picks)):
            (run,) = [r for r in result["sweep"] if r["method"] == base and r["lr"] == result["lr"][base]]
            chosen = {pick["edit"] for row, pick in picks.items() if _row(row)[0] == base}
            for family, style in (("wise_ft", "-"), ("lines", "--")):
                entries = sorted(
                    (e for e in run["post_hoc"].values() if e["method"] == family), key=lambda e: e["alpha"]
                )
                entries.append(run["post_hoc"]["finetuned"])
                color = f"C{2 * base_index + (family == 'lines')}"
                curves.plot(
                    [e["forgetting_knowledge_accuracy"] for e in entries],
                    [e["task_exact_match"] for e in entries],
                    style,
                    marker="o" if family == "wise_ft" else "s",
                    color=color,
                    markersize=4,
                    label=f"{label(base)} + {'WiSE-FT' if family == 'wise_ft' else 'LiNeS'}",
                )
            unedited = run["post_hoc"]["finetuned"]
            curves.plot(
                unedited["forgetting_knowledge_accuracy"], unedited["task_exact_match"], "*", color="k", markersize=12
            )
            for key in chosen - {"finetuned"}:
                entry = run["post_hoc"][key]
                curves.plot(
                    entry["forgetting_knowledge_accuracy"],
                    entry["task_exact_match"],
                    "o",
                    markersize=14,
                    markerfacecolor="none",
                    markeredgecolor="k",
                )
        curves.set_title("Post-hoc edits on the sweep seed (★ unedited, ○ picked)", fontsize=10)
        curves.legend(fontsize=7, loc="best")
    figure.suptitle(title or "lit_mofo forgetting benchmark: up and to the left is better", fontsize=11)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return None


# ---------------------------------------------------------------------------------------------------------- main
def _fitted(methods: Sequence[str]) -> list[str]:
    """The methods to fit: the requested fitted ones and the base method of each requested post-hoc row."""
    fitted = [m for m in methods if post_hoc_of(m) is None]
    fitted += [_row(m)[0] for m in methods if post_hoc_of(m) is not None]
    return list(dict.fromkeys(fitted))


def base_model_metadata(scenario: str) -> dict[str, Any]:
    """The scenario base model's build metadata (its own measured figures, the machine, versions), without its
    recipe."""
    from lit_mofo.scenario import get_scenario
    from lit_mofo.scenario.base_model import METADATA_FILE, base_model_path

    spec = get_scenario(scenario)
    path = base_model_path(spec.recipe)
    metadata = json.loads((path / METADATA_FILE).read_text())
    metadata.pop("recipe", None)
    return {"model": spec.model, "path": str(path), **metadata}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios", nargs="+", choices=SCENARIO_NAMES, default=list(SCENARIO_NAMES), help="default: both"
    )
    parser.add_argument("--methods", nargs="+", type=_method_name, default=list(METHODS), help=", ".join(METHODS))
    parser.add_argument("--lrs", nargs="+", type=float, default=None, help="LR sweep (default 3e-4 1e-3 3e-3)")
    parser.add_argument("--sweep-seed", type=int, default=0, help="seed of the LR sweep's runs")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="reported seeds (default 1 2 3 4 5)")
    parser.add_argument("--tie-points", type=float, default=1.0, help="task-EM points within which LRs tie")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 200)")
    parser.add_argument("--batch-size", type=int, default=None, help="problems per step (default 32)")
    parser.add_argument(
        "--workers", type=int, default=None, help="runs at a time, each in a fresh process; 0 = in this process"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of every method: 12 steps, one LR, 2 seeds, small probes and post-hoc grid, no knowledge "
        "split, in this process (48 fits once the base models are built: about 1 minute on 2 quiet CPU cores, 2 on "
        "busy ones; a little more with --workers 2)",
    )
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="rewrite the Markdown and PNGs from a JSON this script wrote"
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        result = _upgrade(json.loads(args.from_json.read_text()))
        return write_outputs(result, args.out_dir, args.from_json.stem)

    quick = args.quick
    budget = Budget(
        steps=args.steps or (12 if quick else Budget.steps),
        batch_size=args.batch_size or (8 if quick else Budget.batch_size),
        knowledge_limit_batches=1 if quick else None,
        task_examples=64 if quick else Budget.task_examples,
        copy_examples=64 if quick else Budget.copy_examples,
        train_examples=None if not quick else (args.steps or 12) * (args.batch_size or 8),
        knowledge_split=not quick,
    )
    grid = PostHocGrid(wise_ft=(0.3, 0.7), lines=((0.0, 1.0), (0.5, 0.5))) if quick else PostHocGrid()
    lrs = sorted(args.lrs or ([1e-3] if quick else [3e-4, 1e-3, 3e-3]))
    seeds = args.seeds or ([1, 2] if quick else [1, 2, 3, 4, 5])
    workers = args.workers if args.workers is not None else (0 if quick else 1)
    problems = []
    if budget.steps < 1 or budget.batch_size < 1:
        problems.append(f"--steps={budget.steps} and --batch-size={budget.batch_size} must be >= 1")
    if any(not (0 < lr < 1) for lr in lrs):
        problems.append(f"--lrs={lrs}: learning rates must be in (0, 1), e.g. 3e-4 1e-3 3e-3")
    if len(set(seeds)) < 2:
        problems.append(f"--seeds={seeds}: give at least 2 distinct seeds (the table reports a std over seeds)")
    methods = list(dict.fromkeys(args.methods))
    post_hoc = [m for m in methods if post_hoc_of(m) is not None]
    if args.sweep_seed in seeds and (len(lrs) > 1 or post_hoc):
        problems.append(
            f"--sweep-seed={args.sweep_seed} is among --seeds={seeds}: the LR and the post-hoc edits must be chosen "
            "apart"
        )
    if workers < 0:
        problems.append(f"--workers={workers} must be >= 0 (0 runs in this process)")
    if problems:
        parser.error("; ".join(problems))
    # SIGTERM (a job scheduler, a timeout) unwinds like Ctrl+C: the worker pool is stopped and its queues released.
    signal.signal(signal.SIGTERM, worker_pool.exit_on_signal)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    start = time.perf_counter()
    scenarios = list(dict.fromkeys(args.scenarios))
    base_models = {}
    for scenario in scenarios:  # built once here (about 2 min each), not in every worker
        base_models[scenario] = base_model_metadata(scenario)
        log(f"scenario {scenario} base model: {base_models[scenario]['path']}")

    fitted = _fitted(methods)
    bases = {_row(m)[0] for m in post_hoc}
    families = {_row(m) for m in post_hoc}  # (base, family): each base measures the grids of its rows only
    # Sweep: every fitted method at every LR when there is an LR to choose, else only the post-hoc rows' bases
    # (their edits are picked on the sweep seed); the bases measure the post-hoc grid of their rows' families.
    swept = fitted if len(lrs) > 1 else [m for m in fitted if m in bases]
    sweep_specs = [
        RunSpec(
            m,
            lr,
            args.sweep_seed,
            "sweep",
            budget,
            scenario,
            grid.wise_ft if (m, "wise_ft") in families else (),
            grid.lines if (m, "lines") in families else (),
        )
        for scenario in scenarios
        for m in swept
        for lr in lrs
    ]
    log(f"sweep: {len(sweep_specs)} runs")
    sweep_all = run_all(sweep_specs, workers, log)
    per_scenario: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        sweep = [run for run in sweep_all if run["scenario"] == scenario]
        chosen = choose_lrs(sweep, args.tie_points) if len(lrs) > 1 else dict.fromkeys(fitted, lrs[0])
        for row in post_hoc:
            chosen[row] = chosen[_row(row)[0]]
        picks = choose_edits(sweep, chosen, post_hoc)
        log(f"{scenario}: chosen LRs {chosen}; post-hoc edits { ({r: p['edit'] for r, p in picks.items()}) }")
        per_scenario[scenario] = {"sweep": sweep, "lr": chosen, "picks": picks}
    seed_specs = []
    for scenario in scenarios:
        chosen, picks = per_scenario[scenario]["lr"], per_scenario[scenario]["picks"]
        for seed in seeds:
            for m in fitted:
                wise_ft, lines = edits_for(m, picks)
                seed_specs.append(RunSpec(m, chosen[m], seed, "seeds", budget, scenario, wise_ft, lines))
    log(f"seeds: {len(seed_specs)} runs")
    runs_all = run_all(seed_specs, workers, log)

    import torch

    result: dict[str, Any] = {
        "settings": {
            "quick": quick,
            "scenarios": scenarios,
            "methods": methods,
            "lrs": lrs,
            "sweep_seed": args.sweep_seed,
            "seeds": seeds,
            "tie_points": args.tie_points,
            "workers": workers,
            "hft_rounds": HFT_ROUNDS,
            "budget": asdict(budget),
            "post_hoc_grid": asdict(grid),
            "post_hoc_rule": POST_HOC_RULE,
        },
        "machine": (
            f"{platform.machine()} ({os.cpu_count()} logical CPUs), {platform.system()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}"
        ),
        "wall_seconds": time.perf_counter() - start,
        "scenarios": {},
    }
    for scenario in scenarios:
        state = per_scenario[scenario]
        runs = [run for run in runs_all if run["scenario"] == scenario]
        runs += post_hoc_runs(runs, state["picks"])
        order = {m: i for i, m in enumerate([*methods, *fitted])}
        runs.sort(key=lambda run: (order[run["method"]], run["seed"]))
        sweep = sorted(state["sweep"], key=lambda run: (order[run["method"]], run["lr"]))
        summary = summarize(runs)
        summary = {method: summary[method] for method in methods}
        result["scenarios"][scenario] = {
            "base_model": base_models[scenario],
            "lr": state["lr"],
            "post_hoc": {"picks": state["picks"]},
            "summary": summary,
            "targets": check_targets(summary, sweep),
            "sweep": sweep,
            "runs": [run for run in runs if run["method"] in methods],
        }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "forgetting_quick" if quick else "forgetting"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    return write_outputs(result, args.out_dir, stem)


def _upgrade(result: dict[str, Any]) -> dict[str, Any]:
    """A JSON of the one-scenario version of this script, in today's shape (its scenario is ``overlap``)."""
    if "scenarios" in result:
        return result
    scenario = {key: result[key] for key in ("lr", "summary", "targets", "sweep", "runs")}
    return {**{k: result[k] for k in ("settings", "machine", "wall_seconds")}, "scenarios": {"overlap": scenario}}


def write_outputs(result: dict[str, Any], out: Path, stem: str) -> int:
    """Write ``<stem>.md`` and ``<stem>_<scenario>.png`` into ``out`` and print the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (out / f"{stem}.md").write_text(text)
    problems = []
    for name, scenario in result["scenarios"].items():
        problem = plot(
            {**scenario, "budget": result["settings"]["budget"]},
            out / f"{stem}_{name}.png",
            f"lit_mofo forgetting benchmark, scenario `{name}`: up and to the left is better",
        )
        if problem:
            problems.append(problem)
    print(text)
    names = ", ".join(f"{stem}_{name}.png" for name in result["scenarios"])
    print(f"wrote {out / stem}.md" + (f" ({problems[0]})" if problems else f", {names}"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
