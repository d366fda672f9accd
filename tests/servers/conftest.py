"""Real servers for the tests, started by the tests themselves on 127.0.0.1 only:

- `postgres` (session): a PostgreSQL cluster from the machine's binaries (Debian's `postgresql`
  package: /usr/lib/postgresql/<version>/bin), in a temporary folder, on a free port, trust
  authentication on 127.0.0.1, user `lcp`. `initdb` refuses to run as root, so as root the
  cluster belongs to the `postgres` system user (run through `runuser`). Each test asks for its
  own database: `postgres.create_database("name")` → `postgresql://lcp@127.0.0.1:PORT/name`.
- `start_mlflow_server(backend_uri, folder)`: an `mlflow server` process on a free loopback port
  (`http://127.0.0.1:PORT`), its artifacts served from `folder`, stopped when the test ends.

Where a server cannot be started here (no PostgreSQL binaries, no `postgres` user as root, no
psycopg2) the tests are skipped with the reason, unless $LCP_TEST_REQUIRE_EXTRAS=1 (CI), where
they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from extras import require

PG_USER = "lcp"
START_TIMEOUT_S = 120


def require_module(name: str, hint: str):
    try:
        return __import__(name)
    except ImportError:
        require(False, f"{name} is not installed ({hint})")


def require_postgres_driver() -> None:
    """The driver SQLAlchemy opens postgresql:// URLs with (psycopg2 before 2.1, psycopg 3 from
    2.1 on; the `postgres` extra installs both)."""
    from sqlalchemy.engine import make_url

    try:
        make_url("postgresql://u@127.0.0.1/db").get_dialect().import_dbapi()
    except ImportError as exc:
        require(False, f"no PostgreSQL driver for SQLAlchemy ({exc.name or exc}): "
                       'pip install -e ".[postgres]"')


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that would redirect MLflow logging."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
                        "MLFLOW_EXPERIMENT_NAME")}
    env.update(extra)
    return env


# ====================================================================== PostgreSQL


def postgres_bin_dir() -> Path | None:
    """The folder with initdb/pg_ctl: $LCP_TEST_PG_BIN, Debian's newest, or initdb on PATH."""
    if os.environ.get("LCP_TEST_PG_BIN"):
        return Path(os.environ["LCP_TEST_PG_BIN"])
    versions = []
    for path in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        match = re.fullmatch(r"\d+", path.parent.parent.name)
        if match:
            versions.append((int(path.parent.parent.name), path.parent))
    if versions:
        return max(versions)[1]
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@dataclass
class Postgres:
    bin_dir: Path
    root: Path
    port: int
    runas: list[str]
    host: str = "127.0.0.1"
    user: str = PG_USER

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        subprocess.run([str(self.bin_dir / "createdb"), "-h", self.host, "-p", str(self.port),
                        "-U", self.user, name], check=True, capture_output=True, text=True,
                       timeout=60)
        return self.url(name)

    def log(self) -> str:
        try:
            return (self.root / "postgres.log").read_text()[-4000:]
        except OSError:
            return ""


def _as_owner(runas: list[str], cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*runas, *cmd], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="session")
def postgres():
    bin_dir = postgres_bin_dir()
    require(bin_dir is not None and (bin_dir / "pg_ctl").exists(),
            "PostgreSQL server binaries not found (apt-get install postgresql, or set "
            "$LCP_TEST_PG_BIN to the folder holding initdb and pg_ctl)")
    runas: list[str] = []
    owner = None
    if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to `postgres`
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            owner = None
        require(owner is not None and shutil.which("runuser") is not None,
                "running as root without a `postgres` system user (or runuser) to own the "
                "test cluster")
        runas = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="lcp-pg-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, sock = root / "data", root / "sock"
    try:
        init = _as_owner(runas, [str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER,
                                 "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync"],
                         timeout=180)
        assert init.returncode == 0, f"initdb failed:\n{init.stdout}\n{init.stderr}"
        _as_owner(runas, ["mkdir", "-p", str(sock)], check=True)
        server = None
        for _ in range(3):  # a free port can be taken between the probe and the bind
            port = free_port()
            options = (f"-p {port} -h 127.0.0.1 -k {sock} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
            start = _as_owner(runas, [str(bin_dir / "pg_ctl"), "-D", str(data), "-l",
                                      str(root / "postgres.log"), "-w", "-t",
                                      str(START_TIMEOUT_S), "-o", options, "start"],
                              timeout=START_TIMEOUT_S + 30)
            if start.returncode == 0:
                server = Postgres(bin_dir, root, port, runas)
                break
        log = (root / "postgres.log").read_text() if (root / "postgres.log").exists() else ""
        assert server is not None, f"PostgreSQL did not start:\n{start.stderr}\n{log[-3000:]}"
        yield server
    finally:
        if (data / "postmaster.pid").exists():
            _as_owner(runas, [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                              "stop"], timeout=120)
        shutil.rmtree(root, ignore_errors=True)


# ====================================================================== MLflow server


@contextlib.contextmanager
def start_mlflow_server(backend_uri: str, folder: Path, *extra_args: str):
    """`mlflow server` on 127.0.0.1:PORT (artifacts served from `folder/artifacts`); yields its
    URL once /health answers; stopped (its process group) at the end."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = folder / "mlflow-server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *extra_args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=clean_env(), cwd=folder,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow server exited with {proc.returncode}:\n"
                                     + log_path.read_text()[-4000:])
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("mlflow server did not answer /health in time:\n"
                                     + log_path.read_text()[-4000:])
            time.sleep(0.3)
        yield url
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    else:  # the server ended; its helpers (workers) may not have
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
