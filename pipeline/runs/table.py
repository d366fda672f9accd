"""A selection of table pairs (row, seed), run, listed or priced (`lcp run-table`/`run`,
`list`, `budget`): which to run, skip or resume (docs/pipeline.md, "Resume semantics"), claimed
from other schedulers, executed, waited for. One pair's run is `pipeline.runs.table_run`'. What a
command prints goes through `echo`: click.echo, or a function with its signature (text,
err=False).

    plans = plan_runs(Selection(quick=True).items(rows), tracker, runs_dir)  # new/resume/skip/busy
    status = run_rows(rows, RunRequest(dry_run=True), echo=click.echo)       # a whole command
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from lcp.errors import LcpError
from pipeline.manifest.manifest import load_manifest
from pipeline.manifest.selection import (QUICK_OVERRIDES, Item, Selection, expand, lease_key,
                                         other_settings, run_key, select)
from pipeline.runs import budget
from pipeline.runs.ownership import Ownership
from pipeline.runs.rundir import CHECKPOINT_NAME, DEFAULT_RUNS_DIR, is_locked, resume_point
from pipeline.runs.table_run import (BUSY, NEW, RESUME, SKIP, RunPlan, TrackingHooks, cancel,
                                     execute, mark_not_started, prepare, run_dir_for, summary_lines)
from pipeline.scheduling.executors import ExecutorOptions, make_executor
from pipeline.scheduling.scheduler import ProgressDisplay, SchedulerResult
from pipeline.tracking import store
from pipeline.tracking.run_status import end_if_open

TO_RUN = (NEW, RESUME)
EXIT_RUN_FAILED = 1
BUDGET_ENV = "LCP_BUDGET"  # "off": no measured estimate before a table starts


# ====================================================================== plans


def existing_runs(tracker: store.Tracker | None, experiment_names: Iterable[str]
                  ) -> dict[tuple[str, int, str], list]:
    """Runs of the given experiments by (id, seed, config_hash), newest first."""
    out: dict[tuple[str, int, str], list] = {}
    if tracker is None:
        return out
    for name in sorted(set(experiment_names)):
        exp_id = tracker.get_experiment_id(name)
        if exp_id is None:
            continue
        for run in tracker.search_runs([exp_id]):
            key = run_key(run)
            if key is not None:
                out.setdefault((*key, run.data.tags.get("config_hash", "")), []).append(run)
    return out


def plan_runs(items: list[Item], tracker: store.Tracker | None, runs_dir: str | Path,
              *, force: bool = False, holders: Mapping[str, Any] | None = None) -> list[RunPlan]:
    """What to do with each item, from the store's runs (read only: nothing is created).

    `holders`: every live owner of a pair (lease key → pipeline.runs.ownership.Holder); those pairs
    are BUSY, and a SCHEDULED or RUNNING run of any other pair has lost its owner, so it is
    resumed."""
    runs = existing_runs(tracker, (i.experiment_name for i in items))
    plans = []
    for item in items:
        candidates = runs.get((item.exp.id, item.seed, item.config_hash), [])
        finished = [r for r in candidates if r.info.status == "FINISHED"]
        if finished and not force:
            run = finished[0]
            missing = missing_artifacts(tracker, run.info.run_id)
            plans.append(RunPlan(item, SKIP, run.info.run_id, previous_status="FINISHED",
                                 note=f"done (FINISHED run {run.info.run_id[:8]})" + (
                                     " — WARNING: its artifacts are missing "
                                     f"({', '.join(missing)}); --force runs it again"
                                     if missing else ""),
                                 result=dict(run.data.metrics), artifacts_missing=missing))
            continue
        holder = (holders or {}).get(item.lease_key)
        if holder is not None:
            plans.append(busy_plan(item, holder))
            continue
        plan = RunPlan(item, NEW, note="new run" + (" (--force)" if finished else ""))
        for run in candidates:
            if run.info.status == "FINISHED":
                continue
            tagged = run.data.tags.get("run_dir")
            # A folder that is not there (never written, another machine's): one here instead.
            run_dir = (Path(tagged) if tagged and Path(tagged).exists()
                       else run_dir_for(Path(runs_dir), item, run.info.run_id))
            checkpoint = run_dir / CHECKPOINT_NAME
            logged = "epoch" in run.data.metrics
            if run_dir.exists() and is_locked(run_dir):
                plan = RunPlan(item, BUSY, run.info.run_id, run_dir,
                               previous_status=run.info.status,
                               note=f"being run by another process (run {run.info.run_id[:8]})")
                break
            if checkpoint.exists() or not logged:
                epoch = resume_point(run_dir)[0] if checkpoint.exists() else 0
                where = f"from epoch {epoch}" if checkpoint.exists() else "from the start"
                plan = RunPlan(item, RESUME, run.info.run_id, run_dir, resume_epoch=epoch,
                               previous_status=run.info.status,
                               note=f"resume {run.info.status} run {run.info.run_id[:8]} {where}",
                               attempts_before=_int(run.data.tags.get("attempts")))
                break
            plan.note = (f"new run (run {run.info.run_id[:8]} is {run.info.status} but its "
                         f"checkpoint {checkpoint} is gone)")
            plan.superseded.append(run)
        plans.append(plan)
    return plans


# What the worker logs to every FINISHED table run (pipeline.worker._finish).
RUN_ARTIFACTS = ("config.yaml", "model.pth", "metrics.csv", "learning_curve.png")


def missing_artifacts(tracker: store.Tracker | None, run_id: str) -> list[str]:
    """The artifacts of RUN_ARTIFACTS that a FINISHED run no longer has (deleted by hand, or an
    artifact store that was lost); [] when they are all there or the store cannot say."""
    if tracker is None:
        return []
    try:
        present = {Path(p).name for p in tracker.artifact_paths(run_id)}
    except Exception:  # noqa: BLE001 - an unreachable artifact store is not a missing file
        return []
    return [name for name in RUN_ARTIFACTS if name not in present]


def _int(text) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return 0


def busy_plan(item: Item, holder) -> RunPlan:
    return RunPlan(item, BUSY, owner=holder.describe(),
                   note=f"owned by {holder.describe()}; skipped (--wait waits for it)")


def plan_owned(plans: list[RunPlan], tracker: store.Tracker, runs_dir: str | Path, ownership,
               *, force: bool = False) -> list[RunPlan]:
    """`plans` (read a moment ago) with this process as the one owner of every pair it will
    run: each pair not done is claimed (pipeline.runs.ownership) and planned again under the claim,
    so that no other scheduler creates, resumes or finishes it meanwhile, and a pair freed
    since it was read is run."""
    holders = ownership.holders(retire_stale=True)
    out = list(plans)
    claimed = []
    for index, plan in enumerate(plans):
        if plan.action == SKIP:
            continue
        holder = ownership.claim(plan.item.lease_key)
        if holder is not None:
            out[index] = busy_plan(plan.item, holder)
        else:
            claimed.append(index)
    again = plan_runs([plans[i].item for i in claimed], tracker, runs_dir, force=force,
                      holders=holders)
    for index, plan in zip(claimed, again):
        out[index] = plan
        if plan.action not in TO_RUN:  # finished meanwhile, or its folder still in use
            ownership.release(plan.item.lease_key)
    mine = {p.run_id for p in out if p.run_id} | {r.info.run_id for p in out
                                                   for r in p.superseded}  # ended by prepare
    close_orphans(tracker, {p.item.experiment_name for p in out}, ownership, mine)
    return out


ORPHAN_REASON = "its scheduler is gone (ended by a later call); rerun the same command to resume"


def close_orphans(tracker: store.Tracker, experiment_names: Iterable[str], ownership,
                  keep: set[str]) -> int:
    """End KILLED the runs of these experiments left RUNNING or SCHEDULED by a scheduler that
    is gone (killed, or stopped by a full store before it could mark them): no live lease
    holds their pair, no worker holds their folder, and this call does not resume them. They
    stay resumable. Returns how many were ended."""
    ended = 0
    for name in sorted(set(experiment_names)):
        exp_id = tracker.get_experiment_id(name)
        if exp_id is None:
            continue
        for run in tracker.search_runs([exp_id]):
            key, tags = run_key(run), run.data.tags
            if run.info.status not in ("RUNNING", "SCHEDULED") or key is None \
                    or run.info.run_id in keep:
                continue
            # asked now, after the run was read: a scheduler claims a pair before it creates
            # the pair's run, so a run that exists shows its live owner here
            if ownership.holder(lease_key(name, *key, tags.get("config_hash", ""))) is not None:
                continue
            folder = tags.get("run_dir")
            if folder and Path(folder).exists() and is_locked(Path(folder)):
                continue  # a worker is still on it
            ended += end_if_open(tracker, run.info.run_id, "KILLED",
                                 {"killed_reason": ORPHAN_REASON})
    return ended



def ensure_data(items: list[Item], echo) -> None:
    """Find (or download, once, here in the parent) every dataset of `items` (the runs to
    start), so that a missing dataset is one clear error before any run is created, and N
    workers never download into the same folder at the same time."""
    from lcp.data import load_split

    for name, data_dir in sorted({(i.cfg.data, i.cfg.data_dir) for i in items}):
        echo(f"data: {name} in {data_dir}")
        for train in (True, False):
            load_split(name, data_dir, train=train, download=True)


# ====================================================================== lcp run-table / run


@dataclass(frozen=True)
class RunRequest:
    """What `lcp run-table` and `lcp run` are asked beyond their rows: their options."""

    tracking_uri: str | None = None
    runs_dir: str = DEFAULT_RUNS_DIR
    selection: Selection = field(default_factory=Selection)
    executor_options: ExecutorOptions = field(default_factory=ExecutorOptions)
    dry_run: bool = False
    force: bool = False  # run again the pairs that are done
    retries: int = 0
    fail_fast: bool = False
    wait: bool = False  # for the pairs other schedulers own


def run_rows(rows, request: RunRequest, *, echo) -> int:
    """Run each pair of `rows` (manifest rows) that `request` selects as one MLflow run in its
    own process: done pairs skipped, interrupted ones resumed; the plan, progress and summary
    are printed through `echo`. Returns the command's exit status."""
    if request.retries < 0:
        raise LcpError(f"--retries must be ≥ 0 (got {request.retries})")
    selection = request.selection
    # The runs first: bad --set/--seeds fail before an executor (a Ray instance) starts.
    items = selection.items(rows)
    with make_executor(request.executor_options, retries=request.retries,
                       short_runs=selection.quick, drop_env=store.MLFLOW_RUN_ENV) as runner:
        uri = store.resolve_tracking_uri(request.tracking_uri)
        store.warn_unless_shared(runner.nodes(), uri, echo)
        items = selection.fallback(items, download=not request.dry_run, echo=echo)
        reader = store.reader(uri)  # the plan creates nothing, not even the store
        holders = Ownership(reader).holders() if reader is not None else None
        plans = plan_runs(items, reader, request.runs_dir, force=request.force, holders=holders)
        if request.dry_run:
            print_plan(plans, uri, runner, request, echo)
            pool = getattr(runner, "pool", None)  # the local executor: its slots are known
            todo = [p.item for p in plans if p.action in TO_RUN]
            if todo and pool is not None:
                print_budget(todo, pool.size, pool.slots[0].threads, reader, echo)
            return 0
        # Data first: a missing dataset is one error and creates nothing.
        ensure_data([p.item for p in plans if p.action in TO_RUN], echo)
        return _run_plans(plans, request, runner, uri, echo)


def _run_plans(plans: list[RunPlan], request: RunRequest, runner, uri: str, echo) -> int:
    tracker = store.Tracker(uri)  # checks the store; creates the embedded one
    with Ownership(tracker) as ownership:  # the pairs this command runs are its own
        try:
            plans = plan_owned(plans, tracker, request.runs_dir, ownership, force=request.force)
        except Exception as exc:  # noqa: BLE001 - a full disk is one line; others as they are
            if not store.is_disk_full(exc):
                raise
            raise LcpError(store.disk_full_message(exc, uri)) from None
        print_plan(plans, uri, runner, request, echo)
        todo = [p for p in plans if p.action in TO_RUN]
        if not todo and not (request.wait and any(p.owner for p in plans)):
            if not print_busy(plans, echo):
                echo("nothing to run: every pair is done (use --force to run them again)")
            print_next(plans, request.selection, echo)
            return 0
        print_expected([p.item for p in todo], runner, tracker, request.selection.quick, echo)
        sets = request.selection.sets
        hooks = TrackingHooks(tracker, ownership, runs_dir=request.runs_dir,
                              threads=request.executor_options.threads,
                              extra_tags={"quick": "true" if request.selection.quick else None,
                                          "overrides": " ".join(sets) if sets else None})
        results = []
        while True:
            if todo:
                if not _prepare(todo, tracker, request.runs_dir, echo):
                    return 130
                results.append(execute(todo, hooks, runner, retries=request.retries,
                                       fail_fast=request.fail_fast, display=ProgressDisplay()))
                if results[-1].stopped:
                    break
            waiting = [p for p in plans if p.owner]
            if not (request.wait and waiting):
                break
            freed = _wait_for_owners(waiting, ownership, echo)
            if freed is None:  # Ctrl-C while waiting
                results.append(SchedulerResult([], "SIGINT"))
                break
            replanned = plan_owned(freed, tracker, request.runs_dir, ownership,
                                   force=request.force)
            for old, plan in zip(freed, replanned):
                plans[plans.index(old)] = plan
            todo = [p for p in replanned if p.action in TO_RUN]
    result = SchedulerResult([j for r in results for j in r.jobs],
                             next((r.stopped for r in results if r.stopped), None))
    return _print_summary(plans, result, request.selection, echo)


def _prepare(todo: list[RunPlan], tracker: store.Tracker, runs_dir: str, echo) -> bool:
    """Reschedule the resumed runs and check the runs folder (new runs are created as their
    workers start); False on Ctrl-C. A failure before any worker starts marks the resumed runs
    FAILED with the reason (resumable by the next call) and is one line."""
    try:
        prepare(todo, tracker, runs_dir)
        return True
    except KeyboardInterrupt:
        cancel(todo, tracker, "interrupted before any run started")
        echo("interrupted before any run started; the runs created so far are KILLED", err=True)
        return False
    except Exception as exc:  # noqa: BLE001 - one line, the runs left resumable
        if store.is_disk_full(exc):
            reason = store.disk_full_message(exc, tracker.uri)
        elif isinstance(exc, OSError) and exc.filename:
            reason = (f"cannot write {exc.filename}: {exc.strerror}; give --runs-dir on a "
                      "writable disk")
        else:
            reason = f"could not prepare the runs: {store.first_line(exc)}"
        for plan in todo:
            mark_not_started(plan, tracker, reason)
        raise LcpError(f"{reason} (no run started; rerun to resume them)") from None


def _wait_for_owners(waiting: list[RunPlan], ownership, echo, poll_s: float = 5.0):
    """Block until at least one of the pairs other schedulers own is free; those (None on
    Ctrl-C)."""
    owners = sorted({p.owner for p in waiting})
    echo(f"waiting for {len(waiting)} pair(s) owned by {'; '.join(owners)} "
         "(--wait; Ctrl-C to stop)")
    try:
        while True:
            freed = [p for p in waiting if ownership.holder(p.item.lease_key) is None]
            if freed:
                return freed
            time.sleep(poll_s)
    except KeyboardInterrupt:
        return None


# ====================================================================== what it prints


def print_plan(plans: list[RunPlan], uri: str, runner, request: RunRequest, echo) -> None:
    quick = request.selection.quick
    experiments = sorted({p.item.experiment_name for p in plans})
    echo(("Plan (dry run: nothing is created or run)" if request.dry_run else "Plan")
         + f" — tracking {uri}, experiment(s) {', '.join(experiments)}")
    echo(f"executor {runner.describe()}; retries {request.retries}")
    shown = {k: v for k, v in request.selection.overrides().items()
             if k != "data_dir" and not (quick and QUICK_OVERRIDES.get(k) == v)}
    if quick:
        echo("quick tour: " + ", ".join(f"{k}={v}" for k, v in QUICK_OVERRIDES.items()))
    if shown:
        echo("overrides: " + " ".join(f"{k}={v}" for k, v in shown.items()))
    width = max(len(p.name) for p in plans)
    for plan in plans:
        echo(f"  {plan.action.upper():<7} {plan.name:<{width}}  "
             f"hash {plan.item.config_hash}  {plan.note}")
    counts = {a: sum(1 for p in plans if p.action == a) for a in (NEW, RESUME, SKIP, BUSY)}
    echo(f"{len(plans)} run(s): {counts[NEW]} new, {counts[RESUME]} to resume, "
         f"{counts[SKIP]} done (skip)"
         + (f", {counts[BUSY]} running elsewhere" if counts[BUSY] else ""))
    lost = [p.name for p in plans if p.artifacts_missing]
    if lost:
        echo(f"WARNING: {len(lost)} FINISHED run(s) have lost their artifacts "
             f"({', '.join(lost)}); --force runs them again", err=True)


def print_busy(plans: list[RunPlan], echo) -> bool:
    busy = [p for p in plans if p.owner]
    if busy:
        owners = sorted({p.owner for p in busy})
        echo(f"{len(busy)} pair(s) skipped: owned by {'; '.join(owners)}; rerun when it is "
             "done, or add --wait to wait for it", err=True)
    return bool(busy)


def print_next(plans: list[RunPlan], selection: Selection, echo) -> None:
    for number in sorted({p.item.exp.table for p in plans}):
        echo(f"next: lcp report {number}{selection.flags()}   |   lcp ui")


def _print_summary(plans: list[RunPlan], result: SchedulerResult, selection: Selection,
                   echo) -> int:
    """The summary after the runs; the command's exit status."""
    echo("\nSummary:")
    for line in summary_lines(plans, result):
        echo(line)
    echo(f"{len(result.finished)} finished, {len(result.failed)} failed, "
         f"{len(result.killed)} killed, {sum(1 for p in plans if p.action == SKIP)} "
         "skipped (done)")
    print_busy(plans, echo)
    if result.stopped:
        echo(f"stopped: {result.stopped}. Rerun the same command to resume.", err=True)
    if result.failed:
        echo("failed runs: see the log paths above (also the run's logs/worker.log artifact "
             "in MLflow)", err=True)
    print_next(plans, selection, echo)
    if result.stopped in ("SIGINT", "SIGTERM"):
        return 130 if result.stopped == "SIGINT" else 143
    return 0 if result.ok else EXIT_RUN_FAILED


def print_budget(items: list[Item], slots: int, threads: int, tracker, echo,
                 remeasure: bool = False) -> None:
    estimates = budget.estimate(items, threads=threads, tracker=tracker, remeasure=remeasure,
                                echo=lambda line: echo(line, err=True))
    for line in budget.format_estimates(estimates, slots, budget.machine_key(threads)):
        echo(line)


def print_expected(items: list[Item], runner, tracker, quick: bool, echo) -> None:
    """One line before the runs start: how long they will take here, measured by the budget
    planner (a light measurement for a --quick tour, cached per machine and config). Never
    stops the runs: a failed estimate is said and skipped."""
    pool = getattr(runner, "pool", None)
    if not items or pool is None or os.environ.get(BUDGET_ENV, "").lower() == "off":
        return
    try:
        estimates = budget.estimate(items, threads=pool.slots[0].threads, tracker=tracker,
                                    light=quick)
    except Exception as exc:  # noqa: BLE001 - an estimate is never worth a failed table
        echo(f"expected duration: unknown ({store.first_line(exc)})")
        return
    wall = budget.makespan([e.total_s for e in estimates], pool.size)
    lower = any(budget.is_controller_row(e.id) and not e.slowdown_known for e in estimates)
    echo(f"expected: about {budget.format_duration(wall)} on {pool.size} slot(s), measured "
         f"here{' (at least: controller rows can slow down)' if lower else ''}; "
         "`lcp budget` shows each row")


# ====================================================================== lcp budget / list


def price_rows(manifest_path: str, targets: Iterable[str], selection: Selection,
               tracking_uri: str | None, workers: int, threads: int | None, remeasure: bool,
               echo) -> None:
    """`lcp budget`: how long the tables or rows `targets` (every selected pair) take here on
    `workers` CPU slots, measured before they run."""
    ExecutorOptions(workers=workers, threads=threads).check()
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    manifest = load_manifest(manifest_path)
    overrides = selection.overrides()  # a bad --set is said before a bad target
    rows = [row for target in targets for row in (
        manifest.table(target) if target.isdigit() else select(manifest, ids=[target]))]
    unique = list({row.id: row for row in rows}.values())
    items = selection.fallback(expand(unique, selection.seed_list(), overrides),
                               download=True, echo=echo)
    ensure_data(items, echo)
    print_budget(items, workers, threads,
                 store.reader(store.resolve_tracking_uri(tracking_uri)), echo, remeasure)


STATES = {SKIP: "done", BUSY: "running", NEW: "-"}


def state(plan: RunPlan) -> str:
    """A pair's state as `lcp list` shows it."""
    if plan.action == SKIP and plan.artifacts_missing:
        return "done(artifacts missing)"
    skipped = int(plan.result.get("health/skipped_steps", 0))
    if plan.action == SKIP and skipped:
        return f"done({skipped} skipped)"
    if plan.action == RESUME:
        word = {"FAILED": "failed", "KILLED": "killed"}.get(plan.previous_status, "interrupted")
        return f"{word}@{plan.resume_epoch}"
    return STATES[plan.action]


def list_tables(manifest_path: str, table: str | None, selection: Selection,
                tracking_uri: str | None, runs_dir: str, echo) -> None:
    """`lcp list`: the tables (or `table`), their rows and seeds, and each pair's state."""
    manifest = load_manifest(manifest_path)
    numbers = [manifest.table(table)[0].table] if table is not None else manifest.tables()
    items = {number: selection.items(manifest.table(number)) for number in numbers}
    uri = store.resolve_tracking_uri(tracking_uri)
    reader = store.reader(uri)
    holders = Ownership(reader).holders() if reader is not None else None
    echo(f"manifest {manifest.path}; tracking {uri}" + ("" if reader else " (empty)"))
    for number, table_items in items.items():
        rows = manifest.table(number)
        plans = plan_runs(selection.fallback(table_items, download=False), reader, runs_dir,
                          holders=holders)
        by_row: dict[str, list] = {}
        for plan in plans:
            by_row.setdefault(plan.item.exp.id, []).append(plan)
        done = sum(1 for p in plans if p.action == SKIP)
        echo(f"\nTable {number} (experiment {store.experiment_name(number)}): {len(rows)} "
             f"rows, {len(plans)} runs, {done} done")
        section = None
        width = max(len(r.id) for r in rows)
        for exp in rows:
            if exp.section != section:
                section = exp.section
                echo(f"  {section}")
            states = "  ".join(f"{p.item.seed}:{state(p)}" for p in by_row.get(exp.id, []))
            echo(f"    {exp.id:<{width}}  {exp.label:<12}  {states}")
        count, flags = other_settings(reader, store.experiment_name(number),
                                      {p.item.config_hash for p in plans})
        if count:
            echo(f"  + {count} FINISHED run(s) made with other settings (the newest with "
                 f"{flags.strip() or 'no --quick/--set'}): see them with  "
                 f"lcp list {number}{flags}  and  lcp report {number}{flags}")
