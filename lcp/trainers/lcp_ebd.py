"""lcp-ebd: least control found by minimising an energy (SPEC §3, lcp-ebd).

Leaf states v (N) and v̂ (C) start at zero — or, with `ff_init`, at the free equilibrium and
D(v*) — and Adam (`ebd_optim=adam`) or plain gradient descent (`gd`) at `ebd_lr` minimises, for
exactly `solver_max_iter` steps and with h held fixed,

    E(v, v̂) = ½·Σ‖v − f(h, v)‖² + ½·Σ‖v̂ − D(v)‖² + (1/α)·L(v̂, y).

Its gradient is taken in closed form (∂E/∂v = r_f − Jᵀr_f − (∂D/∂v)ᵀr_D, ∂E/∂v̂ = r_D + ∇L/α
with r_f = v − f(h, v), r_D = v̂ − D(v)), so no graph is built per step. Then e* = v* − f(h, v*),
u* = v̂* − D(v*), and the update is the lcp-di rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lcp.errors import DivergenceError
from lcp.trainers.base import Trainer, batch_norm_mean, loss_gradient


class EnergyBasedTrainer(Trainer):
    name = "lcp-ebd"

    def energy_minimum(self, h, y):
        cfg, model = self.cfg, self.model
        h = h.detach()
        num_classes = model.readout.out_features
        onehot = F.one_hot(y, num_classes).to(h.dtype)
        stats = {}
        with torch.no_grad():
            if cfg.ff_init:
                v0, free = self.free_equilibrium(h)
                stats.update(self.solver_stats("free", free))
                v_hat0 = model.decode(v0)
            else:
                v0 = model.zero_state(h)
                v_hat0 = h.new_zeros(h.shape[0], num_classes)
        v = v0.clone().requires_grad_(True)
        v_hat = v_hat0.clone().requires_grad_(True)
        if cfg.ebd_optim == "adam":
            opt = torch.optim.Adam([v, v_hat], lr=cfg.ebd_lr)
        else:
            opt = torch.optim.SGD([v, v_hat], lr=cfg.ebd_lr)
        inv_alpha = 1.0 / cfg.alpha
        with torch.no_grad():
            for _ in range(cfg.solver_max_iter):
                r_f = v - model.implicit(h, v)
                r_d = v_hat - model.decode(v)
                v.grad = r_f - model.implicit_transpose(h, v, r_f) - model.decode_transpose(v, r_d)
                v_hat.grad = r_d + inv_alpha * loss_gradient(v_hat, onehot)
                opt.step()
            r_f = v - model.implicit(h, v)
            r_d = v_hat - model.decode(v)
            energy = (0.5 * r_f.pow(2).sum() + 0.5 * r_d.pow(2).sum()
                      + inv_alpha * F.cross_entropy(v_hat, y)).item()
        if energy != energy or energy == float("inf"):
            raise DivergenceError("lcp-ebd: the energy minimisation diverged; lower ebd_lr",
                                  phase="energy")
        stats.update({"energy/iterations": float(cfg.solver_max_iter), "energy/value": energy})
        return v.detach(), v_hat.detach(), stats

    def compute_update(self, x, y):
        model = self.model
        h = model.encode(x)
        v, v_hat, stats = self.energy_minimum(h, y)
        f_v = model.implicit(h, v)
        e = v - f_v.detach()
        u = v_hat - model.decode(v).detach()
        v_tilde = f_v.detach() + e  # = v*
        controlled_out = model.decode(v_tilde)
        torch.autograd.backward([f_v, controlled_out], [-e, -u])
        stats["u_norm"] = batch_norm_mean(u)
        stats["e_norm"] = batch_norm_mean(e)
        stats.update(self.output_stats(controlled_out.detach() + u, y, prefix="controlled_"))
        if self.cfg.track_free_output:
            with torch.no_grad():
                v_free, free = self.free_equilibrium(h)
                stats.update(self.output_stats(model.decode(v_free), y))
            stats.update(self.solver_stats("free", free))
        return stats
