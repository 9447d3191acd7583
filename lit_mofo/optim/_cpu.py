"""MoFO's fused CPU kernels: a small C library compiled on first use and called through :mod:`ctypes`.

One pass over memory does what torch's eager ops do in five or six: the moment update, the magnitude comparison
and the masked parameter update, with the candidates of the exact selection collected on the way. The library
has no dependency on torch's headers, so it compiles in about a second with the system C compiler (``$CC``, else
``cc``/``gcc``/``clang``); it is cached under ``$LIT_MOFO_CACHE_DIR`` (default ``~/.cache/lit_mofo``), keyed by
the source, the compiler and the CPU, and loaded from there by later processes. Nothing is compiled at import
time or at install time: :func:`load` builds it when a MoFO step first asks for it, and returns ``None`` (with the
reason in :func:`unavailable_reason`) where there is no compiler, the build fails, or ``LIT_MOFO_FUSED=0`` is set.

The arithmetic follows torch's CPU kernels operation by operation (``lerp_`` and ``addcmul_`` as the fused
multiply-adds their vectorised paths compile to, ``sqrt``/``div``/``add_``/``addcdiv_`` for the step, every scalar
rounded to float32 first), compiled with ``-ffp-contract=off`` so that the compiler adds no contraction of its own.
The moments then match torch's bit for bit; the step may differ in the last bit where torch's vectorised ``sqrt``
(SLEEF, 0.5 ulp) is not correctly rounded and the C one is. Parameters may be float32, bfloat16 or float16
(rounded to nearest-even once per step); the moments are always float32. Multi-threading uses OpenMP with
``torch.get_num_threads()`` threads, linked to the OpenMP runtime torch itself has loaded. Every pass that reads the
gradient tests each entry: one that is NaN or infinite keeps its moments and its weight and counts as ``|m| = 0``
in the selection (``MoFO(nonfinite="skip")``), at no extra pass over memory.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import Tensor

from lit_mofo.optim._selection import StepScalars

__all__ = ["CpuKernels", "load", "load_seconds", "unavailable_reason"]

log = logging.getLogger(__name__)

_ABI_VERSION = 8

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define ABI_VERSION 8
#define PAR_MIN 65536
#define MAX_CHUNKS 256

int mofo_abi_version(void) { return ABI_VERSION; }

#if defined(__FLT16_MAX__)
int mofo_has_f16(void) { return 1; }
#else
int mofo_has_f16(void) { return 0; }
#endif

/* ---- element types ---------------------------------------------------------------------------------------- */

static inline float load_f32(float x) { return x; }
static inline float store_f32(float x) { return x; }

static inline float load_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
/* c10::BFloat16's round to nearest even, NaN to the canonical quiet NaN. */
static inline uint16_t store_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return (uint16_t)0x7FC0u;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__FLT16_MAX__)
static inline float load_f16(uint16_t h) {
    _Float16 x;
    memcpy(&x, &h, sizeof x);
    return (float)x;
}
static inline uint16_t store_f16(float f) {
    _Float16 x = (_Float16)f;
    uint16_t h;
    memcpy(&h, &x, sizeof h);
    return h;
}
#endif

/* ---- shared pieces ---------------------------------------------------------------------------------------- */

static inline int64_t num_chunks(int64_t n, int64_t threads) {
    if (n < PAR_MIN || threads < 2) return 1;
    return threads > MAX_CHUNKS ? MAX_CHUNKS : threads;
}
static inline int64_t chunk_begin(int64_t n, int64_t chunks, int64_t t) {
    return (n / chunks) * t + (t < n % chunks ? t : n % chunks);
}

/* A gradient entry MoFO steps with (nonfinite="skip" leaves the others out: moments and weight unchanged). */
static inline int finite_f(float x) { return fabsf(x) < INFINITY; }

/* torch's lerp_ (vectorised path): weight < 0.5 ? m + w (g - m) : g - (1 - w)(g - m), as one fma. */
static inline float lerp_w(float m, float g, float w) {
    float d = g - m;
    return fabsf(w) < 0.5f ? fmaf(w, d, m) : fmaf(w - 1.0f, d, g);
}

/* One sample entry: |m_t| as the moment update will compute it, or 0 where the gradient is non-finite (such an
   entry is left out of the step and counts as 0 in the selection on every backend). */
static inline float sample_value(float m, float g, float w) { return finite_f(g) ? fabsf(lerp_w(m, g, w)) : 0.0f; }

/* exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2); torch's vectorised addcmul is compiled to an fma */
static inline float second_moment(float v, float g, float b2, float omb2) {
    return fmaf(omb2 * g, g, v * b2);
}

/* param.mul_(decay); param.addcdiv_(m, sqrt(v) / bc2 + eps, value=-step_size) */
static inline float adam_step(float p, float m, float v, int has_wd, float decay, float nss, float bc2, float eps) {
    float q = has_wd ? p * decay : p;
    float den = sqrtf(v) / bc2 + eps;
    return q + (nss * m) / den;
}

/* splitmix64: the sample's positions, mirrored bit for bit by lit_mofo.optim._selection.sample_indices. */
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
/* Stratified: sample j is a uniform position in the j-th of s equal strata, [floor(j n / s), floor((j+1) n / s)),
   so the positions increase with j (memory is read front to back) and every region of the tensor is represented.
   Writes the positions of samples [j0, j0 + len) to idx; the strata bounds advance by n / s with a carry, one
   division per block instead of two per sample. */
static void sample_positions(uint64_t key, int64_t j0, int64_t len, int64_t s, int64_t n, int64_t* restrict idx) {
    const int64_t q = n / s, r = n % s;
    int64_t start = j0 * q + (j0 * r) / s, frac = (j0 * r) % s;
    for (int64_t t = 0; t < len; ++t) {
        int64_t next = start + q, f = frac + r;
        if (f >= s) {
            f -= s;
            ++next;
        }
        uint64_t z = mix64(key + (uint64_t)(j0 + t + 1) * 0x9E3779B97F4A7C15ULL);
        idx[t] = start + (int64_t)(((z >> 32) * (uint64_t)(next - start)) >> 32);
        start = next;
        frac = f;
    }
}

/* ---- selection -------------------------------------------------------------------------------------------- */

void mofo_nan_to_inf(float* a, int64_t n) {
    for (int64_t i = 0; i < n; ++i)
        if (a[i] != a[i]) a[i] = INFINITY;
}

/* The value at ascending position kth (0-based) of a[0:n], non-negative floats (+inf allowed, no NaN), whose bit
   patterns order like the values: three rounds of radix selection on 11, 11 and 10 bits. a is left unchanged;
   the survivors of the first round go to a temporary buffer. Returns NaN if that buffer cannot be allocated. */
float mofo_select(const void* values, int64_t n, int64_t kth) {
    static const int shift[3] = {21, 10, 0};
    static const uint32_t mask[3] = {0x7FFu, 0x7FFu, 0x3FFu};
    const uint32_t* src = (const uint32_t*)values;
    uint32_t* work = NULL;
    int64_t len = n;
    for (int r = 0; r < 3; ++r) {
        int64_t hist[2048];
        memset(hist, 0, sizeof hist);
        for (int64_t i = 0; i < len; ++i) hist[(src[i] >> shift[r]) & mask[r]]++;
        uint32_t bucket = 0;
        while (kth >= hist[bucket]) kth -= hist[bucket++];
        if (work == NULL) {
            work = (uint32_t*)malloc((size_t)hist[bucket] * sizeof(uint32_t));
            if (work == NULL) return NAN;
        }
        int64_t kept = 0;
        for (int64_t i = 0; i < len; ++i) {
            uint32_t x = src[i];
            if (((x >> shift[r]) & mask[r]) == bucket) work[kept++] = x;
        }
        src = work;
        len = kept;
    }
    float out;
    memcpy(&out, &work[0], sizeof out); /* every survivor has the same 32 bits */
    free(work);
    return out;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

/* |m| in the range given by (lo, hi, mode): bit 1 makes lo exclusive, bit 2 makes hi exclusive; NaN never. */
static inline int in_range(float a, float lo, float hi, int mode) {
    int above = (mode & 1) ? (a > lo) : (a >= lo);
    int below = (mode & 2) ? (a < hi) : (a <= hi);
    return above & below;
}

/* ---- exact selection's pass 1 over one chunk: moments, counts and candidates ----------------------------------
   counts[0]: |m_t| NaN, [1]: above hi, [2]: in [lo, hi], [3]: candidates stored in mine (at most cap). */

#define BRACKET_SCALAR(LOAD, PT)                                                                                   \
    {                                                                                                             \
        float gf = LOAD(g[i]);                                                                                    \
        int fin = finite_f(gf);                                                                                   \
        float mi = lerp_w(m[i], gf, w);                                                                           \
        float vi = second_moment(v[i], gf, b2, omb2);                                                             \
        m[i] = fin ? mi : m[i];                                                                                   \
        v[i] = fin ? vi : v[i];                                                                                   \
        float a = fin ? fabsf(mi) : 0.0f;                                                                         \
        c_skip += !fin;                                                                                           \
        c_nan += a != a;                                                                                          \
        c_gt += a > hi;                                                                                           \
        if ((a >= lo) & (a <= hi)) {                                                                              \
            if (stored < cap) mine[stored++] = a;                                                                 \
            ++c_in;                                                                                               \
        }                                                                                                         \
    }

#if defined(__AVX512F__)
static inline __m512 load16_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t* p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#if defined(__FLT16_MAX__)
static inline __m512 load16_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
#endif

/* One loop, 16 entries at a time: the comparisons become masks and the candidates a compressed store. */
#define DEFINE_BRACKET_CHUNK(SUF, PT, LOAD)                                                                        \
    static void bracket_chunk_##SUF(float* restrict m, float* restrict v, const PT* restrict g, int64_t begin,     \
                                    int64_t end, float w, float b2, float omb2, float lo, float hi,               \
                                    float* restrict mine, int64_t cap, int64_t* restrict counts) {                \
        const int small = fabsf(w) < 0.5f;                                                                        \
        const __m512 vw = _mm512_set1_ps(small ? w : w - 1.0f), vb2 = _mm512_set1_ps(b2);                         \
        const __m512 vomb2 = _mm512_set1_ps(omb2), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);            \
        const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);                                                    \
        const __m512 vinf = _mm512_set1_ps(INFINITY);                                                             \
        int64_t c_nan = 0, c_gt = 0, c_in = 0, c_skip = 0, stored = 0, i = begin;                                 \
        for (; i + 16 <= end; i += 16) {                                                                          \
            __m512 gv = load16_##SUF(g + i), mv = _mm512_loadu_ps(m + i), vv = _mm512_loadu_ps(v + i);            \
            __m512 ga = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(gv), absmask));                  \
            __mmask16 fin = _mm512_cmp_ps_mask(ga, vinf, _CMP_LT_OQ);                                             \
            __m512 mi = _mm512_fmadd_ps(vw, _mm512_sub_ps(gv, mv), small ? mv : gv);                              \
            __m512 vi = _mm512_fmadd_ps(_mm512_mul_ps(vomb2, gv), gv, _mm512_mul_ps(vv, vb2));                    \
            _mm512_mask_storeu_ps(m + i, fin, mi);                                                                \
            _mm512_mask_storeu_ps(v + i, fin, vi);                                                                \
            c_skip += 16 - __builtin_popcount((unsigned)fin);                                                     \
            __m512 a = _mm512_maskz_mov_ps(fin, _mm512_castsi512_ps(                                              \
                                                    _mm512_and_si512(_mm512_castps_si512(mi), absmask)));         \
            c_nan += __builtin_popcount((unsigned)_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q));                        \
            c_gt += __builtin_popcount((unsigned)_mm512_cmp_ps_mask(a, vhi, _CMP_GT_OQ));                         \
            __mmask16 in = _mm512_cmp_ps_mask(a, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(a, vhi, _CMP_LE_OQ);       \
            if (in) {                                                                                             \
                int count = __builtin_popcount((unsigned)in);                                                     \
                if (stored + 16 <= cap) {                                                                         \
                    _mm512_mask_compressstoreu_ps(mine + stored, in, a);                                          \
                    stored += count;                                                                              \
                } else {                                                                                          \
                    float lanes[16];                                                                              \
                    _mm512_storeu_ps(lanes, a);                                                                   \
                    for (int l = 0; l < 16 && stored < cap; ++l)                                                  \
                        if ((in >> l) & 1) mine[stored++] = lanes[l];                                             \
                }                                                                                                 \
                c_in += count;                                                                                    \
            }                                                                                                     \
        }                                                                                                         \
        for (; i < end; ++i) BRACKET_SCALAR(LOAD, PT)                                                             \
        counts[0] = c_nan;                                                                                        \
        counts[1] = c_gt;                                                                                         \
        counts[2] = c_in;                                                                                         \
        counts[3] = stored;                                                                                       \
        counts[4] = c_skip;                                                                                       \
    }
#else
#define DEFINE_BRACKET_CHUNK(SUF, PT, LOAD)                                                                        \
    static void bracket_chunk_##SUF(float* restrict m, float* restrict v, const PT* restrict g, int64_t begin,     \
                                    int64_t end, float w, float b2, float omb2, float lo, float hi,               \
                                    float* restrict mine, int64_t cap, int64_t* restrict counts) {                \
        int64_t c_nan = 0, c_gt = 0, c_in = 0, c_skip = 0, stored = 0;                                            \
        for (int64_t i = begin; i < end; ++i) BRACKET_SCALAR(LOAD, PT)                                            \
        counts[0] = c_nan;                                                                                        \
        counts[1] = c_gt;                                                                                         \
        counts[2] = c_in;                                                                                         \
        counts[3] = stored;                                                                                       \
        counts[4] = c_skip;                                                                                       \
    }
#endif

DEFINE_BRACKET_CHUNK(f32, float, load_f32)
DEFINE_BRACKET_CHUNK(bf16, uint16_t, load_bf16)
#if defined(__FLT16_MAX__)
DEFINE_BRACKET_CHUNK(f16, uint16_t, load_f16)
#endif

/* |m[i]| as the selection sees it: 0 where a gradient is given and non-finite, as in the bracket pass. */
#define MAGNITUDE(m, g, i, LOAD) ((g) != NULL && !finite_f(LOAD((g)[i])) ? 0.0f : fabsf((m)[i]))

/* ---- per parameter dtype ---------------------------------------------------------------------------------- */

#define DEFINE_KERNELS(SUF, PT, LOAD, STORE)                                                                       \
    /* Sample of |m_t| at the hashed indices, m_t computed from m_{t-1} and g as the moment update will. */        \
    void mofo_sample_hashed_##SUF(const float* restrict m, const PT* restrict g, int64_t n, uint64_t key,          \
                                  int64_t s, float w, float* restrict out, int64_t threads) {                     \
        /* One thread: a sample is too little work for a parallel region, which stalls whenever another         \
           process holds one of the cores (measured 2-5x slower than serial on a shared 2-core machine). */       \
        (void)threads;                                                                                            \
        const int64_t chunks = 1;                                                                                 \
        for (int64_t c = 0; c < chunks; ++c) {                                                                    \
            enum { B = 64 };                                                                                      \
            int64_t idx[2][B];                                                                                    \
            const int64_t begin = chunk_begin(s, chunks, c), end = chunk_begin(s, chunks, c + 1);                 \
            sample_positions(key, begin, end - begin < B ? end - begin : B, s, n, idx[0]);                        \
            for (int64_t j0 = begin, cur = 0; j0 < end; j0 += B, cur ^= 1) {                                      \
                int64_t len = end - j0 < B ? end - j0 : B;                                                        \
                if (j0 + B < end) { /* the next block's positions, fetched while this one is computed */          \
                    int64_t next_len = end - j0 - B < B ? end - j0 - B : B;                                       \
                    sample_positions(key, j0 + B, next_len, s, n, idx[cur ^ 1]);                                  \
                    for (int64_t t = 0; t < next_len; ++t) {                                                      \
                        __builtin_prefetch(m + idx[cur ^ 1][t]);                                                  \
                        __builtin_prefetch(g + idx[cur ^ 1][t]);                                                  \
                    }                                                                                             \
                }                                                                                                 \
                for (int64_t t = 0; t < len; ++t) {                                                               \
                    int64_t i = idx[cur][t];                                                                      \
                    out[j0 + t] = sample_value(m[i], LOAD(g[i]), w);                                              \
                }                                                                                                 \
            }                                                                                                     \
        }                                                                                                         \
    }                                                                                                             \
    /* The same at given local indices; a negative index (an entry another rank holds) gives 0. */               \
    void mofo_sample_at_##SUF(const float* restrict m, const PT* restrict g, const int64_t* restrict idx,         \
                              int64_t s, float w, float* restrict out) {                                          \
        for (int64_t j = 0; j < s; ++j) {                                                                         \
            int64_t i = idx[j];                                                                                   \
            out[j] = i < 0 ? 0.0f : sample_value(m[i], LOAD(g[i]), w);                                            \
        }                                                                                                         \
    }                                                                                                             \
    /* Exact selection, pass 1: both moments on every entry with a finite gradient; counts of |m_t| that are NaN \
       (out[0]), above hi (out[1]) and in [lo, hi] (out[2]), an entry with a non-finite gradient counting as 0;    \
       the in-bracket values themselves into cand (out[3] of them: fewer than out[2] when cand's capacity ran     \
       out); out[4]: the entries with a non-finite gradient, whose moments were left unchanged. */                \
    void mofo_moments_bracket_##SUF(float* restrict m, float* restrict v, const PT* restrict g, int64_t n,       \
                                    float w, float b2, float omb2, float lo, float hi, float* restrict cand,        \
                                    int64_t cap, int64_t threads, int64_t* restrict out) {                       \
        int64_t chunks = num_chunks(n, threads);                                                                  \
        int64_t cap_t = cap / chunks;                                                                             \
        int64_t counts[MAX_CHUNKS][5];                                                                            \
        _Pragma("omp parallel for schedule(static, 1) num_threads(chunks) if (chunks > 1)")                      \
        for (int64_t t = 0; t < chunks; ++t)                                                                      \
            bracket_chunk_##SUF(m, v, g, chunk_begin(n, chunks, t), chunk_begin(n, chunks, t + 1), w, b2, omb2,   \
                                lo, hi, cand + t * cap_t, cap_t, counts[t]);                                      \
        int64_t total[5] = {0, 0, 0, 0, 0};                                                                          \
        for (int64_t t = 0; t < chunks; ++t) {                                                                    \
            if (t > 0 && counts[t][3] > 0)                                                                        \
                memmove(cand + total[3], cand + t * cap_t, (size_t)counts[t][3] * sizeof(float));                 \
            for (int q = 0; q < 5; ++q) total[q] += counts[t][q];                                                 \
        }                                                                                                         \
        for (int q = 0; q < 5; ++q) out[q] = total[q];                                                            \
    }                                                                                                             \
    /* Pass 2 (and the dense step): the AdamW step on the entries with |m| >= tau (every entry if dense) and,    \
       when g is given, a finite gradient; the others are left unwritten. Returns how many moved. */              \
    int64_t mofo_update_##SUF(PT* restrict p, const float* restrict m, const float* restrict v,                   \
                              const PT* restrict g, int64_t n, float tau, int dense, int has_wd, float decay,     \
                              float nss, float bc2, float eps, int64_t threads) {                                 \
        int64_t chunks = num_chunks(n, threads);                                                                  \
        int64_t moved = 0;                                                                                        \
        if (g == NULL) {                                                                                          \
            _Pragma("omp parallel for schedule(static) num_threads(chunks) reduction(+ : moved) if (chunks > 1)") \
            for (int64_t i = 0; i < n; ++i) {                                                                     \
                float mi = m[i];                                                                                  \
                int sel = dense | (fabsf(mi) >= tau);                                                             \
                PT old = p[i];                                                                                    \
                PT upd = STORE(adam_step(LOAD(old), mi, v[i], has_wd, decay, nss, bc2, eps));                     \
                p[i] = sel ? upd : old;                                                                           \
                moved += sel;                                                                                     \
            }                                                                                                     \
        } else {                                                                                                  \
            _Pragma("omp parallel for schedule(static) num_threads(chunks) reduction(+ : moved) if (chunks > 1)") \
            for (int64_t i = 0; i < n; ++i) {                                                                     \
                float mi = m[i];                                                                                  \
                int sel = (dense | (fabsf(mi) >= tau)) & finite_f(LOAD(g[i]));                                   \
                PT old = p[i];                                                                                    \
                PT upd = STORE(adam_step(LOAD(old), mi, v[i], has_wd, decay, nss, bc2, eps));                     \
                p[i] = sel ? upd : old;                                                                           \
                moved += sel;                                                                                     \
            }                                                                                                     \
        }                                                                                                         \
        return moved;                                                                                             \
    }                                                                                                             \
    /* One pass for a threshold known in advance (sampled selection, dense step): moments, comparison, step;      \
       entries with a non-finite gradient keep moments and weight (counted in *skipped). Returns how many moved. */\
    int64_t mofo_fused_##SUF(PT* restrict p, const PT* restrict g, float* restrict m, float* restrict v,          \
                             int64_t n, float w, float b2, float omb2, float tau, int dense, int has_wd,          \
                             float decay, float nss, float bc2, float eps, int64_t threads,                       \
                             int64_t* restrict skipped) {                                                         \
        int64_t chunks = num_chunks(n, threads);                                                                  \
        int64_t moved = 0, skip = 0;                                                                              \
        _Pragma("omp parallel for schedule(static) num_threads(chunks) reduction(+ : moved, skip) if (chunks > 1)")\
        for (int64_t i = 0; i < n; ++i) {                                                                         \
            float gf = LOAD(g[i]);                                                                                \
            int fin = finite_f(gf);                                                                               \
            float mi = lerp_w(m[i], gf, w);                                                                       \
            float vi = second_moment(v[i], gf, b2, omb2);                                                         \
            m[i] = fin ? mi : m[i];                                                                               \
            v[i] = fin ? vi : v[i];                                                                               \
            int sel = fin & (dense | (fabsf(mi) >= tau));                                                         \
            PT old = p[i];                                                                                        \
            PT upd = STORE(adam_step(LOAD(old), mi, vi, has_wd, decay, nss, bc2, eps));                           \
            p[i] = sel ? upd : old;                                                                               \
            moved += sel;                                                                                         \
            skip += !fin;                                                                                         \
        }                                                                                                         \
        *skipped = skip;                                                                                          \
        return moved;                                                                                             \
    }                                                                                                             \
    /* Writes every |m[i]| in range to out (which must hold them all) in index order; returns how many. When g is  \
       given, an entry with a non-finite gradient counts as 0, as in the bracket pass. */                         \
    int64_t mofo_collect_##SUF(const float* restrict m, const PT* restrict g, int64_t n, float lo, float hi,      \
                               int mode, float* restrict out, int64_t threads) {                                  \
        int64_t chunks = num_chunks(n, threads);                                                                  \
        int64_t counts[MAX_CHUNKS + 1];                                                                           \
        counts[0] = 0;                                                                                            \
        _Pragma("omp parallel for schedule(static, 1) num_threads(chunks) if (chunks > 1)")                      \
        for (int64_t t = 0; t < chunks; ++t) {                                                                    \
            int64_t c = 0;                                                                                        \
            for (int64_t i = chunk_begin(n, chunks, t); i < chunk_begin(n, chunks, t + 1); ++i)                   \
                c += in_range(MAGNITUDE(m, g, i, LOAD), lo, hi, mode);                                                \
            counts[t + 1] = c;                                                                                    \
        }                                                                                                         \
        for (int64_t t = 0; t < chunks; ++t) counts[t + 1] += counts[t];                                          \
        _Pragma("omp parallel for schedule(static, 1) num_threads(chunks) if (chunks > 1)")                      \
        for (int64_t t = 0; t < chunks; ++t) {                                                                    \
            int64_t c = counts[t];                                                                                \
            for (int64_t i = chunk_begin(n, chunks, t); i < chunk_begin(n, chunks, t + 1); ++i) {                 \
                float a = MAGNITUDE(m, g, i, LOAD);                                                                   \
                if (in_range(a, lo, hi, mode)) out[c++] = a;                                                      \
            }                                                                                                     \
        }                                                                                                         \
        return counts[chunks];                                                                                    \
    }

DEFINE_KERNELS(f32, float, load_f32, store_f32)
DEFINE_KERNELS(bf16, uint16_t, load_bf16, store_bf16)
#if defined(__FLT16_MAX__)
DEFINE_KERNELS(f16, uint16_t, load_f16, store_f16)
#endif
"""

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

# No flag that changes a result: -fno-math-errno and -fno-trapping-math only let the compiler vectorise sqrtf and
# the masked store; -ffp-contract=off keeps it from fusing multiply-adds that torch does not fuse.
_BASE_FLAGS = [
    "-O3",
    "-std=gnu11",
    "-fPIC",
    "-shared",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
]
# Tried in order; the first that compiles wins. Without OpenMP the kernels run on one thread.
_FLAG_SETS = [
    ["-march=native", "-mprefer-vector-width=512", "-fopenmp"],
    ["-march=native", "-fopenmp"],
    ["-fopenmp"],
    ["-march=native"],
    [],
]

_I64 = ctypes.c_int64
_F32 = ctypes.c_float
_INT = ctypes.c_int
_PTR = ctypes.c_void_p


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.kernels: CpuKernels | None = None
        self.reason: str | None = None
        self.seconds = 0.0


_state = _State()


def _cache_dir() -> Path:
    configured = os.environ.get("LIT_MOFO_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lit_mofo"


def _compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _cpu_signature() -> str:
    # -march=native code must not be loaded on a CPU with fewer instructions (a cache dir shared over NFS).
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("flags", "model name", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _openmp_runtime_dir() -> str | None:
    # Link against the OpenMP runtime torch ships (same soname), so the process keeps a single thread pool.
    lib = Path(torch.__file__).parent / "lib"
    return str(lib) if any(lib.glob("libgomp*.so*")) or any(lib.glob("libomp*")) else None


def _build(compiler: str) -> tuple[Path, float]:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    cache = _cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=cache, delete=True)
        probe.close()
    except OSError:
        cache = Path(tempfile.gettempdir()) / f"lit_mofo_{os.getuid() if hasattr(os, 'getuid') else 'user'}"
        cache.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in _FLAG_SETS:
        flags = _BASE_FLAGS + extra
        key = hashlib.sha256(
            "\0".join([_SOURCE, " ".join(flags), compiler, version, platform.machine(), _cpu_signature()]).encode()
        ).hexdigest()[:20]
        target = cache / f"mofo_kernels_{key}.so"
        if target.exists():
            return target, 0.0
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            source = Path(tmp) / "mofo_kernels.c"
            source.write_text(_SOURCE)
            built = Path(tmp) / target.name
            command = [compiler, *flags, str(source), "-o", str(built), "-lm"]
            runtime = _openmp_runtime_dir() if "-fopenmp" in extra else None
            if runtime is not None:
                command += [f"-L{runtime}", f"-Wl,-rpath,{runtime}"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                errors.append(f"{' '.join(extra) or 'no extra flags'}: {result.stderr.strip()[-400:]}")
                continue
            os.replace(built, target)  # atomic: concurrent ranks may race to the same file
        return target, time.perf_counter() - start
    raise RuntimeError("; ".join(errors))


def load() -> CpuKernels | None:
    """The fused CPU kernels, compiled on the first call of the process (or loaded from the cache); ``None``
    where they cannot be had, with the reason in :func:`unavailable_reason`. Never raises."""
    if _state.done:
        return _state.kernels
    with _state.lock:
        if _state.done:
            return _state.kernels
        start = time.perf_counter()
        try:
            if os.environ.get("LIT_MOFO_FUSED", "1").strip().lower() in ("0", "false", "no", "off"):
                raise RuntimeError("disabled by LIT_MOFO_FUSED=0")
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C compiler found (set $CC, or install cc/gcc/clang)")
            path, _ = _build(compiler)
            _state.kernels = CpuKernels(ctypes.CDLL(str(path)))
            log.debug("lit_mofo: fused MoFO CPU kernels loaded from %s", path)
        except Exception as err:  # any failure means: use the eager path
            _state.kernels = None
            _state.reason = f"{type(err).__name__}: {err}"
            log.info("lit_mofo: fused MoFO CPU kernels unavailable (%s); using the eager path.", _state.reason)
        _state.seconds = time.perf_counter() - start
        _state.done = True
    return _state.kernels


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None`` (``None`` when it has not run or succeeded)."""
    return _state.reason


def load_seconds() -> float:
    """Wall time the process's first :func:`load` took: the compilation, or the load from the cache."""
    return _state.seconds


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


class CpuKernels:
    """Typed wrappers of the C library; every tensor must be a contiguous CPU tensor (checked by :meth:`supports`)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        lib.mofo_abi_version.restype = _INT
        if lib.mofo_abi_version() != _ABI_VERSION:
            raise RuntimeError(f"stale kernel library (ABI {lib.mofo_abi_version()}, expected {_ABI_VERSION})")
        self._lib = lib
        self.dtypes = {torch.float32, torch.bfloat16} | ({torch.float16} if lib.mofo_has_f16() else set())
        lib.mofo_nan_to_inf.argtypes = [_PTR, _I64]
        lib.mofo_nan_to_inf.restype = None
        lib.mofo_select.argtypes = [_PTR, _I64, _I64]
        lib.mofo_select.restype = _F32
        self._fns: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}
        signatures = {
            "sample_hashed": ([_PTR, _PTR, _I64, ctypes.c_uint64, _I64, _F32, _PTR, _I64], None),
            "sample_at": ([_PTR, _PTR, _PTR, _I64, _F32, _PTR], None),
            "moments_bracket": (
                [_PTR, _PTR, _PTR, _I64, _F32, _F32, _F32, _F32, _F32, _PTR, _I64, _I64, _PTR],
                None,
            ),
            "update": ([_PTR, _PTR, _PTR, _PTR, _I64, _F32, _INT, _INT, _F32, _F32, _F32, _F32, _I64], _I64),
            "fused": (
                [_PTR, _PTR, _PTR, _PTR, _I64, _F32, _F32, _F32, _F32, _INT, _INT, _F32, _F32, _F32, _F32, _I64, _PTR],
                _I64,
            ),
            "collect": ([_PTR, _PTR, _I64, _F32, _F32, _INT, _PTR, _I64], _I64),
        }
        for dtype in self.dtypes:
            for name, (argtypes, restype) in signatures.items():
                fn = getattr(lib, f"mofo_{name}_{_SUFFIX[dtype]}")
                fn.argtypes = argtypes
                fn.restype = restype
                self._fns[name, dtype] = fn

    def supports(self, param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> bool:
        """Whether these (local, non-DTensor) tensors can take the fused kernels."""
        return (
            param.device.type == "cpu"
            and param.dtype in self.dtypes
            and grad.dtype == param.dtype
            and exp_avg.dtype == exp_avg_sq.dtype == torch.float32
            and grad.device.type == exp_avg.device.type == exp_avg_sq.device.type == "cpu"
            and param.is_contiguous()
            and grad.is_contiguous()
            and exp_avg.is_contiguous()
            and exp_avg_sq.is_contiguous()
            and not grad.is_sparse
        )

    @staticmethod
    def threads() -> int:
        return torch.get_num_threads()

    def sample_hashed(self, exp_avg: Tensor, grad: Tensor, key: int, size: int, weight: float, out: Tensor) -> None:
        fn = self._fns["sample_hashed", grad.dtype]
        fn(_ptr(exp_avg), _ptr(grad), exp_avg.numel(), key, size, weight, _ptr(out), self.threads())

    def sample_at(self, exp_avg: Tensor, grad: Tensor, local_index: Tensor, weight: float, out: Tensor) -> None:
        fn = self._fns["sample_at", grad.dtype]
        fn(_ptr(exp_avg), _ptr(grad), _ptr(local_index), local_index.numel(), weight, _ptr(out))

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
        counts = (_I64 * 5)()
        fn = self._fns["moments_bracket", grad.dtype]
        fn(
            _ptr(exp_avg),
            _ptr(exp_avg_sq),
            _ptr(grad),
            exp_avg.numel(),
            weight,
            beta2,
            1 - beta2,
            lo,
            hi,
            _ptr(candidates),
            candidates.numel(),
            self.threads(),
            counts,
        )
        return counts[0], counts[1], counts[2], counts[3], counts[4]

    def collect(self, exp_avg: Tensor, lo: float, hi: float, mode: int, out: Tensor, grad: Tensor | None) -> int:
        fn = self._fns["collect", torch.float32 if grad is None else grad.dtype]
        grad_ptr = None if grad is None else _ptr(grad)
        return fn(_ptr(exp_avg), grad_ptr, exp_avg.numel(), lo, hi, mode, _ptr(out), self.threads())

    def select(self, values: Tensor, count: int, kth_smallest: int) -> float:
        """Value at 0-based ascending position ``kth_smallest`` of ``values[:count]`` (>= 0, NaN-free)."""
        value = self._lib.mofo_select(_ptr(values), count, kth_smallest)
        if math.isnan(value):
            raise MemoryError(f"MoFO's selection could not allocate its buffer ({count} floats at most)")
        return value

    def nan_to_inf(self, values: Tensor) -> None:
        self._lib.mofo_nan_to_inf(_ptr(values), values.numel())

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
        fn = self._fns["update", param.dtype]
        return fn(
            _ptr(param),
            _ptr(exp_avg),
            _ptr(exp_avg_sq),
            None if grad is None else _ptr(grad),
            param.numel(),
            tau,
            int(dense),
            int(step.has_weight_decay),
            step.decay,
            -step.step_size,
            step.bias_correction2_sqrt,
            step.eps,
            self.threads(),
        )

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
        fn = self._fns["fused", param.dtype]
        skipped = _I64(0)
        moved = fn(
            _ptr(param),
            _ptr(grad),
            _ptr(exp_avg),
            _ptr(exp_avg_sq),
            param.numel(),
            step.weight,
            step.beta2,
            1 - step.beta2,
            tau,
            int(dense),
            int(step.has_weight_decay),
            step.decay,
            -step.step_size,
            step.bias_correction2_sqrt,
            step.eps,
            self.threads(),
            ctypes.byref(skipped),
        )
        return moved, skipped.value
