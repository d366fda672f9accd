"""pipeline.tracking.store: URIs, names, retries on a locked SQLite store, and several processes
writing to one store at once (nothing lost)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lcp.errors import LcpError
from pipeline.tracking import store as tracking
from pipeline.tracking.store import (Tracker, is_created_meanwhile_error, resolve_tracking_uri,
                                     sanitize_name, with_retry)


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert tracking.artifact_root(resolve_tracking_uri(None)) == tmp_path / "mlartifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/other.db"
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"  # option wins
    assert resolve_tracking_uri(f"sqlite:///{tmp_path}/a.db") == f"sqlite:///{tmp_path}/a.db"


def test_sanitize_name():
    assert sanitize_name("train/loss") == "train/loss"
    assert sanitize_name("a:b*c") == "a_b_c"
    assert sanitize_name("/x//y/") == "x/y"
    assert sanitize_name("../up") == "_/up"


def test_with_retry_backs_off_only_on_locked_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert with_retry(flaky, base_delay=0.001) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        with_retry(lambda: (_ for _ in ()).throw(ValueError("other")), base_delay=0.001)


def test_a_row_created_meanwhile_by_another_process_is_retried_where_asked():
    duplicate = RuntimeError('(psycopg.errors.UniqueViolation) duplicate key value violates '
                             'unique constraint "dataset_pk"')
    assert is_created_meanwhile_error(duplicate)
    assert is_created_meanwhile_error(RuntimeError("UNIQUE constraint failed: datasets.name"))
    assert not is_created_meanwhile_error(RuntimeError("database is locked"))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 2:
            raise duplicate
        return "ok"

    with pytest.raises(RuntimeError, match="duplicate key"):  # not retried by default
        with_retry(flaky, base_delay=0.001)
    calls.clear()
    assert with_retry(flaky, base_delay=0.001, retry_on=is_created_meanwhile_error) == "ok"
    assert len(calls) == 2


def test_a_dataset_inserted_meanwhile_by_another_run_is_logged_once(tmp_path, monkeypatch):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracker.create_run(tracker.ensure_experiment("lcp-table-1"), "r")
    real, calls = tracker.client.log_inputs, []

    def log_inputs(*args, **kwargs):  # the first call loses the race for the dataset row
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError('duplicate key value violates unique constraint "dataset_pk"')
        return real(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_inputs", log_inputs)
    tracker.log_datasets(run_id, [{"name": "mnist", "split": "train", "size": 256,
                                   "digest": "abc", "source": "data/mnist"}])
    inputs = tracker.get_run(run_id).inputs.dataset_inputs
    assert len(calls) == 2 and [i.dataset.digest for i in inputs] == ["abc"]


def test_already_exists_on_a_sqlite_store_is_said_at_once(tmp_path, monkeypatch):
    """Its first open is serialised by the lock: no other process can have created the tables
    meanwhile, so the error is the store's own (a half-migration) and is not retried."""
    import mlflow.tracking

    from pipeline.tracking.store import TrackingError

    calls = []

    class Client:
        def __init__(self, tracking_uri):
            pass

        def search_experiments(self, max_results):
            calls.append(1)
            raise RuntimeError("(sqlite3.OperationalError) table experiments already exists")

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", Client)
    with pytest.raises(TrackingError, match="could not create or upgrade its database schema"):
        Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}").client  # noqa: B018
    assert len(calls) == 1


def test_unusable_stores_are_clear_errors(tmp_path):
    with pytest.raises(LcpError, match="does not exist"):
        Tracker(f"sqlite:///{tmp_path}/missing/x.db")
    with pytest.raises(LcpError, match="cannot reach the MLflow server"):
        Tracker("http://127.0.0.1:9")
    with pytest.raises(LcpError, match="in-memory"):
        Tracker("sqlite://")


WRITER = textwrap.dedent("""
    import sys
    from pipeline.tracking.store import Tracker
    uri, run_id, worker = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tracker = Tracker(uri, create=False)
    for step in range(1, 21):
        tracker.log_metrics(run_id, {f"w{worker}/m{k}": step * 10 + k for k in range(10)},
                            step=step)
        tracker.set_tags(run_id, {f"w{worker}": step})
""")


def test_several_writers_lose_nothing(tmp_path):
    """Three processes log batches into one SQLite store at once; every point arrives."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    exp_id = tracker.ensure_experiment("lcp-table-1")
    assert tracker.ensure_experiment("lcp-table-1") == exp_id
    run_ids = [tracker.create_run(exp_id, f"r{i}", tags={"id": "x"}, params={"p": i})
               for i in range(3)]
    env = {k: v for k, v in os.environ.items() if k not in tracking.MLFLOW_RUN_ENV}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, run_ids[i % 3], str(i)],
                              env=env, stderr=subprocess.PIPE, text=True) for i in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    for i in range(3):
        run = tracker.get_run(run_ids[i])
        assert run.data.tags[f"w{i}"] == "20"
        for k in range(10):
            history = tracker.metric_history(run_ids[i], f"w{i}/m{k}")
            assert sorted(m.step for m in history) == list(range(1, 21))
            assert sorted(m.value for m in history) == [s * 10 + k for s in range(1, 21)]


def test_a_runs_end_is_written_once_and_never_overwritten(tmp_path):
    """pipeline.tracking.run_status: the side that schedules a run ends it only while it is open,
    so a worker's own end (here FAILED, with its reason) survives a late stop;
    Tracker.set_status refuses a terminal status (that is run_status's to write)."""
    from pipeline.tracking.run_status import end_if_open, end_run

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracker.ensure_experiment("lcp-table-1")
    run_id = tracker.create_run(experiment, "r", status="SCHEDULED")
    end_run(tracker, run_id, "FAILED", {"failure_reason": "diverged"})
    assert not end_if_open(tracker, run_id, "KILLED", {"killed_reason": "stopped (SIGINT)"})
    run = tracker.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == "diverged"
    assert "killed_reason" not in run.data.tags

    other = tracker.create_run(experiment, "s")
    assert end_if_open(tracker, other, "KILLED", {"killed_reason": "stopped (SIGINT)"})
    assert tracker.get_run(other).info.status == "KILLED"
    # a later attempt that finishes drops the reasons the earlier one left
    tracker.set_status(other, "RUNNING")
    end_run(tracker, other, "FINISHED", clear_reasons=True)
    run = tracker.get_run(other)
    assert run.info.status == "FINISHED" and "killed_reason" not in run.data.tags
    with pytest.raises(ValueError, match="pipeline.tracking.run_status"):
        tracker.set_status(other, "KILLED")
