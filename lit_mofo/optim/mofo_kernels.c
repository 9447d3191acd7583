/* MoFO's fused CPU kernels: the operations of the selection driver (lit_mofo/optim/_selection.py) over a batch.

   Built and loaded by lit_mofo/optim/_cpu.py (the system C compiler, at the first step that needs it; no torch
   headers). Every operation takes the batch's tables: an int64 metadata row per tensor (M_* columns: element
   offsets from the two base pointers, sizes, the sample's key, the candidate region...), a float32 row of step
   scalars (S_*) and int64 counts (C_*), laid out exactly as in _selection.py; mofo_table_layout() lets the loader
   check that both sides agree.

   Arithmetic: torch's CPU kernels, operation by operation (lerp_ and addcmul_ as the fused multiply-adds their
   vectorised paths compile to; sqrt, div, add_ and addcdiv_ for the step; every scalar rounded to float32 first),
   compiled with -ffp-contract=off so that the compiler adds no contraction of its own. Every pass that reads a
   gradient tests each entry: one that is NaN or infinite keeps its moments and its weight and counts as |m| = 0 in
   the selection (MoFO(nonfinite="skip")). Parameters may be float32, bfloat16 or float16 (rounded to nearest-even
   once per step), with an optional float32 master copy; moments are float32. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define ABI_VERSION 9
#define PAR_MIN 65536
#define MAX_CHUNKS 256

enum {
    M_PARAM, M_GRAD, M_EXP_AVG, M_EXP_AVG_SQ, M_MASTER, M_NUMEL, M_GLOBAL_NUMEL, M_INNER, M_SIZE, M_START, M_LENGTH,
    M_KEY, M_SAMPLE, M_SAMPLE_OFFSET, M_CAND_OFFSET, M_CAND_CAPACITY, M_DENSE, M_K, M_J_HI, M_J_LO, M_COLUMNS
};
enum { S_WEIGHT, S_BETA2, S_ONE_MINUS_BETA2, S_EPS, S_DECAY, S_NEG_STEP_SIZE, S_BC2_SQRT, S_HAS_WD, S_COLUMNS };
enum { C_NAN, C_ABOVE, C_INSIDE, C_SKIPPED, C_MOVED, C_COLUMNS };
enum { SOURCE_NONE, SOURCE_CANDIDATES, SOURCE_RANGE };
#define RADIX_BINS 2048

int mofo_abi_version(void) { return ABI_VERSION; }
int64_t mofo_table_layout(void) { return M_COLUMNS * 10000 + S_COLUMNS * 100 + C_COLUMNS; }

#if defined(__FLT16_MAX__)
int mofo_has_f16(void) { return 1; }
#else
int mofo_has_f16(void) { return 0; }
#endif

/* ---- element types ---------------------------------------------------------------------------------------------- */

static inline float load_f32(float x) { return x; }
static inline float store_f32(float x) { return x; }
static inline uint32_t bits_f32(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u;
}

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
static inline uint32_t bits_u16(uint16_t h) { return h; }

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

/* ---- shared pieces ---------------------------------------------------------------------------------------------- */

static inline int64_t num_chunks(int64_t n, int64_t threads) {
    if (n < PAR_MIN || threads < 2) return 1;
    return threads > MAX_CHUNKS ? MAX_CHUNKS : threads;
}
static inline int64_t chunk_begin(int64_t n, int64_t chunks, int64_t t) {
    return (n / chunks) * t + (t < n % chunks ? t : n % chunks);
}

typedef struct {
    float w, b2, omb2, eps, decay, nss, bc2;
    int has_wd;
} scalars_t;

static inline scalars_t scalars_of(const float* s) {
    scalars_t out = {s[S_WEIGHT], s[S_BETA2], s[S_ONE_MINUS_BETA2], s[S_EPS], s[S_DECAY], s[S_NEG_STEP_SIZE],
                     s[S_BC2_SQRT], s[S_HAS_WD] != 0.0f};
    return out;
}

/* A gradient entry MoFO steps with (nonfinite="skip" leaves the others out: moments and weight unchanged). */
static inline int finite_f(float x) { return fabsf(x) < INFINITY; }

/* torch's lerp_ (vectorised path): weight < 0.5 ? m + w (g - m) : g - (1 - w)(g - m), as one fma. */
static inline float lerp_w(float m, float g, float w) {
    float d = g - m;
    return fabsf(w) < 0.5f ? fmaf(w, d, m) : fmaf(w - 1.0f, d, g);
}

/* exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2); torch's vectorised addcmul is compiled to an fma */
static inline float second_moment(float v, float g, float b2, float omb2) { return fmaf(omb2 * g, g, v * b2); }

/* param.mul_(decay); param.addcdiv_(m, sqrt(v) / bc2 + eps, value=-step_size) */
static inline float adam_step(float p, float m, float v, const scalars_t* s) {
    float q = s->has_wd ? p * s->decay : p;
    float den = sqrtf(v) / s->bc2 + s->eps;
    return q + (s->nss * m) / den;
}

/* One sample entry: |m_t| as the moment update will compute it (NaN as +inf), or 0 where the gradient is
   non-finite (such an entry is left out of the step and counts as 0 in the selection on every backend). */
static inline float sample_value(float m, float g, float w) {
    if (!finite_f(g)) return 0.0f;
    float a = fabsf(lerp_w(m, g, w));
    return a != a ? INFINITY : a;
}

/* |m| in the range given by (lo, hi, mode): bit 1 makes lo exclusive, bit 2 makes hi exclusive; NaN never. */
static inline int in_range(float a, float lo, float hi, int mode) {
    int above = (mode & 1) ? (a > lo) : (a >= lo);
    int below = (mode & 2) ? (a < hi) : (a <= hi);
    return above & below;
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

/* A global flat position of a tensor sharded along one dimension, as this rank's local position (-1: not held). */
static inline int64_t local_position(const int64_t* row, int64_t index) {
    const int64_t inner = row[M_INNER], size = row[M_SIZE], start = row[M_START], length = row[M_LENGTH];
    const int64_t along = (index / inner) % size, outer = index / (inner * size);
    if (along < start || along >= start + length) return -1;
    return outer * (length * inner) + (along - start) * inner + index % inner;
}

static inline int whole_tensor(const int64_t* row) { return row[M_NUMEL] == row[M_GLOBAL_NUMEL]; }

/* ---- selection -------------------------------------------------------------------------------------------------- */

/* The value at ascending position kth (0-based) of a[0:n], non-negative floats (+inf allowed, no NaN), whose bit
   patterns order like the values: three rounds of radix selection on 11, 11 and 10 bits. a is left unchanged;
   the survivors of the first round go to a temporary buffer. Returns NaN if that buffer cannot be allocated. */
static float select_kth(const float* values, int64_t n, int64_t kth) {
    static const int shift[3] = {21, 10, 0};
    static const uint32_t mask[3] = {0x7FFu, 0x7FFu, 0x3FFu};
    const uint32_t* src = (const uint32_t*)values;
    uint32_t* work = NULL;
    int64_t len = n;
    for (int r = 0; r < 3; ++r) {
        int64_t hist[RADIX_BINS];
        memset(hist, 0, sizeof hist);
        for (int64_t i = 0; i < len; ++i) hist[(src[i] >> shift[r]) & mask[r]]++;
        uint32_t bucket = 0;
        while (kth >= hist[bucket]) kth -= hist[bucket++];
        if (work == NULL) {
            work = (uint32_t*)malloc((size_t)(hist[bucket] > 0 ? hist[bucket] : 1) * sizeof(uint32_t));
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

/* out[t * R + r]: the ranks[t * R + r]-th largest (1-based) of tensor t's sample, for the tensors with one.
   Returns 0, or -1 when a selection could not allocate its buffer. */
int mofo_select_sample(const int64_t* meta, int64_t T, const float* samples, const int64_t* ranks, int64_t R,
                       float* out) {
    int failed = 0;
    for (int64_t t = 0; t < T; ++t) {
        const int64_t* row = meta + t * M_COLUMNS;
        const int64_t s = row[M_SAMPLE];
        if (s == 0) continue;
        for (int64_t r = 0; r < R; ++r) {
            float value = select_kth(samples + row[M_SAMPLE_OFFSET], s, s - ranks[t * R + r]);
            failed |= value != value;
            out[t * R + r] = value;
        }
    }
    return failed ? -1 : 0;
}

/* Adds to hist[t] the radix digits of tensor t's stored candidates whose higher digits equal prefix[t], for the
   tensors whose source is SOURCE_CANDIDATES. */
void mofo_histogram_candidates(const int64_t* meta, int64_t T, const int64_t* source, const int64_t* prefix,
                               int shift, int width, const int64_t* counts, const float* cand, int64_t* hist) {
    const int high = shift + width;
    const uint32_t digit_mask = (1u << width) - 1u;
    for (int64_t t = 0; t < T; ++t) {
        if (source[t] != SOURCE_CANDIDATES) continue;
        const int64_t* row = meta + t * M_COLUMNS;
        int64_t stored = counts[t * C_COLUMNS + C_INSIDE];
        if (stored > row[M_CAND_CAPACITY]) stored = row[M_CAND_CAPACITY];
        const uint32_t* x = (const uint32_t*)(cand + row[M_CAND_OFFSET]);
        int64_t* h = hist + t * RADIX_BINS;
        for (int64_t i = 0; i < stored; ++i)
            if (high >= 32 || (int64_t)(x[i] >> high) == prefix[t]) h[(x[i] >> shift) & digit_mask]++;
    }
}

/* ---- the exact selection's first pass over one chunk: moments, counts and candidates -----------------------------
   counts[0]: |m_t| NaN, [1]: above hi, [2]: in [lo, hi], [3]: candidates stored in mine (at most cap),
   [4]: entries with a non-finite gradient (moments left unchanged). */

#define BRACKET_SCALAR(LOAD)                                                                                           \
    {                                                                                                                  \
        float gf = LOAD(g[i]);                                                                                         \
        int fin = finite_f(gf);                                                                                        \
        float mi = lerp_w(m[i], gf, w);                                                                                \
        float vi = second_moment(v[i], gf, b2, omb2);                                                                  \
        m[i] = fin ? mi : m[i];                                                                                        \
        v[i] = fin ? vi : v[i];                                                                                        \
        float a = fin ? fabsf(mi) : 0.0f;                                                                              \
        c_skip += !fin;                                                                                                \
        c_nan += a != a;                                                                                               \
        c_gt += a > hi;                                                                                                \
        if ((a >= lo) & (a <= hi)) {                                                                                   \
            if (stored < cap) mine[stored++] = a;                                                                      \
            ++c_in;                                                                                                    \
        }                                                                                                              \
    }

#if defined(__AVX512F__)
#include <immintrin.h>
static inline __m512 load16_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_bf16(const uint16_t* p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
#if defined(__FLT16_MAX__)
static inline __m512 load16_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
#endif

/* One loop, 16 entries at a time: the comparisons become masks and the candidates a compressed store. */
#define DEFINE_BRACKET_CHUNK(SUF, PT, LOAD)                                                                            \
    static void bracket_chunk_##SUF(float* restrict m, float* restrict v, const PT* restrict g, int64_t begin,         \
                                    int64_t end, float w, float b2, float omb2, float lo, float hi,                   \
                                    float* restrict mine, int64_t cap, int64_t* restrict counts) {                    \
        const int small = fabsf(w) < 0.5f;                                                                            \
        const __m512 vw = _mm512_set1_ps(small ? w : w - 1.0f), vb2 = _mm512_set1_ps(b2);                             \
        const __m512 vomb2 = _mm512_set1_ps(omb2), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);                \
        const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);                                                        \
        const __m512 vinf = _mm512_set1_ps(INFINITY);                                                                 \
        int64_t c_nan = 0, c_gt = 0, c_in = 0, c_skip = 0, stored = 0, i = begin;                                     \
        for (; i + 16 <= end; i += 16) {                                                                              \
            __m512 gv = load16_##SUF(g + i), mv = _mm512_loadu_ps(m + i), vv = _mm512_loadu_ps(v + i);                \
            __m512 ga = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(gv), absmask));                      \
            __mmask16 fin = _mm512_cmp_ps_mask(ga, vinf, _CMP_LT_OQ);                                                 \
            __m512 mi = _mm512_fmadd_ps(vw, _mm512_sub_ps(gv, mv), small ? mv : gv);                                  \
            __m512 vi = _mm512_fmadd_ps(_mm512_mul_ps(vomb2, gv), gv, _mm512_mul_ps(vv, vb2));                        \
            _mm512_mask_storeu_ps(m + i, fin, mi);                                                                    \
            _mm512_mask_storeu_ps(v + i, fin, vi);                                                                    \
            c_skip += 16 - __builtin_popcount((unsigned)fin);                                                         \
            __m512 a =                                                                                                \
                _mm512_maskz_mov_ps(fin, _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(mi), absmask)));    \
            c_nan += __builtin_popcount((unsigned)_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q));                            \
            c_gt += __builtin_popcount((unsigned)_mm512_cmp_ps_mask(a, vhi, _CMP_GT_OQ));                             \
            __mmask16 in = _mm512_cmp_ps_mask(a, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(a, vhi, _CMP_LE_OQ);           \
            if (in) {                                                                                                 \
                int count = __builtin_popcount((unsigned)in);                                                         \
                if (stored + 16 <= cap) {                                                                             \
                    _mm512_mask_compressstoreu_ps(mine + stored, in, a);                                              \
                    stored += count;                                                                                  \
                } else {                                                                                              \
                    float lanes[16];                                                                                  \
                    _mm512_storeu_ps(lanes, a);                                                                       \
                    for (int l = 0; l < 16 && stored < cap; ++l)                                                      \
                        if ((in >> l) & 1) mine[stored++] = lanes[l];                                                 \
                }                                                                                                     \
                c_in += count;                                                                                        \
            }                                                                                                         \
        }                                                                                                             \
        for (; i < end; ++i) BRACKET_SCALAR(LOAD)                                                                     \
        counts[0] = c_nan;                                                                                            \
        counts[1] = c_gt;                                                                                             \
        counts[2] = c_in;                                                                                             \
        counts[3] = stored;                                                                                           \
        counts[4] = c_skip;                                                                                           \
    }
#else
#define DEFINE_BRACKET_CHUNK(SUF, PT, LOAD)                                                                            \
    static void bracket_chunk_##SUF(float* restrict m, float* restrict v, const PT* restrict g, int64_t begin,         \
                                    int64_t end, float w, float b2, float omb2, float lo, float hi,                   \
                                    float* restrict mine, int64_t cap, int64_t* restrict counts) {                    \
        int64_t c_nan = 0, c_gt = 0, c_in = 0, c_skip = 0, stored = 0;                                                \
        for (int64_t i = begin; i < end; ++i) BRACKET_SCALAR(LOAD)                                                    \
        counts[0] = c_nan;                                                                                            \
        counts[1] = c_gt;                                                                                             \
        counts[2] = c_in;                                                                                             \
        counts[3] = stored;                                                                                           \
        counts[4] = c_skip;                                                                                           \
    }
#endif

DEFINE_BRACKET_CHUNK(f32, float, load_f32)
DEFINE_BRACKET_CHUNK(bf16, uint16_t, load_bf16)
#if defined(__FLT16_MAX__)
DEFINE_BRACKET_CHUNK(f16, uint16_t, load_f16)
#endif

/* |m[i]| as the selection sees it: 0 where a gradient is given and non-finite, as in the bracket pass. */
#define MAGNITUDE(m, g, i, LOAD) ((g) != NULL && !finite_f(LOAD((g)[i])) ? 0.0f : fabsf((m)[i]))

/* The new stored value of a selected parameter entry, and of its master copy: the step starts from the master
   where the parameter still holds the master's rounding (bit for bit), from the parameter where someone wrote it
   since (a reset to pre-trained weights, a loaded state dict). */
#define STEP_ENTRY(PT, LOAD, STORE, BITS)                                                                              \
    PT old = p[i];                                                                                                     \
    float base = LOAD(old);                                                                                            \
    if (mw != NULL && BITS(STORE(mw[i])) == BITS(old)) base = mw[i];                                                   \
    float nw = adam_step(base, mi, vi, &s);                                                                            \
    p[i] = sel ? STORE(nw) : old;                                                                                      \
    if (mw != NULL) mw[i] = sel ? nw : mw[i];

/* ---- per parameter dtype ---------------------------------------------------------------------------------------- */

#define DEFINE_KERNELS(SUF, PT, LOAD, STORE, BITS)                                                                     \
    /* Every tensor's sample of |m_t| at its hashed positions, m_t computed from m_{t-1} and g as the moment update   \
       will; 0 at the positions another rank holds. One thread: a sample is too little work for a parallel region,   \
       which stalls whenever another process holds one of the cores. */                                              \
    void mofo_sample_##SUF(const int64_t* meta, const float* scal, int64_t T, const PT* pbase, const float* mbase,   \
                           float* out) {                                                                              \
        enum { B = 64 };                                                                                               \
        int64_t idx[2][B];                                                                                             \
        for (int64_t t = 0; t < T; ++t) {                                                                              \
            const int64_t* row = meta + t * M_COLUMNS;                                                                 \
            const int64_t s = row[M_SAMPLE], n = row[M_GLOBAL_NUMEL];                                                  \
            if (s == 0) continue;                                                                                      \
            const float* m = mbase + row[M_EXP_AVG];                                                                   \
            const PT* g = pbase + row[M_GRAD];                                                                         \
            const uint64_t key = (uint64_t)row[M_KEY];                                                                 \
            const float w = scal[t * S_COLUMNS + S_WEIGHT];                                                            \
            float* o = out + row[M_SAMPLE_OFFSET];                                                                     \
            const int whole = whole_tensor(row);                                                                       \
            sample_positions(key, 0, s < B ? s : B, s, n, idx[0]);                                                     \
            for (int64_t j0 = 0, cur = 0; j0 < s; j0 += B, cur ^= 1) {                                                 \
                int64_t len = s - j0 < B ? s - j0 : B;                                                                 \
                if (!whole)                                                                                            \
                    for (int64_t q = 0; q < len; ++q) idx[cur][q] = local_position(row, idx[cur][q]);                  \
                if (j0 + B < s) { /* the next block's positions, fetched while this one is computed */                 \
                    int64_t next_len = s - j0 - B < B ? s - j0 - B : B;                                                \
                    sample_positions(key, j0 + B, next_len, s, n, idx[cur ^ 1]);                                       \
                    if (whole)                                                                                         \
                        for (int64_t q = 0; q < next_len; ++q) {                                                       \
                            __builtin_prefetch(m + idx[cur ^ 1][q]);                                                   \
                            __builtin_prefetch(g + idx[cur ^ 1][q]);                                                   \
                        }                                                                                              \
                }                                                                                                      \
                for (int64_t q = 0; q < len; ++q) {                                                                    \
                    int64_t i = idx[cur][q];                                                                           \
                    o[j0 + q] = i < 0 ? 0.0f : sample_value(m[i], LOAD(g[i]), w);                                      \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
    }                                                                                                                  \
    /* The exact selection's first pass: both moments on every entry with a finite gradient; counts of |m_t| that    \
       are NaN, above hi and in [lo, hi] (an entry with a non-finite gradient counting as 0) and of the skipped       \
       entries; the in-bracket values themselves into the tensor's candidate region, all of them whenever they fit   \
       (the chunks that ran out of their share of the region are collected again). */                                \
    void mofo_moments_bracket_##SUF(const int64_t* meta, const float* scal, int64_t T, const PT* pbase,              \
                                    float* mbase, const float* lo, const float* hi, int64_t* counts, float* cand,     \
                                    int64_t threads) {                                                                 \
        for (int64_t t = 0; t < T; ++t) {                                                                              \
            const int64_t* row = meta + t * M_COLUMNS;                                                                 \
            const int64_t n = row[M_NUMEL], cap = row[M_CAND_CAPACITY];                                                \
            const PT* g = pbase + row[M_GRAD];                                                                         \
            float* m = mbase + row[M_EXP_AVG];                                                                         \
            float* v = mbase + row[M_EXP_AVG_SQ];                                                                      \
            float* region = cand + row[M_CAND_OFFSET];                                                                 \
            const scalars_t s = scalars_of(scal + t * S_COLUMNS);                                                      \
            const float l = lo[t], h = hi[t];                                                                          \
            const int64_t chunks = num_chunks(n, threads), cap_t = cap / chunks;                                       \
            int64_t c[MAX_CHUNKS][5];                                                                                  \
            _Pragma("omp parallel for schedule(static, 1) num_threads(chunks) if (chunks > 1)")                       \
            for (int64_t k = 0; k < chunks; ++k)                                                                       \
                bracket_chunk_##SUF(m, v, g, chunk_begin(n, chunks, k), chunk_begin(n, chunks, k + 1), s.w, s.b2,      \
                                    s.omb2, l, h, region + k * cap_t, cap_t, c[k]);                                    \
            int64_t total[5] = {0, 0, 0, 0, 0};                                                                        \
            for (int64_t k = 0; k < chunks; ++k)                                                                       \
                for (int q = 0; q < 5; ++q) total[q] += c[k][q];                                                       \
            int64_t stored = 0;                                                                                        \
            for (int64_t k = 0; k < chunks; ++k) { /* the complete chunks' candidates, to the front */                 \
                if (c[k][3] < c[k][2]) continue;                                                                       \
                if (k > 0 && c[k][3] > 0) memmove(region + stored, region + k * cap_t, (size_t)c[k][3] * sizeof(float)); \
                stored += c[k][3];                                                                                     \
            }                                                                                                          \
            if (total[2] <= cap)                                                                                       \
                for (int64_t k = 0; k < chunks; ++k) { /* then those of the chunks that ran out of room */             \
                    if (c[k][3] >= c[k][2]) continue;                                                                  \
                    const PT* gk = total[4] ? g : NULL;                                                                \
                    for (int64_t i = chunk_begin(n, chunks, k); i < chunk_begin(n, chunks, k + 1); ++i) {              \
                        float a = MAGNITUDE(m, gk, i, LOAD);                                                           \
                        if ((a >= l) & (a <= h)) region[stored++] = a;                                                 \
                    }                                                                                                  \
                }                                                                                                      \
            int64_t* out = counts + t * C_COLUMNS;                                                                     \
            out[C_NAN] += total[0];                                                                                    \
            out[C_ABOVE] += total[1];                                                                                  \
            out[C_INSIDE] += total[2];                                                                                 \
            out[C_SKIPPED] += total[4];                                                                                \
        }                                                                                                              \
    }                                                                                                                  \
    /* Adds to hist[t] the digits of |m| in (lo, hi, mode) of the tensors whose source is SOURCE_RANGE. */            \
    void mofo_histogram_range_##SUF(const int64_t* meta, int64_t T, const PT* pbase, const float* mbase,             \
                                    const int64_t* source, const float* lo, const float* hi, const int64_t* mode,    \
                                    const int64_t* prefix, int shift, int width, const int64_t* counts,              \
                                    int64_t* hist, int64_t threads) {                                                  \
        const int high = shift + width;                                                                                \
        const uint32_t digit_mask = (1u << width) - 1u;                                                                \
        for (int64_t t = 0; t < T; ++t) {                                                                              \
            if (source[t] != SOURCE_RANGE) continue;                                                                   \
            const int64_t* row = meta + t * M_COLUMNS;                                                                 \
            const int64_t n = row[M_NUMEL], chunks = num_chunks(n, threads);                                           \
            const float* m = mbase + row[M_EXP_AVG];                                                                   \
            const PT* g = counts[t * C_COLUMNS + C_SKIPPED] ? pbase + row[M_GRAD] : NULL;                              \
            const float l = lo[t], h = hi[t];                                                                          \
            const int md = (int)mode[t];                                                                               \
            const int64_t want = prefix[t];                                                                            \
            /* one histogram per chunk, summed afterwards; on one thread (or without memory) straight into hist */  \
            int64_t* partial = chunks > 1 ? (int64_t*)calloc((size_t)chunks * RADIX_BINS, sizeof(int64_t)) : NULL;     \
            const int64_t parts = partial != NULL ? chunks : 1;                                                        \
            _Pragma("omp parallel for schedule(static, 1) num_threads(parts) if (parts > 1)")                         \
            for (int64_t k = 0; k < parts; ++k) {                                                                      \
                int64_t* hk = partial != NULL ? partial + k * RADIX_BINS : hist + t * RADIX_BINS;                      \
                for (int64_t i = chunk_begin(n, parts, k); i < chunk_begin(n, parts, k + 1); ++i) {                    \
                    float a = MAGNITUDE(m, g, i, LOAD);                                                                \
                    uint32_t x = bits_f32(a);                                                                          \
                    if (in_range(a, l, h, md) && (high >= 32 || (int64_t)(x >> high) == want))                         \
                        hk[(x >> shift) & digit_mask]++;                                                               \
                }                                                                                                      \
            }                                                                                                          \
            if (partial != NULL)                                                                                       \
                for (int64_t k = 0; k < chunks; ++k)                                                                   \
                    for (int b = 0; b < RADIX_BINS; ++b) hist[t * RADIX_BINS + b] += partial[k * RADIX_BINS + b];      \
            free(partial);                                                                                             \
        }                                                                                                              \
    }                                                                                                                  \
    /* The exact selection's second pass: the AdamW step on the entries with |m| >= tau and a finite gradient (the   \
       gradient is read only for the tensors that had non-finite entries); the others keep their bits. */            \
    void mofo_update_##SUF(const int64_t* meta, const float* scal, int64_t T, PT* pbase, float* mbase,               \
                           const float* tau, int64_t* counts, int has_master, int64_t threads) {                      \
        for (int64_t t = 0; t < T; ++t) {                                                                              \
            const int64_t* row = meta + t * M_COLUMNS;                                                                 \
            const int64_t n = row[M_NUMEL], chunks = num_chunks(n, threads);                                           \
            PT* p = pbase + row[M_PARAM];                                                                              \
            const PT* g = counts[t * C_COLUMNS + C_SKIPPED] ? pbase + row[M_GRAD] : NULL;                              \
            const float* m = mbase + row[M_EXP_AVG];                                                                   \
            const float* v = mbase + row[M_EXP_AVG_SQ];                                                                \
            float* mw = has_master ? mbase + row[M_MASTER] : NULL;                                                     \
            const scalars_t s = scalars_of(scal + t * S_COLUMNS);                                                      \
            const float threshold = tau[t];                                                                            \
            int64_t moved = 0;                                                                                         \
            _Pragma("omp parallel for schedule(static) num_threads(chunks) reduction(+ : moved) if (chunks > 1)")     \
            for (int64_t i = 0; i < n; ++i) {                                                                          \
                float mi = m[i], vi = v[i];                                                                            \
                int sel = fabsf(mi) >= threshold;                                                                      \
                if (g != NULL) sel &= finite_f(LOAD(g[i]));                                                            \
                STEP_ENTRY(PT, LOAD, STORE, BITS)                                                                      \
                moved += sel;                                                                                          \
            }                                                                                                          \
            counts[t * C_COLUMNS + C_MOVED] += moved;                                                                  \
        }                                                                                                              \
    }                                                                                                                  \
    /* One pass for a threshold known in advance (the sampled selection, the dense step): moments, comparison, step; \
       entries with a non-finite gradient keep moments and weight. */                                                \
    void mofo_fused_##SUF(const int64_t* meta, const float* scal, int64_t T, PT* pbase, float* mbase,                \
                          const float* tau, int64_t* counts, int has_master, int64_t threads) {                       \
        for (int64_t t = 0; t < T; ++t) {                                                                              \
            const int64_t* row = meta + t * M_COLUMNS;                                                                 \
            const int64_t n = row[M_NUMEL], chunks = num_chunks(n, threads);                                           \
            PT* p = pbase + row[M_PARAM];                                                                              \
            const PT* g = pbase + row[M_GRAD];                                                                         \
            float* m = mbase + row[M_EXP_AVG];                                                                         \
            float* v = mbase + row[M_EXP_AVG_SQ];                                                                      \
            float* mw = has_master ? mbase + row[M_MASTER] : NULL;                                                     \
            const scalars_t s = scalars_of(scal + t * S_COLUMNS);                                                      \
            const float threshold = tau[t];                                                                            \
            const int dense = row[M_DENSE] != 0;                                                                       \
            int64_t moved = 0, skip = 0;                                                                               \
            _Pragma("omp parallel for schedule(static) num_threads(chunks) reduction(+ : moved, skip) if (chunks > 1)")\
            for (int64_t i = 0; i < n; ++i) {                                                                          \
                float gf = LOAD(g[i]);                                                                                 \
                int fin = finite_f(gf);                                                                                \
                float mi = lerp_w(m[i], gf, s.w);                                                                      \
                float vi = second_moment(v[i], gf, s.b2, s.omb2);                                                      \
                m[i] = fin ? mi : m[i];                                                                                \
                v[i] = fin ? vi : v[i];                                                                                \
                int sel = fin & (dense | (fabsf(mi) >= threshold));                                                    \
                STEP_ENTRY(PT, LOAD, STORE, BITS)                                                                      \
                moved += sel;                                                                                          \
                skip += !fin;                                                                                          \
            }                                                                                                          \
            counts[t * C_COLUMNS + C_MOVED] += moved;                                                                  \
            counts[t * C_COLUMNS + C_SKIPPED] += skip;                                                                 \
        }                                                                                                              \
    }

DEFINE_KERNELS(f32, float, load_f32, store_f32, bits_f32)
DEFINE_KERNELS(bf16, uint16_t, load_bf16, store_bf16, bits_u16)
#if defined(__FLT16_MAX__)
DEFINE_KERNELS(f16, uint16_t, load_f16, store_f16, bits_u16)
#endif
