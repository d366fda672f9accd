#!/usr/bin/env python
"""A change's speed from `step_time.py --json` files of the code before it and after it, timed
in turns on one machine (before, after, before, after, at each thread count): per row and
thread count, each run's median step on both sides and the speed-up, before ÷ after of the runs
taken in turn (their range).

    python benchmarks/before_after.py --before before-*.json --after after-*.json

Files are paired in the order given (the first before with the first after, ...) within a
thread count; a row that only one side timed is left out.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load(paths: list[str]) -> dict[tuple[str, int], list[float]]:
    """{(row, threads): [ms of each file, in order]}."""
    out: dict[tuple[str, int], list[float]] = defaultdict(list)
    for path in paths:
        payload = json.loads(Path(path).read_text())
        threads = payload.get("threads")
        if threads is None:
            raise SystemExit(f"{path}: no thread count (made by an older step_time.py); "
                             "time it again with this one")
        for rec in payload["rows"]:
            out[(rec["id"], int(threads))].append(float(rec["ms"]))
    return out


def fmt(ms: float) -> str:
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", nargs="+", required=True, metavar="JSON")
    p.add_argument("--after", nargs="+", required=True, metavar="JSON")
    args = p.parse_args(argv)
    before, after = load(args.before), load(args.after)
    print("| row | threads | before (ms, per run) | after (ms, per run) | before ÷ after |")
    print("|---|---|---|---|---|")
    for key in sorted(before.keys() & after.keys(), key=lambda k: (k[1], k[0])):
        b, a = before[key], after[key]
        ratios = [x / y for x, y in zip(b, a)]
        spread = (f"{min(ratios):.2f}×" if max(ratios) - min(ratios) < 0.005
                  else f"{min(ratios):.2f}–{max(ratios):.2f}×")
        print(f"| {key[0]} | {key[1]} | {', '.join(fmt(x) for x in b)} | "
              f"{', '.join(fmt(x) for x in a)} | {spread} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
