/*
 * The typed bindings of the passes of dynamics.cpp: one function of tensors per pass (step,
 * free_step, noisy_step, ebd_residuals, ebd_descend), dispatched to the float32 or float64 pass on
 * the tensors' dtype. Before a pass runs, every tensor is checked: all of one float dtype
 * (float32 or float64, that of the first argument), on the CPU, contiguous (rows packed, as the
 * passes index them), and of the shape the pass reads or writes, its sizes (B rows, N state
 * columns, C classes) taken from the first tensors. A failed check raises TypeError (dtype,
 * device) or ValueError (shape, contiguity, a size or column start out of range) naming the pass,
 * the argument and what was expected; nothing is read or written then. Python passes tensors,
 * typed scalars (float, int, bool) and None where an input is optional, never a pointer.
 * The arithmetic is that of dynamics.cpp, unchanged; the GIL is released while a pass runs.
 */
#include <array>
#include <exception>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include "dynamics.h"

namespace py = pybind11;
using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

namespace {

const char *dtype_name(at::ScalarType type)
{
    switch (type) {
    case at::kFloat:
        return "float32";
    case at::kDouble:
        return "float64";
    case at::kHalf:
        return "float16";
    case at::kBFloat16:
        return "bfloat16";
    case at::kInt:
        return "int32";
    case at::kLong:
        return "int64";
    case at::kBool:
        return "bool";
    default:
        return c10::toString(type);
    }
}

/* The checks of one call: the dtype is the first tensor's (`first`), which must be float32 or
 * float64; every message names the pass and the argument. */
class Checker {
  public:
    Checker(const char *pass, const Tensor &first, const char *first_name)
        : pass_(pass), first_name_(first_name), dtype_(first.scalar_type())
    {
        TORCH_CHECK_TYPE(dtype_ == at::kFloat || dtype_ == at::kDouble, pass_, ": argument '",
                         first_name, "' must be a float32 or float64 tensor, got ",
                         dtype_name(dtype_));
    }

    at::ScalarType dtype() const { return dtype_; }

    /* dtype, device and contiguity; `dims` the number of dimensions expected */
    void common(const Tensor &x, const char *name, int64_t dims) const
    {
        TORCH_CHECK_TYPE(x.defined(), pass_, ": argument '", name, "' must be a tensor");
        TORCH_CHECK_TYPE(x.scalar_type() == dtype_, pass_, ": argument '", name, "' must be a ",
                         dtype_name(dtype_), " tensor (the dtype of '", first_name_, "'), got ",
                         dtype_name(x.scalar_type()));
        TORCH_CHECK_TYPE(x.device().is_cpu(), pass_, ": argument '", name,
                         "' must be a CPU tensor, got one on ", x.device());
        TORCH_CHECK_VALUE(x.dim() == dims, pass_, ": argument '", name, "' must have ", dims,
                          " dimension", dims == 1 ? "" : "s", ", got shape ", x.sizes());
        TORCH_CHECK_VALUE(x.is_contiguous(), pass_, ": argument '", name,
                          "' must be contiguous (rows packed, as .contiguous() gives), got shape ",
                          x.sizes(), " with strides ", x.strides());
    }

    /* a rows x cols matrix; `what` names the sizes, e.g. "B x N" */
    void matrix(const Tensor &x, const char *name, int64_t rows, int64_t cols,
                const char *what) const
    {
        common(x, name, 2);
        TORCH_CHECK_VALUE(x.size(0) == rows && x.size(1) == cols, pass_, ": argument '", name,
                          "' must have shape [", rows, ", ", cols, "] (", what, "), got ",
                          x.sizes());
    }

    void vector(const Tensor &x, const char *name, int64_t size, const char *what) const
    {
        common(x, name, 1);
        TORCH_CHECK_VALUE(x.size(0) == size, pass_, ": argument '", name, "' must have shape [",
                          size, "] (", what, "), got ", x.sizes());
    }

    /* a matrix whose columns give a size of the call: returns it (at least `least`) */
    int64_t width(const Tensor &x, const char *name, int64_t rows, const char *what,
                  int64_t least) const
    {
        common(x, name, 2);
        TORCH_CHECK_VALUE(x.size(0) == rows, pass_, ": argument '", name, "' must have ", rows,
                          " rows (", what, "), got shape ", x.sizes());
        TORCH_CHECK_VALUE(x.size(1) >= least, pass_, ": argument '", name, "' must have at least ",
                          least, " column", least == 1 ? "" : "s", ", got shape ", x.sizes());
        return x.size(1);
    }

    /* an operand of an ATen product (a view: any strides): dtype, device, 2 dimensions */
    void operand(const Tensor &x, const char *name) const
    {
        TORCH_CHECK_TYPE(x.defined() && x.scalar_type() == dtype_ && x.device().is_cpu(), pass_,
                         ": ", name, " must be a CPU ", dtype_name(dtype_), " tensor");
        TORCH_CHECK_VALUE(x.dim() == 2, pass_, ": ", name, " must have 2 dimensions, got shape ",
                          x.sizes());
    }

    /* a column where a block of the state starts: 0 <= start <= n */
    void start(int64_t start, const char *name, int64_t n) const
    {
        TORCH_CHECK_VALUE(start >= 0 && start <= n, pass_, ": argument '", name,
                          "' must be a column of the state, 0 to N = ", n, ", got ", start);
    }

    void threads(int64_t threads) const
    {
        TORCH_CHECK_VALUE(threads >= 1 && threads <= 1 << 16, pass_,
                          ": argument 'threads' must be from 1 to 65536, got ", threads);
    }

    /* an output the pass writes while it reads `input`: not the same memory */
    void apart(const Tensor &output, const char *name, const Tensor &input,
               const char *input_name) const
    {
        /* contiguous tensors (checked before): their bytes must not overlap */
        const char *out = static_cast<const char *>(output.data_ptr());
        const char *in = static_cast<const char *>(input.data_ptr());
        const bool overlap = out < in + input.nbytes() && in < out + output.nbytes();
        TORCH_CHECK_VALUE(!overlap, pass_, ": argument '", name,
                          "' must not be the memory of '", input_name, "'");
    }

  private:
    const char *pass_;
    const char *first_name_;
    at::ScalarType dtype_;
};

template <typename T> struct Passes;
template <> struct Passes<float> {
    static constexpr auto step = lcp_step_f32;
    static constexpr auto free_step = lcp_free_step_f32;
    static constexpr auto noisy_step = lcp_noisy_step_f32;
    static constexpr auto ebd_residuals = lcp_ebd_residuals_f32;
    static constexpr auto ebd_descend = lcp_ebd_descend_f32;
};
template <> struct Passes<double> {
    static constexpr auto step = lcp_step_f64;
    static constexpr auto free_step = lcp_free_step_f64;
    static constexpr auto noisy_step = lcp_noisy_step_f64;
    static constexpr auto ebd_residuals = lcp_ebd_residuals_f64;
    static constexpr auto ebd_descend = lcp_ebd_descend_f64;
};

template <typename T> T *ptr(const Tensor &x) { return x.data_ptr<T>(); }
template <typename T> T *ptr(const OptionalTensor &x)
{
    return x.has_value() ? x->data_ptr<T>() : nullptr;
}

/* --------------------------------------------------------------------- the controlled step */
template <typename T>
double run_step(int64_t B, int64_t N, int64_t C, int64_t S, const Tensor &src, const Tensor &dst,
                const Tensor &t, const Tensor &onehot, const Tensor &h_b, const Tensor &p_v,
                const OptionalTensor &p_e, const Tensor &w_d, int64_t r_d, const Tensor &b_d,
                const Tensor &m_u, int64_t r_u, double k_i, double k_p, double keep_ui,
                double target_rate, double soft_rate, bool plain_u, double dt_v, double dt_e,
                bool linear_e, const Tensor &per_sample, bool next_tanh, int64_t threads)
{
    return Passes<T>::step(B, N, C, S, ptr<T>(src), ptr<T>(dst), ptr<T>(t), ptr<T>(onehot),
                           ptr<T>(h_b), ptr<T>(p_v), ptr<T>(p_e), ptr<T>(w_d), (long)r_d,
                           ptr<T>(b_d), ptr<T>(m_u), (long)r_u, k_i, k_p, keep_ui, target_rate,
                           soft_rate, (int)plain_u, dt_v, dt_e, (int)linear_e,
                           ptr<T>(per_sample), (int)next_tanh, (int)threads);
}

double step(const Tensor &src, const Tensor &dst, const Tensor &t, const Tensor &onehot,
            const Tensor &h_b, const Tensor &p_v, const OptionalTensor &p_e, const Tensor &w_d,
            int64_t r_d, const Tensor &b_d, const Tensor &m_u, int64_t r_u, double k_i,
            double k_p, double keep_ui, double target_rate, double soft_rate, bool plain_u,
            double dt_v, double dt_e, bool linear_e, const Tensor &per_sample, bool next_tanh,
            int64_t threads)
{
    const Checker check("step", src, "src");
    check.common(src, "src", 2);
    const int64_t B = src.size(0), S = src.size(1);
    const int64_t N = check.width(t, "t", B, "B, the rows of 'src'", 1);
    const int64_t C = check.width(onehot, "onehot", B, "B, the rows of 'src'", 1);
    TORCH_CHECK_VALUE(S == 2 * N + 2 * C, "step: argument 'src' must have 2N + 2C = ",
                      2 * N + 2 * C, " columns ([v | v^ | u_i | e], N from 't', C from "
                      "'onehot'), got shape ", src.sizes());
    check.matrix(dst, "dst", B, S, "B x S, as 'src'");
    check.apart(dst, "dst", src, "src");
    check.matrix(h_b, "h_b", B, N, "B x N");
    check.matrix(p_v, "p_v", B, N, "B x N");
    if (p_e.has_value())
        check.matrix(*p_e, "p_e", B, N, "B x N");
    check.start(r_d, "r_d", N);
    check.matrix(w_d, "w_d", C, N - r_d, "C x (N - r_d)");
    check.vector(b_d, "b_d", C, "C");
    check.start(r_u, "r_u", N);
    check.matrix(m_u, "m_u", C, N - r_u, "C x (N - r_u)");
    check.vector(per_sample, "per_sample", B, "B");
    if (next_tanh) {  /* t is written while the state is read */
        check.apart(t, "t", src, "src");
        check.apart(t, "t", dst, "dst");
    }
    check.threads(threads);
    py::gil_scoped_release released;
    if (check.dtype() == at::kFloat)
        return run_step<float>(B, N, C, S, src, dst, t, onehot, h_b, p_v, p_e, w_d, r_d, b_d,
                               m_u, r_u, k_i, k_p, keep_ui, target_rate, soft_rate, plain_u,
                               dt_v, dt_e, linear_e, per_sample, next_tanh, threads);
    return run_step<double>(B, N, C, S, src, dst, t, onehot, h_b, p_v, p_e, w_d, r_d, b_d, m_u,
                            r_u, k_i, k_p, keep_ui, target_rate, soft_rate, plain_u, dt_v, dt_e,
                            linear_e, per_sample, next_tanh, threads);
}

/* -------------------------------------------------------------------------- the free step */
double free_step(const Tensor &src, const Tensor &dst, const Tensor &h_b, const Tensor &p_v,
                 const Tensor &per_sample, int64_t threads)
{
    const Checker check("free_step", src, "src");
    check.common(src, "src", 2);
    const int64_t B = src.size(0), N = src.size(1);
    check.matrix(dst, "dst", B, N, "B x N, as 'src'");
    check.apart(dst, "dst", src, "src");
    check.matrix(h_b, "h_b", B, N, "B x N");
    check.matrix(p_v, "p_v", B, N, "B x N");
    check.vector(per_sample, "per_sample", B, "B");
    check.threads(threads);
    py::gil_scoped_release released;
    if (check.dtype() == at::kFloat)
        return Passes<float>::free_step(B, N, ptr<float>(src), ptr<float>(dst), ptr<float>(h_b),
                                        ptr<float>(p_v), ptr<float>(per_sample), (int)threads);
    return Passes<double>::free_step(B, N, ptr<double>(src), ptr<double>(dst), ptr<double>(h_b),
                                     ptr<double>(p_v), ptr<double>(per_sample), (int)threads);
}

/* ------------------------------------------------------------------ lcp-lf's noisy step */
template <typename T>
void run_noisy_step(int64_t B, int64_t N, int64_t C, const Tensor &v, const Tensor &v_next,
                    const Tensor &v_hat, const Tensor &v_hat_next, const Tensor &u_i,
                    const Tensor &eps, const Tensor &xi, const Tensor &t, const Tensor &p_v,
                    const Tensor &h_b, const Tensor &q_t, const Tensor &w_d, int64_t r_d,
                    const Tensor &b_d, const Tensor &onehot, const Tensor &u_ref,
                    const Tensor &fb, const Tensor &du, double k_i, double k_p, double sigma,
                    double eps_keep, double rate_v, double rate_slow_v, double keep_ui,
                    double target_rate, double soft_rate, int64_t threads, bool next_tanh,
                    bool counter_noise, int64_t noise_key, double noise_scale,
                    int64_t noise_step)
{
    Passes<T>::noisy_step(B, N, C, ptr<T>(v), ptr<T>(v_next), ptr<T>(v_hat), ptr<T>(v_hat_next),
                          ptr<T>(u_i), ptr<T>(eps), ptr<T>(xi), ptr<T>(t), ptr<T>(p_v),
                          ptr<T>(h_b), ptr<T>(q_t), ptr<T>(w_d), (long)r_d, ptr<T>(b_d),
                          ptr<T>(onehot), ptr<T>(u_ref), ptr<T>(fb), ptr<T>(du), k_i, k_p, sigma,
                          eps_keep, rate_v, rate_slow_v, keep_ui, target_rate, soft_rate,
                          (int)next_tanh, (int)counter_noise, noise_key, (long)noise_step,
                          noise_scale, (int)threads);
}

/* The checks of a noisy step's tensors (noisy_step, noisy_steps): fb and du hold `blocks`
 * blocks of B rows (one per step of a block of steps). Returns {B, N, C}. */
std::array<int64_t, 3> check_noisy(const Checker &check, const Tensor &v, const Tensor &v_next,
                                   const Tensor &v_hat, const Tensor &v_hat_next,
                                   const Tensor &u_i, const Tensor &eps, const Tensor &xi,
                                   const Tensor &t, const Tensor &p_v, const Tensor &h_b,
                                   const Tensor &q_t, const Tensor &w_d, int64_t r_d,
                                   const Tensor &b_d, const Tensor &onehot, const Tensor &u_ref,
                                   const Tensor &fb, const Tensor &du, int64_t blocks,
                                   int64_t threads)
{
    check.common(v, "v", 2);
    const int64_t B = v.size(0), N = v.size(1);
    const int64_t C = check.width(v_hat, "v_hat", B, "B, the rows of 'v'", 1);
    check.matrix(v_next, "v_next", B, N, "B x N, as 'v'");
    check.apart(v_next, "v_next", v, "v");
    check.matrix(v_hat_next, "v_hat_next", B, C, "B x C, as 'v_hat'");
    check.apart(v_hat_next, "v_hat_next", v_hat, "v_hat");
    check.matrix(u_i, "u_i", B, C, "B x C");
    check.matrix(eps, "eps", B, N, "B x N");
    check.matrix(xi, "xi", B, N, "B x N");
    check.matrix(t, "t", B, N, "B x N");
    check.apart(t, "t", v_next, "v_next");
    check.apart(t, "t", v, "v");
    check.matrix(p_v, "p_v", B, N, "B x N");
    check.matrix(h_b, "h_b", B, N, "B x N");
    check.matrix(q_t, "q_t", C, N, "C x N");
    check.start(r_d, "r_d", N);
    check.matrix(w_d, "w_d", C, N - r_d, "C x (N - r_d)");
    check.vector(b_d, "b_d", C, "C");
    check.matrix(onehot, "onehot", B, C, "B x C");
    check.matrix(u_ref, "u_ref", B, C, "B x C");
    check.matrix(fb, "fb", blocks * B, N, blocks == 1 ? "B x N" : "(block x B) x N");
    check.matrix(du, "du", blocks * B, C, blocks == 1 ? "B x C" : "(block x B) x C");
    check.threads(threads);
    return {B, N, C};
}

void noisy_step(const Tensor &v, const Tensor &v_next, const Tensor &v_hat,
                const Tensor &v_hat_next, const Tensor &u_i, const Tensor &eps, const Tensor &xi,
                const Tensor &t, const Tensor &p_v, const Tensor &h_b, const Tensor &q_t,
                const Tensor &w_d, int64_t r_d, const Tensor &b_d, const Tensor &onehot,
                const Tensor &u_ref, const Tensor &fb, const Tensor &du, double k_i, double k_p,
                double sigma, double eps_keep, double rate_v, double rate_slow_v, double keep_ui,
                double target_rate, double soft_rate, int64_t threads, bool next_tanh,
                bool counter_noise, int64_t noise_key, double noise_scale, int64_t noise_step)
{
    const Checker check("noisy_step", v, "v");
    const auto [B, N, C] = check_noisy(check, v, v_next, v_hat, v_hat_next, u_i, eps, xi, t, p_v,
                                       h_b, q_t, w_d, r_d, b_d, onehot, u_ref, fb, du, 1,
                                       threads);
    TORCH_CHECK_VALUE(noise_step >= 0, "noisy_step: argument 'noise_step' must be >= 0, got ",
                      noise_step);
    py::gil_scoped_release released;
    if (check.dtype() == at::kFloat)
        run_noisy_step<float>(B, N, C, v, v_next, v_hat, v_hat_next, u_i, eps, xi, t, p_v, h_b,
                              q_t, w_d, r_d, b_d, onehot, u_ref, fb, du, k_i, k_p, sigma,
                              eps_keep, rate_v, rate_slow_v, keep_ui, target_rate, soft_rate,
                              threads, next_tanh, counter_noise, noise_key, noise_scale,
                              noise_step);
    else
        run_noisy_step<double>(B, N, C, v, v_next, v_hat, v_hat_next, u_i, eps, xi, t, p_v, h_b,
                               q_t, w_d, r_d, b_d, onehot, u_ref, fb, du, k_i, k_p, sigma,
                               eps_keep, rate_v, rate_slow_v, keep_ui, target_rate, soft_rate,
                               threads, next_tanh, counter_noise, noise_key, noise_scale,
                               noise_step);
}

/* A product of a step's products (lcp.native.run_products): out = a b, or out += a b */
using Product = std::tuple<Tensor, Tensor, Tensor, bool>;

template <typename T>
void run_noisy_steps(int64_t B, int64_t N, int64_t C, int64_t first, int64_t steps,
                     const std::vector<Product> &forward, const Tensor &v, const Tensor &v_next,
                     const Tensor &v_hat, const Tensor &v_hat_next, const Tensor &u_i,
                     const Tensor &eps, Tensor xi, const Tensor &t, const Tensor &p_v,
                     const Tensor &h_b, const Tensor &q_t, const Tensor &w_d, int64_t r_d,
                     const Tensor &b_d, const Tensor &onehot, const Tensor &u_ref,
                     const Tensor &fb, const Tensor &du, Tensor A_sum_t, int64_t chunk, double k_i,
                     double k_p, double sigma, double eps_keep, double rate_v, double rate_slow_v,
                     double keep_ui, double target_rate, double soft_rate, int64_t threads,
                     bool next_tanh, bool counter_noise, int64_t noise_key, double noise_scale)
{
    /* step n reads the buffers of its parity and writes the others (NoisySteps.step's order),
     * its v_fb and u - u_ref into block n % chunk of fb and du */
    const Tensor v_buf[2] = {v, v_next}, vh_buf[2] = {v_hat, v_hat_next};
    std::vector<Tensor> fb_block, du_block;
    for (int64_t k = 0; k < chunk; ++k) {
        fb_block.push_back(fb.narrow(0, k * B, B));
        du_block.push_back(du.narrow(0, k * B, B));
    }
    const Tensor du_t = du.t();
    for (int64_t n = first; n < first + steps; ++n) {
        if (!counter_noise)
            xi.normal_(0.0, noise_scale);
        for (auto [a, b, out, overwrite] : forward) {  /* run_products's calls */
            if (overwrite)
                at::mm_out(out, a, b);
            else
                out.addmm_(a, b);
        }
        const int p = (int)(n % 2);
        const int64_t k = n % chunk;
        run_noisy_step<T>(B, N, C, v_buf[p], v_buf[1 - p], vh_buf[p], vh_buf[1 - p], u_i, eps,
                          xi, t, p_v, h_b, q_t, w_d, r_d, b_d, onehot, u_ref, fb_block[k],
                          du_block[k], k_i, k_p, sigma, eps_keep, rate_v, rate_slow_v, keep_ui,
                          target_rate, soft_rate, threads, next_tanh, counter_noise, noise_key,
                          noise_scale, n);
        if ((n + 1) % chunk == 0)  /* a block of steps ended: A^T -= (u - u_ref)^T v_fb */
            A_sum_t.addmm_(du_t, fb, 1.0, -1.0);
    }
}

/* Steps first .. first + steps - 1 of the noisy phase in one call (NoisySteps.run): per step
 * the noise draw (PyTorch's generator, unless counter_noise), the forward products, the pass
 * into block row n % chunk of fb and du, and A_sum_t -= du^T fb after each block of chunk steps;
 * the same ATen calls and pass as NoisySteps.step, without a return to Python per step. */
void noisy_steps(int64_t first, int64_t steps, const std::vector<Product> &forward,
                 const Tensor &v, const Tensor &v_next, const Tensor &v_hat,
                 const Tensor &v_hat_next, const Tensor &u_i, const Tensor &eps, const Tensor &xi,
                 const Tensor &t, const Tensor &p_v, const Tensor &h_b, const Tensor &q_t,
                 const Tensor &w_d, int64_t r_d, const Tensor &b_d, const Tensor &onehot,
                 const Tensor &u_ref, const Tensor &fb, const Tensor &du, const Tensor &A_sum_t,
                 int64_t chunk, double k_i, double k_p, double sigma, double eps_keep,
                 double rate_v, double rate_slow_v, double keep_ui, double target_rate,
                 double soft_rate, int64_t threads, bool next_tanh, bool counter_noise,
                 int64_t noise_key, double noise_scale)
{
    const Checker check("noisy_steps", v, "v");
    TORCH_CHECK_VALUE(chunk >= 1, "noisy_steps: argument 'chunk' must be >= 1, got ", chunk);
    TORCH_CHECK_VALUE(first >= 0 && steps >= 0, "noisy_steps: arguments 'first' and 'steps' "
                      "must be >= 0, got ", first, " and ", steps);
    const auto [B, N, C] = check_noisy(check, v, v_next, v_hat, v_hat_next, u_i, eps, xi, t, p_v,
                                       h_b, q_t, w_d, r_d, b_d, onehot, u_ref, fb, du, chunk,
                                       threads);
    check.matrix(A_sum_t, "A_sum_t", C, N, "C x N");
    for (const auto &[a, b, out, overwrite] : forward) {  /* ATen checks the products' shapes */
        check.operand(a, "forward's a");
        check.operand(b, "forward's b");
        check.operand(out, "forward's out");
    }
    const c10::NoGradGuard no_grad;
    py::gil_scoped_release released;
    if (check.dtype() == at::kFloat)
        run_noisy_steps<float>(B, N, C, first, steps, forward, v, v_next, v_hat, v_hat_next,
                               u_i, eps, xi, t, p_v, h_b, q_t, w_d, r_d, b_d, onehot, u_ref, fb,
                               du, A_sum_t, chunk, k_i, k_p, sigma, eps_keep, rate_v, rate_slow_v,
                               keep_ui, target_rate, soft_rate, threads, next_tanh,
                               counter_noise, noise_key, noise_scale);
    else
        run_noisy_steps<double>(B, N, C, first, steps, forward, v, v_next, v_hat, v_hat_next,
                                u_i, eps, xi, t, p_v, h_b, q_t, w_d, r_d, b_d, onehot, u_ref, fb,
                                du, A_sum_t, chunk, k_i, k_p, sigma, eps_keep, rate_v, rate_slow_v,
                                keep_ui, target_rate, soft_rate, threads, next_tanh,
                                counter_noise, noise_key, noise_scale);
}

/* -------------------------------------------------------------------- lcp-ebd's descent */
void ebd_residuals(const Tensor &x, const Tensor &t, const Tensor &p_v, const Tensor &h_b,
                   const Tensor &w_d, int64_t r_d0, const Tensor &b_d, const Tensor &r_f,
                   const Tensor &r_d, int64_t threads)
{
    const Checker check("ebd_residuals", x, "x");
    check.common(x, "x", 2);
    const int64_t B = x.size(0);
    const int64_t N = check.width(t, "t", B, "B, the rows of 'x'", 1);
    const int64_t C = x.size(1) - N;
    TORCH_CHECK_VALUE(C >= 1, "ebd_residuals: argument 'x' must have N + C columns ([v | v^], N "
                      "from 't', C >= 1), got shape ", x.sizes());
    check.matrix(p_v, "p_v", B, N, "B x N");
    check.matrix(h_b, "h_b", B, N, "B x N");
    check.start(r_d0, "r_d0", N);
    check.matrix(w_d, "w_d", C, N - r_d0, "C x (N - r_d0)");
    check.vector(b_d, "b_d", C, "C");
    check.matrix(r_f, "r_f", B, N, "B x N");
    check.matrix(r_d, "r_d", B, C, "B x C");
    check.threads(threads);
    py::gil_scoped_release released;
    if (check.dtype() == at::kFloat)
        Passes<float>::ebd_residuals(B, N, C, ptr<float>(x), ptr<float>(t), ptr<float>(p_v),
                                     ptr<float>(h_b), ptr<float>(w_d), (long)r_d0,
                                     ptr<float>(b_d), ptr<float>(r_f), ptr<float>(r_d),
                                     (int)threads);
    else
        Passes<double>::ebd_residuals(B, N, C, ptr<double>(x), ptr<double>(t), ptr<double>(p_v),
                                      ptr<double>(h_b), ptr<double>(w_d), (long)r_d0,
                                      ptr<double>(b_d), ptr<double>(r_f), ptr<double>(r_d),
                                      (int)threads);
}

template <typename T>
void run_ebd_descend(int64_t B, int64_t N, int64_t C, const Tensor &x, const Tensor &t,
                     const Tensor &r_f, const Tensor &r_d, const OptionalTensor &p_e,
                     const Tensor &w_d, int64_t r_d0, const Tensor &onehot, double inv_alpha_b,
                     const Tensor &exp_avg, const Tensor &exp_avg_sq, bool adam, double lr,
                     double beta1, double beta2, double eps, double bias_correction1,
                     double bias_correction2, bool next_tanh, int64_t threads)
{
    Passes<T>::ebd_descend(B, N, C, ptr<T>(x), ptr<T>(t), ptr<T>(r_f), ptr<T>(r_d), ptr<T>(p_e),
                           ptr<T>(w_d), (long)r_d0, ptr<T>(onehot), inv_alpha_b, ptr<T>(exp_avg),
                           ptr<T>(exp_avg_sq), (int)adam, lr, beta1, beta2, eps, bias_correction1,
                           bias_correction2, (int)next_tanh, (int)threads);
}

void ebd_descend(const Tensor &x, const Tensor &t, const Tensor &r_f, const Tensor &r_d,
                 const OptionalTensor &p_e, const Tensor &w_d, int64_t r_d0,
                 const Tensor &onehot, double inv_alpha_b, const Tensor &exp_avg,
                 const Tensor &exp_avg_sq, bool adam, double lr, double beta1, double beta2,
                 double eps, double bias_correction1, double bias_correction2, bool next_tanh,
                 int64_t threads)
{
    const Checker check("ebd_descend", x, "x");
    check.common(x, "x", 2);
    const int64_t B = x.size(0), S = x.size(1);
    const int64_t N = check.width(t, "t", B, "B, the rows of 'x'", 1);
    const int64_t C = S - N;
    TORCH_CHECK_VALUE(C >= 1, "ebd_descend: argument 'x' must have N + C columns ([v | v^], N "
                      "from 't', C >= 1), got shape ", x.sizes());
    check.matrix(r_f, "r_f", B, N, "B x N");
    check.matrix(r_d, "r_d", B, C, "B x C");
    if (p_e.has_value())
        check.matrix(*p_e, "p_e", B, N, "B x N");
    check.start(r_d0, "r_d0", N);
    check.matrix(w_d, "w_d", C, N - r_d0, "C x (N - r_d0)");
    check.matrix(onehot, "onehot", B, C, "B x C");
    check.matrix(exp_avg, "exp_avg", B, S, "B x (N + C), as 'x'");
    check.matrix(exp_avg_sq, "exp_avg_sq", B, S, "B x (N + C), as 'x'");
    if (next_tanh)  /* t is written while x is read and written */
        check.apart(t, "t", x, "x");
    check.threads(threads);
    py::gil_scoped_release released;
    if (check.dtype() == at::kFloat)
        run_ebd_descend<float>(B, N, C, x, t, r_f, r_d, p_e, w_d, r_d0, onehot, inv_alpha_b,
                               exp_avg, exp_avg_sq, adam, lr, beta1, beta2, eps,
                               bias_correction1, bias_correction2, next_tanh, threads);
    else
        run_ebd_descend<double>(B, N, C, x, t, r_f, r_d, p_e, w_d, r_d0, onehot, inv_alpha_b,
                                exp_avg, exp_avg_sq, adam, lr, beta1, beta2, eps,
                                bias_correction1, bias_correction2, next_tanh, threads);
}

} // namespace

/* The module's name is fixed (not TORCH_EXTENSION_NAME): the loader imports a cached copy of the
 * built file under this name, whatever folder it was built in. */
PYBIND11_MODULE(lcp_dynamics, m)
{
    m.doc() = "The passes of lcp/native/dynamics.cpp as typed, checked functions of tensors.";
    py::register_local_exception_translator([](std::exception_ptr error) {
        try {
            if (error)
                std::rethrow_exception(error);
        } catch (const c10::TypeError &e) {
            PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
        } catch (const c10::ValueError &e) {
            PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
        } catch (const c10::Error &e) {
            PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
        }
    });
    m.def("step", &step,
          "One controlled step [v | v^ | u_i | e] from src into dst (LeastControlTrainer."
          "controlled_map); writes per_sample's stopping errors and returns their maximum; "
          "with next_tanh, t becomes tanh(v of dst).",
          py::arg("src"), py::arg("dst"), py::arg("t"), py::arg("onehot"), py::arg("h_b"),
          py::arg("p_v"), py::arg("p_e").none(true), py::arg("w_d"), py::arg("r_d"),
          py::arg("b_d"), py::arg("m_u"), py::arg("r_u"), py::arg("k_i"), py::arg("k_p"),
          py::arg("keep_ui"), py::arg("target_rate"), py::arg("soft_rate"), py::arg("plain_u"),
          py::arg("dt_v"), py::arg("dt_e"), py::arg("linear_e"), py::arg("per_sample"),
          py::arg("next_tanh"), py::arg("threads"));
    m.def("free_step", &free_step,
          "One free step v' = h_b + p_v from src into dst; writes per_sample's stopping errors "
          "and returns their maximum.",
          py::arg("src"), py::arg("dst"), py::arg("h_b"), py::arg("p_v"), py::arg("per_sample"),
          py::arg("threads"));
    m.def("noisy_step", &noisy_step,
          "One step of lcp-lf's noisy phase (LinearFeedbackTrainer.noisy_step); u_i and eps in "
          "place, v_fb into fb and u - u_ref into du; with next_tanh, t becomes tanh(v_next). "
          "The step's noise is xi (drawn scaled), or "
          "with counter_noise noise_scale times lcp.noise.counter_normal(noise_key, "
          "noise_step) computed in the pass (xi unread).",
          py::arg("v"), py::arg("v_next"), py::arg("v_hat"), py::arg("v_hat_next"),
          py::arg("u_i"), py::arg("eps"), py::arg("xi"), py::arg("t"), py::arg("p_v"),
          py::arg("h_b"), py::arg("q_t"), py::arg("w_d"), py::arg("r_d"), py::arg("b_d"),
          py::arg("onehot"), py::arg("u_ref"), py::arg("fb"), py::arg("du"), py::arg("k_i"),
          py::arg("k_p"), py::arg("sigma"), py::arg("eps_keep"), py::arg("rate_v"),
          py::arg("rate_slow_v"), py::arg("keep_ui"), py::arg("target_rate"),
          py::arg("soft_rate"), py::arg("threads"), py::arg("next_tanh"), py::arg("counter_noise"),
          py::arg("noise_key"), py::arg("noise_scale"), py::arg("noise_step"));
    m.def("noisy_steps", &noisy_steps,
          "Steps first .. first + steps - 1 of lcp-lf's noisy phase (NoisySteps.run): per step "
          "the draw into xi (unless counter_noise), the forward products, noisy_step's pass "
          "(fb, du: chunk blocks of B rows, step n in block n % chunk; v, v^ read from the "
          "buffers of n's parity) and A_sum_t -= du^T fb after each block of chunk steps.",
          py::arg("first"), py::arg("steps"), py::arg("forward"), py::arg("v"), py::arg("v_next"),
          py::arg("v_hat"), py::arg("v_hat_next"), py::arg("u_i"), py::arg("eps"), py::arg("xi"),
          py::arg("t"), py::arg("p_v"), py::arg("h_b"), py::arg("q_t"), py::arg("w_d"),
          py::arg("r_d"), py::arg("b_d"), py::arg("onehot"), py::arg("u_ref"), py::arg("fb"),
          py::arg("du"), py::arg("A_sum_t"), py::arg("chunk"), py::arg("k_i"), py::arg("k_p"),
          py::arg("sigma"), py::arg("eps_keep"), py::arg("rate_v"), py::arg("rate_slow_v"),
          py::arg("keep_ui"), py::arg("target_rate"), py::arg("soft_rate"), py::arg("threads"),
          py::arg("next_tanh"), py::arg("counter_noise"), py::arg("noise_key"),
          py::arg("noise_scale"));
    m.def("ebd_residuals", &ebd_residuals,
          "lcp-ebd's residuals r_f = v - f(v), r_d = v^ - D(v) of x = [v | v^].",
          py::arg("x"), py::arg("t"), py::arg("p_v"), py::arg("h_b"), py::arg("w_d"),
          py::arg("r_d0"), py::arg("b_d"), py::arg("r_f"), py::arg("r_d"), py::arg("threads"));
    m.def("ebd_descend", &ebd_descend,
          "lcp-ebd's energy gradient and one Adam or gradient-descent step on x in place; with "
          "next_tanh, t becomes tanh(v) of the new x.",
          py::arg("x"), py::arg("t"), py::arg("r_f"), py::arg("r_d"), py::arg("p_e").none(true),
          py::arg("w_d"), py::arg("r_d0"), py::arg("onehot"), py::arg("inv_alpha_b"),
          py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("adam"), py::arg("lr"),
          py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("bias_correction1"),
          py::arg("bias_correction2"), py::arg("next_tanh"), py::arg("threads"));
}
