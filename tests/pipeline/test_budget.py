"""The budget planner (`lcp budget`, `run-table --dry-run`): it measures each row here through
the training loop, caches the measurement per machine and config, reads a row's slowdown from
finished runs in the store, and schedules the runs on the slots as the scheduler does."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_testing import Workspace, invoke  # noqa: E402

from pipeline.runs.budget import (MEASURE_VERSION, STARTUP_KEY, RunEstimate,  # noqa: E402
                                  epoch_step_time, makespan)


def test_makespan_hands_runs_to_the_slot_that_frees_first():
    assert makespan([10, 10, 10, 10], 2) == 20
    assert makespan([30, 10, 10, 10], 2) == 30
    assert makespan([5, 5, 5], 1) == 15
    assert makespan([], 3) == 0


def test_a_run_estimate_is_its_epochs_and_evaluations():
    e = RunEstimate("t1-ff-lcp-di", 0, "h", steps_per_epoch=100, eval_batches=10,
                    final_eval_batches=30, epochs=4, evals=4, step_s=0.01, eval_batch_s=0.002,
                    slowdown=2.0, slowdown_known=True, cached=False, startup_s=3.0)
    assert e.first_epoch_s == pytest.approx(100 * 0.01 + 10 * 0.002)
    assert e.total_s == pytest.approx(3.0 + 4 * 100 * 0.01 * 2.0 + (4 * 10 + 30) * 0.002)


def test_an_epoch_is_priced_at_the_rate_its_measured_steps_end_on():
    # a controller row whose solves slow down 9x after its first steps (the RNN's LCP-DI):
    # pricing the epoch at its first steps' median would be 9x too low
    ramp = [0.05] * 6 + [0.45] * 24
    assert epoch_step_time(ramp, 63) == pytest.approx((6 * 0.05 + 24 * 0.45 + 33 * 0.45) / 63)
    assert epoch_step_time([0.01] * 6, 100) == pytest.approx(0.01)
    # an epoch shorter than the measurement: the steps as measured
    assert epoch_step_time([0.1, 0.2, 0.3], 3) == pytest.approx(0.2)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("LCP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return Workspace(tmp_path, num_epochs=3)


def test_budget_measures_each_row_once_then_reads_the_cache(workspace):
    ws = workspace
    args = ["budget", "1", *ws.common(), "--data-dir", str(ws.data), "--workers", "2",
            "--threads", "1"]
    first = invoke(args)
    assert first.exit_code == 0, first.output
    assert first.output.count("measuring") == 2  # one config per row: seeds share it
    for row in ("t1-ff-bp", "t1-ff-lcp-di"):
        line = next(line for line in first.output.splitlines() if line.strip().startswith(row))
        assert re.search(rf"{row}\s+2\s+[\d.]+ms", line), line
    assert "2 slot(s)" in first.output and "of wall time" in first.output
    assert re.search(r"each run includes [\d.]+ s of process start", first.output), first.output
    assert "unknown (no finished run of this row in the store)" in first.output
    again = invoke(args)
    assert again.exit_code == 0 and "measuring" not in again.output
    # the measured numbers are the same (read back), not measured again
    strip = lambda text: [l for l in text.splitlines() if l.strip().startswith("t1-")]
    assert strip(again.output) == strip(first.output)
    # --remeasure measures each row's config again, once, not once per seed
    remeasured = invoke(args + ["--remeasure"])
    assert remeasured.exit_code == 0 and remeasured.output.count("measuring") == 2, \
        remeasured.output


def test_a_measurement_of_an_older_method_is_measured_again(workspace):
    import json

    ws = workspace
    args = ["budget", "t1-ff-bp", *ws.common(), "--data-dir", str(ws.data), "--threads", "1"]
    assert invoke(args).exit_code == 0
    cache = ws.root / "cache" / "budget.json"
    data = json.loads(cache.read_text())
    for entries in data.values():
        assert entries.pop(STARTUP_KEY)["startup_s"] > 0  # the process start, measured once
        for entry in entries.values():
            assert entry["version"] == MEASURE_VERSION and entry["steps"] >= 6
            del entry["version"]  # as the first method wrote it
    cache.write_text(json.dumps(data))
    again = invoke(args)
    assert again.exit_code == 0 and "measuring t1-ff-bp" in again.output, again.output


def test_the_slowdown_of_a_controller_row_comes_from_a_finished_run(workspace):
    ws = workspace
    done = invoke(["run", "t1-ff-lcp-di", *ws.run_args(), "--seeds", "0"])
    assert done.exit_code == 0, done.output
    out = invoke(["budget", "1", *ws.common(), "--data-dir", str(ws.data), "--seeds", "1"])
    assert out.exit_code == 0, out.output
    line = next(line for line in out.output.splitlines() if line.strip().startswith("t1-ff-lcp-di"))
    assert re.search(r"x\d+\.\d\d \(from the store\)", line), line


def test_dry_run_prints_the_budget_of_what_it_would_start(workspace):
    ws = workspace
    out = invoke(["run-table", "1", *ws.run_args(), "--dry-run", "--workers", "2"])
    assert out.exit_code == 0, out.output
    assert "budget on" in out.output and "of wall time on 2 slot(s)" in out.output
    assert not ws.db.exists()  # a dry run creates no store


def test_budget_refuses_bad_counts(workspace):
    ws = workspace
    out = invoke(["budget", "1", *ws.common(), "--workers", "0"])
    assert out.exit_code == 2 and "--workers must be ≥ 1" in out.output


@pytest.mark.parametrize("cores, quick, slots", [(2, True, "2 CPU worker(s) × 1 thread(s)"),
                                                 (16, True, "4 CPU worker(s) × 4 thread(s)"),
                                                 (2, False, "1 CPU worker(s) × 2 thread(s)")])
def test_short_runs_get_a_slot_per_core_up_to_four(workspace, monkeypatch, cores, quick, slots):
    # a --quick run is mostly its process start, which threads do not speed up
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setenv("LCP_BUDGET", "off")
    out = invoke(["run-table", "1", *workspace.run_args(), "--dry-run",
                  *(["--quick"] if quick else [])])
    assert out.exit_code == 0, out.output
    assert f"executor local: {slots}" in out.output, out.output


def test_a_rows_first_epoch_comes_from_a_run_of_it_on_this_cpu(workspace):
    """Where a run of the row's computation trained an epoch on this CPU and thread count, its
    first epoch is what the budget prices (a controller's solves can grow within an epoch,
    beyond the steps a measurement sees); other seeds, settings or thread counts do not count."""
    from mlflow.tracking import MlflowClient

    ws = workspace
    done = invoke(["run", "t1-ff-bp", *ws.run_args(), "--seeds", "0", "--threads", "1"])
    assert done.exit_code == 0, done.output
    client = MlflowClient(tracking_uri=ws.uri)
    run = client.search_runs([client.get_experiment_by_name("lcp-table-1").experiment_id])[0]
    first = min(client.get_metric_history(run.info.run_id, "epoch_time"), key=lambda m: m.step)
    out = invoke(["budget", "t1-ff-bp", *ws.common(), "--data-dir", str(ws.data), "--seeds",
                  "1", "--threads", "1", "--workers", "1"])
    assert out.exit_code == 0, out.output
    line = next(x for x in out.output.splitlines() if x.strip().startswith("t1-ff-bp"))
    assert "*" in line.split()[4] and "a run of the row in this store" in out.output, out.output
    step_ms = float(line.split()[2].removesuffix("ms"))
    steps = 256 // 64  # the workspace's training digits at the manifest's batch size
    assert step_ms == pytest.approx(1000 * first.value / steps, rel=0.05), (line, first.value)
    other = invoke(["budget", "t1-ff-bp", *ws.common(), "--data-dir", str(ws.data), "--seeds",
                    "1", "--threads", "2", "--workers", "1"])
    assert other.exit_code == 0 and "a run of the row in this store" not in other.output
