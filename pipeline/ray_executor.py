"""Run each job as a Ray task: `lcp run-table N --executor ray [--address ADDR] [--cpus-per-run K]`.

The scheduler, the hooks and the MLflow bookkeeping are the same as with the local executor
(`pipeline.scheduler`); only where the worker process runs changes. Each job becomes one Ray
task that asks for one GPU (a 1/K share with `--runs-per-gpu K`) when the cluster has GPUs and
`--gpus` is not `none`, else `--cpus-per-run` CPUs. The task starts the job's command line — the
same `python -m pipeline.worker --tracking-uri URI --run-id ID --run-dir DIR` as locally — as a
subprocess, so a crash, an OOM kill or diverging dynamics end that run's process only, and the
worker logs to the run id it is given, in the store it is given (explicitly, on its command line).

Failures:

- the run's process ends with a non-zero code (exception, divergence, killed): the task returns
  that code and the scheduler's `--retries` apply (the run resumes from its checkpoint);
- the process running the task or its node is lost (node died, Ray worker killed, e.g. by Ray's
  memory monitor): Ray retries the task itself, `max_retries = --retries` times. The run's
  process dies with the task (parent-death signal), so its lock is free and the retry resumes
  from the checkpoint. When Ray gives up, the run is failed with every attempt used;
- `terminate` = `ray.cancel(force=False)`: the task sends SIGTERM to the run's process (which
  marks its run KILLED) and SIGKILL after a grace period; `kill` = `ray.cancel(force=True)`.

Requirements on a cluster of several machines: every node has the project installed (the same
image, e.g. `docker/Dockerfile.gpu`), the run folders (`--runs-dir`, which hold the config,
checkpoint and log of each run) and the data are on a file system shared by the driver and the
nodes, and the tracking store is an MLflow server (an SQLite file suits one machine only).

Ray is an optional dependency (`pip install -e ".[ray]"`), imported only when this executor is
used.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lcp.errors import LcpError
from pipeline.scheduler import Executor, Job, signal_process_group

INSTALL_HINT = 'pip install -e ".[ray]"'
# Environment variables of the driver that travel with every task (the nodes' own environment
# is the base): the project's settings, e.g. LCP_DATA_DIR, and its test hooks.
FORWARDED_ENV_PREFIX = "LCP_"
CAPACITY_REFRESH_S = 5.0
STOP_GRACE_S = 20.0

# Started as `python -c LAUNCHER PARENT_PID EXECUTABLE ARGS...`: ask the kernel to SIGKILL this
# process when the Ray worker that started it dies (PR_SET_PDEATHSIG, kept across exec), then
# become the run's process. Without it a run would outlive a Ray worker killed by SIGKILL (Ray's
# memory monitor, a force cancel), keep its lock, and race the retried task.
_LAUNCHER = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    os._exit(128 + int(signal.SIGKILL))
os.execv(sys.argv[2], sys.argv[2:])
"""


def import_ray():
    """`ray`, or an LcpError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise LcpError("--executor ray needs Ray, which is not installed in this environment: "
                       f"run  {INSTALL_HINT}  (or pip install \"ray[default]\") on the machine "
                       "that runs `lcp` and on every node of the cluster") from None
    return ray


# ====================================================================== the task


def run_job_task(command: list[str], *, use_task_python: bool, env: dict[str, str],
                 drop_env: tuple[str, ...], cwd: str | None, log_path: str, header: str,
                 threads: int, gpu: bool, grace_s: float = STOP_GRACE_S) -> int:
    """The body of the Ray task: run `command` as a subprocess, its output appended to
    `log_path`; return its exit code (negative: killed by that signal). A cancel
    (KeyboardInterrupt) sends it SIGTERM, then SIGKILL after `grace_s`."""
    child_env = {k: v for k, v in os.environ.items() if k not in drop_env}
    child_env.update(env)
    node = _node_ip()
    if gpu:  # Ray set CUDA_VISIBLE_DEVICES to the GPU(s) it gave this task
        where = f"ray:{node}:gpu{child_env.get('CUDA_VISIBLE_DEVICES', '?')}"
    else:
        child_env["CUDA_VISIBLE_DEVICES"] = ""
        where = f"ray:{node}:cpu"
    child_env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                      "LCP_SLOT": where})
    argv = [sys.executable, *command] if use_task_python else list(command)
    argv = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]
    if cwd is not None and not os.path.isdir(cwd):
        cwd = None  # the driver's folder does not exist on this node: the task's own
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Ray delivers a cancel as a simulated SIGINT, which does nothing when SIGINT is ignored —
    # as it is in everything started in the background by a shell (`lcp ... &`, nohup): make
    # sure it raises KeyboardInterrupt here (tasks run on the worker's main thread).
    try:
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:  # not the main thread
        previous = None
    try:
        return _run_child(argv, child_env, cwd, path, header, where, grace_s)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run_child(argv: list[str], child_env: dict[str, str], cwd: str | None, path: Path,
               header: str, where: str, grace_s: float) -> int:
    import subprocess

    with open(path, "a", buffering=1) as log:
        log.write(f"{header} on {where} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
        log.flush()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=child_env, cwd=cwd,
                                   start_new_session=True)
        try:
            while process.poll() is None:
                time.sleep(0.2)  # not wait(): a cancel is delivered between bytecodes
        except KeyboardInterrupt:  # ray.cancel(force=False)
            signal_process_group(process, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if process.poll() is None:
                signal_process_group(process, signal.SIGKILL)
                process.wait()
            log.write(f"=== stopped by the scheduler (Ray task cancelled); exit code "
                      f"{process.returncode} ===\n")
        return process.returncode


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        import socket

        return socket.gethostname()


# ====================================================================== the executor


@dataclass
class RayHandle:
    ref: Any
    job: Job
    stopping: str | None = None  # "terminate" | "kill"
    returncode: int | None = None
    lost: str | None = None  # why Ray lost the task (its worker or node died), once it ended


class RayExecutor(Executor):
    """One Ray task per job on a Ray cluster (a local instance when no address is given)."""

    name = "ray"

    def __init__(self, *, address: str | None = None, gpus: list[str] | None = None,
                 runs_per_gpu: int = 1, cpus_per_run: float | None = None,
                 threads: int | None = None, retries: int = 0, drop_env: tuple[str, ...] = (),
                 grace_s: float = STOP_GRACE_S, init_options: dict[str, Any] | None = None):
        if gpus:  # a list of device ids means nothing on a cluster's nodes
            raise LcpError(f"--gpus {','.join(gpus)}: with --executor ray, Ray assigns the "
                           "devices; give --gpus auto (one GPU per run when the cluster has "
                           "GPUs) or --gpus none (CPU only)")
        if runs_per_gpu < 1:
            raise LcpError(f"--runs-per-gpu must be ≥ 1 (got {runs_per_gpu})")
        cpus_per_run = 1 if cpus_per_run is None else cpus_per_run
        if not cpus_per_run > 0:
            raise LcpError(f"--cpus-per-run must be > 0 (got {cpus_per_run})")
        if retries < 0:
            raise LcpError(f"--retries must be ≥ 0 (got {retries})")
        self.ray = import_ray()
        self.retries = retries
        self.drop_env = tuple(drop_env)
        self.grace_s = grace_s
        self.cpus_per_run = float(cpus_per_run)
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.started_ray = False
        self._connect(init_options or {})
        total = self.ray.cluster_resources()
        use_gpu = gpus is None and total.get("GPU", 0) > 0
        self.gpus_per_run = 1.0 / runs_per_gpu if use_gpu else 0.0
        self.threads = threads or max(1, int(self.cpus_per_run))
        try:
            self._check_feasible()
        except LcpError:
            self.close()
            raise
        self._remote = self.ray.remote(run_job_task)
        self._task_options = dict(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
                                  max_retries=retries, retry_exceptions=False)
        self._running: dict[int, RayHandle] = {}
        self._capacity = 1
        self._capacity_at = float("-inf")

    # ------------------------------------------------------------------ the cluster
    def _connect(self, init_options: dict[str, Any]) -> None:
        ray = self.ray
        if ray.is_initialized():  # e.g. a caller (or a test) connected already
            return
        options: dict[str, Any] = {"ignore_reinit_error": True}
        if self.address:
            options["address"] = self.address
        options.update(init_options)
        try:
            ray.init(**options)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ...
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
            raise LcpError(
                f"cannot connect to {where}: {_first_line(exc)}. Start a cluster with "
                "`ray start --head` and pass --address auto (same machine), --address HOST:6379 "
                "or ray://HOST:10001, or leave --address out (and unset $RAY_ADDRESS) to start "
                "a local instance") from None
        self.started_ray = True

    def _alive_nodes(self) -> list[dict]:
        return [n for n in self.ray.nodes() if n.get("Alive", n.get("alive", False))]

    def _check_feasible(self) -> None:
        nodes = self._alive_nodes()
        need = self._per_run()
        fits = [n for n in nodes
                if all(n.get("Resources", {}).get(k, 0) >= v for k, v in need.items())]
        if not fits:
            largest = max((n.get("Resources", {}).get("CPU", 0) for n in nodes), default=0)
            asked = " + ".join(f"{v:g} {k}" for k, v in need.items())
            raise LcpError(f"no node of the Ray cluster can hold one run ({asked}; the largest "
                           f"node has {largest:g} CPU(s)): lower --cpus-per-run, or add nodes")

    def nodes(self) -> int:
        return len(self._alive_nodes())

    def _per_run(self) -> dict[str, float]:
        need = {"CPU": self.cpus_per_run}
        if self.gpus_per_run:
            need["GPU"] = self.gpus_per_run
        return need

    def capacity(self) -> int:
        """Runs the cluster holds at a time (refreshed every few seconds: clusters grow)."""
        now = time.monotonic()
        if now - self._capacity_at > CAPACITY_REFRESH_S:
            total = self.ray.cluster_resources()
            fits = min(math.floor(total.get(k, 0) / v + 1e-9) for k, v in self._per_run().items())
            self._capacity = max(1, int(fits))
            self._capacity_at = now
        return self._capacity

    def describe(self) -> str:
        total = self.ray.cluster_resources()
        where = self.address or "local instance"
        ask = (f"{self.gpus_per_run:g} GPU + {self.cpus_per_run:g} CPU" if self.gpus_per_run
               else f"{self.cpus_per_run:g} CPU")
        return (f"ray ({where}): {self.nodes()} node(s), {total.get('CPU', 0):g} CPU(s), "
                f"{total.get('GPU', 0):g} GPU(s); each run asks for {ask} "
                f"({self.threads} thread(s)), up to {self.capacity()} at a time; Ray retries a "
                f"lost task up to {self.retries} time(s)")

    def close(self) -> None:
        """Shut down the Ray instance this executor started (not one it found connected)."""
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self.started_ray = False

    # ------------------------------------------------------------------ the Executor interface
    def free_slots(self) -> int:
        return max(0, self.capacity() - len(self._running))

    def start(self, job: Job) -> RayHandle:
        command = list(job.command)
        use_task_python = bool(command) and command[0] == sys.executable
        if use_task_python:  # the node's own Python runs `-m pipeline.worker`
            command = command[1:]
        env = {k: v for k, v in os.environ.items()
               if k.startswith(FORWARDED_ENV_PREFIX) and k != "LCP_SLOT"}
        env.update(job.env)
        ref = self._remote.options(**self._task_options, name=job.key).remote(
            command, use_task_python=use_task_python, env=env, drop_env=self.drop_env,
            cwd=job.cwd, log_path=str(job.log_path),
            header=f"=== {job.key}: attempt {job.attempts} as a Ray task",
            threads=self.threads, gpu=bool(self.gpus_per_run), grace_s=self.grace_s)
        handle = RayHandle(ref, job)
        self._running[id(handle)] = handle
        job.slot = None
        return handle

    def poll(self, handle: RayHandle) -> int | None:
        if handle.returncode is not None:
            return handle.returncode
        ready, _ = self.ray.wait([handle.ref], timeout=0)
        if not ready:
            return None
        handle.returncode = self._result(handle)
        self._running.pop(id(handle), None)
        return handle.returncode

    def _result(self, handle: RayHandle) -> int:
        from ray import exceptions as rx

        try:
            return int(self.ray.get(handle.ref))
        except rx.TaskCancelledError:
            return -int(signal.SIGKILL if handle.stopping == "kill" else signal.SIGTERM)
        except rx.RayTaskError as exc:  # the task itself raised (e.g. its log folder unwritable)
            self._note(handle, f"the Ray task failed: {_first_line(exc)}")
            return 1
        except rx.RayError as exc:  # worker or node lost, and Ray's own retries used up
            handle.lost = f"Ray lost the task ({type(exc).__name__}: {_first_line(exc)})"
            self._note(handle, f"Ray lost the task ({type(exc).__name__}) after {self.retries} "
                               f"retr{'y' if self.retries == 1 else 'ies'}: {_first_line(exc)}")
            # Ray already made 1 + retries attempts: the scheduler must not add its own.
            handle.job.attempts = max(handle.job.attempts, self.retries + 1)
            return -int(signal.SIGKILL)

    def _note(self, handle: RayHandle, text: str) -> None:
        try:
            handle.job.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(handle.job.log_path, "a") as log:
                log.write(f"=== {text} ===\n")
        except OSError:
            pass
        print(f"warning: {handle.job.key}: {text}", file=sys.stderr)

    def terminate(self, handle: RayHandle) -> None:
        if handle.returncode is None and handle.stopping is None:
            handle.stopping = "terminate"
            self._cancel(handle, force=False)

    def kill(self, handle: RayHandle) -> None:
        if handle.returncode is None and handle.stopping != "kill":
            handle.stopping = "kill"
            self._cancel(handle, force=True)

    def _cancel(self, handle: RayHandle, force: bool) -> None:
        try:
            self.ray.cancel(handle.ref, force=force, recursive=True)
        except Exception as exc:  # noqa: BLE001 - e.g. it has just finished
            print(f"warning: could not cancel the Ray task of {handle.job.key}: "
                  f"{_first_line(exc)}", file=sys.stderr)


class RayProcess:
    """A `subprocess.Popen`-like view (poll, wait, send_signal, terminate, kill, returncode) of a
    job started on a RayExecutor, for code written around local processes (`lcp tune`'s
    trials). `pid` is None (the process lives on some node); `lost` says why Ray lost the task
    when its worker or node died."""

    pid = None

    def __init__(self, executor: RayExecutor, job: Job):
        self.executor = executor
        self.handle = executor.start(job)

    @property
    def returncode(self) -> int | None:
        return self.handle.returncode

    @property
    def lost(self) -> str | None:
        return self.handle.lost

    def poll(self) -> int | None:
        return self.executor.poll(self.handle)

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        deadline = None if timeout is None else time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.handle.job.key, timeout)
            time.sleep(0.05)
        return rc

    def send_signal(self, signum: int) -> None:
        if signum == signal.SIGKILL:
            self.kill()
        else:
            self.terminate()

    def terminate(self) -> None:
        self.executor.terminate(self.handle)

    def kill(self) -> None:
        self.executor.kill(self.handle)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def make_ray_executor(*, address: str | None = None, gpus: list[str] | None = None,
                      runs_per_gpu: int = 1, cpus_per_run: float | None = None,
                      threads: int | None = None, retries: int = 0,
                      drop_env: tuple[str, ...] = (), **_) -> RayExecutor:
    """`make_executor("ray", ...)`: the options of `lcp run-table` (--workers is local only)."""
    return RayExecutor(address=address, gpus=gpus, runs_per_gpu=runs_per_gpu,
                       cpus_per_run=cpus_per_run, threads=threads, retries=retries,
                       drop_env=drop_env)
