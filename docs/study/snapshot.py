"""Carry the study's finished runs from one machine to the next.

    python docs/study/snapshot.py snapshot STORE FILE.db.gz   # the finished runs of STORE's MLflow
    python docs/study/snapshot.py restore STORE FILE.db.gz    # into a STORE that has no store yet

A study of many hours outlives a session and its machine; what is committed must let the next
machine go on. `snapshot` copies STORE/mlflow.db with SQLite's online backup (safe while runs
write to it), deletes from the copy (MLflow's delete: the run is kept but hidden) the runs not
FINISHED, whose checkpoints stay on this machine, so the next machine runs those pairs anew, and
writes it compressed. The ownership leases stay: one that nobody renews is stale after its TTL,
and the pipeline takes it over (docs/reliability.md); deleting one would block its name. `restore` unpacks it as STORE/mlflow.db when STORE has none, so the
pipeline skips the finished runs and runs the rest. Each run keeps its tags (host, CPU, commit).
"""

from __future__ import annotations

import gzip
import os
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path



def snapshot(store: Path, target: Path) -> None:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.store import LEASE_PREFIX

    source = store / "mlflow.db"
    if not source.exists():
        sys.exit(f"no MLflow store at {source}: run the study first")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "mlflow.db"
        with sqlite3.connect(source) as src, sqlite3.connect(copy) as dst:
            src.backup(dst)
        uri = f"sqlite:///{copy}"
        client = MlflowClient(tracking_uri=uri)
        kept = 0
        for exp in client.search_experiments(view_type=ViewType.ALL):
            if exp.name.startswith(LEASE_PREFIX):
                continue
            for run in client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL,
                                          max_results=50000):
                if run.info.status == "FINISHED" and run.info.lifecycle_stage == "active":
                    kept += 1
                elif run.info.lifecycle_stage == "active":
                    client.delete_run(run.info.run_id)
        with sqlite3.connect(copy) as db:
            db.execute("VACUUM")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(target.suffix + ".tmp")
        with open(copy, "rb") as f, gzip.GzipFile(partial, "wb", mtime=0) as out:
            shutil.copyfileobj(f, out)
        os.replace(partial, target)
    print(f"snapshot: {kept} finished run(s) -> {target}")


def restore(store: Path, source: Path) -> None:
    db = store / "mlflow.db"
    if db.exists():
        print(f"restore: {db} exists; kept as it is")
        return
    if not source.exists():
        print(f"restore: no snapshot at {source}; a new store")
        return
    store.mkdir(parents=True, exist_ok=True)
    partial = db.with_suffix(".db.tmp")
    with gzip.open(source, "rb") as f, open(partial, "wb") as out:
        shutil.copyfileobj(f, out)
    os.replace(partial, db)
    print(f"restore: {source} -> {db}")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("snapshot", "restore"):
        sys.exit(__doc__.split("\n\n")[1])
    {"snapshot": snapshot, "restore": restore}[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]))
