"""lcp-di: the least-control principle with a dynamic-inversion controller.

The controlled state is (v, v̂, uᵢ, e), all zero at start. One explicit-Euler step, every
right-hand side using the old state (SPEC §3):

    g   = ∇_v̂ L(v̂, y)
    u   = k_i·uᵢ − k_p·g
    e'  = e  + dt/τ_e · [ (∂f/∂v)ᵀe − e + (∂D/∂v)ᵀu ]
    v'  = v  + dt/τ_v · [ f(h, v) − v + e ]
    v̂'  = v̂  + dt/τ_v · [ D(v) − v̂ + u ]
    uᵢ' = uᵢ + dt/τ_u · [ −g − α·uᵢ ]

At the controlled equilibrium, with u* = k_i·uᵢ* − k_p·∇L(v̂*) and ṽ = f(h, v*) + e*, the update
is −(∂f(h, v*)/∂θ)ᵀe* for f and E, and −(∂D(ṽ)/∂θ)ᵀu* for D.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lcp.trainers.base import Trainer, batch_norm_mean, loss_gradient


class LeastControlTrainer(Trainer):
    """What lcp-di, lcp-kp and lcp-lf share: the controlled solve, u*, and the update."""

    name = "lcp"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.k_i, self.k_p, self.alpha = cfg.k_i, cfg.k_p, cfg.alpha
        self.dt_v = cfg.dt / cfg.tau_v
        self.dt_u = cfg.dt / cfg.tau_u
        self.dt_e = cfg.dt / cfg.tau_e
        self.last = None  # this batch's equilibrium, for post_update rules

    def controlled_step(self, h, onehot):
        """The map (v, v̂, uᵢ, e) → next state; subclasses change the e / v rules."""
        model = self.model

        def step(v, v_hat, u_i, e):
            g = loss_gradient(v_hat, onehot)
            u = self.k_i * u_i - self.k_p * g
            f_v, jt_e = model.implicit_vjp(h, v, e)
            d_v, dt_u = model.decode_vjp(v, u)
            e_next = e + self.dt_e * (jt_e - e + dt_u)
            v_next = v + self.dt_v * (f_v - v + e)
            v_hat_next = v_hat + self.dt_v * (d_v - v_hat + u)
            u_i_next = u_i + self.dt_u * (-g - self.alpha * u_i)
            return v_next, v_hat_next, u_i_next, e_next

        return step

    @torch.no_grad()
    def controlled_equilibrium(self, h, y, num_classes):
        h = h.detach()
        onehot = F.one_hot(y, num_classes).to(h.dtype)
        v = self.model.zero_state(h)
        zeros_out = h.new_zeros(h.shape[0], num_classes)
        state0 = (v, zeros_out, zeros_out.clone(), torch.zeros_like(v))
        (v, v_hat, u_i, e), stats = self.solver(self.controlled_step(h, onehot), state0,
                                                phase="controlled")
        u = self.k_i * u_i - self.k_p * loss_gradient(v_hat, onehot)
        return v, v_hat, u_i, e, u, stats

    def implicit_signal(self, v_tilde, e_star):
        """What replaces the gradient reaching ṽ (lcp-di: −e*)."""
        return -e_star

    def compute_update(self, x, y):
        model = self.model
        h = model.encode(x)
        num_classes = model.readout.out_features
        v, v_hat, u_i, e, u, stats = self.controlled_equilibrium(h, y, num_classes)
        f_v = model.implicit(h, v)  # graph into f and, through h, into E
        v_tilde = f_v.detach() + e
        controlled_out = model.decode(v_tilde)  # graph into D only
        torch.autograd.backward([f_v, controlled_out],
                                [self.implicit_signal(v_tilde, e), -u])
        self.last = {"h": h.detach(), "y": y, "v": v, "v_hat": v_hat, "u_i": u_i, "e": e,
                     "u": u, "v_tilde": v_tilde}
        out = self.solver_stats("controlled", stats)
        out["u_norm"] = batch_norm_mean(u)
        out["e_norm"] = batch_norm_mean(e)
        out.update(self.output_stats(controlled_out.detach() + u, y, prefix="controlled_"))
        if self.cfg.track_free_output:
            with torch.no_grad():
                v_free, free = self.free_equilibrium(h)
                out.update(self.output_stats(model.decode(v_free), y))
            out.update(self.solver_stats("free", free))
        return out


class DynamicInversionTrainer(LeastControlTrainer):
    name = "lcp-di"
