"""`lcp tune`: an Optuna study's trials as jobs of the pipeline's one scheduler (docs/tuning.md).

    status = tune(TuneRequest("t1-ff-lcp-di", trials=50), echo=click.echo)  # the command
    summary = Tuner(plan, study, storage, spec, request=TuneRequest(ID, trials=50),
                    executor=executor, tracker=tracker).run()

The `Tuner` is the scheduler's job source and hooks: Optuna is asked for the next trial only when
a slot is free, the trial's nested MLflow run is created before its process starts, and trial and
run are reconciled after it exits. The worker's side of a trial is `pipeline.tuning.trial`.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from lcp.config import ConfigError
from lcp.errors import first_line
from pipeline.manifest.manifest import DEFAULT_PATH, load_manifest
from pipeline.manifest.selection import Item, Selection
from pipeline.runs.rundir import DEFAULT_RUNS_DIR, progress_text, worker_command, write_config
from pipeline.scheduling.executors import (ExecutorOptions, child_env, default_cpu_workers,
                                           describe_returncode, make_executor)
from pipeline.scheduling.scheduler import (FAILED, Hooks, Job, ProgressDisplay, Scheduler,
                                           stop_on_signals)
from pipeline.tracking import store
from pipeline.tracking.run_status import end_if_open, end_run
from pipeline.tuning.optuna_study import (A_BASELINE, A_HEARTBEAT, A_HOST, A_PID, A_REASON,
                                          A_RETRY_OF, A_RUN, A_SURPLUS, EXPORT_SUFFIX, HEARTBEAT_S,
                                          OBJECTIVE, StorageSpec, TuneError, TunePlan,
                                          baseline_values, best_effort, best_trial,
                                          counts_toward_total, describe_space, describe_trial,
                                          distributions, ensure_parent_run, export_overrides,
                                          export_row, export_target, format_value, is_failure,
                                          mark_interrupted, mlflow_outcome, open_storage,
                                          open_study, prepare, recover_stale, resolve_storage,
                                          safe_name, storage_warnings, tally, trial_id,
                                          tune_experiment_name)

SPEC_NAME = "spec.json"
LOG_NAME = "trial.log"
# A call starts no new trial once this many of its trials FAILED and more of them failed than
# completed or were pruned (failed trials do not count toward --trials: without this a study whose
# every trial fails, e.g. on a missing dataset, would ask for trials forever).
GIVE_UP_AFTER_FAILURES = 3


@dataclass
class TrialJob:
    """What the hooks keep of a started trial (the job's payload)."""

    number: int
    tid: int
    run_id: str
    folder: Path
    params: dict[str, Any]
    retry_of: int | None = None
    started: float = field(default_factory=time.monotonic)


@dataclass
class TuneSummary:
    study: str
    counts: dict[str, int]
    started: int
    interrupted_recovered: int
    best: Any  # FrozenTrial or None
    parent_run_id: str | None
    artifacts: list[str]
    stopped: str | None
    notes: list[str] = field(default_factory=list)
    failed: int = 0  # trials of this call that FAILED (not interrupted)
    ended: int = 0  # trials of this call that ended COMPLETE or PRUNED
    first_failure: str | None = None  # "trial N FAILED: <reason>", the first of this call
    gave_up: bool = False  # this call stopped starting trials after GIVE_UP_AFTER_FAILURES


class Tuner(Hooks):
    """Runs trials of one study on `executor` until the study holds `trials` counted trials (or
    `timeout` seconds passed)."""

    def __init__(self, plan: TunePlan, study, storage, storage_spec: StorageSpec, *,
                 request: TuneRequest, executor, tracker, echo: Callable[[str], None] = print):
        """`request`: its trials (the study's total), timeout, pruner and runs folder."""
        self.plan, self.study, self.storage, self.spec = plan, study, storage, storage_spec
        self.trials, self.timeout, self.pruner = request.trials, request.timeout, request.pruner
        self.executor, self.tracker, self.echo = executor, tracker, echo
        self.folder = (Path(request.runs_dir) / tune_experiment_name(plan.exp.id)
                       / safe_name(study.study_name)).resolve()
        self.running: dict[int, TrialJob] = {}
        self.parent_run_id: str | None = None
        self.best_number: int | None = None
        self.started = self.recovered = 0
        self.distributions = distributions(plan.space)
        self.host = socket.gethostname()
        self._began = self._recovered_at = time.monotonic()
        self._timed_out = False
        self.scheduler: Scheduler | None = None
        # this call's outcomes (to stop asking when every trial fails, and to say why)
        self.failed = self.ended = 0
        self.first_failure: str | None = None
        self.gave_up = False
        self._outcomes: set[int] = set()  # trial numbers whose outcome was counted

    # ------------------------------------------------------------------ the run
    def run(self) -> TuneSummary:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parent_run_id = ensure_parent_run(self.tracker, self.study, self.plan, self.spec,
                                               self.pruner)
        self.experiment = self.tracker.ensure_experiment(tune_experiment_name(self.plan.exp.id))
        if best_trial(self.study) is not None:
            tags = self.tracker.get_run(self.parent_run_id).data.tags
            self.best_number = int(tags.get("lcp.best_trial", -1))
        self.recovered += recover_stale(self.study, self.storage, tracker=self.tracker,
                                        echo=self.echo)
        counts = tally(self.study.get_trials(deepcopy=False))
        if counts["counted"] >= self.trials and not counts["waiting"]:
            self.echo(f"the study already has {counts['counted']} trial(s) (≥ --trials "
                      f"{self.trials}): nothing to run")
        else:
            todo = max(0, self.trials - counts["counted"]) + counts["waiting"]
            failed = (f", {counts['failed']} failed (not counted)" if counts["failed"] else "")
            self.echo(f"running {todo} trial(s) to reach {self.trials} "
                      f"({counts['finished']} finished{failed}, {counts['running']} running "
                      f"elsewhere, {counts['waiting']} enqueued) on {self.executor.describe()}")
        self._began = self._recovered_at = time.monotonic()
        self.scheduler = Scheduler(self.executor, self, display=ProgressDisplay(quiet=True))
        with stop_on_signals(self.scheduler):
            result = self.scheduler.run(source=self.next_job)
        return self._finish(result.stopped)

    # ------------------------------------------------------------------ the job source
    def next_job(self) -> Job | None:
        """The next trial as a job, asked of Optuna now; None when the study needs none."""
        from optuna.trial import TrialState

        if self.timeout is not None and time.monotonic() - self._began >= self.timeout:
            counts = tally(self.study.get_trials(deepcopy=False))
            if not self._timed_out and (counts["waiting"] or counts["counted"] < self.trials):
                self.echo(f"--timeout {self.timeout:g} s reached: no new trials "
                          f"({counts['counted']} of {self.trials}); run again to go on")
            self._timed_out = True
            return None
        if self._give_up():
            return None
        if time.monotonic() - self._recovered_at > HEARTBEAT_S:
            self.recovered += recover_stale(self.study, self.storage, skip=self.running,
                                            tracker=self.tracker, echo=self.echo)
            self._recovered_at = time.monotonic()
        while not self._give_up():
            counts = tally(self.study.get_trials(deepcopy=False))
            if not (counts["waiting"] or counts["counted"] < self.trials):
                return None
            trial = self.study.ask(self.distributions)
            trial.set_user_attr(A_HOST, self.host)
            trial.set_user_attr(A_PID, os.getpid())
            trial.set_user_attr(A_HEARTBEAT, time.time())
            counted = sorted(t.number for t in self.study.get_trials(deepcopy=False)
                             if counts_toward_total(t))
            if trial.number in counted and counted.index(trial.number) >= self.trials:
                # Another process (machine) asked at the same time and the total is reached.
                trial.set_user_attr(A_SURPLUS, True)
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            try:
                return self._job(trial)
            except ConfigError as exc:
                trial.set_user_attr(A_REASON, f"invalid config: {exc}")
                self.study.tell(trial, state=TrialState.FAIL)
                self.echo(f"trial {trial.number} FAILED: invalid config: {exc}")
                self._count(trial.number, False, f"invalid config: {exc}")
        return None

    def _give_up(self) -> bool:
        """True (said once) when this call should start no new trial: GIVE_UP_AFTER_FAILURES of
        its trials FAILED and fewer of them completed or were pruned."""
        if self.gave_up:
            return True
        if self.failed < GIVE_UP_AFTER_FAILURES or self.failed <= self.ended:
            return False
        self.gave_up = True
        ended = (f"only {self.ended} completed or pruned" if self.ended else
                 "none completed or was pruned")
        self.echo(f"{self.failed} trials of this call FAILED and {ended}: starting no new trial "
                  f"(first: {self.first_failure}); failed trials do not count toward --trials")
        return True

    def _count(self, number: int, ended: bool, reason: str = "") -> None:
        """Count trial `number`'s outcome for this call once: ended (COMPLETE or PRUNED) or
        FAILED with `reason`."""
        if number in self._outcomes:
            return
        self._outcomes.add(number)
        if ended:
            self.ended += 1
            return
        self.failed += 1
        if self.first_failure is None:
            self.first_failure = f"trial {number} FAILED: {reason or 'no reason recorded'}"

    def _job(self, trial) -> Job:
        number, params = trial.number, dict(trial.params)
        folder = self.folder / f"trial-{number:04d}"
        cfg = self.plan.trial_config(params).replace(out_dir=str(folder))
        retry_of = trial.user_attrs.get(A_RETRY_OF)
        tags = {"mlflow.parentRunId": self.parent_run_id, "lcp.kind": "tune-trial",
                "lcp.id": self.plan.exp.id, "lcp.study": self.study.study_name,
                "optuna.trial_number": number, "optuna.state": "RUNNING",
                "lcp.retry_of": retry_of, "lcp.host": self.host, "lcp.log": str(folder / LOG_NAME)}
        run_id = self.tracker.create_run(self.experiment, f"trial-{number}", tags=tags,
                                         params={**params, "trial_number": number},
                                         status="SCHEDULED")
        trial.set_user_attr(A_RUN, run_id)
        write_config(folder, cfg.to_dict(), {"run_id": run_id, "tracking_uri": self.tracker.uri,
                                             "study": self.study.study_name, "trial": number})
        (folder / SPEC_NAME).write_text(json.dumps({
            "storage": self.spec.to_dict(), "study": self.study.study_name, "number": number,
            # the baseline is the reference the study is read against: never pruned
            "pruner": "none" if trial.user_attrs.get(A_BASELINE) else self.pruner,
            "params": params, "heartbeat_s": HEARTBEAT_S}, indent=2))
        command = worker_command(folder, run_id, self.tracker.uri, "--trial",
                                 str(folder / SPEC_NAME))
        payload = TrialJob(number, trial_id(self.study, self.storage, number), run_id, folder,
                           params, retry_of)
        return Job(key=f"{self.study.study_name}/trial-{number}", command=command,
                   log_path=folder / LOG_NAME, env=child_env(cfg.seed >= 0), cwd=os.getcwd(),
                   payload=payload)

    # ------------------------------------------------------------------ a trial's life
    def on_started(self, job: Job) -> None:
        info: TrialJob = job.payload
        self.running[info.number] = info
        self.started += 1
        shown = ", ".join(f"{k}={format_value(v)}" for k, v in info.params.items())
        again = f" (again, interrupted trial {info.retry_of})" if info.retry_of is not None else ""
        where = job.slot.label if job.slot is not None else self.executor.name
        self.echo(f"trial {info.number} started{again}: {shown}  [{where}, log {job.log_path}]")

    def progress(self, job: Job) -> str:
        return progress_text(job.payload.folder)

    def after_exit(self, job: Job, returncode: int) -> tuple[bool, str]:
        """Reconcile the trial and its run with how the process ended."""
        from optuna.trial import TrialState

        info: TrialJob = job.payload
        trial = self.storage.get_trial(info.tid)
        elapsed = time.monotonic() - info.started
        if trial.state == TrialState.RUNNING:
            if job.lost:  # Ray lost the task (its node or worker died): not the trial's fault
                self._interrupt(job, trial, job.lost, "enqueued again")
                self._outcomes.add(info.number)  # neither a failure nor an outcome
                return False, job.lost
            self._fail(info, f"{describe_returncode(returncode)}{_log_tail(job.log_path)}")
            trial = self.storage.get_trial(info.tid)
        run = best_effort(lambda: self.tracker.get_run(info.run_id))
        if run is not None and run.info.status in ("RUNNING", "SCHEDULED"):
            status, tags = mlflow_outcome(trial)
            self._close_run(info.run_id, status, tags)
        self.echo(describe_trial(trial, elapsed))
        reason = trial.user_attrs.get(A_REASON) or ""
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
            self._count(info.number, True)
        elif is_failure(trial):
            self._count(info.number, False, reason)
        else:  # interrupted meanwhile (e.g. by another machine's recovery): enqueued again
            self._outcomes.add(info.number)
        return trial.state != TrialState.FAIL, reason

    def on_cancel(self, job: Job, was_running: bool) -> None:
        from optuna.trial import TrialState

        trial = best_effort(lambda: self.storage.get_trial(job.payload.tid))
        if trial is not None and trial.state == TrialState.RUNNING:
            self._interrupt(job, trial, f"stopped by {self.scheduler.stop_reason}",
                            "enqueued again for the next call")

    def on_done(self, job: Job) -> None:
        info: TrialJob = job.payload
        self.running.pop(info.number, None)
        if job.returncode is None and job.status == FAILED:  # its process could not start
            self._fail(info, job.reason)
            self._close_run(info.run_id, "FAILED", {"failure_reason": job.reason,
                                                    "optuna.state": "FAIL"})
            self.echo(f"trial {info.number} FAILED: {job.reason}")
        if job.status == FAILED:  # not counted yet when checking its result raised
            self._count(info.number, False, job.reason)
        if job.log_path.exists():
            best_effort(lambda: self.tracker.log_artifact(info.run_id, job.log_path, "logs"))
        try:
            self._update_best()
        except Exception as exc:  # noqa: BLE001 - e.g. the storage is unreachable for now
            self.echo(f"warning: could not update the best trial ({first_line(exc)})")

    def _fail(self, info: TrialJob, reason: str) -> None:
        """The trial FAILED with `reason` (unless its process told Optuna how it ended)."""
        from optuna.trial import TrialState

        best_effort(lambda: self.storage.set_trial_user_attr(info.tid, A_REASON, reason))
        best_effort(lambda: self.study.tell(info.number, state=TrialState.FAIL,
                                            skip_if_finished=True))

    def _interrupt(self, job: Job, trial, reason: str, then: str) -> None:
        mark_interrupted(self.study, self.storage, trial, reason, self.tracker)
        self.echo(f"trial {job.payload.number} interrupted ({reason}): {then}")

    def _close_run(self, run_id: str, status: str, tags: dict[str, Any]) -> None:
        """A trial's run its process left open (it died, or never started)."""
        best_effort(lambda: end_if_open(self.tracker, run_id, status, tags))

    def _update_best(self) -> None:
        best = best_trial(self.study)
        if best is None or best.number == self.best_number:
            return
        if self.best_number is not None and self.best_number >= 0:
            previous = self.study.trials[self.best_number].user_attrs.get(A_RUN)
            if previous:
                best_effort(lambda: self.tracker.set_tags(previous, {"lcp.best": "false"}))
        run_id = best.user_attrs.get(A_RUN)
        if run_id:
            best_effort(lambda: self.tracker.set_tags(run_id, {"lcp.best": "true"}))
        best_effort(lambda: self.tracker.set_tags(self.parent_run_id, {
            "lcp.best_trial": best.number, "lcp.best_run_id": run_id,
            "lcp.best_params": json.dumps(best.params)}))
        self.best_number = best.number

    # ------------------------------------------------------------------ the end
    def _finish(self, stopped: str | None) -> TuneSummary:
        from pipeline.reporting.plots import write_study_files

        counts = tally(self.study.get_trials(deepcopy=False))
        best = best_trial(self.study)
        self._update_best()
        notes: list[str] = []
        artifacts: list[str] = []
        files = write_study_files(self.study, self.folder, notes)
        metrics = {"trials/complete": counts["complete"], "trials/pruned": counts["pruned"],
                   "trials/failed": counts["failed"], "trials/finished": counts["finished"]}
        if best is not None:
            metrics["best_value"] = best.value
        best_effort(lambda: self.tracker.log_metrics(self.parent_run_id, metrics,
                                                     step=counts["finished"]))
        for path in files:
            sub = "plots" if path.suffix == ".png" else None
            if best_effort(lambda p=path, s=sub: self.tracker.log_artifact(
                    self.parent_run_id, p, s) or True):
                artifacts.append(f"{sub}/{path.name}" if sub else path.name)
        best_effort(lambda: end_run(self.tracker, self.parent_run_id,
                                    "KILLED" if stopped else "FINISHED"))
        return TuneSummary(study=self.study.study_name, counts=counts, started=self.started,
                           interrupted_recovered=self.recovered, best=best,
                           parent_run_id=self.parent_run_id, artifacts=artifacts,
                           stopped=stopped, notes=notes, failed=self.failed, ended=self.ended,
                           first_failure=self.first_failure, gave_up=self.gave_up)


def _log_tail(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines()
                 if line.strip() and not line.startswith("===")]
    except OSError:
        return ""
    return f": {lines[-1][:300]}" if lines else ""


# ====================================================================== lcp tune

QUICK_TUNE_TRIALS = 6  # --trials with --quick
QUICK_STUDY_SUFFIX = "quick"  # --quick's study: ID-quick (settings are part of its identity)
# Settings that only tuning uses: not given to `lcp run ID-tuned` (it trains on the whole
# training set and evaluates the test set).
TUNING_ONLY = ("validation_split", "validation_seed")


@dataclass(frozen=True)
class TuneRequest:
    """What `lcp tune ID` is asked: its options, as given."""

    experiment_id: str
    trials: int | None = None  # the study's total (None: --export alone, or --quick's default)
    params: str | None = None  # k_i,k_p,alpha
    spaces: tuple[str, ...] = ()  # --space PARAM=LOW:HIGH[:log]
    storage: str | None = None
    storage_given: bool = False  # --storage on the command line (not $LCP_OPTUNA_STORAGE)
    study_name: str | None = None
    timeout: float | None = None
    selection: Selection = field(default_factory=Selection)  # --set, --quick, --data-dir
    pruner: str = "median"
    manifest_path: str = DEFAULT_PATH
    tracking_uri: str | None = None
    runs_dir: str = DEFAULT_RUNS_DIR
    export: bool = False
    export_suffix: str = EXPORT_SUFFIX
    export_to: str | None = None
    baseline: bool = False  # enqueue the row's own setting as a trial (once per study)
    executor_options: ExecutorOptions = field(default_factory=ExecutorOptions)


def tune(request: TuneRequest, *, echo) -> int:
    """`lcp tune`: run the trials the study misses on the executor, then print its summary and
    next steps through `echo` (click.echo's signature); with --export and no --trials, export
    the study as it is. Returns the command's exit status; TuneError for what the user must
    fix."""
    quick, exporting = request.selection.quick, request.export or request.export_to
    if request.trials is None and quick and not exporting:
        request = replace(request, trials=QUICK_TUNE_TRIALS)
    trials = request.trials
    if trials is None and not exporting:
        raise TuneError("give --trials N (the study's total number of trials) to tune, or "
                        "--export to write the best parameters of an existing study")
    if trials is not None and trials < 1:
        raise TuneError(f"--trials must be ≥ 1 (got {trials})")
    if request.timeout is not None and not request.timeout > 0:
        raise TuneError(f"--timeout must be > 0 seconds (got {request.timeout})")
    request.executor_options.check()
    manifest = load_manifest(request.manifest_path)
    exp = manifest.get(request.experiment_id)
    # --export writes the manifest that was read; refused before anything changes
    target = export_target(manifest) if request.export else None
    overrides = request.selection.overrides()
    uri = store.resolve_tracking_uri(request.tracking_uri)
    spec = resolve_storage(request.storage, uri)
    name = request.study_name or (f"{exp.id}-{QUICK_STUDY_SUFFIX}" if quick else exp.id)
    hints = TuneHints(request, manifest)
    if trials is None:  # export only: the study as it is
        study = open_study(None, open_storage(spec), name, create=False, exp_id=exp.id)
        export_study(exp, study, target, spec, overrides, hints, echo)
        return 0

    plan = prepare(exp, overrides, request.params.split(",") if request.params is not None
                   else None, request.spaces)
    # without MNIST, the quick study runs on mnist-sample (as run-table --quick)
    plan.base = request.selection.fallback([Item(exp, plan.base.seed, plan.base)],
                                           download=True, echo=echo)[0].cfg
    baseline = baseline_values(plan) if request.baseline else None
    workers = request.executor_options.workers or default_cpu_workers(quick)
    for warning in plan.warnings + storage_warnings(spec, workers):
        echo(f"warning: {warning}", err=True)
    storage = open_storage(spec)  # first: a wrong --storage creates nothing
    tracker = store.Tracker(uri)  # checks the MLflow store (clear error when unreachable)
    with make_executor(request.executor_options, short_runs=quick,
                       drop_env=store.MLFLOW_RUN_ENV) as runner:
        nodes = runner.nodes()
        if nodes > 1 and spec.kind == "journal":
            raise TuneError("the Ray cluster has several machines: a journal file is for one "
                            "machine's local disk; give --storage postgresql://USER:PW@HOST/DB "
                            "(or $LCP_OPTUNA_STORAGE), which every node reaches")
        store.warn_unless_shared(nodes, uri, echo)
        echo(f"executor {runner.describe()}")
        study = open_study(plan, storage, name, pruner=request.pruner)
        echo(f"study {name} — {spec.display()}; tracking {uri}")
        if baseline is not None:  # once per study: Optuna skips it when a trial has its values
            study.enqueue_trial(baseline, user_attrs={A_BASELINE: True}, skip_if_exists=True)
            echo("baseline: the row's own setting (" + ", ".join(
                f"{k}={format_value(v)}" for k, v in baseline.items()) + ") is a trial")
        echo(f"tuning {exp.id} ({exp.label}): {describe_space(plan.space)}")
        echo(f"objective: {OBJECTIVE} on {plan.base.validation_split:g} of the training set "
             f"(validation_seed {plan.base.validation_seed}), seed {plan.base.seed}, "
             f"{plan.base.num_epochs} epoch(s), pruner {request.pruner}")
        summary = Tuner(plan, study, storage, spec, request=request, executor=runner,
                        tracker=tracker, echo=echo).run()
    print_summary(summary, trials, hints, echo)
    if summary.stopped:
        echo(f"stopped: {summary.stopped}. Run the same command again to resume.", err=True)
        return 130 if summary.stopped == "SIGINT" else 143
    if summary.best is None:
        raise TuneError(no_complete_trial(summary))
    if exporting:
        export_study(exp, study, target, spec, overrides, hints, echo)
    return 0


class TuneHints:
    """The commands `lcp tune` prints as next steps, with the options this call was given (the
    study, an explicit --storage, the manifest, the tracking store, the data and settings), so
    that each runs as printed."""

    def __init__(self, request: TuneRequest, manifest):
        self.request = request
        self.manifest = str(manifest.path) if request.manifest_path != DEFAULT_PATH else None

    def _where(self) -> list[str]:
        return _opt("--manifest", self.manifest) + _opt("--tracking-uri",
                                                        self.request.tracking_uri)

    def _settings(self, *, tuning: bool) -> list[str]:
        selection = self.request.selection
        out = ["--quick"] if selection.quick else []
        for text in selection.sets:
            key = text.split("=", 1)[0].strip().replace("-", "_")
            if tuning or key not in TUNING_ONLY:
                out += ["--set", text]
        return out

    def _data(self) -> list[str]:
        runs_dir = self.request.runs_dir
        return _opt("--data-dir", self.request.selection.data_dir) + _opt(
            "--runs-dir", runs_dir if runs_dir != DEFAULT_RUNS_DIR else None)

    def export(self) -> str:
        r = self.request
        suffix = ["--export-suffix", r.export_suffix] if r.export_suffix != EXPORT_SUFFIX else []
        return _command("tune", r.experiment_id, "--export", *suffix,
                        *_opt("--study", r.study_name),
                        *_opt("--storage", r.storage if r.storage_given else None),
                        *self._where(), *self._settings(tuning=True), *self._data())

    def run(self, row_id: str) -> str:
        return _command("run", row_id, *self._where(), *self._settings(tuning=False),
                        *self._data())

    def report(self, table) -> str:
        return _command("report", str(table), *self._where(), *self._settings(tuning=False))


def _opt(flag: str, value) -> list[str]:
    return [flag, str(value)] if value is not None else []


def _command(*parts: str) -> str:
    return " ".join(["lcp", *(shlex.quote(p) for p in parts)])


def no_complete_trial(summary: TuneSummary) -> str:
    """Why a tuning call ends with status 2: the study has no COMPLETE trial."""
    c = summary.counts
    if summary.first_failure:
        return (f"no trial completed: {summary.first_failure}; fix it and run the same command "
                "again (failed trials are not counted)")
    if c["pruned"] and not (c["running"] or c["waiting"]):
        why = (f"{c['diverged']} diverged" if c["diverged"] == c["pruned"] else
               f"{c['diverged']} diverged, {c['pruned'] - c['diverged']} by the pruner")
        return (f"no trial completed: the study's {c['pruned']} trial(s) were all PRUNED "
                f"({why}); narrow the search space away from the diverging region (--space "
                "PARAM=LOW:HIGH, in a new --study NAME), or add trials with a larger --trials")
    return (f"no trial completed yet ({c['running']} running elsewhere, {c['waiting']} "
            "enqueued, none started by this call): run the same command again (with a larger "
            "--timeout)")


def print_summary(summary: TuneSummary, trials: int, hints: TuneHints, echo) -> None:
    c, exp_id = summary.counts, hints.request.experiment_id
    echo(f"\nstudy {summary.study}: {c['counted']} of --trials {trials} — {c['complete']} "
         f"complete, {c['pruned']} pruned ({c['diverged']} diverged), {c['failed']} failed"
         + (" (not counted)" if c["failed"] else "")
         + (f", {c['running']} still running elsewhere" if c["running"] else "")
         + (f", {c['waiting']} enqueued" if c["waiting"] else "")
         + f"; {summary.started} started by this call")
    if summary.interrupted_recovered:
        echo(f"{summary.interrupted_recovered} interrupted trial(s) were enqueued again")
    best = summary.best
    if best is not None:
        shown = ", ".join(f"{k}={format_value(v)}" for k, v in best.params.items())
        echo(f"best: trial {best.number}, validation accuracy {best.value:.4f} ({shown})")
    else:
        echo("best: no complete trial yet")
    if summary.parent_run_id:
        echo(f"MLflow: experiment {tune_experiment_name(exp_id)}, study run "
             f"{summary.parent_run_id}" + (f"; artifacts {', '.join(summary.artifacts)}"
                                           if summary.artifacts else ""))
    for note in summary.notes:
        echo(f"note: {note}")
    if best is not None:
        echo(f"next: {hints.export()}   (row {exp_id}-{hints.request.export_suffix}; it prints "
             "the lcp run and lcp report to follow)")


def export_study(exp, study, target: Path | None, spec: StorageSpec, overrides: dict[str, Any],
                 hints: TuneHints, echo) -> None:
    """--export: the best parameters as row ID-SUFFIX of the manifest that was read (`target`);
    --export-to: as `--set` lines in a file."""
    request = hints.request
    if request.export:
        row = export_row(target, exp, study, suffix=request.export_suffix, storage=spec,
                         overrides=overrides)
        shown = ", ".join(f"{k}={row.args[k]!r}" for k in study.best_trial.params)
        echo(f"exported row {row.id} ({row.label}, derived_from {exp.id}) to {target}: {shown}")
        echo(f"next: {hints.run(row.id)}   then   {hints.report(row.table)}")
    if request.export_to:
        path = export_overrides(request.export_to, study, exp.id)
        echo(f"wrote the best parameters as --set lines to {path}")
