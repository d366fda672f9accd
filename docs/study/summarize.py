"""Fill the generated sections of docs/study.md from the study's store and reports.

    python docs/study/summarize.py STORE        # STORE: the folder run.sh used (LCP_STUDY_STORE)

Reads the per-run CSVs that `lcp report` wrote into docs/study/*/ (so every number equals what
`lcp report` prints from the store), the Optuna study, and the budget planner's cached
measurements; writes docs/study/study.csv (one line per row, seed and dataset) and
docs/study/budget.csv (the planner's estimate beside each run's measured first epoch), and
replaces each `<!-- generated:NAME -->` ... `<!-- /generated -->` block of docs/study.md.
Nothing here trains or measures: a configuration the planner has not cached is left out.
"""

from __future__ import annotations

import functools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

# (report folder, dataset named in the CSV, the --set overrides of its runs)
PARTS = [
    ("table1-mnist-sample", "mnist-sample", {"data": "mnist-sample", "eval_epochs": "1"}),
    ("fashion-ff", "fashion-mnist",
     {"data": "fashion-mnist", "num_epochs": "10", "eval_epochs": "1"}),
]
STUDY_NAME = "fashion-ff-lcp-di-5ep"
# the dataset named in a part's section labels, where it is not the manifest's MNIST
SECTION_DATA = {"fashion-mnist": "Fashion-MNIST"}
COLUMNS = ["id", "seed", "data", "run_id", "config_hash", "epochs", "threads", "test_acc",
           "best_test_acc", "best_epoch", "wall_time_s", "health"]


def main(store: Path) -> None:
    import pandas as pd

    os.environ.setdefault("LCP_CACHE_DIR", str(store / "cache"))
    frames, summaries = [], {}
    for folder, data, _ in PARTS:
        runs_csv = HERE / folder / "table-1-runs.csv"
        if runs_csv.exists():
            runs = pd.read_csv(runs_csv)
            runs["data"] = runs["data"].fillna(data)
            frames.append(runs)
            summaries[folder] = pd.read_csv(HERE / folder / "table-1.csv")
    study = pd.concat(frames)[COLUMNS] if frames else pd.DataFrame(columns=COLUMNS)
    study.to_csv(HERE / "study.csv", index=False, float_format="%.4f")
    blocks = {"commit": _commit_line(), "runs": _runs_line(study)}
    for folder, data, _ in PARTS:
        blocks[folder] = (_compact(summaries[folder], SECTION_DATA.get(data))
                          if folder in summaries else "*(not run yet: see 'What is left')*\n")
    blocks["tuning"] = _tuning(store)
    blocks["budget"] = _budget(store, study)
    full = HERE / "budget-table1-full-size.txt"
    blocks["budget-full"] = ("```\n" + full.read_text() + "```\n" if full.exists()
                             else "*(not measured yet)*\n")
    _fill(HERE.parent / "study.md", blocks)
    _fill(ROOT / "README.md", {k: blocks[k] for k in ("table1-mnist-sample", "budget-full")})


def _commit_line() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    return f"Tables generated at commit `{commit}` of this repository.\n"


def _runs_line(study) -> str:
    if study.empty:
        return "No run yet.\n"
    threads = ", ".join(str(int(t)) for t in sorted(set(study["threads"].dropna())))
    commits = len(set(study["run_id"]))
    return (f"{commits} runs; torch threads per run: {threads}; "
            f"data: {', '.join(sorted(set(study['data'])))}.\n")


def _num(value, digits=2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _compact(summary, dataset: str | None = None) -> str:
    """The report's summary in the columns a reader needs first; `dataset` replaces "MNIST" in
    the manifest's section names (its rows are Table 1's MNIST rows run on another dataset)."""
    margin = summary["margin"].iloc[0] if "margin" in summary and len(summary) else 1.0
    lines = [f"| Section | Method | n | Test acc. (%) | Verdict vs BP/RBP (±{margin:g} pp) | "
             "Best acc. (%) | Health | Cos. to grad. | Wall time / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        if r.n == 0:
            continue
        acc = _num(r.test_acc_mean) + ("" if math.isnan(r.test_acc_std)
                                       else f" ± {_num(r.test_acc_std)}")
        verdict = "(baseline)" if r.is_baseline else (
            f"{r.verdict}" + ("" if math.isnan(r.verdict_p) else f" (p {r.verdict_p:.3f})"))
        section = r.section.replace("MNIST", dataset) if dataset else r.section
        lines.append(f"| {section} | {r.label} | {r.n} | {acc} | {verdict} | "
                     f"{_num(r.best_acc_mean)} | {r.health} | {_num(r.cos_to_gradient, 3)} | "
                     f"{_duration(r.wall_time_s)} |")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    from pipeline.budget import format_duration

    return "—" if math.isnan(seconds) else format_duration(seconds)


def _tuning(store: Path) -> str:
    journal = store / "optuna-journal.log"
    if not journal.exists():
        return "*(not run yet: see 'What is left')*\n"
    import optuna

    from pipeline.study import open_storage, resolve_storage, tally

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(resolve_storage(str(journal), f"sqlite:///{store / 'mlflow.db'}"))
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    except KeyError:
        return "*(not run yet: see 'What is left')*\n"
    counts = tally(study.get_trials(deepcopy=False))
    lines = [f"Study `{STUDY_NAME}`: {counts['complete']} complete, {counts['pruned']} pruned "
             f"({counts['diverged']} diverged), {counts['failed']} failed trials."]
    try:
        best = study.best_trial
    except ValueError:
        return lines[0] + " No complete trial.\n"
    params = ", ".join(f"{k} = {v:.4g}" for k, v in best.params.items())
    lines.append(f"Best: trial {best.number}, validation accuracy {100 * best.value:.2f} % "
                 f"({params}).")
    return " ".join(lines) + "\n"


def _budget(store: Path, study) -> str:
    """The planner's first-epoch training time (steps × measured step) beside each run's
    measured `epoch_time` of epoch 1, from the cache run.sh's `lcp budget` calls filled."""
    import pandas as pd

    from pipeline import budget
    from pipeline.tracking import Tracker

    cache = budget.read_cache(budget.cache_path())
    machine = budget.machine_key(1)
    known = cache.get(machine, {})
    if not known or study.empty:
        return "*(no cached measurement yet)*\n"
    tracker = Tracker(f"sqlite:///{store / 'mlflow.db'}", create=False)
    from lcp.config import RunConfig
    from lcp.data import build_loaders

    # A run this store does not hold (a part made from an earlier store, whose report files
    # are committed): its config from the manifest and its part's overrides (checked by its
    # config hash), its measured first epoch from the budget.csv made from that store.
    earlier = ({(r.id, int(r.seed), r.data): r.measured_s
                for r in pd.read_csv(HERE / "budget.csv").itertuples()}
               if (HERE / "budget.csv").exists() else {})
    rows, sizes = [], {}
    for r in study.itertuples():
        cfg, first = _stored_config(tracker, r.run_id), None
        if cfg is not None:
            first = [m.value for m in tracker.metric_history(r.run_id, "epoch_time")
                     if m.step == 1]
        elif (r.id, int(r.seed), r.data) in earlier:
            cfg, first = _manifest_config(r), [earlier[(r.id, int(r.seed), r.data)]]
        if cfg is None:
            continue
        key = budget.measure_key(cfg)
        if known.get(key, {}).get("version") != budget.MEASURE_VERSION:
            continue  # not measured yet, or by an older method of the planner
        if cfg.data not in sizes:
            sizes[cfg.data] = len(build_loaders(cfg)[0])
        steps = sizes[cfg.data]
        est = steps * known[key]["step_s"]
        if first:
            rows.append({"id": r.id, "seed": r.seed, "data": r.data,
                         "estimate_s": est, "measured_s": first[0],
                         "ratio": first[0] / est, "wall_time_s": r.wall_time_s})
    if not rows:
        return "*(no cached measurement matches a run yet)*\n"
    table = pd.DataFrame(rows)
    table.to_csv(HERE / "budget.csv", index=False, float_format="%.3f")
    within = (abs(table["ratio"] - 1) <= 0.35)
    lines = [f"{int(within.sum())} of {len(table)} runs' first epochs within ±35 % of the "
             f"planner's estimate (measured ÷ estimate: median {table['ratio'].median():.2f}, "
             f"range {table['ratio'].min():.2f}–{table['ratio'].max():.2f}).", "",
             "| Run | Data | Estimate, epoch 1 | Measured, epoch 1 | Measured ÷ estimate |",
             "|---|---|---|---|---|"]
    for r in table.groupby(["id", "data"], sort=False).agg(
            est=("estimate_s", "mean"), lo=("ratio", "min"), hi=("ratio", "max"),
            m=("measured_s", "mean"), n=("seed", "count")).reset_index().itertuples():
        lines.append(f"| {r.id} ({r.n} seeds) | {r.data} | {r.est:.1f} s | {r.m:.1f} s (mean) | "
                     f"{r.lo:.2f}–{r.hi:.2f} |")
    return "\n".join(lines) + "\n"


def _stored_config(tracker, run_id: str):
    """The run's config from its MLflow params, or None when the store does not hold it."""
    from mlflow.exceptions import MlflowException

    from lcp.config import RunConfig

    try:
        run = tracker.get_run(run_id)
    except MlflowException:
        return None
    return RunConfig.from_dict({k: _param(v) for k, v in run.data.params.items()
                                if k in RunConfig.field_names()})


def _manifest_config(row):
    """A study run's config rebuilt from experiments.yaml and its part's overrides; None when
    its config hash differs (the manifest changed since)."""
    from pipeline.selection import expand

    overrides = next(o for _, data, o in PARTS if data == row.data)
    item = expand([_manifest().get(row.id)], [int(row.seed)], dict(overrides))[0]
    return item.cfg if item.config_hash == row.config_hash else None


@functools.lru_cache(maxsize=1)
def _manifest():
    """The repository's experiments.yaml, read once."""
    from pipeline.manifest import load_manifest

    return load_manifest(str(ROOT / "experiments.yaml"))


def _param(value: str):
    return None if value == "None" else value


def _fill(path: Path, blocks: dict[str, str]) -> None:
    text = path.read_text()
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- generated:{re.escape(name)} -->\n).*?(<!-- /generated -->)",
                             re.S)
        text, n = pattern.subn(lambda m: m.group(1) + body + m.group(2), text)
        if n != 1:
            raise SystemExit(f"docs/study.md has {n} blocks named {name!r}")
    path.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]).resolve())
