"""Several processes using one fresh PostgreSQL database (started by the test on 127.0.0.1) for
the first time at the same moment, as two `lcp tune` processes or a table's workers do: Optuna
creates its tables, MLflow an experiment's dataset row, each by looking first and creating
after, so two first users can both create and one gets a duplicate-key error. Every process
must succeed and nothing may be recorded twice."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers.conftest import clean_env, require_postgres_driver

REPO = Path(__file__).resolve().parents[2]
PROCESSES, ROUNDS = 4, 6

# One process: open the Optuna storage at `start`.
OPEN_STORAGE = r"""
import sys, time
from pipeline.tuning.optuna_study import StorageSpec, open_storage
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
open_storage(StorageSpec("rdb", sys.argv[1]))
"""

# One process: a run per round, each logging the round's dataset at the round's start time.
CHILD = r"""
import sys, time
from pipeline.tracking.store import Tracker
uri, experiment, start, rounds, who = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
tracker = Tracker(uri, check=False)
runs = [tracker.create_run(experiment, f"{who}-{r}") for r in range(rounds)]
for r, run_id in enumerate(runs):
    time.sleep(max(0.0, start + 0.4 * r - time.time()))
    tracker.log_datasets(run_id, [{"name": "mnist", "split": "train", "size": 256,
                                   "digest": f"round-{r}", "source": "data/mnist"}])
    print(run_id, flush=True)
"""


@pytest.mark.slow  # about 20 s; CI runs it (.ci/run: pytest -m slow)
def test_runs_logging_one_dataset_at_once_all_keep_their_inputs(postgres):
    require_postgres_driver()
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.store import Tracker

    uri = postgres.create_database("mlflow_datasets")
    experiment = Tracker(uri).ensure_experiment("lcp-table-1")
    start = time.time() + 12  # after every process has imported MLflow and made its runs
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, uri, experiment, str(start),
                               str(ROUNDS), f"p{i}"], cwd=REPO, env=clean_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(PROCESSES)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    run_ids = [line for out, _ in results for line in out.split()]
    assert len(run_ids) == PROCESSES * ROUNDS
    client = MlflowClient(tracking_uri=uri)
    for run_id in run_ids:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert len(inputs) == 1 and inputs[0].dataset.name == "mnist", inputs
    digests = {client.get_run(r).inputs.dataset_inputs[0].dataset.digest for r in run_ids}
    assert digests == {f"round-{r}" for r in range(ROUNDS)}


@pytest.mark.slow  # about 15 s; CI runs it (.ci/run: pytest -m slow)
def test_tuners_opening_a_fresh_optuna_database_at_once_all_succeed(postgres):
    require_postgres_driver()
    import optuna

    url = postgres.create_database("optuna_first_use")
    start = time.time() + 10  # after every process has imported Optuna and SQLAlchemy
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORAGE, url, str(start)], cwd=REPO,
                              env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(PROCESSES)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    storage = optuna.storages.RDBStorage(url)
    assert storage.get_all_studies() == []  # one schema, usable
