"""How the training loop reports: callbacks.

`lcp.fit` calls every callback at fixed points of the loop. Trackers (MLflow), tuners (Optuna),
progress bars and checkpoint writers are callbacks; the library itself imports none of them.
A callback asks the loop to stop with `state.request_stop(reason)`; the loop finishes the current
step, runs `on_fit_end` and returns with `result.stopped_reason` set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from lcp.config import RunConfig
    from lcp.trainers.base import Trainer


@dataclass
class FitState:
    """What a callback may read (and, for checkpoints, save) while the loop runs."""

    cfg: "RunConfig"
    model: "torch.nn.Module"
    trainer: "Trainer"
    optimizer: "torch.optim.Optimizer"
    scheduler: Any
    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken
    steps_per_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one record per epoch
    stop_reason: str | None = None
    # the steps skipped because their update was not finite: {"epoch", "step", "reason"}
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason


@dataclass
class FitResult:
    final: dict[str, float]  # eval_train/* and eval_test/* (and eval_val/* when held out)
    history: list[dict[str, float]]
    stopped_reason: str | None
    epochs_completed: int


class Callback:
    """Override what you need; every hook is optional."""

    def on_fit_start(self, state: FitState) -> None: ...

    def on_step_end(self, state: FitState, stats: dict[str, float]) -> None: ...

    def on_epoch_end(self, state: FitState, metrics: dict[str, float]) -> None: ...

    def on_fit_end(self, state: FitState, result: FitResult) -> None: ...

    def on_exception(self, state: FitState | None, exc: BaseException) -> None: ...


class CallbackList(Callback):
    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks)

    def on_fit_start(self, state):
        for cb in self.callbacks:
            cb.on_fit_start(state)

    def on_step_end(self, state, stats):
        for cb in self.callbacks:
            cb.on_step_end(state, stats)

    def on_epoch_end(self, state, metrics):
        for cb in self.callbacks:
            cb.on_epoch_end(state, metrics)

    def on_fit_end(self, state, result):
        for cb in self.callbacks:
            cb.on_fit_end(state, result)

    def on_exception(self, state, exc):
        for cb in self.callbacks:
            cb.on_exception(state, exc)
