"""The worker's side of one `lcp tune` trial (`python -m pipeline.worker ... --trial SPEC`):
`TrialSession` reports each epoch's validation accuracy to Optuna (never NaN), keeps a heartbeat,
and tells Optuna how the trial ended. The parent's side, which asks Optuna for trials and runs
them on the scheduler, is `pipeline.tuning.tune`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from lcp.callbacks import Callback
from lcp.errors import DivergenceError
from pipeline.tuning.optuna_study import (A_DIVERGED, A_DURATION, A_EPOCHS, A_HEARTBEAT, A_HOST,
                                          A_PID, A_REASON, HEARTBEAT_S, OBJECTIVE, StorageSpec,
                                          TuneError, make_pruner, mlflow_outcome, open_storage,
                                          quiet_optuna, trial_id)


class _Heartbeat:
    """Writes `lcp.heartbeat` to the trial every `interval` seconds while the trial runs."""

    def __init__(self, trial, interval: float):
        self.trial, self.interval = trial, interval
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.done.wait(self.interval):
            try:
                self.trial.set_user_attr(A_HEARTBEAT, time.time())
            except Exception:  # noqa: BLE001 - the next beat tries again
                pass

    def stop(self) -> None:
        self.done.set()
        self.thread.join(timeout=60)


class TrialReporter(Callback):
    """Per-epoch validation accuracy to Optuna (never NaN); asks `fit` to stop when the pruner
    says so or the dynamics diverged."""

    def __init__(self, trial, pruner: str = "median"):
        self.trial, self.pruner = trial, pruner
        self.pruned_at: int | None = None
        self.diverged: str | None = None
        self.last: float | None = None
        self.epochs = 0

    def on_epoch_end(self, state, metrics) -> None:
        epoch = int(metrics.get("epoch", state.epoch))
        self.epochs = epoch
        value = metrics.get(OBJECTIVE)
        if value is None:
            return
        loss = metrics.get("eval_val/loss")
        if not math.isfinite(value) or (loss is not None and not math.isfinite(loss)):
            self.diverged = (f"diverged: the validation {'loss' if value == value else 'accuracy'}"
                             f" is not finite at epoch {epoch}")
            state.request_stop(self.diverged)
            return
        self.last = float(value)
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            state.request_stop(f"pruned by the {self.pruner} pruner at epoch {epoch}")


class TrialSession:
    """The worker's side of a trial (`python -m pipeline.worker ... --trial SPEC`): the Optuna
    trial the parent asked, a heartbeat, the reporting callback, the validation-only loaders, and
    the trial's outcome told to Optuna (and turned into the run's MLflow status)."""

    def __init__(self, spec_path: str | os.PathLike, num_epochs: int):
        import optuna

        spec = json.loads(Path(spec_path).read_text())
        quiet_optuna()
        self.storage = open_storage(StorageSpec(**spec["storage"]))
        self.pruner = spec["pruner"]
        self.study = optuna.load_study(study_name=spec["study"], storage=self.storage,
                                       sampler=optuna.samplers.RandomSampler(),
                                       pruner=make_pruner(self.pruner, num_epochs))
        self.number = int(spec["number"])
        self.trial = optuna.Trial(self.study, trial_id(self.study, self.storage, self.number))
        self.trial.set_user_attr(A_PID, os.getpid())
        self.trial.set_user_attr(A_HOST, socket.gethostname())
        self.trial.set_user_attr(A_HEARTBEAT, time.time())
        self.reporter = TrialReporter(self.trial, self.pruner)
        self.heartbeat = _Heartbeat(self.trial, float(spec.get("heartbeat_s") or HEARTBEAT_S))
        self.began = time.time()
        print(f"trial {self.number}: {json.dumps(spec['params'])}", flush=True)

    def loaders(self, cfg):
        """Only the validation split is evaluated: never the test set (nor the train set)."""
        from lcp.data import build_loaders

        train, evals, shape, classes = build_loaders(cfg)
        if "val" not in evals:
            raise TuneError("the trial's config holds out no validation split")
        return train, {"val": evals["val"]}, shape, classes

    def finish(self, result) -> tuple[str, dict[str, Any], dict[str, float]]:
        """Tell Optuna how `fit` ended; (MLflow status, tags, metrics) of the trial's run."""
        from optuna.trial import TrialState

        final, reporter = result.final.get(OBJECTIVE), self.reporter
        if reporter.diverged:
            return self._tell(TrialState.PRUNED, reporter.diverged, diverged=True)
        if reporter.pruned_at is not None:
            return self._tell(TrialState.PRUNED, f"pruned by the {self.pruner} pruner at epoch "
                              f"{reporter.pruned_at} (validation accuracy {reporter.last:.4f})")
        if result.stopped_reason:
            return self._tell(TrialState.FAIL, f"stopped: {result.stopped_reason}")
        if final is None or not math.isfinite(final):
            return self._tell(TrialState.PRUNED, "diverged: the final validation accuracy is "
                              "not finite", diverged=True)
        value = float(final)
        return self._tell(TrialState.COMPLETE, f"validation accuracy {value:.4f} after "
                          f"{result.epochs_completed} epochs", value=value)

    def fail(self, exc: BaseException, reason: str) -> None:
        """`fit` raised: diverged dynamics end the trial PRUNED, anything else FAILED."""
        from optuna.trial import TrialState

        if isinstance(exc, DivergenceError):
            self._tell(TrialState.PRUNED, reason, diverged=True)
        else:
            self._tell(TrialState.FAIL, reason)

    def _tell(self, state, reason: str, *, diverged: bool = False, value: float | None = None):
        self.heartbeat.stop()
        self.trial.set_user_attr(A_REASON, reason)
        self.trial.set_user_attr(A_DURATION, round(time.time() - self.began, 3))
        self.trial.set_user_attr(A_EPOCHS, self.reporter.epochs)
        if diverged:
            self.trial.set_user_attr(A_DIVERGED, True)
        frozen = self.study.tell(self.trial, value) if value is not None else \
            self.study.tell(self.trial, state=state)
        print(f"trial {self.number}: {frozen.state.name}: {reason}", flush=True)
        status, tags = mlflow_outcome(frozen)
        metrics = {"duration_s": time.time() - self.began,
                   "epochs_completed": self.reporter.epochs}
        if value is not None:
            metrics["objective"] = value
        return status, tags, metrics

    def close(self) -> None:
        self.heartbeat.stop()

