/*
 * The element-wise part of one step of the controlled dynamics of a linear-readout model
 * (lcp.trainers.lcp_di.FusedControlled), fused into two passes over the state.
 *
 * A step of the controlled dynamics is two or three matrix products and tanh (done by the
 * caller with PyTorch's kernels) surrounded by some fifteen small element-wise operations: the
 * softmax, u, the sums that form v', e', v^' and u_i', tanh'(v) (.) ., the relaxation when
 * dt != 1 and the solver's stopping error. Run one by one from Python these cost more than the
 * products; here they are two loops over each sample's row:
 *
 *   lcp_pre_*   (before the products): softmax(v^), u = k_i u_i - k_p g into `u`, and u_i'
 *   lcp_post_*  (after the products):  v', e', v^' from the products, and the per-sample
 *                                       stopping error |s' - s| / (1e-5 + |s|) of the vanilla
 *                                       solver (l2 metric); returns its batch maximum (NaN if
 *                                       any sample's is NaN)
 *
 * A state row is [v (N) | v^ (C) | u_i (C) | e (N)], S = 2N + 2C values, rows contiguous.
 * Every formula is evaluated in the order of the PyTorch kernels it replaces (see
 * FusedControlled._lean_step), so float results agree to rounding; the norms are accumulated
 * in double.
 */
#include <math.h>

#define DEFINE_KERNELS(T, SUFFIX, EXP)                                                    \
void lcp_pre_##SUFFIX(long B, long N, long C, long S, const T *src, T *dst, T *u,             \
                      const T *onehot, double k_i, double k_p, double keep_ui,                 \
                      double target_rate, double soft_rate, int plain_u)                       \
{                                                                                              \
    for (long b = 0; b < B; ++b) {                                                             \
        const T *v = src + b * S, *v_hat = v + N, *u_i = v_hat + C;                           \
        const T *y = onehot + b * C;                                                           \
        T *u_row = u + b * C, *u_i_next = dst + b * S + N + C;                                \
        T top = v_hat[0];                                                                      \
        for (long c = 1; c < C; ++c)                                                           \
            top = v_hat[c] > top ? v_hat[c] : top;                                             \
        T soft[C > 0 ? C : 1];                                                                 \
        T total = 0;                                                                           \
        for (long c = 0; c < C; ++c) {                                                         \
            soft[c] = EXP(v_hat[c] - top);                                                     \
            total += soft[c];                                                                  \
        }                                                                                      \
        for (long c = 0; c < C; ++c) {                                                         \
            T s = soft[c] / total;                                                             \
            /* u = k_i u_i - k_p (softmax - onehot)/B */                                       \
            u_row[c] = plain_u ? u_i[c]                                                        \
                               : (T)k_i * u_i[c] - (T)k_p * ((s - y[c]) / (T)B);    \
            /* u_i' = (dt_u/B) onehot + (1 - dt_u alpha) u_i - (dt_u/B) softmax */             \
            u_i_next[c] = ((T)(target_rate * y[c]) + (T)keep_ui * u_i[c]) + (T)soft_rate * s;  \
        }                                                                                      \
    }                                                                                          \
}                                                                                              \
                                                                                               \
double lcp_post_##SUFFIX(long B, long N, long C, long S, const T *src, T *dst, const T *t,    \
                         const T *u, const T *h_b, const T *p_v, const T *p_e, const T *p_c,   \
                         const T *b_d, double dt_v, double dt_e, int linear_e, T *per_sample)  \
{                                                                                              \
    const T rv = (T)dt_v, rv_old = (T)(1.0 - dt_v), re = (T)dt_e, re_old = (T)(1.0 - dt_e);   \
    const int relax_v = dt_v != 1.0, relax_e = dt_e != 1.0;                                    \
    double worst = 0.0;                                                                        \
    for (long b = 0; b < B; ++b) {                                                             \
        const T *v = src + b * S, *v_hat = v + N, *u_i = v_hat + C, *e = u_i + C;             \
        T *v_next = dst + b * S, *v_hat_next = v_next + N, *u_i_next = v_hat_next + C;        \
        T *e_next = u_i_next + C;                                                              \
        const T *t_row = t + b * N, *hb = h_b + b * N, *pv = p_v + b * N, *pe = p_e + b * N;  \
        const T *pc = p_c + b * C, *u_row = u + b * C;                                         \
        double diff = 0.0, norm = 0.0;                                                         \
        _Pragma("omp simd reduction(+:diff, norm)")                                            \
        for (long j = 0; j < N; ++j) {                                                         \
            T en, vn;                                                                          \
            if (linear_e) { /* lcp-lf: e' = Q u, v' = h_b + e' + products */                   \
                en = pe[j];                                                                    \
                vn = (hb[j] + en) + pv[j];                                                     \
            } else {        /* e' = tanh'(v) (.) transposed products, v' = h_b + e + products */\
                en = pe[j] * ((T)1 - t_row[j] * t_row[j]);                                     \
                if (relax_e)                                                                   \
                    en = en * re + e[j] * re_old;                                              \
                vn = (hb[j] + e[j]) + pv[j];                                                   \
            }                                                                                  \
            if (relax_v)                                                                       \
                vn = vn * rv + v[j] * rv_old;                                                  \
            v_next[j] = vn;                                                                    \
            e_next[j] = en;                                                                    \
            double dv = (double)vn - (double)v[j], de = (double)en - (double)e[j];             \
            diff += dv * dv + de * de;                                                         \
            norm += (double)v[j] * (double)v[j] + (double)e[j] * (double)e[j];                 \
        }                                                                                      \
        for (long c = 0; c < C; ++c) {                                                         \
            T vh = (u_row[c] + b_d[c]) + pc[c];                                                \
            if (relax_v)                                                                       \
                vh = vh * rv + v_hat[c] * rv_old;                                              \
            v_hat_next[c] = vh;                                                                \
            double dh = (double)vh - (double)v_hat[c];                                         \
            double di = (double)u_i_next[c] - (double)u_i[c];                                  \
            diff += dh * dh + di * di;                                                         \
            norm += (double)v_hat[c] * (double)v_hat[c] + (double)u_i[c] * (double)u_i[c];     \
        }                                                                                      \
        double ratio = sqrt(diff) / (1e-5 + sqrt(norm));                                       \
        per_sample[b] = (T)ratio;                                                              \
        if (ratio > worst || ratio != ratio)                                                   \
            worst = worst != worst ? worst : ratio;                                            \
    }                                                                                          \
    return worst;                                                                              \
}

DEFINE_KERNELS(float, f32, expf)
DEFINE_KERNELS(double, f64, exp)
