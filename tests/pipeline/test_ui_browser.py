"""`lcp ui` in a real browser: headless Chromium (Debian's `chromium` package) renders the link
`lcp ui` prints for a table, and sees the runs table, not MLflow's GenAI overview."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_NAME = "t1-ff-lcp-di/seed=0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _visible_text(html: str) -> str:
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


@pytest.mark.slow
def test_lcp_ui_opens_a_table_on_its_runs_in_headless_chromium(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        why = "needs Debian's chromium package (apt-get install chromium)"
        if os.environ.get("LCP_TEST_REQUIRE_EXTRAS") == "1":  # CI (.ci/run installs it)
            pytest.fail(why)
        pytest.skip(why)
    from pipeline.tracking.run_status import end_run
    from pipeline.tracking.store import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    run_id = tracker.create_run(tracker.ensure_experiment("lcp-table-1"), RUN_NAME,
                                tags={"lcp.kind": "run", "id": "t1-ff-lcp-di"})
    tracker.log_metrics(run_id, {"eval_test/accuracy": 0.9, "align/cos_to_gradient": 0.99}, 1)
    end_run(tracker, run_id, "FINISHED")

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    ui = subprocess.Popen([sys.executable, "-c", "import cli; cli.main()", "ui",
                           "--tracking-uri", uri, "--port", str(port)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=open(tmp_path / "ui.log", "w"),
                          text=True, start_new_session=True)
    try:
        link = None
        for line in ui.stdout:
            if line.strip().startswith("lcp-table-1: "):
                link = line.split(": ", 1)[1].strip()
                break
        assert link and link.endswith("workflowType=machine_learning"), link
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert ui.poll() is None and time.monotonic() < deadline, (
                (tmp_path / "ui.log").read_text()[-2000:])
            time.sleep(2)
        browser = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
             "--virtual-time-budget=30000", "--dump-dom", link],
            capture_output=True, text=True, timeout=300)
        text = _visible_text(browser.stdout)
        assert text.startswith("Runs - Experiment"), text[:500]
        assert "Run Name" in text and RUN_NAME in text, text[:2000]
        assert "Token Usage" not in text and "Traces 0" not in text  # the GenAI overview
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)
