/* CPU decoding kernels: y = x Wᵀ (+ b) for a few rows x and a large W, attention of one new
   query per row over the KV cache, and a whole transformer block for one token per row.

A decode step multiplies one row per sequence by every weight matrix, so its speed is the speed
at which the weights stream from memory; the arithmetic per weight byte is tiny. These loops
read each weight once per call for all rows (up to ROWS at a time while the weight row sits in
L1), split the output features over the OpenMP threads in contiguous ranges (one sequential
stream per core, which the hardware prefetcher follows), and keep the arithmetic in registers.

Built by scratchllm/inference/kernels.py with the machine's C compiler and -march=native, so the
#if branches pick AVX-512 or AVX2 at build time; the plain C loops are the reference and the
fallback. OpenMP resolves to the libgomp PyTorch already loaded: one thread pool for both.

  sl_w8a8:   int8 weights (one scale per output row) times activations quantized per row to
             int8 (each row on its own scale, as llama.cpp's q8_0 rounds blocks of activations),
             exact int32 accumulation (VNNI byte products, or int16 pairs: no saturation), then
             rescaled in fp32.
  sl_f16:    fp16 weights widened to fp32 in registers; fp32 activations and accumulation.
  sl_attend: softmax(q Kᵀ / √D) V for one query per row and head over an fp32 or fp16 KV cache.
  sl_layer:  one pre-norm block (norms, qkv, QK-norm, RoPE, cache write, attention, an
             attention gate, residual projections, feed-forward) in one call, on the three above.
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define ROWS 4   /* activation rows per tile */
#define MAX_M 64 /* rows per sl_w8a8 call at most (kernels.py sends at most 8) */

/* The int8 activations as the dot products read them: with AVX512-VNNI as unsigned bytes q + 128
   (`vpdpbusd` multiplies unsigned by signed bytes; the 128 · Σw it adds is taken off after),
   elsewhere as int16 (`vpmaddwd` pairs, which cannot saturate). */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define VNNI_U8 1
typedef uint8_t xq_t;
#define XQ_OFFSET 128
#else
typedef int16_t xq_t;
#define XQ_OFFSET 0
#endif

/* Quantize each of the M rows of x (M×K) to integers in [-128, 127]: row / absmax on the grid
   that fbgemm's dynamic linear uses for inputs in [-1, 1] (scale 2/255, zero point 128), with its
   fp32 operations in its order, so that a row gets the same integers here as through
   `Int8Linear._w8a8`; scale[m] is the row's step, absmax · 2/255. */
static void quantize_rows(const float *x, int64_t M, int64_t K, xq_t *q, float *scale) {
    const float step = (float)(2.0 / 255.0), inv = 1.0f / step;
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * K;
        xq_t *out = q + m * K;
        float amax = 0.f;
        /* Plain comparisons, not fmaxf/fminf (library calls without -ffast-math): the loops
           vectorize, which matters with several rows (a serial pass before the parallel one). */
#pragma omp simd reduction(max : amax)
        for (int64_t k = 0; k < K; k++) {
            float a = fabsf(r[k]);
            amax = a > amax ? a : amax;
        }
        scale[m] = amax * step;
        if (!(amax > 0.f)) { /* an all-zero row */
            for (int64_t k = 0; k < K; k++) out[k] = (xq_t)XQ_OFFSET;
            continue;
        }
#pragma omp simd
        for (int64_t k = 0; k < K; k++) {
            float t = nearbyintf((r[k] / amax) * inv);
            t = t < -128.f ? -128.f : (t > 127.f ? 127.f : t);
            out[k] = (xq_t)((int32_t)t + XQ_OFFSET);
        }
    }
}

/* IEEE half → float, for the loop tails and CPUs without F16C. */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf, nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign; /* ±0 */
    } else { /* subnormal: value = man · 2⁻²⁴ */
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The vector operations of the dot products below, for AVX-512 or AVX2. */
#if defined(__AVX512BW__)
#define VEC_I8 32
typedef __m512i acc_i8;
#define LOAD_W_I8(p) _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p)))
#define LOAD_X_I8(p) _mm512_loadu_si512((const void *)(p))
#define ZERO_I8() _mm512_setzero_si512()
#define SUM_I8(v) _mm512_reduce_add_epi32(v)
#define MADD_I8(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)) /* no VNNI (see below) */
#elif defined(__AVX2__)
#define VEC_I8 16
typedef __m256i acc_i8;
#define LOAD_W_I8(p) _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p)))
#define LOAD_X_I8(p) _mm256_loadu_si256((const __m256i *)(p))
#define ZERO_I8() _mm256_setzero_si256()
#define MADD_I8(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
static inline int32_t SUM_I8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_hadd_epi32(s, s);
    s = _mm_hadd_epi32(s, s);
    return _mm_cvtsi128_si32(s);
}
#endif

#if defined(__AVX512F__)
#define VEC_F16 16
typedef __m512 acc_f16;
#define LOAD_W_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define LOAD_X_F16(p) _mm512_loadu_ps(p)
#define ZERO_F16() _mm512_setzero_ps()
#define MADD_F16(acc, a, b) _mm512_fmadd_ps(a, b, acc)
#define SUM_F16(v) _mm512_reduce_add_ps(v)
#define SET1_F16(w) _mm512_set1_ps(w)
#define STORE_F16(p, v) _mm512_storeu_ps(p, v)
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define VEC_F16 8
typedef __m256 acc_f16;
#define LOAD_W_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define LOAD_X_F16(p) _mm256_loadu_ps(p)
#define ZERO_F16() _mm256_setzero_ps()
#define MADD_F16(acc, a, b) _mm256_fmadd_ps(a, b, acc)
#define SET1_F16(w) _mm256_set1_ps(w)
#define STORE_F16(p, v) _mm256_storeu_ps(p, v)
static inline float SUM_F16(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}
#endif

/* dot[j] = Σ_k x_j[k] · w[k] for one weight row w and NR activation rows x_j (the vector loop
   where the CPU has one, then the scalar tail). One function per NR, so that the loop over j
   unrolls and the NR accumulators stay in registers; each weight vector is loaded (and widened)
   once for the NR rows. */
#define DOT_BODY(NR, VEC, ACC, ZERO, LOADW, LOADX, MADD, SUM, WIDEN)                          \
    int64_t k = 0;                                                                           \
    ACC acc[NR];                                                                             \
    for (int j = 0; j < NR; j++) acc[j] = ZERO();                                            \
    for (; k + VEC <= K; k += VEC) {                                                         \
        ACC wv = LOADW(w + k);                                                               \
        for (int j = 0; j < NR; j++) acc[j] = MADD(acc[j], LOADX(x[j] + k), wv);             \
    }                                                                                        \
    for (int j = 0; j < NR; j++) dot[j] = SUM(acc[j]);                                       \
    for (; k < K; k++)                                                                       \
        for (int j = 0; j < NR; j++) dot[j] += x[j][k] * WIDEN(w[k]);

#define SCALAR_BODY(NR, ZERO, WIDEN)                                                         \
    for (int j = 0; j < NR; j++) dot[j] = ZERO;                                              \
    for (int64_t k = 0; k < K; k++)                                                          \
        for (int j = 0; j < NR; j++) dot[j] += x[j][k] * WIDEN(w[k]);

/* With VNNI: 64 unsigned-activation × signed-weight byte products per instruction; the weight
   row's sum (one more `vpdpbusd` against ones, shared by the NR rows) removes the offset. */
#define DOT_I8_VNNI(NR)                                                                      \
    int64_t k = 0;                                                                           \
    __m512i acc[NR], wsum = _mm512_setzero_si512();                                          \
    const __m512i ones = _mm512_set1_epi8(1);                                                \
    for (int j = 0; j < NR; j++) acc[j] = _mm512_setzero_si512();                            \
    for (; k + 64 <= K; k += 64) {                                                           \
        __m512i wv = _mm512_loadu_si512((const void *)(w + k));                              \
        wsum = _mm512_dpbusd_epi32(wsum, ones, wv);                                          \
        for (int j = 0; j < NR; j++)                                                         \
            acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_loadu_si512((const void *)(x[j] + k)), wv); \
    }                                                                                        \
    int32_t offset = XQ_OFFSET * _mm512_reduce_add_epi32(wsum);                              \
    for (int j = 0; j < NR; j++) dot[j] = _mm512_reduce_add_epi32(acc[j]) - offset;         \
    for (; k < K; k++)                                                                       \
        for (int j = 0; j < NR; j++) dot[j] += ((int32_t)x[j][k] - XQ_OFFSET) * (int32_t)w[k];

#define AS_INT(v) ((int32_t)(v))
#if defined(VNNI_U8)
#define DOT_I8(NR) DOT_I8_VNNI(NR)
#elif defined(VEC_I8)
#define DOT_I8(NR) DOT_BODY(NR, VEC_I8, acc_i8, ZERO_I8, LOAD_W_I8, LOAD_X_I8, MADD_I8, SUM_I8, AS_INT)
#else
#define DOT_I8(NR) SCALAR_BODY(NR, 0, AS_INT)
#endif
#ifdef VEC_F16
#define DOT_F16(NR)                                                                          \
    DOT_BODY(NR, VEC_F16, acc_f16, ZERO_F16, LOAD_W_F16, LOAD_X_F16, MADD_F16, SUM_F16, half_to_float)
#else
#define DOT_F16(NR) SCALAR_BODY(NR, 0.f, half_to_float)
#endif

#define DEFINE_DOTS(NR)                                                                      \
    static void dot_i8_##NR(const xq_t *const *x, const int8_t *w, int64_t K, int32_t *dot) { \
        DOT_I8(NR)                                                                           \
    }                                                                                        \
    static void dot_f16_##NR(const float *const *x, const uint16_t *w, int64_t K, float *dot) { \
        DOT_F16(NR)                                                                          \
    }
DEFINE_DOTS(1)
DEFINE_DOTS(2)
DEFINE_DOTS(3)
DEFINE_DOTS(4)

typedef void (*dot_i8_fn)(const xq_t *const *, const int8_t *, int64_t, int32_t *);
typedef void (*dot_f16_fn)(const float *const *, const uint16_t *, int64_t, float *);
static const dot_i8_fn DOTS_I8[ROWS] = {dot_i8_1, dot_i8_2, dot_i8_3, dot_i8_4};
static const dot_f16_fn DOTS_F16[ROWS] = {dot_f16_1, dot_f16_2, dot_f16_3, dot_f16_4};

/* y[m, n] for every output row n (split over the threads in contiguous ranges: one sequential
   stream of weights per core) and every activation row m, ROWS rows at a time. One weight row is
   a few kB, so it stays in L1 while the groups of rows pass over it. */
#define FOR_ROWS(DOTS, XROWS, XT, DT, FINISH)                                                \
    _Pragma("omp parallel for schedule(static)")                                            \
    for (int64_t n = 0; n < N; n++) {                                                        \
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {                                           \
            int nr = M - m0 < ROWS ? (int)(M - m0) : ROWS;                                   \
            const XT *rows[ROWS];                                                            \
            DT dot[ROWS];                                                                    \
            for (int j = 0; j < nr; j++) rows[j] = XROWS + (m0 + j) * K;                    \
            DOTS[nr - 1](rows, w + n * K, K, dot);                                           \
            for (int j = 0; j < nr; j++) FINISH(n, m0 + j, dot[j]);                          \
        }                                                                                    \
    }

/* y = x Wᵀ + b + res (res NULL: nothing added): a decode step's residual add in the same call. */
#define EPILOGUE(n, m, v) y[(m) * N + (n)] = (v) + (bias ? bias[n] : 0.f) + (res ? res[(m) * N + (n)] : 0.f)

/* The entry points return 0, or -1 when they could not run (too many rows, no memory). */
int sl_w8a8(const float *x, int64_t M, int64_t K, const int8_t *w, const float *wscale,
            const float *bias, int64_t N, const float *res, float *y) {
    float xscale[MAX_M];
    if (M > MAX_M) return -1;
    xq_t *q = (xq_t *)malloc((size_t)(M * K) * sizeof(xq_t));
    if (q == NULL) return -1;
    quantize_rows(x, M, K, q, xscale);
#define FINISH_I8(n, m, d) EPILOGUE(n, m, (float)(d) * xscale[m] * wscale[n])
    FOR_ROWS(DOTS_I8, q, xq_t, int32_t, FINISH_I8)
    free(q);
    return 0;
}

int sl_f16(const float *x, int64_t M, int64_t K, const uint16_t *w, const float *bias, int64_t N,
           const float *res, float *y) {
#define FINISH_F16(n, m, d) EPILOGUE(n, m, d)
    FOR_ROWS(DOTS_F16, x, float, float, FINISH_F16)
    return 0;
}

/* Whether sl_w8a8 multiplies bytes with AVX512-VNNI (the Python side sends it more rows then). */
int sl_w8a8_vnni(void) {
#if defined(VNNI_U8)
    return 1;
#else
    return 0;
#endif
}

/* Σ a[d]·b[d] and y += w·x over D elements of a cached key or value row b / x, fp32 or fp16 (an
   fp16 KV cache: half the bytes a decode step reads per position), with the fp16 weights' vector
   operations above (FMAs: the plain loops would not contract). */
#ifdef VEC_F16
#define DEFINE_KV_OPS(NAME, T, LOAD, WIDEN)                                                  \
    static inline float dot_##NAME(const float *a, const T *b, int64_t D) {                  \
        int64_t d = 0;                                                                       \
        acc_f16 acc = ZERO_F16();                                                            \
        for (; d + VEC_F16 <= D; d += VEC_F16) acc = MADD_F16(acc, LOAD_X_F16(a + d), LOAD(b + d)); \
        float r = SUM_F16(acc);                                                              \
        for (; d < D; d++) r += a[d] * WIDEN(b[d]);                                          \
        return r;                                                                            \
    }                                                                                        \
    static inline void axpy_##NAME(float w, const T *x, float *y, int64_t D) {               \
        int64_t d = 0;                                                                       \
        acc_f16 wv = SET1_F16(w);                                                            \
        for (; d + VEC_F16 <= D; d += VEC_F16)                                               \
            STORE_F16(y + d, MADD_F16(LOAD_X_F16(y + d), wv, LOAD(x + d)));                  \
        for (; d < D; d++) y[d] += w * WIDEN(x[d]);                                          \
    }
#else
#define DEFINE_KV_OPS(NAME, T, LOAD, WIDEN)                                                  \
    static inline float dot_##NAME(const float *a, const T *b, int64_t D) {                  \
        float r = 0.f;                                                                       \
        for (int64_t d = 0; d < D; d++) r += a[d] * WIDEN(b[d]);                             \
        return r;                                                                            \
    }                                                                                        \
    static inline void axpy_##NAME(float w, const T *x, float *y, int64_t D) {               \
        for (int64_t d = 0; d < D; d++) y[d] += w * WIDEN(x[d]);                             \
    }
#endif
#define AS_FLOAT(v) (v)
DEFINE_KV_OPS(f32, float, LOAD_X_F16, AS_FLOAT)
DEFINE_KV_OPS(f16, uint16_t, LOAD_W_F16, half_to_float)

/* Attention of one new query per row over its cached keys and values (a decode step):
   out[b, h] = softmax(q[b, h] · K[b, g]ᵀ · scale, masked) · V[b, g], g = h / (H / KV) (grouped
   queries share a key-value head). q is fp32 (B, H, D) with rows qb elements apart (the heads
   contiguous), out (B, H, D) contiguous fp32; K and V are views
   into a cache, fp32 or (kv_half) fp16, strides in elements (batch, head, position; the last
   dimension contiguous); mask is NULL or bytes (nonzero = attend) at mask[b · mstride + s].
   Scores, softmax and sums in fp32, softmax from the row's maximum as PyTorch's. One
   (row, head) pair per task: the cache is read once. */
int sl_attend(const float *q, int64_t qb, int64_t B, int64_t H, int64_t KV, int64_t D, int64_t S,
              const void *k, int64_t kb, int64_t kh, int64_t ks, const void *v, int64_t vb,
              int64_t vh, int64_t vs, const uint8_t *mask, int64_t mstride, float scale,
              int kv_half, float *out) {
    int64_t group = H / KV;
    int failed = 0;
#pragma omp parallel
    {
        float *p = (float *)malloc((size_t)(S > 0 ? S : 1) * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (p == NULL) { /* every thread must reach the loop; a thread without memory skips */
#pragma omp atomic write
                failed = 1;
                continue;
            }
            int64_t b = bh / H, h = bh % H, g = h / group;
            const float *qr = q + b * qb + h * D;
            int64_t koff = b * kb + g * kh, voff = b * vb + g * vh;
            const float *k32 = (const float *)k + koff, *v32 = (const float *)v + voff;
            const uint16_t *k16 = (const uint16_t *)k + koff, *v16 = (const uint16_t *)v + voff;
            const uint8_t *mr = mask ? mask + b * mstride : NULL;
            float *o = out + bh * D;
            float top = -INFINITY;
            for (int64_t s = 0; s < S; s++) {
                if (mr && !mr[s]) {
                    p[s] = -INFINITY;
                    continue;
                }
                p[s] = (kv_half ? dot_f16(qr, k16 + s * ks, D) : dot_f32(qr, k32 + s * ks, D)) * scale;
                top = p[s] > top ? p[s] : top;
            }
            for (int64_t d = 0; d < D; d++) o[d] = 0.f;
            if (top == -INFINITY) continue; /* nothing to attend to: zeros, as PyTorch's CPU SDPA */
            float total = 0.f;
            for (int64_t s = 0; s < S; s++) {
                p[s] = p[s] == -INFINITY ? 0.f : expf(p[s] - top);
                total += p[s];
            }
            for (int64_t s = 0; s < S; s++) {
                if (p[s] == 0.f) continue;
                if (kv_half)
                    axpy_f16(p[s], v16 + s * vs, o, D);
                else
                    axpy_f32(p[s], v32 + s * vs, o, D);
            }
            float inv = 1.f / total;
#pragma omp simd
            for (int64_t d = 0; d < D; d++) o[d] *= inv;
        }
        free(p);
    }
    return failed ? -1 : 0;
}

/* ---- One transformer block for one token per row, in one call --------------------------------

A decode step at batch 1 spends about as long in the Python between the matrix products as the
matrix products take to stream their weights past a small model's caches; this runs a whole
pre-norm block (x += attn(norm(x)); x += ff(norm(x))) from C: the norm (LayerNorm or RMSNorm),
the qkv projection, QK-norm and RoPE where the model has them, the new key and value written into
the cache at each row's position, attention, the output projection with the residual add, the
norm, the feed-forward (GELU's tanh form, ReLU² or SwiGLU), the last projection with the residual
add. The linears are the kernels above (int8 W8A8 or fp16). It computes `TransformerBlock.forward`
for one token per row; tests/test_decode.py and tests/test_kernels.py compare the two. */

typedef struct {
    int64_t kind; /* SL_INT8 or SL_F16 */
    int64_t n, k;
    const void *w;
    const float *scale; /* int8: per output row */
    const float *bias;  /* NULL: none */
} sl_linear_t;
#define SL_INT8 1
#define SL_F16 2

#define NORM_LAYER 1 /* LayerNorm: (x − mean) / √(var + eps) · w + b */
#define NORM_RMS 2   /* RMSNorm: x / √(mean(x²) + eps) · w */
#define ACT_GELU 1   /* fc2(gelu_tanh(fc1 x)) */
#define ACT_RELU2 2  /* fc2(relu(fc1 x)²) */
#define ACT_SWIGLU 3 /* fc3(silu(fc1 x) · fc2 x) */

typedef struct {
    int64_t norm;                               /* NORM_LAYER or NORM_RMS, both norms */
    const float *n1_w, *n1_b, *n2_w, *n2_b;     /* their parameters (NULL: none) */
    const float *qn_w, *kn_w;                   /* QK-norm (RMSNorm per head) weights */
    int64_t qk_norm;                            /* 1: QK-norm (qn_w/kn_w NULL: without weights) */
    double eps;
    sl_linear_t qkv, out, fc1, fc2, fc3;        /* fc3: SwiGLU's output projection */
    int64_t heads, kv_heads, head_dim, act;
    const float *gate_w; /* attention gate: (heads × gate_width) weights; NULL: none */
    int64_t gate_width;
} sl_layer_t;

static int run_linear(const sl_linear_t *l, const float *x, int64_t M, const float *res, float *y) {
    if (l->kind == SL_INT8)
        return sl_w8a8(x, M, l->k, (const int8_t *)l->w, l->scale, l->bias, l->n, res, y);
    if (l->kind == SL_F16)
        return sl_f16(x, M, l->k, (const uint16_t *)l->w, l->bias, l->n, res, y);
    return -1;
}

/* Each of the M rows of D: F.layer_norm (biased variance), or our RMSNorm (in its order: x · r,
   then · w); fp32. */
static void norm_rows(const float *x, int64_t M, int64_t D, int64_t kind, const float *w,
                      const float *b, float eps, float *y) {
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * D;
        float *o = y + m * D;
        if (kind == NORM_RMS) {
            float ss = 0.f;
#pragma omp simd reduction(+ : ss)
            for (int64_t d = 0; d < D; d++) ss += r[d] * r[d];
            float inv = 1.f / sqrtf(ss / (float)D + eps);
#pragma omp simd
            for (int64_t d = 0; d < D; d++) o[d] = w ? w[d] * (r[d] * inv) : r[d] * inv;
            continue;
        }
        float mean = 0.f, var = 0.f;
#pragma omp simd reduction(+ : mean)
        for (int64_t d = 0; d < D; d++) mean += r[d];
        mean /= (float)D;
#pragma omp simd reduction(+ : var)
        for (int64_t d = 0; d < D; d++) var += (r[d] - mean) * (r[d] - mean);
        float inv = 1.f / sqrtf(var / (float)D + eps);
#pragma omp simd
        for (int64_t d = 0; d < D; d++)
            o[d] = (r[d] - mean) * inv * (w ? w[d] : 1.f) + (b ? b[d] : 0.f);
    }
}

/* RoPE in place on one head: x·cos + rotate_half(x)·sin, rotate_half(x) = (−x₂, x₁). */
static void rope_head(float *x, const float *cos, const float *sin, int64_t hd) {
    int64_t half = hd / 2;
    for (int64_t d = 0; d < half; d++) {
        float a = x[d], b = x[d + half];
        x[d] = a * cos[d] - b * sin[d];
        x[d + half] = b * cos[d + half] + a * sin[d + half];
    }
}

/* exp(v) for v ≤ 0 (Cephes' expf: range reduction by ln 2, a degree-6 polynomial, 2ⁿ by the
   exponent bits; about 1 ulp), written without calls so that the loops below vectorize. */
static inline float exp_nonpositive(float v) {
    v = v < -87.f ? -87.f : v;
    float n = floorf(v * 1.44269504088896341f + 0.5f);
    float r = v - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* σ(x) from e^(−|x|) on either side: no overflow, no call (the loops below vectorize). */
static inline float sigmoid(float x) {
    float e = exp_nonpositive(-fabsf(x));
    return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}

/* The feed-forward's activation, in place on h (n values; SwiGLU: h ← silu(h) · up). GELU's tanh
   form 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³))) with tanh(u) = sign(u) (1 − e^(−2|u|)) /
   (1 + e^(−2|u|)); silu(x) = x · σ(x); ReLU². */
static void activate(float *h, const float *up, int64_t n, int64_t act) {
    if (act == ACT_RELU2) {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; i++) h[i] = h[i] > 0.f ? h[i] * h[i] : 0.f;
    } else if (act == ACT_SWIGLU) {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; i++) h[i] = h[i] * sigmoid(h[i]) * up[i];
    } else {
#pragma omp parallel for simd schedule(static)
        for (int64_t i = 0; i < n; i++) {
            float x = h[i], u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
            float e = exp_nonpositive(-2.f * fabsf(u)), t = (1.f - e) / (1.f + e);
            h[i] = 0.5f * x * (1.f + (u < 0.f ? -t : t));
        }
    }
}

/* IEEE float → half, rounding to nearest even (as torch's .half()), for the fp16 cache. */
static uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u, a = x & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504: inf */
    if (a < 0x38800000u) { /* below 2⁻¹⁴: a half subnormal, units of 2⁻²⁴ (exact scaling) */
        float v;
        memcpy(&v, &a, sizeof v);
        return (uint16_t)(sign | (uint32_t)nearbyintf(v * 16777216.f));
    }
    uint32_t h = (a - 0x38000000u) >> 13, rest = a & 0x1fffu; /* rebias 127 → 15, keep 10 bits */
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

/* x (M × D, in place) ← the block applied to each row; row m's key and value are written into
   the cache (fp32 or kv_half fp16, strides in elements: batch, head, position) at position
   pos[m], and its query attends over positions [0, S) under mask (as sl_attend). cos/sin: the
   RoPE tables of each row (row m at m · rope_stride; stride 0: one row for all), NULL without
   RoPE. scratch holds M · (D + qkv width + heads · head_dim + 2 · ff width) floats. */
int sl_layer(const sl_layer_t *L, float *x, int64_t M, void *kc, void *vc, int64_t cb, int64_t ch,
             int64_t cs, int kv_half, const int64_t *pos, int64_t S, const uint8_t *mask,
             int64_t mstride, const float *cos, const float *sin, int64_t rope_stride,
             float *scratch) {
    int64_t D = L->out.n, hd = L->head_dim, qd = L->heads * hd, kvd = L->kv_heads * hd;
    int64_t width = L->qkv.n, ffw = L->fc1.n;
    float *h = scratch, *qkv = h + M * D, *att = qkv + M * width, *ff = att + M * qd;
    float *up = ff + M * ffw, eps = (float)L->eps;
    norm_rows(x, M, D, L->norm, L->n1_w, L->n1_b, eps, h);
    if (run_linear(&L->qkv, h, M, NULL, qkv)) return -1;
    for (int64_t m = 0; m < M; m++) {
        float *row = qkv + m * width;
        if (L->qk_norm) { /* each query and key head on its own, in place */
            for (int64_t j = 0; j < L->heads; j++)
                norm_rows(row + j * hd, 1, hd, NORM_RMS, L->qn_w, NULL, eps, row + j * hd);
            for (int64_t g = 0; g < L->kv_heads; g++)
                norm_rows(row + qd + g * hd, 1, hd, NORM_RMS, L->kn_w, NULL, eps, row + qd + g * hd);
        }
        if (cos != NULL) {
            const float *c = cos + m * rope_stride, *s = sin + m * rope_stride;
            for (int64_t j = 0; j < L->heads + L->kv_heads; j++) rope_head(row + j * hd, c, s, hd);
        }
        for (int64_t g = 0; g < L->kv_heads; g++) { /* this row's key and value into the cache */
            const float *k = row + qd + g * hd, *v = k + kvd;
            int64_t at = m * cb + g * ch + pos[m] * cs;
            if (kv_half) {
                uint16_t *kd = (uint16_t *)kc + at, *vd = (uint16_t *)vc + at;
                for (int64_t d = 0; d < hd; d++) kd[d] = float_to_half(k[d]), vd[d] = float_to_half(v[d]);
            } else {
                memcpy((float *)kc + at, k, (size_t)hd * sizeof(float));
                memcpy((float *)vc + at, v, (size_t)hd * sizeof(float));
            }
        }
    }
    if (sl_attend(qkv, width, M, L->heads, L->kv_heads, hd, S, kc, cb, ch, cs, vc, cb, ch, cs, mask,
                  mstride, 1.f / sqrtf((float)hd), kv_half, att))
        return -1;
    if (L->gate_w != NULL) /* each head's output · σ(w_j · h[:gate_width]) (AttentionGate) */
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < L->heads; j++) {
                const float *w = L->gate_w + j * L->gate_width, *r = h + m * D;
                float s = 0.f, *o = att + m * qd + j * hd;
                for (int64_t d = 0; d < L->gate_width; d++) s += w[d] * r[d];
                float g = sigmoid(s);
                for (int64_t d = 0; d < hd; d++) o[d] *= g;
            }
    if (run_linear(&L->out, att, M, x, x)) return -1;
    norm_rows(x, M, D, L->norm, L->n2_w, L->n2_b, eps, h);
    if (run_linear(&L->fc1, h, M, NULL, ff)) return -1;
    if (L->act == ACT_SWIGLU) {
        if (run_linear(&L->fc2, h, M, NULL, up)) return -1;
        activate(ff, up, M * ffw, L->act);
        return run_linear(&L->fc3, ff, M, x, x);
    }
    activate(ff, NULL, M * ffw, L->act);
    return run_linear(&L->fc2, ff, M, x, x);
}
