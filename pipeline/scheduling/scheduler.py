"""Run many jobs, each in its own process, on an executor's slots: one scheduler for every
command (`lcp run-table`, `lcp run`, `lcp tune`).

Nothing here knows MLflow or lcp: a `Job` is a command line with a log file; `Hooks` connect the
scheduler to the outside world (`pipeline.runs.table_run` for a table's runs,
`pipeline.tuning.tune` for trials). `run` takes a list of jobs or a job source, a callable asked
for the next job only when a slot is free (so that an Optuna trial is asked for at the moment it
can start).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from lcp.errors import LcpError
from pipeline.scheduling.executors import STOP_GRACE_S, Executor, describe_returncode

QUEUED, RUNNING, FINISHED, FAILED, KILLED = "queued", "running", "finished", "failed", "killed"


# ====================================================================== jobs


@dataclass
class Job:
    key: str  # what the display calls it, e.g. "t1-ff-bp/seed=0"
    command: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    payload: Any = None  # what the hooks need (pipeline.runs.table_run: the RunPlan)
    status: str = QUEUED
    attempts: int = 0
    returncode: int | None = None
    reason: str = ""
    slot: Any = None  # where the executor placed it (a local Slot), else None
    started_at: float | None = None
    ended_at: float | None = None
    first_started_at: float | None = None
    detail: str = ""  # progress text, e.g. "epoch 3/30"
    lost: str = ""  # why the executor lost it (its node or Ray worker died): not the job's fault


# ====================================================================== hooks and display


class Hooks:
    """What the scheduler tells the outside world (all optional)."""

    def before_start(self, job: Job) -> None: ...

    def on_started(self, job: Job) -> None:
        """The job's process was started (`job.slot` says where)."""

    def after_exit(self, job: Job, returncode: int) -> tuple[bool, str]:
        """(succeeded, reason) for an attempt that ended with `returncode`."""
        return returncode == 0, "" if returncode == 0 else describe_returncode(returncode)

    def on_done(self, job: Job) -> None:
        """The job will not run again (finished, finally failed or killed)."""

    def on_cancel(self, job: Job, was_running: bool) -> None:
        """The job was stopped (running) or never started (queued) because of a stop request."""

    def progress(self, job: Job) -> str:
        return ""


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
                 poll_interval: float = 0.2, grace_s: float = STOP_GRACE_S):
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
    def run(self, jobs: list[Job] = (), source: Callable[[], Job | None] | None = None
            ) -> SchedulerResult:
        """Run `jobs`, then the jobs `source` gives: it is asked only when a slot is free, and
        again after every job's end; None means "nothing now" (the run ends when it says None
        and nothing runs). SIGINT/SIGTERM (see `stop_on_signals`) and an error stop cleanly."""
        jobs = list(jobs)
        queue = [j for j in jobs if j.status == QUEUED]
        running: list[Job] = []
        try:
            while self.stop_reason is None:
                while self.executor.free_slots() > 0 and self.stop_reason is None:
                    job = queue.pop(0) if queue else source() if source is not None else None
                    if job is None:
                        break
                    if job not in jobs:
                        jobs.append(job)
                    if self._start(job, len(jobs), jobs):
                        running.append(job)
                if not (queue or running):
                    break
                time.sleep(self.poll_interval)
                for job in list(running):
                    rc = self.executor.poll(self._handles[id(job)])
                    if rc is None:
                        job.detail = self.hooks.progress(job)
                        continue
                    running.remove(job)
                    self._ended(job, rc, queue, jobs)
                self.display.status(jobs)
        except BaseException as exc:  # e.g. a job source's store went away: stop the others
            self.request_stop(f"an error in the scheduler ({type(exc).__name__})")
            self._stop(running, queue)
            raise
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
            job.ended_at = time.time()
            if self.stop_reason is not None:  # the start asked everything to stop (a full
                # disk): this job was not started, for that reason, like the queued ones
                self._not_started(job)
            else:
                job.status = FAILED
                job.reason = f"could not start: {exc}"
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
        self.hooks.on_started(job)
        return True

    def _ended(self, job: Job, rc: int, queue: list[Job], jobs: list[Job]) -> None:
        job.returncode = rc
        job.ended_at = time.time()
        ok, reason = self._after_exit(job, rc)
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
                ok, reason = self._after_exit(job, 0)
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
            self._not_started(job)
            self.hooks.on_done(job)

    def _not_started(self, job: Job) -> None:
        """`job` never ran: stopped before its start, for the stop's reason."""
        job.status = KILLED
        job.reason = f"not started ({self.stop_reason})"
        self.hooks.on_cancel(job, False)

    def _after_exit(self, job: Job, rc: int) -> tuple[bool, str]:
        try:
            return self.hooks.after_exit(job, rc)
        except Exception as exc:  # noqa: BLE001 - that job's failure, not the scheduler's
            return False, f"{describe_returncode(rc)}; checking its result failed: {exc}"


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
