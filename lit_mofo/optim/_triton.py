"""MoFO's Triton kernels: the selection driver's operations (:mod:`lit_mofo.optim._selection`) for CUDA parameters.

One kernel per operation of :class:`lit_mofo.optim._selection.BatchedKernels`, each launched once for a whole batch
of tensors: every program handles ``BLOCK`` entries of one tensor, found from the batch's block table, and reads
the tensor's pointers, sizes and step scalars from the batch's tables (so a launch needs no per-tensor argument and
no host synchronisation). :class:`TritonKernels` holds the launch functions; it chooses the block sizes and grids
and counts its launches (``launches``), which lets the tests check that a step really ran these kernels.

Arithmetic: the C kernels' (:mod:`lit_mofo.optim._cpu`) operation by operation - ``lerp`` and the second moment as
the fused multiply-adds torch's vectorised CPU kernels compute, the step with correctly rounded ``sqrt`` and
division (``sqrt_rn``, ``div_rn``, not Triton's approximate defaults), and no other contraction (every launch passes
``enable_fp_fusion=False``) - so the Triton step computes what the C kernels compute, bit for bit, and what torch's
operations compute up to their last-bit ``sqrt`` differences. Parameters may be float32, bfloat16 or float16
(rounded to nearest-even once per step), with an optional float32 master copy; moments are float32.

Importing this module imports ``triton``; :func:`lit_mofo.optim.mofo` does it when a step first asks for it. Under
``TRITON_INTERPRET=1`` (set before triton is first imported) the same kernels run on CPU tensors through Triton's
interpreter, which is how they are tested without a GPU.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from lit_mofo.optim import _selection as b
from lit_mofo.optim._selection import Batch

__all__ = ["TritonKernels"]

_GOLDEN = tl.constexpr(0x9E3779B97F4A7C15)
_MIX1 = tl.constexpr(0xBF58476D1CE4E5B9)
_MIX2 = tl.constexpr(0x94D049BB133111EB)
_INF = tl.constexpr(float("inf"))
_LAST = tl.constexpr(2**62)

_MC = tl.constexpr(b.M_COLUMNS)
_M_PARAM = tl.constexpr(b.M_PARAM)
_M_GRAD = tl.constexpr(b.M_GRAD)
_M_EXP_AVG = tl.constexpr(b.M_EXP_AVG)
_M_EXP_AVG_SQ = tl.constexpr(b.M_EXP_AVG_SQ)
_M_MASTER = tl.constexpr(b.M_MASTER)
_M_NUMEL = tl.constexpr(b.M_NUMEL)
_M_GLOBAL_NUMEL = tl.constexpr(b.M_GLOBAL_NUMEL)
_M_INNER = tl.constexpr(b.M_INNER)
_M_SIZE = tl.constexpr(b.M_SIZE)
_M_START = tl.constexpr(b.M_START)
_M_LENGTH = tl.constexpr(b.M_LENGTH)
_M_KEY = tl.constexpr(b.M_KEY)
_M_SAMPLE = tl.constexpr(b.M_SAMPLE)
_M_SAMPLE_OFFSET = tl.constexpr(b.M_SAMPLE_OFFSET)
_M_CAND_OFFSET = tl.constexpr(b.M_CAND_OFFSET)
_M_CAND_CAPACITY = tl.constexpr(b.M_CAND_CAPACITY)
_M_DENSE = tl.constexpr(b.M_DENSE)
_SC = tl.constexpr(b.S_COLUMNS)
_S_WEIGHT = tl.constexpr(b.S_WEIGHT)
_S_BETA2 = tl.constexpr(b.S_BETA2)
_S_ONE_MINUS_BETA2 = tl.constexpr(b.S_ONE_MINUS_BETA2)
_S_EPS = tl.constexpr(b.S_EPS)
_S_DECAY = tl.constexpr(b.S_DECAY)
_S_NEG_STEP_SIZE = tl.constexpr(b.S_NEG_STEP_SIZE)
_S_BC2_SQRT = tl.constexpr(b.S_BC2_SQRT)
_S_HAS_WD = tl.constexpr(b.S_HAS_WD)
_CC = tl.constexpr(b.C_COLUMNS)
_C_NAN = tl.constexpr(b.C_NAN)
_C_ABOVE = tl.constexpr(b.C_ABOVE)
_C_INSIDE = tl.constexpr(b.C_INSIDE)
_C_SKIPPED = tl.constexpr(b.C_SKIPPED)
_C_MOVED = tl.constexpr(b.C_MOVED)
_BINS = tl.constexpr(b.RADIX_BINS)
_SOURCE_CANDIDATES = tl.constexpr(b.SOURCE_CANDIDATES)
_SOURCE_RANGE = tl.constexpr(b.SOURCE_RANGE)

_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ---- shared pieces ------------------------------------------------------------------------------------------------


@triton.jit
def _locate(starts_ptr, count, pid, T_PAD: tl.constexpr):
    """The batch tensor that block ``pid`` belongs to (``starts`` holds each tensor's first block), and the block's
    index within that tensor."""
    index = tl.arange(0, T_PAD)
    ends = tl.load(starts_ptr + 1 + index, mask=index < count, other=_LAST)
    t = tl.sum((ends <= pid).to(tl.int32), axis=0).to(tl.int64)
    return t, pid - tl.load(starts_ptr + t)


@triton.jit
def _address(base, row, column, ALIGN: tl.constexpr):
    """``base`` plus the element offset in the table's column. The offset is declared a multiple of ``ALIGN``
    elements (16 bytes) when every tensor of the batch is 16-byte aligned, so that Triton emits vector loads."""
    offset = tl.load(row + column)
    if ALIGN > 1:
        offset = tl.multiple_of(offset, ALIGN)
    return base + offset


@triton.jit
def _pointers(pbase, mbase, row, P_ALIGN: tl.constexpr, M_ALIGN: tl.constexpr):
    """A tensor's parameter, gradient, moments and master copy (the master's offset is 0 where there is none)."""
    return (
        _address(pbase, row, _M_PARAM, P_ALIGN),
        _address(pbase, row, _M_GRAD, P_ALIGN),
        _address(mbase, row, _M_EXP_AVG, M_ALIGN),
        _address(mbase, row, _M_EXP_AVG_SQ, M_ALIGN),
        _address(mbase, row, _M_MASTER, M_ALIGN),
    )


@triton.jit
def _load(pointers, valid, MASKED: tl.constexpr):
    """A block load: masked in a tensor's last (partial) block, plain - and so vectorised - in the full ones."""
    if MASKED:
        x = tl.load(pointers, mask=valid, other=0.0)
    else:
        x = tl.load(pointers)
    return x


@triton.jit
def _store(pointers, value, valid, MASKED: tl.constexpr):
    if MASKED:
        tl.store(pointers, value, mask=valid)
    else:
        tl.store(pointers, value)


@triton.jit
def _widen(x, PDTYPE: tl.constexpr):
    """A parameter or gradient value as float32 (exact); bfloat16 by its bit pattern."""
    if PDTYPE == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _narrow(x, PDTYPE: tl.constexpr):
    """float32 to the parameter's dtype, rounded to nearest even. bfloat16 by integer arithmetic, exactly as
    c10::BFloat16 and the C kernels round (NaN to the canonical quiet NaN), the same on a GPU and in the
    interpreter (whose own bfloat16 cast truncates)."""
    if PDTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        rounded = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
        return rounded.to(tl.bfloat16, bitcast=True)
    return x.to(PDTYPE)


@triton.jit
def _lerp(m, g, w):
    """torch's ``lerp_`` as its vectorised CPU kernel computes it: one fused multiply-add on either side of 0.5."""
    d = g - m
    return tl.where(tl.abs(w) < 0.5, tl.fma(w, d, m), tl.fma(w - 1.0, d, g))


@triton.jit
def _moments(g, m, v, scal):
    """Both moments where the gradient is finite (the old values elsewhere, bit for bit), and that mask."""
    finite = tl.abs(g) < _INF
    m_new = _lerp(m, g, tl.load(scal + _S_WEIGHT))
    v_new = tl.fma(tl.load(scal + _S_ONE_MINUS_BETA2) * g, g, v * tl.load(scal + _S_BETA2))
    return tl.where(finite, m_new, m), tl.where(finite, v_new, v), finite


@triton.jit
def _step(p_stored, m, v, selected, scal, w_ptr, valid, PDTYPE: tl.constexpr, MASKED: tl.constexpr,
          HAS_MASTER: tl.constexpr):  # fmt: skip
    """The new stored parameter values: ``p.mul_(decay).addcdiv_(m, sqrt(v) / bc2_sqrt + eps, value=-step_size)``
    with correctly rounded sqrt and division, on the selected entries; the others keep their bits. With a master
    copy (``w_ptr``), the step starts from it where the parameter still holds its rounding, and writes it back."""
    p = _widen(p_stored, PDTYPE)
    if HAS_MASTER:
        w = _load(w_ptr, valid, MASKED)
        current = _narrow(w, PDTYPE).to(tl.uint16, bitcast=True) == p_stored.to(tl.uint16, bitcast=True)
        p = tl.where(current, w, p)
    q = tl.where(tl.load(scal + _S_HAS_WD) != 0.0, p * tl.load(scal + _S_DECAY), p)
    denominator = tl.div_rn(tl.sqrt_rn(v), tl.load(scal + _S_BC2_SQRT)) + tl.load(scal + _S_EPS)
    new = q + tl.div_rn(tl.load(scal + _S_NEG_STEP_SIZE) * m, denominator)
    if HAS_MASTER:
        _store(w_ptr, tl.where(selected, new, w), valid, MASKED)
    return tl.where(selected, _narrow(tl.where(selected, new, 0.0), PDTYPE), p_stored)


@triton.jit
def _digit_filter(x, prefix, valid, SHIFT: tl.constexpr, WIDTH: tl.constexpr):
    """The radix round's digit of bit patterns ``x`` and whether their higher digits equal ``prefix``."""
    keep = valid
    if SHIFT + WIDTH < 32:
        keep = keep & ((x >> (SHIFT + WIDTH)).to(tl.int64) == prefix)
    return (x >> SHIFT) & ((1 << WIDTH) - 1), keep


# ---- kernels ------------------------------------------------------------------------------------------------------


@triton.jit
def _sample_kernel(pbase, mbase, meta_ptr, scal_ptr, out_ptr, PDTYPE: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row = meta_ptr + t * _MC
    size = tl.load(row + _M_SAMPLE)
    valid = j < size
    # splitmix64(key + (j + 1) * golden), stratified over [0, numel): _selection.sample_indices, bit for bit.
    numel = tl.load(row + _M_GLOBAL_NUMEL)
    z = tl.load(row + _M_KEY).to(tl.uint64, bitcast=True) + (j + 1).to(tl.uint64) * _GOLDEN
    z = (z ^ (z >> 30)) * _MIX1
    z = (z ^ (z >> 27)) * _MIX2
    z = z ^ (z >> 31)
    strata = tl.maximum(size, 1)
    start = j * numel // strata
    width = (j + 1) * numel // strata - start
    index = start + (((z >> 32) * width.to(tl.uint64)) >> 32).to(tl.int64)
    # The rank's local position of a global position (a shard along dim: inner entries per step of that dim).
    inner = tl.load(row + _M_INNER)
    dim_size = tl.load(row + _M_SIZE)
    first = tl.load(row + _M_START)
    length = tl.load(row + _M_LENGTH)
    along = (index // inner) % dim_size
    outer = index // (inner * dim_size)
    local = outer * (length * inner) + (along - first) * inner + index % inner
    owned = valid & (along >= first) & (along < first + length)
    m = tl.load(_address(mbase, row, _M_EXP_AVG, 1) + local, mask=owned, other=0.0)
    g = _widen(tl.load(_address(pbase, row, _M_GRAD, 1) + local, mask=owned, other=0.0), PDTYPE)
    value = tl.abs(_lerp(m, g, tl.load(scal_ptr + t * _SC + _S_WEIGHT)))
    value = tl.where(value != value, _INF, value)
    value = tl.where(tl.abs(g) < _INF, value, 0.0)
    value = tl.where(owned, value, 0.0)
    tl.store(out_ptr + tl.load(row + _M_SAMPLE_OFFSET) + j, value, mask=valid)


@triton.jit
def _moments_bracket_block(
    g_ptr, m_ptr, v_ptr, offsets, valid, scal, lo, hi, tally, region, capacity, PDTYPE: tl.constexpr,
    MASKED: tl.constexpr,
):  # fmt: skip
    g = _widen(_load(g_ptr + offsets, valid, MASKED), PDTYPE)
    m, v, finite = _moments(g, _load(m_ptr + offsets, valid, MASKED), _load(v_ptr + offsets, valid, MASKED), scal)
    _store(m_ptr + offsets, m, valid, MASKED)
    _store(v_ptr + offsets, v, valid, MASKED)
    a = tl.where(finite, tl.abs(m), 0.0)
    nan = tl.sum((valid & (a != a)).to(tl.int64), axis=0)
    above = tl.sum((valid & (a > hi)).to(tl.int64), axis=0)
    skipped = tl.sum((valid & ~finite).to(tl.int64), axis=0)
    if nan > 0:
        tl.atomic_add(tally + _C_NAN, nan)
    if above > 0:
        tl.atomic_add(tally + _C_ABOVE, above)
    if skipped > 0:
        tl.atomic_add(tally + _C_SKIPPED, skipped)
    inside = valid & (a >= lo) & (a <= hi)
    found = tl.sum(inside.to(tl.int64), axis=0)
    if found > 0:
        base = tl.atomic_add(tally + _C_INSIDE, found)  # the tensor's candidate cursor: this block's slots
        position = base + tl.cumsum(inside.to(tl.int64), axis=0) - 1
        tl.store(region + position, a, mask=inside & (position < capacity))


@triton.jit(do_not_specialize=["count"])
def _moments_bracket_kernel(
    pbase, mbase, meta_ptr, scal_ptr, starts_ptr, count, lo_ptr, hi_ptr, counts_ptr, cand_ptr,
    PDTYPE: tl.constexpr, P_ALIGN: tl.constexpr, M_ALIGN: tl.constexpr, BLOCK: tl.constexpr, T_PAD: tl.constexpr,
):  # fmt: skip
    t, block = _locate(starts_ptr, count, tl.program_id(0).to(tl.int64), T_PAD)
    row = meta_ptr + t * _MC
    numel = tl.load(row + _M_NUMEL)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    g_ptr = _address(pbase, row, _M_GRAD, P_ALIGN)
    m_ptr = _address(mbase, row, _M_EXP_AVG, M_ALIGN)
    v_ptr = _address(mbase, row, _M_EXP_AVG_SQ, M_ALIGN)
    scal = scal_ptr + t * _SC
    lo = tl.load(lo_ptr + t)
    hi = tl.load(hi_ptr + t)
    tally = counts_ptr + t * _CC
    region = cand_ptr + tl.load(row + _M_CAND_OFFSET)
    capacity = tl.load(row + _M_CAND_CAPACITY)
    if (block + 1) * BLOCK <= numel:
        _moments_bracket_block(g_ptr, m_ptr, v_ptr, offsets, offsets < numel, scal, lo, hi, tally, region, capacity,
                               PDTYPE, False)  # fmt: skip
    else:
        _moments_bracket_block(g_ptr, m_ptr, v_ptr, offsets, offsets < numel, scal, lo, hi, tally, region, capacity,
                               PDTYPE, True)  # fmt: skip


@triton.jit(do_not_specialize=["count"])
def _histogram_candidates_kernel(
    meta_ptr, starts_ptr, count, source_ptr, prefix_ptr, counts_ptr, cand_ptr, hist_ptr, SHIFT: tl.constexpr,
    WIDTH: tl.constexpr, BLOCK: tl.constexpr, T_PAD: tl.constexpr,
):  # fmt: skip
    t, block = _locate(starts_ptr, count, tl.program_id(0).to(tl.int64), T_PAD)
    if tl.load(source_ptr + t) == _SOURCE_CANDIDATES:
        row = meta_ptr + t * _MC
        stored = tl.minimum(tl.load(counts_ptr + t * _CC + _C_INSIDE), tl.load(row + _M_CAND_CAPACITY))
        offsets = block * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < stored
        region = cand_ptr + tl.load(row + _M_CAND_OFFSET)
        x = tl.load(region + offsets, mask=valid, other=0.0).to(tl.int32, bitcast=True)
        digit, keep = _digit_filter(x, tl.load(prefix_ptr + t), valid, SHIFT, WIDTH)
        hist = tl.histogram(digit, _BINS, mask=keep).to(tl.int64)
        tl.atomic_add(hist_ptr + t * _BINS + tl.arange(0, _BINS), hist, mask=hist > 0)


@triton.jit
def _range_block(
    m_ptr, g_ptr, offsets, valid, skipped, lo, hi, mode, prefix, PDTYPE: tl.constexpr, SHIFT: tl.constexpr,
    WIDTH: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    a = tl.abs(_load(m_ptr + offsets, valid, MASKED))
    if skipped > 0:
        g = _widen(_load(g_ptr + offsets, valid, MASKED), PDTYPE)
        a = tl.where(tl.abs(g) < _INF, a, 0.0)
    above = tl.where((mode & 1) != 0, a > lo, a >= lo)
    below = tl.where((mode & 2) != 0, a < hi, a <= hi)
    digit, keep = _digit_filter(a.to(tl.int32, bitcast=True), prefix, valid & above & below, SHIFT, WIDTH)
    return tl.histogram(digit, _BINS, mask=keep).to(tl.int64)


@triton.jit(do_not_specialize=["count"])
def _histogram_range_kernel(
    pbase, mbase, meta_ptr, count, source_ptr, lo_ptr, hi_ptr, mode_ptr, prefix_ptr, counts_ptr, hist_ptr,
    PDTYPE: tl.constexpr, P_ALIGN: tl.constexpr, M_ALIGN: tl.constexpr, SHIFT: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK: tl.constexpr, T_PAD: tl.constexpr,
):  # fmt: skip
    # Persistent: the tensors that need a whole pass are rare (a bracket that missed, an overflowed candidate
    # region), so each program first checks whether any does and otherwise exits at once.
    pid = tl.program_id(0).to(tl.int64)
    programs = tl.num_programs(0).to(tl.int64)
    index = tl.arange(0, T_PAD)
    sources = tl.load(source_ptr + index, mask=index < count, other=0)
    if tl.max(sources, axis=0) == _SOURCE_RANGE:
        for t in range(0, count):
            if tl.load(source_ptr + t) == _SOURCE_RANGE:
                row = meta_ptr + t * _MC
                numel = tl.load(row + _M_NUMEL)
                m_ptr = _address(mbase, row, _M_EXP_AVG, M_ALIGN)
                g_ptr = _address(pbase, row, _M_GRAD, P_ALIGN)
                skipped = tl.load(counts_ptr + t * _CC + _C_SKIPPED)
                lo = tl.load(lo_ptr + t)
                hi = tl.load(hi_ptr + t)
                mode = tl.load(mode_ptr + t)
                prefix = tl.load(prefix_ptr + t)
                bins = hist_ptr + t * _BINS + tl.arange(0, _BINS)
                for block in range(pid, tl.cdiv(numel, BLOCK), programs):
                    offsets = block * BLOCK + tl.arange(0, BLOCK)
                    if (block + 1) * BLOCK <= numel:
                        hist = _range_block(m_ptr, g_ptr, offsets, offsets < numel, skipped, lo, hi, mode, prefix,
                                            PDTYPE, SHIFT, WIDTH, False)  # fmt: skip
                    else:
                        hist = _range_block(m_ptr, g_ptr, offsets, offsets < numel, skipped, lo, hi, mode, prefix,
                                            PDTYPE, SHIFT, WIDTH, True)  # fmt: skip
                    tl.atomic_add(bins, hist, mask=hist > 0)


@triton.jit
def _update_block(
    p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, offsets, valid, tau, skipped, scal, PDTYPE: tl.constexpr,
    MASKED: tl.constexpr, HAS_MASTER: tl.constexpr,
):  # fmt: skip
    m = _load(m_ptr + offsets, valid, MASKED)
    selected = valid & (tl.abs(m) >= tau)
    if skipped > 0:
        g = _widen(_load(g_ptr + offsets, valid, MASKED), PDTYPE)
        selected = selected & (tl.abs(g) < _INF)
    p = _load(p_ptr + offsets, valid, MASKED)
    v = _load(v_ptr + offsets, valid, MASKED)
    new = _step(p, m, v, selected, scal, w_ptr + offsets, valid, PDTYPE, MASKED, HAS_MASTER)
    _store(p_ptr + offsets, new, valid, MASKED)
    return tl.sum(selected.to(tl.int64), axis=0)


@triton.jit(do_not_specialize=["count"])
def _update_kernel(
    pbase, mbase, meta_ptr, scal_ptr, starts_ptr, count, tau_ptr, counts_ptr, PDTYPE: tl.constexpr,
    P_ALIGN: tl.constexpr, M_ALIGN: tl.constexpr, BLOCK: tl.constexpr, T_PAD: tl.constexpr, HAS_MASTER: tl.constexpr,
):  # fmt: skip
    t, block = _locate(starts_ptr, count, tl.program_id(0).to(tl.int64), T_PAD)
    row = meta_ptr + t * _MC
    numel = tl.load(row + _M_NUMEL)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    p_ptr, g_ptr, m_ptr, v_ptr, w_ptr = _pointers(pbase, mbase, row, P_ALIGN, M_ALIGN)
    scal = scal_ptr + t * _SC
    tally = counts_ptr + t * _CC
    tau = tl.load(tau_ptr + t)
    skipped = tl.load(tally + _C_SKIPPED)
    # Every entry of a full block is read and written (the unselected ones with their own bits): the loads and
    # stores stay vectorised, and at MoFO's fractions nearly every 32-byte sector holds a selected entry anyway.
    if (block + 1) * BLOCK <= numel:
        moved = _update_block(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, offsets, offsets < numel, tau, skipped, scal, PDTYPE,
                              False, HAS_MASTER)  # fmt: skip
    else:
        moved = _update_block(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, offsets, offsets < numel, tau, skipped, scal, PDTYPE,
                              True, HAS_MASTER)  # fmt: skip
    if moved > 0:
        tl.atomic_add(tally + _C_MOVED, moved)


@triton.jit
def _fused_block(
    p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, offsets, valid, tau, dense, scal, PDTYPE: tl.constexpr, MASKED: tl.constexpr,
    HAS_MASTER: tl.constexpr,
):  # fmt: skip
    g = _widen(_load(g_ptr + offsets, valid, MASKED), PDTYPE)
    m, v, finite = _moments(g, _load(m_ptr + offsets, valid, MASKED), _load(v_ptr + offsets, valid, MASKED), scal)
    _store(m_ptr + offsets, m, valid, MASKED)
    _store(v_ptr + offsets, v, valid, MASKED)
    selected = valid & finite & ((tl.abs(m) >= tau) | dense)
    p = _load(p_ptr + offsets, valid, MASKED)
    new = _step(p, m, v, selected, scal, w_ptr + offsets, valid, PDTYPE, MASKED, HAS_MASTER)
    _store(p_ptr + offsets, new, valid, MASKED)
    return tl.sum(selected.to(tl.int64), axis=0), tl.sum((valid & ~finite).to(tl.int64), axis=0)


@triton.jit(do_not_specialize=["count"])
def _fused_kernel(
    pbase, mbase, meta_ptr, scal_ptr, starts_ptr, count, tau_ptr, counts_ptr, PDTYPE: tl.constexpr,
    P_ALIGN: tl.constexpr, M_ALIGN: tl.constexpr, BLOCK: tl.constexpr, T_PAD: tl.constexpr, HAS_MASTER: tl.constexpr,
):  # fmt: skip
    t, block = _locate(starts_ptr, count, tl.program_id(0).to(tl.int64), T_PAD)
    row = meta_ptr + t * _MC
    numel = tl.load(row + _M_NUMEL)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    p_ptr, g_ptr, m_ptr, v_ptr, w_ptr = _pointers(pbase, mbase, row, P_ALIGN, M_ALIGN)
    scal = scal_ptr + t * _SC
    tau = tl.load(tau_ptr + t)
    # The dense flag as a block (the interpreter cannot combine a block with a scalar boolean).
    dense = (tl.zeros([BLOCK], tl.int64) + tl.load(row + _M_DENSE)) != 0
    if (block + 1) * BLOCK <= numel:
        moved, skipped = _fused_block(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, offsets, offsets < numel, tau, dense, scal,
                                      PDTYPE, False, HAS_MASTER)  # fmt: skip
    else:
        moved, skipped = _fused_block(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, offsets, offsets < numel, tau, dense, scal,
                                      PDTYPE, True, HAS_MASTER)  # fmt: skip
    tally = counts_ptr + t * _CC
    if moved > 0:
        tl.atomic_add(tally + _C_MOVED, moved)
    if skipped > 0:
        tl.atomic_add(tally + _C_SKIPPED, skipped)


# ---- launch functions ---------------------------------------------------------------------------------------------


class TritonKernels:
    """Launch functions of the batched kernels (:class:`lit_mofo.optim._selection.BatchedKernels`).

    ``block`` entries per program for the streaming kernels (4096 with 8 warps: 16 per thread, vector loads in the
    full blocks), ``sample_block`` samples per program. ``launches`` counts the launches per kernel name.
    """

    name = "Triton kernels"
    dtypes = frozenset(_DTYPES)
    fuses_sampling = False
    block = 4096
    sample_block = 1024
    warps = 8

    def __init__(self) -> None:
        self.launches: Counter[str] = Counter()

    def supports(self, param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, master: Tensor | None) -> bool:
        """Contiguous float32/bfloat16/float16 parameters and gradients with float32 moments (and master copy), all
        on the parameter's device."""
        tensors = [param, grad, exp_avg, exp_avg_sq] + ([master] if master is not None else [])
        return (
            param.dtype in _DTYPES
            and grad.dtype == param.dtype
            and exp_avg.dtype == exp_avg_sq.dtype == torch.float32
            and (master is None or master.dtype == torch.float32)
            and all(t.device == param.device and t.is_contiguous() and t.layout == torch.strided for t in tensors)
        )

    @staticmethod
    def _pad(batch: Batch) -> int:
        return triton.next_power_of_2(batch.size + 1)

    def _persistent_programs(self, batch: Batch) -> int:
        if batch.device.type == "cuda":
            return 4 * torch.cuda.get_device_properties(batch.device).multi_processor_count
        return 2

    @staticmethod
    def _layout(batch: Batch) -> dict[str, object]:
        return {"PDTYPE": _DTYPES[batch.dtype], "P_ALIGN": batch.param_align, "M_ALIGN": batch.moment_align}

    def sample(self, batch: Batch, out: Tensor) -> None:
        self.launches["sample"] += 1
        grid = (batch.size, triton.cdiv(batch.sample_max, self.sample_block))
        _sample_kernel[grid](
            batch.param_base,
            batch.moment_base,
            batch.meta,
            batch.scal,
            out,
            PDTYPE=_DTYPES[batch.dtype],
            BLOCK=self.sample_block,
            num_warps=4,
            enable_fp_fusion=False,
        )

    def select_sample(self, batch: Batch, samples: Tensor, ranks: Tensor) -> Tensor:
        """Torch operations on the device: the samples as rows (padded with -1), sorted, read at the ranks."""
        sizes = batch.column(b.M_SAMPLE)
        rows = torch.repeat_interleave(torch.arange(batch.size, device=batch.device), sizes,
                                       output_size=batch.sample_total)  # fmt: skip
        columns = torch.arange(batch.sample_total, device=batch.device) - batch.column(b.M_SAMPLE_OFFSET)[rows]
        padded = torch.full((batch.size, batch.sample_max), -1.0, dtype=torch.float32, device=batch.device)
        padded[rows, columns] = samples
        ordered = padded.sort(dim=1, descending=True).values
        return ordered.gather(1, (ranks - 1).clamp(min=0))

    def moments_bracket(self, batch: Batch, lo: Tensor, hi: Tensor, counts: Tensor, candidates: Tensor) -> None:
        if batch.element_blocks == 0:  # only empty tensors: nothing to launch
            return
        self.launches["moments_bracket"] += 1
        _moments_bracket_kernel[(batch.element_blocks,)](
            batch.param_base,
            batch.moment_base,
            batch.meta,
            batch.scal,
            batch.block_starts,
            batch.size,
            lo,
            hi,
            counts,
            candidates,
            **self._layout(batch),
            BLOCK=self.block,
            T_PAD=self._pad(batch),
            num_warps=self.warps,
            enable_fp_fusion=False,
        )

    def histogram_candidates(
        self, batch: Batch, source: Tensor, prefix: Tensor, radix_round: int, counts: Tensor, candidates: Tensor,
        hist: Tensor,
    ) -> None:  # fmt: skip
        if batch.candidate_blocks == 0:
            return
        self.launches["histogram_candidates"] += 1
        shift, width = b.RADIX_ROUNDS[radix_round]
        _histogram_candidates_kernel[(batch.candidate_blocks,)](
            batch.meta,
            batch.candidate_block_starts,
            batch.size,
            source,
            prefix,
            counts,
            candidates,
            hist,
            SHIFT=shift,
            WIDTH=width,
            BLOCK=self.block,
            T_PAD=self._pad(batch),
            num_warps=self.warps,
            enable_fp_fusion=False,
        )

    def histogram_range(
        self, batch: Batch, source: Tensor, lo: Tensor, hi: Tensor, mode: Tensor, prefix: Tensor, radix_round: int,
        counts: Tensor, hist: Tensor,
    ) -> None:  # fmt: skip
        if batch.element_blocks == 0:
            return
        self.launches["histogram_range"] += 1
        shift, width = b.RADIX_ROUNDS[radix_round]
        programs = min(self._persistent_programs(batch), max(1, batch.element_blocks))
        _histogram_range_kernel[(programs,)](
            batch.param_base,
            batch.moment_base,
            batch.meta,
            batch.size,
            source,
            lo,
            hi,
            mode,
            prefix,
            counts,
            hist,
            **self._layout(batch),
            SHIFT=shift,
            WIDTH=width,
            BLOCK=self.block,
            T_PAD=self._pad(batch),
            num_warps=self.warps,
            enable_fp_fusion=False,
        )

    def update(self, batch: Batch, tau: Tensor, counts: Tensor) -> None:
        self._elementwise("update", _update_kernel, batch, tau, counts)

    def fused(self, batch: Batch, tau: Tensor, counts: Tensor) -> None:
        self._elementwise("fused", _fused_kernel, batch, tau, counts)

    def _elementwise(self, name: str, kernel: Any, batch: Batch, tau: Tensor, counts: Tensor) -> None:
        """Launch one of the two kernels that step every entry against the thresholds ``tau`` (the same arguments)."""
        if batch.element_blocks == 0:
            return
        self.launches[name] += 1
        kernel[(batch.element_blocks,)](
            batch.param_base,
            batch.moment_base,
            batch.meta,
            batch.scal,
            batch.block_starts,
            batch.size,
            tau,
            counts,
            **self._layout(batch),
            BLOCK=self.block,
            T_PAD=self._pad(batch),
            HAS_MASTER=batch.has_master,
            num_warps=self.warps,
            enable_fp_fusion=False,
        )
