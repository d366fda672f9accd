"""One training run in its own process: `python -m pipeline.worker --tracking-uri URI --run-id ID
--run-dir DIR`.

The scheduler creates the MLflow run (and writes `DIR/config.yaml`, the resolved config) before it
starts this process; the worker only logs to the run it is given. It

- sets the run RUNNING, tags the device and torch version, and resumes from `DIR/checkpoint.pt`
  when that exists (`lcp.fit(checkpoint_path=...)` restores model, optimizer, scheduler and RNG);
- logs its datasets as MLflow inputs (name, split, size, digest) and MLflow's system metrics
  (off with LCP_SYSTEM_METRICS=0);
- writes a plain progress line to its log per epoch and at least every 2 minutes inside one;
- logs every epoch's record at step=epoch in one `log_batch` call (after a resume, only the epochs
  the store does not have yet, so the history has no gap and no duplicate);
- at the end logs the final evaluation, then the artifacts (config.yaml, model.pth, metrics.csv,
  learning_curve.png) and only then marks the run FINISHED;
- on DivergenceError marks it FAILED with `failure_reason`; on SIGTERM/SIGINT marks it KILLED; on
  any other error prints the traceback (to its log file) and marks it FAILED with the reason.

Exit status: 0 finished, 3 diverged, 1 other failure, 75 the run is already being run by another
process (its lock is held), 128+signal when stopped by a signal.

Test hook: `LCP_PIPELINE_FAULT="[SCOPE:]KIND"` (SCOPE: a run-name prefix such as `t1-ff-bp` or
`t1-ff-bp/seed=1`; KIND: `raise@N` raise at the end of epoch N, `raise-once@N` the same on the
first attempt only, `exit@N` hard exit (like an OOM kill) at the end of epoch N, `sleep=S` sleep S
seconds after every epoch).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from lcp.callbacks import Callback

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_DIVERGED = 3
EXIT_BUSY = 75

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.yaml"
PROGRESS_NAME = "progress.json"
LOCK_NAME = "lock"
LOG_NAME = "worker.log"
FAULT_ENV = "LCP_PIPELINE_FAULT"


class WorkerInterrupted(KeyboardInterrupt):
    """Raised in the worker by SIGTERM/SIGINT so the run unwinds and is marked KILLED."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ====================================================================== files in the run folder


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def read_progress(run_dir: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(run_dir) / PROGRESS_NAME).read_text())
    except (OSError, ValueError):
        return {}


class RunLock:
    """An exclusive `flock` on DIR/lock while a worker runs (released by the OS if it dies)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.fh = None

    def acquire(self) -> bool:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.close()
            self.fh = None
            return False
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()
        return True

    def release(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def is_locked(run_dir: str | os.PathLike) -> bool:
    """True while some live process holds the run's lock."""
    if not (Path(run_dir) / LOCK_NAME).exists():
        return False
    lock = RunLock(run_dir)
    if lock.acquire():
        lock.release()
        return False
    return True


# ====================================================================== callbacks


class MlflowLogger(Callback):
    """Epoch records → MLflow (step=epoch, one batch per epoch) and DIR/progress.json."""

    def __init__(self, tracker, run_id: str, run_dir: Path, wall_before: float = 0.0):
        self.tracker, self.run_id, self.run_dir = tracker, run_id, run_dir
        self.wall_before = wall_before
        self.t0 = time.monotonic()
        self.state = None
        self.start_epoch = 0

    def wall_time(self) -> float:
        return self.wall_before + (time.monotonic() - self.t0)

    def on_fit_start(self, state):
        from lcp.errors import LcpError

        self.state = state
        self.start_epoch = state.epoch
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


class FaultInjector(Callback):
    """The LCP_PIPELINE_FAULT test hook (see the module docstring)."""

    def __init__(self, spec: str, name: str, run_dir: Path):
        self.kind, self.epoch, self.seconds = None, 1, 0.0
        self.run_dir = run_dir
        spec = spec.strip()
        if not spec:
            return
        scope, _, kind = spec.rpartition(":") if ":" in spec else ("", "", spec)
        if scope and not (name == scope or name.startswith(scope + "/")):
            return
        if kind.startswith("sleep="):
            self.kind, self.seconds = "sleep", float(kind.split("=", 1)[1])
            return
        base, _, at = kind.partition("@")
        if base not in ("raise", "raise-once", "exit"):
            raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r}")
        self.kind, self.epoch = base, int(at or 1)

    def on_epoch_end(self, state, metrics):
        if self.kind == "sleep":
            time.sleep(self.seconds)
        elif self.kind is not None and state.epoch == self.epoch:
            if self.kind == "exit":
                os._exit(137)
            marker = self.run_dir / ".fault-fired"
            if self.kind == "raise-once":
                if marker.exists():
                    return
                marker.write_text("1")
            raise RuntimeError(f"injected fault ({FAULT_ENV}) at the end of epoch {state.epoch}")


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

    train, evals, _, _ = loaders
    out = []
    for split, loader in [("train", train)] + [(k, v) for k, v in evals.items() if k != "train"]:
        digest = hashlib.sha256(loader.x.cpu().numpy().tobytes())
        digest.update(loader.y.cpu().numpy().tobytes())
        out.append({"name": cfg.data, "split": split, "size": loader.dataset_size,
                    "digest": digest.hexdigest()[:16], "source": cfg.data_dir})
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
        raise WorkerInterrupted(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return _run(args, run_dir)
    finally:
        lock.release()


def _run(args, run_dir: Path) -> int:
    import yaml

    from pipeline.tracking import Tracker

    tracker = Tracker(args.tracking_uri, check=True, create=False)
    run_id = args.run_id
    try:
        import torch

        threads = args.threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads > 0:  # the scheduler's share of the CPU for this run
            torch.set_num_threads(threads)
        from lcp import native
        from lcp.config import RunConfig
        from lcp.data import build_loaders
        from lcp.training import fit
        from pipeline.tracking import (SYSTEM_METRICS_ENV, start_system_metrics,
                                       stop_system_metrics)

        cfg = RunConfig.from_dict(yaml.safe_load((run_dir / CONFIG_NAME).read_text()))
        checkpoint = run_dir / CHECKPOINT_NAME
        previous = read_progress(run_dir)
        resumed_from = int(previous.get("epoch", 0)) if checkpoint.exists() else 0
        run = tracker.get_run(run_id)
        if run.info.status == "FINISHED":  # never reopened: its results are final
            print(f"worker: run {run_id} is already FINISHED; nothing to do", flush=True)
            return EXIT_OK
        tracker.set_status(run_id, "RUNNING")
        name = run.info.run_name or run_id
        tracker.set_tags(run_id, {
            "device": describe_device(cfg), "torch_version": torch.__version__,
            "attempt": args.attempt, "worker_pid": os.getpid(),
            "torch_threads": torch.get_num_threads(), "compiled_kernels": native.summary(),
            **({"resumed_from_epoch": resumed_from} if checkpoint.exists() else {}),
        })
        print(f"worker: run {run_id} ({name}) attempt {args.attempt}, "
              + (f"resuming from epoch {resumed_from}" if checkpoint.exists() else "from epoch 0")
              + f", device {describe_device(cfg)}, {torch.get_num_threads()} threads"
              + f", compiled kernels {native.summary()}", flush=True)
        logger = MlflowLogger(tracker, run_id, run_dir,
                              float(previous.get("wall_time_s", 0.0)) if checkpoint.exists()
                              else 0.0)
        from lcp.progress import ProgressBar

        # its log is a file: one plain line per epoch and at least every 2 minutes inside one
        callbacks = [logger, ProgressBar(sys.stderr, plain=True)]
        fault = os.environ.get(FAULT_ENV, "")
        if fault:
            callbacks.append(FaultInjector(fault, name, run_dir))
        loaders = build_loaders(cfg)
        if not checkpoint.exists():
            tracker.log_datasets(run_id, dataset_inputs(cfg, loaders))
        monitor = start_system_metrics(tracker.uri, run_id, resume=checkpoint.exists())
        tracker.set_tags(run_id, {"system_metrics": "on" if monitor else
                                  f"off ({SYSTEM_METRICS_ENV}=0)"})
        try:
            result = fit(cfg, callbacks, checkpoint_path=checkpoint, loaders=loaders)
        finally:
            if monitor is not None:
                stop_system_metrics(monitor)
        _finish(tracker, run_id, run_dir, cfg, result, logger)
        print(f"worker: run {run_id} finished: " + ", ".join(
            f"{k}={v:.4f}" for k, v in result.final.items()), flush=True)
        return EXIT_OK
    except WorkerInterrupted as exc:
        print(f"worker: stopped by {exc}; marking run {run_id} KILLED", file=sys.stderr,
              flush=True)
        _mark(tracker, run_id, "KILLED", {"killed_reason": f"worker received {exc}"})
        return 128 + exc.signum
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then the exit code
        from lcp.errors import DivergenceError

        traceback.print_exc()
        reason = failure_reason(exc)
        print(f"worker: run {run_id} failed: {reason}", file=sys.stderr, flush=True)
        _mark(tracker, run_id, "FAILED", {"failure_reason": reason})
        return EXIT_DIVERGED if isinstance(exc, DivergenceError) else EXIT_FAILED


def _mark(tracker, run_id: str, status: str, tags: dict) -> None:
    try:
        tracker.set_tags(run_id, tags)
        tracker.terminate(run_id, status)
    except Exception as exc:  # noqa: BLE001 - the scheduler marks it from outside then
        print(f"worker: could not mark run {run_id} {status}: {exc}", file=sys.stderr, flush=True)


def _finish(tracker, run_id: str, run_dir: Path, cfg, result, logger: MlflowLogger) -> None:
    from lcp.training import save_model_file
    from pipeline.report import plot_run_curves

    last = result.history[-1] if result.history else {}
    final = {k: v for k, v in result.final.items() if not (k in last and last[k] == v)}
    final["wall_time_s"] = logger.wall_time()
    # Once: an attempt stopped after logging them (before FINISHED) already has them.
    if not any(m.step == result.epochs_completed
               for m in tracker.metric_history(run_id, "wall_time_s")):
        tracker.log_metrics(run_id, final, step=result.epochs_completed)
    write_json_atomic(run_dir / PROGRESS_NAME, {
        "epoch": result.epochs_completed, "num_epochs": cfg.num_epochs, "phase": "finished",
        "wall_time_s": final["wall_time_s"], "pid": os.getpid(), "time": time.time(),
        **{k: v for k, v in result.final.items()}})
    artifacts = run_dir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    save_model_file(artifacts / "model.pth", logger.state)
    write_metrics_csv(result.history, artifacts / "metrics.csv")
    plot_run_curves(result.history, artifacts / "learning_curve.png",
                    title=tracker.get_run(run_id).info.run_name or run_id)
    tracker.log_artifact(run_id, run_dir / CONFIG_NAME)
    for name in ("model.pth", "metrics.csv", "learning_curve.png"):
        tracker.log_artifact(run_id, artifacts / name)
    if result.stopped_reason:
        tracker.set_tags(run_id, {"stopped_reason": result.stopped_reason})
    tracker.delete_tags(run_id, ("failure_reason", "killed_reason"))  # of earlier attempts
    tracker.terminate(run_id, "FINISHED")


if __name__ == "__main__":
    sys.exit(main())
