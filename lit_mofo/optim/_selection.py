"""MoFO's selection driver: how each tensor's threshold is found without sorting it, for a batch of tensors at once.

Every backend runs this one driver; a backend is a set of kernels (:class:`BatchedKernels`), each operation one call
for a whole :class:`Batch` of tensors (one parameter dtype, one device, one process group):
:class:`~lit_mofo.optim._eager.EagerKernels` (torch operations, any device and dtype: the reference the others are
tested against), :class:`~lit_mofo.optim._cpu.CpuKernels` (C, on CPU) and :class:`~lit_mofo.optim._triton.TritonKernels`
(CUDA). Every per-tensor value (the sample, the bracket, the counts, the threshold) stays in a tensor on the batch's
device, so a GPU step makes no host synchronisation. Where no collective separates them (a batch of whole tensors),
kernels that say so (``fuses_sampling``: the C kernels) take each tensor's sample, its selection and its pass in one
call, the sample right before its tensor's pass.

``exact`` selection (the default) returns the k-th largest ``|m_t|`` itself, so the mask is exactly the spec's
``|m_t| >= tau``:

1. a stratified sample of ``|m_t|`` (one hashed position in each of ``s`` equal strata, ``s`` about
   ``numel**(2/3)``) gives a bracket ``[lo, hi]`` that holds the k-th largest value with overwhelming probability
   (four standard deviations of the sample quantile on either side);
2. the moment update's own pass counts the entries above ``hi`` (NaN ranks above everything, as in
   ``torch.topk``/``torch.kthvalue``) and copies the few inside the bracket (about 1-5% of the tensor) to the
   tensor's region of a candidate buffer;
3. a radix selection over the candidates' bit patterns (three rounds of a 2048-bin histogram: 11, 11 and 10 bits)
   gives the threshold. When the counts show the bracket missed the threshold (or the candidate region overflowed,
   with many ties), the histograms are taken over the right range of the whole tensor instead, so the answer is
   exact whatever the data; only the time changes. Which source each tensor reads is decided on the device.

``sampled`` selection takes ``tau`` as the matching quantile of a fixed-size sample (``sample_size`` entries at
hashed positions, the moments evaluated there before the pass), so moments, comparison and step fit in one pass;
dense tensors take that pass with every entry selected. With ``s`` samples the realised fraction has a standard
deviation of at most ``sqrt(f (1 - f) / s)`` (stratifying can only lower it).

The sample positions are a pure function of ``(seed, tensor index, step)`` (splitmix64), mirrored bit for bit by the
C and Triton kernels: no random generator state to carry, every DDP rank draws the same sample, and a run resumed
from a checkpoint (which holds the seed and each tensor's step) draws what the uninterrupted run would have.

Sharded tensors (a DTensor split along one dimension of a 1-D mesh, :class:`~lit_mofo.dtensor.ShardLayout`) get
the global tensor's threshold: sample positions are drawn over the global tensor and each rank fills the ones it
holds, then the sample, the counts and the histograms are summed over the mesh, so every rank selects exactly what
one process holding the whole tensor would. Entries with a non-finite gradient follow ``MoFO(nonfinite="skip")``:
moments and weight unchanged, ``|m| = 0`` in the selection, never moved.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lit_mofo.dtensor import ShardLayout, collective_device

__all__ = [
    "Batch",
    "BatchedKernels",
    "Entry",
    "StepScalars",
    "batches",
    "exact_thresholds",
    "sample_indices",
    "sample_key",
    "step_group",
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

# Columns of the int64 metadata table (one row per tensor).
M_PARAM, M_GRAD, M_EXP_AVG, M_EXP_AVG_SQ, M_MASTER = 0, 1, 2, 3, 4  # element offsets from the batch's bases
M_NUMEL = 5  # entries on this rank
M_GLOBAL_NUMEL, M_INNER, M_SIZE, M_START, M_LENGTH = 6, 7, 8, 9, 10  # sample positions over a (sharded) tensor
M_KEY = 11  # sample key, the uint64 bit pattern
M_SAMPLE, M_SAMPLE_OFFSET = 12, 13  # sample size (0: no sample) and the tensor's region of the sample buffer
M_CAND_OFFSET, M_CAND_CAPACITY = 14, 15  # the tensor's region of the candidate buffer
M_DENSE = 16  # 1: every entry with a finite gradient moves
M_K, M_J_HI, M_J_LO = 17, 18, 19  # k (global), the bracket's ranks in the sample
M_COLUMNS = 20
# Columns of the float32 step-scalar table, each rounded to float32 as every backend rounds it.
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

# At most this many entries per batch: bounds the candidate buffer (about 2% of the entries) of one call.
BATCH_ENTRIES = 1 << 30


@dataclass(frozen=True)
class StepScalars:
    """One tensor's step constants, as torch's AdamW computes them (Python floats; the kernels round to float32)."""

    weight: float  # 1 - beta1, the lerp weight of the first moment
    beta2: float
    step_size: float  # lr / (1 - beta1**t)
    bias_correction2_sqrt: float  # sqrt(1 - beta2**t)
    eps: float
    decay: float  # 1 - lr * weight_decay
    has_weight_decay: bool


# ---- the sample's positions -----------------------------------------------------------------------------------------


def _mix64(z: int) -> int:
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def sample_key(seed: int, tensor_index: int, step: int) -> int:
    """The 64-bit key of one tensor's sample at one step."""
    return _mix64((_tensor_key(seed, tensor_index) ^ (step * _MIX2)) & _MASK64)


@functools.lru_cache(maxsize=1 << 16)
def _tensor_key(seed: int, tensor_index: int) -> int:
    z = _mix64((seed * _GOLDEN + 0x632BE59BD9B4E019) & _MASK64)
    return _mix64((z ^ (tensor_index * _MIX1)) & _MASK64)


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: Tensor, bits: int) -> Tensor:
    # Logical shift of uint64 bit patterns held in int64 (torch's >> is arithmetic).
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def sample_indices(key: int, size: int, numel: int, device: torch.device | str = "cpu") -> Tensor:
    """Flat positions of a stratified sample, exactly as the kernels draw them: sample ``j`` is uniform in the
    ``j``-th of ``size`` equal strata of ``[0, numel)``, at ``splitmix64(key + (j + 1) * golden)``.

    The positions increase with ``j`` (memory is read front to back) and cover the tensor evenly, which can only
    lower the variance of the sampled quantile. int64 multiplication wraps modulo 2**64 on every torch backend,
    so the bit patterns match the kernels' uint64 arithmetic.
    """
    j = torch.arange(size, dtype=torch.int64, device=device)
    z = (j + 1) * _as_int64(_GOLDEN) + _as_int64(key)
    z = (z ^ _shift_right(z, 30)) * _as_int64(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _as_int64(_MIX2)
    z = z ^ _shift_right(z, 31)
    start = j * numel // size
    width = (j + 1) * numel // size - start
    return start + _shift_right(_shift_right(z, 32) * width, 32)


# ---- sizes of the exact selection's sample and candidates ------------------------------------------------------------


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
    """Room for the candidates: twice the bracket's expected share, plus slack for a kernel's per-thread split."""
    return min(local, int(2 * share * local) + 4096)


# ---- the batch ------------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One tensor of a step: its local tensors (a DTensor's shard), its layout and this step's constants.

    ``master`` is the float32 master copy of a low-precision parameter (``MoFO(master_weights=True)``), else None.
    ``layout`` describes a shard of a tensor sharded over a mesh (None: this rank holds the whole tensor).
    """

    param: Tensor
    grad: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    master: Tensor | None
    layout: ShardLayout | None
    k: int
    key: int
    scalars: StepScalars
    sample: int = 0  # sample size, 0 for none
    j_hi: int = 0
    j_lo: int = 0
    capacity: int = 0  # candidate capacity (exact selection)

    @property
    def numel(self) -> int:
        """Entries of the global tensor (the shards of all ranks together)."""
        return self.layout.numel if self.layout is not None else self.exp_avg.numel()

    @property
    def dense(self) -> bool:
        return self.k >= self.numel

    @property
    def group(self) -> Any:
        """The process group over which a sharded tensor's selection is combined, None for a whole tensor."""
        return self.layout.group if self.layout is not None else None


def plan_exact(entry: Entry) -> Entry:
    """Fill in the exact selection's sample size, bracket ranks and candidate capacity (looked up in this module at
    each call, so that tests can force every branch)."""
    numel, local = entry.numel, entry.exp_avg.numel()
    if numel <= SMALL_TENSOR:
        entry.sample, entry.j_hi, entry.j_lo, share = 0, 0, 1, 1.0
    else:
        entry.sample = bracket_sample_size(numel)
        entry.j_hi, entry.j_lo = bracket_ranks(entry.k, numel, entry.sample)
        share = (min(entry.j_lo, entry.sample) - entry.j_hi) / entry.sample
    entry.capacity = candidate_capacity(share, local)
    return entry


def _uint64_bits(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class Batch:
    """Tensors stepped by the same kernel calls, with their tables on the device.

    ``block`` is the number of entries a kernel program handles; the block tables map each program to its tensor.
    ``group`` is the process group of sharded tensors (every collective of the batch is over it), else None.
    ``has_master``: every parameter has a float32 master copy (the batch's tensors share one dtype, so all or none).

    Tensors are addressed as element offsets from two base tensors (the first parameter, for parameters and
    gradients; the first moment, for moments and master copies), which the kernels receive as arguments: Triton then
    knows the bases' alignment, and with ``param_align`` / ``moment_align`` (16 bytes in elements when every tensor
    is 16-byte aligned, else 1) it emits vector loads. The torch kernels use the tensors themselves.
    """

    def __init__(self, entries: list[Entry], block: int, group: Any = None) -> None:
        self.entries = entries
        self.block = block
        self.group = group
        first = entries[0].param
        self.device = first.device
        self.dtype = first.dtype
        self.size = len(entries)
        self.has_master = entries[0].master is not None
        self.param_base, self.moment_base = first, entries[0].exp_avg
        param_size, base_param, base_moment = first.element_size(), first.data_ptr(), self.moment_base.data_ptr()
        moment_size = self.moment_base.element_size()
        tensors = [t for e in entries for t in (e.param, e.grad, e.exp_avg, e.exp_avg_sq, e.master) if t is not None]
        pointers = [(t.data_ptr(), t.element_size()) for t in tensors]
        if any(address % size for address, size in pointers):
            raise ValueError("MoFO's batched kernels need tensors aligned to their element size")
        aligned = all(address % 16 == 0 for address, _ in pointers)
        self.param_align = 16 // param_size if aligned else 1
        self.moment_align = 16 // moment_size if aligned else 1
        meta, scal = [], []
        sample_offset = cand_offset = 0
        element_blocks, candidate_blocks = [0], [0]
        for e in entries:
            layout = e.layout
            if layout is not None:
                inner, size, start, length = layout.inner, layout.size, layout.start, layout.length
            else:
                inner, size, start, length = 1, e.numel, 0, e.numel
            master = e.master
            meta.append(
                [
                    (e.param.data_ptr() - base_param) // param_size,
                    (e.grad.data_ptr() - base_param) // param_size,
                    (e.exp_avg.data_ptr() - base_moment) // moment_size,
                    (e.exp_avg_sq.data_ptr() - base_moment) // moment_size,
                    (master.data_ptr() - base_moment) // moment_size if master is not None else 0,
                    e.exp_avg.numel(),
                    e.numel,
                    inner,
                    size,
                    start,
                    length,
                    _uint64_bits(e.key),
                    e.sample,
                    sample_offset,
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
            sample_offset += e.sample
            cand_offset += e.capacity
            element_blocks.append(element_blocks[-1] + -(-e.exp_avg.numel() // block))
            candidate_blocks.append(candidate_blocks[-1] + -(-e.capacity // block))
        self.sample_total = sample_offset
        self.sample_max = max(e.sample for e in entries)
        self.candidates_total = cand_offset
        self.element_blocks = element_blocks[-1]
        self.candidate_blocks = candidate_blocks[-1]
        self.meta_host = torch.tensor(meta, dtype=torch.int64)
        self.scal_host = torch.tensor(scal, dtype=torch.float32)
        self.meta = _to_device(self.meta_host, self.device)
        self.scal = _to_device(self.scal_host, self.device)
        self.block_starts = _to_device(torch.tensor(element_blocks, dtype=torch.int64), self.device)
        self.candidate_block_starts = _to_device(torch.tensor(candidate_blocks, dtype=torch.int64), self.device)

    def column(self, index: int) -> Tensor:
        return self.meta[:, index]

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the batch's process group (a no-op for whole tensors); no host synchronisation."""
        if self.group is None:
            return tensor
        import torch.distributed as dist

        device = collective_device(self.group, prefer=tensor.device)
        if tensor.device == device:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            return tensor
        reduced = tensor.to(device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.group)
        return tensor.copy_(reduced)


def _to_device(table: Tensor, device: torch.device) -> Tensor:
    """A host table on ``device`` without waiting for the device (pinned memory, asynchronous copy)."""
    if device.type == "cpu":
        return table
    if device.type == "cuda":
        table = table.pin_memory()
    return table.to(device, non_blocking=True)


class BatchedKernels(Protocol):
    """One call per operation over a whole :class:`Batch`; :class:`~lit_mofo.optim._eager.EagerKernels` is the
    reference every implementation computes the same bits as (up to the last bit of a ``sqrt`` for torch's own)."""

    name: str
    block: int
    dtypes: frozenset[torch.dtype] | set[torch.dtype]  # the parameter dtypes the kernels step
    # Whether the kernels also provide sampled_moments_bracket and sampled_fused: the sample, its selection and the
    # pass of a batch whose samples need no sum over ranks in one call, each tensor's sample taken while the tensor
    # before it streams (its random reads then overlap that streaming, and its lines are cached for its own pass).
    fuses_sampling: bool

    def supports(self, param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, master: Tensor | None) -> bool:
        """Whether these local tensors can be stepped by these kernels (dtype, device, layout)."""
        ...

    def sample(self, batch: Batch, out: Tensor) -> None:
        """``out[offset_t + j]`` (the tensor's region, ``M_SAMPLE_OFFSET``): tensor t's j-th sample of ``|m_t|``, the
        moment update's value at the hashed position; 0 for a non-finite gradient, +inf for NaN, 0 at positions
        another rank holds."""
        ...

    def select_sample(self, batch: Batch, samples: Tensor, ranks: Tensor) -> Tensor:
        """``out[t, r]``: the ``ranks[t, r]``-th largest (1-based) of tensor t's sample (NaN-free; a rank is in
        ``[1, sample size]``), for the tensors with a sample; any value for the others."""
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
        exclusive, bit 2: ``hi`` exclusive; an entry with a non-finite gradient counts as 0), for the tensors whose
        ``source`` is ``SOURCE_RANGE``."""
        ...

    def update(self, batch: Batch, tau: Tensor, counts: Tensor) -> None:
        """The AdamW step on the entries with ``|m_t| >= tau[t]`` and a finite gradient; moved counts added."""
        ...

    def fused(self, batch: Batch, tau: Tensor, counts: Tensor) -> None:
        """Moments, comparison with ``tau[t]`` (every entry if dense) and step in one pass; moved/skipped counts."""
        ...


# ---- the driver -----------------------------------------------------------------------------------------------------


def _sample_values(kernels: BatchedKernels, batch: Batch, ranks: Sequence[Callable[[Entry], int]]) -> Tensor:
    """The sample of every tensor (summed over the mesh: each position is filled by the one rank that holds it) and,
    per tensor, its sample values at the descending ``ranks`` (functions of the entry; clamped into the sample)."""
    samples = torch.empty(batch.sample_total, dtype=torch.float32, device=batch.device)
    kernels.sample(batch, samples)
    batch.all_reduce(samples)
    table = [[min(max(rank(e), 1), e.sample) for rank in ranks] for e in batch.entries]
    return kernels.select_sample(batch, samples, _to_device(torch.tensor(table, dtype=torch.int64), batch.device))


def exact_thresholds(kernels: BatchedKernels, batch: Batch) -> tuple[Tensor, Tensor]:
    """Update every tensor's moments and find its exact threshold, the k-th largest ``|m_t|`` of the (global) tensor;
    returns the thresholds ``[T]`` and this rank's counts ``[T, C_COLUMNS]``.

    NaN ranks above every number, as in ``torch.topk``; the threshold is NaN when the k largest include a NaN (then
    ``|m| >= tau`` selects nothing, like the reference definition).
    """
    device, size = batch.device, batch.size
    counts = torch.zeros(size, C_COLUMNS, dtype=torch.int64, device=device)
    numel = batch.column(M_GLOBAL_NUMEL)
    k = batch.column(M_K)
    candidates = torch.empty(max(1, batch.candidates_total), dtype=torch.float32, device=device)
    if batch.sample_total and batch.group is None and kernels.fuses_sampling:
        lo, hi = kernels.sampled_moments_bracket(batch, counts, candidates)  # type: ignore[attr-defined]
    else:
        lo = torch.zeros(size, dtype=torch.float32, device=device)
        hi = torch.full((size,), math.inf, dtype=torch.float32, device=device)
        if batch.sample_total:
            ends = _sample_values(kernels, batch, (lambda e: e.j_hi, lambda e: e.j_lo))
            sample, j_hi, j_lo = batch.column(M_SAMPLE), batch.column(M_J_HI), batch.column(M_J_LO)
            has_sample = sample > 0
            hi = torch.where(has_sample & (j_hi >= 1), ends[:, 0], hi)
            lo = torch.where(has_sample & (j_lo <= sample), ends[:, 1], lo)
        kernels.moments_bracket(batch, lo, hi, counts, candidates)

    capacity = batch.column(M_CAND_CAPACITY)
    overflowed = (counts[:, C_INSIDE] > capacity).to(torch.int64)
    totals = batch.all_reduce(torch.cat([counts[:, :C_SKIPPED], overflowed.unsqueeze(1)], dim=1))
    nan, above, inside, overflow = totals.unbind(1)
    below = numel - nan - above - inside  # entries with a non-finite gradient count as |m| = 0: never NaN or above
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
    return tau, counts


def step_batch(kernels: BatchedKernels, batch: Batch, exact: bool, sample_rank: int) -> Tensor:
    """Step every tensor of ``batch``; returns the moved and skipped counts ``[T, 2]``, summed over the mesh.

    ``exact``: the exact selection (two passes over memory). Otherwise one pass: the sampled selection, whose
    threshold is the ``sample_rank``-th largest value of each tensor's sample, and the dense step (``M_DENSE``).
    """
    if exact:
        tau, counts = exact_thresholds(kernels, batch)
        kernels.update(batch, tau, counts)
    else:
        counts = torch.zeros(batch.size, C_COLUMNS, dtype=torch.int64, device=batch.device)
        if batch.sample_total and batch.group is None and kernels.fuses_sampling:
            kernels.sampled_fused(batch, sample_rank, counts)  # type: ignore[attr-defined]
        else:
            tau = torch.zeros(batch.size, dtype=torch.float32, device=batch.device)
            if batch.sample_total:
                values = _sample_values(kernels, batch, (lambda e: sample_rank,))[:, 0]
                tau = torch.where(batch.column(M_SAMPLE) > 0, values, tau)
            kernels.fused(batch, tau, counts)
    return batch.all_reduce(counts[:, [C_MOVED, C_SKIPPED]].contiguous())


def step_group(
    members: Sequence[tuple[BatchedKernels, Entry]], selection: str, fraction: float | None, sample_size: int
) -> list[tuple[list[int], Tensor]]:
    """Step one param group's tensors, each ``(kernels, entry)``; returns, per batch, the members' positions and
    their moved and skipped counts ``[n, 2]`` (on the batch's device, summed over the mesh).

    Where each tensor's threshold comes from is decided here, once: the dense step and the sampled selection of a
    tensor above ``sample_size`` entries take the one-pass step, every other tensor the exact selection.
    """
    exact: list[tuple[int, BatchedKernels, Entry]] = []
    one_pass: list[tuple[int, BatchedKernels, Entry]] = []
    for position, (kernels, entry) in enumerate(members):
        if entry.dense:
            one_pass.append((position, kernels, entry))
        elif selection == "sampled" and entry.numel > sample_size:
            entry.sample = sample_size
            one_pass.append((position, kernels, entry))
        else:
            exact.append((position, kernels, plan_exact(entry)))
    sample_rank = max(1, math.floor(fraction * sample_size)) if fraction is not None else 1
    results = []
    for chosen, is_exact in ((exact, True), (one_pass, False)):
        positions = {id(entry): position for position, _, entry in chosen}
        for kernels, batch in batches([(kernels, entry) for _, kernels, entry in chosen]):
            counts = step_batch(kernels, batch, is_exact, sample_rank)
            results.append(([positions[id(entry)] for entry in batch.entries], counts))
    return results


def batches(members: Sequence[tuple[BatchedKernels, Entry]]) -> list[tuple[BatchedKernels, Batch]]:
    """Group tensors into batches of one backend, dtype, device, process group and master-weight layout, each of at
    most ``BATCH_ENTRIES`` entries; the tensors keep their order within a batch."""
    keyed: dict[tuple[Any, ...], tuple[BatchedKernels, list[Entry]]] = {}
    for kernels, entry in members:
        key = (id(kernels), entry.param.dtype, entry.param.device, id(entry.group), entry.master is not None)
        keyed.setdefault(key, (kernels, []))[1].append(entry)
    result = []
    for kernels, entries in keyed.values():
        current: list[Entry] = []
        total = 0
        for entry in entries:
            if current and total + entry.exp_avg.numel() > BATCH_ENTRIES:
                result.append((kernels, Batch(current, kernels.block, current[0].group)))
                current, total = [], 0
            current.append(entry)
            total += entry.exp_avg.numel()
        result.append((kernels, Batch(current, kernels.block, current[0].group)))
    return result
