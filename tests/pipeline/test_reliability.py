"""Reliability under concurrency and failure (docs/reliability.md): concurrent first use of an
embedded store, one owner per (row, seed), failures between creating a run and starting its
worker, full disks, and the smaller promises listed there."""

from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pipeline_testing import LCP_BIN, Workspace, invoke  # noqa: E402,F401


# ====================================================================== 1. concurrent first use


def _open_store(uri: str, queue) -> None:
    from pipeline.tracking import Tracker

    try:
        Tracker(uri).ensure_experiment("lcp-table-1")
        queue.put("ok")
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put(f"{type(exc).__name__}: {exc}")


def test_concurrent_first_open_of_a_fresh_store_is_serialised(tmp_path):
    """Six processes open a store that does not exist yet at the same moment: all succeed, and
    the database holds one complete schema (no `_alembic_tmp_*` table left behind)."""
    import mlflow.tracking  # noqa: F401 - imported before forking, so the children start at once

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    procs = [context.Process(target=_open_store, args=(uri, queue)) for _ in range(6)]
    for proc in procs:
        proc.start()
    outcomes = [queue.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert outcomes == ["ok"] * len(procs), outcomes
    with sqlite3.connect(db) as con:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        versions = con.execute("SELECT version_num FROM alembic_version").fetchall()
    assert not [t for t in tables if t.startswith("_alembic_tmp")]
    assert len(versions) == 1
    from pipeline.tracking import Tracker

    assert len(Tracker(uri).client.search_experiments()) == 2  # Default and lcp-table-1


def test_a_half_migrated_store_is_named_as_such(tmp_path):
    """A store an interrupted migration left without some of its tables: one line that says
    what it is (not a hint to check --tracking-uri), exit 2."""
    from pipeline.tracking import Tracker

    ws = Workspace(tmp_path)
    Tracker(ws.uri).client  # noqa: B018 - a complete store
    with sqlite3.connect(ws.db) as con:  # tables missing, the version of an older schema
        con.execute("DROP TABLE metrics")
        con.execute("UPDATE alembic_version SET version_num = '2b4d017a5e9b'")
    proc = subprocess.run([LCP_BIN, "list", *ws.common()], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    error, = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert "schema" in error and str(ws.db) in error and "--tracking-uri" not in error
