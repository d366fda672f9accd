/*
 * The accelerated CPU backend of the no-grad dynamics of the linear-block tanh models (ff, rnn):
 * each pass computes the element-wise part of one step of an equation of docs/equations.md
 * whose one definition is PyTorch code in lcp/ (named at each pass). The passes take raw
 * pointers and sizes; Python never calls them directly: bindings.cpp binds each one as a typed
 * function of tensors that checks every tensor's dtype, device, contiguity and shape first.
 * When the backend loads, every pass is checked against its definition
 * (lcp/trainers/native_check.py).
 *
 * A step of the controlled dynamics is tanh and two large matrix products (the blocks'
 * t W^T and their transposed products e_out M; done by the caller with PyTorch's kernels)
 * surrounded by two small products with the C classes (t_r W_D^T for v^', u M_u for e') and some
 * fifteen element-wise operations: the softmax, u, the sums that form v', e', v^' and u_i',
 * tanh'(v) (.) ., the relaxation when dt != 1 and the solver's stopping error. Run one by one
 * from Python these cost more than the large products; here they are one pass over each
 * sample's row, `lcp_step_*`, which also returns the vanilla solver's stopping error (l2
 * metric: per sample |s' - s| / (1e-5 + |s|), written to `per_sample`; its batch maximum
 * returned, NaN if any sample's is NaN) and writes tanh(v') for the next step's products.
 *
 * A state row is [v (N) | v^ (C) | u_i (C) | e (N)], S = 2N + 2C values, rows contiguous.
 * Inputs besides the state: t = tanh(v) (B x N), p_v = the blocks' forward products placed in
 * their output columns (zero elsewhere), p_e = their transposed products placed in their input
 * columns (zero elsewhere; NULL: none), W_D (C x R_d, the readout weight, acting on columns
 * r_d..N-1 of t), M_u (C x R_u, acting from u into columns r_u..N-1 of e'). The formulas are
 * LeastControlTrainer.controlled_step's (docs/equations.md, "Controlled dynamics"), to
 * rounding. With next_tanh, each row of t, once read, becomes tanh(v') (tanh_row_*), for the
 * next step's products.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "dynamics.h"

/* C linkage, declared in dynamics.h (bindings.cpp calls them); built as C++ by
 * torch.utils.cpp_extension, with variable-length arrays (a GNU extension) for the row buffers */
#ifdef __cplusplus
extern "C" {
#endif

/*
 * Row pieces every pass below uses (static, inlined where they are called).
 *   dot_*:          sum_j a[j] b[j] over n values
 *   softmax_*:      out = softmax(x) over C values (max-shifted)
 *   add_product_*:  to[j] += sum_c coef[c] m[c * R + j] for j < R (a 1 x C by C x R product)
 *   batch_worst_*:  the largest per-sample error, NaN if any is NaN
 */

/* dot_* in 64-byte vectors (GCC's and Clang's vector extensions: any target; unaligned, and
 * aliasing the floats they load) with two accumulators whose lanes are added pairwise at the
 * end, halving (an OpenMP reduction adds its partial sums one by one: a chain of dependent
 * additions) */
typedef float vf16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef double vd8 __attribute__((vector_size(64), aligned(8), may_alias));

#define DEFINE_DOT(T, SUFFIX, V64)                                                             \
static inline T dot_##SUFFIX(const T *a, const T *b, long n)                                   \
{                                                                                              \
    enum { LANES = sizeof(V64) / sizeof(T) };                                                  \
    V64 s0 = {0}, s1 = {0};                                                                    \
    long j = 0;                                                                                \
    for (; j + 2 * LANES <= n; j += 2 * LANES) {                                               \
        s0 += *(const V64 *)(a + j) * *(const V64 *)(b + j);                                   \
        s1 += *(const V64 *)(a + j + LANES) * *(const V64 *)(b + j + LANES);                   \
    }                                                                                          \
    for (; j + LANES <= n; j += LANES)                                                         \
        s0 += *(const V64 *)(a + j) * *(const V64 *)(b + j);                                   \
    s0 += s1;                                                                                  \
    /* the lanes halved until one is left (constant bounds: unrolled, in registers) */         \
    T lane[LANES];                                                                             \
    memcpy(lane, &s0, sizeof lane);                                                            \
    for (long width = LANES / 2; width >= 1; width /= 2)                                       \
        for (long l = 0; l < width; ++l)                                                       \
            lane[l] += lane[l + width];                                                        \
    T sum = lane[0];                                                                           \
    for (; j < n; ++j)                                                                         \
        sum += a[j] * b[j];                                                                    \
    return sum;                                                                                \
}

DEFINE_DOT(float, f32, vf16)
DEFINE_DOT(double, f64, vd8)

#define DEFINE_ROW_HELPERS(T, SUFFIX, EXP)                                                      \
static inline void softmax_##SUFFIX(const T *x, long C, T *out)                                \
{                                                                                              \
    T top = x[0], total = 0;                                                                   \
    for (long c = 1; c < C; ++c)                                                               \
        top = x[c] > top ? x[c] : top;                                                         \
    for (long c = 0; c < C; ++c) {                                                             \
        out[c] = EXP(x[c] - top);                                                              \
        total += out[c];                                                                       \
    }                                                                                          \
    for (long c = 0; c < C; ++c)                                                               \
        out[c] = out[c] / total;                                                               \
}                                                                                              \
                                                                                               \
static inline void add_product_##SUFFIX(T *to, const T *coef, const T *m, long C, long R)      \
{                                                                                              \
    for (long c = 0; c < C; ++c) {                                                             \
        const T k = coef[c], *row = m + c * R;                                                 \
        _Pragma("omp simd")                                                                    \
        for (long j = 0; j < R; ++j)                                                           \
            to[j] += k * row[j];                                                               \
    }                                                                                          \
}                                                                                              \
                                                                                               \
static inline double batch_worst_##SUFFIX(const T *per_sample, long B)                         \
{                                                                                              \
    double worst = 0.0;                                                                        \
    for (long b = 0; b < B; ++b) {                                                             \
        double ratio = (double)per_sample[b];                                                  \
        if (worst == worst && (ratio > worst || ratio != ratio))                               \
            worst = ratio;                                                                     \
    }                                                                                          \
    return worst;                                                                              \
}

DEFINE_ROW_HELPERS(float, f32, expf)
DEFINE_ROW_HELPERS(double, f64, exp)

/* the columns of a row the noisy pass handles at once: its (u Q^T) over a whole tile stays in
 * vector registers (the tile's loops have a constant length) */
#define LCP_TILE 64

/*
 * lcp-lf's counter-based noise (lcp/noise.py is the definition): positions c = 2w and 2w + 1
 * share SplitMix64's word z = mix64(key + (w + 1) GAMMA), whose two 24-bit halves give
 * Box-Muller's pair r cos(2 pi u2), r cos(2 pi (u2 + 3/4)) = r sin(2 pi u2). Branch-free, so each
 * row's numbers are computed vectorised, a pair per word, where the pass uses them. float64:
 * the C library's log and cos (the definition's to rounding); float32: a log from the series
 * 2 atanh(s) on the mantissa and a cosine from its Taylor series on [0, pi/2] (both to ~1e-7
 * relative, within float32's rounding of the result).
 */
#define NOISE_GAMMA 0x9E3779B97F4A7C15ULL
#define NOISE_BLOCK 16

/* SplitMix64's output for the state z = key + (w + 1) GAMMA (mod 2^64) */
static inline uint64_t noise_mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint64_t noise_word(uint64_t key, uint64_t w)
{
    return noise_mix(key + (w + 1) * NOISE_GAMMA);
}

/* u1 in (0, 1] and u2 in [0, 1) of a word, and u2 + 3/4 taken mod 1 (all exact) */
#define NOISE_UNIFORMS(T, z, u1, u2, u2s)                                                       \
    const T u1 = (T)(int32_t)(((z) >> 40) + 1) * (T)0x1p-24;                                   \
    const T u2 = (T)(int32_t)(((z) >> 16) & 0xFFFFFF) * (T)0x1p-24;                            \
    const T u2s = u2 >= (T)0.25 ? u2 - (T)0.25 : u2 + (T)0.75;

static inline void noise_pair_f64(uint64_t z, double *even, double *odd)
{
    NOISE_UNIFORMS(double, z, u1, u2, u2s)
    const double r = sqrt(-2.0 * log(u1));
    *even = r * cos(6.283185307179586 * u2);
    *odd = r * cos(6.283185307179586 * u2s);
}

static inline float noise_ln_f32(float u)   /* ln u for u in (0, 1], ~1e-7 relative */
{
    /* ln u = e ln 2 + ln m, m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(s), s = (m - 1)/(m + 1) */
    uint32_t bits;
    memcpy(&bits, &u, sizeof bits);
    int32_t e = (int32_t)(bits >> 23) - 127;
    const uint32_t m_bits = (bits & 0x7FFFFFu) | 0x3F800000u;
    float m;
    memcpy(&m, &m_bits, sizeof m);
    const int high = m > 1.41421356f;
    m = high ? 0.5f * m : m;
    e += high;
    const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    return (float)e * 0.693147180559945f
           + s * (2.0f + s2 * (2.0f / 3 + s2 * (2.0f / 5 + s2 * (2.0f / 7 + s2 * (2.0f / 9)))));
}

static inline float noise_cos2pi_f32(float u)   /* cos(2 pi u) for u in [0, 1), ~1e-7 */
{
    /* cos(2 pi u) = -cos(2 pi w), w = u - 1/2; a = |w| <= 1/4, else -cos(2 pi (1/2 - a)) */
    const float a = fabsf(u - 0.5f);
    const int far = a > 0.25f;
    const float x = 6.28318530717958648f * (far ? 0.5f - a : a), x2 = x * x;
    const float c = 1.0f + x2 * (-1.0f / 2 + x2 * (1.0f / 24 + x2 * (-1.0f / 720 + x2 * (
        1.0f / 40320 + x2 * (-1.0f / 3628800 + x2 * (1.0f / 479001600))))));
    return far ? c : -c;
}

static inline void noise_pair_f32(uint64_t z, float *even, float *odd)
{
    NOISE_UNIFORMS(float, z, u1, u2, u2s)
    const float r = sqrtf(-2.0f * noise_ln_f32(u1));
    *even = r * noise_cos2pi_f32(u2);
    *odd = r * noise_cos2pi_f32(u2s);
}

/* out[j] = scale x (the number of position first + j), j < n: whole pairs vectorised */
#define DEFINE_NOISE_FILL(T, SUFFIX)                                                            \
static inline void noise_fill_##SUFFIX(T *out, long n, uint64_t key, uint64_t first, T scale)  \
{                                                                                              \
    T even, odd;                                                                               \
    long j = 0;                                                                                \
    if (n > 0 && (first & 1)) {  /* a row that starts on a pair's second number */             \
        noise_pair_##SUFFIX(noise_word(key, first >> 1), &even, &odd);                         \
        out[0] = scale * odd;                                                                  \
        j = 1;                                                                                 \
    }                                                                                          \
    const long pairs = (n - j) / 2;                                                            \
    const uint64_t w0 = (first + (uint64_t)j) >> 1;                                            \
    T *o = out + j;                                                                            \
    /* blocks of NOISE_BLOCK pairs: the words' states are the block's first plus constants     \
     * l GAMMA, so SplitMix64's counter costs an addition, not a 64-bit product */             \
    uint64_t state = key + (w0 + 1) * NOISE_GAMMA;                                             \
    long p0 = 0;                                                                               \
    for (; p0 + NOISE_BLOCK <= pairs; p0 += NOISE_BLOCK, state += NOISE_BLOCK * NOISE_GAMMA) { \
        _Pragma("omp simd")                                                                    \
        for (long l = 0; l < NOISE_BLOCK; ++l) {                                               \
            T a, b;                                                                            \
            noise_pair_##SUFFIX(noise_mix(state + (uint64_t)l * NOISE_GAMMA), &a, &b);         \
            o[2 * (p0 + l)] = scale * a;                                                       \
            o[2 * (p0 + l) + 1] = scale * b;                                                   \
        }                                                                                      \
    }                                                                                          \
    for (long p = p0; p < pairs; ++p) {                                                        \
        noise_pair_##SUFFIX(noise_word(key, w0 + (uint64_t)p), &even, &odd);                   \
        o[2 * p] = scale * even;                                                               \
        o[2 * p + 1] = scale * odd;                                                            \
    }                                                                                          \
    j += 2 * pairs;                                                                            \
    if (j < n) {  /* a row that ends on a pair's first number */                               \
        noise_pair_##SUFFIX(noise_word(key, (first + (uint64_t)j) >> 1), &even, &odd);         \
        out[j] = scale * even;                                                                 \
    }                                                                                          \
}

DEFINE_NOISE_FILL(float, f32)
DEFINE_NOISE_FILL(double, f64)

/*
 * tanh for the passes that write the next state's tanh themselves (the controlled step, the
 * noisy step, the energy descent: one pass over memory fewer and no call), row by row
 * (tanh_row_*). float64: the C library's. float32: branch-free, so it vectorises: |x| < 1/2
 * the odd Taylor series to x^15; else 1 - 2/(e^{2|x|} + 1) with e^y = 2^n e^g,
 * n = round(y log2 e) (by the 1.5 * 2^23 shift, which vectorises where a float-to-int conversion
 * does not), g = y - n ln 2 and e^g from its Taylor series to g^7; |x| clamped at 9, where
 * tanh rounds to 1. Within 2.2 ulp of tanh over [-10, 10] (against the float64 C library;
 * PyTorch's own is within 1 ulp).
 */
static inline double tanh_f64(double x)
{
    return tanh(x);
}

static inline float tanh_f32(float x)
{
    const float ax = fabsf(x), a = ax < 9.0f ? ax : 9.0f, a2 = a * a;
    const float small = a * (1.0f + a2 * (-1.0f / 3 + a2 * (2.0f / 15 + a2 * (-17.0f / 315 + a2 * (
        62.0f / 2835 + a2 * (-1382.0f / 155925 + a2 * (21844.0f / 6081075 + a2 * (
        -929569.0f / 638512875))))))));
    const float y = 2.0f * a * 1.44269504088896341f;   /* 2|x| log2 e */
    const float shifted = y + 12582912.0f;
    const float n = shifted - 12582912.0f, g = (y - n) * 0.693147180559945309f;
    int32_t bits = 0;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000 + 127) << 23;   /* 2^n */
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    const float e_g = 1.0f + g * (1.0f + g * (0.5f + g * (1.0f / 6 + g * (1.0f / 24 + g * (
        1.0f / 120 + g * (1.0f / 720 + g * (1.0f / 5040)))))));
    const float big = 1.0f - 2.0f / (e_g * two_n + 1.0f);
    const float r = a < 0.5f ? small : big;
    return x < 0 ? -r : r;
}

/* out[j] = tanh(in[j]), j < n: the next step's t row, written once the pass has read t's row */
#define DEFINE_TANH_ROW(T, SUFFIX)                                                              \
static inline void tanh_row_##SUFFIX(T *out, const T *in, long n)                              \
{                                                                                              \
    _Pragma("omp simd")                                                                        \
    for (long j = 0; j < n; ++j)                                                               \
        out[j] = tanh_##SUFFIX(in[j]);                                                         \
}

DEFINE_TANH_ROW(float, f32)
DEFINE_TANH_ROW(double, f64)

#define DEFINE_STEP(T, SUFFIX)                                                          \
double lcp_step_##SUFFIX(long B, long N, long C, long S, const T *src, T *dst, T *t,            \
                         const T *onehot, const T *h_b, const T *p_v, const T *p_e,           \
                         const T *w_d, long r_d, const T *b_d, const T *m_u, long r_u,         \
                         double k_i, double k_p, double keep_ui, double target_rate,           \
                         double soft_rate, int plain_u, double dt_v, double dt_e,              \
                         int linear_e, T *per_sample, int next_tanh, int threads)              \
{                                                                                              \
    const T rv = (T)dt_v, rv_old = (T)(1.0 - dt_v), re = (T)dt_e, re_old = (T)(1.0 - dt_e);   \
    const int relax_v = dt_v != 1.0, relax_e = dt_e != 1.0;                                    \
    const long R_d = N - r_d, R_u = N - r_u;                                                   \
    _Pragma("omp parallel for num_threads(threads) if(threads > 1) schedule(static)")         \
    for (long b = 0; b < B; ++b) {                                                             \
        T soft[C], u[C], back[N];                                                              \
        const T *v = src + b * S, *v_hat = v + N, *u_i = v_hat + C, *e = u_i + C;             \
        T *v_next = dst + b * S, *v_hat_next = v_next + N, *u_i_next = v_hat_next + C;        \
        T *e_next = u_i_next + C;                                                              \
        T *t_row = t + b * N;                                                                  \
        const T *hb = h_b + b * N, *pv = p_v + b * N;                                          \
        const T *pe = p_e ? p_e + b * N : NULL, *y = onehot + b * C;                           \
        T diff = 0, norm = 0;                                                                  \
        /* g = (softmax(v^) - onehot)/B;  u = k_i u_i - k_p g */                               \
        softmax_##SUFFIX(v_hat, C, soft);                                                      \
        for (long c = 0; c < C; ++c) {                                                         \
            T s = soft[c];                                                                     \
            u[c] = plain_u ? u_i[c] : (T)k_i * u_i[c] - (T)k_p * ((s - y[c]) / (T)B);          \
            /* u_i' = (dt_u/B) onehot + (1 - dt_u alpha) u_i - (dt_u/B) softmax */             \
            T ui = ((T)(target_rate * y[c]) + (T)keep_ui * u_i[c]) + (T)soft_rate * s;          \
            /* v^' = (u + b_D) + t_r W_D^T */                                                  \
            T vh = (u[c] + b_d[c]) + dot_##SUFFIX(t_row + r_d, w_d + c * R_d, R_d);            \
            if (relax_v)                                                                       \
                vh = vh * rv + v_hat[c] * rv_old;                                              \
            u_i_next[c] = ui;                                                                  \
            v_hat_next[c] = vh;                                                                \
            T dh = vh - v_hat[c], di = ui - u_i[c];                                            \
            diff += dh * dh + di * di;                                                         \
            norm += v_hat[c] * v_hat[c] + u_i[c] * u_i[c];                                     \
        }                                                                                      \
        /* back = the transposed products + u M_u (on columns r_u..N-1) */                    \
        if (pe)                                                                                \
            memcpy(back, pe, (size_t)N * sizeof(T));                                           \
        else                                                                                   \
            memset(back, 0, (size_t)N * sizeof(T));                                            \
        add_product_##SUFFIX(back + r_u, u, m_u, C, R_u);                                      \
        /* e' from back, v' from the forward products */                                      \
        _Pragma("omp simd reduction(+:diff, norm)")                                            \
        for (long j = 0; j < N; ++j) {                                                         \
            T en, vn;                                                                          \
            if (linear_e) { /* lcp-lf: e' = Q u;  v' = h_b + e' + forward products */          \
                en = back[j];                                                                  \
                vn = (hb[j] + en) + pv[j];                                                     \
            } else {        /* e' = tanh'(v) (.) back;  v' = h_b + e + forward products */     \
                en = back[j] * ((T)1 - t_row[j] * t_row[j]);                                   \
                if (relax_e)                                                                   \
                    en = en * re + e[j] * re_old;                                              \
                vn = (hb[j] + e[j]) + pv[j];                                                   \
            }                                                                                  \
            if (relax_v)                                                                       \
                vn = vn * rv + v[j] * rv_old;                                                  \
            v_next[j] = vn;                                                                    \
            e_next[j] = en;                                                                    \
            T dv = vn - v[j], de = en - e[j];                                                  \
            diff += dv * dv + de * de;                                                         \
            norm += v[j] * v[j] + e[j] * e[j];                                                 \
        }                                                                                      \
        if (next_tanh) /* t_row read above: now tanh(v') for the next step */                  \
            tanh_row_##SUFFIX(t_row, v_next, N);                                               \
        per_sample[b] = (T)(sqrt((double)diff) / (1e-5 + sqrt((double)norm)));                \
    }                                                                                          \
    return batch_worst_##SUFFIX(per_sample, B);                                                \
}

DEFINE_STEP(float, f32)
DEFINE_STEP(double, f64)

/*
 * One step of the free dynamics v' = h_b + p_v (p_v: the blocks' forward products of tanh(v),
 * placed in their output columns), with the vanilla solver's per-sample stopping error, as in
 * lcp_step_*. Rows of N values.
 */
#define DEFINE_FREE_STEP(T, SUFFIX)                                                             \
double lcp_free_step_##SUFFIX(long B, long N, const T *src, T *dst, const T *h_b,              \
                              const T *p_v, T *per_sample, int threads)                        \
{                                                                                              \
    _Pragma("omp parallel for num_threads(threads) if(threads > 1) schedule(static)")         \
    for (long b = 0; b < B; ++b) {                                                             \
        const T *v = src + b * N, *hb = h_b + b * N, *pv = p_v + b * N;                       \
        T *v_next = dst + b * N;                                                               \
        T diff = 0, norm = 0;                                                                  \
        _Pragma("omp simd reduction(+:diff, norm)")                                            \
        for (long j = 0; j < N; ++j) {                                                         \
            T vn = hb[j] + pv[j];                                                              \
            v_next[j] = vn;                                                                    \
            T dv = vn - v[j];                                                                  \
            diff += dv * dv;                                                                   \
            norm += v[j] * v[j];                                                               \
        }                                                                                      \
        per_sample[b] = (T)(sqrt((double)diff) / (1e-5 + sqrt((double)norm)));                \
    }                                                                                          \
    return batch_worst_##SUFFIX(per_sample, B);                                                \
}

DEFINE_FREE_STEP(float, f32)
DEFINE_FREE_STEP(double, f64)

/*
 * One step of lcp-lf's noisy phase (LinearFeedbackTrainer.noisy_step), after the
 * caller computed p_v (the blocks' forward products of t = tanh(v)). With next_tanh, each row of
 * t, once read, is overwritten with tanh(v') (tanh_*), for the next step's products. xi, the step's scaled
 * normal noise, is drawn by the caller, or with counter_noise computed here, row by row:
 * noise_scale times the counter-based N(0, 1) numbers of step noise_step under noise_key (see
 * noise_fill_*; xi_all is then unread). With u = k_i u_i - k_p (softmax(v^) - onehot)/B:
 *   v_fb = sigma eps + u Q^T          (written to fb_row; u - u_ref to du_row)
 *   eps  = eps_keep eps + xi          (in place)
 *   v'   = relax(h_b + v_fb + p_v, v, rate_v)
 *   v^'  = relax((u + b_D) + t_r W_D^T, v^, rate_slow_v)
 *   u_i  = (dt'_u/B) onehot + (1 - dt'_u alpha) u_i - (dt'_u/B) softmax   (in place)
 * Rows: v, eps, xi, t, p_v, h_b, fb_row B x N; v^, u_i, onehot, u_ref, du_row B x C;
 * Q^T is C x N, W_D C x (N - r_d).
 */
#define DEFINE_NOISY_STEP(T, SUFFIX)                                                       \
/* columns j0 .. j0 + n - 1 of a noisy step's row: back = (u Q^T) over the tile (in registers  \
 * where n is the constant LCP_TILE), then v_fb, eps and v'. add_product_* is written out:     \
 * called here with a row stride, GCC kept back on the stack (the same sums, a slower pass) */ \
static inline void noisy_tile_##SUFFIX(long j0, long n, long N, long C, const T *u,            \
                                       const T *q_t, T sigma, T eps_keep, T *eps, const T *xi, \
                                       T *fb,                                                  \
                                       const T *hb, const T *pv, const T *v, T *v_next,        \
                                       int relax_v, T rv, T rv_old)                            \
{                                                                                              \
    T back[LCP_TILE];                                                                          \
    _Pragma("omp simd")                                                                        \
    for (long jj = 0; jj < n; ++jj)                                                            \
        back[jj] = 0;                                                                          \
    for (long c = 0; c < C; ++c) {                                                             \
        const T k = u[c], *row = q_t + c * N + j0;                                             \
        _Pragma("omp simd")                                                                    \
        for (long jj = 0; jj < n; ++jj)                                                        \
            back[jj] += k * row[jj];                                                           \
    }                                                                                          \
    _Pragma("omp simd")                                                                        \
    for (long jj = 0; jj < n; ++jj) {                                                          \
        const long j = j0 + jj;                                                                \
        T f = sigma * eps[j] + back[jj];                                                       \
        fb[j] = f;                                                                             \
        eps[j] = eps_keep * eps[j] + xi[j];                                                    \
        T vn = (hb[j] + f) + pv[j];                                                            \
        if (relax_v)                                                                           \
            vn = vn * rv + v[j] * rv_old;                                                      \
        v_next[j] = vn;                                                                        \
    }                                                                                          \
}                                                                                              \
                                                                                               \
void lcp_noisy_step_##SUFFIX(long B, long N, long C, const T *v_all, T *v_next_all,           \
                             const T *v_hat_all, T *v_hat_next_all, T *u_i_all, T *eps_all,   \
                             const T *xi_all, T *t, const T *p_v, const T *h_b,               \
                             const T *q_t, const T *w_d, long r_d, const T *b_d,              \
                             const T *onehot, const T *u_ref, T *fb_all, T *du_all,           \
                             double k_i, double k_p, double sigma, double eps_keep,           \
                             double rate_v, double rate_slow_v, double keep_ui,               \
                             double target_rate, double soft_rate, int next_tanh,             \
                             int counter_noise,                                               \
                             int64_t noise_key, long noise_step, double noise_scale,         \
                             int threads)                                                     \
{                                                                                              \
    const long R_d = N - r_d;                                                                  \
    const uint64_t key = (uint64_t)noise_key, first = (uint64_t)noise_step * (uint64_t)(B * N); \
    const T scale = (T)noise_scale;                                                            \
    const int relax_v = rate_v != 1.0, relax_h = rate_slow_v != 1.0;                           \
    const T rv = (T)rate_v, rv_old = (T)(1.0 - rate_v);                                        \
    const T rh = (T)rate_slow_v, rh_old = (T)(1.0 - rate_slow_v);                              \
    _Pragma("omp parallel for num_threads(threads) if(threads > 1) schedule(static)")         \
    for (long b = 0; b < B; ++b) {                                                             \
        T soft[C], u[C], noise[N];                                                             \
        const T *v = v_all + b * N, *v_hat = v_hat_all + b * C, *y = onehot + b * C;           \
        const T *xi = counter_noise ? noise : xi_all + b * N;                                  \
        T *t_row = t + b * N;                                                                  \
        const T *pv = p_v + b * N;                                                             \
        const T *hb = h_b + b * N, *ur = u_ref + b * C;                                        \
        T *v_next = v_next_all + b * N, *v_hat_next = v_hat_next_all + b * C;                 \
        T *u_i = u_i_all + b * C, *eps = eps_all + b * N;                                      \
        T *fb = fb_all + b * N, *du = du_all + b * C;                                          \
        softmax_##SUFFIX(v_hat, C, soft);                                                      \
        for (long c = 0; c < C; ++c) {                                                         \
            T s = soft[c];                                                                     \
            u[c] = (T)k_i * u_i[c] - (T)k_p * ((s - y[c]) / (T)B);                             \
            du[c] = u[c] - ur[c];                                                              \
            T vh = (u[c] + b_d[c]) + dot_##SUFFIX(t_row + r_d, w_d + c * R_d, R_d);            \
            if (relax_h)                                                                       \
                vh = vh * rh + v_hat[c] * rh_old;                                              \
            v_hat_next[c] = vh;                                                                \
            u_i[c] = ((T)(target_rate * y[c]) + (T)keep_ui * u_i[c]) + (T)soft_rate * s;       \
        }                                                                                      \
        if (counter_noise)                                                                     \
            noise_fill_##SUFFIX(noise, N, key, first + (uint64_t)(b * N), scale);              \
        long j0 = 0;                                                                           \
        for (; j0 + LCP_TILE <= N; j0 += LCP_TILE)                                             \
            noisy_tile_##SUFFIX(j0, LCP_TILE, N, C, u, q_t, (T)sigma, (T)eps_keep, eps, xi, fb,\
                                hb, pv, v, v_next, relax_v, rv, rv_old);                       \
        if (j0 < N)                                                                            \
            noisy_tile_##SUFFIX(j0, N - j0, N, C, u, q_t, (T)sigma, (T)eps_keep, eps, xi, fb,  \
                                hb, pv, v, v_next, relax_v, rv, rv_old);                       \
        if (next_tanh) /* t_row read above: now tanh(v') for the next step */                  \
            tanh_row_##SUFFIX(t_row, v_next, N);                                               \
    }                                                                                          \
}

DEFINE_NOISY_STEP(float, f32)
DEFINE_NOISY_STEP(double, f64)

/*
 * lcp-ebd's energy descent (EnergyBasedTrainer.energy_gradient and its Adam step) on x = [v | v^] (B x (N + C)),
 * in two passes around the caller's products (t = tanh(v), p_v = the blocks' forward products
 * of t, p_e = the blocks' transposed products of r_f):
 *   lcp_ebd_residuals: r_f = v - (h_b + p_v),  r_d = v^ - (b_D + t_r W_D^T)
 *   lcp_ebd_descend:   g_v  = r_f - tanh'(v) (.) (p_e + r_d W_D on the readout columns)
 *                      g_v^ = (r_d + softmax(v^)/(alpha B)) - onehot/(alpha B)
 *                      then one step of Adam (torch.optim.Adam's arithmetic; bias corrections
 *                      from the caller) or of gradient descent on x; with next_tanh, each row
 *                      of t, once read, becomes tanh(v') (tanh_*), for the next step.
 */
#define DEFINE_EBD(T, SUFFIX, SQRT)                                                             \
void lcp_ebd_residuals_##SUFFIX(long B, long N, long C, const T *x, const T *t, const T *p_v,  \
                                const T *h_b, const T *w_d, long r_d0, const T *b_d, T *r_f,   \
                                T *r_d, int threads)                                           \
{                                                                                              \
    const long S = N + C, R_d = N - r_d0;                                                      \
    _Pragma("omp parallel for num_threads(threads) if(threads > 1) schedule(static)")         \
    for (long b = 0; b < B; ++b) {                                                             \
        const T *v = x + b * S, *v_hat = v + N, *t_row = t + b * N;                            \
        const T *pv = p_v + b * N, *hb = h_b + b * N;                                          \
        T *rf = r_f + b * N, *rd = r_d + b * C;                                                \
        _Pragma("omp simd")                                                                    \
        for (long j = 0; j < N; ++j)                                                           \
            rf[j] = (v[j] - hb[j]) - pv[j];                                                    \
        for (long c = 0; c < C; ++c)                                                           \
            rd[c] = (v_hat[c] - b_d[c]) - dot_##SUFFIX(t_row + r_d0, w_d + c * R_d, R_d);      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
void lcp_ebd_descend_##SUFFIX(long B, long N, long C, T *x, T *t, const T *r_f,                \
                              const T *r_d, const T *p_e, const T *w_d, long r_d0,             \
                              const T *onehot, double inv_alpha_b, T *exp_avg,                 \
                              T *exp_avg_sq, int adam, double lr, double beta1, double beta2,  \
                              double eps, double bias_correction1, double bias_correction2,    \
                              int next_tanh, int threads)                                      \
{                                                                                              \
    const long S = N + C, R_d = N - r_d0;                                                      \
    const T step_size = (T)(lr / bias_correction1), root2 = (T)sqrt(bias_correction2);        \
    const T one_b1 = (T)(1.0 - beta1), b2 = (T)beta2, one_b2 = (T)(1.0 - beta2);              \
    const T e8 = (T)eps, lr_t = (T)lr;                                                         \
    _Pragma("omp parallel for num_threads(threads) if(threads > 1) schedule(static)")         \
    for (long b = 0; b < B; ++b) {                                                             \
        T g[S], soft[C];                                                                       \
        T *xr = x + b * S, *m = exp_avg + b * S, *s2 = exp_avg_sq + b * S;                    \
        T *t_row = t + b * N;                                                                  \
        const T *v_hat = xr + N, *rf = r_f + b * N, *rd = r_d + b * C;                         \
        const T *y = onehot + b * C;                                                           \
        if (p_e)                                                                               \
            memcpy(g, p_e + b * N, (size_t)N * sizeof(T));                                     \
        else                                                                                   \
            memset(g, 0, (size_t)N * sizeof(T));                                               \
        add_product_##SUFFIX(g + r_d0, rd, w_d, C, R_d);                                      \
        _Pragma("omp simd")                                                                    \
        for (long j = 0; j < N; ++j)                                                           \
            g[j] = rf[j] - g[j] * ((T)1 - t_row[j] * t_row[j]);                                \
        softmax_##SUFFIX(v_hat, C, soft);                                                      \
        for (long c = 0; c < C; ++c)                                                           \
            g[N + c] = (rd[c] + (T)inv_alpha_b * soft[c]) - y[c] * (T)inv_alpha_b;             \
        if (adam) {                                                                            \
            _Pragma("omp simd")                                                                \
            for (long k = 0; k < S; ++k) {                                                     \
                T mk = m[k] + one_b1 * (g[k] - m[k]);                                          \
                T sk = b2 * s2[k] + one_b2 * g[k] * g[k];                                      \
                m[k] = mk;                                                                     \
                s2[k] = sk;                                                                    \
                xr[k] -= step_size * (mk / (SQRT(sk) / root2 + e8));                           \
            }                                                                                  \
        } else {                                                                               \
            _Pragma("omp simd")                                                                \
            for (long k = 0; k < S; ++k)                                                       \
                xr[k] -= lr_t * g[k];                                                          \
        }                                                                                      \
        if (next_tanh) /* t_row read above: now tanh(v') for the next step */                  \
            tanh_row_##SUFFIX(t_row, xr, N);                                                   \
    }                                                                                          \
}

DEFINE_EBD(float, f32, sqrtf)
DEFINE_EBD(double, f64, sqrt)


#ifdef __cplusplus
}
#endif
