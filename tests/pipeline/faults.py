"""Faults injected into pipeline workers by the tests, through the worker's generic callback
option ($LCP_WORKER_CALLBACKS, see pipeline/worker.py): `fault_env(spec)` is the environment that
makes every worker started from it (locally or as a Ray task) run `FaultInjector(spec)`.

SPEC is `[SCOPE:]KIND`: SCOPE a run-name prefix such as `t1-ff-bp` or `t1-ff-bp/seed=1`; KIND
`raise@N` (raise at the end of epoch N), `raise-once@N` (the same on the first attempt only),
`exit@N` (hard exit, like an OOM kill, at the end of epoch N) or `sleep=S` (sleep S seconds after
every epoch).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from lcp.callbacks import Callback

SPEC_ENV = "LCP_TEST_FAULT"


# The repository root, so that a worker started from any folder can import this module.
REPO_ROOT = str(Path(__file__).resolve().parents[2])


def fault_env(spec: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    return {"LCP_WORKER_CALLBACKS": "tests.pipeline.faults:from_env", SPEC_ENV: spec,
            "PYTHONPATH": path}


def set_fault(monkeypatch, spec: str) -> None:
    for name, value in fault_env(spec).items():
        monkeypatch.setenv(name, value)


def from_env(name: str, run_dir: Path) -> "FaultInjector | None":
    spec = os.environ.get(SPEC_ENV, "").strip()
    return FaultInjector(spec, name, run_dir) if spec else None


class FaultInjector(Callback):
    def __init__(self, spec: str, name: str, run_dir: Path):
        self.kind, self.epoch, self.seconds = None, 1, 0.0
        self.run_dir = Path(run_dir)
        scope, _, kind = spec.rpartition(":") if ":" in spec else ("", "", spec)
        if scope and not (name == scope or name.startswith(scope + "/")):
            return
        if kind.startswith("sleep="):
            self.kind, self.seconds = "sleep", float(kind.split("=", 1)[1])
            return
        base, _, at = kind.partition("@")
        if base not in ("raise", "raise-once", "exit"):
            raise ValueError(f"{SPEC_ENV}: unknown fault {kind!r}")
        self.kind, self.epoch = base, int(at or 1)

    def on_epoch_end(self, state, metrics):
        if self.kind == "sleep":
            time.sleep(self.seconds)
        elif self.kind is not None and state.epoch == self.epoch:
            if self.kind == "exit":
                os._exit(137)
            marker = self.run_dir / ".fault-fired"
            if self.kind == "raise-once":
                if marker.exists():
                    return
                marker.write_text("1")
            raise RuntimeError(f"injected fault ({SPEC_ENV}) at the end of epoch {state.epoch}")
