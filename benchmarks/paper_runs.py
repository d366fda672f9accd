"""Whole runs of ours beside the paper's code: the same command line gives the same digits.

Proves that every flag of the paper's `run_classification.py` means what it means there,
`--eval_epochs` included: Table 1's BP FF row (experiments.yaml, id t1-ff-bp), seed 0, N epochs,
run as four whole runs, one after another, each a subprocess with the same thread count:

  (a) ours   `python3 run_classification.py <the row's flags>`  (the paper's default eval_epochs)
  (b) ours   the same with `--eval_epochs=1`
  (c) paper  DIR/run_classification.py with (a)'s flags
  (d) paper  DIR/run_classification.py with (b)'s flags

Both scripts print the same lines (`Evaluating after training epoch E`, then `eval_test/...`
and, at the end, `eval_train/...` and `eval_test/...`); every such line of ours must equal the
paper's, digit for digit, in both pairs. An evaluation of the test set makes a DataLoader
iterator, which draws from the global generator, so every later shuffle moves: (a) and (b)
end with different digits. The paper's script reads MNIST from `./MNIST/raw` (torchvision,
root "."), so it runs in a temporary folder holding a link `MNIST` -> DATA/MNIST; ours gets
the same folder through $LCP_DATA_DIR, so both get exactly the same flags. The paper's code is
never imported here. Exit status 1 when ours differs from the paper in either pair (or a run
fails).

    python benchmarks/paper_runs.py --compare-to ../least-control --data-dir DATA \
        [--epochs 3] [--threads 1]

(The closing `eval_train/*` lines agree only since the final train evaluation goes through the
shuffled training set, as the paper's does: evaluation averages per-batch means, so which
samples share the last, partial batch moves them in their last digits.)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW, SEED = "t1-ff-bp", 0
RESULT = re.compile(r"^(eval_\w+/\w+) (\S+)$")


def row_flags(epochs: int) -> list[str]:
    """The row's flags as the paper's command line (`--name=value`), with seed and epochs."""
    sys.path.insert(0, str(ROOT))
    from pipeline.manifest.manifest import load_manifest

    exp = next(e for e in load_manifest(ROOT / "experiments.yaml").table(1) if e.id == ROW)
    cfg = exp.config(SEED, {"num_epochs": epochs}).to_dict()
    return [f"--{k}={cfg[k]}" for k in dict.fromkeys(("seed", *exp.args, "num_epochs"))]


def run(name: str, script: Path, flags: list[str], data: Path, threads: int) -> dict:
    """One whole run in a fresh folder; its printed evaluations and wall time."""
    with tempfile.TemporaryDirectory(prefix="paper_runs_") as tmp:
        (Path(tmp) / "MNIST").symlink_to(data.resolve() / "MNIST")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "LCP_DATA_DIR": str(data.resolve()), "PYTHONHASHSEED": "0"}
        cmd = [sys.executable, str(script), *flags, f"--out_dir={tmp}/out"]
        print(f"({name}) {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"({name}) failed with exit status {proc.returncode}:\n{proc.stderr[-3000:]}")
    lines = [m.groups() for m in map(RESULT.match, proc.stdout.splitlines()) if m]
    final = dict(lines[-6:])  # the closing evaluation: eval_train/* then eval_test/*
    return {"name": name, "lines": lines, "final": final, "wall": wall,
            "test_accs": [v for k, v in lines if k == "eval_test/accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare-to", required=True, type=Path,
                    help="checkout of github.com/seijin-kobayashi/least-control")
    ap.add_argument("--data-dir", required=True, type=Path, help="folder holding MNIST/raw/")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    paper = args.compare_to.resolve() / "run_classification.py"
    if not paper.exists():
        sys.exit(f"no run_classification.py in {args.compare_to}")
    if not (args.data_dir / "MNIST" / "raw").is_dir():
        sys.exit(f"no MNIST/raw/ in {args.data_dir}")

    flags = row_flags(args.epochs)
    once = ["--eval_epochs=1"]
    runs = [run("a", ROOT / "run_classification.py", flags, args.data_dir, args.threads),
            run("b", ROOT / "run_classification.py", flags + once, args.data_dir, args.threads),
            run("c", paper, flags, args.data_dir, args.threads),
            run("d", paper, flags + once, args.data_dir, args.threads)]
    a, b, c, d = runs

    labels = {"a": "ours", "b": "ours --eval_epochs=1", "c": "paper",
              "d": "paper --eval_epochs=1"}
    print(f"\n{ROW}, seed {SEED}, {args.epochs} epochs, {args.threads} thread(s)")
    print(f"{'run':<26} {'test acc':<22} {'train acc':<22} {'evals':>5} {'wall s':>8}")
    for r in runs:
        print(f"({r['name']}) {labels[r['name']]:<22} {r['final']['eval_test/accuracy']:<22} "
              f"{r['final']['eval_train/accuracy']:<22} {len(r['test_accs']):>5} "
              f"{r['wall']:>8.1f}")
    print("\ntest accuracy at each evaluation (the last is the closing one):")
    for r in runs:
        print(f"({r['name']}) {' '.join(r['test_accs'])}")
    for x, y in ((a, c), (b, d)):  # every printed result line where ours and the paper's differ
        if len(x["lines"]) != len(y["lines"]):
            print(f"({x['name']}) prints {len(x['lines'])} result lines, "
                  f"({y['name']}) {len(y['lines'])}")
        for i, (p, q) in enumerate(zip(x["lines"], y["lines"])):
            if p != q:
                print(f"({x['name']}) vs ({y['name']}) result line {i}: {p[0]} {p[1]} vs {q[1]}")

    without, with_one = a["lines"] == c["lines"], b["lines"] == d["lines"]
    moved = a["final"] != b["final"] and c["final"] != d["final"]
    print(f"\nours == paper without --eval_epochs: {without}")
    print(f"ours == paper with --eval_epochs 1: {with_one}")
    print(f"with vs without differ (the flag moves later shuffles): {moved}")
    sys.exit(0 if without and with_one else 1)


if __name__ == "__main__":
    main()
