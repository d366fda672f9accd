"""`lcp train` and `run_classification.py` end to end on small files in the real formats."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import lcp
from paper_flags import parse_command_line

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--num_epochs=1", "--limit_train_batches=5", "--limit_eval_batches=2"]


def paper_lines():
    lines, current = [], None
    for raw in (ROOT / "tests" / "data" / "paper_command_lines.txt").read_text().splitlines():
        if raw.startswith("# "):
            current = raw[2:].strip()
        elif raw.strip():
            lines.append((current, raw.strip()))
    return lines


def invoke(args):
    result = CliRunner().invoke(lcp, args, catch_exceptions=False)
    return result


def test_train_end_to_end_writes_metrics_and_a_loadable_model(mnist_dir, tmp_path):
    out = tmp_path / "out"
    result = invoke(["train", "--model=ff", "--trainer=lcp-di", "--alpha=0.5",
                     "--rnn_hidden_units=32", f"--data_dir={mnist_dir}", f"--out_dir={out}",
                     "--num_epochs=2", "--eval_epochs=1", "--seed=0", "--save_model=True"])
    assert result.exit_code == 0, result.output
    assert "eval_train/accuracy" in result.output and "eval_test/loss" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["alpha"] == 0.5 and len(metrics["history"]) == 2
    assert metrics["history"][0]["controlled/iterations_mean"] > 1
    assert metrics["final"]["eval_test/accuracy"] > 0.3  # learnable synthetic digits

    from lcp.training import load_model_file

    cfg, model, trainer = load_model_file(out / "model.pth", (1, 28, 28))
    assert cfg.trainer == "lcp-di" and cfg.rnn_hidden_units == 32


def test_missing_data_is_one_clear_error_without_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr("lcp.data.DEBIAN_FASHION_MNIST_DIR", tmp_path / "none")
    result = CliRunner().invoke(lcp, ["train", "--model=ff", f"--data_dir={tmp_path}/empty",
                                      "--data=fashion-mnist"])
    assert result.exit_code == 2
    assert "error:" in result.output and "fashion-mnist" in result.output
    assert str(tmp_path / "empty") in result.output
    assert "Traceback" not in result.output


def test_bad_flag_value_is_one_clear_error(tmp_path):
    result = CliRunner().invoke(lcp, ["train", "--model=ff", "--alpha=big"])
    assert result.exit_code == 2 and "'alpha'" in result.output
    result = CliRunner().invoke(lcp, ["train", "--model=ff", "--no_such_flag=1"])
    assert result.exit_code != 0 and "no_such_flag" in result.output


@pytest.mark.parametrize("flag", ["--alpha=nan", "--alpha=inf", "--limit_train_batches=0"])
def test_non_finite_or_empty_settings_exit_2_before_anything_runs(flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(lcp, ["train", "--model=ff", "--data=mnist-sample", flag])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert not (tmp_path / "out").exists()  # nothing written


def test_diverging_dynamics_end_the_run_with_a_reason(mnist_dir, tmp_path):
    result = CliRunner().invoke(lcp, [
        "train", "--model=ff", "--trainer=lcp-di", "--alpha=10", "--solver_max_iter=800",
        f"--data_dir={mnist_dir}", f"--out_dir={tmp_path}", *QUICK])
    assert result.exit_code == 3
    assert "diverged" in result.output and "alpha" in result.output


def test_run_classification_runs_a_paper_line_verbatim(mnist_dir, tmp_path):
    _, line = paper_lines()[0]
    args = line.split()[2:]  # drop `python3 run_classification.py`
    proc = subprocess.run(
        [sys.executable, "run_classification.py", *args, *QUICK, f"--data_dir={mnist_dir}",
         f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "eval_test/accuracy" in proc.stdout


MNIST_LINES = [(i, line) for i, line in paper_lines() if "--data=mnist" in line]
CIFAR_LINES = [(i, line) for i, line in paper_lines() if "--data=cifar10" in line]


@pytest.mark.parametrize("line", [line for _, line in MNIST_LINES],
                         ids=[i for i, _ in MNIST_LINES])
def test_every_mnist_paper_line_runs_with_lcp_train(line, mnist_dir, tmp_path):
    flags = [f"--{k}={v}" for k, v in parse_command_line(line).items()]
    result = invoke(["train", *flags, *QUICK, f"--data_dir={mnist_dir}", f"--out_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    final = json.loads((tmp_path / "metrics.json").read_text())["final"]
    assert 0.0 <= final["eval_test/accuracy"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("line", [line for _, line in CIFAR_LINES],
                         ids=[i for i, _ in CIFAR_LINES])
def test_every_cifar_paper_line_runs_with_lcp_train(line, cifar_dir, tmp_path):
    flags = [f"--{k}={v}" for k, v in parse_command_line(line).items()]
    result = invoke(["train", *flags, "--num_epochs=1", "--limit_train_batches=1",
                     "--limit_eval_batches=1", f"--data_dir={cifar_dir}", f"--out_dir={tmp_path}"])
    assert result.exit_code == 0, result.output


def test_missing_data_creates_no_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("lcp.data.DEBIAN_FASHION_MNIST_DIR", tmp_path / "none")
    monkeypatch.setattr("lcp.data._torchvision_download", lambda *a: "no network (test)")
    result = CliRunner().invoke(lcp, ["train", "--model=ff", "--data=fashion-mnist",
                                      f"--data_dir={tmp_path}/empty"])
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()
