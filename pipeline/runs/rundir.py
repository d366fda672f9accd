"""A run's folder: its resolved config, end-of-epoch checkpoint, progress file, lock and log.

    <runs_dir>/lcp-table-N/<id>/seed=<S>/<run_id>/   (a table run)
    <runs_dir>/lcp-tune-<id>/<study>/trial-NNNN/       (a tuning trial)

`config.yaml` (what the worker trains), `checkpoint.pt` (`lcp.fit` resumes from it),
`progress.json` (epoch, wall time, last metrics; rewritten atomically after every epoch),
`lock` (an exclusive `flock` while a worker runs: a second worker on the same folder exits
with EXIT_BUSY), `worker.log` (the process's output, every attempt appended) and `run.json`
(the run id and store, beside the checkpoint).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

DEFAULT_RUNS_DIR = "lcp-runs"  # --runs-dir of every command
CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.yaml"
PROGRESS_NAME = "progress.json"
LOCK_NAME = "lock"
LOG_NAME = "worker.log"
INFO_NAME = "run.json"
EXIT_BUSY = 75  # a worker's exit code when another process holds its run folder's lock


def pid_alive(pid) -> bool:
    """Whether process `pid` of this machine is alive (someone else's process is)."""
    try:
        if int(pid) <= 0:
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def read_progress(run_dir: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(run_dir) / PROGRESS_NAME).read_text())
    except (OSError, ValueError):
        return {}


def resume_point(run_dir: str | os.PathLike) -> tuple[int, float]:
    """(epochs completed, wall time so far in s) of the run's checkpoint — what a resumed run
    continues from. Both come from the checkpoint itself, never from the progress file (which a
    kill can leave behind or anyone can edit): the wall time is the progress file's only when it
    was written at the checkpoint's epoch, else the checkpoint's epoch times summed. (0, 0.0)
    without a readable checkpoint."""
    from lcp.training import load_checkpoint

    try:
        payload = load_checkpoint(Path(run_dir) / CHECKPOINT_NAME)
    except Exception:  # noqa: BLE001 - absent or unreadable: the worker says which when it loads
        return 0, 0.0
    epoch = int(payload.get("epoch", 0))
    progress = read_progress(run_dir)
    if progress.get("epoch") == epoch and isinstance(progress.get("wall_time_s"), (int, float)):
        return epoch, float(progress["wall_time_s"])
    return epoch, float(sum(r.get("epoch_time", 0.0) for r in payload.get("history", [])))


def progress_text(run_dir: str | os.PathLike) -> str:
    """'starting', or 'epoch E/N' and the last test accuracy the run's progress file holds."""
    info = read_progress(run_dir)
    if not info:
        return "starting"
    text = f"epoch {info.get('epoch', 0)}/{info.get('num_epochs', '?')}"
    if "eval_test/accuracy" in info:
        text += f" test acc {info['eval_test/accuracy']:.3f}"
    return text


def worker_command(run_dir: str | os.PathLike, run_id: str, uri: str, *extra: str) -> list[str]:
    """The command line of the one child entry point, `pipeline.worker`, on a run's folder."""
    return [sys.executable, "-m", "pipeline.worker", "--tracking-uri", uri, "--run-id", run_id,
            "--run-dir", str(run_dir), *extra]


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


def write_config(run_dir: Path, config: Mapping[str, Any], info: Mapping[str, Any]) -> None:
    """The folder's config.yaml (what the worker trains) and run.json (`info`: run id, store)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_NAME).write_text(yaml.safe_dump(dict(config), sort_keys=False))
    write_json_atomic(run_dir / INFO_NAME, dict(info))


def read_config(run_dir: Path) -> dict[str, Any]:
    return yaml.safe_load((run_dir / CONFIG_NAME).read_text())
