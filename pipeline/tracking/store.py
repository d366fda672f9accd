"""The pipeline's thin layer over MLflow: the store, one experiment per table, runs, batched
logging, retries on a locked SQLite store, honest terminal status.

`lcp/` never imports MLflow; only this module does, and lazily (inside functions), so that
`lcp list --help` and the library stay fast and usable without a tracking store. Processes that
write concurrently to SQLite may see "database is locked": every store call here is retried with
exponential back-off. The first open of an embedded store (MLflow creates or upgrades its schema
then) is serialised across processes by a file lock beside the database (`mlflow.db.lock`).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

from lcp.errors import LcpError, first_line  # noqa: F401 - also tracking.first_line

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACTS_DIR_NAME = "mlartifacts"
# the experiments that hold the leases of pairs being run (pipeline.runs.ownership): not tables
LEASE_PREFIX = "lcp-lease/"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# Environment variables a worker must not inherit (they would redirect its logging).
MLFLOW_RUN_ENV = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME",
                  "MLFLOW_TRACKING_URI")

# How long a command waits for another process's first open of the same embedded store.
STORE_LOCK_TIMEOUT_S = 600.0
# MLflow's experiment kind: the UI opens a model-development experiment on its runs table.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3's UI has a global GenAI / Model-training switch (default GenAI, which opens every
# experiment on a traces overview); this query selects Model training, whose experiment page is
# the runs table. Links printed by `lcp ui` carry it.
UI_WORKFLOW_QUERY = "workflowType=machine_learning"
# MLflow's system metrics (CPU, memory, GPU) of every run; LCP_SYSTEM_METRICS=0 turns them off.
SYSTEM_METRICS_ENV = "LCP_SYSTEM_METRICS"
SYSTEM_METRICS_INTERVAL_S = 5.0

T = TypeVar("T")


class TrackingError(LcpError):
    """The tracking store cannot be reached or refused an operation."""


# ====================================================================== URIs


def experiment_name(table: int) -> str:
    return f"lcp-table-{table}"


def run_name(experiment_id: str, seed: int) -> str:
    return f"{experiment_id}/seed={seed}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db`; SQLite paths absolute."""
    uri = (uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI).strip()
    if uri.startswith("sqlite:"):
        path = sqlite_path(uri)
        if path is not None:
            return "sqlite:///" + str(path)
        return uri  # sqlite:// (in memory): useless across processes, rejected by Tracker
    if "://" not in uri and not uri.startswith("file:"):
        # A bare folder: MLflow's file store (deprecated in MLflow 3, still readable).
        return Path(uri).resolve().as_uri()
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (absolute), None for anything else."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///"):]
    rest = rest.split("?", 1)[0]
    if not rest:
        return None
    path = Path(rest) if rest.startswith("/") else Path(os.getcwd()) / rest
    return Path(os.path.abspath(path))


def is_server_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def artifact_root(uri: str) -> Path | None:
    """Where runs of an embedded SQLite store keep their artifacts: `mlartifacts` beside the db."""
    path = sqlite_path(uri)
    return path.parent / ARTIFACTS_DIR_NAME if path is not None else None


def store_exists(uri: str) -> bool:
    """False only for an embedded SQLite store whose file is not there yet (nothing to read)."""
    path = sqlite_path(uri)
    return path is None or path.exists()


def reader(uri: str) -> Tracker | None:
    """A Tracker for reading, or None when the embedded store does not exist yet (reading
    creates nothing)."""
    check_reachable(uri, create=False)
    return Tracker(uri, check=False) if store_exists(uri) else None


def warn_unless_shared(nodes: int, uri: str, echo) -> None:
    """Runs on several machines (`nodes`) need a tracking store every node reaches."""
    if nodes > 1 and not is_server_uri(uri):
        echo(f"warning: the runs execute on several machines but the tracking store {uri} "
             "is not a server: give --tracking-uri http://HOST:5000 (an MLflow server, "
             "e.g. docker/compose.yaml) so that every node reaches it", err=True)


# ====================================================================== retries


def is_locked_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text


def is_created_meanwhile_error(exc: BaseException) -> bool:
    """Another process created the same table or row at the same moment: a database creates a
    schema (Optuna's, MLflow's) or an experiment's dataset row by looking first and inserting
    after, so two first users can both insert (PostgreSQL: "duplicate key value violates unique
    constraint", "relation … already exists"; SQLite: "UNIQUE constraint failed"). Doing it
    again finds what the other created."""
    text = str(exc).lower()
    return any(words in text for words in ("duplicate key", "unique constraint", "already exists"))


def is_locked_or_created_meanwhile(exc: BaseException) -> bool:
    return is_locked_error(exc) or is_created_meanwhile_error(exc)


def with_retry(fn: Callable[[], T], *, attempts: int = 12, base_delay: float = 0.05,
               max_delay: float = 5.0, retry_on: Callable[[BaseException], bool] = is_locked_error
               ) -> T:
    """Call `fn`, retrying with exponential back-off (and jitter) while `retry_on(error)` (by
    default: while SQLite is locked)."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow wraps SQLAlchemy errors variously
            if not retry_on(exc) or attempt == attempts - 1:
                raise
            delay = min(max_delay, base_delay * 2 ** attempt) * (0.5 + random.random())
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


# ====================================================================== names and values

_BAD_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")


def sanitize_name(name: str) -> str:
    """A metric/param name MLflow accepts: alphanumerics, _ - . space /, no empty path parts."""
    text = _BAD_NAME.sub("_", str(name))
    text = re.sub(r"/+", "/", text).strip("/")
    parts = ["_" if part in ("", ".", "..") else part for part in text.split("/")]
    return "/".join(parts) or "_"


def ui_link(host: str, port: int, path: str) -> str:
    """A link into the MLflow UI (its pages live after `#/`) in the Model-training view."""
    return f"http://{host}:{port}/#/{path}?{UI_WORKFLOW_QUERY}"


def start_system_metrics(uri: str, run_id: str, *, resume: bool):
    """MLflow's system-metrics monitor on `run_id` (CPU, memory, disk, network, and GPU
    utilisation and memory when one is used), started; None when LCP_SYSTEM_METRICS=0.
    `MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` overrides the 5-second sampling interval."""
    if os.environ.get(SYSTEM_METRICS_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                   resume_logging=resume, tracking_uri=uri)
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop the monitor, then log the samples it took since its last logging (MLflow's monitor
    drops them, so a run shorter than one interval would otherwise have none)."""
    monitor.finish()
    leftover = monitor.aggregate_metrics()
    if leftover:
        monitor.publish_metrics(leftover)
        monitor.mlflow_logger.flush()


def cpu_model() -> str:
    """This machine's CPU as /proc/cpuinfo names it (e.g. 'AMD EPYC 7B13'): every run is tagged
    with it (`cpu`), since timings and even float results move with the CPU."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The project's git commit (with `-dirty` when tracked files changed), None outside git."""
    root = Path(path) if path else Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = commit.stdout.strip()
    if not sha:
        return None
    return sha + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


# ====================================================================== the tracker


class Tracker:
    """One MLflow store. Every call is retried while SQLite is locked."""

    def __init__(self, uri: str, *, check: bool = True, create: bool = True):
        self.uri = uri
        if check:
            check_reachable(uri, create=create)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            # This layer reports store errors in one line; MLflow's own log of them is a
            # multi-line traceback per failed call.
            import logging

            logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

            def open_store():
                client = MlflowClient(tracking_uri=self.uri)
                # MLflow opens the store lazily: this first call creates or upgrades its schema.
                client.search_experiments(max_results=1)
                return client

            try:
                # a SQLite store's first open is serialised by the lock, so "already exists"
                # there is a half-migrated store, said at once; on a database server two first
                # users can both create the schema, and the loser opens it again
                retry_on = (is_locked_error if sqlite_path(self.uri) is not None
                            else is_locked_or_created_meanwhile)
                with first_open_lock(self.uri):
                    self._client = with_retry(open_store, retry_on=retry_on)
            except LcpError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise open_error(self.uri, exc) from None
        return self._client

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` (a call on `self.client`) with the store's retries on transient errors."""
        return with_retry(fn)

    # ------------------------------------------------------------------ experiments
    def get_experiment_id(self, name: str) -> str | None:
        exp = self.call(lambda: self.client.get_experiment_by_name(name))
        return exp.experiment_id if exp is not None else None

    def ensure_experiment(self, name: str) -> str:
        """The experiment's id, created if needed as a model-development experiment (MLflow's
        `mlflow.experimentKind` tag, so that the UI opens on its runs, not the GenAI overview)."""
        existing = self.call(lambda: self.client.get_experiment_by_name(name))
        if existing is not None:
            if existing.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before the tag existed
                self.call(lambda: self.client.set_experiment_tag(
                    existing.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND))
            return existing.experiment_id
        root = artifact_root(self.uri)
        location = (root / sanitize_name(name).replace("/", "_")).as_uri() if root else None
        try:
            return self.call(lambda: self.client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
        except Exception as exc:  # noqa: BLE001 - created meanwhile by another process
            existing = self.get_experiment_id(name)
            if existing is not None:
                return existing
            raise TrackingError(f"cannot create experiment {name!r} in {self.uri}: "
                                f"{first_line(exc)}") from None

    def table_experiments(self) -> list[tuple[str, str]]:
        """(name, id) of the store's `lcp-…` experiments (tables, tuning studies), by name."""
        found = self.call(lambda: self.client.search_experiments(filter_string="name LIKE 'lcp-%'"))
        return sorted((e.name, e.experiment_id) for e in found
                      if not e.name.startswith(LEASE_PREFIX))

    # ------------------------------------------------------------------ runs
    def create_run(self, experiment_id: str, name: str, *, tags: Mapping[str, Any] = (),
                   params: Mapping[str, Any] = (), status: str = "RUNNING") -> str:
        from mlflow.entities import Param

        tags = {k: str(v) for k, v in dict(tags).items() if v is not None}
        run = self.call(lambda: self.client.create_run(experiment_id, run_name=name, tags=tags))
        run_id = run.info.run_id
        param_list = [Param(sanitize_name(k), str(v)) for k, v in dict(params).items()]
        for chunk in _chunks(param_list, 100):
            self.call(lambda c=chunk: self.client.log_batch(run_id, params=c))
        if status != "RUNNING":
            self.set_status(run_id, status)
        return run_id

    def get_run(self, run_id: str):
        return self.call(lambda: self.client.get_run(run_id))

    def search_runs(self, experiment_ids: Iterable[str], filter_string: str = "",
                    order_by: list[str] | None = None) -> list:
        ids = list(experiment_ids)
        if not ids:
            return []
        out, token = [], None
        while True:
            page = self.call(lambda t=token: self.client.search_runs(
                ids, filter_string=filter_string, max_results=1000,
                order_by=order_by or ["attributes.start_time DESC"], page_token=t))
            out.extend(page)
            token = page.token
            if not token:
                return out

    def set_status(self, run_id: str, status: str) -> None:
        """An open status (RUNNING, SCHEDULED); a run's end is `pipeline.tracking.run_status`'."""
        if status in TERMINAL_STATUSES:
            raise ValueError(f"set_status({status!r}): a run's end is written by "
                             "pipeline.tracking.run_status (end_run or end_if_open)")
        self.call(lambda: self.client.update_run(run_id, status=status))

    def set_terminated(self, run_id: str, status: str) -> None:
        """Called by `pipeline.tracking.run_status` only."""
        self.call(lambda: self.client.set_terminated(run_id, status=status))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        tag_list = [RunTag(k, str(v)[:8000]) for k, v in tags.items() if v is not None]
        for chunk in _chunks(tag_list, 100):
            self.call(lambda c=chunk: self.client.log_batch(run_id, tags=c))

    def delete_tags(self, run_id: str, keys: Iterable[str]) -> None:
        """Remove the run's tags among `keys` (those it does not have are ignored)."""
        present = self.get_run(run_id).data.tags
        for key in keys:
            if key in present:
                self.call(lambda k=key: self.client.delete_tag(run_id, k))

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int,
                    timestamp_ms: int | None = None) -> None:
        """All of `metrics` at `step` in one `log_batch` call (chunks of 1000)."""
        self.log_metric_records(run_id, [(step, dict(metrics))], timestamp_ms)

    def log_metric_records(self, run_id: str, records: Iterable[tuple[int, Mapping[str, float]]],
                           timestamp_ms: int | None = None) -> None:
        """Several steps' metrics, batched: [(step, {key: value}), ...]."""
        from mlflow.entities import Metric

        ts = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        metrics = []
        for step, values in records:
            for key, value in values.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                metrics.append(Metric(sanitize_name(key), number, ts, int(step)))
        for chunk in _chunks(metrics, 1000):
            self.call(lambda c=chunk: self.client.log_batch(run_id, metrics=c))

    def metric_history(self, run_id: str, key: str) -> list:
        return self.call(lambda: self.client.get_metric_history(run_id, sanitize_name(key)))

    def last_step(self, run_id: str, key: str = "epoch") -> int:
        history = self.metric_history(run_id, key)
        return max((m.step for m in history), default=0)

    def log_datasets(self, run_id: str, datasets: Iterable[Mapping[str, Any]]) -> None:
        """Datasets as the run's inputs (MLflow's Dataset column): each a mapping with name,
        split (the input's `mlflow.data.context`), size, digest and source."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        inputs = [DatasetInput(
            Dataset(name=d["name"], digest=d["digest"], source_type="local",
                    source=json.dumps({"uri": d["source"]}),
                    profile=json.dumps({"num_rows": d["size"]})),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["split"])]) for d in datasets]
        # the experiment's dataset row is shared by its runs: two may insert it at once
        with_retry(lambda: self.client.log_inputs(run_id, datasets=inputs),
                   retry_on=is_locked_or_created_meanwhile)

    def log_artifact(self, run_id: str, path: str | os.PathLike, artifact_path: str | None = None
                     ) -> None:
        self.call(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def artifact_paths(self, run_id: str, path: str | None = None) -> list[str]:
        out = []
        for info in self.call(lambda: self.client.list_artifacts(run_id, path)):
            if info.is_dir:
                out.extend(self.artifact_paths(run_id, info.path))
            else:
                out.append(info.path)
        return out


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@contextmanager
def first_open_lock(db_url: str):
    """Hold `<database>.lock` while a SQLite database (an MLflow store, an Optuna storage) is
    first opened in this process, so that only one process at a time creates or upgrades its
    schema. Nothing for other stores: an MLflow server migrates its database itself, and on a
    database server a schema created by two processes at once fails for one of them, which
    opens it again (`is_created_meanwhile_error`)."""
    path = sqlite_path(db_url)
    if path is None or (path.exists() and not os.access(path.parent, os.W_OK)):
        yield  # no file lock in a read-only folder (nothing there can be created either)
        return
    from filelock import FileLock, Timeout

    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=STORE_LOCK_TIMEOUT_S)
    except Timeout:
        raise TrackingError(
            f"another process has been creating or upgrading the database {path} for "
            f"{STORE_LOCK_TIMEOUT_S:.0f}s (lock {lock.lock_file} held); wait for it to finish, "
            "or stop it and rerun") from None
    try:
        yield
    finally:
        lock.release()


def open_error(uri: str, exc: BaseException) -> TrackingError:
    """One line for a store that cannot be opened: a failed schema migration says so."""
    text = first_line(exc)
    if any(word in str(exc).lower() for word in ("alembic", "migration", "already exists",
                                                  "duplicate column")):
        path = sqlite_path(uri)
        where = f"{path}" if path else uri
        return TrackingError(
            f"the MLflow store {where} could not create or upgrade its database schema ({text}); "
            "it was probably left half-migrated by an older version run concurrently: move it "
            "aside and rerun to start a fresh store")
    return TrackingError(f"cannot open the MLflow store {uri}: {text}. Check --tracking-uri "
                         "(or $MLFLOW_TRACKING_URI)")


def is_disk_full(exc: BaseException) -> bool:
    """No space left: an OSError ENOSPC, or SQLite's "database or disk is full"."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return "database or disk is full" in text or "no space left on device" in text


def disk_full_message(exc: BaseException, uri: str) -> str:
    """One line naming the full file system (the store's, or the file's that failed)."""
    import shutil

    path = getattr(exc, "filename", None) or sqlite_path(uri) or os.getcwd()
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    mount = path
    while not os.path.ismount(mount) and mount.parent != mount:
        mount = mount.parent
    try:
        free = f"{shutil.disk_usage(mount).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return (f"no space left on the file system mounted at {mount} ({free}; writing {path} "
            "failed): free space there")


# ====================================================================== reachability


def check_reachable(uri: str, *, create: bool = True, timeout: float = 5.0) -> None:
    """Raise one clear LcpError when the store behind `uri` cannot be used."""
    fix = "pass --tracking-uri (or set $MLFLOW_TRACKING_URI), e.g. --tracking-uri sqlite:///mlflow.db"
    if uri.startswith("sqlite:"):
        path = sqlite_path(uri)
        if path is None:
            raise TrackingError(f"tracking URI {uri!r} names no database file (an in-memory "
                                f"store cannot be shared between processes); {fix}")
        if not path.parent.is_dir():
            raise TrackingError(f"tracking URI {uri!r}: the folder {path.parent} does not exist; "
                                f"create it or {fix}")
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise TrackingError(f"tracking URI {uri!r}: {path} is not readable and writable; "
                                f"fix its permissions or {fix}")
        if not path.exists() and create and not os.access(path.parent, os.W_OK):
            raise TrackingError(f"tracking URI {uri!r}: cannot create {path} (folder not "
                                f"writable); {fix}")
        return
    if is_server_uri(uri):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
                if response.status >= 400:
                    raise OSError(f"HTTP {response.status}")
        except urllib.error.HTTPError as exc:
            if exc.code >= 500:
                raise TrackingError(f"the MLflow server at {uri} answered HTTP {exc.code}; "
                                    f"check the server's log, or {fix}") from None
            # An older server without /health, or behind a proxy: it answered, so it is up.
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"cannot reach the MLflow server at {uri} ({reason}); start it (e.g. `mlflow "
                f"server --host 127.0.0.1 --port 5000`) or {fix}") from None
        return
    if uri.startswith("file:"):
        return
    scheme = uri.split("://", 1)[0] if "://" in uri else uri
    if scheme.split("+", 1)[0] in ("postgresql", "mysql", "mssql", "databricks"):
        return  # MLflow connects on first use; errors then become TrackingError
    raise TrackingError(f"tracking URI {uri!r} has an unknown scheme {scheme!r}; use "
                        "sqlite:///path.db, http(s)://host:port, postgresql://..., or a folder")
