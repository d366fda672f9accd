"""The trainer interface: one batch in, the update in `.grad` out.

A trainer turns a batch into "the update" of SPEC §3 — the vector the optimizer descends — and
writes it into the `.grad` of every trainable parameter (the model's and its own auxiliary
ones, such as Kolen–Pollack feedback weights). One optimizer loop then serves every trainer.

Parameter changes that are not gradients are explicit steps the loop calls, never hidden in a
forward pass:

    trainer.pre_update()            # e.g. lcp-kp's weight decay, before the update is computed
    stats = trainer.compute_update(x, y)
    trainer.post_update()           # e.g. lcp-lf's rule for Q, from this batch's equilibrium
    optimizer.step()

`compute_update` returns a flat dict of floats: solver iterations/residual/converged per phase,
norms of u* and e*, and the loss/accuracy of the free output when it is computed.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from lcp.config import RunConfig
from lcp.errors import DivergenceError
from lcp.models import EquilibriumModel, LinearReadoutModel
from lcp.solvers import Solver, SolverStats


class Trainer:
    name = ""
    # run the no-grad dynamics of LinearReadoutModels (ff, rnn, conv-ff) with the fused kernels
    # of `DynamicsPlan`; False runs the reference path (the model's generic methods)
    fused = True

    def __init__(self, cfg: RunConfig, model: EquilibriumModel):
        self.cfg = cfg
        self.model = model
        self.solver = Solver.from_config(cfg)
        # trainable or rule-updated tensors that belong to the trainer, not to the model
        self.auxiliary = nn.Module()

    # ---------------------------------------------------------------- the contract
    def parameters(self) -> list[nn.Parameter]:
        """The trainer's own trainable parameters (the optimizer trains them with the model's)."""
        return list(self.auxiliary.parameters())

    def pre_update(self) -> None:
        """Explicit parameter changes due before this batch's update (none by default)."""

    def compute_update(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def post_update(self) -> None:
        """Explicit non-gradient rules due after this batch's update (none by default)."""

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the free equilibrium v* = f(E(x), v*), solved from v = 0."""
        h = self.model.encode(x)
        v, _ = self.free_equilibrium(h)
        return self.model.decode(v)

    def state_dict(self) -> dict:
        return self.auxiliary.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.auxiliary.load_state_dict(state)

    def to(self, device) -> "Trainer":
        self.auxiliary.to(device)
        return self

    # ---------------------------------------------------------------- shared pieces
    @torch.no_grad()
    def free_equilibrium(self, h: torch.Tensor) -> tuple[torch.Tensor, SolverStats]:
        h = h.detach()
        model = self.model
        if self.fused and isinstance(model, LinearReadoutModel):
            step, start = self.batch_plan(h).free_stepper()
            (v,), stats = self.solver(step, (start,), phase="free")
            return v, stats
        f = model.bind(h)
        (v,), stats = self.solver(lambda v: (f(v),), (model.zero_state(h),), phase="free")
        return v, stats

    @staticmethod
    def solver_stats(phase: str, stats: SolverStats) -> dict[str, float]:
        return {
            f"{phase}/iterations": float(stats.iterations),
            f"{phase}/residual": float(stats.residual),
            f"{phase}/hit_max_iter": float(stats.hit_max_iter),
        }

    @staticmethod
    def output_stats(logits: torch.Tensor, y: torch.Tensor, prefix: str = "",
                     loss: torch.Tensor | None = None) -> dict[str, float]:
        """Loss and accuracy of `logits` (`loss`: the batch-mean cross entropy if the caller
        already has it)."""
        loss = (F.cross_entropy(logits, y) if loss is None else loss).item()
        if loss != loss:
            raise DivergenceError("the loss is not finite (the network output diverged)",
                                  phase="loss")
        acc = (logits.argmax(1) == y).float().mean().item()
        return {f"{prefix}loss": loss, f"{prefix}accuracy": acc}


    def least_control_update(self, h, v, e, u, y, implicit_signal) -> tuple[torch.Tensor, dict]:
        """Write the least-control update of a controlled equilibrium (v*, e*, u*) into `.grad`.

        With ṽ = f(h, v*) + e*, the gradient reaching ṽ is replaced by `implicit_signal` (−e* for
        lcp-di) and carried through f(h, v*) into f and, through h, into E; D receives
        −(∂D(ṽ)/∂θ)ᵀu*. Returns ṽ and the stats of the controlled (and, when tracked, the free)
        output.
        """
        model = self.model
        if self.fused and _linear_blocks(model):
            v_tilde, controlled_out = self._closed_form_update(h, v, e, u, implicit_signal)
        else:
            f_v = model.implicit(h, v)  # graph into f and, through h, into E
            v_tilde = f_v.detach() + e
            controlled_out = model.decode(v_tilde)  # graph into D only
            torch.autograd.backward([f_v, controlled_out], [implicit_signal(v_tilde, e), -u])
        stats = {"u_norm": batch_norm_mean(u), "e_norm": batch_norm_mean(e)}
        stats.update(self.output_stats(controlled_out.detach() + u, y, prefix="controlled_"))
        if self.cfg.track_free_output:
            with torch.no_grad():
                v_free, free = self.free_equilibrium(h)
                stats.update(self.output_stats(model.decode(v_free), y))
            stats.update(self.solver_stats("free", free))
        return v_tilde, stats

    def batch_plan(self, h: torch.Tensor):
        """The `DynamicsPlan` of h. Inside `plan_scope()` (one `compute_update`: h stays alive
        and the weights do not change) it is made once and reused by every phase."""
        scope = getattr(self, "_plans", None)
        if scope is None:
            return self.model.dynamics_plan(h)
        key = (h.data_ptr(), tuple(h.shape), h.dtype)
        if key not in scope:
            scope[key] = self.model.dynamics_plan(h)
        return scope[key]

    @contextlib.contextmanager
    def plan_scope(self):
        self._plans = {}
        try:
            yield
        finally:
            self._plans = None

    def _closed_form_update(self, h, v, e, u, implicit_signal):
        """`least_control_update`'s gradients for a model of linear blocks, in closed form:
        with s the signal reaching ṽ = f(h, v*) + e*, block b gets s_outᵀ φ(v*_in) and Σ s_out,
        the readout −uᵀ φ(ṽ_readout) and −Σ u, and autograd carries s through h = E(x) into
        the encoder only (no graph through f and D). Returns (ṽ, D(ṽ))."""
        model = self.model
        with torch.no_grad():
            plan = self.batch_plan(h.detach())
            plan.act(v)
            v_tilde = plan.implicit_into(torch.empty_like(v), add=e)  # f(h, v*) + e*
            signal = implicit_signal(v_tilde, e)
            for (spec, *_), layer, t_in in zip(plan.blocks, model.blocks, plan._t_in):
                s_out = signal[:, spec.out_start:spec.out_end]
                _accumulate(layer.weight, s_out.t() @ t_in)
                if layer.bias is not None:
                    _accumulate(layer.bias, s_out.sum(0))
            t_r = model.act(v_tilde[:, plan.r0:])
            controlled_out = torch.addmm(plan.b_D, t_r, plan.W_D_t)
            _accumulate(model.readout.weight, -(u.t() @ t_r))
            _accumulate(model.readout.bias, -u.sum(0))
        if h.requires_grad:
            h.backward(signal)
        return v_tilde, controlled_out


def _linear_blocks(model) -> bool:
    return isinstance(model, LinearReadoutModel) and all(
        spec.conv is None for spec in model.block_specs)


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    """param.grad += grad, as autograd accumulates."""
    if param.grad is None:
        param.grad = grad.detach().clone() if grad._base is not None else grad.detach()
    else:
        param.grad.add_(grad)


def loss_gradient(logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """∇ of the batch-mean cross entropy w.r.t. the logits: (softmax − onehot) / B."""
    return (torch.softmax(logits, dim=1) - onehot) / logits.shape[0]


def batch_norm_mean(t: torch.Tensor) -> float:
    """Mean over the batch of each sample's l2 norm."""
    return t.reshape(t.shape[0], -1).norm(dim=1).mean().item()
