"""The baselines: `bp` (backpropagation through a fixed unroll) and `rbp` (recurrent
backpropagation, the implicit-function gradient)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lcp.trainers.base import Trainer


class BackpropTrainer(Trainer):
    """bp: exactly (blocks + 1) Picard steps from v = 0 with autograd on; output D(v).

    For the feedforward models this unroll *is* the network (ff: 2 steps), so the gradient is
    ordinary backpropagation. Evaluation uses the same unrolled forward.
    """

    name = "bp"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        h = model.encode(x)
        v = model.implicit_at_zero(h)
        for _ in range(model.num_bp_steps - 1):
            v = model.implicit(h, v)
        return model.decode(v)

    def compute_update(self, x, y):
        logits = self.forward(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return self.output_stats(logits.detach(), y, loss=loss.detach())

    @torch.no_grad()
    def predict(self, x):
        return self.forward(x)


class RecurrentBackpropTrainer(Trainer):
    """rbp: v* = free equilibrium; v̄ = f(h, v*) with graph; output D(v̄). The gradient g that
    reaches v̄ is replaced by the solution of γ = Jᵀγ + g (J = ∂f/∂v at v̄), found with the same
    solver started at g; autograd then carries γ through v̄ = f(h, v*) into f and E."""

    name = "rbp"

    def compute_update(self, x, y):
        model = self.model
        h = model.encode(x)
        v_star, free = self.free_equilibrium(h)
        v_bar = model.implicit(h, v_star)
        v_bar_leaf = v_bar.detach().requires_grad_(True)
        logits = model.decode(v_bar_leaf)
        loss = F.cross_entropy(logits, y)
        loss.backward()  # decoder grads and g = ∂L/∂v̄
        g = v_bar_leaf.grad
        # J at v̄ = f(h, v*), the state on the graph, as the paper's code differentiates it
        transpose = model.bind(h).transpose_at(v_bar_leaf.detach())
        step = self.maybe_compiled(adjoint_map)
        with torch.no_grad():
            (gamma,), adjoint = self.solver(lambda gamma: (step(transpose, g, gamma),), (g,),
                                            phase="adjoint")
        v_bar.backward(gamma)
        stats = self.output_stats(logits.detach(), y, loss=loss.detach())
        stats.update(self.solver_stats("free", free))
        stats.update(self.solver_stats("adjoint", adjoint))
        return stats


def adjoint_map(transpose, g, gamma):
    """Jᵀγ + g, one step of the adjoint equation (`transpose`: γ ↦ Jᵀγ at v̄, `transpose_at`)."""
    return transpose(gamma) + g
