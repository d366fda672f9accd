"""Helpers for the pipeline tests: a two-row manifest, a synthetic MNIST folder, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from click.testing import CliRunner
from faults import fault_env

LCP_BIN = str(Path(sys.executable).parent / "lcp")


def write_manifest(path: Path, *, num_epochs: int = 2, seeds=(0, 1), hidden: int = 32,
                   max_iter: int = 100) -> Path:
    """Two rows of table 1 (ff bp, ff lcp-di), small enough for a CPU test."""
    doc = {
        "defaults": {"seeds": list(seeds)},
        "sections": {"MNIST FF": {"args": {
            "data": "mnist", "model": "ff", "rnn_hidden_units": hidden,
            "num_epochs": num_epochs, "eval_epochs": 1, "meta_scheduler": "cos",
            "solver_max_iter": max_iter,
        }}},
        "experiments": [
            {"id": "t1-ff-bp", "table": 1, "section": "MNIST FF", "label": "BP",
             "args": {"trainer": "bp"}},
            {"id": "t1-ff-lcp-di", "table": 1, "section": "MNIST FF", "label": "LCP-DI",
             "args": {"trainer": "lcp-di", "alpha": 0.1, "dt": 1, "k_i": 1, "k_p": 0,
                      "solver_error_threshold": 1e-4}},
        ],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Workspace:
    """A manifest, data, a SQLite store and a runs folder in one temporary folder."""

    def __init__(self, root: Path, **manifest_options):
        from synthetic import write_idx_dataset

        self.root = root
        self.manifest = write_manifest(root / "experiments.yaml", **manifest_options)
        self.data = write_idx_dataset(root / "mnist", n_train=256, n_test=64)
        self.db = root / "mlflow.db"
        self.uri = f"sqlite:///{self.db}"
        self.runs_dir = root / "lcp-runs"
        self.reports = root / "reports"

    def common(self) -> list[str]:
        return ["--manifest", str(self.manifest), "--tracking-uri", self.uri]

    def run_args(self) -> list[str]:
        return self.common() + ["--runs-dir", str(self.runs_dir), "--data-dir", str(self.data)]

    def tracker(self):
        from pipeline.tracking.store import Tracker

        return Tracker(self.uri, create=False)

    def runs(self, status: str | None = None) -> list:
        tracker = self.tracker()
        exp_id = tracker.get_experiment_id("lcp-table-1")
        runs = tracker.search_runs([exp_id]) if exp_id else []
        runs = [r for r in runs if r.data.tags.get("lcp.kind") == "run"]
        return [r for r in runs if status is None or r.info.status == status]


def invoke(args: list[str]):
    """`lcp ARGS` in this process (click's CliRunner); returns the click Result."""
    from cli import lcp

    runner = CliRunner()
    return runner.invoke(lcp, args, catch_exceptions=False)


def signal_after_first_epoch(ws: Workspace, args: list[str], signum: int,
                             timeout: float = 90) -> tuple[int, str]:
    """Start `lcp ARGS` (its workers sleep 0.5 s per epoch), send `signum` once a worker has
    finished its first epoch; (exit status, output)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **fault_env("sleep=0.5")}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([LCP_BIN, *args], cwd=ws.root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not (ws.db.exists() and list(ws.runs_dir.glob("**/progress.json"))):
            if proc.poll() is not None:
                raise AssertionError(f"lcp ended (rc {proc.returncode}) before a worker's first "
                                     f"epoch:\n{proc.stdout.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for a worker's first epoch")
            time.sleep(0.05)
        proc.send_signal(signum)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out
