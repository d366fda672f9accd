"""Interrupted, failing and stopped runs: kill -9 of a worker resumes from its checkpoint under
the same run id; a diverging run ends FAILED with its reason and is retried while the others
finish; a transient failure is retried and resumes; SIGTERM to `lcp run` marks runs KILLED."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from faults import fault_env, set_fault  # noqa: E402
from pipeline_testing import Workspace, invoke, signal_after_first_epoch  # noqa: E402


def _wait_for(predicate, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{out}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _steps(tracker, run_id, key):
    return [m.step for m in sorted(tracker.metric_history(run_id, key), key=lambda m: m.step)]


def test_killed_worker_resumes_under_the_same_run_id(tmp_path, monkeypatch):
    from pipeline.manifest import selection as sel
    from pipeline.manifest.manifest import load_manifest
    from pipeline.runs import table as T, table_run as R
    from pipeline.tracking.store import Tracker

    ws = Workspace(tmp_path, num_epochs=5, seeds=(0,))
    monkeypatch.chdir(tmp_path)
    manifest = load_manifest(ws.manifest)
    items = sel.expand(sel.select(manifest, ids=["t1-ff-lcp-di"]), [0],
                     {"data_dir": str(ws.data)})
    tracker = Tracker(ws.uri)
    plans = T.plan_runs(items, tracker, ws.runs_dir)
    R.prepare(plans, tracker, ws.runs_dir)
    for plan in plans:  # created as a scheduler does before starting its worker
        R.open_run(plan, tracker, ws.runs_dir)
    plan = plans[0]
    checkpoint = plan.run_dir / "checkpoint.pt"
    # The first worker sleeps after every epoch so that it is surely mid-way when killed.
    env = {**os.environ, **fault_env("sleep=2"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(R.worker_command(plan, ws.uri), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(checkpoint.exists, 60, "the first checkpoint", proc)
        _wait_for(lambda: tracker.last_step(plan.run_id) >= 1, 10, "epoch 1 in MLflow", proc)
    finally:
        proc.kill()  # SIGKILL: no handler runs, the run stays RUNNING
        proc.wait()
    assert tracker.get_run(plan.run_id).info.status == "RUNNING"

    listing = invoke(["list", *ws.common(), "--runs-dir", str(ws.runs_dir)])
    assert "0:interrupted@1" in listing.output, listing.output
    result = invoke(["run", "t1-ff-lcp-di", "--seeds", "0", *ws.run_args()])
    assert result.exit_code == 0, result.output
    assert f"resume RUNNING run {plan.run_id[:8]} from epoch 1" in result.output

    runs = ws.runs()
    assert [r.info.run_id for r in runs] == [plan.run_id]  # no second run
    run = tracker.get_run(plan.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_epoch"] == "1"
    assert run.data.tags["attempt"] == "1"
    for key in ("epoch", "train/loss", "eval_test/accuracy"):
        assert _steps(tracker, plan.run_id, key) == [1, 2, 3, 4, 5], key
    log = (plan.run_dir / "worker.log").read_text()
    assert "resuming from epoch 1" in log


def test_logger_backfills_epochs_checkpointed_but_not_logged():
    """Killed between the checkpoint write and the log_batch: the resumed worker logs that
    epoch first, so the history has no gap; epochs already logged are not logged again."""
    from pipeline.worker import MlflowLogger

    class FakeTracker:
        def __init__(self):
            self.logged = [1]

        def last_step(self, run_id, key="epoch"):
            return max(self.logged)

        def log_metric_records(self, run_id, records):
            self.logged.extend(step for step, _ in records)

        def log_metrics(self, run_id, metrics, step):
            self.logged.append(step)

    tracker = FakeTracker()
    history = [{"epoch": 1, "train/loss": 2.0}, {"epoch": 2, "train/loss": 1.5}]
    state = SimpleNamespace(epoch=2, history=history, cfg=SimpleNamespace(num_epochs=3))
    logger = MlflowLogger(tracker, "run", Path(os.devnull).parent / "nonexistent", 0.0)
    logger._progress = lambda *a, **k: None
    logger.on_fit_start(state)
    state.epoch = 3
    logger.on_epoch_end(state, {"epoch": 3, "train/loss": 1.0})
    assert tracker.logged == [1, 2, 3]


def test_diverging_run_fails_with_reason_is_retried_and_others_finish(tmp_path, monkeypatch):
    ws = Workspace(tmp_path, num_epochs=1, seeds=(0,))
    monkeypatch.chdir(tmp_path)
    # alpha=10 at dt=1 makes the LCP dynamics diverge; BP ignores alpha and finishes.
    result = invoke(["run-table", "1", *ws.run_args(), "--set", "alpha=10", "--retries", "1",
                     "--workers", "2"])
    assert result.exit_code == 1, result.output
    assert "1 finished, 1 failed" in result.output
    assert "[retry]    t1-ff-lcp-di/seed=0: diverged" in result.output
    by_id = {r.data.tags["id"]: r for r in ws.runs()}
    failed, finished = by_id["t1-ff-lcp-di"], by_id["t1-ff-bp"]
    assert failed.info.status == "FAILED"
    assert failed.data.tags["failure_reason"].startswith("diverged: the dynamics diverged")
    assert failed.data.tags["attempts"] == "2"
    assert finished.info.status == "FINISHED"
    log_path = failed.data.tags["log_path"]
    assert f"log:    {log_path}" in result.output  # the failure summary names the log
    log = Path(log_path).read_text()
    assert "Traceback" in log and "DivergenceError" in log and "attempt 2" in log
    tracker = ws.tracker()
    assert "logs/worker.log" in tracker.artifact_paths(failed.info.run_id)


def test_transient_failure_is_retried_and_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    ws = Workspace(tmp_path, num_epochs=2, seeds=(0,))
    monkeypatch.chdir(tmp_path)
    set_fault(monkeypatch, "t1-ff-bp/seed=0:raise-once@1")
    result = invoke(["run", "t1-ff-bp", *ws.run_args(), "--retries", "1"])
    assert result.exit_code == 0, result.output
    assert "injected fault" in result.output
    run = ws.runs()[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["attempts"] == "2" and run.data.tags["resumed_from_epoch"] == "1"
    assert _steps(ws.tracker(), run.info.run_id, "train/loss") == [1, 2]


def test_the_resume_point_comes_from_the_checkpoint_not_the_progress_file(tmp_path,
                                                                          monkeypatch):
    """A progress file forged (or left behind) at epoch 99 changes neither the plan, nor the
    resumed_from_epoch tag, nor the carried wall time: the checkpoint (epoch 1) decides."""
    import json

    ws = Workspace(tmp_path, num_epochs=2, seeds=(0,))
    monkeypatch.chdir(tmp_path)
    set_fault(monkeypatch, "t1-ff-bp/seed=0:raise@1")
    assert invoke(["run", "t1-ff-bp", *ws.run_args()]).exit_code == 1
    progress = next(ws.runs_dir.glob("**/progress.json"))
    forged = {**json.loads(progress.read_text()), "epoch": 99, "wall_time_s": 1e6}
    progress.write_text(json.dumps(forged))
    monkeypatch.delenv("LCP_TEST_FAULT")
    result = invoke(["run", "t1-ff-bp", *ws.run_args()])
    assert result.exit_code == 0, result.output
    plan_line = next(line for line in result.output.splitlines() if "RESUME" in line)
    assert plan_line.endswith("from epoch 1"), plan_line
    run = ws.runs()[0]
    assert run.data.tags["resumed_from_epoch"] == "1"
    assert run.data.metrics["wall_time_s"] < 1e5


def test_hard_crash_without_retries_is_failed_by_the_parent(tmp_path, monkeypatch):
    ws = Workspace(tmp_path, num_epochs=2, seeds=(0,))
    monkeypatch.chdir(tmp_path)
    set_fault(monkeypatch, "exit@1")  # like an OOM kill: no handler runs
    result = invoke(["run", "t1-ff-bp", *ws.run_args(), "--fail-fast"])
    assert result.exit_code == 1, result.output
    run = ws.runs()[0]
    assert run.info.status == "FAILED"
    assert "exited with code 137" in run.data.tags["failure_reason"] or \
        "SIGKILL" in run.data.tags["failure_reason"]


def test_sigterm_to_the_scheduler_marks_running_and_queued_runs_killed(tmp_path):
    ws = Workspace(tmp_path, num_epochs=50, seeds=(0,))
    returncode, out = signal_after_first_epoch(
        ws, ["run-table", "1", *ws.run_args(), "--workers", "1"], signal.SIGTERM)
    assert returncode == 143, out
    assert "stopping (SIGTERM)" in out
    # first in the table: started and KILLED; the other one queued: no run was created for it
    # (a run is created when its worker starts), and the summary says it did not start
    statuses = {r.data.tags["id"]: r for r in ws.runs()}
    assert {k: r.info.status for k, r in statuses.items()} == {"t1-ff-bp": "KILLED"}, out
    assert "SIGTERM" in statuses["t1-ff-bp"].data.tags["killed_reason"]
    assert re.search(r"t1-ff-lcp-di/seed=0\s+KILLED.*\n\s+reason: not started", out), out
    # and the plan now resumes the started one under its run id, and starts the other
    result = invoke(["run-table", "1", *ws.run_args(), "--dry-run"])
    assert re.search(r"RESUME\s+t1-ff-bp/seed=0", result.output), result.output
    assert re.search(r"NEW\s+t1-ff-lcp-di/seed=0", result.output), result.output


@pytest.mark.parametrize("args, message", [
    (["run", "t1-ff-nope"], "no experiment 't1-ff-nope'"),
    (["run", "t1-rnn-rbp"], "no experiment 't1-rnn-rbp'"),
    (["run-table", "7"], "no table '7'"),
    (["run-table", "1", "--set", "num_epochs"], "--set expects key=value"),
    (["run-table", "1", "--set", "nonsense=1"], "unknown setting 'nonsense'"),
    (["run-table", "1", "--set", "num_epochs=zero"], "num_epochs"),
    (["run-table", "1", "--gpus", "0,x"], "--gpus '0,x' is not valid"),
    (["run-table", "1", "--gpus", "0"], "no CUDA GPU is visible"),
    (["run-table", "1", "--executor", "slurm"], "valid executors are: local, ray"),
    (["run-table", "1", "--seeds", "a"], "--seeds 'a' is not valid"),
    (["run-table", "1", "--tracking-uri", "sqlite:////no/such/dir/x.db"], "does not exist"),
    (["run-table", "1", "--tracking-uri", "http://127.0.0.1:9"], "cannot reach the MLflow"),
    (["run-table", "1", "--tracking-uri", "ftp://x"], "unknown scheme"),
    (["report", "1", "--format", "xml"], "--format 'xml' is not valid"),
    (["report", "1", "--tracking-uri", "sqlite:///absent.db"], "no tracking store"),
])
def test_bad_input_is_one_clear_error(tmp_path, monkeypatch, args, message):
    ws = Workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    full = args[:1] + ["--manifest", str(ws.manifest)] + args[1:]
    if args[0] != "report" and "--tracking-uri" not in args:
        full += ["--tracking-uri", ws.uri, "--dry-run"]
    result = invoke(full)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert not ws.db.exists() or args[0] == "report"  # nothing was created


def test_help_texts():
    for command in ("list", "run-table", "run", "report", "ui"):
        result = invoke([command, "--help"])
        assert result.exit_code == 0
        assert "Example" in result.output
    ui = invoke(["ui", "--help"]).output
    assert "--host" in ui and "127.0.0.1" in ui and "--port" in ui
    run = invoke(["run-table", "--help"]).output
    for flag in ("--seeds", "--set", "--quick", "--dry-run", "--tracking-uri", "--data-dir",
                 "--retries", "--fail-fast", "--workers", "--gpus", "--runs-per-gpu",
                 "--force", "--executor"):
        assert flag in run, flag


def test_ui_on_a_server_uri_does_not_start_another(tmp_path):
    result = invoke(["ui", "--tracking-uri", "http://127.0.0.1:5999"])
    assert result.exit_code == 0
    assert "is an MLflow server already" in result.output


def test_ui_starts_mlflow_on_the_same_store_bound_to_localhost(tmp_path, monkeypatch):
    import subprocess as sp

    started = []

    class FakeServer:
        pid = 999999999  # no such process group: killpg finds nothing

        def __init__(self, cmd, **kwargs):
            started.append((cmd, kwargs))

        def wait(self, timeout=None):
            return 0

        def send_signal(self, signum):  # the fallback when its process group is gone
            raise ProcessLookupError

    monkeypatch.setattr(sp, "Popen", FakeServer)
    monkeypatch.chdir(tmp_path)
    result = invoke(["ui", "--tracking-uri", "sqlite:///m.db", "--port", "5077"])
    assert result.exit_code == 0, result.output
    (cmd, kwargs), = started
    assert cmd[1:4] == ["-m", "mlflow", "ui"]
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/m.db"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "5077"
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / "mlartifacts")
    assert kwargs["start_new_session"] is True
    assert "http://127.0.0.1:5077" in result.output


def test_missing_data_is_one_error_before_any_run_is_created(tmp_path, monkeypatch):
    ws = Workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("lcp.data._torchvision_download", lambda *a: "no network (test)")
    empty = tmp_path / "no-data"
    empty.mkdir()
    result = invoke(["run-table", "1", *ws.common(), "--runs-dir", str(ws.runs_dir),
                     "--data-dir", str(empty)])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and "mnist" in result.stderr.lower()
    assert "Traceback" not in result.output
    assert not ws.db.exists()  # nothing created
