"""MoFO, the Momentum-Filtered Optimizer (arXiv 2407.20999).

Adam whose step moves, in each parameter tensor, only the entries with the largest first-moment magnitude.
The moments themselves are updated on every entry; the entries left out of a step stay bit-for-bit unchanged,
weight decay included. As in torch's ``optim/adam.py``, the class validates hyper-parameters, keeps the state and
gathers the tensors, and :func:`mofo` does the step: it picks each tensor's implementation (torch operations, the
fused C kernels on CPU, the Triton kernels on CUDA) and runs them through the one selection driver of
:mod:`lit_mofo.optim._selection`. The arithmetic itself is on one screen in :mod:`lit_mofo.optim._eager`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from lit_mofo._validation import as_bool, as_choice, as_float, as_int
from lit_mofo.dtensor import ShardLayout, collective_device, is_dtensor, local, placements, shard_layout
from lit_mofo.optim._eager import EagerKernels
from lit_mofo.optim._kernels import kernels_for
from lit_mofo.optim._selection import BatchedKernels, Entry, StepScalars, sample_key, step_group

__all__ = ["MoFO", "MoFOStepResult", "MoFOStepStats", "mofo", "selection_mask"]

SELECTIONS = ("exact", "sampled")
NONFINITE = ("skip", "raise")
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Options added after the first release: checkpoints saved before them get these values on load (no master
# weights: such a run resumes exactly as it was trained).
_LATER_DEFAULTS: dict[str, Any] = {
    "selection": "exact",
    "fused": None,
    "sample_size": 65536,
    "seed": 0,
    "nonfinite": "skip",
    "master_weights": False,
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

    **Low-precision parameters.** Moments are kept in float32 for float16/bfloat16 parameters (in the parameter's
    dtype otherwise), and so is the step's arithmetic. Written into a bfloat16 weight, an update smaller than half
    a bfloat16 spacing (about :math:`2^{-9}` of the weight) is rounded away: at fine-tuning learning rates (2e-5)
    that is most updates, and a ``precision="bf16-true"`` run barely moves. With ``master_weights=True`` (the
    default) MoFO keeps a float32 copy of each float16/bfloat16 parameter in its state (``"master_weight"``,
    checkpointed and sharded like the moments): every step updates the copy and writes its rounding into the
    parameter, so the run follows the float32 trajectory exactly, with bf16 compute - the papers' setting. This is
    on by default because an optimizer whose updates silently vanish is what users least expect; it costs 4 bytes
    per low-precision parameter (for bf16 parameters, 2 + 4 bytes of weights and 8 of moments, what
    ``precision="bf16-mixed"`` holds as well). A parameter written by someone else since the last step (a reset to
    the pre-trained weights, a loaded state dict) no longer holds its copy's rounding: its entries restart from the
    new value. Set ``master_weights=False`` to save the memory when the learning rate is large enough for the
    updates to survive rounding (:class:`~lit_mofo.callbacks.mofo_callback.MoFOCallback` warns when it is off).
    Stochastic rounding and Kahan-compensated updates cost less memory (0 and 2 bytes) but follow the float32
    trajectory only approximately (on average, or to about 16 bits); the master copy is exact.

    **Selection.** ``selection="exact"`` (the default) finds :math:`\tau` without sorting: a stratified sample of
    :math:`|m_t|` at hashed positions brackets the threshold, the moment update's pass counts the entries above the
    bracket and copies the few inside it (about 1-5%), and a radix selection over those gives the k-th largest
    value itself, so the mask is exactly the one above; when the counts show the bracket missed, the radix
    selection reads the right range of the tensor instead. ``selection="sampled"`` takes :math:`\tau` as the
    matching quantile of a sample of ``sample_size`` entries and needs a single pass: the realised fraction's
    standard deviation is at most :math:`\sqrt{\alpha(1-\alpha)/s}` (0.14 percentage points at
    :math:`\alpha = 0.15`, :math:`s = 65536`, so it is within +-0.5 points of :math:`\alpha` in more than 99.9% of
    the tensor-steps; 99.8% at :math:`\alpha = 0.2`). Tensors with at most ``sample_size`` entries are always
    selected exactly. The sample positions are a hash of ``(seed, tensor index, step)``: no generator state to
    carry, no draw from torch's global generator, the same on every rank, and a resumed run (its checkpoint holds
    the seed and each tensor's step) draws what the uninterrupted one would.

    **Fused kernels.** On CPU, float32/bfloat16/float16 parameters are stepped by a small C library (compiled with
    the system C compiler at the first step that needs it, a second or two once per machine, then loaded from
    ``~/.cache/lit_mofo``; built for the instruction set of the CPU that loads it, AVX-512, AVX2 or plain x86-64;
    see :mod:`lit_mofo.optim._cpu`): one pass over memory for the sampled selection and the dense step, two for
    the exact selection. ``fused=None`` uses it wherever it can and falls back to torch operations otherwise (no C
    compiler, ``LIT_MOFO_FUSED=0``, CUDA and other devices, float64, non-contiguous tensors) with one info-level
    log message; ``fused=True`` raises instead of falling back; ``fused=False`` always uses torch operations. On
    CUDA, ``fused=True`` steps float32/bfloat16/float16 parameters with Triton kernels
    (:mod:`lit_mofo.optim._triton`, needs the ``triton`` package): each operation is one launch for all the group's
    tensors of a dtype, and every threshold stays on the device, so a step makes no host synchronisation whatever
    the number of tensors (the stats are copied back asynchronously and read on demand). The Triton path is opt-in
    and not yet validated on GPU hardware (it is tested on CPU through Triton's interpreter, bit for bit against the
    C kernels); ``fused=None`` on CUDA uses torch operations (the exact selection still without a full sort). Every
    implementation runs the same selection driver and computes the same bits, up to the last bit of torch's
    ``sqrt``.

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
    and the candidates' histograms are summed across the mesh (a few small collectives per batch of tensors and
    step), so every rank selects exactly what a single process holding the whole tensor would. Replicated DTensors
    are stepped like plain tensors; other layouts (2-D meshes, tensor parallelism) are rejected. FSDP1's flattened
    parameters (``strategy="fsdp"``) are rejected: each rank would rank a flattened 1-D slice. DeepSpeed ZeRO hands
    the optimizer flat partitions that cannot be told apart from ordinary tensors; do not combine it with MoFO.

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
        master_weights: keep a float32 master copy of every float16/bfloat16 parameter (default ``True``; no effect
            on float32/float64 parameters); see "Low-precision parameters" above.

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
        master_weights: bool = True,
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
            "master_weights": master_weights,
        }
        _validate_hyperparameters(defaults, where="MoFO()")
        self._last_step: list[MoFOStepResult] = []
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

    @staticmethod
    def _check_group(group: dict[str, Any], where: str) -> None:
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
            _layout(p, where)
            if group["fused"] is True:  # the kernels must exist for this device and dtype (loaded now, once)
                kernels_for(True, p, where)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in _LATER_DEFAULTS.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)  # options a checkpoint lacks get _LATER_DEFAULTS (in __setstate__)
        # torch casts floating-point state to each parameter's dtype, which would round the float32 moments and
        # master copies of float16/bfloat16 parameters; take them again from the saved dict at their own precision.
        saved_ids = (i for group in state_dict["param_groups"] for i in group["params"])
        params = (p for group in self.param_groups for p in group["params"])
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id, {})
            for key in ("exp_avg", "exp_avg_sq", "master_weight"):
                if key in saved:
                    dtype = torch.float32 if key == "master_weight" else _moment_dtype(p)
                    self.state[p][key] = saved[key].to(device=p.device, dtype=dtype, copy=True)
            # torch moves "step" to the parameter's device for groups with fused=True (its rule for its own fused
            # optimizers); MoFO reads it on the host, so on CUDA that would cost a synchronisation per tensor. A copy,
            # as for the moments: torch keeps the very tensor of the dict, which a live optimizer's step would share.
            if "step" in self.state[p]:
                step = torch.as_tensor(self.state[p]["step"])
                self.state[p]["step"] = step.to(device="cpu", dtype=torch.float32, copy=True)

    @property
    def last_step_stats(self) -> list[MoFOStepStats]:
        """One :class:`MoFOStepStats` per param group: what the last :meth:`step` moved (empty before the first)."""
        return [result.stats for result in getattr(self, "_last_step", [])]

    @property
    def last_step_total(self) -> MoFOStepStats:
        """:attr:`last_step_stats` summed over all param groups."""
        return sum(self.last_step_stats, MoFOStepStats())

    @property
    def update_fraction(self) -> float:
        """Entries moved by the last step over entries that had a gradient, across all groups."""
        return self.last_step_total.fraction

    def _init_group(self, group: dict[str, Any], group_index: int, first_index: int) -> _GroupTensors:
        """The group's tensors that have a gradient, with their state (created at their first step)."""
        tensors = _GroupTensors()
        names = group.get("param_names")
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
            if group["master_weights"] and p.dtype in _LOW_PRECISION:
                if "master_weight" not in state:  # from the parameter as it is now (first step, or option turned on)
                    state["master_weight"] = p.detach().to(torch.float32, copy=True)
            else:
                state.pop("master_weight", None)
            tensors.params.append(p)
            tensors.grads.append(p.grad)
            tensors.exp_avgs.append(state["exp_avg"])
            tensors.exp_avg_sqs.append(state["exp_avg_sq"])
            tensors.masters.append(state.get("master_weight"))
            tensors.state_steps.append(state["step"])
            tensors.indices.append(first_index + offset)
            tensors.names.append(repr(names[offset]) if names else f"param group {group_index}, index {offset}")
        return tensors

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` (re-evaluating the loss) is run with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for result in getattr(self, "_last_step", []):
            result.resolve()  # the previous step's non-finite warnings, if nobody read its stats
        self._raise_on_nonfinite()

        results = []
        first_index = 0  # a parameter's position over all groups: its sample's identity, stable across resumes
        for group_index, group in enumerate(self.param_groups):
            tensors = self._init_group(group, group_index, first_index)
            first_index += len(group["params"])
            beta1, beta2 = group["betas"]
            results.append(
                mofo(
                    tensors.params,
                    tensors.grads,
                    tensors.exp_avgs,
                    tensors.exp_avg_sqs,
                    tensors.state_steps,
                    master_params=tensors.masters,
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
                    nonfinite=group["nonfinite"],
                    tensor_indices=tensors.indices,
                    tensor_names=tensors.names,
                    grads_checked=True,  # every group's, above, before any of them stepped
                    warned=self._reported(),
                )
            )
        self._last_step = results
        return loss

    def _reported(self) -> set[str]:
        reported = getattr(self, "_nonfinite_reported", None)  # absent in an optimizer unpickled from before
        if reported is None:
            reported = self._nonfinite_reported = set()
        return reported

    def _raise_on_nonfinite(self) -> None:
        """``nonfinite="raise"``: check the gradients of every such group before any group steps."""
        checked = [
            (group_index, offset, p)
            for group_index, group in enumerate(self.param_groups)
            if group["nonfinite"] == "raise"
            for offset, p in enumerate(group["params"])
            if p.grad is not None
        ]
        if not checked:
            return
        names = []
        for group_index, offset, _ in checked:
            param_names = self.param_groups[group_index].get("param_names")
            names.append(repr(param_names[offset]) if param_names else f"param group {group_index}, index {offset}")
        steps = [int(self.state[p]["step"].item()) + 1 if self.state.get(p) else 1 for _, _, p in checked]
        _check_finite([p.grad for _, _, p in checked], names, steps, where="MoFO")


@dataclass
class _GroupTensors:
    """What :meth:`MoFO._init_group` gathers for :func:`mofo`: one entry per tensor with a gradient."""

    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    masters: list[Tensor | None] = field(default_factory=list)
    state_steps: list[Tensor] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # positions over all groups: the samples' identities
    names: list[str] = field(default_factory=list)  # for warnings and errors


# ---- the functional step --------------------------------------------------------------------------------------------


def mofo(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    master_params: Sequence[Tensor | None] | None = None,
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
    tensor_names: Sequence[str] | None = None,
    warned: set[str] | None = None,
    grads_checked: bool = False,
) -> MoFOStepResult:
    """Functional MoFO step over lists of tensors (one param group); see :class:`MoFO` for the rule and options.

    Updates ``params``, ``exp_avgs``, ``exp_avg_sqs``, ``state_steps`` and the float32 ``master_params`` (one per
    parameter, ``None`` for a parameter without one) in place, and returns what moved. ``fused`` chooses each
    tensor's implementation: torch operations (``False``), the fused kernels where they apply (``None``: C on CPU),
    or the fused kernels required (``True``: C on CPU, Triton on CUDA). ``tensor_indices`` identify the tensors'
    samples (default: their positions in ``params``); give each tensor the same index at every step.
    ``tensor_names`` name them in warnings and errors (default ``"tensor i"``). A tensor with non-finite gradients
    is warned about once per name in ``warned`` (which collects the names), or at every call without it.
    ``grads_checked`` tells that the caller found every gradient finite already (:meth:`MoFO.step` checks all its
    ``nonfinite="raise"`` groups before stepping any), so that ``nonfinite="raise"`` need not read them again.
    """
    _validate_hyperparameters({"selection": selection, "fused": fused, "nonfinite": nonfinite}, where="mofo()")
    count = len(params)
    indices = range(count) if tensor_indices is None else tensor_indices
    names = [f"tensor {i}" for i in range(count)] if tensor_names is None else list(tensor_names)
    masters = [None] * count if master_params is None else list(master_params)
    if nonfinite == "raise" and not grads_checked:
        _check_finite(grads, names, [int(step.item()) + 1 for step in state_steps], where="mofo")

    scalars_by_step: dict[float, StepScalars] = {}  # the tensors of a group usually share their step
    eager = EagerKernels()
    members: list[tuple[BatchedKernels, Entry]] = []
    numels, filtered = [], []
    if state_steps:
        torch._foreach_add_(state_steps, 1)  # one call for the group, as torch's Adam does
    for p, g, m, v, w, step_t, index in zip(params, grads, exp_avgs, exp_avg_sqs, masters, state_steps, indices,
                                             strict=True):  # fmt: skip
        layout = _layout(p, "MoFO")
        tensors = _local_tensors(p, g, m, v, w)
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
        numel = layout.numel if layout is not None else tensors[0].numel()
        is_filtered = fraction is not None and p.dim() >= filter_min_ndim
        k = max(1, math.floor(fraction * numel)) if is_filtered else numel  # type: ignore[operator]
        kernels = kernels_for(fused, tensors[0], "MoFO", tensors) or eager
        members.append((kernels, Entry(*tensors, layout, k, sample_key(seed, index, int(step)), scalars)))
        numels.append(numel)
        filtered.append(is_filtered)

    result = MoFOStepResult(numels, filtered, names, warned)
    for positions, counts in step_group(members, selection, fraction, sample_size):
        result.add_pending(positions, counts)
    if result.ready:  # counts already on the host: warn now rather than at the next read
        result.resolve()
    return result


def _local_tensors(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, master: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The rank's parts of a parameter's tensors (the tensors themselves unless the parameter is a DTensor, whose
    gradient, moments and master copy must then be DTensors laid out alike)."""
    if not is_dtensor(param):
        return param, grad, exp_avg, exp_avg_sq, master
    layout = placements(param)
    for name, tensor in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("master_weight", master)):
        if tensor is not None and placements(tensor) != layout:
            raise ValueError(
                f"MoFO: the {name} of a DTensor parameter with placements {layout} must be a DTensor with the "
                f"same placements, got {type(tensor).__name__} {placements(tensor)}."
            )
    return local(param), local(grad), local(exp_avg), local(exp_avg_sq), None if master is None else local(master)


def _layout(param: Tensor, where: str) -> ShardLayout | None:
    """The parameter's shard layout (None: every rank holds the whole tensor), or the error naming the fix."""
    try:
        return shard_layout(param)
    except ValueError as err:
        raise ValueError(
            f"{where}: DTensor parameter of global shape {tuple(param.shape)}: {err}; MoFO agrees a global "
            "threshold for DTensors on a 1-D mesh with a Shard(dim) or Replicate() placement (FSDP2's fully_shard "
            "without tensor parallelism). Shard the model with fully_shard over one mesh dimension, or use "
            'strategy="ddp".'
        ) from None


# ---- non-finite gradients -------------------------------------------------------------------------------------------


def _check_finite(grads: Sequence[Tensor], names: Sequence[str], steps: Sequence[int], where: str) -> None:
    """``nonfinite="raise"``: a ``RuntimeError`` naming the first gradient with a NaN or infinity (all ranks of a
    DTensor's mesh agree, so that none enters the step's collectives alone), before anything changes."""
    flags = _nonfinite_flags(grads, across_shards=True)
    bad = [index for index, flag in enumerate(flags) if flag]
    if not bad:
        return
    index = bad[0]
    grad = grads[index]
    others = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
    raise RuntimeError(
        f'{where}(nonfinite="raise"): the gradient of {names[index]} (shape {tuple(grad.shape)}) has '
        f"{_nonfinite_count(grad)} non-finite entries (NaN or infinity) at step {steps[index]}{others}; no parameter "
        "and no optimizer state was changed, so this optimizer and the last checkpoint stay valid. Find the cause (a "
        'learning rate too high, float16 overflow without a GradScaler, a bad batch), or use nonfinite="skip" to '
        "leave such entries out of the step."
    )


def _nonfinite_flags(grads: Sequence[Tensor], *, across_shards: bool) -> list[bool]:
    """Whether each gradient holds a NaN or an infinity, with one host sync per device for the whole list.

    A DTensor is checked on its local shard; ``across_shards`` makes every rank of its mesh agree (a collective per
    mesh), so that all ranks raise together instead of some entering the step's collectives alone.
    """
    buckets: dict[Any, list[tuple[int, Tensor]]] = {}
    for position, grad in enumerate(grads):
        layout = shard_layout(grad) if across_shards else None
        grad = local(grad)
        if grad.numel():
            # One reduction pass without a temporary (isfinite().all() is 20-80x slower on CPU): NaN propagates
            # to both ends, and an infinity is one of them.
            low, high = torch.aminmax(grad)
            flag = ~(torch.isfinite(low) & torch.isfinite(high))
        else:
            flag = grad.new_zeros((), dtype=torch.bool)
        group = layout.group if layout is not None else None
        buckets.setdefault((grad.device, group), []).append((position, flag))
    flags = [False] * len(grads)
    for (_, group), entries in buckets.items():
        stacked = torch.stack([flag for _, flag in entries]).to(torch.int32)
        if group is not None:
            import torch.distributed as dist

            stacked = stacked.to(collective_device(group, prefer=stacked.device))
            dist.all_reduce(stacked, op=dist.ReduceOp.MAX, group=group)
        for (position, _), flag in zip(entries, stacked.tolist(), strict=True):
            flags[position] = bool(flag)
    return flags


def _nonfinite_count(grad: Tensor) -> int:
    """The number of NaN/inf entries of a gradient; of the whole tensor for a DTensor (a collective: every rank of
    its mesh must call it)."""
    count = torch.count_nonzero(~local(grad).isfinite()).reshape(1)
    layout = shard_layout(grad)
    if layout is not None:
        import torch.distributed as dist

        count = count.to(collective_device(layout.group, prefer=count.device))
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=layout.group)
    return int(count.item())


# ---- what a step moved ----------------------------------------------------------------------------------------------


_STATS_FIELDS = ("updated", "numel", "filtered_updated", "filtered_numel", "nonfinite", "fraction", "filtered_fraction")


class MoFOStepResult:
    """What one call of :func:`mofo` (one param group's step) moved, per tensor.

    The counts of the Triton kernels stay on the device until they are read (copied back asynchronously), so a GPU
    step need not wait for them; :attr:`stats` (or any :class:`MoFOStepStats` field, e.g. ``result.updated``)
    reads them. Reading them the first time warns once for each tensor whose gradient had non-finite entries.
    """

    def __init__(
        self, numels: list[int], filtered: list[bool], names: list[str], warned: set[str] | None = None
    ) -> None:
        self.numels = numels
        self.filtered = filtered
        self.names = names
        self.tensor_moved: list[int] = [0] * len(numels)  # per tensor, once resolved
        self.tensor_nonfinite: list[int] = [0] * len(numels)
        self._warned = warned
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

    @property
    def stats(self) -> MoFOStepStats:
        """The group's :class:`MoFOStepStats` (waits for the device's counts the first time)."""
        return self.resolve()

    def __getattr__(self, name: str) -> Any:
        if name in _STATS_FIELDS:  # only called for names the result does not have itself
            return getattr(self.stats, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def resolve(self) -> MoFOStepStats:
        """The group's stats; warns once for each tensor (not yet in ``warned``) that had non-finite gradients."""
        if self._stats is None:
            for positions, counts, event in self._pending:
                if event is not None:
                    event.synchronize()  # this step's kernels only, not later work
                for position, (moved, nonfinite) in zip(positions, counts.tolist(), strict=True):
                    self.tensor_moved[position], self.tensor_nonfinite[position] = moved, nonfinite
            self._pending = []
            updated = sum(self.tensor_moved)
            filtered_updated = sum(m for m, f in zip(self.tensor_moved, self.filtered, strict=True) if f)
            filtered_numel = sum(n for n, f in zip(self.numels, self.filtered, strict=True) if f)
            self._stats = MoFOStepStats(
                updated, sum(self.numels), filtered_updated, filtered_numel, sum(self.tensor_nonfinite)
            )
            for name, count, numel in zip(self.names, self.tensor_nonfinite, self.numels, strict=True):
                if count and (self._warned is None or name not in self._warned):
                    if self._warned is not None:
                        self._warned.add(name)
                    warnings.warn(
                        f"MoFO: the gradient of {name} had {count} non-finite entries (NaN or infinity) of {numel}; "
                        'nonfinite="skip" left them out of the step (their moments and weights are unchanged). '
                        "Warned once per tensor; MoFO.last_step_stats counts them at every step (`nonfinite`). "
                        'Use nonfinite="raise" to stop at the first one instead.',
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return self._stats


# ---- options --------------------------------------------------------------------------------------------------------


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
    if "selection" in group:
        as_choice(
            group["selection"],
            where=where,
            argument="selection",
            choices=SELECTIONS,
            fix='Use "exact" for the k-th largest |exp_avg| itself, "sampled" for a one-pass estimate of it.',
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
    if "nonfinite" in group:
        as_choice(
            group["nonfinite"],
            where=where,
            argument="nonfinite",
            choices=NONFINITE,
            fix='"skip" leaves entries with a NaN/inf gradient out of the step (moments and weight unchanged), '
            '"raise" stops before anything is changed.',
        )
    if "master_weights" in group:
        as_bool(group["master_weights"], where=where, argument="master_weights")


def _moment_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


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
