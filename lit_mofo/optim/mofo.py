"""MoFO, the Momentum-Filtered Optimizer (arXiv 2407.20999).

Adam whose step moves, in each parameter tensor, only the entries with the largest first-moment magnitude.
The moments themselves are updated on every entry; the entries left out of a step stay bit-for-bit unchanged,
weight decay included. The arithmetic lives in plain functions over lists of tensors (:func:`mofo`); the class
only validates hyper-parameters, keeps the state and gathers the tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from lit_mofo.optim import _fused
from lit_mofo.optim._selection import (
    EagerOps,
    LocalView,
    Ops,
    Scratch,
    ShardView,
    StepScalars,
    exact_threshold,
    sample_key,
    sampled_threshold,
)

__all__ = ["MoFO", "MoFOStepStats", "mofo", "selection_mask"]

SELECTIONS = ("exact", "sampled")
# Options added after the first release: checkpoints saved before them get these values on load.
_LATER_DEFAULTS: dict[str, Any] = {"selection": "exact", "fused": None, "sample_size": 65536, "seed": 0}


@dataclass(frozen=True)
class MoFOStepStats:
    """What one param group's last step moved.

    ``updated`` counts the entries the step changed (every entry of a densely stepped tensor, the selected
    entries of a filtered one, ties included); ``numel`` counts the entries of the tensors that had a gradient.
    ``filtered_*`` restrict both to the filtered tensors.
    """

    updated: int = 0
    numel: int = 0
    filtered_updated: int = 0
    filtered_numel: int = 0

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
    always uses torch operations. There is no fused GPU kernel yet: on CUDA both selections run as torch
    operations (the exact one still without a full sort).

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
        fused: ``None`` picks the fused CPU kernels where they apply, ``True`` requires them, ``False`` uses torch
            operations only (like torch's ``fused``/``foreach`` flags).
        sample_size: entries in the sampled selection's sample, >= 1024; the realised fraction's standard
            deviation scales as ``1/sqrt(sample_size)``.
        seed: seed of the sample positions, an int in [0, 2**63); the same on every rank by construction.

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
        }
        _validate_hyperparameters(defaults, where="MoFO()")
        self.last_step_stats: list[MoFOStepStats] = []
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"MoFO param group {len(self.param_groups) - 1}"
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
            if _fused.load() is None:
                raise RuntimeError(
                    f"{where}: fused=True, but the fused MoFO kernels are unavailable "
                    f"({_fused.unavailable_reason()}). Use fused=None to fall back to torch operations "
                    "automatically, or fused=False."
                )
            for p in group["params"]:
                if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                    raise ValueError(
                        f"{where}: fused=True, but the fused MoFO kernels step CPU tensors of dtype float32, "
                        f"bfloat16 or float16; got a {p.dtype} parameter of shape {tuple(p.shape)} on {p.device}. "
                        "Use fused=None to fall back to torch operations for such tensors, or fused=False."
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

        stats = []
        first_index = 0  # a parameter's position over all groups: its sample's identity, stable across resumes
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            state_steps: list[Tensor] = []
            indices: list[int] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, state_steps, indices, first_index)
            first_index += len(group["params"])
            beta1, beta2 = group["betas"]
            stats.append(
                mofo(
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
            )
        self.last_step_stats = stats
        return loss


def _validate_hyperparameters(group: dict[str, Any], where: str) -> None:
    def bad(name: str, value: Any, valid: str, fix: str) -> ValueError:
        return ValueError(f"{where}: {name}={value!r} is invalid; the valid range is {valid}. {fix}")

    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    if isinstance(lr, Tensor) or not lr >= 0.0:
        raise bad("lr", lr, "a float >= 0", "The MoFO paper fine-tunes with lr=2e-5.")
    if not eps >= 0.0:
        raise bad("eps", eps, "eps >= 0", "The usual value is 1e-8.")
    if not weight_decay >= 0.0:
        raise bad("weight_decay", weight_decay, "weight_decay >= 0", "The MoFO paper uses 0.")
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise bad("betas", betas, "two floats, each in [0, 1)", "The usual value is (0.9, 0.999).")
    fraction = group["fraction"]
    if fraction is not None and (isinstance(fraction, bool) or not 0.0 < fraction <= 1.0):
        raise bad(
            "fraction",
            fraction,
            "(0, 1], or None for the dense Adam step",
            "The MoFO paper's setting is 0.15 (5-20% all work).",
        )
    filter_min_ndim = group["filter_min_ndim"]
    if isinstance(filter_min_ndim, bool) or not isinstance(filter_min_ndim, int) or filter_min_ndim < 0:
        raise bad(
            "filter_min_ndim",
            filter_min_ndim,
            "an int >= 0",
            "Use 2 to step biases and norm weights densely (the reference code's rule), 0 to filter every tensor.",
        )
    selection = group.get("selection", "exact")
    if selection not in SELECTIONS:
        raise bad(
            "selection",
            selection,
            f"one of {SELECTIONS}",
            'Use "exact" for the k-th largest |exp_avg| itself, "sampled" for a one-pass estimate of it.',
        )
    fused = group.get("fused")
    if fused not in (None, True, False):
        raise bad(
            "fused",
            fused,
            "None, True or False",
            "None uses the fused CPU kernels where they apply, True requires them, False uses torch operations.",
        )
    sample_size = group.get("sample_size", 65536)
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1024:
        raise bad(
            "sample_size",
            sample_size,
            "an int >= 1024",
            "The default 65536 keeps the sampled fraction within +-0.5 percentage points of the target.",
        )
    seed = group.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise bad("seed", seed, "an int in [0, 2**63)", "Any fixed value works; it only picks the sample positions.")


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


def selection_mask(exp_avg: Tensor, fraction: float) -> Tensor | None:
    """The entries MoFO moves in a tensor: ``|m| >= k-th largest |m|``, ``k = max(1, floor(fraction*numel))``.

    The reference definition (one ``torch.kthvalue`` over the whole tensor), kept as the specification that the
    optimizer's faster selection is tested against. Returns ``None`` when every entry is selected
    (``k == numel``), so callers can take the dense path.
    """
    numel = exp_avg.numel()
    k = max(1, math.floor(fraction * numel))
    if k >= numel:
        return None
    magnitude = exp_avg.abs()
    # The k-th largest is the (numel - k + 1)-th smallest; kthvalue is a selection, not a full sort.
    threshold = torch.kthvalue(magnitude.reshape(-1), numel - k + 1).values
    return magnitude >= threshold


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
    tensor_indices: Sequence[int] | None = None,
) -> MoFOStepStats:
    """Functional MoFO step over lists of tensors (one param group); see :class:`MoFO` for the rule and options.

    Updates ``params``, ``exp_avgs``, ``exp_avg_sqs`` and ``state_steps`` in place and returns what moved.
    ``tensor_indices`` identify the tensors' samples (default: their positions in ``params``); give each tensor
    the same index at every step.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"mofo: selection={selection!r} is invalid; the valid choices are {SELECTIONS}.")
    indices = range(len(params)) if tensor_indices is None else tensor_indices
    eager = EagerOps()
    scratch = Scratch()
    scalars_by_step: dict[float, StepScalars] = {}  # the tensors of a group usually share their step
    updated = total = filtered_updated = filtered_total = 0
    for param, grad, exp_avg, exp_avg_sq, step_t, index in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, indices, strict=True
    ):
        step_t += 1
        step = step_t.item()
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
        view, (p, g, m, v) = _local_view(param, grad, exp_avg, exp_avg_sq)
        ops = _pick_ops(fused, p, g, m, v, eager)
        numel = view.numel
        filtered = fraction is not None and param.dim() >= filter_min_ndim
        k = max(1, math.floor(fraction * numel)) if filtered else numel  # type: ignore[operator]
        if k >= numel:
            moved = ops.fused(p, g, m, v, 0.0, True, scalars)
        elif selection == "sampled" and numel > sample_size:
            key = sample_key(seed, index, int(step))
            tau = sampled_threshold(ops, view, m, g, key, sample_size, fraction, scalars.weight, scratch)  # type: ignore[arg-type]
            moved = ops.fused(p, g, m, v, tau, False, scalars)
        else:
            key = sample_key(seed, index, int(step))
            tau = exact_threshold(ops, view, g, m, v, k, key, scalars, scratch)
            moved = ops.update(p, m, v, tau, False, scalars)
        moved = view.local_count(moved)
        updated += moved
        total += numel
        if filtered:
            filtered_updated += moved
            filtered_total += numel
    return MoFOStepStats(updated, total, filtered_updated, filtered_total)
