"""Run many jobs, each in its own process, on a fixed set of slots (GPUs or CPU workers).

Nothing here knows MLflow or lcp: a `Job` is a command line with a log file; `Hooks` (given by
`pipeline.runs`) connect the scheduler to the tracking store. The scheduler owns the slots: a slot
is handed to one job at a time and pins it with `CUDA_VISIBLE_DEVICES` (GPU) or an empty
`CUDA_VISIBLE_DEVICES` and a share of the CPU threads (CPU), so runs started together never pick
the same GPU.

    executor = make_executor("local", gpus=None, workers=2)
    result = Scheduler(executor, hooks, retries=1).run(jobs)

An `Executor` starts, polls, stops and kills jobs. `LocalExecutor` runs subprocesses on this
machine; `pipeline.ray_executor.RayExecutor` (`make_executor("ray", address=..., cpus_per_run=...,
retries=...)`) runs each job as a Ray task on a cluster. Both implement the same five methods and
are registered in `EXECUTORS`.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from lcp.errors import LcpError

QUEUED, RUNNING, FINISHED, FAILED, KILLED = "queued", "running", "finished", "failed", "killed"


# ====================================================================== slots


@dataclass(frozen=True)
class Slot:
    """One place a job may run: a GPU share (`gpu` is the CUDA device id) or a CPU worker."""

    index: int
    gpu: str | None
    threads: int
    share: int = 0  # which of the runs-per-gpu places on that GPU

    @property
    def label(self) -> str:
        return f"gpu{self.gpu}#{self.share}" if self.gpu is not None else f"cpu#{self.index}"

    def env(self) -> dict[str, str]:
        threads = str(self.threads)
        return {
            "CUDA_VISIBLE_DEVICES": self.gpu if self.gpu is not None else "",
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "LCP_SLOT": self.label,
        }


class SlotPool:
    """A fixed set of slots; `acquire` hands out a free one (None when all are busy)."""

    def __init__(self, slots: list[Slot]):
        if not slots:
            raise LcpError("no slot to run on: give --workers ≥ 1 or --runs-per-gpu ≥ 1")
        self.slots = list(slots)
        self._busy: set[int] = set()
        self._lock = threading.Lock()

    @classmethod
    def for_gpus(cls, gpus: list[str], runs_per_gpu: int = 1, cpu_count: int | None = None,
                 threads: int | None = None) -> "SlotPool":
        if runs_per_gpu < 1:
            raise LcpError(f"--runs-per-gpu must be ≥ 1 (got {runs_per_gpu})")
        total = len(gpus) * runs_per_gpu
        threads = threads or max(1, (cpu_count or os.cpu_count() or 1) // max(1, total))
        slots, index = [], 0
        for share in range(runs_per_gpu):  # spread: the first runs go to different GPUs
            for gpu in gpus:
                slots.append(Slot(index, str(gpu), threads, share))
                index += 1
        return cls(slots)

    @classmethod
    def for_cpu(cls, workers: int = 1, cpu_count: int | None = None,
                threads: int | None = None) -> "SlotPool":
        if workers < 1:
            raise LcpError(f"--workers must be ≥ 1 (got {workers})")
        threads = threads or max(1, (cpu_count or os.cpu_count() or 1) // workers)
        return cls([Slot(i, None, threads) for i in range(workers)])

    @property
    def size(self) -> int:
        return len(self.slots)

    def free_count(self) -> int:
        with self._lock:
            return len(self.slots) - len(self._busy)

    def acquire(self) -> Slot | None:
        with self._lock:
            for slot in self.slots:
                if slot.index not in self._busy:
                    self._busy.add(slot.index)
                    return slot
            return None

    def release(self, slot: Slot) -> None:
        with self._lock:
            if slot.index not in self._busy:
                raise RuntimeError(f"slot {slot.label} released twice")
            self._busy.discard(slot.index)

    def describe(self) -> str:
        first = self.slots[0]
        if first.gpu is None:
            return f"{self.size} CPU worker(s) × {first.threads} thread(s)"
        gpus = sorted({s.gpu for s in self.slots}, key=str)
        per = self.size // max(1, len(gpus))
        return f"GPU(s) {','.join(gpus)} × {per} run(s) per GPU ({first.threads} CPU thread(s) each)"


def parse_gpus(text: str | None) -> list[str] | None:
    """--gpus: None/'auto' → detect; 'none'/'cpu' → []; '0,1' → ['0', '1']."""
    if text is None or text.strip().lower() in ("", "auto"):
        return None
    value = text.strip().lower()
    if value in ("none", "cpu"):
        return []
    items = [part.strip() for part in value.split(",")]
    if not all(item.isdigit() for item in items):
        raise LcpError(f"--gpus {text!r} is not valid: give GPU indices separated by commas "
                       "(e.g. --gpus 0,1), 'auto' (detect) or 'none' (CPU only)")
    if len(set(items)) != len(items):
        raise LcpError(f"--gpus {text!r} names a GPU twice; use --runs-per-gpu K for several "
                       "runs per GPU")
    return [str(int(item)) for item in items]


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ids for a child's CUDA_VISIBLE_DEVICES."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [part.strip() for part in env.split(",") if part.strip()]
        if not ids or ids[0].startswith("-"):
            return []
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA
        count = 0
    if env is not None:
        return ids[:count]
    return [str(i) for i in range(count)]


def choose_gpus(requested: list[str] | None, available: list[str] | None = None) -> list[str]:
    """The GPUs to use: `requested` (checked against the visible ones) or all visible ones."""
    available = visible_gpus() if available is None else available
    if requested is None:
        return list(available)
    if not requested:
        return []
    if not available:
        raise LcpError(f"--gpus {','.join(requested)} was given but no CUDA GPU is visible "
                       "(torch.cuda.device_count() is 0); leave --gpus out (or --gpus none) to "
                       "run on CPU with --workers N")
    unknown = [g for g in requested if g not in available]
    if unknown:
        raise LcpError(f"--gpus: GPU {', '.join(unknown)} is not visible; visible GPUs are: "
                       + ", ".join(available))
    return list(requested)


# ====================================================================== jobs and executors


def signal_process_group(process, signum: int) -> None:
    """Send `signum` to a worker's process group (its children too), else to the process."""
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass


@dataclass
class Job:
    key: str  # what the display calls it, e.g. "t1-ff-bp/seed=0"
    command: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    payload: Any = None  # what the hooks need (pipeline.runs: the RunPlan)
    status: str = QUEUED
    attempts: int = 0
    returncode: int | None = None
    reason: str = ""
    slot: Slot | None = None
    started_at: float | None = None
    ended_at: float | None = None
    first_started_at: float | None = None
    detail: str = ""  # progress text, e.g. "epoch 3/30"


class Executor(ABC):
    """Where jobs run. The scheduler calls `start` only while `free_slots() > 0`."""

    name = "?"

    @abstractmethod
    def free_slots(self) -> int: ...

    @abstractmethod
    def start(self, job: Job) -> Any: ...  # returns a handle

    @abstractmethod
    def poll(self, handle) -> int | None: ...  # exit code once ended (frees its slot)

    @abstractmethod
    def terminate(self, handle) -> None: ...  # ask to stop (SIGTERM)

    @abstractmethod
    def kill(self, handle) -> None: ...  # stop now (SIGKILL)

    def describe(self) -> str:
        return self.name


@dataclass
class _LocalHandle:
    process: Any
    slot: Slot
    log: TextIO
    released: bool = False


class LocalExecutor(Executor):
    """Subprocesses on this machine, one per slot; a crash or OOM kills only that process."""

    name = "local"

    def __init__(self, pool: SlotPool, base_env: dict[str, str] | None = None,
                 drop_env: tuple[str, ...] = ()):
        self.pool = pool
        self.base_env = dict(os.environ if base_env is None else base_env)
        for name in drop_env:
            self.base_env.pop(name, None)

    def free_slots(self) -> int:
        return self.pool.free_count()

    def describe(self) -> str:
        return f"local: {self.pool.describe()}"

    def start(self, job: Job) -> _LocalHandle:
        import subprocess

        slot = self.pool.acquire()
        if slot is None:
            raise RuntimeError("start() called without a free slot")
        env = {**self.base_env, **job.env, **slot.env()}
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(job.log_path, "a", buffering=1)
        log.write(f"=== {job.key}: attempt {job.attempts} on {slot.label} at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
        log.flush()
        try:
            process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, cwd=job.cwd,
                                       start_new_session=True)
        except OSError:
            log.close()
            self.pool.release(slot)
            raise
        job.slot = slot
        return _LocalHandle(process, slot, log)

    def poll(self, handle: _LocalHandle) -> int | None:
        rc = handle.process.poll()
        if rc is not None and not handle.released:
            handle.released = True
            handle.log.close()
            self.pool.release(handle.slot)
        return rc

    def _signal(self, handle: _LocalHandle, signum: int) -> None:
        if handle.process.poll() is not None:
            return
        try:
            os.killpg(handle.process.pid, signum)
        except (ProcessLookupError, PermissionError):
            try:
                handle.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def terminate(self, handle: _LocalHandle) -> None:
        self._signal(handle, signal.SIGTERM)

    def kill(self, handle: _LocalHandle) -> None:
        self._signal(handle, signal.SIGKILL)


EXECUTORS: dict[str, Callable[..., Executor]] = {}


def _local_factory(*, gpus: list[str] | None = None, runs_per_gpu: int = 1, workers: int = 1,
                   threads: int | None = None, drop_env: tuple[str, ...] = (), **_) -> Executor:
    chosen = choose_gpus(gpus)
    if chosen:
        pool = SlotPool.for_gpus(chosen, runs_per_gpu, threads=threads)
    else:
        pool = SlotPool.for_cpu(workers, threads=threads)
    return LocalExecutor(pool, drop_env=drop_env)


EXECUTORS["local"] = _local_factory


def _ray_factory(**options) -> Executor:
    # Imported here: Ray is an optional extra (LcpError with the install command when missing).
    from pipeline.ray_executor import make_ray_executor

    return make_ray_executor(**options)


EXECUTORS["ray"] = _ray_factory


def make_executor(name: str, **options) -> Executor:
    if name not in EXECUTORS:
        raise LcpError(f"--executor {name!r} is not available; valid executors are: "
                       + ", ".join(sorted(EXECUTORS)))
    return EXECUTORS[name](**options)


# ====================================================================== hooks and display


class Hooks:
    """What the scheduler tells the outside world (all optional)."""

    def before_start(self, job: Job) -> None: ...

    def after_exit(self, job: Job, returncode: int) -> tuple[bool, str]:
        """(succeeded, reason) for an attempt that ended with `returncode`."""
        return returncode == 0, "" if returncode == 0 else describe_returncode(returncode)

    def on_done(self, job: Job) -> None:
        """The job will not run again (finished, finally failed or killed)."""

    def on_cancel(self, job: Job, was_running: bool) -> None:
        """The job was stopped (running) or never started (queued) because of a stop request."""

    def progress(self, job: Job) -> str:
        return ""


def describe_returncode(rc: int) -> str:
    if rc < 0 or rc > 128:
        signum = -rc if rc < 0 else rc - 128
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        hint = " (out of memory, or killed from outside?)" if signum == signal.SIGKILL else ""
        return f"worker killed by {name}{hint}"
    return f"worker exited with code {rc}"


class ProgressDisplay:
    """Event lines (started / finished / failed) and a status line across runs.

    On a terminal the status line is rewritten in place; otherwise it is printed at most every
    `interval` seconds.
    """

    def __init__(self, stream: TextIO | None = None, interval: float = 30.0,
                 tty: bool | None = None, quiet: bool = False):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval if not self.tty else 0.5
        self.quiet = quiet
        self._last = float("-inf")
        self._line = ""

    def _clear(self) -> None:
        if self.tty and self._line:
            self.stream.write("\r\x1b[K")
            self._line = ""

    def event(self, text: str) -> None:
        if self.quiet:
            return
        self._clear()
        self.stream.write(text + "\n")
        self.stream.flush()

    def status(self, jobs: list[Job], force: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        line = status_line(jobs)
        if self.tty:
            self.stream.write("\r\x1b[K" + line[: max(20, _width() - 1)])
            self._line = line
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._clear()
        self.stream.flush()


def _width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 120


def status_line(jobs: list[Job]) -> str:
    counts = {s: sum(1 for j in jobs if j.status == s) for s in (QUEUED, RUNNING, FINISHED,
                                                                  FAILED, KILLED)}
    running = [f"{j.key} {j.detail}".strip() for j in jobs if j.status == RUNNING]
    text = (f"queued {counts[QUEUED]} | running {counts[RUNNING]} | finished {counts[FINISHED]} "
            f"| failed {counts[FAILED]}")
    if counts[KILLED]:
        text += f" | killed {counts[KILLED]}"
    if running:
        text += " — " + "; ".join(running)
    return text


# ====================================================================== the scheduler


@dataclass
class SchedulerResult:
    jobs: list[Job]
    stopped: str | None  # why the scheduler stopped early (signal name, fail-fast), else None

    @property
    def finished(self) -> list[Job]:
        return [j for j in self.jobs if j.status == FINISHED]

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if j.status == FAILED]

    @property
    def killed(self) -> list[Job]:
        return [j for j in self.jobs if j.status == KILLED]

    @property
    def ok(self) -> bool:
        return self.stopped is None and all(j.status == FINISHED for j in self.jobs)


class Scheduler:
    def __init__(self, executor: Executor, hooks: Hooks | None = None, *, retries: int = 0,
                 fail_fast: bool = False, display: ProgressDisplay | None = None,
                 poll_interval: float = 0.2, grace_s: float = 20.0):
        if retries < 0:
            raise LcpError(f"--retries must be ≥ 0 (got {retries})")
        self.executor = executor
        self.hooks = hooks or Hooks()
        self.retries = retries
        self.fail_fast = fail_fast
        self.display = display or ProgressDisplay(quiet=True)
        self.poll_interval = poll_interval
        self.grace_s = grace_s
        self.stop_reason: str | None = None
        self._force = False
        self._handles: dict[int, Any] = {}  # id(job) -> handle

    # ------------------------------------------------------------------ stopping
    def request_stop(self, reason: str) -> None:
        """Stop starting jobs, ask running ones to stop; a second request kills them now."""
        if self.stop_reason is not None:
            self._force = True
        else:
            self.stop_reason = reason

    # ------------------------------------------------------------------ the loop
    def run(self, jobs: list[Job]) -> SchedulerResult:
        queue = [j for j in jobs if j.status == QUEUED]
        running: list[Job] = []
        total = len(jobs)
        while (queue or running) and self.stop_reason is None:
            while queue and self.executor.free_slots() > 0 and self.stop_reason is None:
                job = queue.pop(0)
                if not self._start(job, total, jobs):
                    continue
                running.append(job)
            time.sleep(self.poll_interval)
            for job in list(running):
                rc = self.executor.poll(self._handles[id(job)])
                if rc is None:
                    job.detail = self.hooks.progress(job)
                    continue
                running.remove(job)
                self._ended(job, rc, queue, jobs)
            self.display.status(jobs)
        if self.stop_reason is not None:
            self._stop(running, queue)
        self.display.close()
        return SchedulerResult(jobs, self.stop_reason)

    def _start(self, job: Job, total: int, jobs: list[Job]) -> bool:
        job.attempts += 1
        job.status = RUNNING
        job.returncode = None
        job.detail = "starting"
        try:
            self.hooks.before_start(job)
            handle = self.executor.start(job)
        except Exception as exc:  # noqa: BLE001 - one job's start failure is that job's failure
            job.status = FAILED
            job.reason = f"could not start: {exc}"
            job.ended_at = time.time()
            self.display.event(f"[failed]   {job.key}: {job.reason}")
            self.hooks.on_done(job)
            return False
        self._handles[id(job)] = handle
        job.started_at = time.time()
        job.first_started_at = job.first_started_at or job.started_at
        attempt = f" (attempt {job.attempts})" if job.attempts > 1 else ""
        where = f" on {job.slot.label}" if job.slot is not None else ""
        done = sum(1 for j in jobs if j.status in (FINISHED, FAILED, KILLED))
        self.display.event(f"[started]  {job.key}{where}{attempt}  ({done}/{total} done)")
        return True

    def _ended(self, job: Job, rc: int, queue: list[Job], jobs: list[Job]) -> None:
        job.returncode = rc
        job.ended_at = time.time()
        try:
            ok, reason = self.hooks.after_exit(job, rc)
        except Exception as exc:  # noqa: BLE001
            ok, reason = False, f"{describe_returncode(rc)}; checking its result failed: {exc}"
        elapsed = job.ended_at - (job.started_at or job.ended_at)
        if ok:
            job.status = FINISHED
            job.reason = ""
            self.display.event(f"[finished] {job.key} in {elapsed:.0f}s {job.detail}".rstrip())
            self.hooks.on_done(job)
            return
        job.reason = reason
        if job.attempts <= self.retries and self.stop_reason is None:
            job.status = QUEUED
            self.display.event(f"[retry]    {job.key}: {reason} — retrying "
                               f"({job.attempts}/{self.retries + 1} attempts used; "
                               f"log {job.log_path})")
            queue.append(job)
            return
        job.status = FAILED
        self.display.event(f"[failed]   {job.key}: {reason} (log {job.log_path})")
        self.hooks.on_done(job)
        if self.fail_fast:
            self.request_stop(f"--fail-fast: {job.key} failed")

    def _stop(self, running: list[Job], queue: list[Job]) -> None:
        if running:
            self.display.event(f"stopping ({self.stop_reason}): asking {len(running)} running "
                               "run(s) to stop…")
        for job in running:
            self.executor.terminate(self._handles[id(job)])
        deadline = time.monotonic() + self.grace_s
        pending = list(running)
        while pending:
            for job in list(pending):
                rc = self.executor.poll(self._handles[id(job)])
                if rc is not None:
                    job.returncode = rc
                    pending.remove(job)
            if not pending:
                break
            if self._force or time.monotonic() > deadline:
                for job in pending:
                    self.executor.kill(self._handles[id(job)])
                while any(self.executor.poll(self._handles[id(j)]) is None for j in pending):
                    time.sleep(0.05)
                for job in pending:
                    job.returncode = self.executor.poll(self._handles[id(job)])
                pending = []
                break
            time.sleep(0.1)
        for job in running:
            job.ended_at = time.time()
            if job.returncode == 0:  # it finished just before the stop reached it
                ok, reason = self._safe_after_exit(job, 0)
                if ok:
                    job.status = FINISHED
                    self.display.event(f"[finished] {job.key}")
                    self.hooks.on_done(job)
                    continue
            job.status = KILLED
            job.reason = f"stopped ({self.stop_reason})"
            self.hooks.on_cancel(job, True)
            self.display.event(f"[killed]   {job.key}")
            self.hooks.on_done(job)
        for job in queue:
            job.status = KILLED
            job.reason = f"not started ({self.stop_reason})"
            self.hooks.on_cancel(job, False)
            self.hooks.on_done(job)

    def _safe_after_exit(self, job: Job, rc: int) -> tuple[bool, str]:
        try:
            return self.hooks.after_exit(job, rc)
        except Exception as exc:  # noqa: BLE001
            return False, str(exc)


# ====================================================================== signals


@contextmanager
def stop_on_signals(scheduler: Scheduler, signals=(signal.SIGINT, signal.SIGTERM)):
    """While inside, SIGINT/SIGTERM ask `scheduler` to stop cleanly (a second one: kill now)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):  # noqa: ARG001
        scheduler.request_stop(signal.Signals(signum).name)

    for signum in signals:
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
