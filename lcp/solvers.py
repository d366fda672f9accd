"""Fixed-point solvers: a name → function registry with one signature.

Every solver takes a map `fn(*state) -> tuple(next_state)` over a tuple of batch-first tensors and
a start state, and returns the solution with a `SolverStats` record (iterations, final residual,
converged or not, the per-sample residual and the residual trace). Nothing is hidden in counters.

A residual that stops being finite raises `DivergenceError` at once (with the phase and the
iteration), instead of iterating NaN to `max_iter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

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
    diff_sq = sum((n - o).reshape(o.shape[0], -1).pow(2).sum(1) for o, n in zip(old, new))
    norm_sq = sum(o.reshape(o.shape[0], -1).pow(2).sum(1) for o in old)
    per_sample = diff_sq.sqrt() / (_EPS + norm_sq.sqrt())
    if metric == "l2":
        return per_sample.max(), per_sample
    if metric == "l_inf":
        ratios = [((n - o).abs() / (_EPS + o.abs())).max() for o, n in zip(old, new)]
        return torch.stack(ratios).max(), per_sample
    if metric == "legacy_l2":
        return diff_sq.sum().sqrt() / (_EPS + norm_sq.sum().sqrt()), per_sample
    raise LcpError(f"unknown threshold metric {metric!r}; valid: l2, l_inf, legacy_l2")


def _check_finite(value: float, phase: str, iteration: int) -> None:
    if value != value or value in (float("inf"), float("-inf")):
        where = f" in phase '{phase}'" if phase else ""
        raise DivergenceError(
            f"the dynamics diverged{where}: the state stopped being finite at iteration "
            f"{iteration}. Lower dt or alpha (with dt=1, alpha ≥ 2 diverges), or the learning rate.",
            phase=phase,
            iteration=iteration,
        )


def vanilla(fn: StepFn, state: State, *, max_iter: int, threshold: float,
            metric: str = "l2", phase: str = "") -> tuple[State, SolverStats]:
    """Picard iteration s ← fn(s); stop after the first step whose error < threshold."""
    trace: list[float] = []
    per_sample = None
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        new_state = tuple(fn(*state))
        err, per_sample = relative_error(state, new_state, metric)
        value = err.item()
        trace.append(value)
        _check_finite(value, phase, it)
        state = new_state
        if value < threshold:
            converged = True
            break
    return state, SolverStats(it, trace[-1] if trace else 0.0, converged, max_iter, per_sample, trace)


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
        _check_finite(value, phase, k + 1)
        if value < threshold:
            converged = True
            break
    stats = SolverStats(k + 1, trace[-1], converged, max_iter, per_sample, trace)
    return unflat(X[:, k % m]), stats


SOLVERS: dict[str, Callable[..., tuple[State, SolverStats]]] = {
    "vanilla": vanilla,
    "anderson": anderson,
}


def get_solver(name: str):
    try:
        return SOLVERS[name]
    except KeyError:
        raise LcpError(f"unknown solver {name!r}; valid solvers: {', '.join(SOLVERS)}") from None


class Solver:
    """A solver bound to a run's settings: `solver(fn, state, phase=...)`.

    The vanilla threshold is `solver_error_threshold × dt` (as in the paper's code); the
    Anderson threshold is not multiplied by dt.
    """

    def __init__(self, name: str = "vanilla", max_iter: int = 50, error_threshold: float = 1e-4,
                 metric: str = "l2", dt: float = 1.0):
        self.name = name
        self.fn = get_solver(name)
        self.max_iter = max_iter
        self.threshold = error_threshold * dt if name == "vanilla" else error_threshold
        self.metric = metric

    @classmethod
    def from_config(cls, cfg) -> "Solver":
        return cls(cfg.solver, cfg.solver_max_iter, cfg.solver_error_threshold,
                   cfg.solver_threshold_metric, cfg.dt)

    def __call__(self, fn: StepFn, state: State, *, phase: str = "",
                 max_iter: int | None = None) -> tuple[State, SolverStats]:
        return self.fn(fn, tuple(state), max_iter=max_iter or self.max_iter,
                       threshold=self.threshold, metric=self.metric, phase=phase)
