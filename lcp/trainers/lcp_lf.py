"""lcp-lf: least control with a fixed-rule linear feedback Q (N × C).

Controlled dynamics as lcp-di, but the controller reaches the network through Q:
e' = Q·u and v' = v + dt/τ_v·[f(h, v) − v + Q·u] (u from the current state). The update is
−(∂f/∂θ)ᵀ(e* ⊙ φ'(ṽ)) for f and E, −(∂D/∂θ)ᵀu* for D.

Q is not trained by the optimizer: after each batch's update, `post_update` runs a noisy phase
from the controlled equilibrium and moves Q by its local rule (SPEC §3, lcp-lf).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lcp.errors import DivergenceError, LcpError
from lcp.models import LinearReadoutModel, run_products
from lcp.trainers.base import loss_gradient
from lcp.trainers.lcp_di import LeastControlTrainer, relax_


class LinearFeedbackTrainer(LeastControlTrainer):
    name = "lcp-lf"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        if not isinstance(model, LinearReadoutModel):
            raise LcpError(f"lcp-lf needs a flat-state model (ff, rnn, conv-ff), not {model.name}")
        device = next(model.parameters()).device
        n, c = model.state_size, model.num_classes
        self.auxiliary.register_buffer("Q", torch.randn(n, c, device=device) / math.sqrt(c))

    @property
    def Q(self) -> torch.Tensor:
        return self.auxiliary.Q

    def controlled_step(self, h, onehot):
        model, Q = self.model, self.Q

        def step(v, v_hat, u_i, e):
            g = loss_gradient(v_hat, onehot)
            u = self.k_i * u_i - self.k_p * g
            e_next = u @ Q.t()
            v_next = v + self.dt_v * (model.implicit(h, v) - v + e_next)
            v_hat_next = v_hat + self.dt_v * (model.decode(v) - v_hat + u)
            u_i_next = u_i + self.dt_u * (-g - self.alpha * u_i)
            return v_next, v_hat_next, u_i_next, e_next

        return step

    def fused_rule(self):
        return "linear", self.Q.t()

    def fused_feedback_(self, plan, src, dst, u):
        """e' = Q·u; v' = v + dt_v·(f(h, v) − v + e')."""
        torch.mm(u, self.Q.t(), out=dst.e)
        relax_(plan.implicit_into(dst.v, add=dst.e, views=dst.v_out), src.v, self.dt_v)

    def implicit_signal(self, v_tilde, e_star):
        return -e_star * self.model.act_grad(v_tilde)

    @torch.no_grad()
    def post_update(self):
        """Q ← Q + dt/τ_Q · (mean_batch A − wd_Q·Q), A from the noisy phase of this batch."""
        if self.last is None:
            return
        A_mean, steps = self.noisy_phase(self.last)
        self.last_noisy_steps = steps
        self.Q.add_(self.cfg.dt / self.cfg.tau_Q * (A_mean - self.cfg.wd_Q * self.Q))

    @torch.no_grad()
    def noisy_phase(self, last: dict) -> tuple[torch.Tensor, int]:
        """The noisy controlled dynamics started at the controlled equilibrium; returns the batch
        mean of the accumulator A (N × C) and the number of steps.

        With T = timescale_factor, dt' = dt/T²:
            ε'  = ε + T/τ_ε·(−dt'·ε + √dt'·ξ)        v_fb = Q·u + σ·ε
            v'  = v + dt/τ_v·[f(h, v) − v + v_fb]    v̂' = v̂ + dt'/τ_v·[D(v) − v̂ + u]
            uᵢ' = uᵢ + dt'/τ_u·[−g − α·uᵢ]            A' = A − (1/σ²)·v_fb (u − u_ref)ᵀ
        The noise keeps the paper's solver from stopping early, so it runs solver_max_iter
        steps. A is summed over the batch directly (one N × C matmul per step) instead of
        keeping a B × N × C accumulator: the batch mean is the same.
        """
        if self.fused:
            return self._fused_noisy_phase(last)
        cfg, model, Q = self.cfg, self.model, self.Q
        T = cfg.timescale_factor
        dt_slow = cfg.dt / T**2
        h, y = last["h"], last["y"]
        onehot = F.one_hot(y, Q.shape[1]).to(h.dtype)
        v = last["v_tilde"]
        u_ref = last["u"]
        v_hat = model.decode(v) + u_ref
        u_i = last["u_i"]
        eps = torch.randn_like(v)
        A_sum = torch.zeros_like(Q)
        noise_scale = T / cfg.tau_eps
        for _ in range(cfg.solver_max_iter):
            g = loss_gradient(v_hat, onehot)
            u = self.k_i * u_i - self.k_p * g
            v_fb = u @ Q.t() + cfg.sigma * eps
            A_sum -= v_fb.t() @ (u - u_ref)
            eps = eps + noise_scale * (-dt_slow * eps + math.sqrt(dt_slow) * torch.randn_like(eps))
            v, v_hat, u_i = (
                v + cfg.dt / cfg.tau_v * (model.implicit(h, v) - v + v_fb),
                v_hat + dt_slow / cfg.tau_v * (model.decode(v) - v_hat + u),
                u_i + dt_slow / cfg.tau_u * (-g - self.alpha * u_i),
            )
        A_mean = A_sum / (cfg.sigma**2 * v.shape[0])
        if not torch.isfinite(A_mean).all():
            raise DivergenceError("lcp-lf: the noisy phase for Q diverged", phase="noisy")
        return A_mean, cfg.solver_max_iter

    # steps of the noisy phase whose contributions to A are summed by one matrix product
    A_CHUNK = 16

    @torch.no_grad()
    def _fused_noisy_phase(self, last: dict) -> tuple[torch.Tensor, int]:
        """`noisy_phase` with the fused kernels of `DynamicsPlan`: the same map and the same
        noise draws (one `randn` of v's shape to start, then one per step, as there), with
        h + biases and the step's constants prepared once and every update in place:

            ξ' = (T·√dt'/τ_ε)·ξ drawn scaled,  ε ← (1 − T·dt'/τ_ε)·ε + ξ'   (one kernel)
            v_fb = u Qᵀ + σ·ε  written into a block of `A_CHUNK` steps, with u − u_ref beside it,
            A −= Σ_chunk v_fbᵀ (u − u_ref)  as one product per block of steps.
        """
        cfg, model, Q = self.cfg, self.model, self.Q
        T = cfg.timescale_factor
        dt_slow = cfg.dt / T**2
        h, y = last["h"], last["y"]
        bsz, c = h.shape[0], Q.shape[1]
        n = Q.shape[0]
        onehot = F.one_hot(y, c).to(h.dtype)
        plan = model.dynamics_plan(h)
        v = last["v_tilde"].clone()
        u_ref = last["u"]
        v_hat = model.decode(v) + u_ref
        u_i = last["u_i"].clone()
        eps = torch.randn_like(v)
        xi = torch.empty_like(v)
        A_sum = torch.zeros_like(Q)
        Q_t = Q.t()
        chunk = max(1, min(self.A_CHUNK, cfg.solver_max_iter))
        fb_block = v.new_empty(chunk * bsz, n)  # v_fb of the block's steps, stacked
        du_block = v.new_empty(chunk * bsz, c)  # u − u_ref of the block's steps
        fb_rows = [fb_block[i * bsz:(i + 1) * bsz] for i in range(chunk)]
        du_rows = [du_block[i * bsz:(i + 1) * bsz] for i in range(chunk)]
        v_next = torch.empty_like(v)
        vh_next = torch.empty_like(v_hat)
        views = (plan.out_views(v), plan.out_views(v_next))
        k_i, k_p, sigma = self.k_i, self.k_p, cfg.sigma
        plain_u = k_p == 0 and k_i == 1
        # ε' = ε + T/τ_ε·(−dt'·ε + √dt'·ξ) = (1 − T·dt'/τ_ε)·ε + (T·√dt'/τ_ε)·ξ
        eps_keep = 1.0 - T / cfg.tau_eps * dt_slow
        noise_scale = T / cfg.tau_eps * math.sqrt(dt_slow)
        rate_v, rate_slow_v = cfg.dt / cfg.tau_v, dt_slow / cfg.tau_v
        # uᵢ' = uᵢ + dt'/τ_u·(−g − α·uᵢ), g = (softmax(v̂) − onehot)/B
        rate_u = dt_slow / cfg.tau_u
        target_term = onehot * (rate_u / bsz)
        keep_ui = 1.0 - rate_u * self.alpha
        soft_rate = -rate_u / bsz
        compiled = None
        lib = plan.native_kernels()
        if lib is not None:
            # each step: the noise, tanh and the blocks' products by PyTorch, the rest in one
            # compiled pass (`lcp.native`, lcp_noisy_step) — the same map and the same draws
            from lcp import native

            pass_fn = lib.get("noisy_step", v.dtype)
            p_v, forward_products = plan.forward_products()
            keep = (plan.h_b.contiguous(), Q_t.contiguous(), plan.W_D.contiguous(),
                    plan.b_D.contiguous(), onehot.contiguous(), u_ref.contiguous())
            h_b, q_t, w_d, b_d, onehot_c, u_ref_c = keep
            fixed = (plan.t.data_ptr(), p_v.data_ptr(), h_b.data_ptr(), q_t.data_ptr(),
                     w_d.data_ptr(), plan.r0, b_d.data_ptr(), onehot_c.data_ptr(),
                     u_ref_c.data_ptr())
            rates = (float(k_i), float(k_p), float(sigma), eps_keep, rate_v, rate_slow_v,
                     keep_ui, rate_u / bsz, soft_rate, native.threads_for(bsz, n))
            state_ptrs = (u_i.data_ptr(), eps.data_ptr(), xi.data_ptr())

            def compiled_step(v, v_next, v_hat, vh_next, fb_row, du_row):
                xi.normal_(0.0, noise_scale)
                torch.tanh(v, out=plan.t)
                run_products(forward_products)
                pass_fn(bsz, n, c, v.data_ptr(), v_next.data_ptr(), v_hat.data_ptr(),
                        vh_next.data_ptr(), *state_ptrs, *fixed, fb_row.data_ptr(),
                        du_row.data_ptr(), *rates)

            compiled = compiled_step
        filled = 0
        for _ in range(cfg.solver_max_iter):
            if compiled is not None:
                compiled(v, v_next, v_hat, vh_next, fb_rows[filled], du_rows[filled])
            else:
                soft = plan.softmax(v_hat)
                u = u_i if plain_u else (u_i * k_i if k_p == 0 else
                                         k_i * u_i - k_p * ((soft - onehot) / bsz))
                v_fb = torch.addmm(eps, u, Q_t, beta=sigma, out=fb_rows[filled])  # Q·u + σ·ε
                torch.sub(u, u_ref, out=du_rows[filled])
                torch.add(xi.normal_(0.0, noise_scale), eps, alpha=eps_keep, out=eps)
                plan.act(v)
                plan.implicit_into(v_next, add=v_fb, views=views[1])
                if rate_v != 1.0:
                    relax_(v_next, v, rate_v)
                relax_(plan.decode_into(vh_next, add=u), v_hat, rate_slow_v)
                torch.add(target_term, u_i, alpha=keep_ui, out=u_i).add_(soft, alpha=soft_rate)
                views = views[::-1]
            filled += 1
            if filled == chunk:  # A −= Σ v_fbᵀ (u − u_ref) over the block's steps and samples
                A_sum.addmm_(fb_block.t(), du_block, alpha=-1.0)
                filled = 0
            v, v_next = v_next, v
            v_hat, vh_next = vh_next, v_hat
        if filled:
            A_sum.addmm_(fb_block[:filled * bsz].t(), du_block[:filled * bsz], alpha=-1.0)
        A_mean = A_sum / (sigma**2 * bsz)
        if not torch.isfinite(A_mean).all():
            raise DivergenceError("lcp-lf: the noisy phase for Q diverged", phase="noisy")
        return A_mean, cfg.solver_max_iter
