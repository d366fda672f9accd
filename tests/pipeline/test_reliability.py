"""Reliability under concurrency and failure (docs/reliability.md): concurrent first use of an
embedded store, one owner per (row, seed), failures between creating a run and starting its
worker, full disks, and the smaller promises listed there."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from faults import SPEC_ENV, set_fault  # noqa: E402
from pipeline_testing import LCP_BIN, Workspace, invoke, signal_after_first_epoch  # noqa: E402


# ====================================================================== 1. concurrent first use


def _open_store(uri: str, queue) -> None:
    from pipeline.tracking.store import Tracker

    try:
        Tracker(uri).ensure_experiment("lcp-table-1")
        queue.put("ok")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put(f"{type(exc).__name__}: {exc}")


def test_concurrent_first_open_of_a_fresh_store_is_serialised(tmp_path):
    """Six processes open a store that does not exist yet at the same moment: all succeed, and
    the database holds one complete schema (no `_alembic_tmp_*` table left behind)."""
    import mlflow.tracking  # noqa: F401 - imported before forking, so the children start at once

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_open_store, args=(uri, queue)) for _ in range(6)]
    for proc in procs:
        proc.start()
    outcomes = [queue.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert outcomes == ["ok"] * len(procs), outcomes
    with sqlite3.connect(db) as con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        versions = con.execute("SELECT version_num FROM alembic_version").fetchall()
    assert not [t for t in tables if t.startswith("_alembic_tmp")]
    assert len(versions) == 1
    from pipeline.tracking.store import Tracker

    assert len(Tracker(uri).client.search_experiments()) == 2  # Default and lcp-table-1


def test_a_half_migrated_store_is_named_as_such(tmp_path):
    """A store an interrupted migration left without some of its tables: one line that says
    what it is (not a hint to check --tracking-uri), exit 2."""
    from pipeline.tracking.store import Tracker

    ws = Workspace(tmp_path)
    Tracker(ws.uri).client  # noqa: B018 - a complete store
    with sqlite3.connect(ws.db) as con:  # tables missing, the version of an older schema
        con.execute("DROP TABLE metrics")
        con.execute("UPDATE alembic_version SET version_num = '2b4d017a5e9b'")
    proc = subprocess.run([LCP_BIN, "list", *ws.common()], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    error, = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "schema" in error and str(ws.db) in error and "--tracking-uri" not in error


# ====================================================================== 2. one owner per pair


def _claim(uri: str, key: str, start, queue) -> None:
    from pipeline.runs.ownership import Ownership
    from pipeline.tracking.store import Tracker

    tracker = Tracker(uri)
    tracker.client  # noqa: B018 - opened before the start signal
    start.wait()
    try:
        holder = Ownership(tracker).claim(key)
        queue.put("claimed" if holder is None else f"held by {holder.owner}")
        start.wait()  # hold the lease (this process alive) until the parent has read all
    except BaseException as exc:  # noqa: BLE001
        queue.put(f"{type(exc).__name__}: {exc}")

def _claim_at_once(uri: str, key: str, processes: int = 6) -> list[str]:
    """Each of `processes` forked processes claims `key` at the same moment; their outcomes."""
    context = multiprocessing.get_context("fork")
    start, queue = context.Barrier(processes + 1), context.Queue()
    procs = [context.Process(target=_claim, args=(uri, key, start, queue))
             for _ in range(processes)]
    for proc in procs:
        proc.start()
    start.wait()
    outcomes = sorted(queue.get(timeout=300) for _ in procs)
    start.wait()
    for proc in procs:
        proc.join(timeout=60)
    return outcomes



def test_a_lease_has_one_owner_when_claimed_at_once(tmp_path):
    from pipeline.tracking.store import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    Tracker(uri).client  # noqa: B018
    outcomes = _claim_at_once(uri, "lcp-table-1/r/seed=0/h")
    assert outcomes.count("claimed") == 1, outcomes
    assert all(o.startswith("held by ") and "pid" in o for o in outcomes if o != "claimed")


def test_a_lease_is_released_taken_over_from_a_dead_owner_and_expires(tmp_path):
    from pipeline.runs.ownership import Ownership
    from pipeline.tracking.store import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    key = "lcp-table-1/t1-ff-bp/seed=0/abc"
    first, second = Ownership(tracker), Ownership(tracker)
    assert first.claim(key) is None
    assert first.claim(key) is None  # already ours
    holder = second.claim(key)
    assert holder is not None and holder.owner == first.owner and str(os.getpid()) in holder.owner
    assert key in second.holders()
    first.release(key)
    assert second.claim(key) is None and first.claim(key) is not None
    second.close()
    assert not second.holders() and first.claim(key) is None
    # A dead owner on this machine: taken over at once.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    ghost = Ownership(tracker)
    ghost.pid = int(dead)
    other = "lcp-table-1/t1-ff-bp/seed=1/abc"
    assert ghost.claim(other) is None
    assert first.claim(other) is None
    # On another machine: only once its lease has expired.
    remote = Ownership(tracker, ttl_s=2.0)
    remote.host = "elsewhere"
    third = "lcp-table-1/t1-ff-bp/seed=2/abc"
    assert remote.claim(third) is None
    remote._stop.set()  # a frozen remote owner: no renewal from its thread from now on
    assert first.claim(third) is not None
    remote.renew()
    holder = first.claim(third)
    assert holder is not None and not remote.lost
    time.sleep(max(0.0, holder.expires - time.time()) + 0.1)
    assert first.claim(third) is None
    remote.renew()  # the old owner learns it lost the lease
    assert remote.lost == {third}
    # Released leases leave no active experiment behind.
    first.close()
    names = [e.name for e in tracker.client.search_experiments()]
    assert not [n for n in names if n.startswith("lcp-lease/")], names


def test_the_next_scheduler_ends_the_stale_leases_of_dead_ones(tmp_path):
    """A scheduler killed with SIGKILL leaves its lease experiments active; the next one to
    plan ends every stale lease, including those of pairs it does not run."""
    from pipeline.runs.ownership import Ownership
    from pipeline.tracking.store import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    ghost = Ownership(tracker)
    ghost.pid = int(dead)
    assert ghost.claim("lcp-table-1/t1-ff-bp/seed=0/abc") is None
    live = Ownership(tracker)
    assert live.claim("lcp-table-1/t1-ff-bp/seed=1/abc") is None
    active = lambda: sorted(e.name for e in tracker.client.search_experiments()
                            if e.name.startswith("lcp-lease/"))
    assert len(active()) == 2
    assert Ownership(tracker).holders().keys() == {"lcp-table-1/t1-ff-bp/seed=1/abc"}
    assert len(active()) == 2  # reading alone ends nothing
    Ownership(tracker).holders(retire_stale=True)
    assert active() == ["lcp-lease/lcp-table-1/t1-ff-bp/seed=1/abc"]  # the live one stays
    live.close()


def test_leases_are_not_listed_as_tables(tmp_path):
    from pipeline.runs.ownership import Ownership
    from pipeline.tracking.store import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    table = tracker.ensure_experiment("lcp-table-1")
    with Ownership(tracker) as ownership:
        assert ownership.claim("lcp-table-1/t1-ff-bp/seed=0/abc") is None
        assert tracker.table_experiments() == [("lcp-table-1", table)]


def test_two_schedulers_on_the_same_pairs_run_each_once(tmp_path, monkeypatch):
    """The second `lcp run` finds both pairs owned by the first (alive: this process) and skips
    them with one line naming the owner; nothing is created, nothing is FAILED."""
    from pipeline.manifest import selection as sel
    from pipeline.manifest.manifest import load_manifest
    from pipeline.runs.ownership import Ownership

    ws = Workspace(tmp_path, num_epochs=1, seeds=(0,))
    monkeypatch.chdir(tmp_path)
    items = sel.expand(sel.select(load_manifest(ws.manifest), ids=["t1-ff-bp", "t1-ff-lcp-di"]),
                     [0], {"data_dir": str(ws.data)})
    first = Ownership(ws.tracker(), owner="lcp run on box (pid 1)")
    assert [first.claim(i.lease_key) for i in items] == [None, None]
    result = invoke(["run", "t1-ff-bp", "t1-ff-lcp-di", "--seeds", "0", *ws.run_args()])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("owned by lcp run on box (pid 1)") == 2
    assert "2 pair(s) skipped: owned by lcp run on box (pid 1)" in result.stderr
    assert ws.runs() == []
    first.release(items[0].lease_key)  # the first finished one pair (without running it here)
    result = invoke(["run", "t1-ff-bp", "t1-ff-lcp-di", "--seeds", "0", *ws.run_args()])
    assert "1 finished, 0 failed" in result.output and "1 pair(s) skipped" in result.stderr
    assert [(r.data.tags["id"], r.info.status) for r in ws.runs()] == [("t1-ff-bp", "FINISHED")]
    first.close()


def test_a_worker_never_reopens_a_finished_run(tmp_path, monkeypatch):
    from pipeline.manifest import selection as sel
    from pipeline.manifest.manifest import load_manifest
    from pipeline.runs import table_run as R

    ws = Workspace(tmp_path, num_epochs=1, seeds=(0,))
    monkeypatch.chdir(tmp_path)
    assert invoke(["run", "t1-ff-bp", *ws.run_args()]).exit_code == 0
    run, = ws.runs()
    tracker = ws.tracker()
    before = {k: len(tracker.metric_history(run.info.run_id, k)) for k in run.data.metrics}
    items = sel.expand(sel.select(load_manifest(ws.manifest), ids=["t1-ff-bp"]), [0],
                     {"data_dir": str(ws.data)})
    plan = R.RunPlan(items[0], R.RESUME, run.info.run_id, Path(run.data.tags["run_dir"]))
    proc = subprocess.run(R.worker_command(plan, ws.uri), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "already FINISHED; nothing to do" in proc.stdout, proc.stderr
    after = tracker.get_run(run.info.run_id)
    assert after.info.status == "FINISHED" and after.info.end_time == run.info.end_time
    assert {k: len(tracker.metric_history(run.info.run_id, k)) for k in run.data.metrics} == before


# ====================================================================== 3. failures before start


def test_a_run_folder_that_cannot_be_written_is_one_line_and_creates_no_run(tmp_path,
                                                                            monkeypatch):
    ws = Workspace(tmp_path, num_epochs=1, seeds=(0,))
    monkeypatch.chdir(tmp_path)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the runs folder should be")
    args = ["run", "t1-ff-bp", *ws.common(), "--data-dir", str(ws.data)]
    result = invoke([*args, "--runs-dir", str(blocked)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error, = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "cannot write" in error and str(blocked) in error and "--runs-dir" in error
    assert ws.runs() == []  # a new run is created only when its worker starts
    result = invoke([*args, "--runs-dir", str(ws.runs_dir)])  # a good folder: runs
    assert result.exit_code == 0, result.output
    assert "NEW     t1-ff-bp/seed=0" in result.output
    run, = ws.runs()
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags


def test_a_scheduled_run_whose_owner_is_gone_is_resumed(tmp_path, monkeypatch):
    """A run left SCHEDULED by a scheduler that died before starting its worker (no run folder
    here, no live lease) is resumed, not reported as running elsewhere forever."""
    from pipeline.tracking.store import Tracker

    ws = Workspace(tmp_path, num_epochs=1, seeds=(0,))
    monkeypatch.chdir(tmp_path)
    tracker = Tracker(ws.uri)
    from pipeline.manifest import selection as sel
    from pipeline.manifest.manifest import load_manifest
    from pipeline.runs import table_run as R

    item, = sel.expand(sel.select(load_manifest(ws.manifest), ids=["t1-ff-bp"]), [0],
                     {"data_dir": str(ws.data)})
    ghost = tracker.create_run(tracker.ensure_experiment("lcp-table-1"), item.name,
                               tags={**R.run_tags(item), "run_dir": str(tmp_path / "elsewhere")},
                               params=item.cfg.to_dict(), status="SCHEDULED")
    dry = invoke(["run", "t1-ff-bp", *ws.run_args(), "--dry-run"])
    assert "RESUME  t1-ff-bp/seed=0" in dry.output, dry.output
    result = invoke(["run", "t1-ff-bp", *ws.run_args()])
    assert result.exit_code == 0, result.output
    assert "RESUME  t1-ff-bp/seed=0" in result.output
    run, = ws.runs()
    assert run.info.run_id == ghost and run.info.status == "FINISHED"


# ====================================================================== 4. a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only; skipped with the reason otherwise)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command to make a small file system")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_stops_with_one_line_a_summary_and_resumable_runs(tmp_path, small_disk):
    """Store, artifacts and run folders on a 3 MiB file system, six runs: the disk fills; the
    scheduler names the full file system in one line, prints its summary and exits 1, with no
    traceback. With space again, a rerun finishes every pair, none twice."""
    ws = Workspace(tmp_path, num_epochs=2, seeds=(0, 1, 2))
    uri = f"sqlite:///{small_disk / 'mlflow.db'}"
    args = ["run-table", "1", "--manifest", str(ws.manifest), "--tracking-uri", uri,
            "--runs-dir", str(small_disk / "runs"), "--data-dir", str(ws.data)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([LCP_BIN, *args], cwd=small_disk, env=env, capture_output=True,
                          text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "Traceback" not in out and "[SQL:" not in out, out
    stopped = [line for line in proc.stderr.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1 and f"no space left on the file system mounted at {small_disk}" \
        in stopped[0], out
    assert "Summary:" in proc.stdout
    lines = proc.stdout.splitlines()
    not_started = [i for i, line in enumerate(lines) if "reason: not started" in line]
    assert not_started, out  # the runs it did not start: a reason, no log path
    assert all(not lines[i + 1].strip().startswith("log:") for i in not_started
               if i + 1 < len(lines)), out
    # Space again (a bigger file system in its place): the rerun recovers every pair once.
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_disk)], check=True)
    proc = subprocess.run([LCP_BIN, *args], cwd=small_disk, env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from pipeline.tracking.store import Tracker

    tracker = Tracker(uri, create=False)
    runs = [r for r in tracker.search_runs([tracker.get_experiment_id("lcp-table-1")])
            if r.data.tags.get("lcp.kind") == "run"]
    pairs = sorted((r.data.tags["id"], r.data.tags["seed"]) for r in runs
                   if r.info.status == "FINISHED")
    assert pairs == sorted({(r.data.tags["id"], r.data.tags["seed"]) for r in runs})
    assert len(pairs) == 6
    for run in runs:
        if run.info.status != "FINISHED":
            continue
        for key in ("train/loss", "wall_time_s", "eval_train/accuracy"):
            steps = [m.step for m in tracker.metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.data.tags["id"], key, steps)


# ====================================================================== 7. smaller promises


def test_attempts_count_across_calls_and_a_finished_run_keeps_no_failure_reason(
        tmp_path, monkeypatch):
    ws = Workspace(tmp_path, num_epochs=2, seeds=(0,))
    monkeypatch.chdir(tmp_path)
    set_fault(monkeypatch, "t1-ff-bp/seed=0:raise@1")
    result = invoke(["run", "t1-ff-bp", *ws.run_args()])
    assert result.exit_code == 1, result.output
    run, = ws.runs()
    assert run.info.status == "FAILED" and "injected fault" in run.data.tags["failure_reason"]
    assert run.data.tags["attempts"] == "1"
    monkeypatch.delenv(SPEC_ENV)
    result = invoke(["run", "t1-ff-bp", *ws.run_args()])
    assert result.exit_code == 0, result.output
    run, = ws.runs()
    assert run.info.status == "FINISHED"
    assert run.data.tags["attempts"] == "2" and run.data.tags["attempt"] == "2"
    assert "failure_reason" not in run.data.tags and "killed_reason" not in run.data.tags


def test_a_setting_that_wants_an_integer_says_so(tmp_path, monkeypatch):
    ws = Workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = invoke(["run-table", "1", "--manifest", str(ws.manifest), "--tracking-uri", ws.uri,
                     "--set", "num_epochs=five", "--dry-run"])
    assert result.exit_code == 2
    assert "expected an integer, got 'five'" in result.stderr
    assert "could not convert" not in result.stderr


def test_a_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    from torchvision import datasets

    from lcp.data import DataNotFoundError, load_split

    def failing(root, train, download):  # torchvision creates its folders, then fails
        (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        raise RuntimeError("no network (test)")

    monkeypatch.setattr(datasets, "MNIST", failing)
    missing = tmp_path / "nonexistent" / "data"
    with pytest.raises(DataNotFoundError, match="no network"):
        load_split("mnist", missing, train=True, download=True)
    assert not (tmp_path / "nonexistent").exists()
    kept = tmp_path / "existing"
    (kept / "MNIST").mkdir(parents=True)
    with pytest.raises(DataNotFoundError):
        load_split("mnist", kept, train=True, download=True)
    assert (kept / "MNIST").is_dir() and not (kept / "MNIST" / "raw").exists()


@pytest.mark.slow
def test_ctrl_c_says_sigint_in_the_run_and_the_summary(tmp_path):
    ws = Workspace(tmp_path, num_epochs=50, seeds=(0,))
    returncode, out = signal_after_first_epoch(ws, ["run", "t1-ff-bp", *ws.run_args()],
                                               signal.SIGINT)
    assert returncode == 130, out
    run, = ws.runs()
    assert run.info.status == "KILLED"
    assert run.data.tags["killed_reason"] == "stopped (SIGINT)", run.data.tags
    assert "reason: stopped (SIGINT)" in out and "SIGTERM" not in out


@pytest.mark.slow
def test_leases_through_an_mlflow_server_have_one_owner(tmp_path):
    """The same claims over HTTP (an `mlflow server` on SQLite): one winner among claims made
    at once; a released lease can be claimed again."""
    from pipeline.runs.ownership import Ownership
    from pipeline.tracking.store import Tracker
    from tests.servers.conftest import start_mlflow_server

    with start_mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server") as url:
        outcomes = _claim_at_once(url, "lcp-table-1/t1-ff-bp/seed=0/abc")
        assert outcomes.count("claimed") == 1, outcomes
        tracker = Tracker(url)
        first, second = Ownership(tracker), Ownership(tracker)
        other = "lcp-table-1/t1-ff-bp/seed=1/abc"
        assert first.claim(other) is None and second.claim(other) is not None
        first.release(other)
        assert second.claim(other) is None
        second.close()


# ====================================================================== killed schedulers


def test_workers_die_with_a_scheduler_killed_by_sigkill_and_the_next_call_resumes(tmp_path):
    """kill -9 of `lcp run`: its worker gets SIGTERM from the kernel (parent-death signal),
    marks its run KILLED and exits within seconds; the next call resumes the pair at once
    instead of finding it BUSY."""
    ws = Workspace(tmp_path, num_epochs=40, seeds=(0,))
    returncode, out = signal_after_first_epoch(ws, ["run", "t1-ff-bp", *ws.run_args()],
                                               signal.SIGKILL)
    assert returncode == -signal.SIGKILL, out
    import json

    progress = json.loads(next(ws.runs_dir.glob("**/progress.json")).read_text())
    worker = int(progress["pid"])
    deadline = time.monotonic() + 15
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker), "the worker outlived its killed scheduler"
    run, = ws.runs()
    assert run.info.status == "KILLED", run.info.status
    again = invoke(["run", "t1-ff-bp", *ws.run_args(), "--dry-run"])
    assert "RESUME" in again.output and "BUSY" not in again.output, again.output


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_non_finite_settings_and_empty_epochs_are_refused_before_anything_is_written(
        tmp_path, monkeypatch):
    ws = Workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    for setting in ("alpha=nan", "alpha=inf", "limit_train_batches=0"):
        result = invoke(["run", "t1-ff-lcp-di", *ws.run_args(), "--set", setting])
        assert result.exit_code == 2, result.output
        assert "finite number" in result.output or "must be ≥ 1, or -1" in result.output
    assert not ws.db.exists() and not ws.runs_dir.exists()


def test_a_run_whose_folder_is_gone_is_superseded_not_left_running(tmp_path, monkeypatch):
    """An interrupted run (RUNNING, epoch 1 logged) whose run folder was deleted cannot be
    resumed: the next call starts a new run for the pair and ends the old one KILLED, tagged
    superseded_by the new run — no run of the pair stays RUNNING."""
    from pipeline.manifest import selection as sel
    from pipeline.manifest.manifest import load_manifest
    from pipeline.runs import table as T, table_run as R
    from pipeline.tracking.store import Tracker

    ws = Workspace(tmp_path, num_epochs=1, seeds=(0,))
    monkeypatch.chdir(tmp_path)
    items = sel.expand(sel.select(load_manifest(ws.manifest), ids=["t1-ff-bp"]), [0],
                     {"data_dir": str(ws.data)})
    tracker = Tracker(ws.uri)
    plans = T.plan_runs(items, tracker, ws.runs_dir)
    R.prepare(plans, tracker, ws.runs_dir)
    for plan in plans:  # created as a scheduler does before starting its worker
        R.open_run(plan, tracker, ws.runs_dir)
    old = plans[0].run_id
    tracker.set_status(old, "RUNNING")
    tracker.log_metrics(old, {"epoch": 1}, step=1)
    shutil.rmtree(plans[0].run_dir)

    result = invoke(["run", "t1-ff-bp", *ws.run_args()])
    assert result.exit_code == 0, result.output
    runs = {r.info.run_id: r for r in ws.runs()}
    assert len(runs) == 2
    new = next(i for i in runs if i != old)
    assert runs[new].info.status == "FINISHED"
    assert runs[old].info.status == "KILLED"
    assert runs[old].data.tags["superseded_by"] == new
    assert "superseded by run" in runs[old].data.tags["killed_reason"]


def test_a_finished_run_that_lost_its_artifacts_is_flagged_and_force_reruns_it(tmp_path,
                                                                              monkeypatch):
    from urllib.parse import urlparse

    ws = Workspace(tmp_path, num_epochs=1, seeds=(0,))
    monkeypatch.chdir(tmp_path)
    assert invoke(["run", "t1-ff-bp", *ws.run_args()]).exit_code == 0
    run, = ws.runs()
    shutil.rmtree(urlparse(run.info.artifact_uri).path)
    listing = invoke(["list", "1", *ws.common(), "--runs-dir", str(ws.runs_dir),
                      "--data-dir", str(ws.data)])
    assert "0:done(artifacts missing)" in listing.output, listing.output
    plan = invoke(["run", "t1-ff-bp", *ws.run_args(), "--dry-run"])
    assert "WARNING: 1 FINISHED run(s) have lost their artifacts (t1-ff-bp/seed=0)" \
        in plan.output, plan.output
    assert "model.pth" in plan.output
    again = invoke(["run", "t1-ff-bp", *ws.run_args(), "--force"])
    assert again.exit_code == 0, again.output
    assert len(ws.runs(status="FINISHED")) == 2


def test_runs_left_open_by_a_gone_scheduler_are_ended_by_the_next_call(tmp_path, monkeypatch):
    """A run left SCHEDULED by a scheduler that died (no lease, no worker) is ended KILLED, with
    the reason, by the next call on the table even when that call does not run its pair; the
    call after that (on its pair) resumes it."""
    from pipeline.manifest import selection as sel
    from pipeline.manifest.manifest import load_manifest
    from pipeline.runs import table as T, table_run as R
    from pipeline.tracking.store import Tracker

    ws = Workspace(tmp_path, num_epochs=1, seeds=(0, 1))
    monkeypatch.chdir(tmp_path)
    items = sel.expand(sel.select(load_manifest(ws.manifest), ids=["t1-ff-bp"]), [1],
                     {"data_dir": str(ws.data)})
    tracker = Tracker(ws.uri)
    plans = T.plan_runs(items, tracker, ws.runs_dir)
    R.prepare(plans, tracker, ws.runs_dir)
    for plan in plans:  # created as a scheduler does, then never started; nobody owns it
        R.open_run(plan, tracker, ws.runs_dir)
    orphan = plans[0].run_id
    assert invoke(["run", "t1-ff-bp", *ws.run_args(), "--seeds", "0"]).exit_code == 0
    run = tracker.get_run(orphan)
    assert run.info.status == "KILLED"
    assert run.data.tags["killed_reason"] == T.ORPHAN_REASON
    again = invoke(["run", "t1-ff-bp", *ws.run_args(), "--seeds", "1"])
    assert again.exit_code == 0 and f"resume KILLED run {orphan[:8]}" in again.output
    assert tracker.get_run(orphan).info.status == "FINISHED"


def test_a_queued_runs_mlflow_duration_is_its_own_time(tmp_path, monkeypatch):
    """MLflow's Duration (end − start) of a run that waited in the queue counts its own time
    only: the run is created when its worker starts, not when the table was planned."""
    ws = Workspace(tmp_path, num_epochs=1, seeds=(0, 1))
    monkeypatch.chdir(tmp_path)
    result = invoke(["run", "t1-ff-bp", *ws.run_args(), "--workers", "1", "--set", "meta_lr=0.01"])
    assert result.exit_code == 0, result.output
    first, second = sorted(ws.runs(), key=lambda r: r.info.start_time)
    assert first.info.status == second.info.status == "FINISHED"
    # one slot: the second run waited for the first, and started after it ended
    assert second.info.start_time >= first.info.end_time
    for run in (first, second):  # created late, still with every tag of a table run
        assert run.data.tags["overrides"] == "meta_lr=0.01" and run.data.tags["run_dir"]
