r"""
Parameter drift
^^^^^^^^^^^^^^^

How far fine-tuning has moved the weights from the pre-trained ones: relative L2 distance, share of entries changed
and largest change, overall and per parameter role, top-level module and transformer block. These are the figures
behind the MoFO paper's "keeping parameters closer to the pre-trained model".
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from lit_mofo._validation import as_bool, as_device, as_dtype, as_int
from lit_mofo.adapters import LoraWeight, adapter_values, checked_lora_weights, effective_name
from lit_mofo.blocks import detect_layout
from lit_mofo.params import WORDS, check_patterns, check_trainable, initial_requires_grad, parameter_words, select_names
from lit_mofo.report import Curve, FitReport, ReportSection, Table
from lit_mofo.snapshot import PretrainedSnapshot, StageStartSnapshot
from lit_mofo.strategy import StrategyAdapter

__all__ = ["DriftStats", "ParameterDrift", "top_level_modules"]


@dataclass
class DriftStats:
    """Sums over a group of tensors, from which the figures follow.

    Attributes:
        sq_diff: ``sum ||θ - θ₀||²``. sq_ref: ``sum ||θ₀||²``. changed: entries with ``θ != θ₀``.
        numel: entries. max_abs: ``max |θ - θ₀|``.
    """

    sq_diff: float = 0.0
    sq_ref: float = 0.0
    changed: int = 0
    numel: int = 0
    max_abs: float = 0.0

    def add(self, other: DriftStats) -> None:
        self.sq_diff += other.sq_diff
        self.sq_ref += other.sq_ref
        self.changed += other.changed
        self.numel += other.numel
        self.max_abs = max(self.max_abs, other.max_abs)

    @property
    def relative_l2(self) -> float:
        """``||θ - θ₀|| / ||θ₀||`` over the group (``nan`` when ``θ₀`` is all zeros and θ moved, 0 if neither)."""
        if self.sq_ref == 0:
            return 0.0 if self.sq_diff == 0 else math.nan
        return math.sqrt(self.sq_diff / self.sq_ref)

    @property
    def fraction_changed(self) -> float:
        """Share of the entries that differ from θ₀ at all (exactly, not within a tolerance)."""
        return self.changed / self.numel if self.numel else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "relative_l2": self.relative_l2,
            "fraction_changed": self.fraction_changed,
            "max_abs_change": self.max_abs,
            "numel": self.numel,
            "changed": self.changed,
            "l2_distance": math.sqrt(self.sq_diff),
            "l2_pretrained": math.sqrt(self.sq_ref),
        }


def top_level_modules(root: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Map each parameter name to its top-level module: the children of ``root``, looking through wrappers — while
    only one child holds parameters (a LightningModule around a transformers model around its base model...), the
    children of that child are taken instead. A parameter directly on such a level is its own module."""
    prefix, module = "", root
    while True:
        children = [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]
        own = any(True for _ in module.parameters(recurse=False))
        if len(children) != 1 or own:
            break
        name, module = children[0]
        prefix = f"{prefix}{name}."
    mapping = {}
    for name in names:
        rest = name[len(prefix) :] if name.startswith(prefix) else name
        head, _, tail = rest.partition(".")
        mapping[name] = f"{prefix}{head}" if tail else name
    return mapping


class ParameterDrift(Callback):
    r"""Log how far the weights have drifted from the pre-trained ones, every N steps and at the end of fit.

    For the selected parameters (all by default), with θ₀ their values before the first optimizer step:

    - ``drift/relative_l2``: ``||θ - θ₀|| / ||θ₀||`` over all of them (one long vector);
    - ``drift/relative_l2/<role>``: the same per role — ``attention``, ``ffn``, ``router``, ``ssm``, ``norm``,
      ``embedding``, ``head``, ``other`` — as :func:`lit_mofo.blocks.parameter_roles` assigns them (the
      categorisation Half Fine-Tuning uses; a role appears when the model has parameters of it);
    - ``drift/relative_l2/module/<name>``: per top-level module (see :func:`top_level_modules`, e.g.
      ``model.model`` and ``model.lm_head`` for a Llama inside a LightningModule);
    - ``drift/relative_l2/block/<i>``: per transformer block, in :func:`lit_mofo.blocks.detect_layout` order;
    - ``drift/fraction_changed`` (and ``/<role>``): the share of entries with ``θ != θ₀`` — exactly, so it shows
      MoFO's sparse updates (a few % per step, accumulating) against AdamW's (every entry from the first step);
    - ``drift/max_abs_change`` (and ``/<role>``): ``max |θ - θ₀|``.

    They go to every logger (``step=trainer.global_step``) and to ``trainer.callback_metrics``. The step-0 values
    (all 0) are recorded at the start of training. At the end of fit the figures join the report of
    :mod:`lit_mofo.report` (``forgetting_report.{json,md,png}`` in ``trainer.log_dir``, shared with
    :class:`~lit_mofo.callbacks.forgetting_monitor.ForgettingMonitor`), with the optimizer in its header: a MoFO run
    and an AdamW run side by side show the difference at a glance.

    θ₀ lives in the shared :class:`~lit_mofo.snapshot.PretrainedSnapshot` (on the CPU, one copy per module, shared
    with Half Fine-Tuning's resets and L2ToPretrained) and is saved in checkpoints, so a resumed fit still measures
    against the pre-trained weights.

    **Frozen tensors are measured too.** The selection does not look at ``requires_grad``: tensors frozen by Half
    Fine-Tuning (which may train after a re-draw) and tensors the module froze itself are measured like the others;
    the ones that never train show 0 drift and count in the overall and per-role figures, so runs that train
    different subsets of one model (full fine-tuning, HFT, a frozen embedding) are compared on the same
    denominator, and a tensor that other code unfreezes later in the fit is measured from θ₀. The selection is
    therefore the same whatever the order of the callbacks. To save the snapshot memory of a large frozen part
    (a frozen base under adapters), leave it out with ``exclude``. A module with no trainable parameter at all
    is refused at the start of fit.

    **LoRA and other PEFT models.** On a model with LoRA adapters (e.g. :class:`~lit_mofo.modules.CausalLMModule`
    with ``peft=LoraConfig(...)``) the drift is that of the *effective* weights ``W + scale·B·A``, the weights the
    model computes with, against θ₀ — exactly what the same measurement gives on the merged model
    (``merge_and_unload``), under the merged model's names (``...q_proj.weight``, not
    ``...q_proj.base_layer.weight``; patterns in ``include``/``exclude`` are matched against those names) and in
    the same roles, modules and blocks; the adapter tensors A and B are not reported on their own. Only the adapter
    tensors (and whatever else trains) are copied into the snapshot: tensors frozen at the start of fit (the whole
    pre-trained base, under PEFT) are their own θ₀, since the adapters are all that moves; they still count in the
    denominators. DoRA and other adapter kinds (IA³, LoHa, LoKr, OFT...) are refused at the start of fit: merge
    them (``CausalLMModule.merged_model()``) and measure the merged model. Cost: one ``B·A`` product per adapted
    matrix and measurement.

    Cost: per evaluation one pass over the selected parameters (θ₀ copied tensor by tensor to ``device``), no
    forward pass; memory: the snapshot (one copy of the parameters in ``snapshot_dtype`` on the CPU).

    **Continual runs** (:mod:`lit_mofo.continual`): the figures above stay against θ₀, the weights before stage 1,
    across all stages; besides, the drift *within the current stage* — from the weights it started from (the
    :class:`~lit_mofo.snapshot.StageStartSnapshot`, one more copy of the selected tensors) — is measured at the
    same times and at every stage start (0) and end, and logged as ``drift/stage/relative_l2``,
    ``drift/stage/fraction_changed``, ``drift/stage/max_abs_change`` and ``drift/stage/relative_l2/<role>``. The
    report adds a table of each stage's drift at its end and the curves mark the stage boundaries.

    **Strategies.** Under DDP every process holds the same weights, so each computes the same figures without
    communication; rank zero logs and writes. Under FSDP2 (Lightning's ``ModelParallelStrategy`` with
    ``tensor_parallel_size=1``, the module sharding itself as :class:`~lit_mofo.modules.CausalLMModule` does) each
    process measures its own shards against its shards of θ₀ (the snapshot costs 1/world-size of a whole copy per
    process) and the per-tensor sums and maxima are reduced across the mesh, two all-reduces per measurement: counts
    (``changed``, ``numel``) and ``max_abs_change`` equal a single process's exactly, the L2 figures to float32
    rounding (each shard's sum of squares is added up in float32, then the shards' sums in float64: relative
    differences of ~1e-7).

    .. warning:: DeepSpeed, FSDP1 (``strategy="fsdp"``), tensor parallelism and XLA are refused in ``setup`` with
        the fix: no process holds a tensor or a dimension-0 shard of it there. Use
        ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` or ``strategy="ddp"``.

    Args:
        every_n_train_steps: compute after every N-th optimizer step, an integer >= 0; None or 0 only at the end of
            fit.
        include: parameters to measure: a pattern or a list of them, each a word of :data:`lit_mofo.params.WORDS`
            - a role (``"attention"``, ``"ffn"``, ``"router"``, ``"ssm"``, ``"norm"``, ``"embedding"``, ``"head"``,
            ``"other"``) or a kind (``"weight"``, ``"bias"``) - or a regular expression written ``"re:<regex>"``,
            searched in parameter names (one string is one pattern; see :mod:`lit_mofo.params`); None selects all.
            A pattern that matches nothing is warned about; a selection of nothing is refused at the start of fit.
        exclude: parameters to leave out, in the same form.
        snapshot_dtype: dtype of the stored θ₀ (``"float32"``, ``"bfloat16"``, ``"bf16"``, ``torch.float16``, ...);
            None keeps each parameter's dtype, which keeps ``fraction_changed`` exact. A narrower dtype than the
            parameters' saves memory but makes rounding look like change.
        device: where the differences are computed (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``); None
            uses each parameter's device. A device this machine lacks is refused at construction.
        report: add the drift section to the end-of-fit report.
        report_dir: directory for the report files; None uses ``trainer.log_dir``.

    Example::

        trainer = Trainer(callbacks=[ParameterDrift(every_n_train_steps=50)], max_steps=1000)
        # then compare drift/fraction_changed of a MoFO run with an AdamW run
    """

    def __init__(
        self,
        every_n_train_steps: int | None = 50,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] = (),
        snapshot_dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        report: bool = True,
        report_dir: str | None = None,
    ) -> None:
        where, error = "ParameterDrift()", MisconfigurationException
        if every_n_train_steps is not None:
            every_n_train_steps = as_int(
                every_n_train_steps,
                where=where,
                argument="every_n_train_steps",
                minimum=0,
                fix="Or None / 0 to measure only at the end of fit.",
                error=error,
            )
        include = check_patterns(include, where=where, argument="include", error=error)
        exclude = check_patterns(exclude, where=where, argument="exclude", error=error) or ()
        if report_dir is not None and not isinstance(report_dir, (str, os.PathLike)):
            raise MisconfigurationException(
                f"{where}: report_dir={report_dir!r} is invalid; the valid range is a directory path (str or "
                "os.PathLike), or None for trainer.log_dir."
            )
        self.every_n_train_steps = every_n_train_steps or 0
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude)
        self.snapshot_dtype = as_dtype(snapshot_dtype, where=where, argument="snapshot_dtype", error=error)
        self.device = as_device(device, where=where, argument="device", error=error)
        self.report = as_bool(report, where=where, argument="report", error=error)
        self.report_dir = report_dir
        self._names: list[str] = []
        self._labels: dict[str, str] = {}
        self._lora: dict[str, LoraWeight] = {}
        self._roles: dict[str, str] = {}
        self._modules: dict[str, str] = {}
        self._blocks: dict[str, int] = {}
        self._block_names: list[str] = []
        self._history: list[dict[str, Any]] = []
        self._last_step: int | None = None
        self._restored = False
        self._adapter = StrategyAdapter("single")
        self._continual = False  # a lit_mofo.continual run: also the drift within each stage
        self._stage: tuple[int, str] = (1, "")  # (number, name) of the current stage
        self._stage_history: list[dict[str, Any]] = []
        self._stage_starts: list[tuple[int, str]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every measurement: dicts with ``step``, ``scope`` (``overall``/``role``/``module``/``block``), ``group``
        and the figures of :meth:`DriftStats.as_dict`."""
        return [dict(record) for record in self._history]

    @property
    def stage_history(self) -> list[dict[str, Any]]:
        """In a continual run, every measurement of the drift within the current stage: dicts with ``step``,
        ``stage`` (its number, 1-based), ``stage_name``, ``scope`` (``overall``/``role``), ``group`` and the
        figures of :meth:`DriftStats.as_dict`."""
        return [dict(record) for record in self._stage_history]

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        self._adapter = StrategyAdapter.of(trainer, user=type(self).__name__)
        if self.report:
            FitReport.attach(trainer, self, self.report_dir)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_trainable(pl_module, where="ParameterDrift", error=MisconfigurationException)
        lora = checked_lora_weights(pl_module, user=type(self).__name__, what="measures", sharded=self._adapter.sharded)
        adapter_tensors = {name for weight in lora.values() for name in weight.adapters}
        # A LoRA model is measured on its effective weights: the adapter tensors are part of them, not on their own.
        layout = detect_layout(pl_module)
        all_roles = layout.roles()
        words = {
            name: words for name, words in parameter_words(pl_module, all_roles).items() if name not in adapter_tensors
        }
        roles = {name: all_roles[name] for name in words}
        labels = {name: effective_name(name) for name in roles} if lora else {name: name for name in roles}
        by_label = select_names(
            {labels[name]: words[name] for name in roles}, self.include, self.exclude, where="ParameterDrift()"
        )
        real = {label: name for name, label in labels.items()}
        names = [real[label] for label in by_label]
        if not names:
            raise MisconfigurationException(
                f"ParameterDrift(include={self.include!r}, exclude={self.exclude!r}) selects no parameter of "
                f"{type(pl_module).__name__}. Patterns are words of {list(WORDS)} (roles and kinds, see "
                "lit_mofo.params) or regular expressions written re:<regex>, searched in parameter names; widen "
                "`include` or narrow `exclude`."
            )
        self._names = names
        self._labels = {name: labels[name] for name in names}
        self._lora = {name: lora[name] for name in names if name in lora}
        self._roles = {name: roles[name] for name in names}
        self._modules = {
            name: effective_name(m) if lora else m for name, m in top_level_modules(pl_module, names).items()
        }
        self._block_names = [effective_name(block.name) if lora else block.name for block in layout.blocks]
        self._blocks = {}
        for index, block in enumerate(layout.blocks):
            for name in block.parameters:
                self._blocks[name] = index
        captured = names
        if lora:  # PEFT: the adapters and whatever trains; the frozen base is its own θ₀ (see the class docstring)
            trainable = initial_requires_grad(pl_module)
            captured = [name for name in names if trainable.get(name, False)]
            captured += [adapter for name in names if name in lora for adapter in lora[name].adapters]
        snapshot = PretrainedSnapshot.attach(pl_module, owner=self)
        snapshot.capture(trainer, pl_module, captured, dtype=self.snapshot_dtype)
        from lit_mofo.continual.callback import continual_learning  # here: lit_mofo.continual imports the callbacks

        self._continual = continual_learning(trainer) is not None
        if self._continual:
            stage_start = StageStartSnapshot.attach(pl_module, owner=self)
            stage_start.capture(trainer, pl_module, captured, dtype=self.snapshot_dtype)
        if not self._restored:
            self._history, self._last_step = [], None
            self._stage_history, self._stage_starts, self._stage = [], [], (1, "")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._restored:
            self._measure(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0:
            self._measure(trainer, pl_module)

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
        """The stage protocol (:class:`lit_mofo.continual.StageCallback`): from here on the drift within the stage is
        measured from its start (the stage-start snapshot, retaken just before); its first point, 0, is recorded."""
        if stage.resumed:
            return
        self._stage = (stage.number, stage.name)
        if (trainer.global_step, stage.name) not in self._stage_starts:
            self._stage_starts.append((trainer.global_step, stage.name))
        if self._continual:
            self._record_stage(trainer, self.compute(pl_module, reference="stage_start"))

    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
        """The stage protocol: the drift at the stage's last step (once per step)."""
        self._measure(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measure(trainer, pl_module)
        if self.report:
            FitReport.attach(trainer, self, self.report_dir).submit(trainer, self, self.report_section())

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        PretrainedSnapshot.save_to(pl_module, checkpoint, trainer)
        StageStartSnapshot.save_to(pl_module, checkpoint, trainer)  # a continual run's (nothing otherwise)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        PretrainedSnapshot.on_load_checkpoint(pl_module, checkpoint, owner=self, trainer=trainer)
        if StageStartSnapshot.CHECKPOINT_KEY in checkpoint or StageStartSnapshot.get(pl_module) is not None:
            StageStartSnapshot.on_load_checkpoint(pl_module, checkpoint, owner=self, trainer=trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        PretrainedSnapshot.detach(pl_module, owner=self)
        StageStartSnapshot.detach(pl_module, owner=self)
        FitReport.detach(trainer, self)
        self._restored = False

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": self.history, "last_step": self._last_step}
        if self._continual:
            state.update(
                stage_history=self.stage_history, stage_starts=[list(s) for s in self._stage_starts], stage=self._stage
            )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._history = [dict(record) for record in state_dict["history"]]
        self._last_step = state_dict["last_step"]
        self._stage_history = [dict(record) for record in state_dict.get("stage_history", [])]
        self._stage_starts = [(int(step), str(name)) for step, name in state_dict.get("stage_starts", [])]
        number, name = state_dict.get("stage", (1, ""))
        self._stage = (int(number), str(name))
        self._restored = True

    # ------------------------------------------------------------------ measurement
    def compute(self, pl_module: nn.Module, reference: str = "pretrained") -> dict[str, dict[str, DriftStats]]:
        """The drift of ``pl_module`` from the snapshot now: ``{scope: {group: stats}}`` with scopes ``overall``
        (group ``all``), ``role``, ``module`` and ``block`` (groups are block indices as strings). ``reference``:
        ``"pretrained"`` (θ₀) or, in a continual run, ``"stage_start"`` (the current stage's start)."""
        snapshot = (StageStartSnapshot if reference == "stage_start" else PretrainedSnapshot).get(pl_module)
        if snapshot is None:
            raise RuntimeError(
                f"ParameterDrift.compute(reference={reference!r}) needs that snapshot: call it during fit (a continual "
                "run's, for 'stage_start')."
            )
        params = StrategyAdapter.named_parameters(pl_module)  # FSDP2: the shards, also after an evaluation
        adapter = self._adapter

        def pair(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            """(the weight now, θ₀) of one selected tensor: for a LoRA-adapted matrix its effective weights."""
            weight = self._lora.get(name)
            if weight is None:
                local = adapter.local(params[name])
                return local, snapshot[name] if name in snapshot else local
            theta0 = {adapter_name: snapshot[adapter_name] for adapter_name in weight.adapters}
            with adapter_values(params, theta0):  # the layer as it started: its adapters at θ₀
                start = weight.effective(base=snapshot[name] if name in snapshot else None)
            return weight.effective(), start

        with torch.no_grad():
            sums, maxima = zip(*(_local_sums(*pair(name), self.device) for name in self._names), strict=True)
            # Per tensor: the shards' sums and maxima over the mesh (FSDP2); one collective each, whatever the count.
            summed = adapter.sum_over_shards(torch.stack(sums)).tolist()
            largest = adapter.max_over_shards(torch.stack(maxima)).tolist()
        groups: dict[str, dict[str, DriftStats]] = {"overall": {}, "role": {}, "module": {}, "block": {}}
        for index, name in enumerate(self._names):
            sq_diff, sq_ref, changed = summed[index]
            stats = DriftStats(sq_diff, sq_ref, int(changed), params[name].numel(), largest[index])
            keys = [("overall", "all"), ("role", self._roles[name]), ("module", self._modules[name])]
            if name in self._blocks:
                keys.append(("block", str(self._blocks[name])))
            for scope, group in keys:
                groups[scope].setdefault(group, DriftStats()).add(stats)
        return groups

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        groups = self.compute(pl_module)
        metrics: dict[str, float] = {}
        for scope, by_group in groups.items():
            for group, stats in by_group.items():
                self._history.append({"step": step, "scope": scope, "group": group, **stats.as_dict()})
                if scope == "overall":
                    metrics["drift/relative_l2"] = stats.relative_l2
                    metrics["drift/fraction_changed"] = stats.fraction_changed
                    metrics["drift/max_abs_change"] = stats.max_abs
                elif scope == "role":
                    metrics[f"drift/relative_l2/{group}"] = stats.relative_l2
                    metrics[f"drift/fraction_changed/{group}"] = stats.fraction_changed
                    metrics[f"drift/max_abs_change/{group}"] = stats.max_abs
                else:
                    metrics[f"drift/relative_l2/{scope}/{group}"] = stats.relative_l2
        if self._continual:
            metrics.update(self._record_stage(trainer, self.compute(pl_module, reference="stage_start"), log=False))
            metrics["continual/stage"] = float(self._stage[0])  # the logged row says which stage it belongs to
        trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _record_stage(
        self, trainer: pl.Trainer, groups: dict[str, dict[str, DriftStats]], log: bool = True
    ) -> dict[str, float]:
        """Record (and log, or return to be logged) the drift within the current stage."""
        step = trainer.global_step
        number, name = self._stage
        metrics: dict[str, float] = {}
        last = self._stage_history[-1] if self._stage_history else None
        if last is not None and (last["step"], last["stage"]) == (step, number):
            return metrics  # measured at this step already (the stage start and on_train_start, in either order)
        for scope in ("overall", "role"):
            for group, stats in groups[scope].items():
                self._stage_history.append(
                    {
                        "step": step,
                        "stage": number,
                        "stage_name": name,
                        "scope": scope,
                        "group": group,
                        **stats.as_dict(),
                    }
                )
                if scope == "overall":
                    metrics["drift/stage/relative_l2"] = stats.relative_l2
                    metrics["drift/stage/fraction_changed"] = stats.fraction_changed
                    metrics["drift/stage/max_abs_change"] = stats.max_abs
                else:
                    metrics[f"drift/stage/relative_l2/{group}"] = stats.relative_l2
        if log:
            metrics["continual/stage"] = float(number)
            trainer.callback_metrics.update({key: torch.tensor(value) for key, value in metrics.items()})
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=step)
        return metrics

    # ------------------------------------------------------------------ report
    def report_section(self) -> ReportSection:
        """This callback's part of the end-of-fit report (see :mod:`lit_mofo.report`)."""
        if not self._history:
            return ReportSection(key="drift", title="Parameter drift from the pre-trained model", records=[])
        final_step = self._history[-1]["step"]
        final = [r for r in self._history if r["step"] == final_step]
        order = {"overall": 0, "role": 1, "module": 2, "block": 3}
        final.sort(key=lambda r: order[r["scope"]])

        def label(record: dict[str, Any]) -> str:
            if record["scope"] == "block":
                return f"{record['group']} ({self._block_names[int(record['group'])]})"
            return record["group"]

        def scope_table(title: str, scopes: tuple[str, ...]) -> Table:
            return Table(
                title=title,
                headers=["scope", "group", "relative L2", "changed", "max |Δ|", "entries"],
                rows=[
                    [r["scope"], label(r), r["relative_l2"], r["fraction_changed"], r["max_abs_change"], r["numel"]]
                    for r in final
                    if r["scope"] in scopes
                ],
            )

        summary = scope_table(f"Parameter drift from the pre-trained model at step {final_step}", ("overall", "role"))
        detail = scope_table(f"Drift per module and block at step {final_step}", ("module", "block"))
        overall = [r for r in self._history if r["scope"] == "overall"]
        history = Table(
            title="Overall drift at every measurement",
            headers=["step", "relative L2", "changed", "max |Δ|"],
            rows=[[r["step"], r["relative_l2"], r["fraction_changed"], r["max_abs_change"]] for r in overall],
        )
        roles = [r["group"] for r in final if r["scope"] == "role"]

        def lines(field: str) -> dict[str, list[tuple[int, float]]]:
            out = {"all": [(r["step"], r[field]) for r in overall]}
            for role in roles:
                out[role] = [
                    (r["step"], r[field]) for r in self._history if r["scope"] == "role" and r["group"] == role
                ]
            return out

        boundaries = list(self._stage_starts)
        curves = [
            Curve(
                "drift: ||θ-θ₀|| / ||θ₀||",
                lines("relative_l2"),
                baseline=0.0,
                ylabel="relative L2",
                boundaries=boundaries,
            ),
            Curve(
                "drift: share of entries changed",
                lines("fraction_changed"),
                baseline=0.0,
                ylabel="fraction",
                boundaries=boundaries,
            ),
        ]
        summary_tables = [summary]
        if self._stage_history:
            within = [r for r in self._stage_history if r["scope"] == "overall"]
            ends: dict[int, dict[str, Any]] = {}
            for record in within:
                ends[record["stage"]] = record  # the last measurement of each stage
            summary_tables.append(
                Table(
                    title="Drift within each stage, from the weights it started from (at its last measurement)",
                    headers=["stage", "name", "at step", "relative L2", "changed", "max |Δ|"],
                    rows=[
                        [n, r["stage_name"], r["step"], r["relative_l2"], r["fraction_changed"], r["max_abs_change"]]
                        for n, r in sorted(ends.items())
                    ],
                )
            )
            curves.append(
                Curve(
                    "drift within the stage: ||θ-θ_stage start|| / ||θ_stage start||",
                    {
                        f"{n} {name}": [(r["step"], r["relative_l2"]) for r in within if r["stage"] == n]
                        for n, name in sorted({(r["stage"], r["stage_name"]) for r in within})
                    },
                    baseline=0.0,
                    ylabel="relative L2",
                    boundaries=boundaries,
                )
            )
        return ReportSection(
            key="drift",
            title="Parameter drift from the pre-trained model",
            records=self.history,
            summary=summary_tables,
            history=[detail, history],
            curves=curves,
            meta={
                "metric_names": [
                    "drift/relative_l2",
                    "drift/relative_l2/<role>",
                    "drift/relative_l2/module/<name>",
                    "drift/relative_l2/block/<index>",
                    "drift/fraction_changed[/<role>]",
                    "drift/max_abs_change[/<role>]",
                ],
                "blocks": self._block_names,
                **({"stage_drift": self.stage_history, "stage_starts": self._stage_starts} if self._continual else {}),
            },
        )


def _local_sums(
    param: torch.Tensor, theta0: torch.Tensor, device: torch.device | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``([sum (θ-θ₀)², sum θ₀², entries with θ != θ₀], max |θ-θ₀|)`` of one tensor (or one shard of it), in float64
    on the CPU; the sums are taken in the tensors' dtype (at least float32) and then widened."""
    target = device if device is not None else param.device
    dtype = param.dtype if torch.finfo(param.dtype).bits >= torch.finfo(theta0.dtype).bits else theta0.dtype
    if torch.finfo(dtype).bits < 32:
        dtype = torch.float32  # exact for bf16/fp16 values, and no overflow in the squares
    current = param.detach().to(device=target, dtype=dtype)
    reference = theta0.to(device=target, dtype=dtype)
    diff = current - reference
    changed = (current != reference).sum()
    sums = torch.stack([diff.pow(2).sum().double(), reference.pow(2).sum().double(), changed.double()])
    largest = diff.abs().max().double() if diff.numel() else torch.zeros((), dtype=torch.float64, device=target)
    return sums.cpu(), largest.cpu()
