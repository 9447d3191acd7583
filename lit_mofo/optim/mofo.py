"""MoFO, the Momentum-Filtered Optimizer (arXiv 2407.20999).

Adam whose step moves, in each parameter tensor, only the entries with the largest first-moment magnitude.
The moments themselves are updated on every entry; the entries left out of a step stay bit-for-bit unchanged,
weight decay included. The arithmetic lives in plain functions over lists of tensors (:func:`mofo`); the class
only validates hyper-parameters, keeps the state and gathers the tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

__all__ = ["MoFO", "MoFOStepStats", "mofo", "selection_mask"]


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

    Args:
        params: tensors, param-group dicts or ``(name, tensor)`` pairs, as for any torch optimizer. A group may
            override every hyper-parameter below, ``fraction`` and ``filter_min_ndim`` included.
        lr: learning rate :math:`\gamma`, >= 0. The paper fine-tunes with 2e-5 and a cosine schedule.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: term added to the denominator, >= 0.
        weight_decay: decoupled weight decay :math:`\lambda`, >= 0, applied to the selected entries only
            (the paper uses 0).
        fraction: :math:`\alpha`, the share of each filtered tensor's entries moved per step, in (0, 1].
            The paper's setting is 0.15 (5-20% all work); ``None`` means the dense step for every tensor.
        filter_min_ndim: tensors with fewer dimensions than this take the dense step; >= 0. The default 2
            reproduces the reference code's dense step for biases and norm weights; 0 filters every tensor.

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
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "fraction": fraction,
            "filter_min_ndim": filter_min_ndim,
        }
        _validate_hyperparameters(defaults, where="MoFO()")
        self.last_step_stats: list[MoFOStepStats] = []
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate_hyperparameters(group, where=f"MoFO param group {len(self.param_groups) - 1}")
        for p in group["params"]:
            if torch.is_complex(p):
                raise ValueError(
                    f"MoFO does not support complex parameters (got a {p.dtype} tensor of shape "
                    f"{tuple(p.shape)}); optimize its real view (torch.view_as_real) instead."
                )
            if _is_dtensor(p):
                # A sharded tensor would be ranked per shard: a top-k that silently differs from the paper's.
                raise ValueError(
                    f"MoFO does not support distributed (DTensor) parameters yet (got one of global shape "
                    f"{tuple(p.shape)}): a sharded tensor's top-k would be taken per shard, not per tensor. "
                    'Train with DDP (strategy="ddp"), where every rank holds whole tensors.'
                )

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
    ) -> None:
        for p in group["params"]:
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

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` (re-evaluating the loss) is run with grad enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        stats = []
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            state_steps: list[Tensor] = []
            self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, state_steps)
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


def _is_dtensor(p: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def _moment_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def selection_mask(exp_avg: Tensor, fraction: float) -> Tensor | None:
    """The entries MoFO moves in a tensor: ``|m| >= k-th largest |m|``, ``k = max(1, floor(fraction*numel))``.

    Returns ``None`` when every entry is selected (``k == numel``), so callers can take the dense path.
    """
    numel = exp_avg.numel()
    k = max(1, math.floor(fraction * numel))
    if k >= numel:
        return None
    magnitude = exp_avg.abs()
    # The k-th largest is the (numel - k + 1)-th smallest; kthvalue is a selection, not a full sort.
    threshold = torch.kthvalue(magnitude.reshape(-1), numel - k + 1).values
    return magnitude >= threshold


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
) -> MoFOStepStats:
    """Functional MoFO step over lists of tensors (one param group); see :class:`MoFO` for the rule.

    Updates ``params``, ``exp_avgs``, ``exp_avg_sqs`` and ``state_steps`` in place and returns what moved.
    """
    stats = MoFOStepStats()
    for param, grad, exp_avg, exp_avg_sq, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True):
        step_t += 1
        grad = grad.to(exp_avg.dtype)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        step = step_t.item()
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        decay = 1 - lr * weight_decay

        filtered = fraction is not None and param.dim() >= filter_min_ndim
        mask = selection_mask(exp_avg, fraction) if filtered else None
        if mask is None:
            work = param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)
            if weight_decay != 0:
                work.mul_(decay)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            work.addcdiv_(exp_avg, denom, value=-step_size)
            if work is not param:
                param.copy_(work)
            updated = param.numel()
        else:
            # Only the selected entries are read, computed and written back: the rest stay bit-for-bit fixed.
            work = param.masked_select(mask).to(exp_avg.dtype)
            if weight_decay != 0:
                work.mul_(decay)
            denom = (exp_avg_sq.masked_select(mask).sqrt() / bias_correction2_sqrt).add_(eps)
            work.addcdiv_(exp_avg.masked_select(mask), denom, value=-step_size)
            param.masked_scatter_(mask, work.to(param.dtype))
            updated = work.numel()
        stats += MoFOStepStats(
            updated=updated,
            numel=param.numel(),
            filtered_updated=updated if filtered else 0,
            filtered_numel=param.numel() if filtered else 0,
        )
    return stats
