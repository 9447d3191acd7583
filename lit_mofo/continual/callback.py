r"""The :class:`ContinualLearning` callback: drives a :class:`~lit_mofo.continual.StageSequence` through one
``trainer.fit`` and measures the accuracy matrix live.

Why one fit rather than one fit per stage: logs, checkpoints, ``--ckpt_path`` resume, DDP/FSDP2 and every callback
then work the Lightning way over the whole sequence, from Python and from ``lit-mofo fit --config``. One Lightning
epoch is one stage; the callback gives each stage a fresh optimizer and learning-rate schedule, tells the other
callbacks (the *stage protocol*: :class:`StageCallback`), and evaluates every stage's task probe before the first
stage and after each one.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim.lr_scheduler import LRScheduler
from typing_extensions import override

from lit_mofo._validation import as_bool, as_choice, as_int
from lit_mofo.callbacks.forgetting_monitor import ProbeSet, publish_metrics
from lit_mofo.continual import metrics
from lit_mofo.continual.stages import StageSequence, stage_list_differences
from lit_mofo.params import initial_requires_grad
from lit_mofo.report import Curve, FitReport, ReportSection, Table, json_safe, markdown_table
from lit_mofo.snapshot import StageStartSnapshot
from lit_mofo.strategy import StrategyAdapter

__all__ = ["MATRIX_STEM", "ContinualLearning", "StageCallback", "StageContext", "continual_learning"]

MATRIX_STEM = "continual_matrix"  # <dir>/continual_matrix.{json,md}, rewritten after every stage
OptimizerState = Literal["fresh", "keep"]


@dataclass(frozen=True)
class StageContext:
    """What a callback hears about a stage (see :class:`StageCallback`).

    Attributes:
        index: the stage's position, 0-based (``number`` is 1-based).
        name: the stage's (and its task's) name.
        num_stages: stages in the run.
        max_steps: its budget of optimizer steps.
        lr: its learning rate, or None (the optimizer's own).
        start_step: ``trainer.global_step`` when it starts.
        resumed: True only for the call a resumed run makes after rebuilding the optimizers of the stage it resumes
            in (see :class:`StageCallback`).
    """

    index: int
    name: str
    num_stages: int
    max_steps: int
    lr: float | None
    start_step: int
    resumed: bool = False

    @property
    def number(self) -> int:
        return self.index + 1

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.num_stages - 1


class StageCallback(Protocol):
    """The stage protocol: what a callback defines to react to the stages of a continual run.

    :class:`ContinualLearning` calls these methods on every callback of the Trainer that has them, in the order of
    ``trainer.callbacks``, on every process:

    - ``on_stage_start(trainer, pl_module, stage)``: before the stage's first batch. For the first stage, in
      ``on_train_start`` with the optimizers Lightning built at the start of fit; for every later one, after the
      previous stage's row of the matrix was measured and its ``on_stage_end`` ran, with the stage's fresh optimizers
      and schedulers in ``trainer.optimizers`` / ``trainer.lr_scheduler_configs`` and the
      :class:`~lit_mofo.snapshot.StageStartSnapshot` retaken. A run resumed in the middle of a stage makes no call
      (the callbacks' states come from the checkpoint), with one exception: under a strategy that restores
      checkpoints after building the optimizers (``ModelParallelStrategy``), the optimizers built at the start of fit
      may belong to another stage; they are then rebuilt for the resumed stage (their restored state carried over)
      and ``on_stage_start`` is called with ``stage.resumed=True``, during the checkpoint restore: a callback that
      wraps or replaces optimizers (:class:`~lit_mofo.callbacks.mofo_callback.MoFOCallback`) does it again, every
      other callback returns.
    - ``on_stage_end(trainer, pl_module, stage)``: after the stage's last optimizer step, once its row of the matrix
      has been measured and logged. After a resume from a checkpoint written at a stage's last step, before its end
      was handled, it is called for that stage in ``on_train_start``; a callback that measures should skip a step it
      has measured already.
    """

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: StageContext) -> None: ...

    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: StageContext) -> None: ...


def continual_learning(trainer: pl.Trainer | None) -> ContinualLearning | None:
    """The Trainer's :class:`ContinualLearning` callback, or None when the fit is not a continual run."""
    for callback in getattr(trainer, "callbacks", None) or []:
        if isinstance(callback, ContinualLearning):
            return callback
    return None


def _row_label(row: int, names: list[str]) -> str:
    return "before stage 1" if row == 0 else f"after {row} ({names[row - 1]})"


def _prefix(row: int, names: list[str]) -> str:
    """The metric-name prefix of a row: ``continual/stage0_start``, ``continual/stage2_reverse``."""
    return "continual/stage0_start" if row == 0 else f"continual/stage{row}_{names[row - 1]}"


class ContinualLearning(Callback):
    r"""Fine-tune through a sequence of stages in one fit and measure the accuracy matrix as it goes.

    Give the Trainer this callback and the fit a :class:`~lit_mofo.continual.StageSequence` as its data module.
    Each stage is one Lightning epoch of exactly its budget of optimizer steps; the callback

    - sets the Trainer up for it at ``setup``: it stops the fit after the last stage (``fit_loop.max_epochs``) and
      reloads the dataloaders every epoch (``reload_dataloaders_every_n_epochs=1``, when left at 0); refused, with the
      fix: ``max_steps``, ``limit_train_batches``, a ``max_epochs`` below the number of stages, another reload
      interval, no ``StageSequence``, two ContinualLearning callbacks, and the strategies lit_mofo's callbacks do not
      support (DeepSpeed, FSDP1, tensor parallelism, XLA). Give the Trainer ``max_epochs`` = the number of stages, or
      leave it unset (Lightning then notes that it sets 1000; the fit still ends after the last stage);
    - gives every stage after the first **a fresh optimizer and learning-rate schedule** before its first batch:
      ``trainer.strategy.setup_optimizers(trainer)`` calls the module's ``configure_optimizers`` again, with every
      parameter's ``requires_grad`` as the module left it (Half Fine-Tuning's previous half unfrozen while it runs),
      and the schedule spans the stage when the module reads :func:`~lit_mofo.continual.stage_steps` (as
      :class:`~lit_mofo.modules.CausalLMModule` and :func:`~lit_mofo.mofo_configure_optimizers` do). A stage's ``lr``
      scales every param group's rate (and ``initial_lr``, and each scheduler's ``base_lrs``) by
      ``lr / optimizer.defaults["lr"]``. ``optimizer_state="keep"`` carries each parameter's optimizer state (Adam's
      moments and step) into the new optimizer instead; the papers start every stage fresh (the default);
    - tells the other callbacks through the **stage protocol** (:class:`StageCallback`): ``on_stage_start`` /
      ``on_stage_end``. lit_mofo's callbacks implement it: HalfFineTuning draws a new half per stage, MoFOCallback
      converts the new optimizer, L2ToPretrained can anchor to the previous stage, ParameterDrift measures the drift
      within each stage too, ForgettingMonitor evaluates its general-capability probes at every stage end (its
      baseline stays the model before stage 1), TaskVectorScaling edits the task vector of the whole sequence at
      the end;
    - **measures the accuracy matrix**: every stage's task probe before stage 1 (row 0) and after each stage (row
      ``i``), and optionally every ``every_n_train_steps`` steps within a stage (the task curves).

    **The matrix and its figures** (:mod:`lit_mofo.continual.metrics`, with the definitions and their sources:
    TRACE's OP and BWT, Avalanche's forgetting, GEM's FWT), for every metric that all task probes report and with
    the sign convention of the metric's direction (negative BWT/FWT and positive forgetting always mean worse), after
    each stage ``i`` as if the sequence ended there. Logged to every logger at ``trainer.global_step`` and put in
    ``trainer.callback_metrics``, each name carrying its stage (``stage0_start`` is the row before stage 1):

    - ``continual/stage{i}_{name}/R/{task}/{metric}``: the task's score during stage ``i`` (interval evaluations) and
      at its end (:math:`R_{i,task}`, the last point);
    - ``continual/stage{i}_{name}/op/{metric}``, ``.../bwt/{metric}``, ``.../fwt/{metric}``,
      ``.../average_forgetting/{metric}`` and ``.../forgetting/{task}/{metric}``;
    - ``continual/stage``: the stage number (1-based; 0 before stage 1) with every row of measurements that
      ContinualLearning, ForgettingMonitor and ParameterDrift log, and at every training step (``self.log``, so at the
      Trainer's ``log_every_n_steps``): every logged row of a run says which stage it belongs to.

    **On disk.** After every stage (and the row before stage 1) rank zero rewrites ``continual_matrix.json`` and
    ``continual_matrix.md`` in ``report_dir`` (default ``trainer.log_dir``): the rows so far and their figures, so a
    crash in stage ``k`` leaves rows ``0..k-1``. At the end of fit the run's report
    (``forgetting_report.{json,md,png}``, :mod:`lit_mofo.report`) gets a section with the matrix table of the headline
    ``metric``, the figures per stage, the forgetting per task, every measurement, the task curves with the stage
    boundaries marked, and the heatmap ``forgetting_report_continual_matrix.png``; a ForgettingMonitor's
    general-capability curves in the same report mark the stage boundaries too.

    **Resume.** The matrix, the measurements and the stage bookkeeping are in the callback's checkpoint state; with
    the stage list (checked by :class:`~lit_mofo.continual.StageSequence`), the loader positions
    (:class:`~lit_mofo.continual.StageLoader`) and lit_mofo's callbacks' own states, a run resumed from any checkpoint
    — mid-stage or at a stage's last step — continues in that stage at that step and ends with the same weights and
    the same matrix as the uninterrupted run.

    **Multi-process**: a single device, DDP and FSDP2 (``ModelParallelStrategy(tensor_parallel_size=1)``). Every rank
    runs every probe (see :class:`~lit_mofo.callbacks.forgetting_monitor.ProbeSet`) and records rank zero's values;
    at every stage start the ranks check, in one collective, that they start the same stage at the same step, and
    every rank builds its optimizers at the same point.

    Args:
        every_n_train_steps: also evaluate the task probes every this many optimizer steps (the task curves); None or
            0: only before stage 1 and at the end of every stage.
        metric: the headline metric (the console, the matrix table, the heatmap): one that every task probe reports;
            None takes the first metric of the first stage's probe that all of them report.
        optimizer_state: ``"fresh"`` (the papers': every stage's optimizer starts without state) or ``"keep"`` (each
            parameter's state carries over from the previous stage's optimizer).
        report: add the section to the end-of-fit report and print the matrix.
        report_dir: directory for ``continual_matrix.*`` and the report; None uses ``trainer.log_dir``.

    Example::

        from lit_mofo.continual import ContinualLearning, Stage, StageSequence

        stages = StageSequence([
            Stage("cipher", ScenarioDataModule(kind="cipher"), TaskProbe(kind="cipher"), max_steps=100),
            Stage("reverse", ScenarioDataModule(kind="reverse"), TaskProbe(kind="reverse"), max_steps=100),
        ])
        trainer = Trainer(callbacks=[ContinualLearning(), HalfFineTuning(), ForgettingMonitor(KnowledgeProbe())])
        trainer.fit(CausalLMModule("scenario:base"), datamodule=stages)

    In a LightningCLI config (``configs/continual.yaml``)::

        trainer:
          callbacks:
            - class_path: lit_mofo.continual.ContinualLearning
        data:
          class_path: lit_mofo.continual.StageSequence
          init_args:
            stages:
              - name: cipher
                data: {class_path: lit_mofo.scenario.ScenarioDataModule, init_args: {kind: cipher}}
                probe: {class_path: lit_mofo.scenario.TaskProbe, init_args: {kind: cipher}}
                max_steps: 100
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        metric: str | None = None,
        optimizer_state: OptimizerState = "fresh",
        report: bool = True,
        report_dir: str | None = None,
    ) -> None:
        where, error = "ContinualLearning()", MisconfigurationException
        if every_n_train_steps is not None:
            every_n_train_steps = as_int(
                every_n_train_steps,
                where=where,
                argument="every_n_train_steps",
                minimum=0,
                fix="It counts optimizer steps between evaluations of the task probes; None or 0 evaluates them only "
                "before stage 1 and at the end of every stage.",
                error=error,
            )
        self.every_n_train_steps = int(every_n_train_steps or 0)
        if metric is not None and (not isinstance(metric, str) or not metric):
            raise MisconfigurationException(
                f"{where}: metric={metric!r} is invalid; give the name of a metric every task probe reports (e.g. "
                "'exact_match'), or None for the first one they share."
            )
        self.metric = metric
        self.optimizer_state: OptimizerState = as_choice(
            optimizer_state,
            where=where,
            argument="optimizer_state",
            choices=("fresh", "keep"),
            fix="'fresh' starts every stage's optimizer without state (the papers'), 'keep' carries it over.",
            error=error,
        )
        self.report = as_bool(report, where=where, argument="report", error=error)
        if report_dir is not None and not isinstance(report_dir, (str, Path)):
            raise MisconfigurationException(
                f"{where}: report_dir={report_dir!r} is invalid; the valid range is a directory path or None for "
                "trainer.log_dir."
            )
        self.report_dir = None if report_dir is None else str(report_dir)
        self._sequence: StageSequence | None = None
        self._probe_set: ProbeSet | None = None
        self._adapter = StrategyAdapter("single")
        self._built_for: int | None = None  # the stage the optimizers of the start of fit were built for
        # Carried by state_dict().
        self._names: list[str] = []
        self._directions: dict[str, dict[str, bool]] = {}
        self._rows: list[dict[str, Any]] = []  # row i: {"row", "step", "values": {task: {metric: value}}}
        self._history: list[dict[str, Any]] = []
        self._starts: dict[int, int] = {}  # stage index -> global step it started at
        self._started = -1  # the last stage whose start was handled
        self._ended: list[int] = []  # stages whose end was handled
        self._seconds = 0.0
        self._restored = False
        self._last_measured: tuple[int, dict[str, dict[str, float]]] | None = None

    # ------------------------------------------------------------------ public state
    @property
    def stage_names(self) -> list[str]:
        return list(self._names)

    @property
    def rows(self) -> list[dict[str, dict[str, float]]]:
        """The rows measured so far: row 0 before stage 1, row ``i`` after stage ``i``; each ``{task: {metric:
        value}}``."""
        return [{task: dict(values) for task, values in row["values"].items()} for row in self._rows]

    @property
    def metrics(self) -> list[str]:
        """The metrics every task probe reports (the ones the matrix is kept for), in the first probe's order."""
        if not self._rows:
            return []
        values = self._rows[0]["values"]
        first = list(values[self._names[0]])
        return [m for m in first if all(m in values[task] for task in self._names)]

    def matrix(self, metric: str | None = None) -> list[list[float]]:
        """The accuracy matrix of ``metric`` (default: the headline one) so far: ``R[i][j]`` = task ``j`` (0-based
        column, stage order) after stage ``i`` (row 0: before stage 1)."""
        metric = metric or self.headline_metric
        return [[row["values"][task][metric] for task in self._names] for row in self._rows]

    @property
    def headline_metric(self) -> str:
        """The metric of the console table and the heatmap (``metric``, or the first one all probes report)."""
        if self.metric is not None:
            return self.metric
        common = self.metrics
        if not common:
            raise RuntimeError("ContinualLearning: no row has been measured yet.")
        return common[0]

    def higher_is_better(self, metric: str) -> bool:
        return self._directions[self._names[0]][metric]

    def summary(self, metric: str | None = None, after: int | None = None) -> dict[str, Any]:
        """The figures of ``metric`` after stage ``after`` (default: the last measured row): ``op``, ``bwt``,
        ``fwt``, ``average_forgetting`` and ``forgetting`` (per task, None where undefined); see
        :mod:`lit_mofo.continual.metrics`."""
        metric = metric or self.headline_metric
        matrix = self.matrix(metric)
        higher = self.higher_is_better(metric)
        figures: dict[str, Any] = metrics.summary(matrix, higher, after)
        figures["forgetting"] = dict(zip(self._names, metrics.forgetting(matrix, higher, after), strict=True))
        return figures

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every measurement of a task probe: ``step``, ``stage`` (1-based number of the stage that ran or just
        ended; 0 before stage 1), ``row`` (the matrix row, None for an interval evaluation), ``trigger``
        (``start``, ``interval``, ``stage_end``), ``task``, ``metric``, ``value``, ``higher_is_better``."""
        return [dict(record) for record in self._history]

    @property
    def stage_starts(self) -> list[tuple[int, str]]:
        """``(global step, stage name)`` of every stage started so far."""
        return [(self._starts[index], self._names[index]) for index in sorted(self._starts)]

    @property
    def evaluation_seconds(self) -> float:
        return self._seconds

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        self._adapter = StrategyAdapter.of(trainer, user="ContinualLearning")
        others = [cb for cb in trainer.callbacks if isinstance(cb, ContinualLearning) and cb is not self]
        if others:
            raise MisconfigurationException("Two ContinualLearning callbacks on one Trainer; keep one.")
        sequence = StageSequence.of(trainer)
        if sequence is None:
            raise MisconfigurationException(
                "ContinualLearning needs the fit's data to be a lit_mofo.continual.StageSequence (its stages, their "
                f"data and task probes), got {type(trainer.datamodule).__name__ if trainer.datamodule else 'none'}. "
                "Call trainer.fit(module, datamodule=StageSequence([...])), or in YAML set `data: {class_path: "
                "lit_mofo.continual.StageSequence, init_args: {stages: [...]}}`."
            )
        self._check_trainer(trainer, len(sequence))
        self._sequence = sequence
        self._names = sequence.names
        self._probe_set = ProbeSet(sequence.task_probes, self._directions)
        if self.report:
            FitReport.attach(trainer, self, self.report_dir)

    def _check_trainer(self, trainer: pl.Trainer, count: int) -> None:
        fix = "the stages' max_steps decide how long each stage trains"
        if trainer.max_steps not in (-1, None):
            raise MisconfigurationException(
                f"ContinualLearning: Trainer(max_steps={trainer.max_steps}) would stop the sequence part-way; "
                f"{fix}. Remove max_steps (set each Stage's max_steps instead)."
            )
        # Lightning has replaced an unset max_epochs by 1000 by now: any limit of at least one epoch per stage is fine.
        if trainer.max_epochs is not None and 0 <= trainer.max_epochs < count:
            raise MisconfigurationException(
                f"ContinualLearning: Trainer(max_epochs={trainer.max_epochs}) would stop the fit before the last of "
                f"the {count} stages (a stage is one epoch). Remove max_epochs (ContinualLearning ends the fit after "
                "the last stage)."
            )
        limit = trainer.limit_train_batches
        if not (isinstance(limit, float) and limit == 1.0):
            raise MisconfigurationException(
                f"ContinualLearning: Trainer(limit_train_batches={limit!r}) would cut the stages; {fix}. Remove it."
            )
        reload = trainer.reload_dataloaders_every_n_epochs
        if reload == 0:
            trainer.reload_dataloaders_every_n_epochs = 1  # each stage's epoch reads that stage's loaders
        elif reload != 1:
            raise MisconfigurationException(
                f"ContinualLearning: Trainer(reload_dataloaders_every_n_epochs={reload}); every stage (epoch) needs "
                "its own loaders. Remove it (ContinualLearning sets 1)."
            )
        trainer.fit_loop.max_epochs = count  # one epoch per stage, then the fit ends

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._sequence is not None and self._probe_set is not None
        # The strategy built the optimizers just before, for the stage the sequence named then (under
        # ModelParallelStrategy a resumed run learns its stage only later, in on_load_checkpoint).
        self._built_for = self._sequence.current
        self._probe_set.setup(trainer, pl_module, self._adapter)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        sequence = self._sequence
        if (
            sequence is None
            or self._built_for is None
            or not trainer.optimizers
            or sequence.current == self._built_for
            or not StrategyAdapter.restores_after_fit_start(trainer)
        ):
            return
        # ModelParallelStrategy built the optimizers (and restored their state into them) before the data module told
        # which stage the run resumes in: rebuild them for that stage, so its schedule spans the stage, and carry the
        # restored state over; Lightning restores the schedulers' state afterwards.
        old = list(trainer.optimizers)
        self._build_optimizers(trainer, pl_module)
        self._built_for = sequence.current
        saved = checkpoint.get("callbacks", {}).get(self.state_key, {})  # this callback's state, loaded next
        start = saved.get("starts", {}).get(sequence.current)
        context = self._context(trainer, sequence.current, resumed=True, start_step=start)
        self._notify(trainer, pl_module, "on_stage_start", context)
        for before, after in zip(old, trainer.optimizers, strict=True):
            after.load_state_dict(before.state_dict())

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sequence = self._require_sequence()
        if self._restored:
            if self._names != sequence.names:
                raise MisconfigurationException(
                    "The checkpoint's ContinualLearning state is of another stage list: "
                    + "; ".join(
                        stage_list_differences(
                            [{"name": name} for name in self._names], [{"name": name} for name in sequence.names]
                        )
                    )
                    + ". Resume with the stages that wrote the checkpoint, or start a new run."
                )
            publish_metrics(trainer, self._latest_metrics(), log=False)
        else:
            if trainer.ckpt_path is not None:
                raise MisconfigurationException(
                    f"The fit resumes from {trainer.ckpt_path!r}, which holds no ContinualLearning state (no accuracy "
                    "matrix, no stage bookkeeping): it was not written by a continual run. Resume from a checkpoint "
                    "of this run, or start a new run."
                )
            self._rows, self._history, self._starts, self._started, self._ended = [], [], {}, -1, []
            self._seconds, self._last_measured = 0.0, None
            self._measure_row(trainer, pl_module, row=0)
        self._catch_up(trainer, pl_module)

    # ------------------------------------------------------------------ the stages
    def _require_sequence(self) -> StageSequence:
        if self._sequence is None:
            raise RuntimeError("ContinualLearning: the stage sequence is known from setup on.")
        return self._sequence

    def _context(
        self, trainer: pl.Trainer, index: int, resumed: bool = False, start_step: int | None = None
    ) -> StageContext:
        sequence = self._require_sequence()
        stage = sequence.stages[index]
        return StageContext(
            index=index,
            name=stage.name,
            num_stages=len(sequence),
            max_steps=sequence.budget(index),
            lr=stage.lr,
            start_step=start_step if start_step is not None else self._starts.get(index, trainer.global_step),
            resumed=resumed,
        )

    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Handle every stage end and start due at the current epoch (idempotent): the ends of the stages before it
        (after a resume from a checkpoint written at a stage's last step they were not handled yet), then its start."""
        sequence = self._require_sequence()
        epoch = min(trainer.current_epoch, len(sequence))
        for index in range(epoch):
            if index not in self._ended:
                self._end_stage(trainer, pl_module, index)
        if epoch < len(sequence) and self._started < epoch:
            self._start_stage(trainer, pl_module, epoch)

    def _start_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        sequence = self._require_sequence()
        step = trainer.global_step
        seen = self._adapter.all_gather_object((index, step))
        if any(other != (index, step) for other in seen):
            raise RuntimeError(
                f"ContinualLearning: the processes disagree on the stage that starts (stage, step) per rank: {seen}. "
                "Every rank must run the same stages with the same budgets (same data length per rank)."
            )
        fresh = index > 0 or self._started >= 0
        sequence.current = index
        if fresh:  # the first stage trains with the optimizers Lightning built at the start of fit
            old = list(trainer.optimizers)
            self._build_optimizers(trainer, pl_module)
            if self.optimizer_state == "keep":
                for before, after in zip(old, trainer.optimizers, strict=False):
                    for param, state in before.state.items():
                        after.state[param] = state
            snapshot = StageStartSnapshot.get(pl_module)
            if snapshot is not None:
                snapshot.retake(pl_module)
        self._built_for = index
        self._apply_lr(trainer, sequence.stages[index].lr)
        self._starts[index] = step
        self._started = index
        context = self._context(trainer, index)
        lr = f", lr {context.lr:g}" if context.lr is not None else ""
        rank_zero_info(
            f"ContinualLearning: stage {context.number}/{context.num_stages} {context.name!r} starts at step {step}: "
            f"{context.max_steps} optimizer steps{lr}" + (", a fresh optimizer and schedule." if fresh else ".")
        )
        self._notify(trainer, pl_module, "on_stage_start", context)

    def _end_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> None:
        if len(self._rows) <= index + 1:
            self._measure_row(trainer, pl_module, row=index + 1)
        self._ended.append(index)
        self._notify(trainer, pl_module, "on_stage_end", self._context(trainer, index))

    def _notify(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hook: str, context: StageContext) -> None:
        for callback in trainer.callbacks:
            method = getattr(callback, hook, None)
            if callback is not self and callable(method):
                method(trainer, pl_module, context)

    @contextmanager
    def _module_flags(self, pl_module: pl.LightningModule) -> Iterator[None]:
        """``requires_grad`` as the module left it for the fit (lit_mofo.params' record), for the duration."""
        flags = initial_requires_grad(pl_module)
        params = dict(pl_module.named_parameters())
        now = {name: param.requires_grad for name, param in params.items()}
        try:
            for name, param in params.items():
                param.requires_grad_(flags.get(name, now[name]))
            yield
        finally:
            for name, param in params.items():
                param.requires_grad_(now[name])

    def _build_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with self._module_flags(pl_module):
            self._adapter.rebuild_optimizers(trainer)

    @staticmethod
    def _apply_lr(trainer: pl.Trainer, lr: float | None) -> None:
        if lr is None:
            return
        for optimizer in trainer.optimizers:
            default = optimizer.defaults.get("lr")
            if not isinstance(default, (int, float)) or isinstance(default, bool) or not default > 0:
                raise MisconfigurationException(
                    f"ContinualLearning: a stage sets lr={lr:g}, which scales the optimizer's learning rates by "
                    f"lr / defaults['lr'], but {type(optimizer).__name__} has defaults['lr']={default!r}. Give the "
                    "optimizer a positive default lr, or drop the stage's lr."
                )
            factor = lr / float(default)
            for group in optimizer.param_groups:
                for key in ("lr", "initial_lr"):
                    if key in group:
                        value = group[key]
                        group[key] = value * factor if not isinstance(value, torch.Tensor) else value.mul(factor)
            for config in trainer.lr_scheduler_configs:
                _scale_base_lrs(config.scheduler, optimizer, factor, seen=set())

    # ------------------------------------------------------------------ hooks during the stages
    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Lightning skips on_train_epoch_start in some resumed epochs; on_train_start handles those, this is the net.
        if self._started < min(trainer.current_epoch, len(self._require_sequence()) - 1):
            self._catch_up(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log("continual/stage", float(trainer.current_epoch + 1), on_step=True, on_epoch=False)
        step = trainer.global_step
        start = self._starts.get(trainer.current_epoch, 0)
        if self.every_n_train_steps and step > start and step % self.every_n_train_steps == 0:
            self._measure(trainer, pl_module, trigger="interval", row=None)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        index = trainer.current_epoch
        if index < len(self._require_sequence()) and index not in self._ended:
            self._end_stage(trainer, pl_module, index)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)
        if self.report and self._rows:
            FitReport.attach(trainer, self, self.report_dir).submit(trainer, self, self.report_section())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        if self._probe_set is not None:
            self._probe_set.teardown(trainer, pl_module)
        FitReport.detach(trainer, self)
        self._restored = False
        self._built_for = None

    # ------------------------------------------------------------------ measuring
    def _measure_row(self, trainer: pl.Trainer, pl_module: pl.LightningModule, row: int) -> None:
        values = self._measure(trainer, pl_module, trigger="start" if row == 0 else "stage_end", row=row)
        self._rows.append({"row": row, "step": trainer.global_step, "values": values})
        publish_metrics(trainer, {**self._row_metrics(row), "continual/stage": float(row)}, log=True)
        self._write_matrix(trainer)

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, trigger: str, row: int | None
    ) -> dict[str, dict[str, float]]:
        assert self._probe_set is not None
        step = trainer.global_step
        if self._last_measured is not None and self._last_measured[0] == step:
            values = self._last_measured[1]  # the same weights: an interval evaluation at the stage's last step
        else:
            values = {}
            for name, measured, seconds in self._probe_set.values(trainer, pl_module, self._adapter):
                values[name] = measured
                self._seconds += seconds
            self._last_measured = (step, values)
            self._check_metrics(values)
        stage = row if row is not None else trainer.current_epoch + 1
        for task, measured in values.items():
            for metric, value in measured.items():
                self._history.append(
                    {
                        "step": step,
                        "stage": stage,
                        "row": row,
                        "trigger": trigger,
                        "task": task,
                        "metric": metric,
                        "value": value,
                        "higher_is_better": self._directions[task][metric],
                    }
                )
        if row is None:
            prefix = _prefix(stage, self._names)
            logged = {f"{prefix}/R/{task}/{m}": v for task, measured in values.items() for m, v in measured.items()}
            publish_metrics(trainer, {**logged, "continual/stage": float(stage)}, log=True)
        return values

    def _check_metrics(self, values: dict[str, dict[str, float]]) -> None:
        common = [m for m in values[self._names[0]] if all(m in values[task] for task in self._names)]
        if not common:
            raise MisconfigurationException(
                "ContinualLearning: the task probes share no metric, so there is no accuracy matrix: "
                + ", ".join(f"{task!r} reports {sorted(values[task])}" for task in self._names)
                + ". Use task probes that report a common metric (e.g. TaskProbe's exact_match)."
            )
        for metric in common:
            directions = {task: self._directions[task][metric] for task in self._names}
            if len(set(directions.values())) > 1:
                raise MisconfigurationException(
                    f"ContinualLearning: metric {metric!r} is higher-is-better for some task probes and not for "
                    f"others ({directions}); one matrix needs one direction."
                )
        if self.metric is not None and self.metric not in common:
            raise MisconfigurationException(
                f"ContinualLearning(metric={self.metric!r}): not reported by every task probe; the metrics they "
                f"share are {common}."
            )

    def _row_metrics(self, row: int) -> dict[str, float]:
        prefix = _prefix(row, self._names)
        out: dict[str, float] = {}
        for task, measured in self._rows[row]["values"].items():
            for metric, value in measured.items():
                out[f"{prefix}/R/{task}/{metric}"] = value
        if row == 0:
            return out
        for metric in self.metrics:
            figures = self.summary(metric, after=row)
            for key in ("op", "bwt", "fwt", "average_forgetting"):
                if figures[key] is not None:
                    out[f"{prefix}/{key}/{metric}"] = figures[key]
            for task, lost in figures["forgetting"].items():
                if lost is not None:
                    out[f"{prefix}/forgetting/{task}/{metric}"] = lost
        return out

    def _latest_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for row in range(len(self._rows)):
            out.update(self._row_metrics(row))
        return out

    # ------------------------------------------------------------------ writing
    def _directory(self, trainer: pl.Trainer) -> Path:
        # trainer.log_dir broadcasts from rank zero: every rank asks.
        return Path(self.report_dir or trainer.log_dir or trainer.default_root_dir)

    def matrix_payload(self) -> dict[str, Any]:
        """What ``continual_matrix.json`` holds: the stages, the rows so far with their steps, for every metric its
        direction, its matrix and its figures after every stage, and the definitions."""
        sequence = self._sequence
        payload: dict[str, Any] = {
            "stages": [
                {"name": name, "max_steps": sequence.budget(i) if sequence else None, "start_step": self._starts.get(i)}
                for i, name in enumerate(self._names)
            ],
            "rows": [
                {"row": row["row"], "label": _row_label(row["row"], self._names), "step": row["step"]}
                for row in self._rows
            ],
            "headline_metric": self.headline_metric if self._rows else self.metric,
            "definitions": {
                "R[i][j]": "score on task j (column j, stage order) after stage i; row 0 is before stage 1",
                "op": "mean over j <= i of R[i][j] (TRACE's OP at i = T; average accuracy)",
                "bwt": "mean over j < i of s*(R[i][j] - R[j][j]) (TRACE; negative = forgot)",
                "forgetting": "for task j < i: max over rows 0..i-1 of s*R[.][j] minus s*R[i][j] (Avalanche)",
                "fwt": "mean over 2 <= j <= i of s*(R[j-1][j] - R[0][j]) (GEM)",
                "s": "+1 for a higher-is-better metric, -1 for a lower-is-better one",
            },
            "metrics": {},
        }
        for metric in self.metrics:
            higher = self.higher_is_better(metric)
            payload["metrics"][metric] = {
                "higher_is_better": higher,
                "matrix": self.matrix(metric),
                "after_stage": [{"stage": row, **self.summary(metric, after=row)} for row in range(1, len(self._rows))],
            }
        return payload

    def _write_matrix(self, trainer: pl.Trainer) -> None:
        directory = self._directory(trainer)
        if not trainer.is_global_zero:
            return
        directory.mkdir(parents=True, exist_ok=True)
        payload = self.matrix_payload()
        (directory / f"{MATRIX_STEM}.json").write_text(json.dumps(json_safe(payload), indent=2) + "\n")
        tables = [markdown_table(table) for table in self._tables()]
        (directory / f"{MATRIX_STEM}.md").write_text(
            "# Continual fine-tuning: the accuracy matrix so far\n\n" + "\n".join(tables)
        )

    def _tables(self) -> list[Table]:
        if not self._rows:
            return []
        tables = []
        for metric in self.metrics:
            higher = self.higher_is_better(metric)
            matrix = self.matrix(metric)
            rows = []
            for row in range(len(self._rows)):
                figures = self.summary(metric, after=row) if row else {"op": None, "bwt": None, "fwt": None}
                rows.append(
                    [_row_label(row, self._names), self._rows[row]["step"], *matrix[row], figures["op"],
                     figures["bwt"], figures["fwt"]]
                )  # fmt: skip
            tables.append(
                Table(
                    title=f"Accuracy matrix: {metric} ({'higher' if higher else 'lower'} is better) of each task "
                    "(column) after each stage (row)",
                    headers=["row", "step", *self._names, "OP", "BWT", "FWT"],
                    rows=rows,
                )
            )
        return tables

    # ------------------------------------------------------------------ report
    def report_section(self) -> ReportSection:
        """This callback's part of the end-of-fit report (see :mod:`lit_mofo.report`)."""
        from lit_mofo.report import draw_heatmap

        metric = self.headline_metric
        higher = self.higher_is_better(metric)
        last = len(self._rows) - 1
        tables = self._tables()
        headline = next(t for t, m in zip(tables, self.metrics, strict=True) if m == metric)
        summary = [headline]
        if last >= 1:
            figures = self.summary(metric)
            matrix = self.matrix(metric)
            best = max if higher else min
            rows = []
            for j, task in enumerate(self._names):
                lost = figures["forgetting"][task]
                earlier = best(matrix[i][j] for i in range(last)) if lost is not None else None
                own = matrix[j + 1][j] if j + 1 <= last else None
                rows.append([task, own, earlier, matrix[last][j], lost])
            summary.append(
                Table(
                    title=f"Forgetting per task after stage {last} ({metric}; best earlier score minus the final "
                    "one, positive = forgot)",
                    headers=["task", "after its stage", "best earlier", "final", "forgetting"],
                    rows=rows,
                )
            )
        history = [t for t, m in zip(tables, self.metrics, strict=True) if m != metric]
        history.append(
            Table(
                title="Every measurement of the task probes",
                headers=["step", "stage", "trigger", "task", "metric", "value"],
                rows=[[r["step"], r["stage"], r["trigger"], r["task"], r["metric"], r["value"]] for r in self._history],
            )
        )
        boundaries = self.stage_starts
        curves = [
            Curve(
                title=f"tasks across the stages: {m}",
                lines={
                    task: [(r["step"], r["value"]) for r in self._history if r["task"] == task and r["metric"] == m]
                    for task in self._names
                },
                ylabel=f"{m} ({'higher' if self.higher_is_better(m) else 'lower'} is better)",
                boundaries=boundaries,
            )
            for m in [metric, *(x for x in self.metrics if x != metric)]
        ]
        names, matrix = list(self._names), self.matrix(metric)
        labels = [_row_label(row, names) for row in range(len(self._rows))]

        def heatmap(path: Path) -> bool:
            return draw_heatmap(path, matrix, labels, names, title=f"Accuracy matrix: {metric}", higher=higher)

        payload = self.matrix_payload()
        return ReportSection(
            key="continual",
            title="Continual fine-tuning: the accuracy matrix",
            records=self.history,
            summary=summary,
            history=history,
            curves=curves,
            meta={
                **{key: payload[key] for key in ("stages", "rows", "headline_metric", "definitions", "metrics")},
                "evaluation_seconds": self._seconds,
            },
            figures={"continual_matrix": heatmap},
        )

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "names": list(self._names),
            "directions": {task: dict(d) for task, d in self._directions.items()},
            "rows": copy.deepcopy(self._rows),
            "history": self.history,
            "starts": dict(self._starts),
            "started": self._started,
            "ended": list(self._ended),
            "seconds": self._seconds,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._names = list(state_dict["names"])
        self._directions.clear()  # the dict the probe set records into
        self._directions.update({task: dict(d) for task, d in state_dict["directions"].items()})
        self._rows = [dict(row) for row in state_dict["rows"]]
        self._history = [dict(record) for record in state_dict["history"]]
        self._starts = {int(index): int(step) for index, step in state_dict["starts"].items()}
        self._started = int(state_dict["started"])
        self._ended = [int(index) for index in state_dict["ended"]]
        self._seconds = float(state_dict["seconds"])
        self._last_measured = None
        self._restored = True


def _scale_base_lrs(scheduler: Any, optimizer: Any, factor: float, seen: set[int]) -> None:
    """Scale ``base_lrs`` of ``scheduler`` (and of the schedulers it chains) when it drives ``optimizer``."""
    if id(scheduler) in seen or not hasattr(scheduler, "__dict__"):
        return
    seen.add(id(scheduler))
    if getattr(scheduler, "optimizer", None) is optimizer and isinstance(getattr(scheduler, "base_lrs", None), list):
        scheduler.base_lrs = [value * factor for value in scheduler.base_lrs]
    for value in vars(scheduler).values():
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, LRScheduler):
                _scale_base_lrs(item, optimizer, factor, seen)
