"""How MoFO finds each tensor's threshold without sorting it, on either backend and across shards.

``exact`` selection (the default) returns the k-th largest ``|m_t|`` itself, so the mask is exactly the spec's
``|m_t| >= tau``:

1. a stratified sample of ``|m_t|`` (one hashed position in each of ``s`` equal strata) gives a bracket
   ``[lo, hi]`` that holds the k-th largest value with overwhelming probability (four standard deviations of the
   sample quantile on either side);
2. the moment update's own pass counts the entries above ``hi`` (NaN ranks above everything, as in
   ``torch.topk``/``torch.kthvalue``) and copies the few inside the bracket (about 1-5% of the tensor);
3. a selection over those candidates (radix select in C, ``torch.kthvalue`` in torch) gives the threshold. When
   the counts show the bracket missed the threshold (or too many entries tie inside it), one extra pass collects
   the right range instead, so the answer is exact whatever the data; only the time changes.

``sampled`` selection takes ``tau`` as the matching quantile of a fixed-size sample (``sample_size`` entries at
hashed positions, the moments evaluated there before the pass), so moments, comparison and step fit in one pass.
With ``s`` samples the realised fraction has a standard deviation of at most ``sqrt(f (1 - f) / s)`` (stratifying
can only lower it).

The sample positions are a pure function of ``(seed, tensor index, step)`` (splitmix64), mirrored bit for bit by
the C kernels: no random generator state to carry, every DDP rank draws the same sample, and a run resumed from a
checkpoint (which holds the seed and each tensor's step) draws what the uninterrupted run would have.

Both algorithms run on a backend (:class:`EagerOps`, torch operations on any device, or the fused CPU kernels of
:mod:`lit_mofo.optim._fused`; :mod:`lit_mofo.optim._batched` runs them over many tensors at once with the thresholds
on the device, for the Triton kernels) and on a view of the tensor (:class:`LocalView` for whole tensors,
:class:`ShardView` for a DTensor sharded over a 1-D device mesh, where the sample, the counts and the candidates
are combined across ranks so that every rank gets the global tensor's threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = [
    "EagerOps",
    "LocalView",
    "ShardView",
    "StepScalars",
    "exact_threshold",
    "sample_indices",
    "sample_key",
    "sampled_threshold",
]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB

# Exact selection: tensors up to this size skip the sample and select among all their entries.
SMALL_TENSOR = 16384
# Half-width of the bracket in standard deviations of the sample quantile: a miss (one extra pass) has a
# probability of about 6e-5 per tensor and step.
BRACKET_Z = 4.0


@dataclass(frozen=True)
class StepScalars:
    """One tensor's step constants, as torch's AdamW computes them (Python floats, rounded to float32 by the ops)."""

    weight: float  # 1 - beta1, the lerp weight of the first moment
    beta2: float
    step_size: float  # lr / (1 - beta1**t)
    bias_correction2_sqrt: float  # sqrt(1 - beta2**t)
    eps: float
    decay: float  # 1 - lr * weight_decay
    has_weight_decay: bool


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def sample_key(seed: int, tensor_index: int, step: int) -> int:
    """The 64-bit key of one tensor's sample at one step."""
    z = _mix64((seed * _GOLDEN + 0x632BE59BD9B4E019) & _MASK64)
    z = _mix64((z ^ (tensor_index * _MIX1)) & _MASK64)
    return _mix64((z ^ (step * _MIX2)) & _MASK64)


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: Tensor, bits: int) -> Tensor:
    # Logical shift of uint64 bit patterns held in int64 (torch's >> is arithmetic).
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def sample_indices(key: int, size: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """Flat positions of a stratified sample, exactly as the C kernels draw them: sample ``j`` is uniform in the
    ``j``-th of ``size`` equal strata of ``[0, numel)``, at ``splitmix64(key + (j + 1) * golden)``.

    The positions increase with ``j`` (memory is read front to back) and cover the tensor evenly, which can only
    lower the variance of the sampled quantile. int64 multiplication wraps modulo 2**64 on every torch backend,
    so the bit patterns match the C kernel's uint64 arithmetic.
    """
    j = torch.arange(size, dtype=torch.int64, device=device)
    z = (j + 1) * _as_int64(_GOLDEN) + _as_int64(key)
    z = (z ^ _shift_right(z, 30)) * _as_int64(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _as_int64(_MIX2)
    z = z ^ _shift_right(z, 31)
    start = j * numel // size
    width = (j + 1) * numel // size - start
    return start + _shift_right(_shift_right(z, 32) * width, 32)


def bracket_sample_size(numel: int) -> int:
    """Exact selection's sample: about numel**(2/3) (balancing sampling against candidate work), 1024 to 65536."""
    return max(1024, min(65536, int(numel ** (2 / 3))))


def bracket_ranks(k: int, numel: int, size: int) -> tuple[int, int]:
    """1-based descending ranks in the sample of the bracket's ends: ``hi`` is the ``j_hi``-th largest sample
    value (0: no upper end), ``lo`` the ``j_lo``-th largest (``> size``: no lower end)."""
    q = k / numel
    mean = q * size
    spread = BRACKET_Z * math.sqrt(size * q * (1 - q)) + 1.0
    return max(0, math.floor(mean - spread)), math.ceil(mean + spread) + 1


def candidate_capacity(share: float, local: int) -> int:
    """Room for the candidates: twice the bracket's expected share, plus slack for the kernel's per-thread split."""
    return min(local, int(2 * share * local) + 4096)


class Ops(Protocol):
    """What a backend provides; :class:`EagerOps` and :class:`lit_mofo.optim._fused.CpuKernels` implement it.

    Non-finite gradients: an entry whose gradient is NaN or infinite is left out of the step (``nonfinite="skip"``):
    its moments and its weight stay unchanged, and it counts as ``|m| = 0`` in the sample, the counts and the
    collected values (so it is never needed to reach ``k``) while the update leaves it out. ``moments_bracket``
    and ``fused`` report how many such entries they met; ``update`` and ``collect`` leave them out when given the
    gradient (the caller gives it only when the tensor has some).
    """

    def sample_hashed(self, exp_avg: Tensor, grad: Tensor, key: int, size: int, weight: float, out: Tensor) -> None: ...

    def sample_at(self, exp_avg: Tensor, grad: Tensor, local_index: Tensor, weight: float, out: Tensor) -> None: ...

    def moments_bracket(
        self,
        grad: Tensor,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        weight: float,
        beta2: float,
        lo: float,
        hi: float,
        candidates: Tensor,
    ) -> tuple[int, int, int, int, int]: ...

    def collect(self, exp_avg: Tensor, lo: float, hi: float, mode: int, out: Tensor, grad: Tensor | None) -> int: ...

    def select(self, values: Tensor, count: int, kth_smallest: int) -> float: ...

    def nan_to_inf(self, values: Tensor) -> None: ...

    def update(
        self,
        param: Tensor,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        tau: float,
        dense: bool,
        step: StepScalars,
        grad: Tensor | None = None,
    ) -> int: ...

    def fused(
        self,
        param: Tensor,
        grad: Tensor,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        tau: float,
        dense: bool,
        step: StepScalars,
    ) -> tuple[int, int]: ...


def _in_range(magnitude: Tensor, lo: float, hi: float, mode: int) -> Tensor:
    above = magnitude > lo if mode & 1 else magnitude >= lo
    below = magnitude < hi if mode & 2 else magnitude <= hi
    return above & below


class EagerOps:
    """The backend made of torch operations: any device and dtype, several passes over memory.

    ``skip`` is the mask of the tensor's entries whose gradient is non-finite, for a tensor known to have some (a
    group-level check found them): the moment updates then leave those entries unchanged. Without it the moments
    are updated with torch's plain operations, as torch's AdamW does.
    """

    def __init__(self, skip: Tensor | None = None) -> None:
        self.skip = skip

    def supports(self, param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> bool:
        return True

    @staticmethod
    def _sample(exp_avg: Tensor, grad: Tensor, index: Tensor, weight: float) -> Tensor:
        m = exp_avg.reshape(-1).index_select(0, index)
        g = grad.reshape(-1).index_select(0, index).to(exp_avg.dtype)
        value = m.lerp_(g, weight).abs_()
        return value.masked_fill_(~g.isfinite(), 0.0)

    def sample_hashed(self, exp_avg: Tensor, grad: Tensor, key: int, size: int, weight: float, out: Tensor) -> None:
        index = sample_indices(key, size, exp_avg.numel(), exp_avg.device)
        out.copy_(self._sample(exp_avg, grad, index, weight))

    def sample_at(self, exp_avg: Tensor, grad: Tensor, local_index: Tensor, weight: float, out: Tensor) -> None:
        owned = local_index >= 0
        values = self._sample(exp_avg, grad, local_index.clamp(min=0), weight)
        out.copy_(torch.where(owned, values, torch.zeros_like(values)))

    def moments(self, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, weight: float, beta2: float) -> None:
        grad = grad.to(exp_avg.dtype)
        kept = None if self.skip is None else (exp_avg[self.skip], exp_avg_sq[self.skip])
        exp_avg.lerp_(grad, weight)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if kept is not None:  # the skipped entries get their moments back, bit for bit (whatever they held)
            exp_avg[self.skip], exp_avg_sq[self.skip] = kept

    def _skipped(self, grad: Tensor | None) -> Tensor | None:
        if self.skip is not None:
            return self.skip
        return None if grad is None else ~grad.isfinite()

    def _magnitude(self, exp_avg: Tensor, grad: Tensor | None) -> Tensor:
        magnitude = exp_avg.abs()
        skip = self._skipped(grad)
        if skip is not None:
            magnitude.masked_fill_(skip, 0.0)
        return magnitude.reshape(-1)

    def moments_bracket(
        self,
        grad: Tensor,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        weight: float,
        beta2: float,
        lo: float,
        hi: float,
        candidates: Tensor,
    ) -> tuple[int, int, int, int, int]:
        self.moments(grad, exp_avg, exp_avg_sq, weight, beta2)
        magnitude = self._magnitude(exp_avg, None)
        inside = magnitude >= lo
        inside &= magnitude <= hi
        # count_nonzero is several times faster than a bool sum; NaN fails every comparison.
        counts = [
            torch.count_nonzero(magnitude.isnan()),
            torch.count_nonzero(magnitude <= hi),
            torch.count_nonzero(inside),
        ]
        if self.skip is not None:
            counts.append(torch.count_nonzero(self.skip))
        values = torch.stack(counts).tolist()
        nan, not_above, inside_count = values[:3]
        skipped = values[3] if self.skip is not None else 0
        values = magnitude[inside]
        stored = min(values.numel(), candidates.numel())
        candidates[:stored].copy_(values[:stored])
        return nan, magnitude.numel() - not_above - nan, inside_count, stored, skipped

    def collect(self, exp_avg: Tensor, lo: float, hi: float, mode: int, out: Tensor, grad: Tensor | None) -> int:
        magnitude = self._magnitude(exp_avg, grad)
        values = magnitude[_in_range(magnitude, lo, hi, mode)]
        out[: values.numel()].copy_(values)
        return values.numel()

    def select(self, values: Tensor, count: int, kth_smallest: int) -> float:
        return torch.kthvalue(values[:count], kth_smallest + 1).values.item()

    def nan_to_inf(self, values: Tensor) -> None:
        values.nan_to_num_(nan=math.inf, posinf=math.inf)

    def update(
        self,
        param: Tensor,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        tau: float,
        dense: bool,
        step: StepScalars,
        grad: Tensor | None = None,
    ) -> int:
        skip = self._skipped(grad)
        if dense and skip is None:
            work = param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)
            if step.has_weight_decay:
                work.mul_(step.decay)
            denom = (exp_avg_sq.sqrt() / step.bias_correction2_sqrt).add_(step.eps)
            work.addcdiv_(exp_avg, denom, value=-step.step_size)
            if work is not param:
                param.copy_(work)
            return param.numel()
        # Only the selected entries are read, computed and written back: the rest stay bit-for-bit fixed.
        mask = ~skip if dense else exp_avg.abs() >= tau
        if skip is not None and not dense:
            mask &= ~skip
        flat = param.is_contiguous() and exp_avg.is_contiguous() and exp_avg_sq.is_contiguous()
        if flat:  # gather by index: several times faster than masked_select/masked_scatter_
            index = mask.view(-1).nonzero().squeeze(1)
            work = param.view(-1).index_select(0, index).to(exp_avg.dtype)
            m, v = exp_avg.view(-1).index_select(0, index), exp_avg_sq.view(-1).index_select(0, index)
        else:
            work = param.masked_select(mask).to(exp_avg.dtype)
            m, v = exp_avg.masked_select(mask), exp_avg_sq.masked_select(mask)
        if step.has_weight_decay:
            work.mul_(step.decay)
        denom = (v.sqrt_() / step.bias_correction2_sqrt).add_(step.eps)
        work.addcdiv_(m, denom, value=-step.step_size)
        if flat:
            param.view(-1).index_copy_(0, index, work.to(param.dtype))
        else:
            param.masked_scatter_(mask, work.to(param.dtype))
        return work.numel()

    def fused(
        self,
        param: Tensor,
        grad: Tensor,
        exp_avg: Tensor,
        exp_avg_sq: Tensor,
        tau: float,
        dense: bool,
        step: StepScalars,
    ) -> tuple[int, int]:
        self.moments(grad, exp_avg, exp_avg_sq, step.weight, step.beta2)
        moved = self.update(param, exp_avg, exp_avg_sq, tau, dense, step)
        return moved, 0 if self.skip is None else int(torch.count_nonzero(self.skip))


class Scratch:
    """One float32 buffer per device, grown on demand and dropped after the optimizer step."""

    def __init__(self) -> None:
        self._buffers: dict[torch.device, Tensor] = {}

    def get(self, numel: int, device: torch.device) -> Tensor:
        buffer = self._buffers.get(device)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32, device=device)
            self._buffers[device] = buffer
        return buffer[:numel]


class LocalView:
    """A whole tensor on this rank: nothing to combine."""

    def __init__(self, numel: int) -> None:
        self.numel = numel

    def sample(self, ops: Ops, exp_avg: Tensor, grad: Tensor, key: int, size: int, weight: float, out: Tensor) -> None:
        ops.sample_hashed(exp_avg, grad, key, size, weight, out)

    def reduce_counts(self, counts: tuple[int, int, int, int, int]) -> tuple[int, int, int, bool]:
        return counts[0], counts[1], counts[2], counts[3] == counts[2]

    def gather_values(self, values: Tensor) -> Tensor:
        return values

    def local_counts(self, values: tuple[int, ...]) -> tuple[int, ...]:
        return values


class ShardView:
    """A DTensor sharded along one dimension over a 1-D device mesh: every collective is over that mesh's group.

    The sample positions are drawn over the global tensor; each rank fills the ones it holds and a sum gives all
    ranks the whole sample. Counts are summed and candidates concatenated, so the threshold is the global
    tensor's, exactly as if one process held it.
    """

    def __init__(self, global_shape: torch.Size, dim: int, local_shape: torch.Size, group: Any, rank: int, world: int):
        self.numel = math.prod(global_shape)
        self.group = group
        self.size = global_shape[dim]
        self.inner = math.prod(global_shape[dim + 1 :])
        chunk = -(-self.size // world)  # torch.chunk's split, which Shard(dim) follows
        self.start = min(rank * chunk, self.size)
        self.length = local_shape[dim] if len(local_shape) else 0
        expected = max(0, min(chunk, self.size - self.start))
        if self.length != expected:
            raise ValueError(
                f"MoFO: a DTensor shard of global shape {tuple(global_shape)} holds {self.length} entries of dim "
                f"{dim} on rank {rank}, where torch.chunk's split gives {expected}; uneven custom shardings are "
                "not supported."
            )

    def sample(self, ops: Ops, exp_avg: Tensor, grad: Tensor, key: int, size: int, weight: float, out: Tensor) -> None:
        import torch.distributed as dist

        index = sample_indices(key, size, self.numel, exp_avg.device)
        along = (index // self.inner) % self.size
        outer = index // (self.inner * self.size)
        local = outer * (self.length * self.inner) + (along - self.start) * self.inner + index % self.inner
        owned = (along >= self.start) & (along < self.start + self.length)
        ops.sample_at(exp_avg, grad, torch.where(owned, local, -1), weight, out)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)  # each position is filled by one rank

    def reduce_counts(self, counts: tuple[int, int, int, int, int]) -> tuple[int, int, int, bool]:
        import torch.distributed as dist

        device = _collective_device(self.group)
        total = torch.tensor([counts[0], counts[1], counts[2], int(counts[3] < counts[2])], device=device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        nan, above, inside, overflowed = total.tolist()
        return nan, above, inside, overflowed == 0

    def gather_values(self, values: Tensor) -> Tensor:
        import torch.distributed as dist

        device = _collective_device(self.group)
        world = dist.get_world_size(self.group)
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([values.numel()], device=device), group=self.group)
        counts = [int(s.item()) for s in sizes]
        longest = max(counts)
        padded = torch.zeros(longest, dtype=torch.float32, device=device)
        padded[: values.numel()].copy_(values)
        parts = [torch.empty(longest, dtype=torch.float32, device=device) for _ in range(world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)]).to(values.device)

    def local_counts(self, values: tuple[int, ...]) -> tuple[int, ...]:
        """Per-rank counts summed over the mesh (one collective for all of them)."""
        import torch.distributed as dist

        total = torch.tensor(values, dtype=torch.int64, device=_collective_device(self.group))
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return tuple(total.tolist())


def _collective_device(group: Any) -> torch.device:
    import torch.distributed as dist

    backend = dist.get_backend(group)
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


View = LocalView | ShardView


def _kth_largest(ops: Ops, values: Tensor, rank: int) -> float:
    """The ``rank``-th largest (1-based) of ``values`` (NaN-free); reorders them."""
    return ops.select(values, values.numel(), values.numel() - rank)


def sampled_threshold(
    ops: Ops,
    view: View,
    exp_avg: Tensor,
    grad: Tensor,
    key: int,
    size: int,
    fraction: float,
    weight: float,
    scratch: Scratch,
) -> float:
    """The ``floor(fraction * size)``-th largest ``|m_t|`` of the tensor's sample (NaN counted as +inf, an entry with
    a non-finite gradient as 0)."""
    sample = scratch.get(size, exp_avg.device)
    view.sample(ops, exp_avg, grad, key, size, weight, sample)
    ops.nan_to_inf(sample)
    return _kth_largest(ops, sample, max(1, math.floor(fraction * size)))


def exact_threshold(
    ops: Ops,
    view: View,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    k: int,
    key: int,
    step: StepScalars,
    scratch: Scratch,
) -> tuple[float, int]:
    """Update both moments and return the k-th largest ``|m_t|`` of the (global) tensor, and how many of this
    rank's entries had a non-finite gradient (left unchanged, counted as ``|m_t| = 0``).

    NaN ranks above every number, as in ``torch.topk``; the result is NaN when the k largest include a NaN (then
    ``|m| >= tau`` selects nothing, like the reference definition).
    """
    numel, local = view.numel, exp_avg.numel()
    device = exp_avg.device
    if numel <= SMALL_TENSOR:
        lo, hi, share = 0.0, math.inf, 1.0
    else:
        size = bracket_sample_size(numel)
        j_hi, j_lo = bracket_ranks(k, numel, size)
        sample = scratch.get(size, device)
        view.sample(ops, exp_avg, grad, key, size, step.weight, sample)
        ops.nan_to_inf(sample)
        hi = math.inf if j_hi < 1 else _kth_largest(ops, sample, j_hi)
        lo = 0.0 if j_lo > size else _kth_largest(ops, sample, j_lo)
        share = (min(j_lo, size) - j_hi) / size
    candidates = scratch.get(candidate_capacity(share, local), device)
    counts = ops.moments_bracket(grad, exp_avg, exp_avg_sq, step.weight, step.beta2, lo, hi, candidates)
    nan, above, inside, complete = view.reduce_counts(counts)
    local_nan, local_above, local_inside, stored, skipped = counts
    # Collecting again must count the skipped entries as 0, as the bracket pass did: it needs the gradient then.
    skip_grad = grad if skipped else None
    if k <= nan:
        return math.nan, skipped
    if k <= nan + above:  # the bracket sits too low: the threshold is above hi
        rank = k - nan
        values = _collect(ops, exp_avg, hi, math.inf, 1, local_above, skip_grad)
    elif k <= nan + above + inside:
        rank = k - nan - above
        if lo == hi:
            return lo, skipped
        if complete:
            values = candidates[:stored]
        else:  # some rank's candidate buffer overflowed (many ties, or candidates bunched in one chunk)
            values = _collect(ops, exp_avg, lo, hi, 0, local_inside, skip_grad)
    else:  # the bracket sits too high: the threshold is below lo
        rank = k - nan - above - inside
        values = _collect(ops, exp_avg, 0.0, lo, 2, local - local_nan - local_above - local_inside, skip_grad)
    return _kth_largest(ops, view.gather_values(values), rank), skipped


def _collect(ops: Ops, exp_avg: Tensor, lo: float, hi: float, mode: int, count: int, grad: Tensor | None) -> Tensor:
    # A fresh buffer of exactly the counted size (at most one tensor): the scratch one holds the candidates.
    out = torch.empty(count, dtype=torch.float32, device=exp_avg.device)
    found = ops.collect(exp_avg, lo, hi, mode, out, grad)
    if found != count:
        raise RuntimeError(f"MoFO internal error: collected {found} entries where the counts gave {count}.")
    return out
