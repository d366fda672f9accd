"""End to end on CPU: `lcp run-table 1` with two rows × two seeds on two workers, the MLflow
contents of every run, the rerun that skips them, `lcp list`, `--dry-run` and `lcp report`."""

from __future__ import annotations

import csv
import io
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_testing import Workspace, invoke  # noqa: E402

ROWS = ("t1-ff-bp", "t1-ff-lcp-di")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """The table run once for the whole module (about half a minute on 2 cores)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        ws = Workspace(tmp_path_factory.mktemp("table"))
        mp.chdir(ws.root)
        result = invoke(["run-table", "1", *ws.run_args(), "--workers", "2"])
        yield ws, result


def test_two_rows_two_seeds_finish_with_everything_logged(table):
    ws, result = table
    assert result.exit_code == 0, result.output
    assert "4 finished, 0 failed" in result.output
    assert "executor local: 2 CPU worker(s) × 1 thread(s)" in result.output
    runs = ws.runs()
    assert sorted(r.info.run_name for r in runs) == sorted(
        f"{row}/seed={s}" for row in ROWS for s in (0, 1))
    assert all(r.info.status == "FINISHED" for r in runs)
    tracker = ws.tracker()
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        row, seed = tags["id"], int(tags["seed"])
        assert run.info.run_name == f"{row}/seed={seed}"
        assert tags["table"] == "1" and tags["section"] == "MNIST FF"
        assert tags["label"] == {"t1-ff-bp": "BP", "t1-ff-lcp-di": "LCP-DI"}[row]
        assert tags["torch_version"] == torch.__version__
        assert tags["device"] == "cpu"
        from pipeline.tracking.store import git_commit

        if git_commit() is None:  # not a git checkout: no tag
            assert "git_commit" not in tags
        else:
            assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", tags["git_commit"])
        # params: the whole resolved config; its hash is the tag
        from lcp.config import RunConfig

        cfg = RunConfig.from_dict({k: (None if v == "None" else v) for k, v in params.items()})
        assert cfg.seed == seed and cfg.trainer == row[len("t1-ff-"):]
        assert cfg.config_hash() == tags["config_hash"]
        assert cfg.data_dir == str(ws.data)
        # per-epoch metrics at step = epoch, and the final evaluation
        for key in ("train/loss", "train/accuracy", "eval_test/accuracy", "epoch_time",
                    "epoch"):
            steps = [m.step for m in tracker.metric_history(run.info.run_id, key)]
            assert sorted(steps) == [1, 2], (key, steps)
        for key in ("eval_train/accuracy", "eval_train/loss", "eval_test/loss", "wall_time_s"):
            assert key in metrics
        if row == "t1-ff-lcp-di":
            assert "controlled/iterations_mean" in metrics
            assert "controlled/hit_max_iter_count" in metrics
        artifacts = set(tracker.artifact_paths(run.info.run_id))
        assert {"config.yaml", "model.pth", "metrics.csv", "learning_curve.png",
                "logs/worker.log"} <= artifacts


def test_artifacts_are_usable(table, tmp_path):
    ws, _ = table
    from mlflow.artifacts import download_artifacts

    from lcp.training import load_model_file

    run = next(r for r in ws.runs() if r.data.tags["id"] == "t1-ff-lcp-di")
    folder = download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path),
                                tracking_uri=ws.uri)
    cfg, model, trainer = load_model_file(f"{folder}/model.pth", (1, 28, 28))
    assert cfg.config_hash() == run.data.tags["config_hash"]
    with torch.no_grad():
        assert trainer.predict(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    saved = yaml.safe_load(open(f"{folder}/config.yaml"))
    assert saved["trainer"] == "lcp-di" and saved["seed"] == int(run.data.tags["seed"])
    rows = list(csv.DictReader(open(f"{folder}/metrics.csv")))
    assert [int(float(r["epoch"])) for r in rows] == [1, 2]
    log = open(f"{folder}/logs/worker.log").read()
    assert "attempt 1" in log and "finished" in log


def test_rerun_skips_every_finished_pair(table):
    ws, _ = table
    before = {r.info.run_id for r in ws.runs()}
    result = invoke(["run-table", "1", *ws.run_args(), "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "4 done (skip)" in result.output
    assert "nothing to run" in result.output
    assert {r.info.run_id for r in ws.runs()} == before


def test_dry_run_and_list(table):
    ws, _ = table
    result = invoke(["run-table", "1", *ws.run_args(), "--dry-run", "--force", "--seeds", "0"])
    assert result.exit_code == 0, result.output
    assert "dry run" in result.output
    assert result.output.count("NEW ") == 2 and "t1-ff-lcp-di/seed=0" in result.output
    # a --quick plan has another config hash: nothing of it is done yet
    result = invoke(["run-table", "1", *ws.run_args(), "--dry-run", "--quick"])
    assert result.exit_code == 0, result.output
    assert "quick tour: num_epochs=1" in result.output
    assert "4 new, 0 to resume, 0 done" in result.output
    result = invoke(["list", *ws.common(), "--runs-dir", str(ws.runs_dir)])
    assert result.exit_code == 0, result.output
    assert "Table 1 (experiment lcp-table-1): 2 rows, 4 runs, 4 done" in result.output
    assert "t1-ff-lcp-di" in result.output and "0:done  1:done" in result.output


def test_report_md_csv_and_pngs(table):
    ws, _ = table
    out = ws.root / "report-out"
    result = invoke(["report", "1", *ws.common(), "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = result.stdout
    assert "| Section" in md and "Test acc. (%)" in md and "Gap to BP/RBP (pp)" in md
    bp_line = next(line for line in md.splitlines() if "t1-ff-bp" in line)
    di_line = next(line for line in md.splitlines() if "t1-ff-lcp-di" in line)
    assert "(baseline)" in bp_line and "±" in di_line and "| 2 " in di_line
    for name in ("table-1-accuracy.png", "table-1-curves.png", "table-1.md", "table-1.csv",
                 "table-1.tex"):
        path = out / name
        assert path.exists() and path.stat().st_size > 0, name
    assert (out / "table-1-accuracy.png").read_bytes()[:4] == b"\x89PNG"

    result = invoke(["report", "1", *ws.common(), "--out", str(out), "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["id"] for r in rows] == list(ROWS)
    di = rows[1]
    assert di["n"] == "2" and di["baseline"] == "t1-ff-bp"
    assert abs(float(di["gap_to_baseline"]) - (float(di["test_acc_mean"])
                                               - float(rows[0]["test_acc_mean"]))) < 1e-3
    assert float(di["solver_iters"]) > 0 and float(di["hit_max_iter"]) >= 0
    # a verdict and health for every row (two seeds of 256 digits: far from a clear verdict,
    # but always one of the four words; the baseline has none)
    assert rows[0]["verdict"] == "" and di["verdict"] in ("matches", "below", "above",
                                                          "inconclusive")
    assert all(r["health"] for r in rows) and float(di["margin"]) == 1.0
    assert "Verdict vs BP/RBP (±1 pp)" in md and "Health" in md
    # per run: the thread count, the data, the best epoch and the health flags
    per_run = list(csv.DictReader(open(out / "table-1-runs.csv")))
    assert len(per_run) == 4
    for r in per_run:
        assert r["threads"] == "1" and r["data"] == "mnist" and r["health"] in ("ok", "collapsed")
        assert 1 <= int(float(r["best_epoch"])) <= 2
        assert float(r["best_test_acc"]) >= float(r["test_acc"]) - 1e-9
    # and the same on each run in MLflow, where the UI can filter on them
    for run in ws.runs():
        assert run.data.tags["health"] in ("ok", "collapsed")
        assert "health/best_test_accuracy" in run.data.metrics

    result = invoke(["report", "1", *ws.common(), "--out", str(out), "--margin", "-1"])
    assert result.exit_code == 2 and "--margin -1.0 is not valid" in result.output

    tracker = ws.tracker()
    exp_id = tracker.get_experiment_id("lcp-table-1")
    reports = tracker.search_runs([exp_id], "tags.`lcp.kind` = 'report'")
    assert len(reports) == 1  # reused, not one per call
    assert "report/table-1.md" in tracker.artifact_paths(reports[0].info.run_id)

    result = invoke(["report", "1", *ws.common(), "--quick", "--no-mlflow"])
    assert result.exit_code == 2
    assert "other settings" in result.output and "--any-config" in result.output
