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
   tensors whose source is SOURCE_CANDIDATES. The first round counts every candidate (four interleaved histograms,
   so that runs of equal digits do not wait on each other's increments); the later ones skip most of them. */
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
        if (high >= 32) {
            int64_t(*parts)[RADIX_BINS] = calloc(4, sizeof *parts);
            if (parts == NULL) { /* one histogram, slower */
                for (int64_t i = 0; i < stored; ++i) h[(x[i] >> shift) & digit_mask]++;
                continue;
            }
            int64_t i = 0;
            for (; i + 4 <= stored; i += 4)
                for (int q = 0; q < 4; ++q) parts[q][(x[i + q] >> shift) & digit_mask]++;
            for (; i < stored; ++i) parts[0][(x[i] >> shift) & digit_mask]++;
            for (int b = 0; b < RADIX_BINS; ++b) h[b] += parts[0][b] + parts[1][b] + parts[2][b] + parts[3][b];
            free(parts);
        } else {
            const uint32_t want = (uint32_t)prefix[t];
            for (int64_t i = 0; i < stored; ++i)
                if ((x[i] >> high) == want) h[(x[i] >> shift) & digit_mask]++;
        }
    }
}

/* ---- vectors -------------------------------------------------------------------------------------------------------
   The passes over memory are written once, as spans over operations of one width: the scalar operations (s_*, width
   1) and the vector operations of the instruction set the library is built for (v_*: AVX-512, 16 floats; AVX2 with
   FMA and F16C, 8 floats). Each operation is the same IEEE operation at every width (fma where torch fuses, correctly
   rounded sqrt and division, round-to-nearest-even narrowing), so a span computes the same bits at any width, and a
   build for any level the same bits as any other. */

typedef float s_f;
typedef int s_m;
#define s_W 1
static inline s_f s_load(const float* p) { return *p; }
static inline void s_store(float* p, s_f x) { *p = x; }
static inline s_f s_set(float x) { return x; }
static inline s_f s_abs(s_f x) { return fabsf(x); }
static inline s_f s_fma(s_f a, s_f b, s_f c) { return fmaf(a, b, c); }
static inline s_f s_add(s_f a, s_f b) { return a + b; }
static inline s_f s_sub(s_f a, s_f b) { return a - b; }
static inline s_f s_mul(s_f a, s_f b) { return a * b; }
static inline s_f s_div(s_f a, s_f b) { return a / b; }
static inline s_f s_sqrt(s_f a) { return sqrtf(a); }
static inline s_m s_lt(s_f a, s_f b) { return a < b; }
static inline s_m s_le(s_f a, s_f b) { return a <= b; }
static inline s_m s_gt(s_f a, s_f b) { return a > b; }
static inline s_m s_ge(s_f a, s_f b) { return a >= b; }
static inline s_m s_unord(s_f a, s_f b) { return (a != a) | (b != b); }
static inline s_m s_and(s_m a, s_m b) { return a & b; }
static inline s_m s_all(void) { return 1; }
static inline s_f s_select(s_m m, s_f a, s_f b) { return m ? a : b; }
static inline unsigned s_bits(s_m m) { return (unsigned)m; }
/* Writes the selected lanes of a to dst[0 : count] (and possibly more lanes after them) and returns count. */
static inline int s_compact(float* dst, s_m m, s_f a) {
    *dst = a;
    return m;
}
/* parameters: the raw stored value, widened to float and narrowed back (rounded to nearest even) */
typedef float s_raw_f32;
typedef uint16_t s_raw_bf16;
typedef uint16_t s_raw_f16;
static inline s_raw_f32 s_pload_f32(const float* p) { return *p; }
static inline s_f s_widen_f32(s_raw_f32 x) { return x; }
static inline s_raw_f32 s_narrow_f32(s_f x) { return x; }
static inline s_raw_f32 s_pselect_f32(s_m m, s_raw_f32 a, s_raw_f32 b) { return m ? a : b; }
static inline s_m s_peq_f32(s_raw_f32 a, s_raw_f32 b) { return bits_f32(a) == bits_f32(b); }
static inline void s_pstore_f32(float* p, s_raw_f32 x) { *p = x; }
static inline s_raw_bf16 s_pload_bf16(const uint16_t* p) { return *p; }
static inline s_f s_widen_bf16(s_raw_bf16 x) { return load_bf16(x); }
static inline s_raw_bf16 s_narrow_bf16(s_f x) { return store_bf16(x); }
static inline s_raw_bf16 s_pselect_bf16(s_m m, s_raw_bf16 a, s_raw_bf16 b) { return m ? a : b; }
static inline s_m s_peq_bf16(s_raw_bf16 a, s_raw_bf16 b) { return a == b; }
static inline void s_pstore_bf16(uint16_t* p, s_raw_bf16 x) { *p = x; }
#if defined(__FLT16_MAX__)
static inline s_raw_f16 s_pload_f16(const uint16_t* p) { return *p; }
static inline s_f s_widen_f16(s_raw_f16 x) { return load_f16(x); }
static inline s_raw_f16 s_narrow_f16(s_f x) { return store_f16(x); }
static inline s_raw_f16 s_pselect_f16(s_m m, s_raw_f16 a, s_raw_f16 b) { return m ? a : b; }
static inline s_m s_peq_f16(s_raw_f16 a, s_raw_f16 b) { return a == b; }
static inline void s_pstore_f16(uint16_t* p, s_raw_f16 x) { *p = x; }
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define MOFO_VECTORS "avx512"
typedef __m512 v_f;
typedef __mmask16 v_m;
#define v_W 16
static inline v_f v_load(const float* p) { return _mm512_loadu_ps(p); }
static inline void v_store(float* p, v_f x) { _mm512_storeu_ps(p, x); }
static inline v_f v_set(float x) { return _mm512_set1_ps(x); }
static inline v_f v_abs(v_f x) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)));
}
static inline v_f v_fma(v_f a, v_f b, v_f c) { return _mm512_fmadd_ps(a, b, c); }
static inline v_f v_add(v_f a, v_f b) { return _mm512_add_ps(a, b); }
static inline v_f v_sub(v_f a, v_f b) { return _mm512_sub_ps(a, b); }
static inline v_f v_mul(v_f a, v_f b) { return _mm512_mul_ps(a, b); }
static inline v_f v_div(v_f a, v_f b) { return _mm512_div_ps(a, b); }
static inline v_f v_sqrt(v_f a) { return _mm512_sqrt_ps(a); }
static inline v_m v_lt(v_f a, v_f b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
static inline v_m v_le(v_f a, v_f b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
static inline v_m v_gt(v_f a, v_f b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
static inline v_m v_ge(v_f a, v_f b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
static inline v_m v_unord(v_f a, v_f b) { return _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q); }
static inline v_m v_and(v_m a, v_m b) { return a & b; }
static inline v_m v_all(void) { return 0xFFFF; }
static inline v_f v_select(v_m m, v_f a, v_f b) { return _mm512_mask_blend_ps(m, b, a); }
static inline unsigned v_bits(v_m m) { return (unsigned)m; }
static inline int v_compact(float* dst, v_m m, v_f a) {
    _mm512_storeu_ps(dst, _mm512_maskz_compress_ps(m, a)); /* the register form: the memory form is slow on AMD */
    return __builtin_popcount((unsigned)m);
}
typedef __m512 v_raw_f32;
typedef __m256i v_raw_bf16;
typedef __m256i v_raw_f16;
static inline v_raw_f32 v_pload_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline v_f v_widen_f32(v_raw_f32 x) { return x; }
static inline v_raw_f32 v_narrow_f32(v_f x) { return x; }
static inline v_raw_f32 v_pselect_f32(v_m m, v_raw_f32 a, v_raw_f32 b) { return _mm512_mask_blend_ps(m, b, a); }
static inline v_m v_peq_f32(v_raw_f32 a, v_raw_f32 b) {
    return _mm512_cmpeq_epi32_mask(_mm512_castps_si512(a), _mm512_castps_si512(b));
}
static inline void v_pstore_f32(float* p, v_raw_f32 x) { _mm512_storeu_ps(p, x); }
static inline v_raw_bf16 v_pload_bf16(const uint16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline v_f v_widen_bf16(v_raw_bf16 x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}
static inline v_raw_bf16 v_narrow_bf16(v_f x) { /* store_bf16, 16 at a time */
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}
static inline v_raw_bf16 v_pselect_bf16(v_m m, v_raw_bf16 a, v_raw_bf16 b) { return _mm256_mask_blend_epi16(m, b, a); }
static inline v_m v_peq_bf16(v_raw_bf16 a, v_raw_bf16 b) { return _mm256_cmpeq_epi16_mask(a, b); }
static inline void v_pstore_bf16(uint16_t* p, v_raw_bf16 x) { _mm256_storeu_si256((__m256i*)p, x); }
#if defined(__FLT16_MAX__)
static inline v_raw_f16 v_pload_f16(const uint16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline v_f v_widen_f16(v_raw_f16 x) { return _mm512_cvtph_ps(x); }
static inline v_raw_f16 v_narrow_f16(v_f x) { return _mm512_cvtps_ph(x, _MM_FROUND_CUR_DIRECTION); }
static inline v_raw_f16 v_pselect_f16(v_m m, v_raw_f16 a, v_raw_f16 b) { return _mm256_mask_blend_epi16(m, b, a); }
static inline v_m v_peq_f16(v_raw_f16 a, v_raw_f16 b) { return _mm256_cmpeq_epi16_mask(a, b); }
static inline void v_pstore_f16(uint16_t* p, v_raw_f16 x) { _mm256_storeu_si256((__m256i*)p, x); }
#endif

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MOFO_VECTORS "avx2"
typedef __m256 v_f;
typedef __m256 v_m; /* all ones where true */
#define v_W 8
static inline v_f v_load(const float* p) { return _mm256_loadu_ps(p); }
static inline void v_store(float* p, v_f x) { _mm256_storeu_ps(p, x); }
static inline v_f v_set(float x) { return _mm256_set1_ps(x); }
static inline v_f v_abs(v_f x) { return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }
static inline v_f v_fma(v_f a, v_f b, v_f c) { return _mm256_fmadd_ps(a, b, c); }
static inline v_f v_add(v_f a, v_f b) { return _mm256_add_ps(a, b); }
static inline v_f v_sub(v_f a, v_f b) { return _mm256_sub_ps(a, b); }
static inline v_f v_mul(v_f a, v_f b) { return _mm256_mul_ps(a, b); }
static inline v_f v_div(v_f a, v_f b) { return _mm256_div_ps(a, b); }
static inline v_f v_sqrt(v_f a) { return _mm256_sqrt_ps(a); }
static inline v_m v_lt(v_f a, v_f b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
static inline v_m v_le(v_f a, v_f b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
static inline v_m v_gt(v_f a, v_f b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
static inline v_m v_ge(v_f a, v_f b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
static inline v_m v_unord(v_f a, v_f b) { return _mm256_cmp_ps(a, b, _CMP_UNORD_Q); }
static inline v_m v_and(v_m a, v_m b) { return _mm256_and_ps(a, b); }
static inline v_m v_all(void) { return _mm256_castsi256_ps(_mm256_set1_epi32(-1)); }
static inline v_f v_select(v_m m, v_f a, v_f b) { return _mm256_blendv_ps(b, a, m); }
static inline unsigned v_bits(v_m m) { return (unsigned)_mm256_movemask_ps(m); }
/* AVX2 has no compress: a permutation per 8-bit mask moves the selected lanes to the front. */
static __m256i compact_table[256];
__attribute__((constructor)) static void compact_init(void) {
    for (int mask = 0; mask < 256; ++mask) {
        int lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0}, count = 0;
        for (int l = 0; l < 8; ++l)
            if (mask >> l & 1) lanes[count++] = l;
        compact_table[mask] =
            _mm256_setr_epi32(lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7]);
    }
}
static inline int v_compact(float* dst, v_m m, v_f a) {
    unsigned bits = (unsigned)_mm256_movemask_ps(m);
    _mm256_storeu_ps(dst, _mm256_permutevar8x32_ps(a, compact_table[bits]));
    return __builtin_popcount(bits);
}
/* an 8-lane 32-bit mask as 8 lanes of 16 bits, and back */
static inline __m128i mask16(v_m m) {
    __m256i wide = _mm256_castps_si256(m);
    return _mm_packs_epi32(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
}
static inline v_m mask32(__m128i m) { return _mm256_castsi256_ps(_mm256_cvtepi16_epi32(m)); }
typedef __m256 v_raw_f32;
typedef __m128i v_raw_bf16;
typedef __m128i v_raw_f16;
static inline v_raw_f32 v_pload_f32(const float* p) { return _mm256_loadu_ps(p); }
static inline v_f v_widen_f32(v_raw_f32 x) { return x; }
static inline v_raw_f32 v_narrow_f32(v_f x) { return x; }
static inline v_raw_f32 v_pselect_f32(v_m m, v_raw_f32 a, v_raw_f32 b) { return _mm256_blendv_ps(b, a, m); }
static inline v_m v_peq_f32(v_raw_f32 a, v_raw_f32 b) {
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b)));
}
static inline void v_pstore_f32(float* p, v_raw_f32 x) { _mm256_storeu_ps(p, x); }
static inline v_raw_bf16 v_pload_bf16(const uint16_t* p) { return _mm_loadu_si128((const __m128i*)p); }
static inline v_f v_widen_bf16(v_raw_bf16 x) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16)); }
static inline v_raw_bf16 v_narrow_bf16(v_f x) { /* store_bf16, 8 at a time */
    __m256i u = _mm256_castps_si256(x);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}
static inline v_raw_bf16 v_pselect_bf16(v_m m, v_raw_bf16 a, v_raw_bf16 b) { return _mm_blendv_epi8(b, a, mask16(m)); }
static inline v_m v_peq_bf16(v_raw_bf16 a, v_raw_bf16 b) { return mask32(_mm_cmpeq_epi16(a, b)); }
static inline void v_pstore_bf16(uint16_t* p, v_raw_bf16 x) { _mm_storeu_si128((__m128i*)p, x); }
#if defined(__FLT16_MAX__)
static inline v_raw_f16 v_pload_f16(const uint16_t* p) { return _mm_loadu_si128((const __m128i*)p); }
static inline v_f v_widen_f16(v_raw_f16 x) { return _mm256_cvtph_ps(x); }
static inline v_raw_f16 v_narrow_f16(v_f x) { return _mm256_cvtps_ph(x, _MM_FROUND_CUR_DIRECTION); }
static inline v_raw_f16 v_pselect_f16(v_m m, v_raw_f16 a, v_raw_f16 b) { return _mm_blendv_epi8(b, a, mask16(m)); }
static inline v_m v_peq_f16(v_raw_f16 a, v_raw_f16 b) { return mask32(_mm_cmpeq_epi16(a, b)); }
static inline void v_pstore_f16(uint16_t* p, v_raw_f16 x) { _mm_storeu_si128((__m128i*)p, x); }
#endif
#else
#define MOFO_VECTORS "none"
#endif

const char* mofo_vectors(void) { return MOFO_VECTORS; }

/* ---- the passes over memory, as spans of one width (V: s or v) -----------------------------------------------------
   bracket: the exact selection's first pass; both moments on every entry with a finite gradient, counts of |m_t| that
            are NaN (c[0]), above hi (c[1]), in [lo, hi] (c[2]), of the candidates stored (c[3], at most cap) and of the
            skipped entries (c[4]); an entry with a non-finite gradient counts as |m_t| = 0.
   update:  the exact selection's second pass; the AdamW step on the entries with |m| >= tau (and a finite gradient,
            when the gradient is given), from the master copy where the parameter still holds its rounding.
   fused:   moments, comparison with tau (every finite entry when dense) and step in one pass.
   Every entry of a vector is computed and stored (the unselected ones with their own bits): a branch on whether a
   vector holds a selected entry costs more in mispredictions than it saves. Each returns the entries it moved. */

#define DEFINE_SPANS(V, SUF, PT)                                                                                       \
    static inline void bracket_span_##V##_##SUF(float* restrict m, float* restrict v, const PT* restrict g,            \
                                                int64_t* ip, int64_t end, const scalars_t* s, float lo, float hi,      \
                                                float* restrict mine, int64_t cap, int64_t* restrict c) {              \
        const int small = fabsf(s->w) < 0.5f;                                                                          \
        const V##_f vw = V##_set(small ? s->w : s->w - 1.0f), vb2 = V##_set(s->b2), vomb2 = V##_set(s->omb2);          \
        const V##_f vlo = V##_set(lo), vhi = V##_set(hi), vinf = V##_set(INFINITY), vzero = V##_set(0.0f);            \
        int64_t i = *ip;                                                                                               \
        for (; i + V##_W <= end; i += V##_W) {                                                                         \
            const V##_f gv = V##_widen_##SUF(V##_pload_##SUF(g + i)), mv = V##_load(m + i), vv = V##_load(v + i);      \
            const V##_m fin = V##_lt(V##_abs(gv), vinf);                                                               \
            const V##_f mi = V##_fma(vw, V##_sub(gv, mv), small ? mv : gv);                                            \
            const V##_f vi = V##_fma(V##_mul(vomb2, gv), gv, V##_mul(vv, vb2));                                        \
            V##_store(m + i, V##_select(fin, mi, mv));                                                                 \
            V##_store(v + i, V##_select(fin, vi, vv));                                                                 \
            const V##_f a = V##_select(fin, V##_abs(mi), vzero);                                                       \
            c[4] += V##_W - __builtin_popcount(V##_bits(fin));                                                         \
            c[0] += __builtin_popcount(V##_bits(V##_unord(a, a)));                                                     \
            c[1] += __builtin_popcount(V##_bits(V##_gt(a, vhi)));                                                      \
            const V##_m inside = V##_and(V##_ge(a, vlo), V##_le(a, vhi));                                              \
            if (c[3] + V##_W <= cap) { /* no branch on the data: a store to the same cache line when none is in */    \
                const int found = V##_compact(mine + c[3], inside, a);                                                 \
                c[2] += found;                                                                                         \
                c[3] += found;                                                                                         \
            } else {                                                                                                   \
                unsigned in = V##_bits(inside);                                                                        \
                float lanes[V##_W];                                                                                    \
                V##_store(lanes, a);                                                                                   \
                c[2] += __builtin_popcount(in);                                                                        \
                for (; in; in &= in - 1)                                                                               \
                    if (c[3] < cap) mine[c[3]++] = lanes[__builtin_ctz(in)];                                           \
            }                                                                                                          \
        }                                                                                                              \
        *ip = i;                                                                                                       \
    }                                                                                                                  \
    static inline __attribute__((always_inline)) int64_t update_span_##V##_##SUF(                                     \
        PT* restrict p, const float* restrict m, const float* restrict v, const PT* restrict g, float* restrict w,    \
        int64_t* ip, int64_t end, float tau, const scalars_t* s, const int has_g, const int has_w) {                  \
        const V##_f vtau = V##_set(tau), vinf = V##_set(INFINITY), decay = V##_set(s->decay);                          \
        const V##_f nss = V##_set(s->nss), bc2 = V##_set(s->bc2), eps = V##_set(s->eps);                               \
        int64_t moved = 0, i = *ip;                                                                                    \
        for (; i + V##_W <= end; i += V##_W) {                                                                         \
            const V##_f mv = V##_load(m + i);                                                                          \
            V##_m sel = V##_ge(V##_abs(mv), vtau);                                                                     \
            if (has_g) sel = V##_and(sel, V##_lt(V##_abs(V##_widen_##SUF(V##_pload_##SUF(g + i))), vinf));             \
            const unsigned bits = V##_bits(sel);                                                                       \
            const V##_raw_##SUF old = V##_pload_##SUF(p + i);                                                          \
            V##_f base = V##_widen_##SUF(old), wv = base;                                                              \
            if (has_w) {                                                                                               \
                wv = V##_load(w + i);                                                                                  \
                base = V##_select(V##_peq_##SUF(V##_narrow_##SUF(wv), old), wv, base);                                 \
            }                                                                                                          \
            const V##_f q = s->has_wd ? V##_mul(base, decay) : base;                                                   \
            const V##_f den = V##_add(V##_div(V##_sqrt(V##_load(v + i)), bc2), eps);                                   \
            const V##_f nw = V##_add(q, V##_div(V##_mul(nss, mv), den));                                               \
            V##_pstore_##SUF(p + i, V##_pselect_##SUF(sel, V##_narrow_##SUF(nw), old));                                \
            if (has_w) V##_store(w + i, V##_select(sel, nw, wv));                                                      \
            moved += __builtin_popcount(bits);                                                                         \
        }                                                                                                              \
        *ip = i;                                                                                                       \
        return moved;                                                                                                  \
    }                                                                                                                  \
    static inline __attribute__((always_inline)) int64_t fused_span_##V##_##SUF(                                      \
        PT* restrict p, float* restrict m, float* restrict v, const PT* restrict g, float* restrict w, int64_t* ip,    \
        int64_t end, float tau, int dense, const scalars_t* s, const int has_w, int64_t* restrict skipped) {           \
        const int small = fabsf(s->w) < 0.5f;                                                                          \
        const V##_f vw = V##_set(small ? s->w : s->w - 1.0f), vb2 = V##_set(s->b2), vomb2 = V##_set(s->omb2);          \
        const V##_f vtau = V##_set(tau), vinf = V##_set(INFINITY), decay = V##_set(s->decay);                          \
        const V##_f nss = V##_set(s->nss), bc2 = V##_set(s->bc2), eps = V##_set(s->eps);                               \
        int64_t moved = 0, skip = 0, i = *ip;                                                                          \
        for (; i + V##_W <= end; i += V##_W) {                                                                         \
            const V##_f gv = V##_widen_##SUF(V##_pload_##SUF(g + i)), mv = V##_load(m + i), vv = V##_load(v + i);      \
            const V##_m fin = V##_lt(V##_abs(gv), vinf);                                                               \
            const V##_f mi = V##_fma(vw, V##_sub(gv, mv), small ? mv : gv);                                            \
            const V##_f vi = V##_fma(V##_mul(vomb2, gv), gv, V##_mul(vv, vb2));                                        \
            V##_store(m + i, V##_select(fin, mi, mv));                                                                 \
            V##_store(v + i, V##_select(fin, vi, vv));                                                                 \
            skip += V##_W - __builtin_popcount(V##_bits(fin));                                                         \
            const V##_m sel = dense ? fin : V##_and(fin, V##_ge(V##_abs(mi), vtau));                                   \
            const unsigned bits = V##_bits(sel);                                                                       \
            const V##_raw_##SUF old = V##_pload_##SUF(p + i);                                                          \
            V##_f base = V##_widen_##SUF(old), wv = base;                                                              \
            if (has_w) {                                                                                               \
                wv = V##_load(w + i);                                                                                  \
                base = V##_select(V##_peq_##SUF(V##_narrow_##SUF(wv), old), wv, base);                                 \
            }                                                                                                          \
            const V##_f q = s->has_wd ? V##_mul(base, decay) : base;                                                   \
            const V##_f den = V##_add(V##_div(V##_sqrt(vi), bc2), eps);                                                \
            const V##_f nw = V##_add(q, V##_div(V##_mul(nss, mi), den));                                               \
            V##_pstore_##SUF(p + i, V##_pselect_##SUF(sel, V##_narrow_##SUF(nw), old));                                \
            if (has_w) V##_store(w + i, V##_select(sel, nw, wv));                                                      \
            moved += __builtin_popcount(bits);                                                                         \
        }                                                                                                              \
        *ip = i;                                                                                                       \
        *skipped += skip;                                                                                              \
        return moved;                                                                                                  \
    }

#if defined(MOFO_VECTORS) && defined(v_W)
#define DEFINE_ALL_SPANS(SUF, PT) DEFINE_SPANS(s, SUF, PT) DEFINE_SPANS(v, SUF, PT)
/* The vector spans, then the scalar ones for the tail. */
#define RUN_SPANS(CALL_V, CALL_S) \
    CALL_V;                       \
    CALL_S
#else
#define DEFINE_ALL_SPANS(SUF, PT) DEFINE_SPANS(s, SUF, PT)
#define RUN_SPANS(CALL_V, CALL_S) CALL_S
#endif

DEFINE_ALL_SPANS(f32, float)
DEFINE_ALL_SPANS(bf16, uint16_t)
#if defined(__FLT16_MAX__)
DEFINE_ALL_SPANS(f16, uint16_t)
#endif

/* |m[i]| as the selection sees it: 0 where a gradient is given and non-finite, as in the bracket pass. */
#define MAGNITUDE(m, g, i, LOAD) ((g) != NULL && !finite_f(LOAD((g)[i])) ? 0.0f : fabsf((m)[i]))

#define DEFINE_CHUNKS(SUF, PT)                                                                                         \
    /* One chunk of the update pass, specialised for each combination of gradient check and master copy. */          \
    static int64_t update_chunk_##SUF(PT* restrict p, const float* restrict m, const float* restrict v,                \
                                      const PT* restrict g, float* restrict w, int64_t begin, int64_t end, float tau,  \
                                      const scalars_t* s) {                                                            \
        int64_t i = begin, moved = 0;                                                                                  \
        if (g != NULL && w != NULL) {                                                                                  \
            RUN_SPANS(moved += update_span_v_##SUF(p, m, v, g, w, &i, end, tau, s, 1, 1),                              \
                      moved += update_span_s_##SUF(p, m, v, g, w, &i, end, tau, s, 1, 1));                             \
        } else if (g != NULL) {                                                                                        \
            RUN_SPANS(moved += update_span_v_##SUF(p, m, v, g, w, &i, end, tau, s, 1, 0),                              \
                      moved += update_span_s_##SUF(p, m, v, g, w, &i, end, tau, s, 1, 0));                             \
        } else if (w != NULL) {                                                                                        \
            RUN_SPANS(moved += update_span_v_##SUF(p, m, v, g, w, &i, end, tau, s, 0, 1),                              \
                      moved += update_span_s_##SUF(p, m, v, g, w, &i, end, tau, s, 0, 1));                             \
        } else {                                                                                                       \
            RUN_SPANS(moved += update_span_v_##SUF(p, m, v, g, w, &i, end, tau, s, 0, 0),                              \
                      moved += update_span_s_##SUF(p, m, v, g, w, &i, end, tau, s, 0, 0));                             \
        }                                                                                                              \
        return moved;                                                                                                  \
    }                                                                                                                  \
    static int64_t fused_chunk_##SUF(PT* restrict p, float* restrict m, float* restrict v, const PT* restrict g,       \
                                     float* restrict w, int64_t begin, int64_t end, float tau, int dense,              \
                                     const scalars_t* s, int64_t* restrict skipped) {                                  \
        int64_t i = begin, moved = 0;                                                                                  \
        if (w != NULL) {                                                                                               \
            RUN_SPANS(moved += fused_span_v_##SUF(p, m, v, g, w, &i, end, tau, dense, s, 1, skipped),                  \
                      moved += fused_span_s_##SUF(p, m, v, g, w, &i, end, tau, dense, s, 1, skipped));                 \
        } else {                                                                                                       \
            RUN_SPANS(moved += fused_span_v_##SUF(p, m, v, g, w, &i, end, tau, dense, s, 0, skipped),                  \
                      moved += fused_span_s_##SUF(p, m, v, g, w, &i, end, tau, dense, s, 0, skipped));                 \
        }                                                                                                              \
        return moved;                                                                                                  \
    }

DEFINE_CHUNKS(f32, float)
DEFINE_CHUNKS(bf16, uint16_t)
#if defined(__FLT16_MAX__)
DEFINE_CHUNKS(f16, uint16_t)
#endif

/* ---- the sample, taken a block at a time ---------------------------------------------------------------------------
   A sampler takes samples [next, end) of one tensor's sample, computing the positions of the blocks of 64 ahead of
   the one it reads and prefetching them into L2 (the L1 has too few outstanding misses for random reads): its cost is
   the latency of a few lines at a time, not of each. Taken right before its tensor's own pass, the lines it brought
   in may still be cached when the pass reads them. */

enum { SAMPLE_BLOCK = 64, SAMPLE_DEPTH = 8 /* blocks whose positions are computed and prefetched ahead */ };

typedef struct {
    const int64_t* row;
    const float* m;
    const char* g; /* the gradient, of the batch's parameter dtype */
    float* out;    /* the tensor's region of the sample buffer */
    float w;
    int64_t next, end, fetched; /* samples [next, end) still to take; positions computed for [next, fetched) */
    int head, ahead;            /* the ring slot of the block at next, and how many blocks are fetched from it */
    int64_t pos[SAMPLE_DEPTH][SAMPLE_BLOCK];
} sampler_t;

static void sampler_init(sampler_t* sp, const int64_t* row, const float* scal_row, const char* pbase, size_t size,
                         const float* mbase, float* samples, int64_t begin, int64_t end) {
    sp->row = row;
    sp->m = mbase + row[M_EXP_AVG];
    sp->g = pbase + row[M_GRAD] * (int64_t)size;
    sp->out = samples + row[M_SAMPLE_OFFSET];
    sp->w = scal_row[S_WEIGHT];
    sp->next = sp->fetched = begin;
    sp->end = end;
    sp->head = sp->ahead = 0;
}

/* Computes and prefetches the positions of blocks until SAMPLE_DEPTH are ahead (local positions of a shard, -1 for
   the ones another rank holds). */
static void sampler_fetch(sampler_t* sp, size_t size) {
    const int64_t* row = sp->row;
    const int whole = whole_tensor(row);
    while (sp->ahead < SAMPLE_DEPTH && sp->fetched < sp->end) {
        const int64_t j0 = sp->fetched, len = sp->end - j0 < SAMPLE_BLOCK ? sp->end - j0 : SAMPLE_BLOCK;
        int64_t* pos = sp->pos[(sp->head + sp->ahead) % SAMPLE_DEPTH];
        sample_positions((uint64_t)row[M_KEY], j0, len, row[M_SAMPLE], row[M_GLOBAL_NUMEL], pos);
        for (int64_t q = 0; q < len; ++q) {
            if (!whole) pos[q] = local_position(row, pos[q]);
            if (pos[q] >= 0) {
                __builtin_prefetch(sp->m + pos[q], 0, 2);
                __builtin_prefetch(sp->g + pos[q] * (int64_t)size, 0, 2);
            }
        }
        sp->fetched += len;
        sp->ahead += 1;
    }
}

#define DEFINE_SAMPLER(SUF, PT, LOAD)                                                                                  \
    /* Takes up to count more samples (whole blocks); returns how many are left. */                                   \
    static int64_t sampler_take_##SUF(sampler_t* sp, int64_t count) {                                                  \
        const PT* g = (const PT*)sp->g;                                                                                \
        while (count > 0 && sp->next < sp->end) {                                                                      \
            sampler_fetch(sp, sizeof(PT));                                                                             \
            const int64_t len = sp->end - sp->next < SAMPLE_BLOCK ? sp->end - sp->next : SAMPLE_BLOCK;                 \
            const int64_t* pos = sp->pos[sp->head];                                                                    \
            float* o = sp->out + sp->next;                                                                             \
            for (int64_t q = 0; q < len; ++q)                                                                          \
                o[q] = pos[q] < 0 ? 0.0f : sample_value(sp->m[pos[q]], LOAD(g[pos[q]]), sp->w);                        \
            sp->next += len;                                                                                           \
            sp->head = (sp->head + 1) % SAMPLE_DEPTH;                                                                  \
            sp->ahead -= 1;                                                                                            \
            count -= len;                                                                                              \
        }                                                                                                              \
        return sp->end - sp->next;                                                                                     \
    }

DEFINE_SAMPLER(f32, float, load_f32)
DEFINE_SAMPLER(bf16, uint16_t, load_bf16)
#if defined(__FLT16_MAX__)
DEFINE_SAMPLER(f16, uint16_t, load_f16)
#endif

/* ---- one parallel region per batch ---------------------------------------------------------------------------------
   A pass over a batch runs in a single parallel region: each thread takes its share of every tensor (its chunk of a
   large one, whole small ones in turn) and goes on to the next tensor without waiting for the others. A region per
   tensor would stall at every tensor whenever another process holds one of the cores. */

#ifdef _OPENMP
#define THREAD_ID() ((int64_t)omp_get_thread_num())
#define THREAD_COUNT() ((int64_t)omp_get_num_threads())
#else
#define THREAD_ID() ((int64_t)0)
#define THREAD_COUNT() ((int64_t)1)
#endif

/* The threads for a batch of `total` local entries. */
static inline int64_t batch_threads(const int64_t* meta, int64_t T, int64_t threads) {
    int64_t total = 0;
    for (int64_t t = 0; t < T; ++t) total += meta[t * M_COLUMNS + M_NUMEL];
    return num_chunks(total, threads);
}

/* How many chunks tensor t is split into with K threads (a small tensor is one chunk), and which thread takes
   chunk c of it. */
static inline int64_t tensor_chunks(int64_t n, int64_t K) { return n < PAR_MIN ? 1 : K; }
static inline int64_t chunk_owner(int64_t t, int64_t c, int64_t chunks, int64_t K) { return chunks == 1 ? t % K : c; }

/* ---- per parameter dtype ---------------------------------------------------------------------------------------- */

#define DEFINE_KERNELS(SUF, PT, LOAD)                                                                                  \
    /* Every tensor's sample of |m_t| at its hashed positions, m_t computed from m_{t-1} and g as the moment update   \
       will; 0 at the positions another rank holds. One thread: a sample is too little work for a parallel region,   \
       which stalls whenever another process holds one of the cores. */                                              \
    void mofo_sample_##SUF(const int64_t* meta, const float* scal, int64_t T, const PT* pbase, const float* mbase,   \
                           float* out) {                                                                              \
        sampler_t sp;                                                                                                  \
        for (int64_t t = 0; t < T; ++t) {                                                                              \
            const int64_t* row = meta + t * M_COLUMNS;                                                                 \
            if (row[M_SAMPLE] == 0) continue;                                                                          \
            sampler_init(&sp, row, scal + t * S_COLUMNS, (const char*)pbase, sizeof(PT), mbase, out, 0, row[M_SAMPLE]); \
            sampler_take_##SUF(&sp, row[M_SAMPLE]);                                                                    \
        }                                                                                                              \
    }                                                                                                                  \
    /* Tensor t's sample and its bracket (lo: the j_lo-th largest sample value, 0 past the sample; hi: the j_hi-th     \
       largest, +inf before it). Returns 0, or -1 without memory for a selection. */                                  \
    static int sample_bracket_##SUF(const int64_t* meta, const float* scal, int64_t t, const PT* pbase,              \
                                    const float* mbase, float* samples, float* lo, float* hi) {                       \
        const int64_t* row = meta + t * M_COLUMNS;                                                                     \
        const int64_t s = row[M_SAMPLE];                                                                               \
        lo[t] = 0.0f;                                                                                                  \
        hi[t] = INFINITY;                                                                                              \
        if (s == 0) return 0;                                                                                          \
        sampler_t sp;                                                                                                  \
        sampler_init(&sp, row, scal + t * S_COLUMNS, (const char*)pbase, sizeof(PT), mbase, samples, 0, s);            \
        sampler_take_##SUF(&sp, s);                                                                                    \
        const float* sample = samples + row[M_SAMPLE_OFFSET];                                                          \
        if (row[M_J_HI] >= 1) hi[t] = select_kth(sample, s, s - row[M_J_HI]);                                          \
        if (row[M_J_LO] <= s) lo[t] = select_kth(sample, s, s - row[M_J_LO]);                                          \
        return (hi[t] != hi[t]) | (lo[t] != lo[t]) ? -1 : 0;                                                           \
    }                                                                                                                  \
    /* The exact selection's first pass: both moments on every entry with a finite gradient; counts of |m_t| that    \
       are NaN, above hi and in [lo, hi] (an entry with a non-finite gradient counting as 0) and of the skipped       \
       entries; the in-bracket values themselves into the tensor's candidate region, all of them whenever they fit   \
       (the chunks that ran out of their share of the region are collected again). With samples (not NULL), each     \
       tensor's bracket is first taken from its sample, the threads sharing the tensors, and written to lo and hi.    \
       Returns 0, or -1 without memory. */                                                                           \
    static int bracket_batch_##SUF(const int64_t* meta, const float* scal, int64_t T, const PT* pbase, float* mbase, \
                                   float* samples, float* lo, float* hi, int64_t* counts, float* cand,                \
                                   int64_t threads) {                                                                 \
        const int64_t K = batch_threads(meta, T, threads);                                                             \
        int64_t(*c)[5] = calloc((size_t)(K * T > 0 ? K * T : 1), sizeof *c); /* per chunk: see the bracket span */    \
        if (c == NULL) return -1;                                                                                      \
        int failed = 0;                                                                                                \
        int64_t used = 1; /* the threads the region got, which split the tensors */                                   \
        _Pragma("omp parallel num_threads(K) if (K > 1) reduction(| : failed)")                                       \
        {                                                                                                              \
            const int64_t k = THREAD_ID(), threads_here = THREAD_COUNT();                                             \
            if (k == 0) used = threads_here;                                                                           \
            if (samples != NULL) {                                                                                     \
                for (int64_t t = k; t < T; t += threads_here)                                                          \
                    failed |= sample_bracket_##SUF(meta, scal, t, pbase, mbase, samples, lo, hi);                     \
                _Pragma("omp barrier")                                                                                 \
            }                                                                                                          \
            for (int64_t t = 0; t < T; ++t) {                                                                          \
                const int64_t* row = meta + t * M_COLUMNS;                                                             \
                const int64_t n = row[M_NUMEL], chunks = tensor_chunks(n, threads_here);                               \
                const int64_t cap_t = row[M_CAND_CAPACITY] / chunks;                                                   \
                const scalars_t s = scalars_of(scal + t * S_COLUMNS);                                                  \
                float* m = mbase + row[M_EXP_AVG];                                                                     \
                float* v = mbase + row[M_EXP_AVG_SQ];                                                                  \
                const PT* g = pbase + row[M_GRAD];                                                                     \
                for (int64_t part = 0; part < chunks; ++part) {                                                        \
                    if (chunk_owner(t, part, chunks, threads_here) != k) continue;                                     \
                    int64_t i = chunk_begin(n, chunks, part), end = chunk_begin(n, chunks, part + 1);                  \
                    float* mine = cand + row[M_CAND_OFFSET] + part * cap_t;                                            \
                    int64_t* cc = c[t * K + part];                                                                     \
                    RUN_SPANS(bracket_span_v_##SUF(m, v, g, &i, end, &s, lo[t], hi[t], mine, cap_t, cc),               \
                              bracket_span_s_##SUF(m, v, g, &i, end, &s, lo[t], hi[t], mine, cap_t, cc));              \
                }                                                                                                      \
            }                                                                                                          \
        }                                                                                                              \
        for (int64_t t = 0; t < T; ++t) { /* each tensor's candidates to the front of its region */                   \
            const int64_t* row = meta + t * M_COLUMNS;                                                                 \
            const int64_t n = row[M_NUMEL], cap = row[M_CAND_CAPACITY], chunks = tensor_chunks(n, used);               \
            const int64_t cap_t = cap / chunks;                                                                        \
            float* region = cand + row[M_CAND_OFFSET];                                                                 \
            const float* m = mbase + row[M_EXP_AVG];                                                                   \
            int64_t total[5] = {0, 0, 0, 0, 0};                                                                        \
            for (int64_t part = 0; part < chunks; ++part)                                                              \
                for (int q = 0; q < 5; ++q) total[q] += c[t * K + part][q];                                            \
            int64_t stored = 0;                                                                                        \
            for (int64_t part = 0; part < chunks; ++part) { /* the complete chunks' candidates */                      \
                const int64_t* cc = c[t * K + part];                                                                   \
                if (cc[3] < cc[2]) continue;                                                                           \
                if (part > 0 && cc[3] > 0) memmove(region + stored, region + part * cap_t, (size_t)cc[3] * sizeof(float)); \
                stored += cc[3];                                                                                       \
            }                                                                                                          \
            if (total[2] <= cap)                                                                                       \
                for (int64_t part = 0; part < chunks; ++part) { /* then those of the chunks that ran out of room */    \
                    if (c[t * K + part][3] >= c[t * K + part][2]) continue;                                            \
                    const PT* gk = total[4] ? pbase + row[M_GRAD] : NULL;                                              \
                    for (int64_t i = chunk_begin(n, chunks, part); i < chunk_begin(n, chunks, part + 1); ++i) {        \
                        float a = MAGNITUDE(m, gk, i, LOAD);                                                           \
                        if ((a >= lo[t]) & (a <= hi[t])) region[stored++] = a;                                         \
                    }                                                                                                  \
                }                                                                                                      \
            int64_t* out = counts + t * C_COLUMNS;                                                                     \
            out[C_NAN] += total[0];                                                                                    \
            out[C_ABOVE] += total[1];                                                                                  \
            out[C_INSIDE] += total[2];                                                                                 \
            out[C_SKIPPED] += total[4];                                                                                \
        }                                                                                                              \
        free(c);                                                                                                       \
        return failed ? -1 : 0;                                                                                        \
    }                                                                                                                  \
    int mofo_moments_bracket_##SUF(const int64_t* meta, const float* scal, int64_t T, const PT* pbase, float* mbase,  \
                                   const float* lo, const float* hi, int64_t* counts, float* cand, int64_t threads) {  \
        return bracket_batch_##SUF(meta, scal, T, pbase, mbase, NULL, (float*)lo, (float*)hi, counts, cand, threads); \
    }                                                                                                                  \
    /* The same, each tensor's bracket taken from its sample first; writes lo and hi. For batches whose sample needs  \
       no sum over ranks. */                                                                                           \
    int mofo_sampled_bracket_##SUF(const int64_t* meta, const float* scal, int64_t T, const PT* pbase, float* mbase,  \
                                   float* samples, float* lo, float* hi, int64_t* counts, float* cand,                \
                                   int64_t threads) {                                                                  \
        return bracket_batch_##SUF(meta, scal, T, pbase, mbase, samples, lo, hi, counts, cand, threads);              \
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
       gradient is read only for the tensors that had non-finite entries); the others keep their bits. Returns 0, or  \
       -1 without memory. */                                                                                          \
    int mofo_update_##SUF(const int64_t* meta, const float* scal, int64_t T, PT* pbase, float* mbase,                \
                          const float* tau, int64_t* counts, int has_master, int64_t threads) {                       \
        const int64_t K = batch_threads(meta, T, threads);                                                             \
        int64_t* moved = calloc((size_t)(K * T > 0 ? K * T : 1), sizeof *moved);                                       \
        if (moved == NULL) return -1;                                                                                  \
        _Pragma("omp parallel num_threads(K) if (K > 1)")                                                             \
        {                                                                                                              \
            const int64_t k = THREAD_ID(), threads_here = THREAD_COUNT();                                             \
            for (int64_t t = 0; t < T; ++t) {                                                                          \
                const int64_t* row = meta + t * M_COLUMNS;                                                             \
                const int64_t n = row[M_NUMEL], chunks = tensor_chunks(n, threads_here);                               \
                const scalars_t s = scalars_of(scal + t * S_COLUMNS);                                                  \
                const PT* g = counts[t * C_COLUMNS + C_SKIPPED] ? pbase + row[M_GRAD] : NULL;                          \
                float* w = has_master ? mbase + row[M_MASTER] : NULL;                                                  \
                for (int64_t part = 0; part < chunks; ++part)                                                          \
                    if (chunk_owner(t, part, chunks, threads_here) == k)                                               \
                        moved[t * K + part] += update_chunk_##SUF(pbase + row[M_PARAM], mbase + row[M_EXP_AVG],        \
                                                                  mbase + row[M_EXP_AVG_SQ], g, w,                     \
                                                                  chunk_begin(n, chunks, part),                        \
                                                                  chunk_begin(n, chunks, part + 1), tau[t], &s);       \
            }                                                                                                          \
        }                                                                                                              \
        for (int64_t t = 0; t < T; ++t)                                                                                \
            for (int64_t part = 0; part < K; ++part) counts[t * C_COLUMNS + C_MOVED] += moved[t * K + part];           \
        free(moved);                                                                                                   \
        return 0;                                                                                                      \
    }                                                                                                                  \
    /* One pass for thresholds known in advance (the sampled selection, the dense step): moments, comparison, step;   \
       entries with a non-finite gradient keep moments and weight. With samples (not NULL), each sampled tensor's     \
       threshold is first taken from its sample (the rank-th largest), the threads sharing the tensors, and written   \
       to tau. Returns 0, or -1 without memory. */                                                                    \
    static int fused_batch_##SUF(const int64_t* meta, const float* scal, int64_t T, PT* pbase, float* mbase,         \
                                 float* samples, int64_t rank, float* tau, int64_t* counts, int has_master,           \
                                 int64_t threads) {                                                                   \
        const int64_t K = batch_threads(meta, T, threads);                                                             \
        int64_t(*c)[2] = calloc((size_t)(K * T > 0 ? K * T : 1), sizeof *c); /* per chunk: moved, skipped */          \
        if (c == NULL) return -1;                                                                                      \
        int failed = 0;                                                                                                \
        _Pragma("omp parallel num_threads(K) if (K > 1) reduction(| : failed)")                                       \
        {                                                                                                              \
            const int64_t k = THREAD_ID(), threads_here = THREAD_COUNT();                                             \
            if (samples != NULL) {                                                                                     \
                for (int64_t t = k; t < T; t += threads_here) {                                                        \
                    const int64_t* row = meta + t * M_COLUMNS;                                                         \
                    const int64_t s = row[M_SAMPLE];                                                                   \
                    tau[t] = 0.0f;                                                                                     \
                    if (s == 0) continue;                                                                              \
                    sampler_t sp;                                                                                      \
                    sampler_init(&sp, row, scal + t * S_COLUMNS, (const char*)pbase, sizeof(PT), mbase, samples, 0, s); \
                    sampler_take_##SUF(&sp, s);                                                                        \
                    tau[t] = select_kth(samples + row[M_SAMPLE_OFFSET], s, s - rank);                                  \
                    failed |= tau[t] != tau[t];                                                                        \
                }                                                                                                      \
                _Pragma("omp barrier")                                                                                 \
            }                                                                                                          \
            for (int64_t t = 0; t < T; ++t) {                                                                          \
                const int64_t* row = meta + t * M_COLUMNS;                                                             \
                const int64_t n = row[M_NUMEL], chunks = tensor_chunks(n, threads_here);                               \
                const scalars_t s = scalars_of(scal + t * S_COLUMNS);                                                  \
                float* w = has_master ? mbase + row[M_MASTER] : NULL;                                                  \
                for (int64_t part = 0; part < chunks; ++part)                                                          \
                    if (chunk_owner(t, part, chunks, threads_here) == k)                                               \
                        c[t * K + part][0] += fused_chunk_##SUF(pbase + row[M_PARAM], mbase + row[M_EXP_AVG],          \
                                                                mbase + row[M_EXP_AVG_SQ], pbase + row[M_GRAD], w,     \
                                                                chunk_begin(n, chunks, part),                          \
                                                                chunk_begin(n, chunks, part + 1), tau[t],              \
                                                                row[M_DENSE] != 0, &s, &c[t * K + part][1]);           \
            }                                                                                                          \
        }                                                                                                              \
        for (int64_t t = 0; t < T; ++t)                                                                                \
            for (int64_t part = 0; part < K; ++part) {                                                                 \
                counts[t * C_COLUMNS + C_MOVED] += c[t * K + part][0];                                                 \
                counts[t * C_COLUMNS + C_SKIPPED] += c[t * K + part][1];                                               \
            }                                                                                                          \
        free(c);                                                                                                       \
        return failed ? -1 : 0;                                                                                        \
    }                                                                                                                  \
    int mofo_fused_##SUF(const int64_t* meta, const float* scal, int64_t T, PT* pbase, float* mbase, const float* tau, \
                         int64_t* counts, int has_master, int64_t threads) {                                          \
        return fused_batch_##SUF(meta, scal, T, pbase, mbase, NULL, 0, (float*)tau, counts, has_master, threads);    \
    }                                                                                                                  \
    /* The same, each sampled tensor's threshold (the rank-th largest of its sample) taken from its sample first;     \
       writes the thresholds to tau. For batches whose sample needs no sum over ranks. */                             \
    int mofo_sampled_fused_##SUF(const int64_t* meta, const float* scal, int64_t T, PT* pbase, float* mbase,         \
                                 float* samples, int64_t rank, float* tau, int64_t* counts, int has_master,           \
                                 int64_t threads) {                                                                   \
        return fused_batch_##SUF(meta, scal, T, pbase, mbase, samples, rank, tau, counts, has_master, threads);      \
    }

DEFINE_KERNELS(f32, float, load_f32)
DEFINE_KERNELS(bf16, uint16_t, load_bf16)
#if defined(__FLT16_MAX__)
DEFINE_KERNELS(f16, uint16_t, load_f16)
#endif
