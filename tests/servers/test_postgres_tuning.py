"""Two `lcp tune` processes on one Optuna study stored in a real PostgreSQL server (started by the
test on 127.0.0.1), the way the compose stack's tuners run: the storage URL from
$LCP_OPTUNA_STORAGE, the runs in an MLflow server whose backend is the same PostgreSQL server.
The study ends with exactly --trials counted trials, both processes ran some, every trial has
its nested MLflow run."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.tuning.optuna_study import A_RUN, A_SURPLUS
from tests.servers.conftest import clean_env, require_postgres_driver, start_mlflow_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synthetic import write_idx_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LCP_BIN = str(Path(sys.executable).parent / "lcp")
ID = "t1-ff-lcp-di"
TINY = ["--set", "rnn_hidden_units=16", "--set", "num_epochs=2", "--set", "solver_max_iter=100",
        "--set", "limit_train_batches=3"]
TRIALS = 3


@pytest.mark.slow  # about a minute on 2 cores; CI runs it (.ci/run: pytest -m slow)
def test_two_tuners_share_one_study_in_postgres(postgres, tmp_path):
    require_postgres_driver()
    storage_url = postgres.create_database("optuna_two_tuners")
    backend = postgres.create_database("mlflow_two_tuners")
    manifest = tmp_path / "experiments.yaml"
    shutil.copy(REPO / "experiments.yaml", manifest)
    data = write_idx_dataset(tmp_path / "mnist", n_train=256, n_test=64)
    with start_mlflow_server(backend, tmp_path / "server") as url:
        env = clean_env(LCP_OPTUNA_STORAGE=storage_url, OMP_NUM_THREADS="1")
        procs = []
        for name in ("a", "b"):
            folder = tmp_path / name
            folder.mkdir()
            cmd = [LCP_BIN, "tune", ID, "--trials", str(TRIALS), "--workers", "1",
                   "--manifest", str(manifest), "--tracking-uri", url, "--data-dir", str(data),
                   "--runs-dir", str(folder / "lcp-runs"), *TINY]
            procs.append(subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
            time.sleep(0.5)
        outputs = [p.communicate(timeout=600)[0] for p in procs]
        for proc, out in zip(procs, outputs):
            assert proc.returncode == 0, out
            assert f"study {ID} — postgresql://lcp@127.0.0.1" in out, out  # from the env var
        started = [int(out.split(" started by this call")[0].rsplit("; ", 1)[1])
                   for out in outputs]
        assert all(n >= 1 for n in started), outputs  # both tuners ran trials
        import optuna

        study = optuna.load_study(study_name=ID, storage=storage_url)
        counted = [t for t in study.trials if not t.user_attrs.get(A_SURPLUS)
                   and not t.user_attrs.get("lcp.interrupted")]
        assert len(counted) == TRIALS, [(t.number, t.state, t.user_attrs) for t in study.trials]
        assert all(t.state.name in ("COMPLETE", "PRUNED") for t in counted), (
            [(t.number, t.state.name, t.user_attrs) for t in study.trials], outputs)
        # Both tuners may ask at the same moment for the last trial: the loser marks its trial
        # surplus (FAIL, never run, no MLflow run). Every other trial was started exactly once.
        surplus = [t for t in study.trials if t.user_attrs.get(A_SURPLUS)]
        ran = [t for t in study.trials if not t.user_attrs.get(A_SURPLUS)]
        assert all(t.state.name == "FAIL" and A_RUN not in t.user_attrs for t in surplus)
        assert len(surplus) <= 1, [(t.number, t.user_attrs) for t in surplus]
        assert sum(started) == len(ran)  # nothing ran twice or behind our back

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=url)
        exp = client.get_experiment_by_name(f"lcp-tune-{ID}")
        runs = client.search_runs([exp.experiment_id], max_results=100)
        parents = [r for r in runs if r.data.tags.get("lcp.kind") == "tune-study"]
        trials = [r for r in runs if r.data.tags.get("lcp.kind") == "tune-trial"]
        assert len(parents) == 1  # one study, one parent run, whichever tuner made it
        assert sorted(int(r.data.tags["optuna.trial_number"]) for r in trials) == sorted(
            t.number for t in ran)
        assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
        assert all(r.info.status in ("FINISHED", "FAILED") for r in trials)
