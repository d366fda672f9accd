"""lcp-ebd: least control found by minimising an energy over the leaf states (v, v̂) for
exactly `solver_max_iter` steps of Adam or gradient descent (docs/equations.md, "lcp-ebd").

The energy's gradient is taken in closed form (`energy_gradient`), so no graph is built per
step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lcp import native
from lcp.errors import DivergenceError
from lcp.trainers.base import Trainer, loss_gradient


class EnergyBasedTrainer(Trainer):
    name = "lcp-ebd"

    @staticmethod
    def residuals(f, v, v_hat):
        """(r_f, r_D) = (v − f(h, v), v̂ − D(v)), the residuals the energy squares."""
        return v - f(v), v_hat - f.decode(v)

    def energy_gradient(self, f, onehot, v, v_hat):
        """(∂E/∂v, ∂E/∂v̂) = (r_f − (∂f/∂v)ᵀr_f − (∂D/∂v)ᵀr_D, r_D + ∇L(v̂)/α), with the
        `residuals` r_f = v − f(h, v) and r_D = v̂ − D(v)."""
        r_f, r_d = self.residuals(f, v, v_hat)
        grad_v = r_f - f.transpose(v, r_f) - f.decode_transpose(v, r_d)
        return grad_v, r_d + (1.0 / self.cfg.alpha) * loss_gradient(v_hat, onehot)

    def energy_minimum(self, h, y):
        cfg, model = self.cfg, self.model
        h = h.detach()
        onehot = F.one_hot(y, model.readout.out_features).to(h.dtype)
        stats = {}
        with torch.no_grad():
            if cfg.ff_init:
                v0, free = self.free_equilibrium(h)
                stats.update(self.solver_stats("free", free))
                v_hat0 = model.decode(v0)
            else:
                v0 = model.zero_state(h)
                v_hat0 = h.new_zeros(h.shape[0], onehot.shape[1])
            plan = native.plan_for(model, h, self.kernels, *native.EnergyDescent.passes)
            if plan is not None:
                x = torch.cat([v0, v_hat0], dim=1)
                native.energy_descent(plan, x, onehot, 1.0 / (cfg.alpha * h.shape[0]),
                                      cfg.solver_max_iter, cfg.ebd_optim == "adam", cfg.ebd_lr)
                v, v_hat = x[:, :v0.shape[1]].contiguous(), x[:, v0.shape[1]:].contiguous()
            else:
                v, v_hat = v0.clone(), v_hat0.clone()
                optimizer = (torch.optim.Adam if cfg.ebd_optim == "adam"
                             else torch.optim.SGD)([v, v_hat], lr=cfg.ebd_lr)
                f = model.bind(h)
                gradient = self.maybe_compiled(self.energy_gradient)
                for _ in range(cfg.solver_max_iter):
                    v.grad, v_hat.grad = gradient(f, onehot, v, v_hat)
                    optimizer.step()
            r_f = v - model.implicit(h, v)
            r_d = v_hat - model.decode(v)
            energy = (0.5 * r_f.pow(2).sum() + 0.5 * r_d.pow(2).sum()
                      + (1.0 / cfg.alpha) * F.cross_entropy(v_hat, y)).item()
        if energy != energy or energy == float("inf"):
            raise DivergenceError("lcp-ebd: the energy minimisation diverged; lower ebd_lr",
                                  phase="energy")
        stats.update({"energy/iterations": float(cfg.solver_max_iter), "energy/value": energy})
        return v, v_hat, stats

    def compute_update(self, x, y):
        model = self.model
        h = model.encode(x)
        v, v_hat, stats = self.energy_minimum(h, y)
        with torch.no_grad():
            e = v - model.implicit(h, v)  # so that ṽ = f(h, v*) + e* = v*
            u = v_hat - model.decode(v)
        _, update_stats = self.least_control_update(h, v, e, u, y, lambda v_tilde, e: -e)
        stats.update(update_stats)
        return stats
