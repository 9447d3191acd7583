r"""MoFO as a callback: the same run, but momentum-filtered.

:class:`MoFOCallback` leaves the LightningModule untouched. At the start of fit, once the strategy has built the
module's optimizers, it replaces every :class:`torch.optim.Adam` / :class:`torch.optim.AdamW` by the equivalent
:class:`~lit_mofo.MoFO` (same param groups, hyper-parameters and state) and points the learning-rate schedulers and
Lightning's optimizer wrappers at it, so ``configure_optimizers`` — or LightningCLI's ``optimizer:`` block — keeps
deciding the optimizer, the schedule and the param groups.
"""

from __future__ import annotations

import inspect
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import wraps
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.core.optimizer import _MockOptimizer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Adam, AdamW, Optimizer
from torch.optim.lr_scheduler import LRScheduler
from typing_extensions import override

from lit_mofo.optim.mofo import MoFO, _validate_hyperparameters
from lit_mofo.params import (
    check_patterns,
    check_trainable,
    initial_requires_grad,
    matching_patterns,
    parameter_words,
    warn_unmatched,
)
from lit_mofo.strategy import StrategyAdapter

__all__ = ["MoFOCallback"]

# The hyper-parameters Adam(W) and MoFO share with the same meaning (weight decay in AdamW's decoupled form).
_SHARED = ("lr", "betas", "eps", "weight_decay")
# Adam's implementation flags (amsgrad, foreach, maximize, capturable, differentiable, fused, ...): dropped from the
# groups on conversion, after the ones that change the maths have been refused.
_ADAM_ONLY = tuple(
    name for name in inspect.signature(Adam.__init__).parameters if name not in ("self", "params", *_SHARED)
)
# Flags of Adam with no MoFO counterpart: a group setting one is refused, with the fix.
_REFUSED_FLAGS = {
    "amsgrad": "MoFO has no AMSGrad variant; set amsgrad=False.",
    "maximize": "MoFO minimizes; set maximize=False and return the negated objective from training_step.",
    "capturable": "MoFO's step is not CUDA-graph capturable; set capturable=False.",
    "differentiable": "MoFO's step is not differentiable (the top-k selection has no gradient); "
    "set differentiable=False.",
}
_SUPPORTED = (
    "torch.optim.Adam and torch.optim.AdamW (amsgrad, maximize, capturable and differentiable off; weight decay only "
    "in AdamW's decoupled form)"
)
# MoFO's options that the callback passes on only when set, so MoFO's own defaults apply otherwise.
_FORWARDED = ("selection", "fused", "sample_size", "seed", "nonfinite", "master_weights")
_Named = tuple[str, frozenset[str], bool]  # qualified name, its words (lit_mofo.params), trainable at fit start


class MoFOCallback(Callback):
    r"""Replace the module's Adam/AdamW by :class:`~lit_mofo.MoFO` at the start of fit: the same run, momentum-filtered.

    Add it to the Trainer and keep ``configure_optimizers`` as it is. In ``on_fit_start`` — after the strategy has
    built the optimizers and before a checkpoint's optimizer states are restored — every :class:`torch.optim.Adam`
    and :class:`torch.optim.AdamW` of the module becomes a :class:`~lit_mofo.MoFO` with

    * the same param groups, in the same order, with every key they carry (``lr``, ``initial_lr`` set by a scheduler,
      ``param_names``, a ``name`` of your own, ...); Adam's implementation flags (``foreach``, ``fused``, ...) are
      dropped — they choose a kernel, not the maths;
    * the same ``lr``, ``betas``, ``eps`` and ``weight_decay`` (AdamW's default 0.01 stays 0.01: MoFO's decay is
      AdamW's decoupled decay, applied to the selected entries only);
    * MoFO's own options from this callback: ``fraction`` and ``filter_min_ndim`` in every group (a group that already
      carries a ``fraction`` or ``filter_min_ndim`` key keeps it), ``fraction=None`` in the groups named by ``dense``;
    * the same state (``step``, ``exp_avg``, ``exp_avg_sq``) if the optimizer already has some, with the moments of
      float16/bfloat16 parameters in float32 as MoFO keeps them.

    Learning-rate schedulers (``trainer.lr_scheduler_configs``, nested ones of ``SequentialLR``/``ChainedScheduler``
    included), ``trainer.optimizers``, the :class:`~lightning.pytorch.core.optimizer.LightningOptimizer` wrappers
    returned by ``self.optimizers()`` and the schedulers' "``optimizer.step()`` was called" tracking all move to the
    new optimizer, so schedules go on exactly as before and manual optimization (``automatic_optimization = False``)
    works too — as long as ``training_step`` uses ``self.optimizers()`` / ``self.lr_schedulers()`` rather than an
    optimizer it kept from ``configure_optimizers``. Optimizers that already are :class:`~lit_mofo.MoFO` are left
    alone.

    Refused with a :class:`~lightning.pytorch.utilities.exceptions.MisconfigurationException` that names the fix:
    any other optimizer (SGD, Adafactor, bitsandbytes' 8-bit Adam, ``ZeroRedundancyOptimizer``, subclasses of Adam,
    which may change the update), Adam's ``weight_decay > 0`` without ``decoupled_weight_decay=True`` (an L2 term added
    to the gradient, which goes through the moments: not MoFO's decay — use :class:`torch.optim.AdamW`), ``amsgrad``,
    ``maximize``, ``capturable``, ``differentiable``, and ``dense`` patterns that would split a param group (see
    ``dense`` below).

    **Resuming.** Checkpoints hold MoFO's state. Keep the callback when resuming: with it, the run continues
    bit-identically (the module builds AdamW, the callback converts it, then Lightning restores the MoFO state into
    it). Without it the module's AdamW loads the state and the run silently continues as dense AdamW — Lightning
    only warns that the checkpoint was written with a ``MoFOCallback`` that is missing. A checkpoint of a plain
    Adam/AdamW run can be resumed *with* the callback: its moments and step counts carry over into MoFO, exactly as
    if the AdamW had been restored first and converted afterwards. When a checkpoint's MoFO groups were trained with
    other MoFO options than the callback now sets (e.g. another ``fraction``), the callback's options win, with a
    warning; ``lr``, ``betas``, ``eps`` and ``weight_decay`` come from the checkpoint, as for any optimizer.

    A module with no trainable parameter is refused at the start of fit, before backward would fail.

    **LoRA and other PEFT models**: the optimizer holds the adapter tensors only, and so does the MoFO it becomes:
    the filter picks the entries of each adapter matrix (each LoRA A and B, separately) with the largest momentum,
    not entries of the effective weights ``W + scale·B·A`` (an update of a few entries of B changes whole rows of
    B·A). Keep ``filter_min_ndim=2`` so that the matrices are filtered; measure what moved with
    :class:`~lit_mofo.ParameterDrift`, which reports the effective weights.

    **Strategies**: a single device, DDP (``strategy="ddp"``, spawn/fork/notebook variants: every rank holds whole
    tensors and the same all-reduced gradients, so the ranks select the same entries) and FSDP2 (Lightning's
    ``ModelParallelStrategy`` with ``tensor_parallel_size=1``, the module sharding itself in ``configure_model`` as
    :class:`~lit_mofo.modules.CausalLMModule` does): the optimizer over DTensor parameters becomes a MoFO that agrees
    each tensor's threshold across the mesh (see :class:`~lit_mofo.MoFO`), so a sharded run moves exactly the entries
    a single process would. There the strategy restores a checkpoint's optimizer states after ``on_fit_start``, so
    the conversion still comes first and the sharded MoFO state is loaded into the MoFO.

    .. warning:: DeepSpeed (it builds and partitions its own optimizer), FSDP1 (``strategy="fsdp"``: a rank holds
       flattened slices, so the top-k would be per slice), tensor parallelism (a 2-D mesh) and XLA are refused in
       ``setup`` with the fix: ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)`` or
       ``strategy="ddp"``.

    Args:
        fraction: MoFO's :math:`\alpha`, the share of each filtered tensor's entries moved per step, in (0, 1]; the
            paper's setting is 0.15 (5-20% all work). ``None`` gives every tensor the dense Adam step.
        filter_min_ndim: tensors with fewer dimensions take the dense step; >= 0. The default 2 steps biases and norm
            weights densely, as the paper's reference code does; 0 filters every tensor.
        dense: param groups whose filtered tensors take the dense step: a pattern or a list of them, each a word of
            :data:`lit_mofo.params.WORDS` (a kind - ``"bias"``, ``"norm"``, ``"embedding"``, ``"weight"`` - or a
            role - ``"attention"``, ``"ffn"``, ``"router"``, ``"ssm"``, ``"head"``, ``"other"``) or a regular
            expression written ``"re:<regex>"``, searched in the parameter's qualified name (e.g.
            ``"re:lm_head"``; one string is one pattern; see :mod:`lit_mofo.params`). MoFO chooses
            the dense step per param group, so a group's trainable filtered tensors (``ndim >= filter_min_ndim``)
            must be named all or none: splitting a group would change the group count that schedulers' per-group
            lists, checkpoints and loggers rely on, so that is refused — give those parameters their own group in
            ``configure_optimizers`` instead. Tensors the module froze (``requires_grad=False`` at the start of
            fit, see :func:`lit_mofo.params.initial_requires_grad`) take no step either way and do not count;
            tensors frozen by :class:`~lit_mofo.HalfFineTuning` do, since a re-draw may train them.
        selection: MoFO's ``selection`` (``"exact"`` or ``"sampled"``: how the threshold is found).
        fused: MoFO's ``fused`` (``None`` uses the fused kernels where they apply, ``True`` requires them, ``False``
            uses torch operations).
        sample_size: MoFO's ``sample_size`` (entries sampled by the ``"sampled"`` selection).
        seed: MoFO's ``seed`` (of the hashed sample positions).
        nonfinite: MoFO's ``nonfinite`` (``"skip"``: entries with a NaN/inf gradient keep their moments and weight
            that step; ``"raise"``: the step raises before changing anything).
        master_weights: MoFO's ``master_weights`` (float32 copies of float16/bfloat16 parameters, on by default, so
            that ``precision="bf16-true"`` runs do not round their updates away). With it off, the callback warns
            once at the start of fit when a float16/bfloat16 parameter would be stepped in place.

    The last six are passed to :class:`~lit_mofo.MoFO` only when not ``None``; ``None`` keeps MoFO's default.

    Example::

        from lit_mofo.callbacks.mofo_callback import MoFOCallback

        # configure_optimizers returns AdamW + a cosine schedule, as before
        trainer = Trainer(callbacks=[MoFOCallback(fraction=0.15)])
        trainer.fit(model)

    or in a LightningCLI config (``configs/mofo_callback.yaml``)::

        trainer:
          callbacks:
            - class_path: lit_mofo.callbacks.mofo_callback.MoFOCallback
              init_args:
                fraction: 0.15
    """

    def __init__(
        self,
        fraction: float | None = 0.15,
        filter_min_ndim: int = 2,
        dense: str | Sequence[str] = (),
        selection: str | None = None,
        fused: bool | None = None,
        sample_size: int | None = None,
        seed: int | None = None,
        nonfinite: Literal["skip", "raise"] | None = None,
        master_weights: bool | None = None,
    ) -> None:
        self.fraction = fraction
        self.filter_min_ndim = filter_min_ndim
        self.dense: tuple[str, ...] = (
            check_patterns(dense, where="MoFOCallback()", argument="dense", error=MisconfigurationException) or ()
        )
        self.selection = selection
        self.fused = fused
        self.sample_size = sample_size
        self.seed = seed
        self.nonfinite = nonfinite
        self.master_weights = master_weights
        self._mofo_options: dict[str, Any] = {"fraction": fraction, "filter_min_ndim": filter_min_ndim}
        for name in _FORWARDED:
            if getattr(self, name) is not None:
                self._mofo_options[name] = getattr(self, name)
        self._validate()
        # Indices (in trainer.optimizers) of the optimizers converted in this fit; kept in checkpoints.
        self._converted: list[int] = []

    def _validate(self) -> None:
        signature = inspect.signature(MoFO.__init__).parameters
        for name in _FORWARDED:
            if name in self._mofo_options and name not in signature:
                raise MisconfigurationException(
                    f"MoFOCallback({name}={self._mofo_options[name]!r}): the installed lit_mofo.MoFO has no "
                    f"`{name}` option; leave {name}=None."
                )
        hyperparameters = {
            name: parameter.default
            for name, parameter in signature.items()
            if parameter.default is not inspect.Parameter.empty
        }
        try:
            _validate_hyperparameters({**hyperparameters, **self._mofo_options}, where="MoFOCallback()")
        except (TypeError, ValueError) as err:
            raise MisconfigurationException(str(err)) from err

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        StrategyAdapter.of(trainer, user="MoFOCallback")  # refuses the strategies it does not support, with the fix

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_trainable(pl_module, where="MoFOCallback", error=MisconfigurationException)
        adapter = StrategyAdapter.of(trainer, user="MoFOCallback")
        names = _parameter_names(pl_module)
        replacements: dict[int, tuple[Optimizer, MoFO]] = {}
        # Build every MoFO first: a refused optimizer leaves the Trainer untouched.
        for index, optimizer in enumerate(adapter.optimizers):
            if isinstance(optimizer, _MockOptimizer):  # configure_optimizers returned None
                continue
            if isinstance(optimizer, MoFO):
                rank_zero_info(f"MoFOCallback: optimizer {index} already is {type(optimizer).__name__}; left as it is.")
                continue
            replacements[index] = (optimizer, self._convert(optimizer, names, f"optimizer {index}"))

        if replacements:
            # The filtered tensors the converted optimizers step: what `dense` can name.
            candidates = {
                name: words
                for index, (optimizer, _) in replacements.items()
                for name, words, trainable in self._filtered(optimizer, names)
                if trainable
            }
            warn_unmatched(
                "dense",
                self.dense,
                candidates,
                where="MoFOCallback()",
                scope="name no filtered parameter (ndim >= filter_min_ndim, trainable at the start of fit) of the "
                "converted optimizers",
            )

        by_old = {id(old): new for old, new in replacements.values()}
        for config in adapter.lr_scheduler_configs:
            _repoint(config.scheduler, by_old, seen=set())
        optimizers = adapter.optimizers
        for index, (old, new) in replacements.items():
            optimizers[index] = new
            groups = new.param_groups
            dense = sum(group["fraction"] is None for group in groups)
            rank_zero_info(
                f"MoFOCallback: optimizer {index} ({type(old).__name__}, {len(groups)} param group"
                f"{'s' if len(groups) != 1 else ''}) replaced by lit_mofo.MoFO(fraction={self.fraction}, "
                f"filter_min_ndim={self.filter_min_ndim})"
                + (f"; {dense} group(s) take the dense step." if dense else ".")
            )
        adapter.replace_optimizers(optimizers)
        self._converted = sorted(replacements)
        _warn_low_precision_in_place(optimizers)

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Any) -> None:
        """The stage protocol (:class:`lit_mofo.continual.StageCallback`): every stage of a continual run builds a
        fresh optimizer; convert it as at the start of fit. Its moments start at zero (the papers' fresh optimizer per
        stage) unless ``ContinualLearning(optimizer_state="keep")`` carried the previous stage's over."""
        self.on_fit_start(trainer, pl_module)

    def convert(self, optimizer: Optimizer, module: nn.Module | None = None) -> MoFO:
        """The :class:`~lit_mofo.MoFO` equivalent of ``optimizer`` (an Adam or AdamW), with this callback's options.

        ``optimizer`` itself is not changed; schedulers attached to it are not moved (the callback does that in
        fit). ``module`` gives the parameter names and categories that ``dense`` refers to, and which parameters
        are frozen (they do not count for ``dense``).
        """
        return self._convert(optimizer, _parameter_names(module) if module is not None else {}, "the optimizer")

    def _convert(
        self,
        optimizer: Optimizer,
        names: Mapping[int, _Named],
        label: str,
    ) -> MoFO:
        _check_convertible(optimizer, label)
        groups = []
        for group_index, group in enumerate(optimizer.param_groups):
            mofo_group = {key: value for key, value in group.items() if key not in _ADAM_ONLY}
            mofo_group["params"] = list(group["params"])
            mofo_group.setdefault("fraction", self.fraction)
            mofo_group.setdefault("filter_min_ndim", self.filter_min_ndim)
            if self._takes_dense_step(mofo_group, names, f"param group {group_index} of {label}"):
                mofo_group["fraction"] = None
            groups.append(mofo_group)
        try:
            mofo = MoFO(groups, **{key: optimizer.defaults[key] for key in _SHARED}, **self._mofo_options)
        except (TypeError, ValueError, RuntimeError) as err:
            raise MisconfigurationException(
                f"MoFOCallback cannot convert {label} ({_qualname(optimizer)}): {err}"
            ) from err

        # Carry what else the optimizer holds: the user's per-instance hooks and the LR schedulers' step tracking.
        for hooks in (
            "_optimizer_step_pre_hooks",
            "_optimizer_step_post_hooks",
            "_optimizer_state_dict_pre_hooks",
            "_optimizer_state_dict_post_hooks",
            "_optimizer_load_state_dict_pre_hooks",
            "_optimizer_load_state_dict_post_hooks",
        ):
            setattr(mofo, hooks, OrderedDict(getattr(optimizer, hooks, {})))
        mofo.register_load_state_dict_pre_hook(_as_mofo_state_dict)
        if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
            _track_step_calls(mofo)
        if hasattr(optimizer, "_opt_called"):
            mofo._opt_called = optimizer._opt_called  # type: ignore[attr-defined]
        if optimizer.state:
            mofo.load_state_dict(optimizer.state_dict())
        return mofo

    def _takes_dense_step(
        self,
        group: dict[str, Any],
        names: Mapping[int, _Named],
        where: str,
    ) -> bool:
        """Whether ``dense`` names the group's trainable filtered tensors; refuses a split of the group."""
        if not self.dense or group["fraction"] is None:
            return False
        # The module's frozen tensors never step, so which step they would take does not split anything.
        named, rest = [], []
        for name, words, trainable in self._group_filtered(group, names):
            if not trainable:
                continue
            hits = matching_patterns(self.dense, name, words) if words else []
            (named if hits else rest).append(name)
        if named and rest:
            raise MisconfigurationException(
                f"MoFOCallback(dense={list(self.dense)!r}) names {len(named)} of the {len(named) + len(rest)} "
                "trainable filtered tensors "
                f"of {where} ({_preview(named)}; not: {_preview(rest)}). MoFO takes the dense step per param group, "
                "and splitting the group would change the group count that LR schedulers, checkpoints and loggers "
                "rely on. Give those parameters their own param group in configure_optimizers (e.g. with "
                "lit_mofo.mofo_param_groups(self, dense=[...])), or narrow `dense`."
            )
        return bool(named)

    def _filtered(self, optimizer: Optimizer, names: Mapping[int, _Named]) -> list[_Named]:
        """The filtered tensors (``ndim >= filter_min_ndim``) of every group of ``optimizer``, as MoFO will see them."""
        return [
            named
            for group in optimizer.param_groups
            for named in self._group_filtered(
                {"filter_min_ndim": group.get("filter_min_ndim", self.filter_min_ndim), **group}, names
            )
        ]

    @staticmethod
    def _group_filtered(group: Mapping[str, Any], names: Mapping[int, _Named]) -> list[_Named]:
        unnamed: _Named = ("<unnamed>", frozenset(), True)
        return [names.get(id(p), unnamed) for p in group["params"] if p.dim() >= group["filter_min_ndim"]]

    @override
    def state_dict(self) -> dict[str, Any]:
        """The indices of the converted optimizers and the options, so a resumed run without the callback is warned
        about (Lightning names the callbacks a checkpoint was written with that are missing)."""
        return {"converted": list(self._converted), "options": dict(self._mofo_options), "dense": list(self.dense)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._converted = list(state_dict.get("converted", []))


def _warn_low_precision_in_place(optimizers: Sequence[Optimizer]) -> None:
    """Warn when a MoFO steps float16/bfloat16 parameters in place, without float32 master weights."""
    for index, optimizer in enumerate(optimizers):
        if not isinstance(optimizer, MoFO):
            continue
        low = [
            p
            for group in optimizer.param_groups
            if not group["master_weights"]
            for p in group["params"]
            if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)
        ]
        if low:
            dtypes = "/".join(sorted({str(p.dtype).removeprefix("torch.") for p in low}))
            rank_zero_warn(
                f"MoFOCallback: optimizer {index} steps {len(low)} {dtypes} parameters in place, without float32 "
                f"master weights (master_weights=False): an update smaller than half a {dtypes} spacing of its "
                "weight (about 2**-9 of it in bfloat16) is rounded away, which at fine-tuning learning rates (2e-5) "
                "is most of them. Keep MoFO's master_weights=True (the default; MoFOCallback(master_weights=None)), "
                'or train with precision="bf16-mixed".'
            )


def _check_convertible(optimizer: Optimizer, label: str) -> None:
    name = _qualname(optimizer)
    if type(optimizer) not in (Adam, AdamW):
        why = (
            f"{name} subclasses torch.optim.Adam but may change its update, so it is not converted"
            if isinstance(optimizer, Adam)
            else f"it is a {name}"
        )
        raise MisconfigurationException(
            f"MoFOCallback cannot convert {label}: {why}. Supported: {_SUPPORTED}. Return one of those from "
            "configure_optimizers (or LightningCLI's --optimizer), or return lit_mofo.MoFO yourself and drop the "
            "callback."
        )
    for where, group in (*_numbered(optimizer.param_groups), ("the optimizer-wide default", optimizer.defaults)):
        refusal = _group_refusal(group)
        if refusal is not None:
            raise MisconfigurationException(
                f"MoFOCallback cannot convert {label} ({name}): {where} {refusal} Supported: {_SUPPORTED}."
            )


def _numbered(groups: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"param group {index}", group) for index, group in enumerate(groups)]


def _group_refusal(group: Mapping[str, Any]) -> str | None:
    """Why an Adam(W) param group (live or from a state dict) cannot become a MoFO group, or None."""
    for flag, fix in _REFUSED_FLAGS.items():
        if group.get(flag, False):
            return f"has {flag}=True. {fix}"
    weight_decay = group.get("weight_decay", 0.0)
    if weight_decay != 0 and not group.get("decoupled_weight_decay", False):
        return (
            f"has weight_decay={weight_decay!r} in torch.optim.Adam's L2 form: it is added to the gradient and goes "
            "through the moments, which is not MoFO's decoupled (AdamW) decay, and converting would change the "
            "maths. Use torch.optim.AdamW (or Adam(decoupled_weight_decay=True)), or weight_decay=0."
        )
    return None


def _as_mofo_state_dict(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Load-state-dict pre-hook of a converted MoFO: accept Adam/AdamW state and apply the current MoFO options.

    Adam(W) groups lose their implementation flags; every group gets the MoFO options (``fraction``,
    ``filter_min_ndim``, ...) the optimizer's groups have now, so the callback's configuration — not the one the
    checkpoint was written with — decides the filter. Step counts become CPU float32 tensors as MoFO keeps them; the
    float32 moments are taken care of by :meth:`MoFO.load_state_dict`.
    """
    option_keys = [key for key in optimizer.defaults if key not in _SHARED]
    current = [{key: group[key] for key in option_keys} for group in optimizer.param_groups]
    groups, changed = [], []
    for index, saved in enumerate(state_dict["param_groups"]):
        group = dict(saved)
        if any(key in group for key in ("amsgrad", "decoupled_weight_decay")):  # written by Adam/AdamW
            refusal = _group_refusal(group)
            if refusal is not None:
                raise ValueError(
                    f"The Adam state being loaded into MoFO cannot be converted: param group {index} {refusal}"
                )
            for key in _ADAM_ONLY:
                group.pop(key, None)
        elif "fraction" not in group:
            raise ValueError(
                f"The optimizer state being loaded into MoFO is neither MoFO's nor Adam's (param group {index} has the "
                f"keys {sorted(k for k in group if k != 'params')}); resume from a checkpoint of an Adam, AdamW or "
                "MoFO run."
            )
        if index < len(current):
            changed += [
                f"group {index}: {key}={group[key]!r} -> {value!r}"
                for key, value in current[index].items()
                if key in group and group[key] != value
            ]
            group.update(current[index])
        for key, default in optimizer.defaults.items():
            group.setdefault(key, default)
        groups.append(group)
    if changed:
        rank_zero_warn(
            "The MoFO state being loaded was trained with other MoFO options; continuing with the configured ones "
            f"({'; '.join(changed)})."
        )
    state = {
        param_id: {**param_state, "step": torch.tensor(float(param_state["step"]), dtype=torch.float32)}
        if "step" in param_state
        else dict(param_state)
        for param_id, param_state in state_dict["state"].items()
    }
    return {**state_dict, "state": state, "param_groups": groups}


def _track_step_calls(optimizer: Optimizer) -> None:
    """Mark ``optimizer.step`` calls as ``torch.optim.lr_scheduler.LRScheduler.__init__`` does for the optimizer it is
    given, so a moved scheduler does not warn that ``lr_scheduler.step()`` ran before ``optimizer.step()``."""
    optimizer_ref = weakref.ref(optimizer)
    step: Callable[..., Any] = type(optimizer).step

    @wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = optimizer_ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return step(opt, *args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.step = wrapper  # type: ignore[method-assign]


def _repoint(scheduler: Any, by_old: Mapping[int, Optimizer], seen: set[int]) -> None:
    """Point every reference of ``scheduler`` (and of the schedulers it chains) to an old optimizer at its MoFO."""
    if id(scheduler) in seen or not hasattr(scheduler, "__dict__"):
        return
    seen.add(id(scheduler))
    for attribute, value in list(vars(scheduler).items()):
        if id(value) in by_old:
            setattr(scheduler, attribute, by_old[id(value)])
        elif isinstance(value, LRScheduler):
            _repoint(value, by_old, seen)
        elif isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, LRScheduler):
                    _repoint(item, by_old, seen)


def _parameter_names(module: nn.Module) -> dict[int, _Named]:
    """``id(parameter) -> (qualified name, its words, trainable at the start of fit)``."""
    trainable = initial_requires_grad(module)
    words = parameter_words(module)
    return {id(param): (name, words[name], trainable[name]) for name, param in module.named_parameters()}


def _qualname(optimizer: Optimizer) -> str:
    cls = type(optimizer)
    module = "torch.optim" if cls.__module__.startswith("torch.optim.") else cls.__module__
    return f"{module}.{cls.__qualname__}"


def _preview(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
