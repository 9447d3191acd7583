"""MoFO's batched step: many tensors per kernel launch, every threshold kept on the device, no host synchronisation.

The per-tensor algorithms of :mod:`lit_mofo.optim._selection` return each tensor's threshold as a Python float,
which costs a device synchronisation per tensor on a GPU (and a launch per operation per tensor). Here the same
algorithms run over a *batch* of tensors (one parameter dtype, one device, one process group) with one launch per
operation, and every per-tensor value (the sample, the bracket, the counts, the threshold) stays in a device tensor:

- ``sampled``: one kernel samples every tensor's ``|m_t|`` (the same hashed positions as the per-tensor path),
  ``torch.kthvalue`` along the sample rows gives each threshold, and one fused kernel does moments, comparison and
  step for all tensors (the dense tensors of the group ride along with ``dense=1``);
- ``exact``: the sample brackets each threshold (one sort of the sample rows), the moment kernel counts the entries
  above the bracket and appends the ones inside it to each tensor's candidate region (an atomic cursor per tensor),
  and three rounds of a radix histogram (11, 11 and 10 bits of the float's bit pattern) over the candidates give the
  k-th largest value itself. Which source each tensor's selection reads (its candidates, or - when the counts show
  the bracket missed or the candidate region overflowed - a range of the whole tensor) is decided on the device, so
  every repair branch of the per-tensor path exists here too without a host round trip; the histograms of sharded
  tensors are summed over the mesh, which is the global tensor's histogram.

Entries with a non-finite gradient follow ``MoFO(nonfinite="skip")``: moments and weight unchanged, ``|m| = 0`` in
the selection, never moved. The host builds two small tables per batch and step (pointers, sizes, sample keys,
ranks; the step scalars) and copies them to the device without waiting; the only data that comes back is the
moved/skipped counts for :attr:`MoFO.last_step_stats`, copied asynchronously and read when asked for.

:class:`TorchBatchedKernels` is the pure-torch reference of every kernel (same inputs, same outputs), which the
Triton kernels of :mod:`lit_mofo.optim._triton` are tested against.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lit_mofo.optim import _selection
from lit_mofo.optim._selection import LocalView, ShardView, StepScalars, sample_indices

__all__ = ["Batch", "BatchedKernels", "Entry", "TorchBatchedKernels", "load_triton", "step_exact", "step_fused"]

log = logging.getLogger(__name__)

# Columns of the int64 metadata table (one row per tensor).
M_PARAM, M_GRAD, M_EXP_AVG, M_EXP_AVG_SQ = 0, 1, 2, 3  # element offsets from the batch's parameter / moment base
M_NUMEL = 4  # entries on this rank
M_GLOBAL_NUMEL, M_INNER, M_SIZE, M_START, M_LENGTH = 5, 6, 7, 8, 9  # sample positions over a (sharded) tensor
M_KEY = 10  # sample key, the uint64 bit pattern
M_SAMPLE = 11  # sample size (0: no sample)
M_CAND_OFFSET, M_CAND_CAPACITY = 12, 13  # the tensor's region of the candidate buffer
M_DENSE = 14  # 1: every entry with a finite gradient moves
M_K, M_J_HI, M_J_LO = 15, 16, 17  # k (global), the bracket's ranks in the sample
M_COLUMNS = 18
# Columns of the float32 step-scalar table, rounded to float32 as the C kernels round them.
S_WEIGHT, S_BETA2, S_ONE_MINUS_BETA2, S_EPS, S_DECAY, S_NEG_STEP_SIZE, S_BC2_SQRT, S_HAS_WD = range(8)
S_COLUMNS = 8
# Columns of the int64 per-tensor counts (this rank's entries).
C_NAN, C_ABOVE, C_INSIDE, C_SKIPPED, C_MOVED = range(5)
C_COLUMNS = 5

# Radix selection over the bit patterns of non-negative float32 values: (shift, bits) per round.
RADIX_ROUNDS = ((21, 11), (10, 11), (0, 10))
RADIX_BINS = 2048
# Sources of a tensor's exact selection, decided on the device.
SOURCE_NONE, SOURCE_CANDIDATES, SOURCE_RANGE = 0, 1, 2

# At most this many entries per batch: bounds the candidate buffer (about 2% of the entries) of one launch.
BATCH_ENTRIES = 1 << 30
# Tests only: step CPU tensors with fused=True through the Triton kernels (under TRITON_INTERPRET=1).
ROUTE_CPU_TENSORS = False


@dataclass
class Entry:
    """One tensor of a batch: its local tensors, its view (whole or shard) and this step's constants."""

    param: Tensor
    grad: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    view: LocalView | ShardView
    k: int
    dense: bool
    key: int
    scalars: StepScalars
    sample: int = 0  # sample size, 0 for none
    j_hi: int = 0
    j_lo: int = 0
    capacity: int = 0  # candidate capacity (exact selection)


def exact_entry(entry: Entry) -> Entry:
    """Fill in the exact selection's sample size, bracket ranks and candidate capacity, by the per-tensor path's
    rules (looked up in :mod:`~lit_mofo.optim._selection` at each call, so that tests can force every branch)."""
    numel, local = entry.view.numel, entry.exp_avg.numel()
    if numel <= _selection.SMALL_TENSOR:
        entry.sample, entry.j_hi, entry.j_lo, share = 0, 0, 1, 1.0
    else:
        entry.sample = _selection.bracket_sample_size(numel)
        entry.j_hi, entry.j_lo = _selection.bracket_ranks(entry.k, numel, entry.sample)
        share = (min(entry.j_lo, entry.sample) - entry.j_hi) / entry.sample
    entry.capacity = _selection.candidate_capacity(share, local)
    return entry


def _uint64_bits(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class Batch:
    """Tensors stepped by the same launches, with their tables on the device.

    ``block`` is the number of entries a kernel program handles; the block tables map each program to its tensor.
    ``group`` is the process group of sharded tensors (every collective of the batch is over it), else None.

    Tensors are addressed as element offsets from two base tensors (the first parameter, the first moment), which
    the kernels receive as arguments: Triton then knows the bases' alignment, and with ``param_align`` /
    ``moment_align`` (16 bytes in elements when every tensor is 16-byte aligned, else 1) it emits vector loads.
    """

    def __init__(self, entries: list[Entry], block: int, group: Any = None) -> None:
        self.entries = entries
        self.block = block
        self.group = group
        first = entries[0].param
        self.device = first.device
        self.dtype = first.dtype
        self.size = len(entries)
        self.sample_max = max(e.sample for e in entries)
        self.param_base, self.moment_base = first, entries[0].exp_avg
        param_size, base_param, base_moment = first.element_size(), first.data_ptr(), self.moment_base.data_ptr()
        tensors = [t for e in entries for t in (e.param, e.grad, e.exp_avg, e.exp_avg_sq)]
        pointers = [(t.data_ptr(), t.element_size()) for t in tensors]
        if any(address % size for address, size in pointers):
            raise ValueError("MoFO's batched kernels need tensors aligned to their element size")
        aligned = all(address % 16 == 0 for address, _ in pointers)
        self.param_align = 16 // param_size if aligned else 1
        self.moment_align = 4 if aligned else 1
        meta, scal = [], []
        cand_offset = 0
        element_blocks, candidate_blocks = [0], [0]
        for e in entries:
            view = e.view
            if isinstance(view, ShardView):
                inner, size, start, length = view.inner, view.size, view.start, view.length
            else:
                inner, size, start, length = 1, view.numel, 0, view.numel
            meta.append(
                [
                    (e.param.data_ptr() - base_param) // param_size,
                    (e.grad.data_ptr() - base_param) // param_size,
                    (e.exp_avg.data_ptr() - base_moment) // 4,
                    (e.exp_avg_sq.data_ptr() - base_moment) // 4,
                    e.exp_avg.numel(),
                    view.numel,
                    inner,
                    size,
                    start,
                    length,
                    _uint64_bits(e.key),
                    e.sample,
                    cand_offset,
                    e.capacity,
                    int(e.dense),
                    e.k,
                    e.j_hi,
                    e.j_lo,
                ]
            )
            s = e.scalars
            scal.append(
                [
                    s.weight,
                    s.beta2,
                    1 - s.beta2,
                    s.eps,
                    s.decay,
                    -s.step_size,
                    s.bias_correction2_sqrt,
                    float(s.has_weight_decay),
                ]
            )
            cand_offset += e.capacity
            element_blocks.append(element_blocks[-1] + -(-e.exp_avg.numel() // block))
            candidate_blocks.append(candidate_blocks[-1] + -(-e.capacity // block))
        self.candidates_total = cand_offset
        self.element_blocks = element_blocks[-1]
        self.candidate_blocks = candidate_blocks[-1]
        self.meta = _to_device(torch.tensor(meta, dtype=torch.int64), self.device)
        self.scal = _to_device(torch.tensor(scal, dtype=torch.float32), self.device)
        self.block_starts = _to_device(torch.tensor(element_blocks, dtype=torch.int64), self.device)
        self.candidate_block_starts = _to_device(torch.tensor(candidate_blocks, dtype=torch.int64), self.device)

    def column(self, index: int) -> Tensor:
        return self.meta[:, index]

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the batch's process group (a no-op for whole tensors); no host synchronisation."""
        if self.group is None:
            return tensor
        import torch.distributed as dist

        device = _selection._collective_device(self.group)
        if tensor.device == device:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            return tensor
        reduced = tensor.to(device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.group)
        return tensor.copy_(reduced)


def _to_device(table: Tensor, device: torch.device) -> Tensor:
    """A host table on ``device`` without waiting for the device (pinned memory, asynchronous copy)."""
    if device.type != "cuda":
        return table
    return table.pin_memory().to(device, non_blocking=True)


class BatchedKernels(Protocol):
    """One launch per operation over a whole :class:`Batch`; :class:`TorchBatchedKernels` is the reference."""

    block: int

    def sample(self, batch: Batch, out: Tensor) -> None:
        """``out[t, j]`` (``[T, sample_max]``): tensor t's j-th sample of ``|m_t|`` (the moment update's value at the
        hashed position; 0 for a non-finite gradient, +inf for NaN; 0 at positions another rank holds), -1 past its
        sample size."""
        ...

    def moments_bracket(self, batch: Batch, lo: Tensor, hi: Tensor, counts: Tensor, candidates: Tensor) -> None:
        """Update both moments of every entry with a finite gradient; add to ``counts`` the NaN, above-``hi``,
        in-``[lo, hi]`` and skipped entries; append the in-bracket ``|m_t|`` to each tensor's candidate region
        (``counts[t, C_INSIDE]`` is the region's cursor: values past the capacity are dropped)."""
        ...

    def histogram_candidates(
        self, batch: Batch, source: Tensor, prefix: Tensor, radix_round: int, counts: Tensor, candidates: Tensor,
        hist: Tensor,
    ) -> None:  # fmt: skip
        """Add to ``hist[t]`` the radix digits of round ``radix_round`` of tensor t's stored candidates whose higher
        digits equal ``prefix[t]``, for the tensors whose ``source`` is ``SOURCE_CANDIDATES``."""
        ...

    def histogram_range(
        self, batch: Batch, source: Tensor, lo: Tensor, hi: Tensor, mode: Tensor, prefix: Tensor, radix_round: int,
        counts: Tensor, hist: Tensor,
    ) -> None:  # fmt: skip
        """The same over every ``|m_t|`` of the tensor in the range ``(lo, hi, mode)`` (``mode`` bit 1: ``lo``
        exclusive, bit 2: ``hi`` exclusive), for the tensors whose ``source`` is ``SOURCE_RANGE``."""
        ...

    def update(self, batch: Batch, tau: Tensor, counts: Tensor) -> None:
        """The AdamW step on the entries with ``|m_t| >= tau[t]`` and a finite gradient; moved counts added."""
        ...

    def fused(self, batch: Batch, tau: Tensor, counts: Tensor) -> None:
        """Moments, comparison with ``tau[t]`` (every entry if dense) and step in one pass; moved/skipped counts."""
        ...


def _lerp(m: Tensor, g: Tensor, weight: float) -> Tensor:
    return m.lerp(g, weight)


def _in_range(magnitude: Tensor, lo: Tensor, hi: Tensor, mode: int) -> Tensor:
    above = magnitude > lo if mode & 1 else magnitude >= lo
    below = magnitude < hi if mode & 2 else magnitude <= hi
    return above & below


def _local_positions(entry: Entry, index: Tensor) -> tuple[Tensor, Tensor]:
    """Local flat positions of global sample positions, and whether this rank holds them."""
    view = entry.view
    if not isinstance(view, ShardView):
        return index, torch.ones_like(index, dtype=torch.bool)
    along = (index // view.inner) % view.size
    outer = index // (view.inner * view.size)
    local = outer * (view.length * view.inner) + (along - view.start) * view.inner + index % view.inner
    owned = (along >= view.start) & (along < view.start + view.length)
    return torch.where(owned, local, 0), owned


def _digits(values: Tensor, radix_round: int, prefix: Tensor) -> tuple[Tensor, Tensor]:
    """The round's digit of each value's bit pattern, and whether its higher digits equal ``prefix``."""
    bits = values.view(torch.int32).to(torch.int64)
    shift, width = RADIX_ROUNDS[radix_round]
    digit = (bits >> shift) & ((1 << width) - 1)
    high = shift + width
    keep = torch.ones_like(digit, dtype=torch.bool) if high >= 32 else (bits >> high) == prefix
    return digit, keep


class TorchBatchedKernels:
    """The pure-torch reference of the batched kernels: one tensor at a time, the per-tensor path's operations."""

    block = 1024

    def sample(self, batch: Batch, out: Tensor) -> None:
        out.fill_(-1.0)
        for t, e in enumerate(batch.entries):
            if e.sample == 0:
                continue
            index = sample_indices(e.key, e.sample, e.view.numel, e.exp_avg.device)
            local, owned = _local_positions(e, index)
            m = e.exp_avg.reshape(-1)[local]
            g = e.grad.reshape(-1)[local].float()
            value = _lerp(m, g, e.scalars.weight).abs().nan_to_num(nan=math.inf, posinf=math.inf)
            value = torch.where(g.isfinite(), value, 0.0)
            out[t, : e.sample] = torch.where(owned, value, 0.0)

    @staticmethod
    def _moments(e: Entry) -> Tensor:
        """Update e's moments where the gradient is finite; returns that mask."""
        g = e.grad.float()
        finite = g.isfinite()
        m = e.exp_avg.lerp(g, e.scalars.weight)
        v = e.exp_avg_sq.mul(e.scalars.beta2).addcmul_(g, g, value=1 - e.scalars.beta2)
        e.exp_avg.copy_(torch.where(finite, m, e.exp_avg))
        e.exp_avg_sq.copy_(torch.where(finite, v, e.exp_avg_sq))
        return finite

    def moments_bracket(self, batch: Batch, lo: Tensor, hi: Tensor, counts: Tensor, candidates: Tensor) -> None:
        offset = 0
        for t, e in enumerate(batch.entries):
            finite = self._moments(e).reshape(-1)
            a = torch.where(finite, e.exp_avg.reshape(-1).abs(), 0.0)
            inside = (a >= lo[t]) & (a <= hi[t])
            counts[t, C_NAN] += int(a.isnan().sum())
            counts[t, C_ABOVE] += int((a > hi[t]).sum())
            counts[t, C_SKIPPED] += int((~finite).sum())
            values = a[inside]
            start = int(counts[t, C_INSIDE])
            stored = max(0, min(values.numel(), e.capacity - start))
            candidates[offset + start : offset + start + stored] = values[:stored]
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
            if int(source[t]) != SOURCE_RANGE:
                continue
            a = torch.where(e.grad.reshape(-1).isfinite(), e.exp_avg.reshape(-1).abs(), 0.0)
            values = a[_in_range(a, lo[t], hi[t], int(mode[t]))]
            digit, keep = _digits(values, radix_round, prefix[t])
            hist[t] += torch.bincount(digit[keep], minlength=RADIX_BINS).to(hist.dtype)

    @staticmethod
    def _step(e: Entry, selected: Tensor) -> int:
        s = e.scalars
        p = e.param.reshape(-1)
        index = selected.reshape(-1).nonzero().squeeze(1)
        work = p[index].float()
        if s.has_weight_decay:
            work.mul_(s.decay)
        m, v = e.exp_avg.reshape(-1)[index], e.exp_avg_sq.reshape(-1)[index]
        work.addcdiv_(m, (v.sqrt() / s.bias_correction2_sqrt).add_(s.eps), value=-s.step_size)
        p[index] = work.to(p.dtype)
        return index.numel()

    def update(self, batch: Batch, tau: Tensor, counts: Tensor) -> None:
        for t, e in enumerate(batch.entries):
            selected = (e.exp_avg.abs() >= tau[t]) & e.grad.isfinite()
            counts[t, C_MOVED] += self._step(e, selected)

    def fused(self, batch: Batch, tau: Tensor, counts: Tensor) -> None:
        for t, e in enumerate(batch.entries):
            finite = self._moments(e)
            selected = finite if e.dense else finite & (e.exp_avg.abs() >= tau[t])
            counts[t, C_MOVED] += self._step(e, selected)
            counts[t, C_SKIPPED] += int((~finite).sum())


def step_exact(kernels: BatchedKernels, batch: Batch) -> Tensor:
    """Exact selection and step for every tensor of ``batch``; returns this rank's counts ``[T, C_COLUMNS]``."""
    device, size = batch.device, batch.size
    counts = torch.zeros(size, C_COLUMNS, dtype=torch.int64, device=device)
    numel = batch.column(M_GLOBAL_NUMEL)
    k = batch.column(M_K)
    lo = torch.zeros(size, dtype=torch.float32, device=device)
    hi = torch.full((size,), math.inf, dtype=torch.float32, device=device)
    if batch.sample_max:
        samples = torch.empty(size, batch.sample_max, dtype=torch.float32, device=device)
        kernels.sample(batch, samples)
        batch.all_reduce(samples)  # every position is filled by the one rank that holds it (-1s only pad)
        ordered = samples.sort(dim=1, descending=True).values
        sample, j_hi, j_lo = batch.column(M_SAMPLE), batch.column(M_J_HI), batch.column(M_J_LO)
        last = batch.sample_max - 1
        hi_value = ordered.gather(1, (j_hi - 1).clamp(0, last).unsqueeze(1)).squeeze(1)
        lo_value = ordered.gather(1, (j_lo - 1).clamp(0, last).unsqueeze(1)).squeeze(1)
        has_sample = sample > 0
        hi = torch.where(has_sample & (j_hi >= 1), hi_value, hi)
        lo = torch.where(has_sample & (j_lo <= sample), lo_value, lo)
    candidates = torch.empty(max(1, batch.candidates_total), dtype=torch.float32, device=device)
    kernels.moments_bracket(batch, lo, hi, counts, candidates)

    capacity = batch.column(M_CAND_CAPACITY)
    overflowed = (counts[:, C_INSIDE] > capacity).to(torch.int64)
    totals = batch.all_reduce(torch.cat([counts[:, :C_SKIPPED], overflowed.unsqueeze(1)], dim=1))
    nan, above, inside, overflow = totals.unbind(1)
    below = numel - nan - above - inside  # entries with a finite gradient count as |m| = 0: never NaN or above
    in_nan = k <= nan
    in_above = ~in_nan & (k <= nan + above)
    in_inside = ~in_nan & ~in_above & (k <= nan + above + inside)
    in_below = ~(in_nan | in_above | in_inside)
    ties = in_inside & (lo == hi)
    source = torch.full_like(k, SOURCE_RANGE)
    source = torch.where(in_inside & (overflow == 0), SOURCE_CANDIDATES, source)
    source = torch.where(in_nan | ties, SOURCE_NONE, source)
    rank = torch.where(in_above, k - nan, torch.where(in_inside, k - nan - above, k - nan - above - inside))
    count = torch.where(in_above, above, torch.where(in_inside, inside, below))
    range_lo = torch.where(in_above, hi, torch.where(in_inside, lo, torch.zeros_like(lo)))
    range_hi = torch.where(in_above, torch.full_like(hi, math.inf), torch.where(in_inside, hi, lo))
    range_mode = torch.where(in_above, 1, torch.where(in_below, 2, 0)).to(torch.int64)

    kth = count - rank  # 0-based position in ascending order among the source's values
    prefix = torch.zeros_like(k)
    for radix_round, (_, width) in enumerate(RADIX_ROUNDS):
        hist = torch.zeros(size, RADIX_BINS, dtype=torch.int64, device=device)
        kernels.histogram_candidates(batch, source, prefix, radix_round, counts, candidates, hist)
        kernels.histogram_range(batch, source, range_lo, range_hi, range_mode, prefix, radix_round, counts, hist)
        batch.all_reduce(hist)
        cumulative = hist.cumsum(1)
        digit = (cumulative <= kth.unsqueeze(1)).sum(1).clamp(max=RADIX_BINS - 1)
        before = cumulative.gather(1, (digit - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        kth = kth - torch.where(digit > 0, before, torch.zeros_like(before))
        prefix = (prefix << width) | digit
    selected = prefix.to(torch.int32).view(torch.float32)
    tau = torch.where(ties, lo, selected)
    tau = torch.where(in_nan, torch.full_like(tau, math.nan), tau)
    kernels.update(batch, tau, counts)
    return counts


def step_fused(kernels: BatchedKernels, batch: Batch, fraction: float | None, sample_size: int) -> Tensor:
    """Sampled selection (tensors with a sample) and dense steps in one pass; returns this rank's counts."""
    device, size = batch.device, batch.size
    counts = torch.zeros(size, C_COLUMNS, dtype=torch.int64, device=device)
    tau = torch.zeros(size, dtype=torch.float32, device=device)
    if batch.sample_max:
        samples = torch.empty(size, batch.sample_max, dtype=torch.float32, device=device)
        kernels.sample(batch, samples)
        batch.all_reduce(samples)
        rank = max(1, math.floor(fraction * sample_size))  # type: ignore[operator]
        tau = samples.kthvalue(batch.sample_max - rank + 1, dim=1).values
    kernels.fused(batch, tau, counts)
    return counts


class _TritonState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.kernels: BatchedKernels | None = None
        self.reason: str | None = None


_triton_state = _TritonState()


def load_triton() -> BatchedKernels | None:
    """The Triton kernels (imported on the first call); ``None`` where triton is missing or ``LIT_MOFO_FUSED=0``,
    with the reason in :func:`triton_unavailable_reason`. Never raises."""
    if _triton_state.done:
        return _triton_state.kernels
    with _triton_state.lock:
        if not _triton_state.done:
            try:
                if os.environ.get("LIT_MOFO_FUSED", "1").strip().lower() in ("0", "false", "no", "off"):
                    raise RuntimeError("disabled by LIT_MOFO_FUSED=0")
                module = importlib.import_module("lit_mofo.optim._triton")
                _triton_state.kernels = module.TritonKernels()
            except Exception as err:  # a missing or broken triton means: no Triton path
                _triton_state.kernels = None
                _triton_state.reason = f"{type(err).__name__}: {err}"
                log.info("lit_mofo: MoFO's Triton kernels unavailable (%s).", _triton_state.reason)
            _triton_state.done = True
    return _triton_state.kernels


def triton_unavailable_reason() -> str | None:
    """Why :func:`load_triton` returned ``None``."""
    return _triton_state.reason


def supports(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> bool:
    """Whether local tensors can take the batched kernels: contiguous float32/bfloat16/float16 parameters and
    gradients with float32 moments, all on the parameter's device."""
    return (
        param.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and grad.dtype == param.dtype
        and exp_avg.dtype == exp_avg_sq.dtype == torch.float32
        and grad.device == exp_avg.device == exp_avg_sq.device == param.device
        and param.is_contiguous()
        and grad.is_contiguous()
        and exp_avg.is_contiguous()
        and exp_avg_sq.is_contiguous()
        and not grad.is_sparse
    )


def batches(entries: Sequence[Entry], block: int, group_of: Any) -> list[Batch]:
    """Split ``entries`` into batches of one dtype, device and process group, at most ``BATCH_ENTRIES`` each."""
    keyed: dict[tuple[Any, ...], list[Entry]] = {}
    for entry in entries:
        group = group_of(entry)
        keyed.setdefault((entry.param.dtype, entry.param.device, id(group)), []).append(entry)
    result = []
    for members in keyed.values():
        group = group_of(members[0])
        current: list[Entry] = []
        total = 0
        for entry in members:
            if current and total + entry.exp_avg.numel() > BATCH_ENTRIES:
                result.append(Batch(current, block, group))
                current, total = [], 0
            current.append(entry)
            total += entry.exp_avg.numel()
        result.append(Batch(current, block, group))
    return result
