"""Fixed-point solvers: a name → function registry with one signature (docs/equations.md,
"Solvers").

Every solver takes a map `fn(*state) -> tuple(next_state)` over a tuple of batch-first tensors and
a start state, and returns the solution with a `SolverStats` record (iterations, final residual,
converged or not, the per-sample residual and the residual trace). Nothing is hidden in counters.

A state that stops being finite raises `DivergenceError` at once (with the phase and the
iteration), instead of iterating NaN to `max_iter`; a stopping error that overflows while the
state is finite only means "not converged" (see `_check_finite`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from lcp.errors import DivergenceError, LcpError

State = tuple[torch.Tensor, ...]
StepFn = Callable[..., Sequence[torch.Tensor]]

_EPS = 1e-5  # the paper's guard in the relative error: |Δ| / (1e-5 + |s|)


@dataclass
class SolverStats:
    iterations: int  # evaluations of fn
    residual: float  # the stopping error at the last step (the solver's metric)
    converged: bool  # residual < threshold before max_iter ran out
    max_iter: int
    residual_per_sample: torch.Tensor | None = None  # relative l2 change per sample, last step
    trace: list[float] = field(default_factory=list)  # the stopping error after every step

    @property
    def hit_max_iter(self) -> bool:
        return not self.converged


def relative_error(old: State, new: State, metric: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's stopping error between two states: (scalar, per-sample l2 ratio).

    l2: per sample ‖new − old‖ / (1e-5 + ‖old‖) over all tensors of that sample; max over batch.
    l_inf: max over all elements of |new − old| / (1e-5 + |old|).
    legacy_l2: the l2 ratio over the whole batch at once.
    """
    err, per_sample, _ = _step_error(old, new, _per_sample(old), metric)
    return err, per_sample


def _check_finite(value: float, phase: str, iteration: int,
                  state: Sequence[torch.Tensor]) -> None:
    """Raise DivergenceError when the state has stopped being finite. A stopping error that is
    not finite while every element of the state is (a float32 norm overflows once elements pass
    ~1e18) is not divergence: it counts as not converged and the iteration goes on, as the
    paper's solver does (its error is then NaN, never below the threshold)."""
    if value != value or value in (float("inf"), float("-inf")):
        if all(bool(torch.isfinite(t).all()) for t in state):
            return
        where = f" in phase '{phase}'" if phase else ""
        # the adjoint (rbp) is linear: it diverges when the Jacobian at the state has a spectral
        # radius above 1, which no dt or alpha of the controller changes
        hint = ("The adjoint diverges where the weights make the free state unstable; lower the "
                "learning rate" if phase == "adjoint" else
                "Lower dt or alpha (with dt=1, alpha ≥ 2 diverges), or the learning rate")
        raise DivergenceError(
            f"the dynamics diverged{where}: the state stopped being finite at iteration "
            f"{iteration}. {hint}.",
            phase=phase,
            iteration=iteration,
        )


def _per_sample(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample l2 norm over all tensors of a state (flattened and concatenated)."""
    bsz = tensors[0].shape[0]
    norms = [torch.linalg.vector_norm(t.reshape(bsz, -1), dim=1) for t in tensors]
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms), dim=0)


def _step_error(old: State, new: State, old_norm: torch.Tensor, metric: str):
    """`relative_error(old, new, metric)` given the per-sample norm of `old`; also returns the
    per-sample norm of `new` (the next step's `old_norm`), so each state is reduced once."""
    new_norm = _per_sample(new)
    diff = _per_sample([n - o for o, n in zip(old, new)])
    per_sample = diff / (_EPS + old_norm)
    if metric == "l2":
        err = per_sample.max()
    elif metric == "l_inf":
        err = torch.stack([((n - o).abs() / (_EPS + o.abs())).max()
                           for o, n in zip(old, new)]).max()
    elif metric == "legacy_l2":
        err = torch.linalg.vector_norm(diff) / (_EPS + torch.linalg.vector_norm(old_norm))
    else:
        raise LcpError(f"unknown threshold metric {metric!r}; valid: l2, l_inf, legacy_l2")
    return err, per_sample, new_norm


class MeasuredStep:
    """A step function that also reports its own stopping error (the kernels of `lcp.native`).

    Called as any step function (`fn(x) -> (next state,)`); `measure(x)` returns
    `(next state, per-sample error, batch maximum)`, the l2 error `vanilla` would compute
    between x and the next state, produced by the same pass that wrote the state. `vanilla`
    uses it for single-tensor states with the l2 metric.
    """

    def measure(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> State:
        return (self.measure(x)[0],)


def _own_measure(fn, state: State, metric: str):
    """`fn.measure` where the step measures the solver's error itself (a `MeasuredStep` on a
    single-tensor state, with the l2 metric it computes), else None."""
    if isinstance(fn, MeasuredStep) and len(state) == 1 and metric == "l2":
        return fn.measure
    return None


def vanilla(fn: StepFn, state: State, *, max_iter: int, threshold: float,
            metric: str = "l2", phase: str = "", check_every: int = 1
            ) -> tuple[State, SolverStats]:
    """Picard iteration s ← fn(s); stop after the first step whose error < threshold.

    `check_every = k > 1` reads the errors back from the device only every k steps (one sync
    instead of k on CUDA): the errors are still computed after every step and the last k
    states are kept, so the result — iterations, returned state, residual and trace — is the
    one of the every-step check; at most k − 1 extra steps of `fn` are evaluated (so `fn` must
    have no side effects).
    """
    state = tuple(state)
    k = max(1, int(check_every))
    measure = _own_measure(fn, state, metric)
    if measure is not None:
        # the step measures its error as it writes the state (on the host): nothing to batch
        return _vanilla_measured(measure, state[0], max_iter, threshold, phase)
    trace: list[float] = []
    per_sample = None
    old_norm = _per_sample(state)  # each state is reduced once: new norm → next old norm
    pending: list[tuple[State, torch.Tensor, torch.Tensor]] = []
    for it in range(1, max_iter + 1):
        new_state = tuple(fn(*state))
        err, per_sample, old_norm = _step_error(state, new_state, old_norm, metric)
        state = new_state
        pending.append((new_state, err, per_sample))
        if len(pending) == k or it == max_iter:
            # the one sync of these k steps
            values = [err.item()] if k == 1 else torch.stack([p[1] for p in pending]).tolist()
            first = it - len(pending) + 1
            for j, value in enumerate(values):
                trace.append(value)
                _check_finite(value, phase, first + j, pending[j][0])
                if value < threshold:
                    kept, _, kept_per_sample = pending[j]
                    return kept, SolverStats(first + j, value, True, max_iter, kept_per_sample,
                                             trace)
            pending.clear()
    return state, SolverStats(max_iter, trace[-1] if trace else 0.0, False, max_iter, per_sample,
                              trace)


def _vanilla_measured(measure, x: torch.Tensor, max_iter: int, threshold: float, phase: str):
    """`vanilla` for a step that measures its own error (`MeasuredStep`)."""
    trace: list[float] = []
    per_sample = None
    for it in range(1, max_iter + 1):
        x, per_sample, value = measure(x)
        trace.append(value)
        _check_finite(value, phase, it, (x,))
        if value < threshold:
            return (x,), SolverStats(it, value, True, max_iter, per_sample.clone(), trace)
    return (x,), SolverStats(max_iter, trace[-1] if trace else 0.0, False, max_iter,
                             None if per_sample is None else per_sample.clone(), trace)


def anderson(fn: StepFn, state: State, *, max_iter: int, threshold: float, metric: str = "l2",
             phase: str = "", memory: int = 5, regulariser: float = 1e-4,
             mixing: float = 1.0) -> tuple[State, SolverStats]:
    """Anderson acceleration (memory 5, regulariser 1e-4, mixing 1) on the flattened state.

    As in the paper's code, the stopping error is the per-sample relative l2 change between
    an iterate and its image (max over the batch), whatever `metric` says.
    """
    if max_iter < 3:
        raise LcpError("the anderson solver needs max_iter ≥ 3")
    shapes = [s.shape for s in state]
    sizes = [s[0].numel() for s in state]
    bsz = state[0].shape[0]

    def flat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.reshape(bsz, -1) for p in parts], dim=1)

    def unflat(x: torch.Tensor) -> State:
        return tuple(c.reshape(shape) for c, shape in zip(torch.split(x, sizes, dim=1), shapes))

    def g(x: torch.Tensor) -> torch.Tensor:
        return flat(fn(*unflat(x)))

    x0 = flat(state)
    d = x0.shape[1]
    m = memory
    X = x0.new_zeros(bsz, m, d)
    F = x0.new_zeros(bsz, m, d)
    X[:, 0], F[:, 0] = x0, g(x0)
    X[:, 1], F[:, 1] = F[:, 0], g(F[:, 0])
    H = x0.new_zeros(bsz, m + 1, m + 1)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    y = x0.new_zeros(bsz, m + 1, 1)
    y[:, 0] = 1

    trace: list[float] = []
    per_sample = None
    converged = False
    k = 1
    for k in range(2, max_iter):
        n = min(k, m)
        G = F[:, :n] - X[:, :n]
        H[:, 1:n + 1, 1:n + 1] = torch.bmm(G, G.transpose(1, 2)) + regulariser * torch.eye(
            n, dtype=x0.dtype, device=x0.device)[None]
        try:
            weights = torch.linalg.solve(H[:, :n + 1, :n + 1], y[:, :n + 1])[:, 1:n + 1, 0]
        except RuntimeError as exc:  # a singular system: the model has become unstable
            raise DivergenceError(
                f"anderson solver failed in phase '{phase}' at iteration {k + 1}: {exc}. "
                "Use --solver=vanilla or lower the learning rate.", phase=phase, iteration=k + 1
            ) from None
        slot = k % m
        X[:, slot] = mixing * (weights[:, None] @ F[:, :n])[:, 0] + (1 - mixing) * (
            weights[:, None] @ X[:, :n])[:, 0]
        F[:, slot] = g(X[:, slot])
        err, per_sample = relative_error((F[:, slot],), (X[:, slot],), "l2")
        value = err.item()
        trace.append(value)
        _check_finite(value, phase, k + 1, (F[:, slot],))
        if value < threshold:
            converged = True
            break
    stats = SolverStats(k + 1, trace[-1], converged, max_iter, per_sample, trace)
    return unflat(X[:, k % m]), stats


class _Flat:
    """A state tuple as one flat vector and back (a single contiguous tensor without a copy)."""

    def __init__(self, state: State):
        self.shapes = [t.shape for t in state]
        self.sizes = [t.numel() for t in state]

    def pack(self, state: State, out: torch.Tensor | None = None) -> torch.Tensor:
        if len(state) == 1:
            flat = state[0].reshape(-1)
        else:
            flat = torch.cat([t.reshape(-1) for t in state])
        return flat if out is None else out.copy_(flat)

    def unpack(self, flat: torch.Tensor) -> State:
        if len(self.shapes) == 1:
            return (flat.view(self.shapes[0]),)
        return tuple(p.view(shape) for p, shape in zip(torch.split(flat, self.sizes),
                                                         self.shapes))


def anderson_joint(fn: StepFn, state: State, *, max_iter: int, threshold: float,
                   metric: str = "l2", phase: str = "", memory: int = 5,
                   regulariser: float = 1e-6) -> tuple[State, SolverStats]:
    """Anderson acceleration of s ← fn(s) on the whole (joint) state, for the controlled
    dynamics: one set of mixing weights for the batch, a regulariser relative to the Gram
    matrix (λ·max diag, so it keeps accelerating as the residual shrinks), `memory` past
    iterates. It stops at the first iterate x whose step error ‖fn(x) − x‖/(1e-5 + ‖x‖) — the
    very error the vanilla solver stops on — is below `threshold`, and returns fn(x): the
    same fixed point to the same tolerance, reached in fewer evaluations of fn.

    Each evaluation's output is copied at once, so `fn` may reuse its output buffers.
    """
    # the error is read from the step's own pass where it measures it, not computed again
    measure = _own_measure(fn, state, metric)
    flat = _Flat(state)
    # the current iterate, its own copy (the caller's state may be a buffer `fn` writes into);
    # past iterates are not kept: only their images and residuals are
    x = flat.pack(state).clone()
    length = x.numel()
    m = max(1, int(memory))
    Fh = x.new_empty(m, length)  # the last m images fn(xᵢ)
    G = x.new_empty(m, length)  # and residuals fn(xᵢ) − xᵢ
    gram = np.zeros((m, m))  # the small least-squares problem is solved on the host
    eye = [np.eye(k) for k in range(m + 1)]
    trace: list[float] = []
    per_sample = None
    filled, slot = 0, 0
    for it in range(1, max_iter + 1):
        x_state = flat.unpack(x)
        if measure is not None:
            fx, per_sample, value = measure(x_state[0])
            fx_state = (fx,)
        else:
            fx_state = tuple(fn(*x_state))
            err, per_sample = relative_error(x_state, fx_state, metric)
            value = err.item()
        flat.pack(fx_state, out=Fh[slot])
        torch.sub(Fh[slot], x, out=G[slot])
        trace.append(value)
        _check_finite(value, phase, it, fx_state)
        if value < threshold:
            return fx_state, SolverStats(it, value, True, max_iter, per_sample.clone(), trace)
        filled = min(filled + 1, m)
        row = torch.mv(G[:filled], G[slot]).cpu().numpy().astype(np.float64)
        gram[slot, :filled] = row
        gram[:filled, slot] = row
        # min ‖Σ aᵢ Gᵢ‖² subject to Σ aᵢ = 1:  a ∝ (GGᵀ + λ·max diag·I)⁻¹ 1
        A = gram[:filled, :filled] + regulariser * max(gram.diagonal()[:filled].max(),
                                                       1e-300) * eye[filled]
        try:
            weights = np.linalg.solve(A, np.ones(filled))
            total = float(weights.sum())
        except np.linalg.LinAlgError:
            weights, total = None, 0.0
        nxt = (slot + 1) % m
        if weights is None or not np.isfinite(total) or abs(total) < 1e-300:
            # a singular system: take the plain step and restart the history
            x.copy_(Fh[slot])
            gram[:] = 0.0
            filled, nxt = 0, 0
        else:
            a = torch.from_numpy(weights / total).to(dtype=x.dtype, device=x.device)
            torch.mv(Fh[:filled].t(), a, out=x)
        slot = nxt
    return fx_state, SolverStats(max_iter, trace[-1], False, max_iter, per_sample.clone(), trace)


# every solver, by name; the run's `--solver` names `vanilla` or `anderson` (the paper's two), its
# `--controller_solver=anderson` names `anderson_joint` (lcp.config.CONTROLLER_SOLVERS)
SOLVERS: dict[str, Callable[..., tuple[State, SolverStats]]] = {
    "vanilla": vanilla,
    "anderson": anderson,
    "anderson_joint": anderson_joint,
}


def get_solver(name: str):
    try:
        return SOLVERS[name]
    except KeyError:
        raise LcpError(f"unknown solver {name!r}; valid solvers: {', '.join(SOLVERS)}") from None


class Solver:
    """A solver of `SOLVERS` bound to a run's settings: `solver(fn, state, phase=...)`.

    The threshold is `solver_error_threshold × dt` (as in the paper's code; `anderson_joint`
    stops on the vanilla step error, so at the same tolerance), except for the paper's
    Anderson, whose threshold is not multiplied by dt. `check_every` (vanilla only): how often
    the stopping error is read back — 0 (default) means every step on CPU and every
    `CUDA_CHECK_EVERY` steps for CUDA states; the result is the same either way (see
    `vanilla`). A call with `pure=False` (a step with side effects, e.g. BatchNorm statistics)
    always checks every step.
    """

    CUDA_CHECK_EVERY = 8

    def __init__(self, name: str = "vanilla", max_iter: int = 50, error_threshold: float = 1e-4,
                 metric: str = "l2", dt: float = 1.0, check_every: int = 0):
        self.name = name
        self.fn = get_solver(name)
        self.max_iter = max_iter
        self.threshold = error_threshold if name == "anderson" else error_threshold * dt
        self.metric = metric
        self.check_every = check_every

    @classmethod
    def from_config(cls, cfg, name: str | None = None) -> "Solver":
        """The solver `name` (default: the run's `--solver`) with the run's settings."""
        return cls(name or cfg.solver, cfg.solver_max_iter, cfg.solver_error_threshold,
                   cfg.solver_threshold_metric, cfg.dt)

    def _check_every(self, state: State, pure: bool) -> int:
        if not pure:
            return 1
        if self.check_every > 0:
            return self.check_every
        return self.CUDA_CHECK_EVERY if state and state[0].is_cuda else 1

    def keeps(self, state: State = (), pure: bool = True) -> int:
        """How many of `fn`'s latest outputs this solver may still read after calling `fn`
        again (a step function that writes into a ring of buffers needs one more)."""
        return self._check_every(tuple(state), pure) if self.fn is vanilla else 0

    def __call__(self, fn: StepFn, state: State, *, phase: str = "",
                 max_iter: int | None = None, pure: bool = True) -> tuple[State, SolverStats]:
        state = tuple(state)
        kwargs = {}
        if self.fn is vanilla:
            kwargs["check_every"] = self._check_every(state, pure)
        return self.fn(fn, state, max_iter=max_iter or self.max_iter,
                       threshold=self.threshold, metric=self.metric, phase=phase, **kwargs)
