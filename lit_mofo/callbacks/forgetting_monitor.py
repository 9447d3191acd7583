r"""
Forgetting monitor
^^^^^^^^^^^^^^^^^^

Measure, while a model fine-tunes, how much of the pre-trained model's general capability it is losing: every
probe is evaluated on the pre-trained model (before the first optimizer step), then on a schedule, and each value is
logged next to its *forgetting* (positive = worse than pre-trained) and *retention ratio*.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lit_mofo._validation import as_bool, as_int
from lit_mofo.probes._checks import check_name
from lit_mofo.probes.base import Probe
from lit_mofo.report import Curve, FitReport, ReportSection, Table, epoch_of_last_step
from lit_mofo.strategy import StrategyAdapter

__all__ = [
    "ForgettingMonitor",
    "ProbeSet",
    "forgetting",
    "isolated_evaluation",
    "retention",
    "worst_forgetting",
]


def forgetting(value: float, baseline: float, higher_is_better: bool) -> float:
    """How much worse than the pre-trained ``baseline`` ``value`` is: ``baseline - value`` when higher is better,
    ``value - baseline`` when lower is better, so positive always means "forgot" (Avalanche's convention; backward
    transfer is its negative). A value equal to the baseline forgot nothing (0, also when both are infinite)."""
    if value == baseline:
        return 0.0
    return baseline - value if higher_is_better else value - baseline


def retention(value: float, baseline: float, higher_is_better: bool) -> float:
    """Share of the pre-trained performance kept: ``value / baseline`` when higher is better, ``baseline / value``
    when lower is better; 1.0 = as good as pre-trained, below 1 = worse. A value equal to the baseline keeps 1.0
    (zeros and infinities included); another zero denominator gives ``nan``. Meaningful for positive metrics
    (accuracy, loss, perplexity)."""
    if value == baseline:
        return 1.0
    numerator, denominator = (value, baseline) if higher_is_better else (baseline, value)
    if denominator == 0:
        return math.nan
    return numerator / denominator


def worst_forgetting(records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The measurement of ``records`` (dicts with ``forgetting`` and ``step``) that forgot the most: the largest
    forgetting, ``+inf`` included (e.g. a loss that became infinite); ``-inf`` is an infinite *improvement* (a
    higher-is-better value of ``+inf``) and never the worst unless every measurement is. A NaN forgetting (a NaN
    value or baseline: the model or the probe failed there) counts as the worst, since how much was lost is
    unknown. Ties go to the earliest step."""
    if not records:
        raise ValueError("worst_forgetting() needs at least one measurement.")

    def rank(record: Mapping[str, Any]) -> tuple[bool, float]:
        lost = float(record["forgetting"])
        return (math.isnan(lost), -math.inf if math.isnan(lost) else lost)

    return max(records, key=rank)


def _same_values(first: Mapping[str, float], second: Mapping[str, float]) -> bool:
    """Equal metrics and values, NaN equal to NaN."""
    return first.keys() == second.keys() and all(
        first[k] == second[k] or (math.isnan(first[k]) and math.isnan(second[k])) for k in first
    )


@contextmanager
def isolated_evaluation(module: nn.Module) -> Iterator[None]:
    """Run a block as a pure evaluation: every submodule in eval mode, no autograd, and afterwards each submodule's
    own ``training`` flag, the RNG states (torch CPU, CUDA/MPS when in use, Python ``random``, NumPy when
    imported) and, for a model sharded with FSDP2, the sharded state of its parameters (see
    :meth:`~lit_mofo.strategy.StrategyAdapter.reshard`) exactly as before — so training continues as if nothing
    had happened."""
    modes = [(m, m.training) for m in module.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    mps_rng = torch.mps.get_rng_state() if torch.backends.mps.is_available() else None
    python_rng = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_rng = numpy.random.get_state() if numpy is not None else None
    try:
        module.eval()
        # inference_mode(False): inside Lightning's validation loop, keep new tensors usable outside of it.
        with torch.inference_mode(False), torch.no_grad():
            yield
    finally:
        StrategyAdapter.reshard(module)
        for submodule, training in modes:
            submodule.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        if mps_rng is not None:
            torch.mps.set_rng_state(mps_rng)
        random.setstate(python_rng)
        if numpy is not None and numpy_rng is not None:
            numpy.random.set_state(numpy_rng)


class ProbeSet:
    """Named probes evaluated together, the way :class:`ForgettingMonitor` evaluates them: one probe loop shared by
    the monitor and :class:`~lit_mofo.continual.ContinualLearning` (its task probes).

    :meth:`values` evaluates every probe in :func:`isolated_evaluation` with the precision plugin's forward context,
    on every process, a probe failing on one rank failing every rank; it checks what each probe returns (a dict of
    numbers with a declared direction per metric, names without whitespace) and records rank zero's values on every
    rank, with a warning (once per probe and fit) when the ranks disagree. :attr:`directions` holds each metric's
    higher-is-better flag as first seen.

    Args:
        probes: the probes by name (names already checked).
        directions: the dict to keep the metric directions in (a callback's, so its ``state_dict`` holds them).
    """

    def __init__(self, probes: Mapping[str, Probe], directions: dict[str, dict[str, bool]] | None = None) -> None:
        self.probes = dict(probes)
        self.directions: dict[str, dict[str, bool]] = {} if directions is None else directions
        self._disagreement_warned: set[str] = set()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, adapter: StrategyAdapter) -> None:
        """Each probe's ``setup``, on every rank together (a rank that fails fails them all); once per fit."""
        self._disagreement_warned = set()
        for name, probe in self.probes.items():
            adapter.run_together(f"The setup of probe {name!r}", lambda probe=probe: probe.setup(trainer, pl_module))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for probe in self.probes.values():
            probe.teardown(trainer, pl_module)

    def values(
        self, trainer: pl.Trainer | None, pl_module: pl.LightningModule, adapter: StrategyAdapter
    ) -> Iterator[tuple[str, dict[str, float], float]]:
        """``(probe, values, seconds)`` for each probe in turn, evaluated in isolation (the one probe loop)."""
        context = nullcontext() if trainer is None else trainer.precision_plugin.forward_context()
        if trainer is None:
            adapter = StrategyAdapter("single")
        with isolated_evaluation(pl_module), context:
            for name, probe in self.probes.items():
                start = time.perf_counter()
                values = adapter.run_together(  # a probe failing on one rank fails every rank
                    f"Probe {name!r}",
                    lambda name=name, probe=probe: self.checked(name, probe, probe.evaluate(trainer, pl_module)),  # type: ignore[arg-type]
                )
                values = self._rank_zero_values(adapter, name, values)
                yield name, values, time.perf_counter() - start

    def _rank_zero_values(self, adapter: StrategyAdapter, name: str, values: dict[str, float]) -> dict[str, float]:
        """Rank zero's values (and metric directions) on every rank, so every rank records what is logged; a
        warning (once per probe and fit) when the ranks disagree: the probe did not reduce across processes."""
        gathered = adapter.all_gather_object((values, self.directions[name]))
        reference, directions = gathered[0]
        if (
            any(not _same_values(other, reference) for other, _ in gathered[1:])
            and name not in self._disagreement_warned
        ):
            self._disagreement_warned.add(name)
            rank_zero_warn(
                f"Probe {name!r} returned different values on different processes ({[v for v, _ in gathered]!r:.300}); "
                "the monitor records rank zero's. A probe must reduce its figures across processes (the built-in "
                "probes sum their counts with torchmetrics; in a CallableProbe use `trainer.strategy.reduce`) so they "
                "describe the whole reference set."
            )
        for metric in reference:
            self.directions[name].setdefault(metric, directions[metric])
        return dict(reference)

    def checked(self, name: str, probe: Probe, values: Any) -> dict[str, float]:
        """``values`` returned by ``probe`` as ``{metric: float}``, checked (see the class docstring); records the
        metrics' directions."""
        directions = probe.higher_is_better
        if not isinstance(values, Mapping):
            raise MisconfigurationException(
                f"Probe {name!r} returned {type(values).__name__}; `evaluate` must return a dict {{metric: value}}."
            )
        unflagged = [metric for metric in values if not isinstance(directions.get(metric), bool)]
        if unflagged:
            raise MisconfigurationException(
                f"Probe {name!r} returned metric(s) {unflagged} without a higher-is-better flag; its "
                f"`higher_is_better` declares {directions}. Add each metric with True (higher is better, e.g. "
                "accuracy) or False (lower is better, e.g. loss)."
            )
        checked = {}
        for metric, value in values.items():
            if not isinstance(metric, str) or not metric or any(c.isspace() for c in metric):
                raise MisconfigurationException(
                    f"Probe {name!r} returned an invalid metric name {metric!r}: use a non-empty string without "
                    "whitespace (it becomes part of `probe/<probe>/<metric>`)."
                )
            try:
                checked[metric] = float(value.item() if isinstance(value, Tensor) else value)
            except (TypeError, ValueError, RuntimeError) as error:
                raise MisconfigurationException(
                    f"Probe {name!r} returned {value!r:.60} for {metric!r}; metric values must be numbers."
                ) from error
        previous = self.directions.setdefault(name, {})
        for metric in checked:
            previous.setdefault(metric, directions[metric])
        return checked


def publish_metrics(trainer: pl.Trainer, metrics: dict[str, float], log: bool) -> None:
    """Put ``metrics`` into ``trainer.callback_metrics`` (what ``ModelCheckpoint``, ``EarlyStopping`` and the progress
    bar read) and, with ``log``, send them to every logger from rank zero at the current step: figures measured
    outside ``training_step``, which ``LightningModule.log`` cannot take."""
    trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
    if log and metrics and trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class ForgettingMonitor(Callback):
    r"""Evaluate probes on the pre-trained model and then while it fine-tunes; log value, forgetting and retention.

    **Baseline.** Every probe is evaluated once before the first optimizer step (``on_train_start``): that is the
    pre-trained model. Then every ``every_n_train_steps`` optimizer steps, at the end of every validation run during
    fit (``evaluate_on_validation``), and once at the end of training. Each step is evaluated at most once.

    **Logged metrics** (through every logger of the trainer, at ``step=trainer.global_step``, and put in
    ``trainer.callback_metrics`` so :class:`~lightning.pytorch.callbacks.ModelCheckpoint` and
    :class:`~lightning.pytorch.callbacks.EarlyStopping` can monitor them), for each probe ``<probe>`` and metric
    ``<metric>``:

    - ``probe/<probe>/<metric>``: the current value;
    - ``forgetting/<probe>/<metric>``: baseline - value if higher is better, value - baseline if lower is better,
      so positive always means worse than pre-trained (monitor it with ``mode="min"``);
    - ``retention/<probe>/<metric>``: value / baseline if higher is better, baseline / value if lower is better
      (1 = as good as pre-trained, also when value and baseline are equal zeros or infinities; ``nan`` for another
      zero denominator).

    A non-finite value is logged as it is, with a warning (once per metric and fit); the fit goes on.

    **Isolation.** Probes run under ``torch.no_grad()``, with every submodule in eval mode and the precision
    plugin's forward context (autocast for mixed precision, as in training), through the unwrapped model (not the
    DDP wrapper). Afterwards each submodule's own ``training`` flag and the RNG states are restored, a model sharded
    with FSDP2 is put back into its shards (FSDP2 keeps the root's parameters gathered after a forward) and the train
    dataloader is never touched, so a fit with the monitor ends with exactly the weights of the same fit without it.

    **Cost.** One evaluation = one forward pass over each probe's reference set (no backward), so a batch costs
    about a third of a training step on the same number of tokens; the lm-eval probe costs a full lm-eval run.
    Bound each probe with its ``limit_batches`` (``limit`` for lm-eval) and space evaluations with
    ``every_n_train_steps``. Measured on the quickstart (tiny Llama, 60 MoFO steps of 16x32 tokens, 2 shared CPU
    cores) with ``configs/forgetting_callbacks.yaml``'s probe (64 sequences of 32 tokens): 6-9% of the fit time
    with the default interval, most of it the first evaluation's warm-up. :attr:`evaluation_seconds` and the
    report's ``seconds`` column give the figure for your run.

    **Continual runs** (:mod:`lit_mofo.continual`: a sequence of stages in one fit): the baseline is measured once,
    before stage 1, so every figure is against the pre-trained model (θ₀ of stage 1) across all stages; the probes are
    also evaluated at the end of every stage; every measurement carries its ``stage`` (0 for the baseline) and
    ``stage_name``; the report's curves mark where each stage starts.

    **End of fit.** On rank zero a report is written to ``report_dir`` (default: ``trainer.log_dir``, or
    ``default_root_dir`` without a logger; a warning at the start of fit says when that is the current directory
    only because neither was set): ``forgetting_report.json`` (every measurement: step, epoch, probe, metric,
    value, baseline, forgetting, retention), ``forgetting_report.md`` and ``forgetting_report.png`` (each metric
    against the step, baseline dashed, titled with the method, the optimizer and the model). A
    :class:`~lit_mofo.callbacks.parameter_drift.ParameterDrift` on the same trainer adds its section to the same
    files. The summary is also printed as a table; its ``worst`` column
    is the largest forgetting measured (see :func:`worst_forgetting`). Epochs are numbered as checkpoints number
    them: the epoch the step ran in.

    **Resume.** The baselines and the history are in the callback's checkpoint state (in a sharded checkpoint's
    ``meta.pt`` under ``ModelParallelStrategy``): a resumed fit compares with the pre-trained values from the
    checkpoint and never re-measures a baseline on resumed weights. A new ``trainer.fit`` that is not a resume
    measures new baselines (the next stage starts from its own model). Whether the fit resumes is decided in
    ``on_train_start``, after Lightning restored the callbacks under every strategy (``ModelParallelStrategy``
    restores them after ``on_fit_start``).

    **Multi-process.** Supported: DDP (every variant) and Lightning's ``ModelParallelStrategy(data_parallel_size=N,
    tensor_parallel_size=1)`` with the model sharded by FSDP2's ``fully_shard`` in ``configure_model`` — per block
    and then on the model the probes call (``pl_module.model``, as
    :class:`~lit_mofo.modules.causal_lm.CausalLMModule` does; a probe refuses in ``setup`` a model sharded from
    outside). Every process runs every probe: the built-in probes deal their batches round-robin with as many
    forwards on every rank and sum their counts (:func:`~lit_mofo.probes.run_batches`), so the figures equal the
    single-process ones on the same weights (up to float64 summation order); the lm-eval probe runs the whole
    request list on every rank. Every rank records rank zero's figures (with a warning if a probe returned others
    elsewhere). A probe that fails on some ranks only — preparing its data in ``setup``, checking a batch before its
    forward, reading the output after it, a user's function — fails every rank with the error instead of leaving
    the others waiting; the limit is a forward that fails part-way on one rank, after its first FSDP2 all-gather,
    which leaves the others inside that forward (the probes check their inputs before the forward for that reason).
    Refused at ``setup``, with the fix: DeepSpeed, FSDP1 (``strategy="fsdp"``), tensor parallelism (a 2-D mesh) and
    XLA (see :class:`~lit_mofo.strategy.StrategyAdapter`).

    Args:
        probes: the probes: a dict ``{name: probe}`` (the key becomes the probe's ``name``), a list of probes with
            distinct names, or a single probe. From YAML, each probe is a ``class_path``/``init_args`` block.
        every_n_train_steps: evaluate after every N-th optimizer step; None or 0 evaluates only at validation ends
            and at the end of fit.
        evaluate_on_validation: also evaluate at the end of every validation run during fit (not sanity checks).
        report: write the end-of-fit report files and print the summary.
        report_dir: directory for the report files (created if missing); None uses ``trainer.log_dir``.

    Example::

        from lit_mofo.callbacks.forgetting_monitor import ForgettingMonitor
        from lit_mofo.probes import LanguageModelProbe

        monitor = ForgettingMonitor(
            {"general_text": LanguageModelProbe(files="reference.txt", limit_batches=20)}, every_n_train_steps=50
        )
        early_stop = EarlyStopping(monitor="forgetting/general_text/loss", mode="min", stopping_threshold=0.5)
        trainer = Trainer(callbacks=[monitor])
    """

    def __init__(
        self,
        probes: Probe | Sequence[Probe] | Mapping[str, Probe],
        every_n_train_steps: int | None = 100,
        evaluate_on_validation: bool = True,
        report: bool = True,
        report_dir: str | Path | None = None,
    ) -> None:
        self._probes = self._named_probes(probes)
        where = "ForgettingMonitor()"
        if every_n_train_steps is not None:
            as_int(
                every_n_train_steps,
                where=where,
                argument="every_n_train_steps",
                minimum=0,
                fix="It counts optimizer steps between evaluations; None or 0 evaluates only at validation ends and "
                "at the end of fit.",
                error=MisconfigurationException,
            )
        self.every_n_train_steps = int(every_n_train_steps or 0)
        self.evaluate_on_validation = as_bool(
            evaluate_on_validation, where=where, argument="evaluate_on_validation", error=MisconfigurationException
        )
        self.report = as_bool(report, where=where, argument="report", error=MisconfigurationException)
        if report_dir is not None and (not isinstance(report_dir, (str, Path)) or Path(report_dir).is_file()):
            raise MisconfigurationException(
                f"{where}: report_dir={report_dir!r} is invalid; the valid range is a directory path (created if "
                "missing) or None for the trainer's log directory."
                + (" It is an existing file." if isinstance(report_dir, (str, Path)) else "")
            )
        self.report_dir = None if report_dir is None else str(report_dir)
        self._directions: dict[str, dict[str, bool]] = {}
        self._baselines: dict[str, dict[str, float]] = {}
        self._history: list[dict[str, Any]] = []
        self._last_step: int | None = None
        self._seconds = 0.0
        self._restored = False
        self._fitting = False
        self._non_finite_warned: set[tuple[str, str]] = set()
        self._epoch_of_step: int | None = None  # the epoch the latest step of this fit ran in
        self._adapter = StrategyAdapter("single")
        self._probe_set = ProbeSet(self._probes, self._directions)
        self._continual = False  # a lit_mofo.continual run (its measurements carry their stage)
        self._stage: tuple[int, str] | None = None  # (number, name) of a continual run's current stage
        self._stage_starts: list[tuple[int, str]] = []

    # ------------------------------------------------------------------ configuration
    @staticmethod
    def _named_probes(probes: Probe | Sequence[Probe] | Mapping[str, Probe]) -> dict[str, Probe]:
        if isinstance(probes, Probe):
            probes = [probes]
        if isinstance(probes, Mapping):
            named = dict(probes)
            for name, probe in named.items():
                if not isinstance(probe, Probe):
                    raise MisconfigurationException(
                        f"`probes[{name!r}]` is a {type(probe).__name__}, not a lit_mofo.probes.Probe; wrap a "
                        "function in `CallableProbe`."
                    )
                probe.name = check_name(name)
        elif isinstance(probes, Sequence) and not isinstance(probes, str):
            named = {}
            for probe in probes:
                if not isinstance(probe, Probe):
                    raise MisconfigurationException(
                        f"{probe!r:.80} is a {type(probe).__name__}, not a lit_mofo.probes.Probe; wrap a function "
                        "in `CallableProbe`."
                    )
                name = check_name(probe.name)
                if name in named:
                    raise MisconfigurationException(
                        f"Two probes are named {name!r} ({named[name]!r} and {probe!r}): their metrics would collide. "
                        "Give each a distinct `name=`, or pass a dict {name: probe}."
                    )
                named[name] = probe
        else:
            raise MisconfigurationException(
                f"`probes` must be a Probe, a list of probes or a dict {{name: probe}}, got {type(probes).__name__}."
            )
        if not named:
            raise MisconfigurationException("`probes` is empty: give at least one probe to evaluate.")
        return named

    @property
    def probes(self) -> dict[str, Probe]:
        """The probes by name."""
        return dict(self._probes)

    @property
    def baselines(self) -> dict[str, dict[str, float]]:
        """``{probe: {metric: value}}`` measured on the pre-trained model (empty before the fit starts)."""
        return {probe: dict(values) for probe, values in self._baselines.items()}

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every measurement so far: dicts with ``step``, ``epoch``, ``trigger``, ``probe``, ``metric``, ``value``,
        ``baseline``, ``forgetting``, ``retention``, ``higher_is_better`` and the probe's ``seconds``."""
        return [dict(record) for record in self._history]

    @property
    def evaluation_seconds(self) -> float:
        """Wall-clock seconds spent evaluating probes in this fit (including the baseline)."""
        return self._seconds

    @property
    def state_key(self) -> str:
        return self._generate_state_key(probes=sorted(self._probes))

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        self._adapter = StrategyAdapter.of(trainer, user=type(self).__name__)
        from lit_mofo.continual.callback import continual_learning  # here: lit_mofo.continual imports this module

        self._continual = continual_learning(trainer) is not None
        if self.report:
            FitReport.attach(trainer, self, self.report_dir)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Whether the fit resumes is decided in on_train_start: under ModelParallelStrategy the callbacks' states are
        # restored only after on_fit_start, under the other strategies before it; on_train_start comes after both.
        self._fitting = True
        if not self._restored:  # a new fit (ModelParallelStrategy restores a checkpoint's stages later)
            self._stage, self._stage_starts = None, []
        self._non_finite_warned = set()
        self._epoch_of_step = None
        self._probe_set.setup(trainer, pl_module, self._adapter)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._restored and trainer.ckpt_path is not None:
            raise MisconfigurationException(
                f"The fit resumes from {trainer.ckpt_path!r}, which holds no pre-trained baselines for "
                f"{type(self).__name__}(probes={sorted(self._probes)}) (checkpoint state key {self.state_key!r}); "
                "measuring them now would take the resumed weights for the pre-trained model. Resume with the probes "
                "that wrote the checkpoint, or start a fit from the pre-trained model to measure new probes."
            )
        if self._restored:
            missing = sorted(set(self._probes) - set(self._baselines))
            if missing:
                raise MisconfigurationException(
                    f"Cannot resume with probe(s) {missing}: the checkpoint holds no pre-trained baseline for them, "
                    "and the weights now are the resumed ones. Resume with the probes that wrote the checkpoint "
                    f"({sorted(self._baselines)}), or measure the new probes in a fit started from the pre-trained "
                    "model."
                )
            publish_metrics(trainer, self._latest_metrics(), log=False)
            return
        self._baselines, self._history, self._last_step, self._seconds = {}, [], None, 0.0  # a new fit: new baselines
        self._evaluate(trainer, pl_module, trigger="baseline")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._epoch_of_step = trainer.current_epoch  # right inside the epoch; one ahead once it has ended
        step = trainer.global_step
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0:
            self._evaluate(trainer, pl_module, trigger="interval")

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evaluate_on_validation and self._fitting and not trainer.sanity_checking and self._baselines:
            self._evaluate(trainer, pl_module, trigger="validation")

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
        """The stage protocol (:class:`lit_mofo.continual.StageCallback`): records the stage (its measurements carry
        it, its start is marked on the report's curves). The baseline stays the model before stage 1."""
        if stage.resumed:
            return
        self._stage = (stage.number, stage.name)
        if (trainer.global_step, stage.name) not in self._stage_starts:
            self._stage_starts.append((trainer.global_step, stage.name))

    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
        """The stage protocol: evaluate at the stage's last step (once per step), so the curves have a point at every
        stage boundary."""
        self._evaluate(trainer, pl_module, trigger="stage_end")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluate(trainer, pl_module, trigger="fit_end")
        if self.report:
            FitReport.attach(trainer, self, self.report_dir).submit(trainer, self, self.report_section())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        self._probe_set.teardown(trainer, pl_module)
        FitReport.detach(trainer, self)
        self._restored = False
        self._fitting = False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "baselines": self.baselines,
            "directions": {probe: dict(d) for probe, d in self._directions.items()},
            "history": self.history,
            "last_step": self._last_step,
            "seconds": self._seconds,
            **(
                {"stage": list(self._stage), "stage_starts": [list(s) for s in self._stage_starts]}
                if self._stage
                else {}
            ),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._baselines = {probe: dict(values) for probe, values in state_dict["baselines"].items()}
        self._directions.clear()  # the dict the probe set records into
        self._directions.update({probe: dict(d) for probe, d in state_dict.get("directions", {}).items()})
        self._history = [dict(record) for record in state_dict["history"]]
        self._last_step = state_dict["last_step"]
        self._seconds = float(state_dict.get("seconds", 0.0))
        stage = state_dict.get("stage")
        self._stage = None if stage is None else (int(stage[0]), str(stage[1]))
        self._stage_starts = [(int(step), str(name)) for step, name in state_dict.get("stage_starts", [])]
        self._restored = True

    # ------------------------------------------------------------------ evaluation
    def evaluate_probes(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        """Evaluate every probe on ``pl_module``'s current weights: ``{probe: {metric: value}}``.

        The same evaluation as the monitor's own (isolation, the precision plugin's forward context, the checks of
        the returned values; on every process under DDP), but nothing is recorded, logged or counted in
        :attr:`evaluation_seconds`: for callers that measure other weights than the fit's, such as
        :class:`~lit_mofo.callbacks.task_vector_scaling.TaskVectorScaling`'s edits. ``trainer`` may be None outside
        a fit (the probes then run on one process, without a precision context).
        """
        return {name: values for name, values, _ in self._probe_values(trainer, pl_module)}

    def _probe_values(
        self, trainer: pl.Trainer | None, pl_module: pl.LightningModule
    ) -> Iterator[tuple[str, dict[str, float], float]]:
        """``(probe, values, seconds)`` for each probe in turn (:meth:`ProbeSet.values`)."""
        return self._probe_set.values(trainer, pl_module, self._adapter)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, trigger: str) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        metrics: dict[str, float] = {}
        for name, values, seconds in self._probe_values(trainer, pl_module):
            self._seconds += seconds
            metrics.update(self._record(trainer, name, values, trigger, seconds))
        if self._continual and metrics:  # the logged row says which stage it belongs to
            metrics["continual/stage"] = float(self._stage_fields(trigger)["stage"])
        publish_metrics(trainer, metrics, log=True)

    def _record(
        self, trainer: pl.Trainer, name: str, values: dict[str, float], trigger: str, seconds: float
    ) -> dict[str, float]:
        baselines = self._baselines.setdefault(name, {})
        logged: dict[str, float] = {}
        for metric, value in values.items():
            higher = self._directions[name][metric]
            if metric not in baselines:
                if trigger != "baseline":
                    rank_zero_warn(
                        f"Probe {name!r} returned metric {metric!r} at step {trainer.global_step} but not for the "
                        "pre-trained model: it has no baseline, so its forgetting is not measured."
                    )
                    continue
                baselines[metric] = value
            baseline = baselines[metric]
            if not math.isfinite(value) and (name, metric) not in self._non_finite_warned:
                self._non_finite_warned.add((name, metric))
                rank_zero_warn(
                    f"Probe {name!r} returned a non-finite {metric} = {value} at step {trainer.global_step}; it is "
                    "logged as such (the model may have diverged, or the reference set may be empty). Later "
                    "non-finite values of it are logged without this warning."
                )
            lost, kept = forgetting(value, baseline, higher), retention(value, baseline, higher)
            self._history.append(
                {
                    "step": trainer.global_step,
                    "epoch": self._epoch(trainer, trigger),
                    "trigger": trigger,
                    "probe": name,
                    "metric": metric,
                    "value": value,
                    "baseline": baseline,
                    "forgetting": lost,
                    "retention": kept,
                    "higher_is_better": higher,
                    "seconds": seconds,
                    **(self._stage_fields(trigger) if self._continual else {}),
                }
            )
            logged[f"probe/{name}/{metric}"] = value
            logged[f"forgetting/{name}/{metric}"] = lost
            logged[f"retention/{name}/{metric}"] = kept
        return logged

    def _stage_fields(self, trigger: str) -> dict[str, Any]:
        """A continual run's measurement: the stage it was taken in (0: before stage 1, the baseline)."""
        if trigger == "baseline" or self._stage is None:
            return {"stage": 0, "stage_name": None}
        return {"stage": self._stage[0], "stage_name": self._stage[1]}

    def _epoch(self, trainer: pl.Trainer, trigger: str) -> int:
        """The epoch the measured step ran in, as checkpoints number it."""
        if trigger != "fit_end":  # inside an epoch (or before the first): Lightning's own count is right
            return trainer.current_epoch
        return self._epoch_of_step if self._epoch_of_step is not None else epoch_of_last_step(trainer)

    def _latest_metrics(self) -> dict[str, float]:
        latest: dict[str, float] = {}
        for record in self._history:
            key = f"{record['probe']}/{record['metric']}"
            latest[f"probe/{key}"] = record["value"]
            latest[f"forgetting/{key}"] = record["forgetting"]
            latest[f"retention/{key}"] = record["retention"]
        return latest

    # ------------------------------------------------------------------ report
    def report_section(self) -> ReportSection:
        """This monitor's part of the end-of-fit report (see :mod:`lit_mofo.report`)."""
        keys = list(dict.fromkeys((r["probe"], r["metric"]) for r in self._history))
        summary_rows = []
        curves = []
        for probe, metric in keys:
            records = [r for r in self._history if (r["probe"], r["metric"]) == (probe, metric)]
            final = records[-1]
            worst = worst_forgetting(records)
            summary_rows.append(
                [
                    probe,
                    metric,
                    "higher" if final["higher_is_better"] else "lower",
                    final["baseline"],
                    final["value"],
                    final["forgetting"],
                    final["retention"],
                    worst["forgetting"],
                    worst["step"],
                ]
            )
            curves.append(
                Curve(
                    title=f"{probe}/{metric}",
                    lines={metric: [(r["step"], r["value"]) for r in records]},
                    baseline=final["baseline"],
                    ylabel=f"{metric} ({'higher' if final['higher_is_better'] else 'lower'} is better)",
                    boundaries=list(self._stage_starts),
                )
            )
        final_step = self._history[-1]["step"] if self._history else 0
        summary = Table(
            title=f"Forgetting at step {final_step} (positive = worse than pre-trained)",
            headers=[
                "probe",
                "metric",
                "better",
                "pre-trained",
                "final",
                "forgetting",
                "retention",
                "worst",
                "at step",
            ],
            rows=summary_rows,
        )
        history = Table(
            title="Every measurement",
            headers=["step", "trigger", "probe", "metric", "value", "forgetting", "retention", "seconds"],
            rows=[
                [r[k] for k in ("step", "trigger", "probe", "metric", "value", "forgetting", "retention", "seconds")]
                for r in self._history
            ],
        )
        evaluations = len({(r["step"], r["probe"]) for r in self._history})
        return ReportSection(
            key="forgetting",
            title="Forgetting of the pre-trained model's capabilities",
            records=self.history,
            summary=[summary],
            history=[history],
            curves=curves,
            meta={
                "baselines": self.baselines,
                "metric_names": ["probe/<probe>/<metric>", "forgetting/<probe>/<metric>", "retention/<probe>/<metric>"],
                "probe_evaluations": evaluations,
                "evaluation_seconds": self._seconds,
            },
        )
