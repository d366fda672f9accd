"""`--executor ray` on a local Ray instance (CPU): a table of two runs as Ray tasks in the same
MLflow store, the scheduler's retries, Ray's own retry of a task whose Ray worker died (the run
resumes under the same run id), cancel = SIGTERM then SIGKILL, a GPU share per run on a cluster
that declares GPUs, `lcp tune --executor ray` (a lost trial task is enqueued again), the errors
for missing Ray and for options of the other executor.

The slower ones are marked slow (`pytest -m slow`; CI runs both sets). Skipped when Ray is not
installed (`pip install -e ".[ray]"`), unless $LCP_TEST_REQUIRE_EXTRAS=1 (CI): there a missing
Ray fails.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from faults import set_fault  # noqa: E402
from pipeline_testing import Workspace, invoke  # noqa: E402

from extras import require  # noqa: E402


def _require(module: str, why: str):
    try:
        return __import__(module)
    except ImportError:
        require(False, f"{module} is not installed ({why})")


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance (2 CPUs, no GPU, no dashboard) for the module; the executor finds
    it connected and leaves it running. Started with SIGINT ignored, as everything started in
    the background by a shell (`lcp ... &`) is: Ray's cancel must work all the same."""
    import signal as _signal

    ray = _require("ray", 'pip install -e ".[ray]"')
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file for a private instance
    if ray.is_initialized():
        ray.shutdown()
    previous = _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # inherited by Ray's processes
    try:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    finally:
        _signal.signal(_signal.SIGINT, previous)
    yield ray
    ray.shutdown()


def _job(tmp_path, key: str, code: str):
    from pipeline.scheduling.scheduler import Job

    return Job(key=key, command=[sys.executable, "-c", code], log_path=tmp_path / f"{key}.log",
               env={"PYTHONUNBUFFERED": "1"}, cwd=str(tmp_path))


def _poll_until_done(executor, handle, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc = executor.poll(handle)
        if rc is not None:
            return rc
        time.sleep(0.1)
    raise AssertionError("the Ray task did not end in time")


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# ====================================================================== without a cluster


def test_missing_ray_is_one_clear_error(monkeypatch):
    from lcp.errors import LcpError
    from pipeline.scheduling.executors import ExecutorOptions, make_executor

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(LcpError, match=r'pip install -e "\.\[ray\]"'):
        make_executor(ExecutorOptions("ray", cpus_per_run=1))


def test_options_of_the_other_executor_are_refused(tmp_path, monkeypatch):
    ws = Workspace(tmp_path, seeds=(0,), num_epochs=1)
    monkeypatch.chdir(tmp_path)
    for extra, message in (
            (["--address", "auto"], "--address is an option of --executor ray"),
            (["--cpus-per-run", "2"], "--cpus-per-run is an option of --executor ray"),
            (["--executor", "ray", "--workers", "0"], "--workers must be ≥ 1"),
            (["--executor", "ray", "--gpus", "0"], "Ray assigns the devices"),
            (["--executor", "slurm"], "valid executors are: local, ray")):
        result = invoke(["run-table", "1", *ws.run_args(), *extra])
        assert result.exit_code == 2, (extra, result.output)
        assert message in result.output, (extra, result.output)
    assert not ws.db.exists()  # nothing created
    for extra in (["--address", "auto"], ["--cpus-per-run", "2"]):
        result = invoke(["tune", "t1-ff-lcp-di", "--trials", "1", *extra])
        assert result.exit_code == 2 and "is an option of --executor ray" in result.output


# ====================================================================== the executor


def test_capacity_and_infeasible_runs(ray_instance):
    from lcp.errors import LcpError
    from pipeline.scheduling.executors import ExecutorOptions, RayExecutor

    executor = RayExecutor(ExecutorOptions("ray", cpus_per_run=1))
    assert executor.gpus_per_run == 0  # no GPU in the cluster: CPU runs
    assert executor.free_slots() == 2 and executor.nodes() == 1
    assert "each run asks for 1 CPU" in executor.describe()
    assert RayExecutor(ExecutorOptions("ray", gpus="none", cpus_per_run=2)).free_slots() == 1
    with pytest.raises(LcpError, match="no node of the Ray cluster can hold one run"):
        RayExecutor(ExecutorOptions("ray", cpus_per_run=3))
    executor.close()
    assert ray_instance.is_initialized()  # not started by the executor: left running


GPU_SCRIPT = r"""
import json, sys, time
from pathlib import Path
import ray
ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)  # declared GPUs
from pipeline.scheduling.executors import ExecutorOptions, RayExecutor
from pipeline.scheduling.scheduler import Job
out = Path(sys.argv[1])
executor = RayExecutor(ExecutorOptions("ray", runs_per_gpu=2, cpus_per_run=1))
code = ("import os, time; print('cuda', os.environ['CUDA_VISIBLE_DEVICES'], "
        "os.environ['LCP_SLOT'], flush=True); time.sleep(5)")
jobs = [Job(key=f"j{i}", command=[sys.executable, "-c", code], log_path=out / f"j{i}.log")
        for i in range(4)]
report = {"gpus_per_run": executor.gpus_per_run, "free": executor.free_slots(),
          "describe": executor.describe()}
handles = [executor.start(job) for job in jobs]
report["free_after"] = executor.free_slots()
for h in handles:
    while executor.poll(h) is None:
        time.sleep(0.1)
report["rcs"] = [h.returncode for h in handles]
report["logs"] = [job.log_path.read_text() for job in jobs]
executor.close()
print(json.dumps(report))
"""


@pytest.mark.slow  # CI runs it (.ci/run: pytest -m slow)
def test_runs_ask_for_a_gpu_share_when_the_cluster_has_gpus(ray_instance, tmp_path):
    """A second Ray instance (its own process) that declares two GPUs: with --runs-per-gpu 2
    each task asks for half a GPU, Ray pins it with CUDA_VISIBLE_DEVICES, 4 run at a time."""
    import json
    import subprocess

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    for name in ("RAY_ADDRESS", "CUDA_VISIBLE_DEVICES"):  # Ray checks declared GPUs against it
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", GPU_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["gpus_per_run"] == 0.5 and report["free"] == 4 and report["free_after"] == 0
    assert "each run asks for 0.5 GPU + 1 CPU" in report["describe"]
    assert report["rcs"] == [0, 0, 0, 0]
    devices = []
    for log in report["logs"]:
        line = next(l for l in log.splitlines() if l.startswith("cuda "))
        _, visible, slot = line.split(" ")
        assert visible in ("0", "1") and slot.endswith(f":gpu{visible}")
        devices.append(visible)
    assert set(devices) == {"0", "1"}  # runs started together are spread over both GPUs


def test_task_runs_the_command_with_its_environment(ray_instance, tmp_path, monkeypatch):
    from pipeline.scheduling.executors import ExecutorOptions, RayExecutor

    monkeypatch.setenv("LCP_SOMETHING", "forwarded")
    monkeypatch.setenv("MLFLOW_RUN_ID", "must-not-reach-the-worker")
    executor = RayExecutor(ExecutorOptions("ray", cpus_per_run=1), drop_env=("MLFLOW_RUN_ID",))
    code = ("import os, sys; print('env', os.environ.get('LCP_SOMETHING'), "
            "os.environ.get('MLFLOW_RUN_ID'), repr(os.environ['CUDA_VISIBLE_DEVICES']), "
            "os.environ['OMP_NUM_THREADS'], os.environ['LCP_SLOT'], os.getcwd()); sys.exit(7)")
    job = _job(tmp_path, "env", code)
    handle = executor.start(job)
    assert executor.free_slots() == 1
    assert _poll_until_done(executor, handle) == 7
    assert executor.free_slots() == 2
    log = job.log_path.read_text()
    assert "=== env: attempt 0 as a Ray task on ray:" in log
    line = next(l for l in log.splitlines() if l.startswith("env "))
    _, forwarded, run_id, cuda, threads, slot, cwd = line.split(" ")
    assert (forwarded, run_id, cuda, threads) == ("forwarded", "None", "''", "1")
    assert slot.startswith("ray:") and slot.endswith(":cpu") and cwd == str(tmp_path)


def test_terminate_sends_sigterm_and_kill_stops_it_now(ray_instance, tmp_path):
    from pipeline.scheduling.executors import ExecutorOptions, RayExecutor

    executor = RayExecutor(ExecutorOptions("ray", cpus_per_run=1), grace_s=30)
    polite = _job(tmp_path, "polite", (
        "import signal, sys, time\n"
        "def bye(s, f):\n    print('got SIGTERM', flush=True); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, bye)\nprint('ready', flush=True)\ntime.sleep(60)\n"))
    stubborn = _job(tmp_path, "stubborn", (
        "import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('pid', os.getpid(), flush=True)\ntime.sleep(60)\n"))
    h1, h2 = executor.start(polite), executor.start(stubborn)
    _wait_for(lambda: "ready" in _read(polite.log_path), 60, "the first task")
    _wait_for(lambda: "pid " in _read(stubborn.log_path), 60, "the second task")
    started = time.monotonic()
    executor.terminate(h1)
    assert _poll_until_done(executor, h1, 30) == 143
    assert "got SIGTERM" in polite.log_path.read_text()
    pid = int(stubborn.log_path.read_text().split("pid ")[1].split()[0])
    executor.terminate(h2)  # ignored by the process: still running
    time.sleep(1.0)
    assert executor.poll(h2) is None and _alive(pid)
    executor.kill(h2)
    assert _poll_until_done(executor, h2, 30) == -signal.SIGKILL
    _wait_for(lambda: not _alive(pid), 10, "the killed process to be gone")
    assert time.monotonic() - started < 25


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ====================================================================== lcp run-table --executor ray


def test_table_as_ray_tasks_with_a_retry(ray_instance, tmp_path, monkeypatch):
    """Two runs (two rows, seed 0); the first attempt of one fails and is retried (--retries 1)
    as a new Ray task that resumes it; both end FINISHED in the same store, with metrics and
    artifacts."""
    ws = Workspace(tmp_path, seeds=(0,), num_epochs=2)
    monkeypatch.chdir(tmp_path)
    set_fault(monkeypatch, "t1-ff-bp:raise-once@1")  # forwarded to the tasks
    result = invoke(["run-table", "1", *ws.run_args(), "--executor", "ray", "--cpus-per-run",
                     "1", "--retries", "1"])
    assert result.exit_code == 0, result.output
    assert "executor ray (" in result.output and "up to 2 at a time" in result.output
    assert "Ray retries a lost task up to 1 time(s)" in result.output
    assert "2 finished, 0 failed" in result.output
    assert "[retry]    t1-ff-bp/seed=0" in result.output
    runs = {r.data.tags["id"]: r for r in ws.runs()}
    assert set(runs) == {"t1-ff-bp", "t1-ff-lcp-di"}
    tracker = ws.tracker()
    for row, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["attempts"] == ("2" if row == "t1-ff-bp" else "1")
        assert "eval_test/accuracy" in run.data.metrics
        steps = sorted(m.step for m in tracker.metric_history(run.info.run_id, "train/loss"))
        assert steps == [1, 2]  # resumed after the failure: no gap, no duplicate
        assert {"config.yaml", "model.pth", "metrics.csv", "learning_curve.png",
                "logs/worker.log"} <= set(tracker.artifact_paths(run.info.run_id))
        log = Path(run.data.tags["log_path"]).read_text()
        assert "as a Ray task on ray:" in log
    # Rerunning skips both (the same plan logic as the local executor).
    again = invoke(["run-table", "1", *ws.run_args(), "--executor", "ray"])
    assert again.exit_code == 0 and "nothing to run" in again.output


@pytest.mark.slow  # CI runs it (.ci/run: pytest -m slow)
def test_ray_retries_a_task_whose_worker_died(ray_instance, tmp_path, monkeypatch):
    """SIGKILL to the Ray worker that runs the task (what Ray's memory monitor or a lost node
    does): the run's process dies with it, Ray retries the task (max_retries = --retries) and
    the run resumes from its checkpoint under the same run id."""
    import threading

    ws = Workspace(tmp_path, seeds=(0,), num_epochs=2)
    monkeypatch.chdir(tmp_path)
    set_fault(monkeypatch, "sleep=3")  # slow epochs: time to kill it mid-way
    killed: dict[str, int] = {}

    def kill_the_ray_worker():
        lock = None

        def sleeping_after_epoch_1():
            nonlocal lock
            from pipeline.runs.rundir import read_progress

            found = list(ws.runs_dir.glob("lcp-table-1/*/seed=0/*/checkpoint.pt"))
            if found:
                lock = found[0].parent / "lock"
                return (read_progress(found[0].parent).get("epoch") == 1
                        and lock.read_text().strip().isdigit())
            return False

        _wait_for(sleeping_after_epoch_1, 90, "the end of epoch 1")
        run_pid = int(lock.read_text())
        stat = Path(f"/proc/{run_pid}/stat").read_text()
        ray_worker = int(stat.rsplit(")", 1)[1].split()[1])
        killed.update(run=run_pid, ray_worker=ray_worker, t=time.time(), stat=stat,
                      parent=Path(f"/proc/{ray_worker}/cmdline").read_bytes())
        os.kill(ray_worker, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_ray_worker, daemon=True)
    killer.start()
    result = invoke(["run", "t1-ff-bp", "--seeds", "0", *ws.run_args(), "--executor", "ray",
                     "--retries", "1"])
    killer.join(5)
    assert killed, "the Ray worker was not found"
    assert result.exit_code == 0, result.output
    assert "1 finished, 0 failed" in result.output
    assert "[retry]" not in result.output  # retried by Ray, not by the scheduler
    assert not _alive(killed["run"])
    (run,) = ws.runs()
    assert run.info.status == "FINISHED"
    log = Path(run.data.tags["log_path"]).read_text()
    assert log.count("as a Ray task on ray:") == 2, (log, killed)
    assert "resuming from epoch 1" in log, log
    steps = sorted(m.step for m in ws.tracker().metric_history(run.info.run_id, "train/loss"))
    assert steps == [1, 2]


# ====================================================================== lcp tune --executor ray


TUNE_TINY = ["--set", "rnn_hidden_units=16", "--set", "solver_max_iter=100"]


def _tune_args(tmp_path: Path, ws: Workspace, *extra: str) -> list[str]:
    import shutil

    manifest = tmp_path / "tune-experiments.yaml"
    if not manifest.exists():  # the repository's rows (with their search spaces)
        shutil.copy(Path(__file__).resolve().parents[2] / "experiments.yaml", manifest)
    return ["tune", "t1-ff-lcp-di", "--manifest", str(manifest), "--tracking-uri", ws.uri,
            "--storage", str(tmp_path / "journal.log"), "--data-dir", str(ws.data),
            "--runs-dir", str(ws.runs_dir), *TUNE_TINY, "--executor", "ray", *extra]


def _study(tmp_path: Path):
    import optuna

    from pipeline.tuning import optuna_study as T

    storage = T.open_storage(T.StorageSpec("journal", str(tmp_path / "journal.log")))
    return optuna.load_study(study_name="t1-ff-lcp-di", storage=storage)


@pytest.mark.slow  # CI runs it (.ci/run: pytest -m slow)
def test_tune_runs_trials_as_ray_tasks(ray_instance, tmp_path, monkeypatch):
    ws = Workspace(tmp_path, seeds=(0,))
    monkeypatch.chdir(tmp_path)
    result = invoke(_tune_args(tmp_path, ws, "--set", "num_epochs=2", "--set",
                               "limit_train_batches=3", "--trials", "3", "--workers", "2"))
    assert result.exit_code == 0, result.output
    assert "executor ray (" in result.output
    assert "3 of --trials 3 — 3 complete" in result.output
    assert "[ray#0, log" in result.output and "[ray#1, log" in result.output
    trials = _study(tmp_path).trials
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    for log in ws.runs_dir.glob("lcp-tune-t1-ff-lcp-di/*/trial-*/trial.log"):
        assert "as a Ray task on ray:" in log.read_text()


@pytest.mark.slow  # CI runs it (.ci/run: pytest -m slow)
def test_tune_trial_whose_ray_task_is_lost_is_enqueued_again(ray_instance, tmp_path,
                                                            monkeypatch):
    """SIGKILL to the Ray worker running trial 0: the trial is interrupted (not failed), its
    parameters enqueued again and run by the next trial; the study still reaches --trials."""
    import threading

    ws = Workspace(tmp_path, seeds=(0,))
    monkeypatch.chdir(tmp_path)
    killed: dict[str, int] = {}

    def kill_the_ray_worker():
        spec = "trial-0000/spec.json"

        def trial_pid():
            for proc in Path("/proc").iterdir():
                if proc.name.isdigit():
                    try:
                        cmd = (proc / "cmdline").read_bytes().split(b"\0")
                    except OSError:
                        continue
                    if b"--trial" in cmd and any(a.endswith(spec.encode()) for a in cmd):
                        return int(proc.name)
            return None

        def training():
            logs = list(ws.runs_dir.glob("lcp-tune-t1-ff-lcp-di/*/trial-0000/trial.log"))
            return bool(logs) and "device cpu" in _read(logs[0]) and trial_pid() is not None

        _wait_for(training, 90, "trial 0 to train")
        pid = trial_pid()
        stat = Path(f"/proc/{pid}/stat").read_text()
        ray_worker = int(stat.rsplit(")", 1)[1].split()[1])
        killed.update(trial=pid, ray_worker=ray_worker)
        os.kill(ray_worker, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_ray_worker, daemon=True)
    killer.start()
    result = invoke(_tune_args(tmp_path, ws, "--set", "num_epochs=3", "--set",
                               "limit_train_batches=30", "--trials", "2", "--workers", "1",
                               "--pruner", "none"))
    killer.join(5)
    assert killed, "the Ray worker was not found"
    assert result.exit_code == 0, result.output
    assert "trial 0 interrupted (Ray lost the task" in result.output, result.output
    assert "2 of --trials 2 — 2 complete" in result.output, result.output
    trials = _study(tmp_path).trials
    assert trials[0].state.name == "FAIL" and "lcp.interrupted" in trials[0].user_attrs
    again = [t for t in trials if t.user_attrs.get("lcp.retry_of") == 0]
    assert len(again) == 1 and again[0].state.name == "COMPLETE"
    assert again[0].params == trials[0].params
    assert not _alive(killed["trial"])
