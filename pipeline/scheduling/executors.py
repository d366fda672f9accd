"""Where jobs run: the slots of this machine (GPUs or CPU workers) with a local executor that runs
each job as a subprocess on a slot, or a Ray executor that runs each as a Ray task on a cluster.

Nothing here knows the scheduler, MLflow or lcp: a job is anything with `key`, `command` (an argv),
`env`, `cwd`, `log_path` and `attempts`; the scheduler (`pipeline.scheduling.scheduler`) decides
what starts when and calls `free_slots`, `start`, `poll`, `terminate` and `kill`. What a slot pins
and what each executor does when a run, its process or its node dies: docs/pipeline.md and
docs/beyond-one-machine.md. Ray is an optional dependency, imported only when its executor is made.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from lcp.errors import LcpError, first_line
from pipeline.scheduling.openmp import openmp_waiting

STOP_GRACE_S = 20.0
# ====================================================================== slots


@dataclass(frozen=True)
class Slot:
    """One place a job may run: a GPU share (`gpu` is the CUDA device id) or a CPU worker."""

    index: int
    gpu: str | None
    threads: int
    share: int = 0  # which of the runs-per-gpu places on that GPU
    kind: str = "cpu"  # "ray": one of the tasks at a time on a Ray cluster (Ray places it)

    @property
    def label(self) -> str:
        return f"gpu{self.gpu}#{self.share}" if self.gpu is not None else f"{self.kind}#{self.index}"

    def env(self) -> dict[str, str]:
        threads = str(self.threads)
        return {
            "CUDA_VISIBLE_DEVICES": self.gpu if self.gpu is not None else "",
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            "LCP_SLOT": self.label,
            **openmp_waiting(),
        }


class SlotPool:
    """A fixed set of slots; `acquire` hands out a free one (None when all are busy)."""

    def __init__(self, slots: list[Slot]):
        if not slots:
            raise LcpError("no slot to run on: give --workers ≥ 1 or --runs-per-gpu ≥ 1")
        self.slots = list(slots)
        self._busy: set[int] = set()
        self._lock = threading.Lock()

    @classmethod
    def for_gpus(cls, gpus: list[str], runs_per_gpu: int = 1, cpu_count: int | None = None,
                 threads: int | None = None) -> "SlotPool":
        if runs_per_gpu < 1:
            raise LcpError(f"--runs-per-gpu must be ≥ 1 (got {runs_per_gpu})")
        total = len(gpus) * runs_per_gpu
        threads = threads or max(1, (cpu_count or os.cpu_count() or 1) // max(1, total))
        slots, index = [], 0
        for share in range(runs_per_gpu):  # spread: the first runs go to different GPUs
            for gpu in gpus:
                slots.append(Slot(index, str(gpu), threads, share))
                index += 1
        return cls(slots)

    @classmethod
    def for_cpu(cls, workers: int = 1, cpu_count: int | None = None,
                threads: int | None = None) -> "SlotPool":
        if workers < 1:
            raise LcpError(f"--workers must be ≥ 1 (got {workers})")
        threads = threads or max(1, (cpu_count or os.cpu_count() or 1) // workers)
        return cls([Slot(i, None, threads) for i in range(workers)])

    @property
    def size(self) -> int:
        return len(self.slots)

    def free_count(self) -> int:
        with self._lock:
            return len(self.slots) - len(self._busy)

    def acquire(self) -> Slot | None:
        with self._lock:
            for slot in self.slots:
                if slot.index not in self._busy:
                    self._busy.add(slot.index)
                    return slot
            return None

    def release(self, slot: Slot) -> None:
        with self._lock:
            if slot.index not in self._busy:
                raise RuntimeError(f"slot {slot.label} released twice")
            self._busy.discard(slot.index)

    def describe(self) -> str:
        first = self.slots[0]
        if first.gpu is None:
            return f"{self.size} CPU worker(s) × {first.threads} thread(s)"
        gpus = sorted({s.gpu for s in self.slots}, key=str)
        per = self.size // max(1, len(gpus))
        return f"GPU(s) {','.join(gpus)} × {per} run(s) per GPU ({first.threads} CPU thread(s) each)"


def parse_gpus(text: str | None) -> list[str] | None:
    """--gpus: None/'auto' → detect; 'none'/'cpu' → []; '0,1' → ['0', '1']."""
    if text is None or text.strip().lower() in ("", "auto"):
        return None
    value = text.strip().lower()
    if value in ("none", "cpu"):
        return []
    items = [part.strip() for part in value.split(",")]
    if not all(item.isdigit() for item in items):
        raise LcpError(f"--gpus {text!r} is not valid: give GPU indices separated by commas "
                       "(e.g. --gpus 0,1), 'auto' (detect) or 'none' (CPU only)")
    if len(set(items)) != len(items):
        raise LcpError(f"--gpus {text!r} names a GPU twice; use --runs-per-gpu K for several "
                       "runs per GPU")
    return [str(int(item)) for item in items]


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ids for a child's CUDA_VISIBLE_DEVICES."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [part.strip() for part in env.split(",") if part.strip()]
        if not ids or ids[0].startswith("-"):
            return []
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA
        count = 0
    if env is not None:
        return ids[:count]
    return [str(i) for i in range(count)]


def choose_gpus(requested: list[str] | None, available: list[str] | None = None) -> list[str]:
    """The GPUs to use: `requested` (checked against the visible ones) or all visible ones."""
    available = visible_gpus() if available is None else available
    if requested is None:
        return list(available)
    if not requested:
        return []
    if not available:
        raise LcpError(f"--gpus {','.join(requested)} was given but no CUDA GPU is visible "
                       "(torch.cuda.device_count() is 0); leave --gpus out (or --gpus none) to "
                       "run on CPU with --workers N")
    unknown = [g for g in requested if g not in available]
    if unknown:
        raise LcpError(f"--gpus: GPU {', '.join(unknown)} is not visible; visible GPUs are: "
                       + ", ".join(available))
    return list(requested)


# ====================================================================== processes


def signal_process_group(process, signum: int) -> None:
    """Send `signum` to a process's group (its children too), else to the process."""
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass


def describe_returncode(rc: int) -> str:
    """One text for a child's exit status: a signal (negative, or 128+N from a shell) or a code."""
    if rc < 0 or rc > 128:
        signum = -rc if rc < 0 else rc - 128
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        hint = " (out of memory, or killed from outside?)" if signum == signal.SIGKILL else ""
        return f"worker killed by {name}{hint}"
    return f"worker exited with code {rc}"


def child_env(seeded: bool) -> dict[str, str]:
    """What every job's process adds to its environment: this project importable, unbuffered
    output, and deterministic cuBLAS when the run is seeded."""
    project_root = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": os.pathsep.join(p for p in (project_root, os.environ.get("PYTHONPATH"))
                                         if p),
           "PYTHONUNBUFFERED": "1"}
    if seeded:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    return env


class Executor(ABC):
    """Where jobs run. The scheduler calls `start` only while `free_slots() > 0`."""

    name = "?"

    @abstractmethod
    def free_slots(self) -> int: ...

    @abstractmethod
    def start(self, job) -> Any: ...  # returns a handle

    @abstractmethod
    def poll(self, handle) -> int | None: ...  # exit code once ended (frees its slot)

    @abstractmethod
    def terminate(self, handle) -> None: ...  # ask to stop (SIGTERM)

    @abstractmethod
    def kill(self, handle) -> None: ...  # stop now (SIGKILL)

    def describe(self) -> str:
        return self.name

    def nodes(self) -> int:
        """The machines its jobs execute on."""
        return 1

    def close(self) -> None:
        """Release what the executor started (a Ray instance); nothing for local subprocesses."""

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _LocalHandle:
    process: Any
    slot: Slot
    log: TextIO
    released: bool = False


class LocalExecutor(Executor):
    """Subprocesses on this machine, one per slot; a crash or OOM kills only that process."""

    name = "local"

    def __init__(self, pool: SlotPool, base_env: dict[str, str] | None = None,
                 drop_env: tuple[str, ...] = ()):
        self.pool = pool
        self.base_env = dict(os.environ if base_env is None else base_env)
        for name in drop_env:
            self.base_env.pop(name, None)

    def free_slots(self) -> int:
        return self.pool.free_count()

    def describe(self) -> str:
        return f"local: {self.pool.describe()}"

    def start(self, job) -> _LocalHandle:
        slot = self.pool.acquire()
        if slot is None:
            raise RuntimeError("start() called without a free slot")
        # the worker asks to be stopped when this process dies (pipeline.worker.die_with_parent)
        env = {**self.base_env, **job.env, **slot.env(), "LCP_PARENT_PID": str(os.getpid())}
        job.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(job.log_path, "a", buffering=1)
        log.write(f"=== {job.key}: attempt {job.attempts} on {slot.label} at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
        log.flush()
        try:
            process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, cwd=job.cwd,
                                       start_new_session=True)
        except OSError:
            log.close()
            self.pool.release(slot)
            raise
        job.slot = slot
        return _LocalHandle(process, slot, log)

    def poll(self, handle: _LocalHandle) -> int | None:
        rc = handle.process.poll()
        if rc is not None and not handle.released:
            handle.released = True
            handle.log.close()
            self.pool.release(handle.slot)
        return rc

    def _signal(self, handle: _LocalHandle, signum: int) -> None:
        if handle.process.poll() is None:
            signal_process_group(handle.process, signum)

    def terminate(self, handle: _LocalHandle) -> None:
        self._signal(handle, signal.SIGTERM)

    def kill(self, handle: _LocalHandle) -> None:
        self._signal(handle, signal.SIGKILL)


# ====================================================================== Ray

INSTALL_HINT = 'pip install -e ".[ray]"'
# Environment variables of the driver that travel with every task (the nodes' own environment
# is the base): the project's settings, e.g. LCP_DATA_DIR.
FORWARDED_ENV_PREFIX = "LCP_"
CAPACITY_REFRESH_S = 5.0

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


@dataclass(frozen=True)
class TaskSettings:
    """What every Ray task of one executor shares."""

    drop_env: tuple[str, ...]  # the driver's variables the task must not inherit
    threads: int
    gpu: bool  # the task asked Ray for a GPU
    grace_s: float = STOP_GRACE_S  # from SIGTERM to SIGKILL when the task is cancelled


def run_job_task(command: list[str], *, use_task_python: bool, env: dict[str, str],
                 cwd: str | None, log_path: str, header: str, settings: TaskSettings) -> int:
    """The body of the Ray task: run `command` as a subprocess, its output appended to
    `log_path`; return its exit code (negative: killed by that signal). A cancel
    (KeyboardInterrupt) sends it SIGTERM, then SIGKILL after `settings.grace_s`."""
    threads = settings.threads
    task_env = {k: v for k, v in os.environ.items() if k not in settings.drop_env}
    task_env.update(env)
    node = _node_ip()
    if settings.gpu:  # Ray set CUDA_VISIBLE_DEVICES to the GPU(s) it gave this task
        where = f"ray:{node}:gpu{task_env.get('CUDA_VISIBLE_DEVICES', '?')}"
    else:
        task_env["CUDA_VISIBLE_DEVICES"] = ""
        where = f"ray:{node}:cpu"
    task_env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                      "LCP_SLOT": where, **openmp_waiting()})
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
        return _run_child(argv, task_env, cwd, path, header, where, settings.grace_s)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run_child(argv: list[str], env: dict[str, str], cwd: str | None, path: Path,
               header: str, where: str, grace_s: float) -> int:
    with open(path, "a", buffering=1) as log:
        log.write(f"{header} on {where} at {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
        log.flush()
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, env=env, cwd=cwd,
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


@dataclass
class RayHandle:
    ref: Any
    job: Any
    stopping: str | None = None  # "terminate" | "kill"
    returncode: int | None = None


class RayExecutor(Executor):
    """One Ray task per job on a Ray cluster (a local instance when no address is given)."""

    name = "ray"

    def __init__(self, options: ExecutorOptions | None = None, *, retries: int = 0,
                 drop_env: tuple[str, ...] = (), grace_s: float = STOP_GRACE_S,
                 init_options: dict[str, Any] | None = None):
        options = options or ExecutorOptions("ray")
        gpus, runs_per_gpu = parse_gpus(options.gpus), options.runs_per_gpu
        if gpus:  # a list of device ids means nothing on a cluster's nodes
            raise LcpError(f"--gpus {','.join(gpus)}: with --executor ray, Ray assigns the "
                           "devices; give --gpus auto (one GPU per run when the cluster has "
                           "GPUs) or --gpus none (CPU only)")
        if runs_per_gpu < 1:
            raise LcpError(f"--runs-per-gpu must be ≥ 1 (got {runs_per_gpu})")
        cpus_per_run = 1 if options.cpus_per_run is None else options.cpus_per_run
        if not cpus_per_run > 0:
            raise LcpError(f"--cpus-per-run must be > 0 (got {cpus_per_run})")
        if retries < 0:
            raise LcpError(f"--retries must be ≥ 0 (got {retries})")
        self.ray = import_ray()
        self.workers = options.workers  # at most this many at a time (None: the cluster's fill)
        self.retries = retries
        self.cpus_per_run = float(cpus_per_run)
        self.address = options.address or os.environ.get("RAY_ADDRESS") or None
        self.started_ray = False
        self._connect(init_options or {})
        total = self.ray.cluster_resources()
        use_gpu = gpus is None and total.get("GPU", 0) > 0
        self.gpus_per_run = 1.0 / runs_per_gpu if use_gpu else 0.0
        self.threads = options.threads or max(1, int(self.cpus_per_run))
        self.settings = TaskSettings(tuple(drop_env), self.threads, bool(self.gpus_per_run),
                                     grace_s)
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
                f"cannot connect to {where}: {first_line(exc)}. Start a cluster with "
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
                f"({self.threads} thread(s)), up to {self.limit()} at a time; Ray retries a "
                f"lost task up to {self.retries} time(s)")

    def close(self) -> None:
        """Shut down the Ray instance this executor started (not one it found connected)."""
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()
        self.started_ray = False

    # ------------------------------------------------------------------ the Executor interface
    def free_slots(self) -> int:
        return max(0, self.limit() - len(self._running))

    def limit(self) -> int:
        return min(self.capacity(), self.workers or self.capacity())

    def start(self, job) -> RayHandle:
        command = list(job.command)
        use_task_python = bool(command) and command[0] == sys.executable
        if use_task_python:  # the node's own Python runs `-m pipeline.worker`
            command = command[1:]
        env = {k: v for k, v in os.environ.items()
               if k.startswith(FORWARDED_ENV_PREFIX) and k not in ("LCP_SLOT", "LCP_PARENT_PID")}
        env.update(job.env)
        ref = self._remote.options(**self._task_options, name=job.key).remote(
            command, use_task_python=use_task_python, env=env, cwd=job.cwd,
            log_path=str(job.log_path),
            header=f"=== {job.key}: attempt {job.attempts} as a Ray task", settings=self.settings)
        used = {h.job.slot.index for h in self._running.values() if h.job.slot is not None}
        job.slot = Slot(min(set(range(len(used) + 1)) - used), None, self.threads, kind="ray")
        handle = RayHandle(ref, job)
        self._running[id(handle)] = handle
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
            self._note(handle, f"the Ray task failed: {first_line(exc)}")
            return 1
        except rx.RayError as exc:  # worker or node lost, and Ray's own retries used up
            handle.job.lost = f"Ray lost the task ({type(exc).__name__}: {first_line(exc)})"
            self._note(handle, f"Ray lost the task ({type(exc).__name__}) after {self.retries} "
                               f"retr{'y' if self.retries == 1 else 'ies'}: {first_line(exc)}")
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
                  f"{first_line(exc)}", file=sys.stderr)



# ====================================================================== making one


SHORT_RUN_WORKERS = 4  # the most CPU slots a table of short runs (--quick) gets by default


def default_cpu_workers(short_runs: bool, cpu_count: int | None = None) -> int:
    """Runs at a time on CPU when --workers is not given: 1, which gets every core, since a
    real run's steps use the threads; for short runs (--quick) one per core up to
    SHORT_RUN_WORKERS, since most of a short run is its process start (imports, the store),
    which threads do not speed up (docs/speed.md, "Sharing the CPU")."""
    if not short_runs:
        return 1
    return max(1, min(SHORT_RUN_WORKERS, cpu_count or os.cpu_count() or 1))


@dataclass(frozen=True)
class ExecutorOptions:
    """Where runs execute: the commands' executor options (--executor, --gpus, --runs-per-gpu,
    --workers, --threads, --address, --cpus-per-run), as given."""

    executor: str = "local"
    gpus: str | None = "auto"  # parse_gpus: auto (detect), none (CPU only) or 0,1
    runs_per_gpu: int = 1
    workers: int | None = None  # runs at a time (None: see make_executor)
    threads: int | None = None  # CPU threads per run (None: the cores / runs at a time)
    address: str | None = None  # the Ray cluster
    cpus_per_run: float | None = None  # what each run asks Ray for

    def check(self) -> None:
        """LcpError for a value no executor takes, or a Ray option without --executor ray."""
        if self.workers is not None and self.workers < 1:
            raise LcpError(f"--workers must be ≥ 1 (got {self.workers})")
        if self.threads is not None and self.threads < 1:
            raise LcpError(f"--threads must be ≥ 1 (got {self.threads})")
        if self.executor != "ray":
            for flag, value in (("--address", self.address),
                                ("--cpus-per-run", self.cpus_per_run)):
                if value is not None:
                    raise LcpError(f"{flag} is an option of --executor ray (the executor is "
                                   f"{self.executor!r}); add --executor ray or leave {flag} out")


def make_executor(options: ExecutorOptions, *, retries: int = 0, short_runs: bool = False,
                  drop_env: tuple[str, ...] = ()) -> Executor:
    """The executor of `options` (a Ray instance is started or joined here); use it in a `with`
    block, which closes it (a Ray instance it started). `options.workers`: runs at a time
    (local on GPUs: at most GPUs × runs_per_gpu, default all of those; local on CPU: default
    `default_cpu_workers(short_runs)`; Ray: default what the cluster holds). `drop_env`: the
    variables of this process the jobs must not inherit."""
    options.check()
    gpus = parse_gpus(options.gpus)
    if options.executor not in ("local", "ray"):
        raise LcpError(f"--executor {options.executor!r} is not available; valid executors "
                       "are: local, ray")
    if options.executor == "ray":
        return RayExecutor(options, retries=retries, drop_env=drop_env)
    chosen = choose_gpus(gpus)
    if chosen:
        pool = SlotPool.for_gpus(chosen, options.runs_per_gpu, threads=options.threads)
        if options.workers is not None:
            pool = SlotPool(pool.slots[:options.workers])
    else:
        pool = SlotPool.for_cpu(options.workers or default_cpu_workers(short_runs),
                                threads=options.threads)
    return LocalExecutor(pool, drop_env=drop_env)

