"""The trainer interface: one batch in, the update in `.grad` out.

A trainer turns a batch into "the update" (docs/equations.md) — the vector the optimizer descends — and
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

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lcp import native
from lcp.config import RunConfig
from lcp.errors import DivergenceError, LcpError
from lcp.models import EquilibriumModel
from lcp.solvers import Solver, SolverStats


def compile_mode() -> str | None:
    """How the dynamics' step functions run, from the public setting `LCP_COMPILE`
    (environment variable): `0` (default) the PyTorch definition as written (eager), `1`
    through `torch.compile` (inductor), `graphs` compiled and replayed as CUDA graphs. Returns
    None (eager) or torch.compile's mode. Eager is the default on every device: on CPU the
    first call's compile cost (tens of seconds per step function) is not repaid and
    `lcp.native` is faster; on CUDA the choice awaits a measurement (docs/speed.md)."""
    mode = os.environ.get("LCP_COMPILE", "0").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return None
    if mode == "graphs":
        return "reduce-overhead"
    if mode in ("1", "true", "yes", "on"):
        return "default"
    raise LcpError(f"LCP_COMPILE={mode!r} is not a setting; use 0, 1 or graphs")


class Trainer:
    name = ""

    def __init__(self, cfg: RunConfig, model: EquilibriumModel):
        self.cfg = cfg
        self.model = model
        self.solver = Solver.from_config(cfg)
        # trainable or rule-updated tensors that belong to the trainer, not to the model
        self.auxiliary = nn.Module()
        # where the compiled passes come from (`native.plan_for`): `build_trainer` sets the
        # accessor of the checked kernels (`lcp.trainers.native_check.library`); a trainer made
        # from its class alone runs the PyTorch definitions, never kernels that were not checked
        self.kernels: Callable[[], native.Kernels | None] | None = None

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

    def rule_updated_tensors(self) -> list[torch.Tensor]:
        """The tensors `pre_update` and `post_update` change in place (none by default): what
        the loop puts back when it skips a step whose update is not finite."""
        return []

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
        """v* = f(h, v*) from v = 0 by the run's solver (docs/equations.md, "Free
        equilibrium"); the compiled backend's `FreeStep` where it applies."""
        h = h.detach()
        plan = native.plan_for(self.model, h, self.kernels, *native.FreeStep.passes)
        if plan is not None:
            kernel = native.FreeStep(plan)
            (v,), stats = self.solver(kernel, (kernel.start(),), phase="free")
            return v, stats
        f = self.model.bind(h)
        step = self.maybe_compiled(_free_map)
        (v,), stats = self.solver(lambda v: (step(f, v),), (self.model.zero_state(h),),
                                  phase="free")
        return v, stats

    def maybe_compiled(self, fn):
        """`fn`, or `torch.compile(fn)` (made once per trainer) as `compile_mode` says."""
        mode = compile_mode()
        if mode is None:
            return fn
        cache = self.__dict__.setdefault("_compiled", {})
        key = (getattr(fn, "__func__", fn), mode)
        if key not in cache:
            compiled = torch.compile(fn, mode=mode, dynamic=False)
            cache[key] = compiled if mode == "default" else _replayed(compiled)
        return cache[key]

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
        """Write the least-control update of a controlled equilibrium (v*, e*, u*) into `.grad`
        (docs/equations.md, "The least-control update"; `implicit_signal` gives s). Returns
        ṽ = f(h, v*) + e* and the stats of the controlled (and, when tracked, the free) output.
        """
        model = self.model
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


def _replayed(compiled):
    """A CUDA-graph-compiled function whose outputs survive the next replay (a solver keeps
    the states it was given): each call starts a new graph step and copies its outputs."""
    def call(*args):
        torch.compiler.cudagraph_mark_step_begin()
        out = compiled(*args)
        return torch.utils._pytree.tree_map(
            lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)

    return call


def _free_map(f, v):
    """One step of the free dynamics: v ← f(h, v)."""
    return f(v)


def loss_gradient(logits: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """∇ of the batch-mean cross entropy w.r.t. the logits: (softmax − onehot) / B."""
    return (torch.softmax(logits, dim=1) - onehot) / logits.shape[0]


def batch_norm_mean(t: torch.Tensor) -> float:
    """Mean over the batch of each sample's l2 norm."""
    return t.reshape(t.shape[0], -1).norm(dim=1).mean().item()
