/*
 * The element-wise part of one step of the controlled dynamics of a linear-readout model
 * (lcp.trainers.lcp_di.FusedControlled), fused into two passes over the state.
 *
 * A step of the controlled dynamics is tanh and two large matrix products (the blocks'
 * t W^T and their transposed products e_out M; done by the caller with PyTorch's kernels)
 * surrounded by two small products with the C classes (t_r W_D^T for v^', u M_u for e') and some
 * fifteen element-wise operations: the softmax, u, the sums that form v', e', v^' and u_i',
 * tanh'(v) (.) ., the relaxation when dt != 1 and the solver's stopping error. Run one by one
 * from Python these cost more than the large products; here they are one pass over each
 * sample's row, `lcp_step_*`, which also returns the vanilla solver's stopping error (l2
 * metric: per sample |s' - s| / (1e-5 + |s|), written to `per_sample`; its batch maximum
 * returned, NaN if any sample's is NaN).
 *
 * A state row is [v (N) | v^ (C) | u_i (C) | e (N)], S = 2N + 2C values, rows contiguous.
 * Inputs besides the state: t = tanh(v) (B x N), p_v = the blocks' forward products placed in
 * their output columns (zero elsewhere), p_e = their transposed products placed in their input
 * columns (zero elsewhere; NULL: none), W_D (C x R_d, the readout weight, acting on columns
 * r_d..N-1 of t), M_u (C x R_u, acting from u into columns r_u..N-1 of e'). The formulas follow
 * FusedControlled._lean_step; results agree with it to rounding.
 */
#include <math.h>
#include <stddef.h>
#include <string.h>

#define DEFINE_STEP(T, SUFFIX, EXP)                                                          \
double lcp_step_##SUFFIX(long B, long N, long C, long S, const T *src, T *dst, const T *t,      \
                         const T *onehot, const T *h_b, const T *p_v, const T *p_e,           \
                         const T *w_d, long r_d, const T *b_d, const T *m_u, long r_u,         \
                         double k_i, double k_p, double keep_ui, double target_rate,           \
                         double soft_rate, int plain_u, double dt_v, double dt_e,              \
                         int linear_e, T *per_sample, int threads)                             \
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
        const T *t_row = t + b * N, *hb = h_b + b * N, *pv = p_v + b * N;                     \
        const T *pe = p_e ? p_e + b * N : NULL, *y = onehot + b * C;                           \
        T diff = 0, norm = 0;                                                                  \
        /* g = (softmax(v^) - onehot)/B;  u = k_i u_i - k_p g */                               \
        T top = v_hat[0], total = 0;                                                           \
        for (long c = 1; c < C; ++c)                                                           \
            top = v_hat[c] > top ? v_hat[c] : top;                                             \
        for (long c = 0; c < C; ++c) {                                                         \
            soft[c] = EXP(v_hat[c] - top);                                                     \
            total += soft[c];                                                                  \
        }                                                                                      \
        for (long c = 0; c < C; ++c) {                                                         \
            T s = soft[c] / total;                                                             \
            u[c] = plain_u ? u_i[c] : (T)k_i * u_i[c] - (T)k_p * ((s - y[c]) / (T)B);          \
            /* u_i' = (dt_u/B) onehot + (1 - dt_u alpha) u_i - (dt_u/B) softmax */             \
            T ui = ((T)(target_rate * y[c]) + (T)keep_ui * u_i[c]) + (T)soft_rate * s;          \
            /* v^' = (u + b_D) + t_r W_D^T */                                                  \
            const T *w = w_d + c * R_d, *tr = t_row + r_d;                                     \
            T dot = 0;                                                                         \
            _Pragma("omp simd reduction(+:dot)")                                               \
            for (long j = 0; j < R_d; ++j)                                                     \
                dot += tr[j] * w[j];                                                           \
            T vh = (u[c] + b_d[c]) + dot;                                                      \
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
        for (long c = 0; c < C; ++c) {                                                         \
            const T uc = u[c], *m = m_u + c * R_u;                                             \
            T *to = back + r_u;                                                                \
            _Pragma("omp simd")                                                                \
            for (long j = 0; j < R_u; ++j)                                                     \
                to[j] += uc * m[j];                                                            \
        }                                                                                      \
        /* e' from back, v' from the forward products */                                      \
        _Pragma("omp simd reduction(+:diff, norm)")                                            \
        for (long j = 0; j < N; ++j) {                                                         \
            T en, vn;                                                                          \
            if (linear_e) { /* lcp-lf: e' = Q u;  v' = h_b + e' + forward products */          \
                en = back[j];                                                                     \
                vn = (hb[j] + en) + pv[j];                                                     \
            } else {        /* e' = tanh'(v) (.) back;  v' = h_b + e + forward products */     \
                en = back[j] * ((T)1 - t_row[j] * t_row[j]);                                      \
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
        per_sample[b] = (T)(sqrt((double)diff) / (1e-5 + sqrt((double)norm)));                \
    }                                                                                          \
    double worst = 0.0;                                                                        \
    for (long b = 0; b < B; ++b) {                                                             \
        double ratio = (double)per_sample[b];                                                  \
        if (worst == worst && (ratio > worst || ratio != ratio))                               \
            worst = ratio;                                                                     \
    }                                                                                          \
    return worst;                                                                              \
}

DEFINE_STEP(float, f32, expf)
DEFINE_STEP(double, f64, exp)
