"""`lcp tune`: tune an experiment row's hyper-parameters with Optuna (see pipeline/tune.py and
docs/tuning.md). `cli.py` calls `register(lcp)`; every problem with the user's input is an
LcpError, printed by the group as one line with exit status 2.
"""

from __future__ import annotations

import os
import sys

import click

from pipeline.commands import check_executor_options, executor_options, make_runner
from pipeline.rundir import DEFAULT_RUNS_DIR

CONTEXT = {"max_content_width": 100, "help_option_names": ["-h", "--help"]}


@click.command("tune", context_settings=CONTEXT)
@click.argument("experiment_id", metavar="ID")
@click.option("--trials", type=int, default=None, metavar="N",
              help="The study's TOTAL number of trials (complete, pruned or failed), over every "
                   "call and machine: this call runs only the missing ones.")
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
              help="The study (default: ID). The same name resumes it.")
@click.option("--timeout", default=None, type=float, metavar="S",
              help="Start no new trial after S seconds (running ones finish).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a setting of every trial (repeatable), e.g. --set num_epochs=5. "
                   "Part of the study's identity.")
@click.option("--pruner", default="median", show_default=True,
              type=click.Choice(["median", "hyperband", "none"]),
              help="Stops weak trials early from their per-epoch validation accuracy.")
@click.option("--manifest", "manifest_path", default="experiments.yaml", show_default=True,
              metavar="PATH", help="The experiment manifest.")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).")
@click.option("--data-dir", default=None, metavar="DIR",
              help="Where the datasets are (not part of the study's identity).")
@click.option("--runs-dir", default=DEFAULT_RUNS_DIR, show_default=True, metavar="DIR",
              help="Where each trial keeps its spec and log.")
@click.option("--export", is_flag=True,
              help="Append the best parameters to the manifest as row ID-tuned (derived_from: "
                   "ID), to run with `lcp run ID-tuned` on the test set with the row's seeds.")
@click.option("--export-suffix", default="tuned", show_default=True, metavar="SUFFIX",
              help="The exported row's id suffix.")
@click.option("--export-to", default=None, metavar="FILE",
              help="Also write the best parameters as `--set key=value` lines to FILE.")
@executor_options
def tune_command(experiment_id, trials, params, spaces, storage, study_name, timeout, sets,
                 pruner, manifest_path, tracking_uri, data_dir, runs_dir, export, export_suffix,
                 export_to, **where):
    """Tune row ID's hyper-parameters (k_i, k_p, alpha, or its `search:` block) with Optuna.

    Each trial trains the row's config (first seed) in its own process and is scored by its
    accuracy on a validation split held out from the training set (10%, fixed seed): never the
    test set. Diverging trials end PRUNED with the reason; the study goes on. Every trial is a
    nested MLflow run under the study's run in experiment lcp-tune-ID.

    \b
    Examples:
      lcp tune t1-ff-lcp-di --trials 50 --workers 2
      lcp tune t1-ff-lcp-di --trials 100                 # resumes: 50 more
      lcp tune t1-ff-lcp-di --trials 20 --params alpha --set num_epochs=5 --study quick
      lcp tune t1-ff-lcp-di --trials 200 --storage postgresql://me:pw@db-host/optuna
      lcp tune t1-ff-lcp-di --trials 200 --workers 8 --executor ray --address auto
      lcp tune t1-ff-lcp-di --export                     # row t1-ff-lcp-di-tuned
      lcp run t1-ff-lcp-di-tuned && lcp report 1
    """
    from pipeline import study as S
    from pipeline.manifest import load_manifest, parse_overrides
    from pipeline.tracking import Tracker, resolve_tracking_uri
    from pipeline.tune import Tuner

    if trials is None and not (export or export_to):
        raise S.TuneError("give --trials N (the study's total number of trials) to tune, or "
                          "--export to write the best parameters of an existing study")
    if trials is not None and trials < 1:
        raise S.TuneError(f"--trials must be ≥ 1 (got {trials})")
    if timeout is not None and not timeout > 0:
        raise S.TuneError(f"--timeout must be > 0 seconds (got {timeout})")
    check_executor_options(**where)
    manifest = load_manifest(manifest_path)
    exp = manifest.get(experiment_id)
    overrides = dict(parse_overrides(sets))
    if data_dir is not None:
        if "data_dir" in overrides:
            raise S.TuneError("both --data-dir and --set data_dir=... are given; keep one")
        overrides["data_dir"] = data_dir
    if "data_dir" in overrides:
        overrides["data_dir"] = os.path.abspath(os.path.expanduser(str(overrides["data_dir"])))
    uri = resolve_tracking_uri(tracking_uri)
    storage_spec = S.resolve_storage(storage, uri)
    name = study_name or exp.id

    if trials is None:  # export only: the study as it is
        study = S.open_study(None, S.open_storage(storage_spec), name, create=False,
                             exp_id=exp.id)
        _export(S, manifest_path, exp, study, storage_spec, overrides, export, export_suffix,
                export_to)
        return

    plan = S.prepare(exp, overrides, params.split(",") if params is not None else None, spaces)
    for warning in plan.warnings + S.storage_warnings(storage_spec, where["workers"] or 1):
        click.echo(f"warning: {warning}", err=True)
    storage_obj = S.open_storage(storage_spec)  # first: a wrong --storage creates nothing
    tracker = Tracker(uri)  # checks the MLflow store (clear error when unreachable)
    runner = make_runner(**where)
    try:
        _check_cluster(runner, storage_spec, uri)
        study = S.open_study(plan, storage_obj, name, pruner=pruner)
        click.echo(f"study {name} — {storage_spec.display()}; tracking {uri}")
        click.echo(f"tuning {exp.id} ({exp.label}): {S.describe_space(plan.space)}")
        click.echo(f"objective: {S.OBJECTIVE} on {plan.base.validation_split:g} of the training "
                   f"set (validation_seed {plan.base.validation_seed}), seed {plan.base.seed}, "
                   f"{plan.base.num_epochs} epoch(s), pruner {pruner}")
        summary = Tuner(plan, study, storage_obj, storage_spec, trials=trials, executor=runner,
                        tracker=tracker, timeout=timeout, pruner=pruner, runs_dir=runs_dir,
                        echo=click.echo).run()
    finally:
        close = getattr(runner, "close", None)  # a Ray instance started for this command
        if close is not None:
            close()
    _print_summary(S, exp, summary, trials)
    if summary.stopped:
        click.echo(f"stopped: {summary.stopped}. Run the same command again to resume.",
                   err=True)
        sys.exit(130 if summary.stopped == "SIGINT" else 143)
    if export or export_to:
        _export(S, manifest_path, exp, study, storage_spec, overrides, export, export_suffix,
                export_to)


def _check_cluster(runner, storage_spec, uri) -> None:
    """Trials on several machines need a storage and a tracking store every node reaches."""
    from pipeline.study import TuneError
    from pipeline.tracking import is_server_uri

    if getattr(runner, "nodes", lambda: 1)() > 1:
        if storage_spec.kind == "journal":
            raise TuneError("the Ray cluster has several machines: a journal file is for one "
                            "machine's local disk; give --storage postgresql://USER:PW@HOST/DB "
                            "(or $LCP_OPTUNA_STORAGE), which every node reaches")
        if not is_server_uri(uri):
            click.echo(f"warning: the trials run on several machines but the tracking store "
                       f"{uri} is not a server: give --tracking-uri http://HOST:5000", err=True)
    click.echo(f"executor {runner.describe()}")


def _print_summary(T, exp, summary, trials) -> None:
    c = summary.counts
    click.echo(f"\nstudy {summary.study}: {c['counted']} of --trials {trials} — {c['complete']} "
               f"complete, {c['pruned']} pruned ({c['diverged']} diverged), {c['failed']} failed"
               + (f", {c['running']} still running elsewhere" if c["running"] else "")
               + (f", {c['waiting']} enqueued" if c["waiting"] else "")
               + f"; {summary.started} started by this call")
    if summary.interrupted_recovered:
        click.echo(f"{summary.interrupted_recovered} interrupted trial(s) were enqueued again")
    best = summary.best
    if best is not None:
        shown = ", ".join(f"{k}={T._fmt(v)}" for k, v in best.params.items())
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
        click.echo(f"next: lcp tune {exp.id} --export   (row {exp.id}-tuned), then "
                   f"lcp run {exp.id}-tuned and lcp report {exp.table}")


def _export(T, manifest_path, exp, study, storage_spec, overrides, export, suffix,
            export_to) -> None:
    if export:
        row = T.export_row(manifest_path, exp, study, suffix=suffix, storage=storage_spec,
                           overrides=overrides)
        shown = ", ".join(f"{k}={row.args[k]!r}" for k in study.best_trial.params)
        click.echo(f"exported row {row.id} ({row.label}, derived_from {exp.id}) to "
                   f"{manifest_path}: {shown}")
        click.echo(f"next: lcp run {row.id}   then   lcp report {row.table}")
    if export_to:
        path = T.export_overrides(export_to, study, exp.id)
        click.echo(f"wrote the best parameters as --set lines to {path}")


def register(group: click.Group) -> None:
    group.add_command(tune_command)


__all__ = ["register", "tune_command"]
