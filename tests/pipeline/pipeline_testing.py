"""Helpers for the pipeline tests: a two-row manifest, a synthetic MNIST folder, the CLI."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

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
        from pipeline.tracking import Tracker

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
