"""One training run in its own process: `python -m pipeline.worker --tracking-uri URI --run-id ID
--run-dir DIR [--trial SPEC]` — the child of every command (a table's run, a tuning trial).

The scheduler creates the MLflow run (and writes `DIR/config.yaml`, the resolved config) before it
starts this process; the worker only logs to the run it is given, resumes from
`DIR/checkpoint.pt` when that exists, and marks the run FINISHED only after its final metrics and
artifacts are logged. What a run logs: docs/pipeline.md; a trial (`--trial`): docs/tuning.md.

Exit status: 0 finished, 3 diverged, 1 other failure, 75 the run is already being run by another
process (its lock is held), 128+signal when stopped by a signal.

Extra callbacks: `LCP_WORKER_CALLBACKS="pkg.module:factory[,...]"` adds, to every run, the
`lcp.callbacks.Callback` that `factory(run_name, run_dir)` returns (None adds nothing); the tests
inject faults this way. The variable travels to Ray tasks with the other `LCP_*` settings.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from lcp.callbacks import Callback
from pipeline.runs.rundir import (CHECKPOINT_NAME, CONFIG_NAME, EXIT_BUSY, LOCK_NAME, PROGRESS_NAME,
                                  RunLock, read_config, resume_point, write_json_atomic)
from pipeline.tracking.run_status import end_run

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_DIVERGED = 3

CALLBACKS_ENV = "LCP_WORKER_CALLBACKS"
PARENT_ENV = "LCP_PARENT_PID"  # set by the local executor: see die_with_parent
PR_SET_PDEATHSIG = 1


class WorkerInterrupted(KeyboardInterrupt):
    """Raised in the worker by SIGTERM/SIGINT so the run unwinds and is marked KILLED."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ====================================================================== callbacks


class MlflowLogger(Callback):
    """Epoch records → MLflow (step=epoch, one batch per epoch) and DIR/progress.json."""

    def __init__(self, tracker, run_id: str, run_dir: Path, wall_before: float = 0.0):
        self.tracker, self.run_id, self.run_dir = tracker, run_id, run_dir
        self.wall_before = wall_before
        self.t0 = time.monotonic()
        self.state = None

    def wall_time(self) -> float:
        return self.wall_before + (time.monotonic() - self.t0)

    def on_fit_start(self, state):
        from lcp.errors import LcpError

        self.state = state
        logged = self.tracker.last_step(self.run_id, "epoch")
        if logged > state.epoch:
            raise LcpError(
                f"run {self.run_id} has metrics up to epoch {logged} but its checkpoint is at "
                f"epoch {state.epoch}; rerun with --force to start a new run")
        # Epochs in the checkpoint that never reached the store (killed between the two).
        missing = [(int(r["epoch"]), r) for r in state.history if int(r["epoch"]) > logged]
        if missing:
            self.tracker.log_metric_records(self.run_id, missing)
        self._progress(state, "running")

    def on_step_end(self, state, stats):
        within = {k: v for k, v in stats.items() if k.startswith("align_step/")}
        if within:  # alignment measured every align_every steps: at step=optimizer step
            self.tracker.log_metrics(self.run_id, within, step=state.global_step)

    def on_epoch_end(self, state, metrics):
        self.state = state
        self.tracker.log_metrics(self.run_id, metrics, step=state.epoch)
        self._progress(state, "running", metrics)

    def on_fit_end(self, state, result):
        self.state = state

    def _progress(self, state, phase, metrics=None):
        payload = {"epoch": state.epoch, "num_epochs": state.cfg.num_epochs, "phase": phase,
                   "wall_time_s": self.wall_time(), "pid": os.getpid(), "time": time.time()}
        if metrics:
            for key in ("train/loss", "train/accuracy", "eval_test/accuracy"):
                if key in metrics:
                    payload[key] = metrics[key]
        write_json_atomic(self.run_dir / PROGRESS_NAME, payload)


def extra_callbacks(name: str, run_dir: Path) -> list[Callback]:
    """The callbacks named by $LCP_WORKER_CALLBACKS (see the module docstring)."""
    out = []
    for spec in filter(None, (p.strip() for p in os.environ.get(CALLBACKS_ENV, "").split(","))):
        module, _, attr = spec.partition(":")
        callback = getattr(importlib.import_module(module), attr)(name, run_dir)
        if callback is not None:
            out.append(callback)
    return out


# ====================================================================== artifacts


def write_metrics_csv(history: list[dict], path: Path) -> None:
    keys: list[str] = ["epoch"]
    for record in history:
        keys.extend(k for k in record if k not in keys)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        for record in history:
            writer.writerow(record)


def dataset_inputs(cfg, loaders) -> list[dict]:
    """The run's datasets for `Tracker.log_datasets`: name, split, size, digest, source."""
    import hashlib

    from lcp.data import dataset_source

    train, evals, _, _ = loaders
    out = []
    for split, loader in [("train", train)] + [(k, v) for k, v in evals.items() if k != "train"]:
        digest = hashlib.sha256(loader.x.cpu().numpy().tobytes())
        digest.update(loader.y.cpu().numpy().tobytes())
        out.append({"name": cfg.data, "split": split, "size": loader.dataset_size,
                    "digest": digest.hexdigest()[:16],
                    "source": dataset_source(cfg.data, cfg.data_dir)})
    return out


def describe_device(cfg) -> str:
    import torch

    from lcp.training import resolve_device

    device = resolve_device(cfg)
    text = str(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        text = f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if device.type == "cuda" and visible:
        text += f" CUDA_VISIBLE_DEVICES={visible}"
    return text


def failure_reason(exc: BaseException) -> str:
    from lcp.errors import DivergenceError

    if isinstance(exc, DivergenceError):
        return f"diverged: {exc}"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ====================================================================== main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.worker",
                                     description="Run one pipeline run (started by the scheduler).")
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: leave torch's default)")
    parser.add_argument("--attempt", type=int, default=1)
    parser.add_argument("--trial", default=None, metavar="SPEC",
                        help="run an Optuna trial of `lcp tune` (its spec.json): report to it, "
                             "evaluate the validation split only, no checkpoint")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(name, None)  # never log anywhere but the run we were given
    run_dir = Path(args.run_dir).resolve()
    lock = RunLock(run_dir)
    if not lock.acquire():
        print(f"worker: run {args.run_id} is already being run by another process "
              f"(lock {run_dir / LOCK_NAME} held)", file=sys.stderr, flush=True)
        return EXIT_BUSY

    def on_signal(signum, frame):  # noqa: ARG001
        # once: a second signal while the run is being marked KILLED would leave it RUNNING
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise WorkerInterrupted(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        die_with_parent()
        return _run(args, run_dir)
    except WorkerInterrupted as exc:  # before _run could mark anything: nothing to mark
        return 128 + exc.signum
    finally:
        lock.release()


def die_with_parent() -> None:
    """Linux: this worker gets SIGTERM — and ends as it does on SIGTERM: run KILLED, checkpoint
    kept, resumable — when the scheduler that started it dies, kill -9 included
    (PR_SET_PDEATHSIG). The local executor names its own pid in $LCP_PARENT_PID; a worker whose
    parent is already gone stops at once. Without this a worker of a killed scheduler trains on,
    re-parented to init, holding its CPU/GPU slot and its run's lock."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before prctl: no signal would come
        os.kill(os.getpid(), signal.SIGTERM)


def _run(args, run_dir: Path) -> int:
    from pipeline.tracking.store import Tracker, cpu_model

    tracker = Tracker(args.tracking_uri, check=True, create=False)
    run_id = args.run_id
    trial = None
    try:
        import torch

        threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads > 0:  # the scheduler's share of the CPU for this run
            torch.set_num_threads(threads)
        from lcp.config import RunConfig
        from lcp.data import build_loaders
        from lcp.trainers import native_check
        from lcp.training import fit
        from pipeline.tracking.store import (SYSTEM_METRICS_ENV, start_system_metrics,
                                             stop_system_metrics)

        cfg = RunConfig.from_dict(read_config(run_dir))
        if args.trial:
            from pipeline.tuning.trial import TrialSession

            trial = TrialSession(args.trial, cfg.num_epochs)
        checkpoint = run_dir / CHECKPOINT_NAME
        resumed_from, wall_before = resume_point(run_dir) if checkpoint.exists() else (0, 0.0)
        run = tracker.get_run(run_id)
        if run.info.status == "FINISHED":  # never reopened: its results are final
            print(f"worker: run {run_id} is already FINISHED; nothing to do", flush=True)
            return EXIT_OK
        tracker.set_status(run_id, "RUNNING")
        name = run.info.run_name or run_id
        tracker.set_tags(run_id, {
            "device": describe_device(cfg), "cpu": cpu_model(),
            "torch_version": torch.__version__,
            "attempt": args.attempt, "worker_pid": os.getpid(),
            "torch_threads": torch.get_num_threads(), "compiled_kernels": native_check.summary(),
            **({"resumed_from_epoch": resumed_from} if checkpoint.exists() else {}),
        })
        print(f"worker: run {run_id} ({name}) attempt {args.attempt}, "
              + (f"resuming from epoch {resumed_from}" if checkpoint.exists() else "from epoch 0")
              + f", device {describe_device(cfg)}, {torch.get_num_threads()} threads"
              + f", compiled kernels {native_check.summary()}", flush=True)
        logger = MlflowLogger(tracker, run_id, run_dir, wall_before)
        from lcp.progress import ProgressBar

        # its log is a file: one plain line per epoch and at least every 2 minutes inside one
        callbacks = [logger, ProgressBar(sys.stderr, plain=True), *extra_callbacks(name, run_dir)]
        if trial is not None:
            callbacks.append(trial.reporter)
        loaders = build_loaders(cfg) if trial is None else trial.loaders(cfg)
        if not checkpoint.exists():
            tracker.log_datasets(run_id, dataset_inputs(cfg, loaders))
        monitor = start_system_metrics(tracker.uri, run_id, resume=checkpoint.exists())
        tracker.set_tags(run_id, {"system_metrics": "on" if monitor else
                                  f"off ({SYSTEM_METRICS_ENV}=0)"})
        try:
            result = fit(cfg, callbacks, loaders=loaders,
                         checkpoint_path=checkpoint if trial is None else None)
        finally:
            if monitor is not None:
                stop_system_metrics(monitor)
        _finish(tracker, run_id, run_dir, cfg, result, logger,
                None if trial is None else trial.finish(result))
        print(f"worker: run {run_id} finished: " + ", ".join(
            f"{k}={v:.4f}" for k, v in result.final.items()), flush=True)
        return EXIT_OK
    except WorkerInterrupted as exc:
        print(f"worker: stopped by {exc}; marking run {run_id} KILLED", file=sys.stderr,
              flush=True)
        if trial is not None:
            trial.close()  # left RUNNING: `lcp tune` marks it interrupted and enqueues it again
        _mark(tracker, run_id, "KILLED", {"killed_reason": f"worker received {exc}"})
        return 128 + exc.signum
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then the exit code
        from lcp.errors import DivergenceError

        traceback.print_exc()
        reason = failure_reason(exc)
        print(f"worker: run {run_id} failed: {reason}", file=sys.stderr, flush=True)
        if trial is not None:
            try:
                trial.fail(exc, reason)
            except Exception as error:  # noqa: BLE001 - the parent fails the trial then
                print(f"worker: could not end trial {trial.number}: {error}", file=sys.stderr)
        _mark(tracker, run_id, "FAILED", {"failure_reason": reason})
        return EXIT_DIVERGED if isinstance(exc, DivergenceError) else EXIT_FAILED


def _mark(tracker, run_id: str, status: str, tags: dict) -> None:
    try:
        end_run(tracker, run_id, status, tags)
    except Exception as exc:  # noqa: BLE001 - the scheduler marks it from outside then
        print(f"worker: could not mark run {run_id} {status}: {exc}", file=sys.stderr, flush=True)


def skipped_tags(state) -> dict[str, str]:
    """The steps a run skipped (their update not finite), where and why, as the tag
    `skipped_steps` (none when it skipped no step)."""
    skipped = getattr(state, "skipped", None) or []
    if not skipped:
        return {}
    text = "; ".join(f"epoch {s['epoch']} step {s['step']}: {s['reason']}" for s in skipped)
    return {"skipped_steps": text if len(text) <= 4000 else text[:3990] + " …"}


def _finish(tracker, run_id: str, run_dir: Path, cfg, result, logger: MlflowLogger,
            trial_outcome: tuple[str, dict, dict] | None = None) -> None:
    """The final evaluation and, for a table run, the artifacts; then the run's end: FINISHED,
    or a trial's (status, tags, metrics) that say what its outcome means (Trial.finish)."""
    from lcp.training import save_model_file
    from pipeline.reporting.health import run_health
    from pipeline.reporting.plots import plot_run_curves

    status, tags, metrics = trial_outcome or ("FINISHED", None, None)
    last = result.history[-1] if result.history else {}
    final = {k: v for k, v in result.final.items() if not (k in last and last[k] == v)}
    final["wall_time_s"] = logger.wall_time()
    health = run_health(result.history)
    final.update(health.metrics())
    tags = {**health.tags(), **skipped_tags(logger.state), **(tags or {})}
    # Once: an attempt stopped after logging them (before FINISHED) already has them.
    if not any(m.step == result.epochs_completed
               for m in tracker.metric_history(run_id, "wall_time_s")):
        tracker.log_metrics(run_id, {**final, **(metrics or {})}, step=result.epochs_completed)
    write_json_atomic(run_dir / PROGRESS_NAME, {
        "epoch": result.epochs_completed, "num_epochs": cfg.num_epochs, "phase": "finished",
        "wall_time_s": final["wall_time_s"], "pid": os.getpid(), "time": time.time(),
        **{k: v for k, v in result.final.items()}})
    if result.stopped_reason:
        tags = {"stopped_reason": result.stopped_reason, **(tags or {})}
    if tags:
        tracker.set_tags(run_id, tags)
    if metrics is not None:  # a trial: its log is its artifact
        end_run(tracker, run_id, status, clear_reasons=status == "FINISHED")
        return
    artifacts = run_dir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    save_model_file(artifacts / "model.pth", logger.state)
    write_metrics_csv(result.history, artifacts / "metrics.csv")
    plot_run_curves(result.history, artifacts / "learning_curve.png",
                    title=tracker.get_run(run_id).info.run_name or run_id)
    tracker.log_artifact(run_id, run_dir / CONFIG_NAME)
    for name in ("model.pth", "metrics.csv", "learning_curve.png"):
        tracker.log_artifact(run_id, artifacts / name)
    end_run(tracker, run_id, status, clear_reasons=status == "FINISHED")


if __name__ == "__main__":
    sys.exit(main())
