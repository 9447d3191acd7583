"""MoFO, the Momentum-Filtered Optimizer (arXiv 2407.20999).

Adam whose step moves, in each parameter tensor, only the entries with the largest first-moment magnitude.
The moments themselves are updated on every entry; the entries left out of a step stay bit-for-bit unchanged,
weight decay included. The arithmetic lives in plain functions over lists of tensors (:func:`mofo`); the class
only validates hyper-parameters, keeps the state and gathers the tensors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from lit_mofo._validation import as_float, as_int
from lit_mofo.optim import _batched, _fused
from lit_mofo.optim._selection import (
    EagerOps,
    LocalView,
    Ops,
    Scratch,
    ShardView,
    StepScalars,
    _collective_device,
    exact_threshold,
    sample_key,
    sampled_threshold,
)

__all__ = ["MoFO", "MoFOStepStats", "mofo", "selection_mask"]

SELECTIONS = ("exact", "sampled")
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NONFINITE = ("skip", "raise")
# Options added after the first release: checkpoints saved before them get these values on load.
_LATER_DEFAULTS: dict[str, Any] = {
    "selection": "exact",
    "fused": None,
    "sample_size": 65536,
    "seed": 0,
    "nonfinite": "skip",
}


@dataclass(frozen=True)
class MoFOStepStats:
    """What one param group's last step moved.

    ``updated`` counts the entries the step changed (every entry of a densely stepped tensor, the selected
    entries of a filtered one, ties included); ``numel`` counts the entries of the tensors that had a gradient.
    ``filtered_*`` restrict both to the filtered tensors. ``nonfinite`` counts the gradient entries that were NaN
    or infinite (with ``nonfinite="skip"`` these entries were left out of the step).
    """

    updated: int = 0
    numel: int = 0
    filtered_updated: int = 0
    filtered_numel: int = 0
    nonfinite: int = 0

    @property
    def fraction(self) -> float:
        """Realised update fraction over all stepped tensors (0.0 when nothing was stepped)."""
        return self.updated / self.numel if self.numel else 0.0

    @property
    def filtered_fraction(self) -> float:
        """Realised update fraction over the filtered tensors only (0.0 when there were none)."""
        return self.filtered_updated / self.filtered_numel if self.filtered_numel else 0.0

    def __add__(self, other: MoFOStepStats) -> MoFOStepStats:
        return MoFOStepStats(
            self.updated + other.updated,
            self.numel + other.numel,
            self.filtered_updated + other.filtered_updated,
            self.filtered_numel + other.filtered_numel,
            self.nonfinite + other.nonfinite,
        )


class MoFO(Optimizer):
    r"""Momentum-Filtered Optimizer: Adam(W) that moves only the largest-momentum entries of each tensor.

    For every parameter tensor :math:`\theta` with gradient :math:`g` at step :math:`t`:

    .. math::
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2
            \quad \text{(all entries)} \\
        k &= \max(1, \lfloor \alpha \cdot \mathrm{numel}(\theta) \rfloor), \qquad
            \tau = k\text{-th largest of } |m_t|, \qquad M = \{ i : |m_{t,i}| \ge \tau \} \\
        \theta_{t,i} &= \theta_{t-1,i} - \gamma\lambda\theta_{t-1,i}
            - \gamma \frac{m_{t,i}/(1-\beta_1^t)}{\sqrt{v_{t,i}/(1-\beta_2^t)} + \epsilon}
            \quad \text{for } i \in M, \text{ unchanged otherwise.}

    Ties at :math:`\tau` are all selected, so a step may move slightly more than :math:`k` entries.
    Tensors with fewer than ``filter_min_ndim`` dimensions (biases and norm weights by default, as in the
    reference code) and param groups with ``fraction=None`` take the dense AdamW step. With ``fraction=1.0``
    the optimizer is exactly :class:`torch.optim.AdamW`.

    Moments are kept in float32 for float16/bfloat16 parameters (in the parameter's dtype otherwise) and the
    update is computed in that precision, then written back in the parameter's dtype.

    **Selection.** ``selection="exact"`` (the default) finds :math:`\tau` without sorting: a stratified sample of
    :math:`|m_t|` at hashed positions brackets the threshold, the moment update's pass counts the entries above the
    bracket and copies the few inside it (about 1-5%), and a radix selection over those gives the k-th largest
    value itself, so the mask is exactly the one above; when the counts show the bracket missed, one extra pass
    collects the right range instead. ``selection="sampled"`` takes :math:`\tau` as the matching quantile of a
    sample of ``sample_size`` entries and needs a single pass: the realised fraction's standard deviation is at most
    :math:`\sqrt{\alpha(1-\alpha)/s}` (0.14 percentage points at :math:`\alpha = 0.15`, :math:`s = 65536`, so
    it is within +-0.5 points of :math:`\alpha` in more than 99.9% of the tensor-steps; 99.8% at
    :math:`\alpha = 0.2`). Tensors with at most ``sample_size`` entries are always selected exactly. The sample
    positions are a hash of ``(seed, tensor index, step)``: no generator state to carry, no draw from torch's
    global generator, the same on every rank, and a resumed run (its checkpoint holds the seed and each tensor's
    step) draws what the uninterrupted one would.

    **Fused kernels.** On CPU, float32/bfloat16/float16 parameters are stepped by a small C library (compiled with
    the system C compiler at the first step that needs it, a few seconds once per machine, then loaded from
    ``~/.cache/lit_mofo``; see :mod:`lit_mofo.optim._fused`): one pass over memory for the sampled selection and
    the dense step, two for the exact selection. ``fused=None`` uses it wherever it can and falls back to torch
    operations otherwise (no C compiler, ``LIT_MOFO_FUSED=0``, CUDA and other devices, float64, non-contiguous
    tensors) with one info-level log message; ``fused=True`` raises instead of falling back; ``fused=False``
    always uses torch operations. On CUDA, ``fused=True`` steps float32/bfloat16/float16 parameters with Triton
    kernels (:mod:`lit_mofo.optim._triton`, needs the ``triton`` package): each operation is one launch for all the
    group's tensors of a dtype, and every threshold stays on the device, so a step makes no host synchronisation
    whatever the number of tensors (the stats are copied back asynchronously and read on demand). The Triton path is
    opt-in and not yet validated on GPU hardware (it is tested on CPU through Triton's interpreter, bit for bit
    against the C kernels); ``fused=None`` on CUDA uses torch operations (the exact selection still without a full
    sort).

    **Non-finite gradients.** A NaN or infinite gradient entry would make its moments NaN for good (the entry
    would then never move again, and the NaN would be saved in every later checkpoint). With ``nonfinite="skip"``
    (the default) such an entry sits the step out: its moments and its weight stay unchanged, it counts as
    :math:`|m_t| = 0` in the selection and is never moved, while the rest of the tensor steps normally (a tensor
    whose gradient is all NaN is left unchanged, and trains again at the next finite gradient; its step count still
    advances). :attr:`MoFOStepStats.nonfinite` counts such entries at every step, and a ``RuntimeWarning`` names each
    tensor the first time it has some. With ``nonfinite="raise"`` the step checks every gradient of the group first
    and raises a ``RuntimeError`` naming the tensor and the step before changing any parameter or state, so the
    optimizer and the last checkpoint stay valid (this costs one extra read of the gradients and one device
    synchronisation per step). Unlike :class:`torch.optim.AdamW`, MoFO never writes NaN into the weights; on finite
    gradients the two options do the same arithmetic, and ``fraction=1.0`` is still AdamW. The semantics are the
    same on every backend (torch operations, the fused kernels, DTensor shards). A finite gradient whose square
    overflows (``|g| > 1.8e19`` in float32) still makes :math:`v_t` infinite and that entry's step 0, as in AdamW.

    **Sharded parameters.** DTensor parameters sharded over a 1-D device mesh (FSDP2's ``fully_shard``, Lightning's
    ``ModelParallelStrategy`` without tensor parallelism) get the global tensor's threshold: the sample, the counts
    and the candidates are combined across the mesh (a few small collectives per tensor and step), so every rank
    selects exactly what a single process holding the whole tensor would. Replicated DTensors are stepped like
    plain tensors; other layouts (2-D meshes, tensor parallelism) are rejected. FSDP1's flattened parameters
    (``strategy="fsdp"``) are rejected: each rank would rank a flattened 1-D slice. DeepSpeed ZeRO hands the
    optimizer flat partitions that cannot be told apart from ordinary tensors; do not combine it with MoFO.

    Args:
        params: tensors, param-group dicts or ``(name, tensor)`` pairs, as for any torch optimizer. A group may
            override every option below (``fraction``, ``filter_min_ndim``, ``selection``, ``fused``, ...).
        lr: learning rate :math:`\gamma`, >= 0. The paper fine-tunes with 2e-5 and a cosine schedule.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: term added to the denominator, >= 0.
        weight_decay: decoupled weight decay :math:`\lambda`, >= 0, applied to the selected entries only
            (the paper uses 0).
        fraction: :math:`\alpha`, the share of each filtered tensor's entries moved per step, in (0, 1].
            The paper's setting is 0.15 (5-20% all work); ``None`` means the dense step for every tensor.
        filter_min_ndim: tensors with fewer dimensions than this take the dense step; >= 0. The default 2
            reproduces the reference code's dense step for biases and norm weights; 0 filters every tensor.
        selection: ``"exact"`` (the k-th largest :math:`|m_t|` itself) or ``"sampled"`` (its estimate from a
            sample; one pass instead of two).
        fused: ``None`` picks the fused CPU kernels where they apply (torch operations on CUDA), ``True`` requires
            the fused kernels (C on CPU, Triton on CUDA), ``False`` uses torch operations only (like torch's
            ``fused``/``foreach`` flags). ``LIT_MOFO_FUSED=0`` turns both kernel families off.
        sample_size: entries in the sampled selection's sample, >= 1024; the realised fraction's standard
            deviation scales as ``1/sqrt(sample_size)``.
        seed: seed of the sample positions, an int in [0, 2**63); the same on every rank by construction.
        nonfinite: ``"skip"`` (leave entries with a NaN/inf gradient out of the step, warn once per tensor) or
            ``"raise"`` (raise before changing anything); see above.

    After each :meth:`step`, :attr:`last_step_stats` holds one :class:`MoFOStepStats` per param group and
    :attr:`last_step_total` their sum and :attr:`update_fraction` the realised fraction over all groups.

    Example::

        optimizer = MoFO(model.parameters(), lr=2e-5, fraction=0.15)
        loss = optimizer.step(closure)
        print(optimizer.update_fraction)
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        fraction: float | None = 0.15,
        filter_min_ndim: int = 2,
        *,
        selection: str = "exact",
        fused: bool | None = None,
        sample_size: int = 65536,
        seed: int = 0,
        nonfinite: str = "skip",
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "fraction": fraction,
            "filter_min_ndim": filter_min_ndim,
            "selection": selection,
            "fused": fused,
            "sample_size": sample_size,
            "seed": seed,
            "nonfinite": nonfinite,
        }
        _validate_hyperparameters(defaults, where="MoFO()")
        self._last_step: list[_GroupResult] = []
        self._nonfinite_reported: set[str] = set()
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        where = f"MoFO param group {len(self.param_groups)}"
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1], where)
        except Exception:
            self.param_groups.pop()  # a rejected group must not stay behind (e.g. when the caller catches the error)
            raise

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        _validate_hyperparameters(group, where=where)
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError(
                    f"MoFO does not support complex parameters (got a {p.dtype} tensor of shape "
                    f"{tuple(p.shape)}); optimize its real view (torch.view_as_real) instead."
                )
            if getattr(p, "_fsdp_flattened", False):
                raise ValueError(
                    f"MoFO does not support FSDP1's flattened parameters (got one of shape {tuple(p.shape)}): each "
                    "rank holds a flattened 1-D slice, so the top-k would be taken per slice and the slices would "
                    "take the dense step. Use FSDP2 (torch.distributed.fsdp.fully_shard; in Lightning "
                    'strategy=ModelParallelStrategy()), where MoFO agrees a global threshold, or strategy="ddp".'
                )
            if _is_dtensor(p):
                _check_dtensor(p, where)
        if group["fused"] is True:
            for p in group["params"]:
                if _takes_triton(True, p):
                    if _batched.load_triton() is None:
                        raise RuntimeError(
                            f"{where}: fused=True, but MoFO's Triton kernels for {p.device.type} parameters are "
                            f"unavailable ({_batched.triton_unavailable_reason()}). Install triton (pip install "
                            "'lit-mofo[triton]'; torch's CUDA wheels for Linux include it), or use fused=None or "
                            "fused=False for torch operations."
                        )
                elif p.device.type == "cpu" and _fused.load() is None:
                    raise RuntimeError(
                        f"{where}: fused=True, but the fused MoFO kernels are unavailable "
                        f"({_fused.unavailable_reason()}). Use fused=None to fall back to torch operations "
                        "automatically, or fused=False."
                    )
                if p.device.type not in ("cpu", "cuda") or p.dtype not in _FUSED_DTYPES:
                    raise ValueError(
                        f"{where}: fused=True, but the fused MoFO kernels (C on CPU, Triton on CUDA) step "
                        f"float32, bfloat16 or float16 parameters; got a {p.dtype} parameter of shape "
                        f"{tuple(p.shape)} on {p.device}. Use fused=None to fall back to torch operations for "
                        "such tensors, or fused=False."
                    )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _LATER_DEFAULTS.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating-point state to each parameter's dtype, which would round the float32 moments of
        # float16/bfloat16 parameters; take them again from the saved dict at their own precision.
        saved_ids = (i for group in state_dict["param_groups"] for i in group["params"])
        params = (p for group in self.param_groups for p in group["params"])
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=_moment_dtype(p), copy=True)
            # torch moves "step" to the parameter's device for groups with fused=True (its rule for its own fused
            # optimizers); MoFO reads it on the host, so on CUDA that would cost a synchronisation per tensor.
            if "step" in self.state[p]:
                self.state[p]["step"] = torch.as_tensor(self.state[p]["step"], dtype=torch.float32).to("cpu")

    @property
    def last_step_stats(self) -> list[MoFOStepStats]:
        """One :class:`MoFOStepStats` per param group: what the last :meth:`step` moved (empty before the first)."""
        return [self._resolve(result) for result in getattr(self, "_last_step", [])]

    @property
    def last_step_total(self) -> MoFOStepStats:
        """:attr:`last_step_stats` summed over all param groups."""
        return sum(self.last_step_stats, MoFOStepStats())

    @property
    def update_fraction(self) -> float:
        """Entries moved by the last step over entries that had a gradient, across all groups."""
        return self.last_step_total.fraction

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
        indices: list[int],
        first_index: int,
    ) -> None:
        for offset, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(
                    "MoFO does not support sparse gradients (got one for a parameter of shape "
                    f"{tuple(p.shape)}); use dense gradients, e.g. nn.Embedding(sparse=False)."
                )
            state = self.state[p]
            if len(state) == 0:
                moment_dtype = _moment_dtype(p)
                # Like torch's Adam: a CPU float step counter, so bias correction needs no device sync.
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            state_steps.append(state["step"])
            indices.append(first_index + offset)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` (re-evaluating the loss) is run with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        self._report_last_step()  # the previous step's non-finite warnings, if nobody read its stats
        raising = [(index, group) for index, group in enumerate(self.param_groups) if group["nonfinite"] == "raise"]
        if raising:
            self._raise_on_nonfinite(raising)

        results = []
        first_index = 0  # a parameter's position over all groups: its sample's identity, stable across resumes
        for group_index, group in enumerate(self.param_groups):
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            state_steps: list[Tensor] = []
            indices: list[int] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, state_steps, indices, first_index)
            first_index += len(group["params"])
            beta1, beta2 = group["betas"]
            result = _step_group(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                state_steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                fraction=group["fraction"],
                filter_min_ndim=group["filter_min_ndim"],
                selection=group["selection"],
                fused=group["fused"],
                sample_size=group["sample_size"],
                seed=group["seed"],
                tensor_indices=indices,
            )
            names = group.get("param_names")
            offsets = [index - (first_index - len(group["params"])) for index in indices]
            result.names = [repr(names[o]) if names else f"param group {group_index}, index {o}" for o in offsets]
            results.append(result)
        self._last_step = results
        for result in results:
            if result.ready:  # counts already on the host: warn now rather than at the next read
                self._resolve(result)
        return loss

    def _resolve(self, result: _GroupResult) -> MoFOStepStats:
        reported = getattr(self, "_nonfinite_reported", None)
        if reported is None:
            reported = self._nonfinite_reported = set()
        return result.resolve(reported)

    def _report_last_step(self) -> None:
        for result in getattr(self, "_last_step", []):
            self._resolve(result)

    def _raise_on_nonfinite(self, groups: list[tuple[int, dict[str, Any]]]) -> None:
        """``nonfinite="raise"``: check every gradient of these groups before anything is changed."""
        tensors = [
            (group_index, offset, p)
            for group_index, group in groups
            for offset, p in enumerate(group["params"])
            if p.grad is not None
        ]
        flags = _nonfinite_flags([p.grad for _, _, p in tensors], across_shards=True)
        bad = [entry for entry, flag in zip(tensors, flags, strict=True) if flag]
        if not bad:
            return
        group_index, offset, p = bad[0]
        names = self.param_groups[group_index].get("param_names")
        name = repr(names[offset]) if names else f"param group {group_index}, index {offset}"
        count = _nonfinite_count(p.grad)
        state = self.state.get(p)
        step = int(state["step"].item()) + 1 if state else 1
        others = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise RuntimeError(
            f'MoFO(nonfinite="raise"): the gradient of {name} (shape {tuple(p.shape)}) has {count} non-finite '
            f"entries (NaN or infinity) at step {step}{others}; no parameter and no optimizer state was changed, so "
            "this optimizer and the last checkpoint stay valid. Find the cause (a learning rate too high, float16 "
            'overflow without a GradScaler, a bad batch), or use nonfinite="skip" to leave such entries out of '
            "the step."
        )


class _GroupResult:
    """What one group's step moved, per tensor; counts may still be on the device (resolved on first read)."""

    def __init__(self, numels: list[int], filtered: list[bool]) -> None:
        self.numels = numels
        self.filtered = filtered
        self.moved: list[int] = [0] * len(numels)
        self.nonfinite: list[int] = [0] * len(numels)
        self.names: list[str] | None = None
        self._stats: MoFOStepStats | None = None
        self._pending: list[tuple[list[int], Tensor, Any]] = []

    def add_pending(self, positions: list[int], counts: Tensor) -> None:
        """Per-tensor ``(moved, nonfinite)`` counts still on the device: copied to the host without waiting."""
        if counts.device.type == "cuda":
            host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
            host.copy_(counts, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((positions, host, event))
        else:
            self._pending.append((positions, counts, None))

    @property
    def ready(self) -> bool:
        """Whether resolving costs no device synchronisation (every count is on the host, or has arrived)."""
        return all(event is None or event.query() for _, _, event in self._pending)

    def resolve(self, reported: set[str] | None = None) -> MoFOStepStats:
        """The group's stats; warns once for each tensor (not yet in ``reported``) that had non-finite gradients."""
        if self._stats is None:
            for positions, counts, event in self._pending:
                if event is not None:
                    event.synchronize()  # this step's kernels only, not later work
                for position, (moved, nonfinite) in zip(positions, counts.tolist(), strict=True):
                    self.moved[position], self.nonfinite[position] = moved, nonfinite
            self._pending = []
            updated = sum(self.moved)
            filtered_updated = sum(m for m, f in zip(self.moved, self.filtered, strict=True) if f)
            filtered_numel = sum(n for n, f in zip(self.numels, self.filtered, strict=True) if f)
            self._stats = MoFOStepStats(
                updated, sum(self.numels), filtered_updated, filtered_numel, sum(self.nonfinite)
            )
            names = self.names or [f"tensor {i}" for i in range(len(self.numels))]
            for name, count, numel in zip(names, self.nonfinite, self.numels, strict=True):
                if count and (reported is None or name not in reported):
                    if reported is not None:
                        reported.add(name)
                    warnings.warn(
                        f"MoFO: the gradient of {name} had {count} non-finite entries (NaN or infinity) of {numel}; "
                        'nonfinite="skip" left them out of the step (their moments and weights are unchanged). '
                        "Warned once per tensor; MoFO.last_step_stats counts them at every step (`nonfinite`). "
                        'Use nonfinite="raise" to stop at the first one instead.',
                        RuntimeWarning,
                        stacklevel=4,
                    )
        return self._stats


def _validate_hyperparameters(group: dict[str, Any], where: str) -> None:
    """Check every MoFO option present in ``group`` (a constructor's defaults, a param group, or a partial dict such
    as a YAML ``init_args``): a ``ValueError`` naming the option, the bad value, the valid range and the fix.

    Options missing from ``group`` are not checked, so a config can be validated before the optimizer exists.
    """

    def bad(name: str, value: Any, valid: str, fix: str) -> ValueError:
        return ValueError(f"{where}: {name}={value!r} is invalid; the valid range is {valid}. {fix}")

    def number(name: str, fix: str, **limits: Any) -> None:
        if name in group:
            as_float(group[name], where=where, argument=name, fix=fix, **limits)

    number("lr", "The MoFO paper fine-tunes with lr=2e-5.", minimum=0.0)
    number("eps", "The usual value is 1e-8.", minimum=0.0)
    number("weight_decay", "The MoFO paper uses 0.", minimum=0.0)
    if "betas" in group:
        betas = group["betas"]
        valid = "two numbers (beta1, beta2), each in [0, 1)"
        fix = "The usual value is (0.9, 0.999)."
        if (
            isinstance(betas, (str, bytes))
            or not isinstance(betas, Sequence)
            or len(betas) != 2
            or not all(isinstance(b, Real) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)
        ):
            raise bad("betas", betas, valid, fix)
    if "fraction" in group and group["fraction"] is not None:
        as_float(
            group["fraction"],
            where=where,
            argument="fraction",
            minimum=0.0,
            maximum=1.0,
            min_inclusive=False,
            fix="Use a number in (0, 1], or None for the dense Adam step; the MoFO paper's setting is 0.15 "
            "(5-20% all work).",
        )
    if "filter_min_ndim" in group:
        as_int(
            group["filter_min_ndim"],
            where=where,
            argument="filter_min_ndim",
            minimum=0,
            fix="Use 2 to step biases and norm weights densely (the reference code's rule), 0 to filter every tensor.",
        )
    if "selection" in group and not (isinstance(group["selection"], str) and group["selection"] in SELECTIONS):
        raise bad(
            "selection",
            group["selection"],
            f"one of {SELECTIONS}",
            'Use "exact" for the k-th largest |exp_avg| itself, "sampled" for a one-pass estimate of it.',
        )
    if "fused" in group and not (group["fused"] is None or group["fused"] is True or group["fused"] is False):
        raise bad(
            "fused",
            group["fused"],
            "None, True or False",
            "None uses the fused CPU kernels where they apply, True requires the fused kernels (C on CPU, Triton "
            "on CUDA), False uses torch operations.",
        )
    if "sample_size" in group:
        as_int(
            group["sample_size"],
            where=where,
            argument="sample_size",
            minimum=1024,
            fix="The default 65536 keeps the sampled fraction within +-0.5 percentage points of the target.",
        )
    if "seed" in group:
        seed = group["seed"]
        if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2**63:
            raise bad(
                "seed", seed, "an integer in [0, 2**63)", "Any fixed value works; it only picks the sample positions."
            )
    if "nonfinite" in group and not (isinstance(group["nonfinite"], str) and group["nonfinite"] in NONFINITE):
        raise bad(
            "nonfinite",
            group["nonfinite"],
            f"one of {NONFINITE}",
            '"skip" leaves entries with a NaN/inf gradient out of the step (moments and weight unchanged), '
            '"raise" stops before anything is changed.',
        )


_DTENSOR: type | None = None


def _is_dtensor(p: Tensor) -> bool:
    global _DTENSOR
    if _DTENSOR is None:
        if not torch.distributed.is_available():
            return False
        from torch.distributed.tensor import DTensor

        _DTENSOR = DTensor
    return isinstance(p, _DTENSOR)


def _check_dtensor(p: Tensor, where: str) -> None:
    """Accept the DTensor layouts whose global threshold MoFO can agree: one mesh dimension, Shard or Replicate."""
    placements = tuple(p.placements)  # type: ignore[attr-defined]
    mesh = p.device_mesh  # type: ignore[attr-defined]
    placement = placements[0]
    supported = mesh.ndim == 1 and (
        placement.is_replicate() or (placement.is_shard() and type(placement).__name__ == "Shard")
    )
    if not supported:
        raise ValueError(
            f"{where}: a DTensor parameter of global shape {tuple(p.shape)} with placements {placements} on a "
            f"{mesh.ndim}-D device mesh is not supported; MoFO agrees a global threshold for DTensors on a 1-D "
            "mesh with a Shard(dim) or Replicate() placement (FSDP2's fully_shard without tensor parallelism). "
            'Shard the model with fully_shard over one mesh dimension, or use strategy="ddp".'
        )


def _moment_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def selection_mask(exp_avg: Tensor, fraction: float, grad: Tensor | None = None) -> Tensor | None:
    """The entries MoFO moves in a tensor: ``|m| >= k-th largest |m|``, ``k = max(1, floor(fraction*numel))``.

    The reference definition (one ``torch.kthvalue`` over the whole tensor), kept as the specification that the
    optimizer's faster selection is tested against. With ``grad`` (the step's gradient), an entry whose gradient is
    non-finite counts as ``|m| = 0`` in the ranking and is never selected (``nonfinite="skip"``). Returns ``None``
    when every entry is selected (``k == numel`` and no such entry), so callers can take the dense path.
    """
    numel = exp_avg.numel()
    k = max(1, math.floor(fraction * numel))
    finite = None if grad is None or bool(grad.isfinite().all()) else grad.isfinite()
    if k >= numel:
        return finite
    magnitude = exp_avg.abs()
    if finite is not None:
        magnitude = magnitude.masked_fill(~finite, 0.0)
    # The k-th largest is the (numel - k + 1)-th smallest; kthvalue is a selection, not a full sort.
    threshold = torch.kthvalue(magnitude.reshape(-1), numel - k + 1).values
    mask = magnitude >= threshold
    return mask if finite is None else mask & finite


def _local_view(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor
) -> tuple[LocalView | ShardView, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The view selection works on and the local tensors the arithmetic works on."""
    if not _is_dtensor(param):
        return LocalView(param.numel()), (param, grad, exp_avg, exp_avg_sq)
    tensors = []
    for name, tensor in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not _is_dtensor(tensor) or tuple(tensor.placements) != tuple(param.placements):  # type: ignore[attr-defined]
            raise ValueError(
                f"MoFO: the {name} of a DTensor parameter with placements {tuple(param.placements)} "  # type: ignore[attr-defined]
                f"must be a DTensor with the same placements, got {type(tensor).__name__} "
                f"{tuple(getattr(tensor, 'placements', ()))}."
            )
        tensors.append(tensor.to_local())  # type: ignore[attr-defined]
    local = param.to_local()  # type: ignore[attr-defined]
    placement = param.placements[0]  # type: ignore[attr-defined]
    if placement.is_replicate():
        view: LocalView | ShardView = LocalView(local.numel())
    else:
        mesh = param.device_mesh  # type: ignore[attr-defined]
        view = ShardView(
            param.shape, placement.dim, local.shape, mesh.get_group(0), mesh.get_local_rank(0), mesh.size(0)
        )
    return view, (local, tensors[0], tensors[1], tensors[2])


def _pick_ops(
    fused: bool | None, param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, eager: EagerOps
) -> Ops:
    """The fused CPU kernels where they apply and are wanted, torch operations otherwise (or an error if fused)."""
    if fused is False:
        return eager
    kernels = _fused.load() if param.device.type == "cpu" else None
    if kernels is not None and kernels.supports(param, grad, exp_avg, exp_avg_sq):
        return kernels
    if fused is True:
        if kernels is None and param.device.type == "cpu":
            raise RuntimeError(
                f"MoFO(fused=True): the fused kernels are unavailable ({_fused.unavailable_reason()}). "
                "Use fused=None to fall back to torch operations automatically, or fused=False."
            )
        raise ValueError(
            f"MoFO(fused=True): the fused kernels step contiguous CPU tensors of dtype float32, bfloat16 or "
            f"float16 with float32 moments; got a {param.dtype} parameter of shape {tuple(param.shape)} on "
            f"{param.device} (contiguous: {param.is_contiguous()}, grad {grad.dtype} on {grad.device}). Use "
            "fused=None to fall back to torch operations for such tensors, or fused=False."
        )
    return eager


def mofo(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    fraction: float | None,
    filter_min_ndim: int,
    selection: str = "exact",
    fused: bool | None = None,
    sample_size: int = 65536,
    seed: int = 0,
    nonfinite: str = "skip",
    tensor_indices: Sequence[int] | None = None,
) -> MoFOStepStats:
    """Functional MoFO step over lists of tensors (one param group); see :class:`MoFO` for the rule and options.

    Updates ``params``, ``exp_avgs``, ``exp_avg_sqs`` and ``state_steps`` in place and returns what moved.
    ``tensor_indices`` identify the tensors' samples (default: their positions in ``params``); give each tensor
    the same index at every step. Tensors with non-finite gradients are warned about at every call (the class
    warns once per tensor).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"mofo: selection={selection!r} is invalid; the valid choices are {SELECTIONS}.")
    if nonfinite not in NONFINITE:
        raise ValueError(f"mofo: nonfinite={nonfinite!r} is invalid; the valid choices are {NONFINITE}.")
    if nonfinite == "raise":
        flags = _nonfinite_flags(grads, across_shards=True)
        if any(flags):
            index = flags.index(True)
            grad = grads[index]
            raise RuntimeError(
                f'mofo(nonfinite="raise"): the gradient of tensor {index} (shape {tuple(grad.shape)}) has '
                f"{_nonfinite_count(grad)} non-finite entries (NaN or infinity) at step "
                f"{int(state_steps[index].item()) + 1}; nothing was changed."
            )
    result = _step_group(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        fraction=fraction,
        filter_min_ndim=filter_min_ndim,
        selection=selection,
        fused=fused,
        sample_size=sample_size,
        seed=seed,
        tensor_indices=tensor_indices,
    )
    return result.resolve()


def _nonfinite_flags(grads: list[Tensor], *, across_shards: bool) -> list[bool]:
    """Whether each gradient holds a NaN or an infinity, with one host sync per device for the whole list.

    A DTensor is checked on its local shard; ``across_shards`` makes every rank of its mesh agree (a collective per
    mesh), so that all ranks raise together instead of some entering the step's collectives alone.
    """
    buckets: dict[Any, list[tuple[int, Tensor]]] = {}
    for position, grad in enumerate(grads):
        group = None
        if _is_dtensor(grad):
            if across_shards and not grad.placements[0].is_replicate():  # type: ignore[attr-defined]
                group = grad.device_mesh.get_group(0)  # type: ignore[attr-defined]
            grad = grad.to_local()  # type: ignore[attr-defined]
        if grad.numel():
            # One reduction pass without a temporary (isfinite().all() is 20-80x slower on CPU): NaN propagates
            # to both ends, and an infinity is one of them.
            low, high = torch.aminmax(grad)
            flag = ~(torch.isfinite(low) & torch.isfinite(high))
        else:
            flag = grad.new_zeros((), dtype=torch.bool)
        buckets.setdefault((grad.device, group), []).append((position, flag))
    flags = [False] * len(grads)
    for (_, group), entries in buckets.items():
        stacked = torch.stack([flag for _, flag in entries]).to(torch.int32)
        if group is not None:
            import torch.distributed as dist

            stacked = stacked.to(_collective_device(group))
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX, group=group)
        for (position, _), flag in zip(entries, stacked.tolist(), strict=True):
            flags[position] = bool(flag)
    return flags


def _nonfinite_count(grad: Tensor) -> int:
    """The number of NaN/inf entries of a gradient; of the whole tensor for a DTensor (a collective: every rank of
    its mesh must call it)."""
    if not _is_dtensor(grad):
        return int(torch.count_nonzero(~grad.isfinite()))
    count = torch.count_nonzero(~grad.to_local().isfinite()).reshape(1)  # type: ignore[attr-defined]
    if not grad.placements[0].is_replicate():  # type: ignore[attr-defined]
        import torch.distributed as dist

        group = grad.device_mesh.get_group(0)  # type: ignore[attr-defined]
        count = count.to(_collective_device(group))
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return int(count.item())


def _step_group(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    fraction: float | None,
    filter_min_ndim: int,
    selection: str,
    fused: bool | None,
    sample_size: int,
    seed: int,
    tensor_indices: Sequence[int] | None,
) -> _GroupResult:
    """One group's step with ``nonfinite="skip"`` semantics (``"raise"`` was checked before anything changed)."""
    indices = range(len(params)) if tensor_indices is None else tensor_indices
    eager = EagerOps()
    scratch = Scratch()
    scalars_by_step: dict[float, StepScalars] = {}  # the tensors of a group usually share their step
    views: list[LocalView | ShardView] = []
    locals_: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    backends: list[Ops | None] = []  # None: the batched (Triton) path
    kernels = None
    for param, grad, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs, strict=True):
        view, tensors = _local_view(param, grad, exp_avg, exp_avg_sq)
        views.append(view)
        locals_.append(tensors)
        if _takes_triton(fused, tensors[0]):
            kernels = _triton_kernels(*tensors)
            backends.append(None)
        else:
            backends.append(_pick_ops(fused, *tensors, eager))
    # torch operations cannot skip an entry inside a pass: one check of their gradients (one host sync for all of
    # them), then the tensors that have non-finite entries take the masked operations. The kernels check each entry.
    eager_positions = [i for i, ops in enumerate(backends) if ops is eager]
    flags = _nonfinite_flags([locals_[i][1] for i in eager_positions], across_shards=False)
    for position, flag in zip(eager_positions, flags, strict=True):
        if flag:
            backends[position] = EagerOps(skip=~locals_[position][1].isfinite())

    numels = [view.numel for view in views]
    filtered = [fraction is not None and param.dim() >= filter_min_ndim for param in params]
    result = _GroupResult(numels, filtered)
    entries: list[tuple[int, _batched.Entry]] = []
    for position, (view, (p, g, m, v), ops, step_t, index) in enumerate(
        zip(views, locals_, backends, state_steps, indices, strict=True)
    ):
        step_t += 1
        step = step_t.item()  # a CPU tensor (kept there by load_state_dict too): no device synchronisation
        scalars = scalars_by_step.get(step)
        if scalars is None:
            scalars = scalars_by_step[step] = StepScalars(
                weight=1 - beta1,
                beta2=beta2,
                step_size=lr / (1 - beta1**step),
                bias_correction2_sqrt=(1 - beta2**step) ** 0.5,
                eps=eps,
                decay=1 - lr * weight_decay,
                has_weight_decay=weight_decay != 0,
            )
        numel = view.numel
        k = max(1, math.floor(fraction * numel)) if filtered[position] else numel  # type: ignore[operator]
        key = sample_key(seed, index, int(step))
        if ops is None:
            entries.append((position, _batched.Entry(p, g, m, v, view, k, k >= numel, key, scalars)))
            continue
        if k >= numel:
            moved, skipped = ops.fused(p, g, m, v, 0.0, True, scalars)
        elif selection == "sampled" and numel > sample_size:
            tau = sampled_threshold(ops, view, m, g, key, sample_size, fraction, scalars.weight, scratch)  # type: ignore[arg-type]
            moved, skipped = ops.fused(p, g, m, v, tau, False, scalars)
        else:
            tau, skipped = exact_threshold(ops, view, g, m, v, k, key, scalars, scratch)
            moved = ops.update(p, m, v, tau, False, scalars, g if skipped else None)
        result.moved[position], result.nonfinite[position] = view.local_counts((moved, skipped))
    if entries:
        _step_batched(kernels, entries, selection, fraction, sample_size, result)  # type: ignore[arg-type]
    return result


def _takes_triton(fused: bool | None, param: Tensor) -> bool:
    """``fused=True`` on CUDA (and, for the tests, on CPU under Triton's interpreter) takes the Triton kernels."""
    device = param.device.type
    return fused is True and (device == "cuda" or (device == "cpu" and _batched.ROUTE_CPU_TENSORS))


def _triton_kernels(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> _batched.BatchedKernels:
    kernels = _batched.load_triton()
    if kernels is None:
        raise RuntimeError(
            f"MoFO(fused=True): the Triton kernels for {param.device.type} parameters are unavailable "
            f"({_batched.triton_unavailable_reason()}). Install triton (pip install 'lit-mofo[triton]'; torch's "
            "CUDA wheels for Linux include it), or use fused=None or fused=False for torch operations."
        )
    if not _batched.supports(param, grad, exp_avg, exp_avg_sq):
        raise ValueError(
            f"MoFO(fused=True): the Triton kernels step contiguous float32, bfloat16 or float16 parameters with "
            f"float32 moments; got a {param.dtype} parameter of shape {tuple(param.shape)} on {param.device} "
            f"(contiguous: {param.is_contiguous()}, grad {grad.dtype} on {grad.device}). Use fused=None or "
            "fused=False for torch operations."
        )
    return kernels


def _step_batched(
    kernels: _batched.BatchedKernels,
    entries: list[tuple[int, _batched.Entry]],
    selection: str,
    fraction: float | None,
    sample_size: int,
    result: _GroupResult,
) -> None:
    """The group's tensors on the batched path: one exact and one one-pass step per batch, counts kept on device."""
    exact, one_pass = [], []
    for position, entry in entries:
        if entry.dense:
            one_pass.append((position, entry))
        elif selection == "sampled" and entry.view.numel > sample_size:
            entry.sample = sample_size
            one_pass.append((position, entry))
        else:
            exact.append((position, _batched.exact_entry(entry)))

    def group_of(entry: _batched.Entry) -> Any:
        return entry.view.group if isinstance(entry.view, ShardView) else None

    for members, exact_kind in ((exact, True), (one_pass, False)):
        positions = {id(entry): position for position, entry in members}
        for batch in _batched.batches([entry for _, entry in members], kernels.block, group_of):
            if exact_kind:
                counts = _batched.step_exact(kernels, batch)
            else:
                counts = _batched.step_fused(kernels, batch, fraction, sample_size)
            totals = batch.all_reduce(counts[:, [_batched.C_MOVED, _batched.C_SKIPPED]].contiguous())
            result.add_pending([positions[id(entry)] for entry in batch.entries], totals)
