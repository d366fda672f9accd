"""A run's health from its per-epoch records: how it ended, its best epoch beside its last, a
collapse, and how hard its solvers worked (docs/pipeline.md, "Verdicts and run health").

The same function serves the worker (tags and metrics on the run when it ends, so that the
MLflow UI can filter on them: `tags.health = 'collapsed'`) and `lcp report` (per row, from the
store's metric histories).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

TEST_KEY = "eval_test/accuracy"
# a run whose final test accuracy is this many percentage points below its best has collapsed
COLLAPSE_PP = 5.0
# the phase whose iterations tell how hard the controller works (the free phase for bp/rbp)
CONTROLLER_KEY = "controlled/iterations_mean"
FREE_KEY = "free/iterations_mean"
HIT_SUFFIX = "/hit_max_iter_count"
SKIPPED_KEY = "skipped_steps"  # steps skipped in an epoch, their update not finite


@dataclass
class Health:
    best_epoch: int | None  # the epoch of the best test accuracy (of those evaluated)
    best_acc: float  # in %, NaN when the test set was never evaluated during training
    last_acc: float  # the last evaluated epoch's test accuracy, in %
    collapsed: bool  # last_acc more than COLLAPSE_PP below best_acc
    iter_growth: float  # the controller's (else the free phase's) iterations, last ÷ first epoch
    max_iter_share: float  # solves that stopped at max_iter ÷ all solves (every phase)
    skipped_steps: int = 0  # steps skipped because their update was not finite

    @property
    def flags(self) -> list[str]:
        out = ["collapsed"] if self.collapsed else []
        if self.max_iter_share >= 0.5:
            out.append("max_iter")
        if self.skipped_steps:
            out.append("skipped")
        return out

    @property
    def word(self) -> str:
        """The `health` tag: `ok`, or the flags joined by commas."""
        return ",".join(self.flags) or "ok"

    def tags(self) -> dict[str, str]:
        return {"health": self.word,
                "health.best_epoch": "" if self.best_epoch is None else str(self.best_epoch)}

    def metrics(self) -> dict[str, float]:
        out = {"health/best_test_accuracy": self.best_acc / 100,
               "health/iter_growth": self.iter_growth,
               "health/max_iter_share": self.max_iter_share,
               "health/skipped_steps": float(self.skipped_steps)}
        return {k: v for k, v in out.items() if not math.isnan(v)}


def run_health(history: Sequence[Mapping[str, float]]) -> Health:
    """The health of a run from its per-epoch records (`FitResult.history`, or the store's
    metric histories regrouped by epoch)."""
    evaluated = [(int(r.get("epoch", i + 1)), 100.0 * r[TEST_KEY])
                 for i, r in enumerate(history) if TEST_KEY in r and not math.isnan(r[TEST_KEY])]
    if evaluated:
        best_epoch, best = max(evaluated, key=lambda p: (p[1], -p[0]))
        last = evaluated[-1][1]
    else:
        best_epoch, best, last = None, math.nan, math.nan
    key = next((k for k in (CONTROLLER_KEY, FREE_KEY) if any(k in r for r in history)), None)
    iters = [r[key] for r in history if key is not None and key in r]
    growth = iters[-1] / iters[0] if len(iters) > 1 and iters[0] > 0 else math.nan
    solves = hits = 0.0
    for r in history:
        steps = _steps(r)
        for k, v in r.items():
            if k.endswith(HIT_SUFFIX):
                hits += v
                solves += steps
    share = hits / solves if solves > 0 else math.nan
    collapsed = bool(evaluated) and last < best - COLLAPSE_PP
    skipped = int(sum(r.get(SKIPPED_KEY, 0) for r in history))
    return Health(best_epoch, best, last, collapsed, growth, share, skipped)


def _steps(record: Mapping[str, float]) -> float:
    """Optimizer steps in an epoch (one solve per phase each), from its time and rate."""
    time_s, rate = record.get("epoch_time"), record.get("steps_per_s")
    if time_s is None or rate is None:
        return math.nan
    return round(time_s * rate)


def records_from_histories(histories: Mapping[str, Sequence[tuple[int, float]]]
                           ) -> list[dict[str, float]]:
    """{key: [(epoch, value)]} → one record per epoch with its `epoch`, in order."""
    by_epoch: dict[int, dict[str, float]] = {}
    for key, points in histories.items():
        for step, value in points:
            by_epoch.setdefault(int(step), {"epoch": int(step)})[key] = value
    return [by_epoch[e] for e in sorted(by_epoch) if e > 0]
