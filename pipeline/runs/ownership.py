"""One owner at a time per (row, seed): leases kept in the tracking store itself.

    ownership = Ownership(tracker)                 # this process as owner; renews in a thread
    holder = ownership.claim(key)                  # None: ours now; else the Holder that has it
    ownership.release(key)                         # or ownership.close(): all of ours

A lease is the MLflow experiment `lcp-lease/<key>`. Creating an experiment whose name exists fails
in every database-backed store, checked by the database in one transaction: that failure is the
atomic test-and-set. How a dead owner's lease is taken over, and what is not guaranteed:
docs/reliability.md ("Ownership").
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass

from pipeline.runs.rundir import pid_alive
from pipeline.tracking.store import LEASE_PREFIX

LEASE_TTL_S = 300.0  # a lease not renewed for this long is stale
RENEW_EVERY_S = 30.0
OWNER, HOST, PID, TOKEN, EXPIRES, SINCE = (f"lcp.lease.{k}" for k in (
    "owner", "host", "pid", "token", "expires", "since"))


@dataclass(frozen=True)
class Holder:
    """Who holds a lease (from its tags)."""

    owner: str
    host: str
    pid: int
    token: str
    since: float
    expires: float

    def describe(self) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(self.since))
        return f"{self.owner} (since {since})"

    def gone(self, now: float | None = None) -> bool:
        """Expired, or its process has ended on this machine."""
        if (now or time.time()) > self.expires:
            return True
        return self.host == socket.gethostname() and not pid_alive(self.pid)


def lease_name(key: str) -> str:
    return LEASE_PREFIX + key


def _holder(experiment) -> Holder | None:
    tags = experiment.tags or {}
    if TOKEN not in tags:
        return None
    try:
        return Holder(tags.get(OWNER, "?"), tags.get(HOST, "?"), int(tags.get(PID, "0")),
                      tags[TOKEN], float(tags.get(SINCE, "0")), float(tags.get(EXPIRES, "0")))
    except ValueError:
        return None


def _already_exists(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", "")
    return "RESOURCE_ALREADY_EXISTS" in str(code) or "already exists" in str(exc).lower()


class Ownership:
    """The leases this process holds in one tracking store; renewed by a daemon thread."""

    def __init__(self, tracker, *, owner: str | None = None, ttl_s: float = LEASE_TTL_S,
                 renew_every_s: float = RENEW_EVERY_S, warn=None):
        self.tracker = tracker
        self.ttl_s = ttl_s
        self.renew_every_s = min(renew_every_s, ttl_s / 3)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owner = owner or f"{self._command()} on {self.host} (pid {self.pid})"
        self.token = uuid.uuid4().hex
        self.since = time.time()
        self.warn = warn or (lambda text: print(f"warning: {text}", file=sys.stderr, flush=True))
        self._held: dict[str, str] = {}  # key -> experiment id of our lease
        self.lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _command() -> str:
        argv = [os.path.basename(a) for a in sys.argv[:2]]
        return " ".join(argv) if argv else "lcp"

    # ------------------------------------------------------------------ reading
    def holder(self, key: str) -> Holder | None:
        """The live holder of `key` (None when free, stale, or ours)."""
        exp = self.tracker.call(lambda: self.tracker.client.get_experiment_by_name(
            lease_name(key)))
        if exp is None or exp.lifecycle_stage != "active":
            return None
        holder = _holder(exp)
        if holder is None or holder.token == self.token or holder.gone():
            return None
        return holder

    def holders(self, retire_stale: bool = False) -> dict[str, Holder]:
        """Every live lease in the store, by key (one search). `retire_stale`: also end the
        leases of owners that are gone (a scheduler killed with SIGKILL, expired elsewhere),
        so that none stays active in the store for ever; a scheduler does it when it starts."""
        from mlflow.entities import ViewType

        out = {}
        experiments = self.tracker.call(lambda: self.tracker.client.search_experiments(
            view_type=ViewType.ACTIVE_ONLY, filter_string=f"name LIKE '{LEASE_PREFIX}%'",
            max_results=50000))
        for exp in experiments:
            holder = _holder(exp)
            if holder is not None and holder.token != self.token and not holder.gone():
                out[exp.name[len(LEASE_PREFIX):]] = holder
            elif retire_stale and holder is not None and holder.token != self.token:
                self._retire(exp.experiment_id, exp.name)
        return out

    # ------------------------------------------------------------------ claiming
    def _tags(self) -> dict[str, str]:
        return {OWNER: self.owner, HOST: self.host, PID: str(self.pid), TOKEN: self.token,
                SINCE: f"{self.since:.3f}", EXPIRES: f"{time.time() + self.ttl_s:.3f}"}

    def claim(self, key: str) -> Holder | None:
        """Make `key` ours (None) or return who holds it. Atomic: two processes claiming the
        same free or stale key at once cannot both get it."""
        if key in self._held:
            return None
        name = lease_name(key)
        client = self.tracker.client
        for _ in range(5):
            try:
                exp_id = self.tracker.call(lambda: client.create_experiment(name,
                                                                             tags=self._tags()))
            except Exception as exc:  # noqa: BLE001 - MlflowException: the name is taken
                if not _already_exists(exc):
                    raise
            else:
                with self._lock:
                    self._held[key] = exp_id
                self._start_renewing()
                return None
            exp = self.tracker.call(lambda: client.get_experiment_by_name(name))
            if exp is None:
                continue  # released meanwhile: try again
            holder = _holder(exp)
            if exp.lifecycle_stage == "active" and holder is not None and not holder.gone():
                return holder
            self._retire(exp.experiment_id, name)  # stale: take it over
        raise RuntimeError(f"could not claim {name}: it changed hands five times in a row")

    def _retire(self, exp_id: str, name: str) -> None:
        """Rename a lease out of the way (by id) and delete it, freeing its name."""
        client = self.tracker.client
        try:
            self.tracker.call(lambda: client.rename_experiment(
                exp_id, f"{name}/released-{uuid.uuid4().hex[:12]}"))
            self.tracker.call(lambda: client.delete_experiment(exp_id))
        except Exception as exc:  # noqa: BLE001 - retired meanwhile by another process
            if "RESOURCE_DOES_NOT_EXIST" not in str(getattr(exc, "error_code", "")) and \
                    "deleted" not in str(exc).lower():
                raise

    def release(self, key: str) -> None:
        with self._lock:
            exp_id = self._held.pop(key, None)
        if exp_id is None or key in self.lost:
            return
        try:
            self._retire(exp_id, lease_name(key))
        except Exception:  # noqa: BLE001 - the store is away or full: it ends on its own (our
            pass           # process gone on this machine, or its expiry elsewhere)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for key in list(self._held):
            self.release(key)

    def __enter__(self) -> "Ownership":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ renewing
    def _start_renewing(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._renew_loop, name="lcp-lease",
                                            daemon=True)
            self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            self.renew()

    def renew(self) -> None:
        """Push every held lease's expiry forward; a lease taken over meanwhile is reported."""
        with self._lock:
            held = dict(self._held)
        client = self.tracker.client
        for key, exp_id in held.items():
            try:
                self.tracker.call(lambda e=exp_id: client.set_experiment_tag(
                    e, EXPIRES, f"{time.time() + self.ttl_s:.3f}"))
            except Exception as exc:  # noqa: BLE001 - retired by a successor, or store away
                failure = exc
            else:
                failure = None
            try:
                exp = self.tracker.call(lambda e=exp_id: client.get_experiment(e))
            except Exception as exc:  # noqa: BLE001 - the store is away: try again later
                self.warn(f"could not renew the lease of {key}: {failure or exc}")
                continue
            if exp.name != lease_name(key) or exp.lifecycle_stage != "active":
                with self._lock:
                    self._held.pop(key, None)
                self.lost.add(key)
                self.warn(f"the lease of {key} was taken over by another scheduler (this one "
                          f"did not renew it for {self.ttl_s:.0f}s)")
