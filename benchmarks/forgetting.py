"""Forgetting benchmark: task score against forgetting and drift for every lit_mofo method, several seeds.

Usage::

    python benchmarks/forgetting.py                      # full mode: LR sweep + 5 seeds x 9 methods
    python benchmarks/forgetting.py --workers 2          # two runs at a time (each on one thread)
    python benchmarks/forgetting.py --methods full_ft mofo_0.15 l2_0.3 --seeds 1 2 3 4 5 6 7 8
    python benchmarks/forgetting.py --quick --out-dir /tmp/forgetting   # smoke run in about a minute (tested)

The embedded scenario (see ``lit_mofo.scenario``): the scenario's pre-trained base model (a 1.1M-parameter Llama
that knows the 512 facts of a generated world and can copy a word list) is fine-tuned on the ``cipher`` task,
which it cannot do (exact match 0). Every method gets the same budget - ``--steps`` optimizer steps of
``--batch-size`` problems, cosine schedule with 3% warm-up (``CausalLMModule``'s default), the same data order
per seed - and differs only in the optimizer and callbacks:

==============  ==============================================================================================
``full_ft``     AdamW (weight decay 0): full fine-tuning, the reference.
``mofo_0.05``   MoFO, fraction 0.05 (5% of each matrix's entries move per step).
``mofo_0.15``   MoFO, fraction 0.15 (the paper's setting).
``hft_once``    AdamW + ``HalfFineTuning()``: one category-level half drawn at the start of fit.
``hft_redraw``  AdamW + ``HalfFineTuning(redraw_every_n_steps=steps // 4)``: four rounds, each a new half.
``hft_reset``   as ``hft_redraw`` with ``reset=True``: matrices frozen by a re-draw go back to pre-trained values.
``mofo_hft``    MoFO (0.15) + ``HalfFineTuning()`` once.
``l2_<λ>``      AdamW + ``L2ToPretrained(strength=λ)``: the MoFO paper's L2 regulariser baseline, at λ = 0.1 and 1
                by default (the regulariser's own trade-off: λ is a second knob, shown as two methods rather
                than chosen by a rule that would need a forgetting measurement); any ``l2_<λ>`` may be named.
==============  ==============================================================================================

**Learning rate.** Each method's LR comes from the same small sweep (``--lrs``, default 3e-4, 1e-3, 3e-3), run on
its own seed (``--sweep-seed``, 0) that the reported seeds (``--seeds``, 1 to 5) do not include. The rule uses
the task only, as a user without a forgetting probe would: the LR with the highest task exact match; LRs within
``--tie-points`` (1 point) of the best count as tied, and the smallest of them wins (the gentlest setting that
reaches the best score).

**Measured** with lit_mofo's own callbacks, at the end of fit: the task's exact match on 256 held-out problems
(``TaskProbe``); forgetting on the knowledge probe (``KnowledgeProbe``: accuracy points lost on the 512 facts,
and the rise of their loss in nats) and on the copying skill (``TaskProbe(kind="repeat")``), each as
``ForgettingMonitor`` computes it (pre-trained value minus final value, positive = forgot); drift from the
pre-trained weights (``ParameterDrift``: relative L2 distance and fraction of entries changed, all parameters).
Also the median wall time of a training step (forward, backward, callbacks' hooks, optimizer step; evaluation
excluded) and memory: the process's peak RSS (each run in a fresh process; mostly the Python/torch runtime at
this model size) and the training state the method holds - parameters, the largest set of gradients, optimizer
state, and the pre-trained copy the method itself needs (``L2ToPretrained``, ``reset=True``; ``ParameterDrift``'s
measuring copy is not counted).

**Output** (``--out-dir``, default ``benchmarks/results``; ``forgetting_quick.*`` in quick mode): a JSON of every
run (sweep and seeds), a Markdown summary (mean +- sample std over the seeds, the sweep, the issue's targets
checked), and a PNG of task score against knowledge forgetting with error bars (needs matplotlib: the ``plot``
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
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
)
LABELS = {
    "full_ft": "Full FT (AdamW)",
    "mofo_0.05": "MoFO 0.05",
    "mofo_0.15": "MoFO 0.15",
    "hft_once": "HFT (once)",
    "hft_redraw": "HFT (re-drawn)",
    "hft_reset": "HFT (re-drawn, reset)",
    "mofo_hft": "MoFO 0.15 + HFT",
}
HFT_ROUNDS = 4  # hft_redraw/hft_reset: the budget is split into this many rounds, each with a new draw


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


@dataclass(frozen=True)
class RunSpec:
    method: str
    lr: float
    seed: int
    phase: str  # "sweep" or "seeds"
    budget: Budget = field(default_factory=Budget)


# ---------------------------------------------------------------------------------------------------------- one run
def _callbacks_for(spec: RunSpec) -> list[Any]:
    from lit_mofo import HalfFineTuning, L2ToPretrained

    period = max(1, spec.budget.steps // HFT_ROUNDS)
    if spec.method in ("hft_once", "mofo_hft"):
        return [HalfFineTuning(seed=spec.seed)]
    if spec.method == "hft_redraw":
        return [HalfFineTuning(redraw_every_n_steps=period, seed=spec.seed)]
    if spec.method == "hft_reset":
        return [HalfFineTuning(redraw_every_n_steps=period, reset=True, seed=spec.seed)]
    if spec.method.startswith("l2_"):
        return [L2ToPretrained(strength=l2_strength(spec.method), log_penalty=False)]
    return []


def _optimizer_for(spec: RunSpec) -> Callable[..., Any]:
    import torch

    from lit_mofo import MoFO

    if spec.method == "mofo_0.05":
        return partial(MoFO, lr=spec.lr, fraction=0.05)
    if spec.method in ("mofo_0.15", "mofo_hft"):
        return partial(MoFO, lr=spec.lr, fraction=0.15)
    return partial(torch.optim.AdamW, lr=spec.lr, weight_decay=0.0)


def l2_strength(method: str) -> float:
    """λ of an ``l2_<λ>`` method name; raises ValueError if ``<λ>`` is not a number > 0."""
    strength = float(method.removeprefix("l2_"))
    if not strength > 0 or math.isinf(strength):
        raise ValueError(f"{method!r}: the L2 strength must be a finite number > 0")
    return strength


def label(method: str) -> str:
    """The method's name in tables and the plot."""
    if method.startswith("l2_"):
        return f"L2 to pre-trained (λ={l2_strength(method):g})"
    return LABELS.get(method, method)


def _method_name(value: str) -> str:
    """argparse type of ``--methods``: one of METHODS, or ``l2_<λ>`` for any λ > 0."""
    if value in METHODS:
        return value
    if value.startswith("l2_"):
        try:
            l2_strength(value)
            return value
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(METHODS)} (or l2_<λ> with λ > 0)")


def _make_meter() -> Any:
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


def _theta0_bytes(spec: RunSpec, module: Any, callbacks: Sequence[Any]) -> int:
    """Bytes of the pre-trained copy the method needs for itself (not ParameterDrift's measuring copy)."""
    params = dict(module.named_parameters())
    if spec.method.startswith("l2_"):
        return sum(p.nbytes for p in params.values())
    if spec.method == "hft_reset":
        (hft,) = callbacks
        return sum(params[name].nbytes for name in hft._resettable_names())
    return 0


def _knowledge_by_subject(model: Any) -> dict[str, float]:
    """Knowledge accuracy (%) on the facts whose entity is one of the task's words, and on the others.

    A diagnostic for the analysis: the task's problems are written in entity names (the first 64 of the 128), so
    half of the facts share their subject token with the fine-tuning data.
    """
    from lit_mofo.scenario import evaluate_knowledge
    from lit_mofo.scenario.corpus import generate_facts
    from lit_mofo.scenario.task import TaskSpec

    task_words = set(TaskSpec().words)
    other_words = {fact.entity for fact in generate_facts()} - task_words
    return {
        subset: 100 * evaluate_knowledge(model, entities=entities)["accuracy"]
        for subset, entities in (("task_words", task_words), ("other_words", other_words))
    }


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Fine-tune the scenario base model with one method, one LR and one seed; return the measurements."""
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    import lightning.pytorch as pl
    import transformers

    # Quiet: Lightning's and lit_mofo's per-fit info lines would repeat for every run.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()

    from lit_mofo import ForgettingMonitor, ParameterDrift
    from lit_mofo.modules import CausalLMModule
    from lit_mofo.scenario import KnowledgeProbe, ScenarioDataModule, TaskProbe

    budget = spec.budget
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    module = CausalLMModule(
        model="scenario:base",
        optimizer=_optimizer_for(spec),
        schedule=budget.schedule,  # type: ignore[arg-type]
        warmup_ratio=budget.warmup_ratio,
    )
    data = ScenarioDataModule(batch_size=budget.batch_size, num_val=0)
    monitor = ForgettingMonitor(
        {
            "task": TaskProbe(num_examples=budget.task_examples),
            "knowledge": KnowledgeProbe(limit_batches=budget.knowledge_limit_batches),
            "copy": TaskProbe(kind="repeat", num_examples=budget.copy_examples, name="copy"),
        },
        every_n_train_steps=None,
        evaluate_on_validation=False,
        report=False,
    )
    drift = ParameterDrift(every_n_train_steps=None, report=False)
    meter = _make_meter()
    method_callbacks = _callbacks_for(spec)
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
        callbacks=[meter, *method_callbacks, monitor, drift],
    )
    split_before = _knowledge_by_subject(module.model)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - start
    split_after = _knowledge_by_subject(module.model)

    final: dict[tuple[str, str], dict[str, Any]] = {}
    for record in monitor.history:  # the last measurement of each metric is the end-of-fit one
        final[(record["probe"], record["metric"])] = record
    overall = [record for record in drift.history if record["scope"] == "overall"][-1]
    param_bytes = sum(p.nbytes for p in module.parameters())
    theta0 = _theta0_bytes(spec, module, method_callbacks)
    steady = meter.step_seconds[min(5, len(meter.step_seconds) - 1) :]  # the first steps load kernels and caches
    mib = 1 / 2**20
    return {
        **{key: value for key, value in asdict(spec).items() if key != "budget"},
        "steps_done": trainer.global_step,
        "task_exact_match": 100 * final[("task", "exact_match")]["value"],
        "task_loss": final[("task", "loss")]["value"],
        "knowledge_accuracy_pretrained": 100 * final[("knowledge", "accuracy")]["baseline"],
        "knowledge_accuracy": 100 * final[("knowledge", "accuracy")]["value"],
        "forgetting_knowledge_accuracy": 100 * final[("knowledge", "accuracy")]["forgetting"],
        "forgetting_knowledge_loss": final[("knowledge", "loss")]["forgetting"],
        "copy_exact_match_pretrained": 100 * final[("copy", "exact_match")]["baseline"],
        "forgetting_copy_exact_match": 100 * final[("copy", "exact_match")]["forgetting"],
        "forgetting_knowledge_task_words": split_before["task_words"] - split_after["task_words"],
        "forgetting_knowledge_other_words": split_before["other_words"] - split_after["other_words"],
        "drift_relative_l2": overall["relative_l2"],
        "drift_relative_l2_by_role": {
            record["group"]: record["relative_l2"] for record in drift.history if record["scope"] == "role"
        },
        "drift_fraction_changed": 100 * overall["fraction_changed"],
        "step_ms": 1000 * statistics.median(steady),
        "fit_seconds": fit_seconds,
        "evaluation_seconds": monitor_seconds(monitor),
        "train_state_mib": (param_bytes + meter.max_grad_bytes + meter.optimizer_state_bytes + theta0) * mib,
        "optimizer_state_mib": meter.optimizer_state_bytes * mib,
        "max_grad_mib": meter.max_grad_bytes * mib,
        "theta0_mib": theta0 * mib,
        "peak_rss_mib": _peak_rss_mib(),
    }


def _peak_rss_mib() -> float | None:
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
    """Run every spec: in this process (``workers=0``) or each in a fresh process, ``workers`` at a time."""
    results: list[dict[str, Any]] = []

    def done(result: dict[str, Any]) -> None:
        results.append(result)
        log(
            f"  [{len(results):>3}/{len(specs)}] {result['phase']:<5} {result['method']:<11} lr={result['lr']:<7g} "
            f"seed={result['seed']}: task {result['task_exact_match']:5.1f}, knowledge forgetting "
            f"{result['forgetting_knowledge_accuracy']:5.1f} pts, drift {result['drift_relative_l2']:.3f}, "
            f"{result['step_ms']:.0f} ms/step, fit {result['fit_seconds']:.0f} s"
        )

    if workers == 0:
        for spec in specs:
            result = run_one(spec)
            result["peak_rss_mib"] = None  # shared with every other run of this process: not attributable
            done(result)
        return results
    # A fresh process per run (spawned: no forked torch thread pools), so peak RSS is the run's own.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        futures = [pool.submit(run_one, spec) for spec in specs]
        for future in futures:
            done(future.result())
    return results


def choose_lrs(sweep: Sequence[dict[str, Any]], tie_points: float) -> dict[str, float]:
    """Per method: the smallest LR whose task exact match is within ``tie_points`` of the method's best."""
    chosen = {}
    for method in dict.fromkeys(run["method"] for run in sweep):
        runs = [run for run in sweep if run["method"] == method]
        best = max(run["task_exact_match"] for run in runs)
        chosen[method] = min(run["lr"] for run in runs if run["task_exact_match"] >= best - tie_points)
    return chosen


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
                summary[method][key] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "n": len(values),
                }
    return summary


def check_targets(summary: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figures (means over the seeds) and whether it is met."""
    if "full_ft" not in summary:
        return []
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
    return checks


# ---------------------------------------------------------------------------------------------------------- output
def _pm(stats: dict[str, float] | None, digits: int) -> str:
    if stats is None:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    settings = result["settings"]
    budget = settings["budget"]
    summary = result["summary"]
    lines = [
        f"Scenario base model fine-tuned on `cipher`: {budget['steps']} steps x batch {budget['batch_size']}, "
        f"{budget['schedule']} schedule with {budget['warmup_ratio']:.0%} warm-up, one torch thread per run; LR "
        f"sweep {settings['lrs']} on seed {settings['sweep_seed']} (task-only rule: best exact match, ties within "
        f"{settings['tie_points']:g} point to the smallest LR), reported seeds {settings['seeds']}. "
        f"{result['machine']}. Wall time {result['wall_seconds'] / 60:.1f} min "
        f"({len(result['sweep'])} sweep runs + {len(result['runs'])} seed runs, {settings['workers']} worker(s)).",
        "",
        f"Mean ± sample std over the seeds. Task: exact match on {budget['task_examples']} held-out problems (%). "
        "Forgetting: pre-trained minus final, positive = forgot - knowledge accuracy on "
        f"{'all 512' if budget['knowledge_limit_batches'] is None else 'the first 256 of the 512'} facts "
        "(points; pre-trained "
        f"{_pretrained(result, 'knowledge_accuracy_pretrained')}), knowledge loss (nats), copying skill "
        f"(`repeat` exact match, points; pre-trained {_pretrained(result, 'copy_exact_match_pretrained')}). Drift: "
        "relative L2 distance to the pre-trained weights and entries changed (%), all parameters. Step: median "
        "training step. State: parameters + gradients + optimizer state + the pre-trained copy the method needs.",
        "",
        "| method | LR | task EM | knowledge forgetting (pts) | knowledge loss rise | copy forgetting (pts) "
        "| relative L2 | changed (%) | step (ms) | state (MiB) | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, stats in summary.items():
        lines.append(
            f"| {label(method)} | {result['lr'][method]:g} | {_pm(stats['task_exact_match'], 1)} "
            f"| {_pm(stats['forgetting_knowledge_accuracy'], 1)} | {_pm(stats['forgetting_knowledge_loss'], 2)} "
            f"| {_pm(stats['forgetting_copy_exact_match'], 1)} | {_pm(stats['drift_relative_l2'], 3)} "
            f"| {_pm(stats['drift_fraction_changed'], 1)} | {_pm(stats['step_ms'], 1)} "
            f"| {stats['train_state_mib']['mean']:.1f} | {_pm(stats.get('peak_rss_mib'), 0)} |"
        )
    roles = list(result["runs"][0]["drift_relative_l2_by_role"])
    lines += [
        "",
        "Where it forgets (diagnostic): knowledge forgetting (points) on the facts about the 64 entities whose names "
        "the task's problems are written in, and on the facts about the other 64; relative L2 drift per role.",
        "",
        "| method | facts on task words | other facts | " + " | ".join(f"drift {role}" for role in roles) + " |",
        "|---|---:|---:|" + "---:|" * len(roles),
    ]
    for method, stats in summary.items():
        rows = [run for run in result["runs"] if run["method"] == method]
        drift = [statistics.fmean(run["drift_relative_l2_by_role"][role] for run in rows) for role in roles]
        lines.append(
            f"| {label(method)} | {_pm(stats['forgetting_knowledge_task_words'], 1)} "
            f"| {_pm(stats['forgetting_knowledge_other_words'], 1)} | "
            + " | ".join(f"{value:.3f}" for value in drift)
            + " |"
        )
    if result["sweep"]:
        lrs = settings["lrs"]
        lines += [
            "",
            f"LR sweep (seed {settings['sweep_seed']}): task EM / knowledge forgetting (points); **bold** = chosen.",
            "",
            "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
            "|---|" + "---:|" * len(lrs),
        ]
        for method in dict.fromkeys(run["method"] for run in result["sweep"]):
            cells = []
            for lr in lrs:
                run = next(r for r in result["sweep"] if r["method"] == method and r["lr"] == lr)
                cell = f"{run['task_exact_match']:.1f} / {run['forgetting_knowledge_accuracy']:.1f}"
                cells.append(f"**{cell}**" if lr == result["lr"][method] else cell)
            lines.append(f"| {label(method)} | " + " | ".join(cells) + " |")
    if result["targets"]:
        lines += ["", "| method | target | measured (mean over seeds) | met |", "|---|---|---|---|"]
        for check in result["targets"]:
            lines.append(
                f"| {label(check['method'])} | {check['target']} | {check['measured']} "
                f"| {'yes' if check['met'] else '**no**'} |"
            )
    return "\n".join(lines) + "\n"


def _pretrained(result: dict[str, Any], key: str) -> str:
    values = sorted({run[key] for run in result["runs"]})
    return ", ".join(f"{value:.1f}" for value in values)


def plot(result: dict[str, Any], path: Path) -> str | None:
    """Task score against knowledge forgetting, a point per method with std error bars; a second panel zooms on
    the methods that reach the task (mean >= 95%), where the points crowd. Returns why not, without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'lit_mofo[plot]'): no plot written"
    summary = result["summary"]
    markers = "osD^v<>Pp*Xh"
    colors = plt.get_cmap("tab10").colors
    figure, (overview, zoom) = plt.subplots(1, 2, figsize=(13, 5.4), dpi=120)
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
    budget = result["settings"]["budget"]
    overview.set_title(
        f"All methods: {budget['steps']} steps, mean ± std over {len(result['settings']['seeds'])} seeds", fontsize=10
    )
    zoom.set_title("Zoom: the methods that reach the task (task EM >= 95%)", fontsize=10)
    if reached:
        zoom.set_ylim(max(95.0, min(reached) - 0.5), 100.4)
    for axis in (overview, zoom):
        axis.set_xlabel("knowledge forgetting: accuracy points lost on the facts (lower is better)")
        axis.grid(alpha=0.3)
    overview.set_ylabel("task exact match after fine-tuning, % (higher is better)")
    overview.legend(fontsize=8, loc="best")
    figure.suptitle("lit_mofo forgetting benchmark: up and to the left is better", fontsize=11)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return None


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    parser.add_argument("--quick", action="store_true", help="a smoke run: 12 steps, 2 LRs, 2 seeds, in-process")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--from-json", type=Path, default=None, help="rewrite the Markdown and PNG from a JSON this script wrote"
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        return write_outputs(result, args.out_dir, args.from_json.stem)

    quick = args.quick
    budget = Budget(
        steps=args.steps or (12 if quick else Budget.steps),
        batch_size=args.batch_size or (8 if quick else Budget.batch_size),
        knowledge_limit_batches=1 if quick else None,
        task_examples=64 if quick else Budget.task_examples,
        copy_examples=64 if quick else Budget.copy_examples,
    )
    lrs = sorted(args.lrs or ([1e-3, 3e-3] if quick else [3e-4, 1e-3, 3e-3]))
    seeds = args.seeds or ([1, 2] if quick else [1, 2, 3, 4, 5])
    workers = args.workers if args.workers is not None else (0 if quick else 1)
    problems = []
    if budget.steps < 1 or budget.batch_size < 1:
        problems.append(f"--steps={budget.steps} and --batch-size={budget.batch_size} must be >= 1")
    if any(not (0 < lr < 1) for lr in lrs):
        problems.append(f"--lrs={lrs}: learning rates must be in (0, 1), e.g. 3e-4 1e-3 3e-3")
    if len(set(seeds)) < 2:
        problems.append(f"--seeds={seeds}: give at least 2 distinct seeds (the table reports a std over seeds)")
    if args.sweep_seed in seeds and len(lrs) > 1:
        problems.append(f"--sweep-seed={args.sweep_seed} is among --seeds={seeds}: the LR must be chosen apart")
    if workers < 0:
        problems.append(f"--workers={workers} must be >= 0 (0 runs in this process)")
    if problems:
        parser.error("; ".join(problems))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    from lit_mofo.scenario.base_model import base_model_path

    start = time.perf_counter()
    log("scenario base model: " + str(base_model_path()))  # built once here (about 2 min), not in every worker

    methods = list(dict.fromkeys(args.methods))
    sweep_specs = [RunSpec(m, lr, args.sweep_seed, "sweep", budget) for m in methods for lr in lrs]
    sweep: list[dict[str, Any]] = []
    if len(lrs) > 1:
        log(f"LR sweep: {len(sweep_specs)} runs")
        sweep = run_all(sweep_specs, workers, log)
        chosen = choose_lrs(sweep, args.tie_points)
    else:
        chosen = dict.fromkeys(methods, lrs[0])
    log(f"chosen LRs: {chosen}")
    seed_specs = [RunSpec(m, chosen[m], seed, "seeds", budget) for seed in seeds for m in methods]
    log(f"seeds: {len(seed_specs)} runs")
    runs = run_all(seed_specs, workers, log)
    runs.sort(key=lambda run: (methods.index(run["method"]), run["seed"]))
    sweep.sort(key=lambda run: (methods.index(run["method"]), run["lr"]))

    import torch

    summary = summarize(runs)
    summary = {method: summary[method] for method in methods}
    result = {
        "settings": {
            "quick": quick,
            "methods": methods,
            "lrs": lrs,
            "sweep_seed": args.sweep_seed,
            "seeds": seeds,
            "tie_points": args.tie_points,
            "workers": workers,
            "hft_rounds": HFT_ROUNDS,
            "budget": asdict(budget),
        },
        "machine": (
            f"{platform.machine()} ({os.cpu_count()} logical CPUs), {platform.system()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}"
        ),
        "wall_seconds": time.perf_counter() - start,
        "lr": chosen,
        "summary": summary,
        "targets": check_targets(summary),
        "sweep": sweep,
        "runs": runs,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "forgetting_quick" if quick else "forgetting"
    (args.out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    return write_outputs(result, args.out_dir, stem)


def write_outputs(result: dict[str, Any], out: Path, stem: str) -> int:
    """Write ``<stem>.md`` and ``<stem>.png`` into ``out`` and print the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (out / f"{stem}.md").write_text(text)
    problem = plot(result, out / f"{stem}.png")
    print(text)
    print(f"wrote {out / stem}.md" + (f" ({problem})" if problem else ", .png"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
