"""`lcp tune`: studies with several workers, exact totals, resume, divergence, interrupted trials,
MLflow nesting, export, clear errors. CPU only, synthetic MNIST, tiny settings (a trial takes a
few seconds, most of it the trial process starting). Works on a temporary copy of
experiments.yaml, never the repository's file.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from click.testing import CliRunner

from pipeline.tuning import optuna_study as T
from pipeline.tuning.trial import TrialReporter

REPO = Path(__file__).resolve().parents[2]
LCP_BIN = str(Path(sys.executable).parent / "lcp")
ID = "t1-ff-lcp-di"
TINY = ["--set", "rnn_hidden_units=16", "--set", "num_epochs=2", "--set", "solver_max_iter=100",
        "--set", "limit_train_batches=3"]


# ====================================================================== helpers


class Space:
    """A temporary copy of experiments.yaml, synthetic MNIST, a SQLite MLflow store, a journal."""

    def __init__(self, root: Path):
        from synthetic import write_idx_dataset

        self.root = root
        self.manifest = root / "experiments.yaml"
        shutil.copy(REPO / "experiments.yaml", self.manifest)
        self.data = write_idx_dataset(root / "mnist", n_train=256, n_test=64)
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.journal = root / "journal.log"

    def args(self, *extra: str, study: str | None = None, tiny: bool = True) -> list[str]:
        out = ["tune", ID, "--manifest", str(self.manifest), "--tracking-uri", self.uri,
               "--storage", str(self.journal), "--data-dir", str(self.data),
               "--runs-dir", str(self.root / "lcp-runs")]
        if study:
            out += ["--study", study]
        return out + (TINY if tiny else []) + list(extra)

    def study(self, name: str = ID):
        import optuna

        storage = T.open_storage(T.StorageSpec("journal", str(self.journal)))
        return optuna.load_study(study_name=name, storage=storage)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def runs(self, study: str = ID) -> list:
        client = self.client()
        exp = client.get_experiment_by_name(f"lcp-tune-{ID}")
        if exp is None:
            return []
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        return [r for r in runs if r.data.tags.get("lcp.study") == study]


def invoke(args: list[str]):
    from cli import lcp

    return CliRunner().invoke(lcp, args, catch_exceptions=False)


def states(study) -> list[str]:
    return [t.state.name for t in study.trials]


def _output(result) -> str:
    text = result.output or ""
    try:
        text += result.stderr or ""
    except ValueError:  # stderr not captured separately
        pass
    return text


def hints(output: str) -> list[list[str]]:
    """The commands of the `next: ...` lines `lcp tune` printed, each as its arguments without
    the leading `lcp` (commands on one line are separated by `   then   `; `   (` starts a
    comment)."""
    out = []
    for line in output.splitlines():
        if line.startswith("next: "):
            for command in line[len("next: "):].split("   (")[0].split("   then   "):
                argv = shlex.split(command)
                assert argv[0] == "lcp", line
                out.append(argv[1:])
    return out


def packaged_manifest(monkeypatch, folder: Path) -> Path:
    """A copy of experiments.yaml as the package's own (pipeline/experiments.yaml) in `folder`,
    and a working folder without an experiments.yaml: `--manifest` left out reads the copy."""
    import pipeline.manifest.manifest

    folder.mkdir(parents=True)
    shutil.copy(REPO / "experiments.yaml", folder / "experiments.yaml")
    monkeypatch.setattr(pipeline.manifest.manifest, "__file__",
                        str(folder / "manifest" / "manifest.py"))
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return folder / "experiments.yaml"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One study of 4 trials run with 2 workers (shared by the tests that inspect it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("MLFLOW_RUN_ID", "0123456789abcdef")  # must not leak into the trial processes
        space = Space(tmp_path_factory.mktemp("tune"))
        start = time.monotonic()
        result = invoke(space.args("--trials", "4", "--workers", "2"))
        space.first_seconds = time.monotonic() - start
        space.first_output = result.output
        assert result.exit_code == 0, result.output
        yield space


# ====================================================================== studies


def test_four_trials_with_two_workers_complete_exactly(workspace):
    study = workspace.study()
    assert len(study.trials) == 4, workspace.first_output
    assert all(s in ("COMPLETE", "PRUNED") for s in states(study)), states(study)
    # Two workers really ran side by side: two trials overlap in time.
    spans = sorted((t.datetime_start, t.datetime_complete) for t in study.trials)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    # Every trial ran in its own process, none in the parent.
    pids = {t.user_attrs[T.A_PID] for t in study.trials}
    assert len(pids) == 4 and os.getpid() not in pids
    # The objective is the validation accuracy, reported per epoch, never NaN.
    for t in study.trials:
        assert set(t.intermediate_values) <= {1, 2}
        assert all(math.isfinite(v) and 0 <= v <= 1 for v in t.intermediate_values.values())
    assert study.user_attrs[T.S_CONFIG]["validation_split"] == 0.1
    assert study.user_attrs[T.S_CONFIG]["eval_epochs"] == 1
    assert set(study.user_attrs[T.S_SPACE]) == {"k_i", "k_p", "alpha"}
    print(f"4 trials, 2 workers: {workspace.first_seconds:.1f} s")


def test_trials_are_nested_mlflow_runs_under_one_parent_best_tagged(workspace):
    study = workspace.study()
    runs = workspace.runs()
    parents = [r for r in runs if r.data.tags.get("lcp.kind") == "tune-study"]
    trials = [r for r in runs if r.data.tags.get("lcp.kind") == "tune-trial"]
    assert len(parents) == 1 and len(trials) == 4
    parent = parents[0]
    assert study.user_attrs[T.S_PARENT_RUN] == parent.info.run_id
    assert parent.info.status == "FINISHED"
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.tags["optuna.state"] in ("COMPLETE", "PRUNED")
        assert {"k_i", "k_p", "alpha"} <= set(run.data.params)
        curve = workspace.client().get_metric_history(run.info.run_id, "eval_val/accuracy")
        assert [m.step for m in sorted(curve, key=lambda m: m.step)][:1] == [1]
        assert "duration_s" in run.data.metrics
        assert "eval_test/accuracy" not in run.data.metrics  # never the test set
    best = [r for r in trials if r.data.tags.get("lcp.best") == "true"]
    assert len(best) == 1
    assert int(best[0].data.tags["optuna.trial_number"]) == study.best_trial.number
    assert parent.data.tags["lcp.best_trial"] == str(study.best_trial.number)
    artifacts = {a.path for a in workspace.client().list_artifacts(parent.info.run_id)}
    assert "trials.csv" in artifacts
    plots = {a.path for a in workspace.client().list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots
    assert "plots/param_importances.png" in plots  # ≥ 2 complete trials


def test_resume_adds_exactly_the_missing_trials_then_export_runs(workspace):
    before = len(workspace.study().trials)
    assert before == 4
    result = invoke(workspace.args("--trials", "6", "--workers", "2"))
    assert result.exit_code == 0, result.output
    study = workspace.study()
    assert len(study.trials) == 6
    assert "running 2 trial(s) to reach 6" in result.output
    # The same parent run goes on.
    parents = [r for r in workspace.runs() if r.data.tags.get("lcp.kind") == "tune-study"]
    assert len(parents) == 1
    # --trials is the total: asking for 6 again runs nothing.
    result = invoke(workspace.args("--trials", "6"))
    assert result.exit_code == 0 and "nothing to run" in result.output
    assert len(workspace.study().trials) == 6

    result = invoke(workspace.args("--export"))
    assert result.exit_code == 0, result.output
    from pipeline.manifest.manifest import load_manifest

    manifest = load_manifest(workspace.manifest)
    row = manifest.get(f"{ID}-tuned")
    assert row.derived_from == ID and row.label == "LCP-DI (tuned)"
    assert row.seeds == manifest.get(ID).seeds
    for name, value in study.best_trial.params.items():
        assert row.args[name] == pytest.approx(value)
    # Tuning-only settings (--set) are not carried into the row: it is the paper's config.
    assert row.args["num_epochs"] == manifest.get(ID).args["num_epochs"]
    assert "validation_split" not in row.args
    text = workspace.manifest.read_text()
    assert "Tuned by `lcp tune t1-ff-lcp-di`" in text
    # `lcp run <id>-tuned --dry-run` accepts the row (test set, the row's seeds).
    result = invoke(["run", f"{ID}-tuned", "--dry-run", "--manifest", str(workspace.manifest),
                     "--tracking-uri", workspace.uri, "--data-dir", str(workspace.data)])
    assert result.exit_code == 0, result.output
    assert f"{ID}-tuned/seed=0" in result.output
    # Exporting again names the clash and the fix.
    again = invoke(workspace.args("--export"))
    assert again.exit_code == 2 and "already exists" in _output(again)
    lines = workspace.root / "best.txt"
    result = invoke(workspace.args("--export-to", str(lines)))
    assert result.exit_code == 0, result.output
    assert lines.read_text().splitlines()[0].startswith("--set ")


def test_export_writes_the_manifest_it_read_and_refuses_an_installed_copy(workspace, tmp_path,
                                                                          monkeypatch):
    from pipeline.manifest.manifest import load_manifest

    where = ["--storage", str(workspace.journal), "--tracking-uri", workspace.uri]
    packaged = packaged_manifest(monkeypatch, tmp_path / "checkout" / "pipeline")
    result = invoke(["tune", ID, "--export", "--export-suffix", "pkg", *where])
    assert result.exit_code == 0, _output(result)
    assert f"to {os.path.realpath(packaged)}:" in result.output
    assert load_manifest(packaged).get(f"{ID}-pkg").derived_from == ID
    assert not Path("experiments.yaml").exists()  # nothing written where nothing was read
    assert "--manifest" not in result.output  # the hints read the same file again

    installed = packaged_manifest(monkeypatch, tmp_path / "lib" / "site-packages" / "pipeline")
    before = installed.read_text()
    result = invoke(["tune", ID, "--trials", "1", "--export", "--study", "never", *where])
    text = _output(result)
    assert result.exit_code == 2, text
    assert f"--export would write {os.path.realpath(installed)}" in text
    assert "copy it" in text and "--manifest" in text and "Traceback" not in text
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
    assert installed.read_text() == before
    import optuna

    storage = T.open_storage(T.StorageSpec("journal", str(workspace.journal)))
    assert "never" not in optuna.get_all_study_names(storage)  # refused before tuning


def test_baseline_runs_the_rows_own_setting_once_per_study(workspace):
    space = workspace
    first = invoke(space.args("--trials", "2", "--workers", "1", "--baseline", study="baseline"))
    assert first.exit_code == 0, first.output
    assert "baseline: the row's own setting (k_i=1, k_p=0, alpha=0.1) is a trial" in first.output
    again = invoke(space.args("--trials", "3", "--workers", "1", "--baseline",
                              study="baseline"))
    assert again.exit_code == 0, again.output
    trials = space.study("baseline").trials
    assert len(trials) == 3 and all(s in ("COMPLETE", "PRUNED") for s in states(
        space.study("baseline")))
    marked = [t for t in trials if t.user_attrs.get(T.A_BASELINE)]
    assert [t.number for t in marked] == [0]  # enqueued first, and not again on the resume
    assert marked[0].params == {"k_i": 1.0, "k_p": 0.0, "alpha": 0.1}
    # the baseline is never pruned (its process runs without a pruner); the others are
    import json

    from pipeline.tuning.tune import SPEC_NAME

    folder = space.root / "lcp-runs" / f"lcp-tune-{ID}" / "baseline"
    pruners = [json.loads((folder / f"trial-{n:04d}" / SPEC_NAME).read_text())["pruner"]
               for n in range(3)]
    assert pruners == ["none", "median", "median"]


def test_quick_is_its_own_study_with_a_tiny_budget_and_six_trials_by_default(workspace):
    tiny = ["--set", "rnn_hidden_units=16", "--set", "solver_max_iter=100", "--set",
            "limit_train_batches=3"]
    result = invoke(workspace.args("--quick", "--trials", "1", tiny=False) + tiny)
    assert result.exit_code == 0, _output(result)
    assert f"study {ID}-quick " in result.output
    study = workspace.study(f"{ID}-quick")
    assert len(study.trials) == 1 and states(study)[0] in ("COMPLETE", "PRUNED")
    config = study.user_attrs[T.S_CONFIG]
    assert config["num_epochs"] == 1 and config["limit_eval_batches"] == 5
    assert config["limit_train_batches"] == 3  # --set wins over --quick
    assert config["data"] == "mnist"  # the synthetic MNIST is there: no fallback
    assert workspace.study().user_attrs[T.S_CONFIG]["num_epochs"] == 2  # the real one is apart
    next_lines = [line for line in result.output.splitlines() if line.startswith("next:")]
    assert next_lines and " --quick " in next_lines[0]
    # --trials defaults to 6 with --quick
    result = invoke(workspace.args("--quick", "--timeout", "1e-9", tiny=False) + tiny)
    assert result.exit_code == 0, _output(result)
    assert "running 5 trial(s) to reach 6" in result.output


def test_quick_without_mnist_tunes_on_mnist_sample(tmp_path, monkeypatch):
    import lcp.data

    monkeypatch.setattr(lcp.data, "_torchvision_download", lambda *a, **k: "no network here")
    space = Space(tmp_path)
    empty = tmp_path / "no-data"
    empty.mkdir()
    result = invoke(space.args("--quick", "--timeout", "1e-9", "--data-dir", str(empty),
                               tiny=False))
    text = _output(result)
    assert "WARNING: MNIST is not in" in text and "data=mnist-sample" in text
    assert space.study(f"{ID}-quick").user_attrs[T.S_CONFIG]["data"] == "mnist-sample"
    # no trial started (--timeout): no complete trial, said in one line
    assert result.exit_code == 2 and "error: no trial completed yet" in text


def test_diverging_region_is_pruned_with_a_reason_and_the_study_finishes(tmp_path):
    space = Space(tmp_path)
    doc = yaml.safe_load(space.manifest.read_text())
    for row in doc["experiments"]:
        if row["id"] == ID:
            # Every alpha here reaches a non-finite state within the 100 steps of TINY (alpha=5
            # at step 69). Below ~4 the state grows as fast but stays finite for 100 steps (it is
            # only 'not converged', as in the paper's code), so the range starts at 5.
            row["search"] = {"alpha": {"type": "float", "low": 5, "high": 10}}
    space.manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    result = invoke(space.args("--trials", "3", "--workers", "2", study="unstable"))
    # no trial completed: exit status 2, one line saying they were all pruned
    assert result.exit_code == 2, result.output
    assert re.search(r"error: no trial completed: the study's 3 trial\(s\) were all PRUNED "
                     r"\(3 diverged\)", _output(result)), _output(result)
    assert "unstable region" in _output(result)  # warned before it started
    study = space.study("unstable")
    assert len(study.trials) == 3
    for t in study.trials:
        assert t.state.name in ("PRUNED", "FAIL")
        assert t.user_attrs[T.A_REASON].startswith("diverged")
        assert t.user_attrs[T.A_DIVERGED] is True
        assert all(math.isfinite(v) for v in t.intermediate_values.values())
        assert 3 <= t.params["alpha"] <= 10
    trials = [r for r in space.runs("unstable") if r.data.tags.get("lcp.kind") == "tune-trial"]
    assert len(trials) == 3
    assert all(r.info.status == "FAILED" and "diverged" in r.data.tags["failure_reason"]
               for r in trials)
    assert "0 complete" in result.output and "3 diverged" in result.output
    # Nothing to export, and the message says why.
    result = invoke(space.args("--export", study="unstable"))
    assert result.exit_code == 2 and "no complete trial" in _output(result)


def test_trial_left_running_by_a_killed_process_is_enqueued_again(tmp_path, monkeypatch):
    space = Space(tmp_path)
    from pipeline.manifest.manifest import load_manifest, parse_overrides

    overrides = dict(parse_overrides([s for s in TINY if s != "--set"]))
    overrides["data_dir"] = str(space.data)
    plan = T.prepare(load_manifest(space.manifest).get(ID), overrides, ["alpha"])
    storage = T.open_storage(T.StorageSpec("journal", str(space.journal)))
    study = T.open_study(plan, storage, "crash")
    dead = subprocess.Popen(["true"])
    dead.wait()
    trial = study.ask(T.distributions(plan.space))
    trial.set_user_attr(T.A_HOST, socket.gethostname())
    trial.set_user_attr(T.A_PID, dead.pid)
    trial.set_user_attr(T.A_HEARTBEAT, time.time())
    alpha = trial.params["alpha"]

    result = invoke(space.args("--trials", "1", "--params", "alpha", study="crash"))
    assert result.exit_code == 0, result.output
    assert "left RUNNING" in result.output
    study = space.study("crash")
    assert states(study)[0] == "FAIL"
    assert "is gone" in study.trials[0].user_attrs[T.A_INTERRUPTED]
    assert len(study.trials) == 2  # the interrupted one does not count toward --trials 1
    retry = study.trials[1]
    assert retry.state.name in ("COMPLETE", "PRUNED")
    assert retry.user_attrs[T.A_RETRY_OF] == 0 and retry.params["alpha"] == alpha


def test_failed_trials_do_not_count_and_every_printed_command_runs(tmp_path, monkeypatch):
    """A new user's first study: every trial fails (a corrupt dataset), the call stops after 3
    failures and exits 2 naming the first reason; the same command with the data fixed then runs
    its trials (the failed ones did not use up --trials), and every command it prints (export,
    lcp run, lcp report) runs as printed."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LCP_OPTUNA_STORAGE", raising=False)
    space = Space(tmp_path)
    monkeypatch.chdir(tmp_path)  # lcp run and lcp report write their folders here
    doc = yaml.safe_load(space.manifest.read_text())
    for row in doc["experiments"]:
        if row["id"] == ID:
            row["seeds"] = [0]  # `lcp run ID-tuned`: one run
    space.manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (corrupt / name).write_bytes(b"not an IDX file")
    command = space.args("--trials", "2", "--workers", "2", study="first")

    failing = invoke(command + ["--data-dir", str(corrupt)])
    text = _output(failing)
    assert failing.exit_code == 2, text
    assert text.count("starting no new trial") == 1, text
    assert re.search(r"^error: no trial completed: trial \d+ FAILED: .*not an IDX file.*; fix it "
                     r"and run the same command again \(failed trials are not counted\)$", text,
                     re.M), text
    study = space.study("first")
    assert 3 <= len(study.trials) <= 4 and set(states(study)) == {"FAIL"}, states(study)
    assert T.tally(study.trials)["counted"] == 0
    assert hints(failing.output) == []

    fixed = invoke(command)
    assert fixed.exit_code == 0, _output(fixed)
    assert "nothing to run" not in fixed.output
    assert re.search(r"running 2 trial\(s\) to reach 2 \(0 finished, [34] failed \(not "
                     r"counted\)", fixed.output), fixed.output
    study = space.study("first")
    assert sorted(states(study)).count("FAIL") == len(study.trials) - 2

    todo = hints(fixed.output)
    assert [argv[:3] for argv in todo] == [["tune", ID, "--export"]]
    for option in ("--study", "--storage", "--manifest", "--tracking-uri", "--data-dir"):
        assert option in todo[0]
    assert todo[0].count("--set") == TINY.count("--set")
    exported = invoke(todo[0])
    assert exported.exit_code == 0, (todo[0], _output(exported))
    todo = hints(exported.output)
    assert [argv[:2] for argv in todo] == [["run", f"{ID}-tuned"], ["report", "1"]]
    for argv in todo:
        assert "--manifest" in argv and "--tracking-uri" in argv
        assert argv.count("--set") == TINY.count("--set")
        result = invoke(argv)
        assert result.exit_code == 0, (argv, _output(result))
        if argv[0] == "run":
            assert f"{ID}-tuned/seed=0" in result.output


def test_ctrl_c_stops_trials_and_enqueues_them_for_the_next_call(tmp_path):
    space = Space(tmp_path)
    args = space.args("--trials", "2", "--params", "alpha", "--pruner", "none", study="stop",
                      tiny=False)
    args += ["--set", "rnn_hidden_units=16", "--set", "num_epochs=500", "--set",
             "solver_max_iter=100", "--set", "limit_train_batches=3"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.Popen([LCP_BIN, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=str(REPO), start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        started = False
        while time.monotonic() < deadline and not started:
            time.sleep(0.5)
            if space.journal.exists():
                try:
                    study = space.study("stop")
                except KeyError:
                    continue
                started = any(t.user_attrs.get(T.A_PID) not in (None, proc.pid)
                              and t.intermediate_values for t in study.trials)
        assert started, "no trial process reported an epoch in time"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    study = space.study("stop")
    interrupted = [t for t in study.trials if t.state.name == "FAIL"]
    waiting = [t for t in study.trials if t.state.name == "WAITING"]
    assert interrupted and len(waiting) == len(interrupted)
    assert all("SIGINT" in t.user_attrs[T.A_INTERRUPTED] for t in interrupted)
    enqueued = {t.system_attrs["fixed_params"]["alpha"] for t in waiting}  # set when popped
    assert {t.params["alpha"] for t in interrupted} == enqueued
    runs = [r for r in space.runs("stop") if r.data.tags.get("lcp.kind") == "tune-trial"]
    assert runs and all(r.info.status == "KILLED" for r in runs)
    parent = [r for r in space.runs("stop") if r.data.tags.get("lcp.kind") == "tune-study"]
    assert parent[0].info.status == "KILLED"


# ====================================================================== errors


@pytest.mark.parametrize("extra, message", [
    (["--params", "k_i,beta"], "unknown parameter(s) beta for t1-ff-lcp-di: the parameters "
                               "with a search space (the defaults) are: k_i, k_p, alpha"),
    (["--space", "alpha=1.5:0.5"], "search range for alpha (t1-ff-lcp-di): low must be < high"),
    (["--space", "alpha=0:1:log"], "a log-scale range needs low > 0"),
    (["--space", "dt=0:1"], "0.0 is not a valid dt"),
    (["--space", "alpha=a:b"], "'a' is not a number"),
    (["--space", "model=ff"], "'model' cannot be tuned"),
    (["--storage", "postgresql://nobody@127.0.0.1:1/x"],
     "cannot open the Optuna storage postgresql://nobody@127.0.0.1:1/x"),
    (["--storage", "http://127.0.0.1:5000"], "not an Optuna storage"),
    (["--set", "alpha=0.5"], "alpha is both tuned and fixed by --set"),
    (["--set", "validation_split=0"], "tuning needs a validation split"),
    (["--baseline", "--space", "alpha=0.2:1.5"],  # the row's alpha is 0.1
     "t1-ff-lcp-di's alpha = 0.1 is outside the search space"),
])
def test_errors_name_the_problem_and_the_fix(tmp_path, extra, message):
    space = Space(tmp_path)
    result = invoke(space.args("--trials", "2", *extra))
    assert result.exit_code == 2, result.output
    text = _output(result)
    assert message in text
    assert "Traceback" not in text
    assert not (tmp_path / "mlflow.db").exists()  # nothing was created


def test_a_storage_whose_tables_another_tuner_created_meanwhile_is_opened_again(tmp_path,
                                                                               monkeypatch):
    import optuna

    import pipeline.tracking.store

    real, calls = optuna.storages.RDBStorage, []

    class OnceRaced(real):  # the other tuner created the tables first, once
        def __init__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError('(psycopg.errors.UniqueViolation) duplicate key value '
                                   'violates unique constraint "pg_type_typname_nsp_index"')
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", OnceRaced)
    monkeypatch.setattr(pipeline.tracking.store.time, "sleep", lambda s: None)
    storage = T.open_storage(T.StorageSpec("rdb", f"sqlite:///{tmp_path / 'optuna.db'}"))
    assert len(calls) == 2 and storage.get_all_studies() == []
    # the same error every time is not a race: one line after a few attempts
    class AlwaysRaced(real):
        def __init__(self, *args, **kwargs):
            calls.append(1)
            raise RuntimeError("duplicate key value violates unique constraint")

    monkeypatch.setattr(optuna.storages, "RDBStorage", AlwaysRaced)
    calls.clear()
    with pytest.raises(T.StorageError, match="cannot open the Optuna storage .*duplicate key"):
        T.open_storage(T.StorageSpec("rdb", f"sqlite:///{tmp_path / 'other.db'}"))
    assert len(calls) == 6


def test_errors_unknown_id_no_space_no_trials(tmp_path):
    space = Space(tmp_path)
    base = ["--manifest", str(space.manifest), "--tracking-uri", space.uri]
    result = invoke(["tune", "t1-ff-lcp-dx", "--trials", "2", *base])
    assert result.exit_code == 2 and "no experiment 't1-ff-lcp-dx'" in _output(result)
    assert "valid ids are: t1-ff-bp" in _output(result)
    result = invoke(["tune", "t1-ff-bp", "--trials", "2", *base])
    assert result.exit_code == 2 and "has no search space" in _output(result)
    result = invoke(["tune", ID, *base])
    assert result.exit_code == 2 and "give --trials N" in _output(result)
    result = invoke(["tune", ID, "--trials", "0", *base])
    assert result.exit_code == 2 and "--trials must be ≥ 1" in _output(result)
    result = invoke(["tune", ID, "--export", "--storage", str(space.journal), *base])
    assert result.exit_code == 2 and "no study 't1-ff-lcp-di'" in _output(result)


def test_a_study_resumes_only_with_the_same_settings(tmp_path):
    space = Space(tmp_path)
    from pipeline.manifest.manifest import load_manifest

    exp = load_manifest(space.manifest).get(ID)
    storage = T.open_storage(T.StorageSpec("journal", str(space.journal)))
    T.open_study(T.prepare(exp, {"num_epochs": "2"}), storage, "s")
    T.open_study(T.prepare(exp, {"num_epochs": "2"}), storage, "s")  # same: fine
    with pytest.raises(T.TuneError, match=r"other settings \(num_epochs: 2 → 3\)"):
        T.open_study(T.prepare(exp, {"num_epochs": "3"}), storage, "s")
    with pytest.raises(T.TuneError, match="searches another space"):
        T.open_study(T.prepare(exp, {"num_epochs": "2"}, ["alpha"]), storage, "s")


def test_a_study_another_tuner_is_still_starting_opens_or_fails_in_one_line(tmp_path):
    # Optuna writes a study's attributes one at a time: a second tuner can see the first one's
    # half-written study (two tuners on one PostgreSQL study hit this with a KeyError).
    space = Space(tmp_path)
    from pipeline.manifest.manifest import load_manifest

    exp = load_manifest(space.manifest).get(ID)
    storage = T.open_storage(T.StorageSpec("journal", str(space.journal)))
    plan = T.prepare(exp, {"num_epochs": "2"})
    import optuna

    starting = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    starting.set_user_attr(T.S_ID, exp.id)  # the other tuner has written the id and nothing else
    study = T.open_study(plan, storage, "s")
    assert set(study.user_attrs) == {T.S_ID, T.S_SPACE, T.S_CONFIG}
    T.open_study(plan, storage, "s")  # and opens again with the same settings

    odd = optuna.create_study(storage=storage, study_name="odd", direction="maximize")
    odd.set_user_attr(T.S_ID, exp.id)
    odd.set_user_attr(T.S_CONFIG, study.user_attrs[T.S_CONFIG])  # settings but no space
    with pytest.raises(T.TuneError, match="searches another space"):
        T.open_study(plan, storage, "odd")


def test_a_trial_asked_as_another_tuner_reaches_the_total_is_surplus_and_never_runs(tmp_path):
    """Two tuners on one study, --trials 1: the other tuner's trial is asked between this
    tuner's count and its ask. This tuner's trial is then past the total: told FAIL, marked
    surplus (so it neither counts nor reads as a failure), never started, and the tuner asks for
    no other."""
    import optuna
    from optuna.trial import TrialState

    from pipeline.manifest.manifest import load_manifest
    from pipeline.tuning.tune import TuneRequest, Tuner

    space = Space(tmp_path)
    exp = load_manifest(space.manifest).get(ID)
    storage = T.open_storage(T.StorageSpec("journal", str(space.journal)))
    plan = T.prepare(exp, {"num_epochs": "2"})
    study = T.open_study(plan, storage, "s")
    other = optuna.load_study(study_name="s", storage=storage)
    asked = study.ask

    def ask_after_the_other_tuner(*args, **kwargs):
        other.ask()  # the other tuner's trial: number 0, RUNNING
        study.ask = asked
        return asked(*args, **kwargs)

    study.ask = ask_after_the_other_tuner
    tuner = Tuner(plan, study, storage, T.StorageSpec("journal", str(space.journal)),
                  request=TuneRequest(ID, trials=1, runs_dir=str(tmp_path / "runs")),
                  executor=None, tracker=None, echo=lambda line: None)
    tuner._job = lambda trial: pytest.fail(f"trial {trial.number} was started")
    assert tuner.next_job() is None
    theirs, ours = study.get_trials(deepcopy=False)
    assert theirs.state == TrialState.RUNNING and T.counts_toward_total(theirs)
    assert ours.state == TrialState.FAIL and ours.user_attrs[T.A_SURPLUS] is True
    assert not T.counts_toward_total(ours) and not T.is_failure(ours)
    assert T.A_RUN not in ours.user_attrs  # no MLflow run was made for it
    assert tuner.failed == 0 and tuner.started == 0


# ====================================================================== pieces


def test_default_space_stays_in_the_stable_range():
    from lcp.config import RunConfig

    cfg = RunConfig.from_dict({"model": "ff", "trainer": "lcp-di"})
    space = T.default_space(cfg)
    assert set(space) == {"k_i", "k_p", "alpha"}
    assert space["alpha"]["log"] and space["alpha"]["high"] < 2  # alpha ≥ 2 diverges at dt=1
    assert space["k_p"] == {"type": "float", "low": 0.0, "high": 1.0, "log": False}
    assert T.default_space(cfg.replace(dt=0.5))["alpha"]["high"] == pytest.approx(3.0)
    assert T.stability_warnings(space, cfg) == []
    assert T.stability_warnings({"alpha": {"type": "float", "low": 3, "high": 10}}, cfg)
    assert T.default_space(cfg.replace(trainer="bp")) == {}
    assert set(T.default_space(cfg.replace(trainer="lcp-ebd", alpha=0.1))) == {"alpha"}


def test_space_option_parsing():
    assert T.parse_space_option("alpha=0.01:1.5:log") == (
        "alpha", {"type": "float", "low": 0.01, "high": 1.5, "log": True})
    assert T.parse_space_option("solver-max-iter=50:400") == (
        "solver_max_iter", {"type": "int", "low": 50, "high": 400, "log": False})
    assert T.parse_space_option("solver=vanilla,anderson") == (
        "solver", {"type": "categorical", "choices": ["vanilla", "anderson"]})
    assert T.parse_space_option("k_p=0,0.5") == (
        "k_p", {"type": "categorical", "choices": [0.0, 0.5]})
    for bad, message in [("alpha", "expected PARAM="), ("alpha=1:2:lin", "LOW:HIGH:log"),
                         ("beta=0:1", "unknown parameter 'beta'"),
                         ("solver=1:2", "not a range"), ("seed=0:5", "cannot be tuned")]:
        with pytest.raises(T.TuneError, match=message.replace("(", r"\(")):
            T.parse_space_option(bad)


def test_storage_choices(tmp_path):
    spec = T.resolve_storage(None, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert spec == T.StorageSpec("journal", str(tmp_path / "optuna-journal.log"))
    assert T.resolve_storage("postgresql://u:secret@h/db").kind == "rdb"
    assert "secret" not in T.resolve_storage("postgresql://u:secret@h/db").display()
    assert T.resolve_storage("journal:x.log").target == os.path.abspath("x.log")
    assert T.resolve_storage(str(tmp_path / "j.log")).kind == "journal"
    sqlite = T.resolve_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert sqlite.kind == "rdb" and T.storage_warnings(sqlite, workers=2)
    T.open_storage(sqlite)  # a real database URL opens


def test_stale_running_trials_and_what_counts():
    from optuna.trial import TrialState

    now = time.time()
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()

    def trial(state=TrialState.RUNNING, **attrs):
        return SimpleNamespace(state=state, user_attrs=attrs, datetime_start=datetime.now())

    assert T.stale_reason(trial(**{T.A_HOST: host, T.A_PID: os.getpid(),
                                   T.A_HEARTBEAT: now})) is None
    assert "is gone" in T.stale_reason(trial(**{T.A_HOST: host, T.A_PID: dead.pid,
                                                T.A_HEARTBEAT: now}))
    other = trial(**{T.A_HOST: "elsewhere", T.A_PID: 1, T.A_HEARTBEAT: now - 3600})
    assert "no heartbeat" in T.stale_reason(other)
    assert T.stale_reason(trial(**{T.A_HOST: "elsewhere", T.A_PID: 1,
                                   T.A_HEARTBEAT: now - 5})) is None
    assert not T.counts_toward_total(trial(TrialState.FAIL))  # failed trials never count
    assert not T.counts_toward_total(trial(TrialState.FAIL, **{T.A_INTERRUPTED: "gone"}))
    assert T.counts_toward_total(trial(TrialState.WAITING))


def test_tally_counts_complete_pruned_running_and_waiting_never_failed():
    from optuna.trial import TrialState

    def trial(state, **attrs):
        return SimpleNamespace(state=state, user_attrs=attrs)

    trials = [trial(TrialState.COMPLETE), trial(TrialState.PRUNED, **{T.A_DIVERGED: True}),
              trial(TrialState.FAIL), trial(TrialState.FAIL, **{T.A_REASON: "out of memory"}),
              trial(TrialState.FAIL, **{T.A_INTERRUPTED: "gone"}),
              trial(TrialState.FAIL, **{T.A_SURPLUS: True}), trial(TrialState.RUNNING),
              trial(TrialState.WAITING)]
    assert [T.counts_toward_total(t) for t in trials] == [True, True, False, False, False, False,
                                                         True, True]
    counts = T.tally(trials)
    assert counts["counted"] == 4 and counts["finished"] == 2
    assert counts["failed"] == 2 and counts["interrupted"] == 1 and counts["diverged"] == 1


def test_reporter_never_reports_nan_and_prunes_on_request():
    from lcp.callbacks import FitState

    class FakeTrial:
        def __init__(self, prune):
            self.reports, self.prune = [], prune

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return self.prune

    def state():
        return FitState(cfg=None, model=None, trainer=None, optimizer=None, scheduler=None)

    trial = FakeTrial(prune=False)
    reporter = TrialReporter(trial)
    s = state()
    reporter.on_epoch_end(s, {"epoch": 1, "eval_val/accuracy": 0.5, "eval_val/loss": 1.0})
    reporter.on_epoch_end(s, {"epoch": 2, "eval_val/accuracy": 0.1,
                              "eval_val/loss": float("nan")})
    assert trial.reports == [(1, 0.5)]
    assert s.stop_reason and "not finite" in reporter.diverged
    trial = FakeTrial(prune=True)
    reporter = TrialReporter(trial)
    s = state()
    reporter.on_epoch_end(s, {"epoch": 1, "eval_val/accuracy": 0.2, "eval_val/loss": 2.0})
    assert reporter.pruned_at == 1 and "pruned" in s.stop_reason
