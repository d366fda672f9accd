"""`lcp ui`: the MLflow UI on the pipeline's store, as a child process that stops with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from lcp.errors import LcpError
from pipeline.scheduling.executors import signal_process_group
from pipeline.tracking import store


def serve(tracking_uri: str | None, host: str, port: int, echo) -> int:
    """Run `mlflow ui` on the store until it ends or Ctrl-C/SIGTERM (which also stop its helper
    processes), after printing a link to each table's runs through `echo`; its exit status
    (0 when stopped)."""
    uri = store.resolve_tracking_uri(tracking_uri)
    if store.is_server_uri(uri):
        echo(f"{uri} is an MLflow server already: open it in a browser")
        return 0
    tracker = store.Tracker(uri)
    tracker.client  # noqa: B018 - checks the store; creates or upgrades its schema (file lock)
    if not 1 <= port <= 65535:
        raise LcpError(f"--port must be in 1..65535 (got {port})")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", host, "--port", str(port)]
    root = store.artifact_root(uri)
    if root is not None:
        cmd += ["--artifacts-destination", str(root)]
    echo(f"MLflow UI on {uri}: {store.ui_link(host, port, 'experiments')}  (Ctrl-C to stop)")
    for name, experiment_id in tracker.table_experiments():
        echo(f"  {name}: {store.ui_link(host, port, 'experiments/' + experiment_id)}")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID",)}
    # Its own process group, so that stopping `lcp ui` (Ctrl-C, SIGTERM) also stops the
    # server's helper processes instead of leaving them behind.
    server = subprocess.Popen(cmd, env=env, start_new_session=True)
    stopping = []

    def stop(signum, frame):  # noqa: ARG001
        stopping.append(signum)
        signal_process_group(server, signal.SIGTERM)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            try:
                code = server.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stopping and len(stopping) > 1:
                    signal_process_group(server, signal.SIGKILL)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        signal_process_group(server, signal.SIGTERM)  # helpers still alive after the server ended
    return 0 if stopping else code
