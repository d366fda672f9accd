"""`lcp run` logging over HTTP to a real `mlflow server` on 127.0.0.1: with an SQLite backend,
with a PostgreSQL backend (the compose stack's layout), and the compose file's own server
command line answering requests addressed to `http://mlflow:5000` as the workers send them."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.servers.compose import command_of, load
from tests.servers.conftest import (clean_env, free_port, require_postgres_driver,
                                    start_mlflow_server)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipeline"))
from pipeline_testing import LCP_BIN, Workspace  # noqa: E402

ARTIFACTS = {"config.yaml", "model.pth", "metrics.csv", "learning_curve.png", "logs/worker.log"}


def _lcp_run_over_http(ws: Workspace, url: str) -> subprocess.CompletedProcess:
    """`lcp run t1-ff-bp --seeds 0` (a real process, its worker another) logging to `url`."""
    cmd = [LCP_BIN, "run", "t1-ff-bp", "--seeds", "0", "--manifest", str(ws.manifest),
           "--tracking-uri", url, "--runs-dir", str(ws.runs_dir), "--data-dir", str(ws.data)]
    return subprocess.run(cmd, cwd=ws.root, env=clean_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)


def _check_the_run(url: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from lcp.training import load_model_file

    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("lcp-table-1")
    assert exp is not None
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("lcp.kind") == "run"]
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "t1-ff-bp/seed=0"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served by the server
    metrics = run.data.metrics
    assert {"eval_test/accuracy", "eval_train/accuracy", "wall_time_s"} <= set(metrics)
    assert 0.0 <= metrics["eval_test/accuracy"] <= 1.0
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == [1, 2]
    found: set[str] = set()
    pending = [""]
    while pending:
        for item in client.list_artifacts(run.info.run_id, pending.pop() or None):
            (pending.append(item.path) if item.is_dir else found.add(item.path))
    assert ARTIFACTS <= found, found
    model = client.download_artifacts(run.info.run_id, "model.pth", str(tmp_path))
    cfg, model, _trainer = load_model_file(model, (1, 28, 28))
    assert cfg.trainer == "bp" and cfg.seed == 0


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def test_lcp_run_logs_to_an_mlflow_server_over_http(backend, tmp_path, request):
    if backend == "postgresql":
        require_postgres_driver()
        postgres = request.getfixturevalue("postgres")
        backend_uri = postgres.create_database("mlflow_http")
    else:
        backend_uri = f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}"
    (tmp_path / "ws").mkdir()
    ws = Workspace(tmp_path / "ws", seeds=(0,), num_epochs=2)
    with start_mlflow_server(backend_uri, tmp_path / "server") as url:
        result = _lcp_run_over_http(ws, url)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 finished, 0 failed" in result.stdout
        assert f"tracking {url}" in result.stdout
        _check_the_run(url, tmp_path)
        # The same command again: the server's FINISHED run is found, nothing runs.
        again = _lcp_run_over_http(ws, url)
        assert again.returncode == 0 and "nothing to run" in again.stdout, again.stdout


def test_the_compose_mlflow_server_answers_the_workers_host_name(tmp_path):
    """docker/compose.yaml's `mlflow server` arguments (its store and port swapped for local
    ones) accept requests with `Host: mlflow:5000`, which MLflow 3 refuses by default."""
    args = command_of(load({"POSTGRES_PASSWORD": "x"})["services"]["mlflow"])
    assert args[0] == "server"
    swap = {"--backend-store-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination": str(tmp_path / "artifacts"), "--host": "127.0.0.1",
            "--port": str(free_port())}
    kept = []
    words = iter(args[1:])
    for word in words:
        if word in swap:
            next(words)
        else:
            kept.append(word)
    assert "--allowed-hosts" in kept
    with start_mlflow_server(swap["--backend-store-uri"], tmp_path, *kept) as url:
        for host in ("mlflow:5000", "localhost:5000"):
            request = urllib.request.Request(
                url + "/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200, host
        refused = urllib.request.Request(url + "/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers={"Host": "evil.example:5000"})
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(refused, timeout=10)
