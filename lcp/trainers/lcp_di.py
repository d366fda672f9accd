"""lcp-di: the least-control principle with a dynamic-inversion controller (docs/equations.md,
"Controlled dynamics" and "The least-control update")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lcp import native
from lcp.config import CONTROLLER_SOLVERS
from lcp.solvers import Solver
from lcp.trainers.base import Trainer, loss_gradient


class LeastControlTrainer(Trainer):
    """What lcp-di, lcp-kp and lcp-lf share: the controlled dynamics, u*, and the update.

    `controlled_step` is the one definition of the controlled Euler step; a subclass changes
    only `feedback` (how e' is formed and what drives v'). On CPU the ff and rnn models run the
    same step through the compiled backend (`lcp.native.ControlledStep`, on one flat state
    [v | v̂ | uᵢ | e]); elsewhere the definition itself runs, compiled by `torch.compile` where
    `Trainer.compiled` says so.
    """

    name = "lcp"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        self.k_i, self.k_p, self.alpha = cfg.k_i, cfg.k_p, cfg.alpha
        self.dt_v = cfg.dt / cfg.tau_v
        self.dt_u = cfg.dt / cfg.tau_u
        self.dt_e = cfg.dt / cfg.tau_e
        self.controller_solver = cfg.controller_solver
        self.last = None  # this batch's equilibrium, for post_update rules

    def feedback(self, f, v, e, u):
        """(e', what drives v'): lcp-di's e' = e + dt_e·((∂f/∂v)ᵀe − e + (∂D/∂v)ᵀu), with v
        driven by the old e."""
        e_next = e + self.dt_e * (f.transpose(v, e) - e + f.decode_transpose(v, u))
        return e_next, e

    def feedback_matrices(self):
        """The rule's matrices for the compiled backend (`lcp.native.ControlledStep`):
        lcp-di's e' = φ'(v) ⊙ (Σ e_out W_b + u W_D) uses the weights themselves."""
        return ("transpose", [b.weight.detach() for b in self.model.blocks],
                self.model.readout.weight.detach())

    def controlled_map(self, f, onehot, v, v_hat, u_i, e):
        """One explicit-Euler step of the controlled dynamics (docs/equations.md)."""
        g = loss_gradient(v_hat, onehot)
        u = self.k_i * u_i - self.k_p * g
        e_next, drive = self.feedback(f, v, e, u)
        v_next = v + self.dt_v * (f(v) - v + drive)
        v_hat_next = v_hat + self.dt_v * (f.decode(v) - v_hat + u)
        u_i_next = u_i + self.dt_u * (-g - self.alpha * u_i)
        return v_next, v_hat_next, u_i_next, e_next

    def controlled_step(self, h, onehot):
        """The map (v, v̂, uᵢ, e) → next state for the batch whose encoding is h."""
        f = self.model.bind(h)
        step = self.maybe_compiled(self.controlled_map)
        return lambda v, v_hat, u_i, e: step(f, onehot, v, v_hat, u_i, e)

    def controller(self):
        """The solver of the controlled phase: `--solver` (the paper's explicit-Euler dynamics
        iterated to their fixed point) unless `--controller_solver` names an accelerated one."""
        name = CONTROLLER_SOLVERS[self.controller_solver]
        return self.solver if name is None else Solver.from_config(self.cfg, name)

    @torch.no_grad()
    def controlled_equilibrium(self, h, y, num_classes):
        h = h.detach()
        onehot = F.one_hot(y, num_classes).to(h.dtype)
        solver = self.controller()
        plan = native.plan_for(self.model, h, self.kernels, *native.ControlledStep.passes)
        if plan is not None:
            kernel = native.ControlledStep(self, plan, onehot, ring=solver.keeps() + 1)
            (x,), stats = solver(kernel, (kernel.start(),), phase="controlled")
            v, v_hat, u_i, e = kernel.unpack(x)
        else:
            v = self.model.zero_state(h)
            zeros_out = h.new_zeros(h.shape[0], num_classes)
            state0 = (v, zeros_out, zeros_out.clone(), torch.zeros_like(v))
            (v, v_hat, u_i, e), stats = solver(
                self.controlled_step(h, onehot), state0, phase="controlled",
                pure=not self.model.decode_has_side_effects())
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
        v_tilde, update_stats = self.least_control_update(h, v, e, u, y, self.implicit_signal)
        self.last = {"h": h.detach(), "y": y, "v": v, "v_hat": v_hat, "u_i": u_i, "e": e,
                     "u": u, "v_tilde": v_tilde}
        out = self.solver_stats("controlled", stats)
        out.update(update_stats)
        return out


class DynamicInversionTrainer(LeastControlTrainer):
    name = "lcp-di"
