"""MoFO's arithmetic in torch operations: the eager backend, any device and dtype, and the kernels' reference.

The update rule of :class:`~lit_mofo.MoFO` for one tensor, as :func:`moments` and :func:`adam_update` compute it::

    finite = isfinite(g)                       # nonfinite="skip": other entries keep moments and weight
    m = lerp(m, g, 1 - beta1)                  # on the finite entries: all of them, selected or not
    v = beta2 * v + (1 - beta2) * g * g
    w = master if p == round(master) else p    # a float32 master copy, unless p was written by someone else
    w = w * (1 - lr * weight_decay)            # on the selected entries only
    w = w - (lr / (1 - beta1**t)) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)
    p = round(w); master = w                   # on the selected entries only; the others keep their bits

Each operation is torch's own (``lerp_``, ``addcmul_``, ``sqrt``, ``addcdiv_``), in the order torch's AdamW applies
them, so that ``fraction=1.0`` is :class:`torch.optim.AdamW`. The fused kernels (C, Triton) compute the same
operations in the same order, with correctly rounded ``sqrt`` and division.

:class:`EagerKernels` runs the selection driver (:mod:`lit_mofo.optim._selection`) with these functions, one tensor
at a time: the backend for every tensor the fused kernels do not take (``fused=False``, CUDA without ``fused=True``,
float64, non-contiguous tensors) and the reference the fused kernels are tested against.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lit_mofo.optim._selection import (
    C_ABOVE,
    C_INSIDE,
    C_MOVED,
    C_NAN,
    C_SKIPPED,
    RADIX_BINS,
    RADIX_ROUNDS,
    SOURCE_CANDIDATES,
    SOURCE_RANGE,
    Batch,
    Entry,
    StepScalars,
    sample_indices,
)

__all__ = ["EagerKernels", "adam_update", "moments"]


def moments(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, weight: float, beta2: float) -> Tensor:
    """Both moments, in place, on the entries whose gradient is finite (the others keep theirs, bit for bit);
    returns that mask."""
    grad = grad.to(exp_avg.dtype)
    finite = grad.isfinite()
    torch.where(finite, exp_avg.lerp(grad, weight), exp_avg, out=exp_avg)
    torch.where(finite, exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2), exp_avg_sq, out=exp_avg_sq)
    return finite


def adam_update(
    param: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    selected: Tensor,
    step: StepScalars,
    master: Tensor | None = None,
    every: bool = False,
) -> Tensor:
    """The AdamW step on the ``selected`` entries of ``param`` (and of its float32 ``master``); the others keep their
    bits. Returns the number of entries moved (a tensor on the parameter's device).

    ``every`` says that the caller wants every entry where ``selected``: the step is then computed on whole tensors
    (what torch's AdamW does), otherwise on the gathered selected entries only.
    """
    if every:
        work = _base(param, exp_avg, master).clone()
        if step.has_weight_decay:
            work.mul_(step.decay)
        work.addcdiv_(exp_avg, (exp_avg_sq.sqrt() / step.bias_correction2_sqrt).add_(step.eps), value=-step.step_size)
        if master is not None:
            torch.where(selected, work, master, out=master)
        torch.where(selected, work.to(param.dtype), param, out=param)
        return selected.sum()
    flat = param.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()
    if flat:  # gather by index: several times faster than masked_select/masked_scatter_
        index = selected.view(-1).nonzero().squeeze(1)
        m, v = exp_avg.view(-1).index_select(0, index), exp_avg_sq.view(-1).index_select(0, index)
        p = param.view(-1).index_select(0, index)
        kept = None if master is None else master.view(-1).index_select(0, index)
    else:
        m, v, p = exp_avg.masked_select(selected), exp_avg_sq.masked_select(selected), param.masked_select(selected)
        kept = None if master is None else master.masked_select(selected)
    work = _base(p, m, kept)
    if work is p or work is kept:
        work = work.clone()
    if step.has_weight_decay:
        work.mul_(step.decay)
    work.addcdiv_(m, (v.sqrt_() / step.bias_correction2_sqrt).add_(step.eps), value=-step.step_size)
    if flat:
        if master is not None:
            master.view(-1).index_copy_(0, index, work)
        param.view(-1).index_copy_(0, index, work.to(param.dtype))
    else:
        if master is not None:
            master.masked_scatter_(selected, work)
        param.masked_scatter_(selected, work.to(param.dtype))
    return torch.tensor(work.numel(), device=param.device)


def _base(param: Tensor, exp_avg: Tensor, master: Tensor | None) -> Tensor:
    """What the step starts from: the master copy where the parameter still holds its rounding (bit for bit), the
    parameter itself where it was written since (a reset, a loaded checkpoint), in the moments' precision."""
    if master is None:
        return param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)
    bits = torch.int16 if param.element_size() == 2 else torch.int32
    current = param.view(bits) == master.to(param.dtype).view(bits)
    return torch.where(current, master, param.to(master.dtype))


def _magnitude(entry: Entry) -> Tensor:
    """``|m|`` of the tensor, flattened, an entry with a non-finite gradient counting as 0."""
    return torch.where(entry.grad.reshape(-1).isfinite(), entry.exp_avg.reshape(-1).abs(), 0.0)


def _digits(values: Tensor, radix_round: int, prefix: Tensor) -> tuple[Tensor, Tensor]:
    """The round's digit of each float32 value's bit pattern, and whether its higher digits equal ``prefix``."""
    bits = values.to(torch.float32).view(torch.int32).to(torch.int64)
    shift, width = RADIX_ROUNDS[radix_round]
    digit = (bits >> shift) & ((1 << width) - 1)
    high = shift + width
    keep = torch.ones_like(digit, dtype=torch.bool) if high >= 32 else (bits >> high) == prefix
    return digit, keep


def _in_range(magnitude: Tensor, lo: Tensor, hi: Tensor, mode: int) -> Tensor:
    above = magnitude > lo if mode & 1 else magnitude >= lo
    below = magnitude < hi if mode & 2 else magnitude <= hi
    return above & below


class EagerKernels:
    """The selection driver's kernels as torch operations, one tensor at a time (see the module docstring)."""

    name = "torch operations"
    block = 1024
    fuses_sampling = False
    dtypes = frozenset({torch.float64, torch.float32, torch.bfloat16, torch.float16})

    def supports(self, param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, master: Tensor | None) -> bool:
        return True

    def sample(self, batch: Batch, out: Tensor) -> None:
        offset = 0
        for e in batch.entries:
            if e.sample:
                index = sample_indices(e.key, e.sample, e.numel, e.exp_avg.device)
                owned = None
                if e.layout is not None:
                    index, owned = e.layout.local_positions(index)
                m = e.exp_avg.reshape(-1).index_select(0, index)
                g = e.grad.reshape(-1).index_select(0, index).to(e.exp_avg.dtype)
                value = m.lerp_(g, e.scalars.weight).abs_().nan_to_num_(nan=math.inf, posinf=math.inf)
                value = torch.where(g.isfinite(), value, 0.0)
                out[offset : offset + e.sample] = value if owned is None else torch.where(owned, value, 0.0)
            offset += e.sample

    def select_sample(self, batch: Batch, samples: Tensor, ranks: Tensor) -> Tensor:
        rows = []
        offset = 0
        for e, wanted in zip(batch.entries, ranks.tolist(), strict=True):
            values = samples[offset : offset + e.sample]
            if e.sample:  # the rank-th largest is the (size - rank + 1)-th smallest: a selection, not a sort
                rows.append(torch.stack([torch.kthvalue(values, e.sample - r + 1).values for r in wanted]))
            else:
                rows.append(torch.zeros(ranks.shape[1], dtype=torch.float32, device=samples.device))
            offset += e.sample
        return torch.stack(rows)

    def moments_bracket(self, batch: Batch, lo: Tensor, hi: Tensor, counts: Tensor, candidates: Tensor) -> None:
        offset = 0
        for t, e in enumerate(batch.entries):
            finite = moments(e.grad, e.exp_avg, e.exp_avg_sq, e.scalars.weight, e.scalars.beta2).reshape(-1)
            a = torch.where(finite, e.exp_avg.reshape(-1).abs(), 0.0)
            inside = (a >= lo[t]) & (a <= hi[t])
            # count_nonzero is several times faster than a bool sum; NaN fails every comparison.
            counts[t, C_NAN] += torch.count_nonzero(a.isnan())
            counts[t, C_ABOVE] += torch.count_nonzero(a > hi[t])
            counts[t, C_SKIPPED] += torch.count_nonzero(~finite)
            values = a[inside]
            stored = min(values.numel(), e.capacity)
            candidates[offset : offset + stored] = values[:stored]
            counts[t, C_INSIDE] += values.numel()
            offset += e.capacity

    def histogram_candidates(
        self, batch: Batch, source: Tensor, prefix: Tensor, radix_round: int, counts: Tensor, candidates: Tensor,
        hist: Tensor,
    ) -> None:  # fmt: skip
        offset = 0
        for t, e in enumerate(batch.entries):
            if int(source[t]) == SOURCE_CANDIDATES:
                stored = min(int(counts[t, C_INSIDE]), e.capacity)
                digit, keep = _digits(candidates[offset : offset + stored], radix_round, prefix[t])
                hist[t] += torch.bincount(digit[keep], minlength=RADIX_BINS).to(hist.dtype)
            offset += e.capacity

    def histogram_range(
        self, batch: Batch, source: Tensor, lo: Tensor, hi: Tensor, mode: Tensor, prefix: Tensor, radix_round: int,
        counts: Tensor, hist: Tensor,
    ) -> None:  # fmt: skip
        for t, e in enumerate(batch.entries):
            if int(source[t]) == SOURCE_RANGE:
                a = _magnitude(e)
                # Rounded to float32 after the range test, as the candidates are.
                digit, keep = _digits(a[_in_range(a, lo[t], hi[t], int(mode[t]))], radix_round, prefix[t])
                hist[t] += torch.bincount(digit[keep], minlength=RADIX_BINS).to(hist.dtype)

    def update(self, batch: Batch, tau: Tensor, counts: Tensor) -> None:
        for t, e in enumerate(batch.entries):
            selected = (e.exp_avg.abs() >= tau[t]) & e.grad.isfinite()
            counts[t, C_MOVED] += adam_update(e.param, e.exp_avg, e.exp_avg_sq, selected, e.scalars, e.master)

    def fused(self, batch: Batch, tau: Tensor, counts: Tensor) -> None:
        for t, e in enumerate(batch.entries):
            s = e.scalars
            finite = moments(e.grad, e.exp_avg, e.exp_avg_sq, s.weight, s.beta2)
            selected = finite if e.dense else finite & (e.exp_avg.abs() >= tau[t])
            counts[t, C_MOVED] += adam_update(e.param, e.exp_avg, e.exp_avg_sq, selected, s, e.master, e.dense)
            counts[t, C_SKIPPED] += torch.count_nonzero(~finite)
