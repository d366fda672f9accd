"""How long runs will take on this machine, before they run (`lcp budget`, `run-table --dry-run`).

Each distinct configuration is measured here and now through the one training loop
(`lcp.training.fit`): the first optimizer steps of an epoch after a warm-up (up to RAMP_STEPS
of them, or RAMP_SECONDS, at least STEPS), and a few evaluation batches. Steps are measured from
the start of training on because a controller row's solves can need several times more
iterations a few dozen steps in than at its first steps (the RNN's LCP-DI: ~50 ms per step at
steps 3-8, ~450 ms from step 18 on, on 5,000 MNIST digits); the steps not measured are priced at
the rate of the last third of the measured ones. Where the store holds a run of the same
computation (config hash but for the seed) on this CPU model and thread count that trained an
epoch, finished or not, its first epoch's time replaces that estimate: the RNN's controller rows
on MNIST keep slowing down through their whole first epoch, beyond any steps measured here. A
run's first epoch is then `steps_per_epoch × step time` plus its evaluations; the whole run is its
epochs times that, times a slowdown factor for rows whose controller needs more iterations as
training proceeds (read from finished runs of the same row in the store, when there are some:
mean iterations per solve over their epochs ÷ the first epoch's). The wall time of a table is the
makespan of its runs, handed out in plan order to the slots as they free, as the scheduler does.

Each run also pays its process start (a fresh Python importing torch, MLflow and lcp), measured
once per machine: for short runs (--quick) it is most of their time.

What it does not know: a run's time beside other runs on a shared CPU (each slot is measured
alone, with its thread count), how a row slows down when the store has no run of it, and the
store's own time (opening it, logging each epoch).

Measurements are cached per machine (CPU model, thread count, torch version) and config hash in
`$LCP_CACHE_DIR/budget.json` (default `~/.cache/lcp`); `--remeasure` measures again.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from filelock import FileLock

from lcp.callbacks import Callback

WARMUP_STEPS = 2
STEPS = 6  # the fewest steps measured after the warm-up
RAMP_STEPS = 60  # the most: enough to see a controller's iterations grow over the first steps
# (30 missed it for the RNN's LCP-DI (KP) on 5,000 MNIST digits: its solves slow down up to
# step ~60, and its first epochs ran 1.26-1.49x over a 30-step estimate; docs/study.md)
RAMP_SECONDS = 20.0  # ... unless the steps measured take this long
LIGHT_STEPS = 2  # `light`: a rough measurement (a --quick tour costs little more than it)
MEASURE_VERSION = 3  # cached measurements of an older method are measured again
CACHE_ENV = "LCP_CACHE_DIR"
# the iteration counts that the slowdown factor reads, summed per epoch
ITERATION_KEYS = ("controlled/iterations_mean", "free/iterations_mean", "adjoint/iterations_mean",
                  "noisy/iterations_mean", "ebd/iterations_mean")


@dataclass
class Measurement:
    step_s: float  # one optimizer step, averaged over the first epoch
    eval_batch_s: float  # one evaluation batch (free equilibrium and logits)


@dataclass
class RunEstimate:
    id: str
    seed: int
    config_hash: str
    steps_per_epoch: int
    eval_batches: int  # per evaluation of the test (and validation) set
    final_eval_batches: int  # the final evaluation: train, test (and validation) sets
    epochs: int
    evals: int  # evaluations after an epoch (every eval_epochs or watch_epochs)
    step_s: float
    eval_batch_s: float
    slowdown: float  # later epochs ÷ the first, from the store (1.0: unknown or none)
    slowdown_known: bool
    cached: bool
    startup_s: float = 0.0  # the run's process start (imports)
    first_epoch_known: bool = False  # step_s from a run's first epoch in the store

    @property
    def first_epoch_s(self) -> float:
        """The first epoch's training time plus one periodic evaluation (what `epoch_time`
        and the evaluation after it take)."""
        return self.steps_per_epoch * self.step_s + self.eval_batches * self.eval_batch_s

    @property
    def total_s(self) -> float:
        return (self.startup_s + self.epochs * self.steps_per_epoch * self.step_s * self.slowdown
                + (self.evals * self.eval_batches + self.final_eval_batches) * self.eval_batch_s)


# ====================================================================== measuring


class _StepClock(Callback):
    """The time of each optimizer step after the warm-up ones; asks the loop to stop once at
    least `fewest` are measured and they took `seconds` in all."""

    def __init__(self, fewest: int, seconds: float):
        self.fewest, self.seconds = fewest, seconds
        self.times: list[float] = []
        self.last = None

    def on_fit_start(self, state):
        self.last = time.perf_counter()

    def on_step_end(self, state, stats):
        now = time.perf_counter()
        if state.global_step > WARMUP_STEPS:
            self.times.append(now - self.last)
            if len(self.times) >= self.fewest and sum(self.times) >= self.seconds:
                state.request_stop("measured")
        self.last = now


def epoch_step_time(times: list[float], steps_per_epoch: int) -> float:
    """The mean step time over an epoch of `steps_per_epoch` steps from the times of its first
    measured steps (after the warm-up): those as measured, every other step at the median of
    the last third of them (where a controller's iterations have stopped growing, if they do)."""
    tail = sorted(times[-max(1, len(times) // 3):])
    rate = tail[len(tail) // 2]
    rest = max(0, steps_per_epoch - len(times))
    return (sum(times) + rest * rate) / max(steps_per_epoch, len(times))


def measure(cfg, loaders, *, steps: int = STEPS, max_steps: int = RAMP_STEPS,
            max_seconds: float = RAMP_SECONDS, eval_batches: int = 3) -> Measurement:
    """Time the first optimizer steps of `cfg`'s first epoch after WARMUP_STEPS (`steps` to
    `max_steps` of them: the fewest once they took `max_seconds`) and `eval_batches` evaluation
    batches, with `loaders` (as `lcp.data.build_loaders` returns them), through `fit`."""
    from lcp.training import evaluate, fit, resolve_device

    train_loader, eval_loaders, shape, classes = loaders
    steps_per_epoch = len(train_loader)
    train_loader.limit_batches = WARMUP_STEPS + max(steps, max_steps)
    clock = _StepClock(steps, max_seconds)
    short = cfg.replace(num_epochs=1, eval_epochs=0, align=False, limit_train_batches=-1,
                        limit_eval_batches=-1)
    test = eval_loaders["test"]
    test.limit_batches = 1
    holder = {}

    class _Keep(Callback):
        def on_fit_end(self, state, result):
            holder["trainer"] = state.trainer

    fit(short, [clock, _Keep()], loaders=(train_loader, {"test": test}, shape, classes))
    if not clock.times:
        raise ValueError(f"cannot measure {cfg.data}: an epoch has {steps_per_epoch} step(s), "
                         f"fewer than the {WARMUP_STEPS + 1} a measurement needs")
    test.limit_batches = eval_batches
    start = time.perf_counter()
    evaluate(holder["trainer"], test, resolve_device(short))
    eval_s = (time.perf_counter() - start) / max(1, len(test))
    return Measurement(epoch_step_time(clock.times, steps_per_epoch), eval_s)


STARTUP_KEY = "process start"  # its entry in a machine's cache, beside the config hashes


def measure_startup() -> float:
    """The seconds a fresh Python takes to import what a run's worker imports."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, mlflow, lcp.training, pipeline.worker"],
                   check=True, capture_output=True)
    return time.perf_counter() - start


# ====================================================================== the cache


def machine_key(threads: int) -> str:
    import torch

    from pipeline.tracking.store import cpu_model

    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"{cpu} | {gpu} | {threads} thread(s) | torch {torch.__version__}"


def cache_path() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "lcp")
    return Path(root) / "budget.json"


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # absent or unreadable: measure again


def measure_key(cfg) -> str:
    """What a step's time depends on: the config hash without the epoch count and seed."""
    return cfg.replace(num_epochs=1, seed=0).config_hash()


# ====================================================================== estimating


def slowdown_from_store(tracker, experiment_name: str, row_id: str,
                        data: str) -> float | None:
    """Mean iterations per solve over the epochs ÷ the first epoch's, from the newest finished
    run of `row_id` on the same dataset in the store with more than one epoch (None when there
    is none: how hard the controller works depends on the data)."""
    if tracker is None:
        return None
    exp_id = tracker.get_experiment_id(experiment_name)
    if exp_id is None:
        return None
    runs = tracker.search_runs([exp_id], f"attributes.status = 'FINISHED' and "
                               f"tags.id = '{row_id}' and params.data = '{data}'",
                               order_by=["attributes.end_time DESC"])
    for run in runs:
        per_epoch: dict[int, float] = {}
        for key in ITERATION_KEYS:
            if key in run.data.metrics:
                for m in tracker.metric_history(run.info.run_id, key):
                    per_epoch[m.step] = per_epoch.get(m.step, 0.0) + m.value
        if len(per_epoch) > 1 and per_epoch[min(per_epoch)] > 0:
            values = [per_epoch[e] for e in sorted(per_epoch)]
            return sum(values) / len(values) / values[0]
    return None


def first_epoch_from_store(tracker, experiment_name: str, row_id: str, cfg, cpu: str,
                           threads: int) -> float | None:
    """The first epoch's training time (`epoch_time` of epoch 1) of the newest run of `row_id`
    in the store that computes what `cfg` does (its config hash but for the seed) on this CPU
    model and thread count, finished or not, once it trained one epoch (None when there is
    none). Measured over a whole epoch, it holds where a controller's solves grow within the
    first epoch, which the first steps measured here do not show (the RNN's LCP-DI on MNIST:
    ~90 iterations per solve at its first steps, ~530 by the end of its first epoch)."""
    if tracker is None:
        return None
    exp_id = tracker.get_experiment_id(experiment_name)
    if exp_id is None:
        return None
    cpu_quoted = cpu.replace("'", "\\'")
    runs = tracker.search_runs([exp_id], f"tags.id = '{row_id}' and params.data = '{cfg.data}' "
                               f"and tags.cpu = '{cpu_quoted}' and "
                               f"tags.torch_threads = '{threads}'",
                               order_by=["attributes.start_time DESC"])
    for run in runs:
        seed = run.data.params.get("seed")
        if seed is None or run.data.tags.get("config_hash") != cfg.replace(
                seed=int(seed)).config_hash():
            continue
        history = tracker.metric_history(run.info.run_id, "epoch_time")
        if history:
            return float(min(history, key=lambda m: m.step).value)
    return None


def estimate(items: Iterable, *, threads: int, tracker=None, remeasure: bool = False,
             echo=None, light: bool = False) -> list[RunEstimate]:
    """One RunEstimate per item (pipeline.manifest.selection.Item), measuring each config not yet
    cached (`light`: fewer steps, and a light measurement in the cache is good enough)."""
    import torch

    from lcp.data import build_loaders
    from pipeline.tracking.store import cpu_model

    items = list(items)
    torch.set_num_threads(max(1, threads))
    machine = machine_key(threads)
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    with lock:
        cache = read_cache(path)
    known = cache.get(machine, {})
    slowdowns: dict[tuple[str, str], float | None] = {}
    first_epochs: dict[tuple[str, str], float | None] = {}
    cpu = cpu_model()
    out = []
    sizes: dict[tuple, tuple[int, int, int]] = {}  # the data's batches, once per data setup
    steps = LIGHT_STEPS if light else STEPS
    fresh: set[str] = set()  # measured by this call: --remeasure measures a config once
    if items and (remeasure or known.get(STARTUP_KEY, {}).get("version") != MEASURE_VERSION):
        known[STARTUP_KEY] = {"startup_s": measure_startup(), "version": MEASURE_VERSION}
    startup_s = known[STARTUP_KEY]["startup_s"] if items else 0.0
    for item in items:
        cfg = item.cfg
        key = measure_key(cfg)
        setup = (cfg.data, cfg.data_dir, cfg.batch_size, cfg.validation_split,
                 cfg.validation_seed, cfg.limit_train_batches, cfg.limit_eval_batches)
        cached = (key in known and (key in fresh or not remeasure)
                  and known[key].get("version") == MEASURE_VERSION
                  and known[key].get("steps", 0) >= steps)
        loaders = build_loaders(cfg) if (setup not in sizes or not cached) else None
        if setup not in sizes:
            train, evals = loaders[0], loaders[1]
            sizes[setup] = (len(train),
                            sum(len(evals[s]) for s in ("test", "val") if s in evals),
                            sum(len(evals[s]) for s in ("train", "test", "val") if s in evals))
        steps_per_epoch, eval_batches, final_batches = sizes[setup]
        if not cached:
            if echo is not None:
                echo(f"measuring {item.exp.id} (its first steps) ...")
            m = measure(cfg, loaders, steps=steps, max_steps=steps if light else RAMP_STEPS,
                        eval_batches=1 if light else 3)
            known[key] = {**asdict(m), "steps": steps, "version": MEASURE_VERSION}
            fresh.add(key)
        m = Measurement(known[key]["step_s"], known[key]["eval_batch_s"])
        if (item.exp.id, cfg.data) not in slowdowns:
            slowdowns[(item.exp.id, cfg.data)] = slowdown_from_store(
                tracker, item.experiment_name, item.exp.id, cfg.data)
        slow = slowdowns[(item.exp.id, cfg.data)]
        if (item.exp.id, key) not in first_epochs:
            first_epochs[(item.exp.id, key)] = first_epoch_from_store(
                tracker, item.experiment_name, item.exp.id, cfg, cpu, max(1, threads))
        first = first_epochs[(item.exp.id, key)]
        step_s = first / steps_per_epoch if first is not None else m.step_s
        evals_count = sum(cfg.evaluation_after(e) is not None
                          for e in range(1, cfg.num_epochs + 1))
        out.append(RunEstimate(item.exp.id, item.seed, item.config_hash, steps_per_epoch,
                               eval_batches, final_batches, cfg.num_epochs, evals_count,
                               step_s, m.eval_batch_s, slow or 1.0, slow is not None, cached,
                               startup_s, first_epoch_known=first is not None))
    with lock:
        cache = read_cache(path)
        cache[machine] = {**cache.get(machine, {}), **known}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, path)
    return out


def makespan(durations: list[float], slots: int) -> float:
    """The wall time of running `durations` in order on `slots` slots, each job going to the
    slot that frees first (as the scheduler hands them out)."""
    free = [0.0] * max(1, slots)
    for d in durations:
        i = min(range(len(free)), key=free.__getitem__)
        free[i] += d
    return max(free) if durations else 0.0


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_estimates(estimates: list[RunEstimate], slots: int, machine: str) -> list[str]:
    """The lines `lcp budget` prints: per row (its seeds together), then the total."""
    by_row: dict[str, list[RunEstimate]] = {}
    for e in estimates:
        by_row.setdefault(e.id, []).append(e)
    total = sum(e.total_s for e in estimates)
    lines = [f"budget on {machine}, {slots} slot(s):",
             f"  {'row':<24} {'runs':>4} {'step':>9} {'1st epoch':>10} {'per run':>9} "
             f"{'all seeds':>10} {'share':>6}  slowdown"]
    for row, es in sorted(by_row.items(), key=lambda kv: -sum(e.total_s for e in kv[1])):
        e = es[0]
        row_total = sum(x.total_s for x in es)
        slow = (f"x{e.slowdown:.2f} (from the store)" if e.slowdown_known
                else "unknown (no finished run of this row in the store)"
                if is_controller_row(row) else "—")
        first = format_duration(e.first_epoch_s) + ("*" if e.first_epoch_known else "")
        lines.append(f"  {row:<24} {len(es):>4} {e.step_s * 1000:>7.1f}ms "
                     f"{first:>10} "
                     f"{format_duration(e.total_s):>9} {format_duration(row_total):>10} "
                     f"{100 * row_total / total if total else 0:>5.0f}%  {slow}")
    wall = makespan([e.total_s for e in estimates], slots)
    lines.append(f"  total: {format_duration(total)} of run time; about "
                 f"{format_duration(wall)} of wall time on {slots} slot(s) (each slot measured "
                 "alone: slots sharing CPU cores are slower)")
    if estimates and estimates[0].startup_s:
        lines.append(f"  each run includes {format_duration(estimates[0].startup_s)} of process "
                     "start (imports), measured here")
    if any(e.first_epoch_known for e in estimates):
        lines.append("  * the first epoch as a run of the row in this store trained it on this "
                     "CPU and thread count (its steps: that epoch's mean)")
    if any(is_controller_row(e.id) and not e.slowdown_known for e in estimates):
        lines.append("  controller rows (lcp-*) can need more solver iterations per step as "
                     "training proceeds, so their estimate is a lower bound; a finished run of "
                     "the row in this store makes their slowdown known")
    return lines


def is_controller_row(row_id: str) -> bool:
    return "-lcp-" in row_id
