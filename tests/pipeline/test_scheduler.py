"""The scheduler without MLflow: slots (fake GPUs), processes, retries, fail-fast, stopping."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from itertools import combinations
from pathlib import Path

import pytest

from lcp.errors import LcpError
from pipeline.scheduling.executors import (ExecutorOptions, LocalExecutor, SlotPool, choose_gpus,
                                           make_executor, parse_gpus)
from pipeline.scheduling.openmp import OPENMP_WAIT_VARIABLES
from pipeline.scheduling.scheduler import (FAILED, FINISHED, KILLED, Hooks, Job, Scheduler,
                                           stop_on_signals)

ROOT = Path(__file__).resolve().parents[2]
LCP_BIN = str(Path(sys.executable).parent / "lcp")

# A job that records where it ran and when: slot env, start and end times.
RECORDER = (
    "import json, os, sys, time\n"
    "t0 = time.time(); time.sleep(float(sys.argv[2])); t1 = time.time()\n"
    "json.dump({'gpu': os.environ['CUDA_VISIBLE_DEVICES'], 'slot': os.environ['LCP_SLOT'],\n"
    "           'omp': os.environ['OMP_NUM_THREADS'], 't0': t0, 't1': t1},\n"
    "          open(sys.argv[1], 'w'))\n"
)


def _jobs(tmp_path: Path, n: int, seconds: float = 0.3, code: str = RECORDER) -> list[Job]:
    jobs = []
    for i in range(n):
        out = tmp_path / f"job{i}.json"
        jobs.append(Job(key=f"job{i}", command=[sys.executable, "-c", code, str(out),
                                                str(seconds)],
                        log_path=tmp_path / "logs" / f"job{i}.log", payload=out))
    return jobs


def _overlap(a, b) -> bool:
    return a["t0"] < b["t1"] and b["t0"] < a["t1"]


def test_parse_and_choose_gpus():
    assert parse_gpus(None) is None and parse_gpus("auto") is None
    assert parse_gpus("none") == [] and parse_gpus("cpu") == []
    assert parse_gpus("0, 2") == ["0", "2"]
    for bad in ("0,x", "-1", "0,0", "gpu0"):
        with pytest.raises(LcpError, match="--gpus"):
            parse_gpus(bad)
    assert choose_gpus(None, ["0", "1"]) == ["0", "1"]
    assert choose_gpus(["1"], ["0", "1"]) == ["1"]
    with pytest.raises(LcpError, match="visible GPUs are: 0, 1"):
        choose_gpus(["3"], ["0", "1"])
    with pytest.raises(LcpError, match="no CUDA GPU is visible"):
        choose_gpus(["0"], [])


def test_slot_pool_with_fake_gpus_never_hands_out_a_busy_slot():
    pool = SlotPool.for_gpus(["0", "1", "3"], runs_per_gpu=2, cpu_count=12)
    assert pool.size == 6 and all(s.threads == 2 for s in pool.slots)
    taken = [pool.acquire() for _ in range(6)]
    assert pool.acquire() is None and pool.free_count() == 0
    assert len({s.index for s in taken}) == 6
    per_gpu = {g: sum(1 for s in taken if s.gpu == g) for g in ("0", "1", "3")}
    assert per_gpu == {"0": 2, "1": 2, "3": 2}  # K per GPU, no more
    assert [s.gpu for s in taken[:3]] == ["0", "1", "3"]  # first runs spread over the GPUs
    assert taken[0].env()["CUDA_VISIBLE_DEVICES"] == "0"
    pool.release(taken[4])
    again = pool.acquire()
    assert again == taken[4]
    pool.release(taken[0])
    with pytest.raises(RuntimeError, match="released twice"):
        pool.release(taken[0])


def test_cpu_slots_split_the_threads():
    pool = SlotPool.for_cpu(workers=3, cpu_count=8)
    assert [s.threads for s in pool.slots] == [2, 2, 2]
    env = pool.slots[1].env()
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["OMP_NUM_THREADS"] == "2"
    assert SlotPool.for_cpu(workers=4, cpu_count=2).slots[0].threads == 1
    with pytest.raises(LcpError, match="--workers"):
        SlotPool.for_cpu(0)
    with pytest.raises(LcpError, match="--runs-per-gpu"):
        SlotPool.for_gpus(["0"], 0)


def test_workers_spin_briefly_unless_the_user_chose_how_openmp_waits(monkeypatch):
    slot = SlotPool.for_cpu(workers=2, cpu_count=2).slots[0]
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert slot.env()["GOMP_SPINCOUNT"] == "10000" and "OMP_WAIT_POLICY" not in slot.env()
    for variable, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "0")):
        monkeypatch.setenv(variable, value)  # the user's own choice reaches the worker
        env = slot.env()
        assert "GOMP_SPINCOUNT" not in env and "OMP_WAIT_POLICY" not in env
        monkeypatch.delenv(variable)


# Started as Python starts (sitecustomize): prints how OpenMP's threads will wait, read from the
# environment at the moment torch is first imported, which is when GNU OpenMP reads it.
OPENMP_PROBE = """\
import os, sys

class OpenMPProbe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            seen = {v: os.environ.get(v) for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
            print("openmp at torch import:", seen, flush=True)
        return None

sys.meta_path.insert(0, OpenMPProbe())
"""


def test_lcp_train_spins_briefly_unless_the_user_chose_how_openmp_waits(tmp_path, mnist_dir):
    """`lcp train` and `python3 run_classification.py`, started as a user starts them, wait as
    the workers do: the short spin is in the environment before torch starts OpenMP (the
    process's own rule, not a variable handed down); a user's OMP_WAIT_POLICY or GOMP_SPINCOUNT
    is left as it is."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(OPENMP_PROBE)
    base = {k: v for k, v in os.environ.items() if k not in OPENMP_WAIT_VARIABLES}
    base["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(probe), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    flags = ["--model=ff", "--trainer=bp", "--rnn_hidden_units=16", "--num_epochs=1",
             "--limit_train_batches=2", "--limit_eval_batches=1", f"--data_dir={mnist_dir}"]
    lcp_train, paper = [LCP_BIN, "train", *flags], [sys.executable, "run_classification.py", *flags]
    short = {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000"}
    cases = [(lcp_train, {}, short), (paper, {}, short),
             (lcp_train, {"OMP_WAIT_POLICY": "PASSIVE"},
              {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None}),
             (paper, {"GOMP_SPINCOUNT": "0"}, {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "0"})]
    procs = [subprocess.Popen([*command, f"--out_dir={tmp_path / str(i)}"], cwd=ROOT,
                              env={**base, **chosen}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i, (command, chosen, _) in enumerate(cases)]
    for proc, (command, chosen, expected) in zip(procs, cases):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert f"openmp at torch import: {expected}" in out, (command[:2], chosen, out)
        assert "eval_test/accuracy" in out  # the process trained


@pytest.mark.parametrize("runs_per_gpu", [1, 2])
def test_concurrent_runs_never_share_a_slot(tmp_path, runs_per_gpu):
    gpus = ["0", "1"]
    executor = LocalExecutor(SlotPool.for_gpus(gpus, runs_per_gpu, cpu_count=4))
    jobs = _jobs(tmp_path, 8, seconds=0.4)
    result = Scheduler(executor, poll_interval=0.02).run(jobs)
    assert result.ok, [(j.key, j.reason) for j in jobs]
    records = [json.loads(j.payload.read_text()) for j in jobs]
    assert {r["gpu"] for r in records} == set(gpus)
    for a, b in combinations(records, 2):
        if _overlap(a, b):
            assert a["slot"] != b["slot"], (a, b)
    # at no time more than K runs on one GPU, and the GPUs were really used in parallel
    for r in records:
        same_gpu = [o for o in records if o is not r and o["gpu"] == r["gpu"] and _overlap(r, o)]
        assert len(same_gpu) <= runs_per_gpu - 1
    assert any(_overlap(a, b) for a, b in combinations(records, 2))
    assert all(r["omp"] == str(max(1, 4 // (2 * runs_per_gpu))) for r in records)


class RecordingHooks(Hooks):
    def __init__(self):
        self.cancelled, self.done = [], []

    def on_cancel(self, job, was_running):
        self.cancelled.append((job.key, was_running))

    def on_done(self, job):
        self.done.append((job.key, job.status))


def test_retries_failures_and_fail_fast(tmp_path):
    fail_once = ("import os, sys; p = sys.argv[1] + '.seen'\n"
                 "if not os.path.exists(p): open(p, 'w').close(); sys.exit(3)\n")
    always = "import sys; sys.exit(5)"
    ok = "pass"
    jobs = [Job("flaky", [sys.executable, "-c", fail_once, str(tmp_path / "flaky")],
                tmp_path / "flaky.log"),
            Job("broken", [sys.executable, "-c", always], tmp_path / "broken.log"),
            Job("fine", [sys.executable, "-c", ok], tmp_path / "fine.log")]
    hooks = RecordingHooks()
    result = Scheduler(LocalExecutor(SlotPool.for_cpu(2, cpu_count=2)), hooks, retries=1,
                       poll_interval=0.02).run(jobs)
    status = {j.key: (j.status, j.attempts) for j in jobs}
    assert status == {"flaky": (FINISHED, 2), "broken": (FAILED, 2), "fine": (FINISHED, 1)}
    assert not result.ok and result.stopped is None
    assert "exited with code 5" in jobs[1].reason
    assert (tmp_path / "broken.log").read_text().count("=== broken: attempt") == 2

    # --fail-fast: the first final failure stops the rest (queued ones are not started)
    jobs = [Job("broken", [sys.executable, "-c", always], tmp_path / "b2.log")] + [
        Job(f"later{i}", [sys.executable, "-c", "import time; time.sleep(30)"],
            tmp_path / f"l{i}.log") for i in range(3)]
    hooks = RecordingHooks()
    start = time.monotonic()
    result = Scheduler(LocalExecutor(SlotPool.for_cpu(2, cpu_count=2)), hooks, fail_fast=True,
                       poll_interval=0.02, grace_s=5).run(jobs)
    assert time.monotonic() - start < 20
    assert result.stopped == "--fail-fast: broken failed"
    assert [j.status for j in jobs] == [FAILED, KILLED, KILLED, KILLED]
    assert sorted(hooks.cancelled) == [("later0", True), ("later1", False), ("later2", False)]


def test_a_start_that_asks_everything_to_stop_is_not_started_not_failed(tmp_path):
    """A full disk found while a job starts (its run cannot be created) stops the scheduler:
    that job is 'not started' with the stop's one-line reason, as the queued ones, never
    FAILED with the store's raw error."""
    class FullAtSecondStart(RecordingHooks):
        def __init__(self):
            super().__init__()
            self.starts = 0

        def before_start(self, job):
            self.starts += 1
            if self.starts == 2:
                self.request_stop("no space left on the file system mounted at /x")
                raise RuntimeError("(sqlite3.OperationalError) database or disk is full [SQL: …]")

    jobs = [Job(f"j{i}", [sys.executable, "-c", "pass"], tmp_path / f"j{i}.log")
            for i in range(3)]
    hooks = FullAtSecondStart()
    scheduler = Scheduler(LocalExecutor(SlotPool.for_cpu(1, cpu_count=1)), hooks,
                          poll_interval=0.02)
    hooks.request_stop = scheduler.request_stop
    result = scheduler.run(jobs)
    assert [j.status for j in jobs] == [FINISHED, KILLED, KILLED]
    assert all(j.reason == "not started (no space left on the file system mounted at /x)"
               for j in jobs[1:])
    assert result.stopped == "no space left on the file system mounted at /x"
    assert ("j1", False) in hooks.cancelled


def test_stop_request_from_a_signal_terminates_running_jobs(tmp_path):
    # the worker's stand-in: exits 143 on SIGTERM like pipeline.worker does
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
            "open(sys.argv[1], 'w').close(); time.sleep(60)\n")
    started = tmp_path / "started"
    jobs = [Job("long", [sys.executable, "-c", code, str(started)], tmp_path / "long.log"),
            Job("queued", [sys.executable, "-c", "pass"], tmp_path / "q.log")]
    hooks = RecordingHooks()
    scheduler = Scheduler(LocalExecutor(SlotPool.for_cpu(1, cpu_count=1)), hooks,
                          poll_interval=0.02, grace_s=10)

    def send_sigterm():
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        signal.raise_signal(signal.SIGTERM)  # handled by stop_on_signals in the main thread

    thread = threading.Thread(target=send_sigterm)
    previous = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(scheduler):
        thread.start()
        result = scheduler.run(jobs)
    thread.join()
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
    assert result.stopped == "SIGTERM"
    assert [(j.status, j.returncode) for j in jobs] == [(KILLED, 143), (KILLED, None)]
    assert hooks.cancelled == [("long", True), ("queued", False)]


def test_unknown_executor_names_the_valid_ones():
    with pytest.raises(LcpError, match="--executor 'slurm' is not available; valid executors "
                                       "are: local, ray"):
        make_executor(ExecutorOptions("slurm"))
    executor = make_executor(ExecutorOptions(gpus="none", workers=2, threads=1))
    assert executor.describe() == "local: 2 CPU worker(s) × 1 thread(s)"


def test_progress_display_lines(tmp_path):
    import io

    from pipeline.scheduling.scheduler import RUNNING, ProgressDisplay, status_line

    jobs = _jobs(tmp_path, 4)
    jobs[0].status, jobs[0].detail = RUNNING, "epoch 3/30"
    jobs[1].status, jobs[2].status = FINISHED, FAILED
    assert status_line(jobs) == ("queued 1 | running 1 | finished 1 | failed 1 — "
                                 "job0 epoch 3/30")
    stream = io.StringIO()
    display = ProgressDisplay(stream, interval=3600, tty=False)
    display.event("[started]  job0")
    display.status(jobs)
    display.status(jobs)  # within the interval: not printed again
    assert stream.getvalue().splitlines() == ["[started]  job0", status_line(jobs)]


def test_a_job_source_is_asked_only_when_a_slot_is_free(tmp_path):
    """`lcp tune`'s way: the next job (an Optuna trial) is made only when it can start now."""
    executor = make_executor(ExecutorOptions(gpus="none", workers=2, threads=1))
    waiting = _jobs(tmp_path, 5, seconds=0.3)
    free_when_asked = []

    def source():
        free_when_asked.append(executor.free_slots())
        return waiting.pop(0) if waiting else None

    result = Scheduler(executor, poll_interval=0.05).run(source=source)
    assert [j.status for j in result.jobs] == [FINISHED] * 5 and result.ok
    assert free_when_asked and min(free_when_asked) >= 1
    spans = [json.loads(j.payload.read_text()) for j in result.jobs]
    assert all(sum(b["t0"] <= a["t0"] < b["t1"] for b in spans) <= 2 for a in spans)  # 2 at once
