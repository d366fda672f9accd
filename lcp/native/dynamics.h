/*
 * The passes of dynamics.cpp, for float (_f32) and double (_f64). dynamics.cpp includes this
 * header, so a declaration that differs from its definition does not compile; bindings.cpp calls
 * them from the typed bindings (which check every tensor first). Arguments: see dynamics.cpp.
 */
#ifndef LCP_NATIVE_DYNAMICS_H
#define LCP_NATIVE_DYNAMICS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LCP_DECLARE_PASSES(T, SUFFIX)                                                          \
double lcp_step_##SUFFIX(long B, long N, long C, long S, const T *src, T *dst, T *t,           \
                         const T *onehot, const T *h_b, const T *p_v, const T *p_e,           \
                         const T *w_d, long r_d, const T *b_d, const T *m_u, long r_u,         \
                         double k_i, double k_p, double keep_ui, double target_rate,           \
                         double soft_rate, int plain_u, double dt_v, double dt_e,              \
                         int linear_e, T *per_sample, int next_tanh, int threads);             \
double lcp_free_step_##SUFFIX(long B, long N, const T *src, T *dst, const T *h_b,             \
                              const T *p_v, T *per_sample, int threads);                       \
void lcp_noisy_step_##SUFFIX(long B, long N, long C, const T *v_all, T *v_next_all,           \
                             const T *v_hat_all, T *v_hat_next_all, T *u_i_all, T *eps_all,   \
                             const T *xi_all, T *t, const T *p_v, const T *h_b,               \
                             const T *q_t, const T *w_d, long r_d, const T *b_d,              \
                             const T *onehot, const T *u_ref, T *fb_all, T *du_all,           \
                             double k_i, double k_p, double sigma, double eps_keep,           \
                             double rate_v, double rate_slow_v, double keep_ui,               \
                             double target_rate, double soft_rate, int next_tanh,             \
                             int counter_noise, int64_t noise_key, long noise_step,           \
                             double noise_scale, int threads);                                \
void lcp_ebd_residuals_##SUFFIX(long B, long N, long C, const T *x, const T *t, const T *p_v, \
                                const T *h_b, const T *w_d, long r_d0, const T *b_d, T *r_f,  \
                                T *r_d, int threads);                                          \
void lcp_ebd_descend_##SUFFIX(long B, long N, long C, T *x, T *t, const T *r_f,               \
                              const T *r_d, const T *p_e, const T *w_d, long r_d0,            \
                              const T *onehot, double inv_alpha_b, T *exp_avg,                \
                              T *exp_avg_sq, int adam, double lr, double beta1, double beta2, \
                              double eps, double bias_correction1, double bias_correction2,   \
                              int next_tanh, int threads);

LCP_DECLARE_PASSES(float, f32)
LCP_DECLARE_PASSES(double, f64)

#undef LCP_DECLARE_PASSES

#ifdef __cplusplus
}
#endif

#endif /* LCP_NATIVE_DYNAMICS_H */
