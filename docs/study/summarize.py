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
    # section 0: Table 1 on the real MNIST (run.sh mnist DIR), watched every epoch without
    # changing the runs (watch_epochs, not in the config hash)
    ("table1-mnist", "mnist", {}),
    ("table1-mnist-sample", "mnist-sample", {"data": "mnist-sample", "eval_epochs": "1"}),
    ("fashion-ff", "fashion-mnist",
     {"data": "fashion-mnist", "num_epochs": "10", "eval_epochs": "1"}),
    # section 3's best trial on the test set, beside BP rerun in the tuning's store
    ("fashion-ff-tuned", "fashion-mnist",
     {"data": "fashion-mnist", "num_epochs": "10", "eval_epochs": "1"}),
]
STUDY_NAME = "fashion-ff-lcp-di-5ep"
PAPER_STUDY_NAME = "fashion-ff-lcp-di-5ep-paper"  # the paper's setting alone, never pruned
STUDY_10_NAME = "fashion-ff-lcp-di-10ep"  # run.sh tune10: the same search over 10 epochs
# the dataset named in a part's section labels, where it is not the manifest's MNIST
SECTION_DATA = {"fashion-mnist": "Fashion-MNIST"}
COLUMNS = ["id", "seed", "data", "run_id", "config_hash", "epochs", "threads", "test_acc",
           "best_test_acc", "best_epoch", "train_acc", "train_nll", "test_nll", "wall_time_s",
           "health", "cpu", "commit"]


def main(store: Path) -> None:
    import pandas as pd

    os.environ.setdefault("LCP_CACHE_DIR", str(store / "cache"))
    frames, summaries, cos_headers = [], {}, {}
    for folder, data, _ in PARTS:
        runs_csv = HERE / folder / "table-1-runs.csv"
        if runs_csv.exists():
            runs = pd.read_csv(runs_csv)
            cos_headers[folder] = _cos_header(runs)
            runs["data"] = runs["data"].fillna(data)
            frames.append(runs)
            summaries[folder] = pd.read_csv(HERE / folder / "table-1.csv")
    study = (pd.concat(frames).reindex(columns=COLUMNS) if frames
             else pd.DataFrame(columns=COLUMNS))
    # a (row, seed, dataset) run in two parts (BP, the baseline of sections 2 and 3): its first
    # line stays in study.csv; the rerun is compared with it
    again = study.duplicated(["id", "seed", "data"], keep="first")
    reruns, study = study[again], study[~again]
    study.to_csv(HERE / "study.csv", index=False, float_format="%.6g")
    blocks = {"commit": _commit_line(), "runs": _runs_line(study) + _reruns_line(study, reruns)}
    for folder, data, _ in PARTS:
        blocks[folder] = (_compact(summaries[folder], SECTION_DATA.get(data), cos_headers[folder])
                          if folder in summaries else "*(not run yet: see 'What is left')*\n")
    mnist = summaries.get("table1-mnist")
    blocks["table1-mnist"] = (_beside_paper(mnist, cos_headers["table1-mnist"])
                              if mnist is not None
                              else "*(not run yet: `bash docs/study/run.sh mnist DIR`)*\n")
    blocks["table1-mnist-s3"] = _beside_s3(mnist) if mnist is not None else ""
    blocks["table1-mnist-runs"] = _mnist_runs(study[study["data"] == "mnist"])
    storage = _storage(store)  # one Optuna storage and one planner for every block
    blocks["tuning"] = _tuning(storage)
    blocks["tuning-10ep"] = _tuning_10(storage)
    planner = _Planner(store)
    blocks["budget"] = _budget(planner, study)
    blocks["planner-check"] = _planner_check(planner)
    full = HERE / "budget-table1-full-size.txt"
    blocks["budget-full"] = ("```\n" + full.read_text() + "```\n" if full.exists()
                             else "*(not measured yet)*\n")
    _fill(HERE.parent / "study.md", blocks)
    _fill(ROOT / "README.md", {k: blocks[k] for k in ("table1-mnist", "table1-mnist-sample",
                                                      "fashion-ff",
                                                      "fashion-ff-tuned", "budget-full")})


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


def _reruns_line(study, reruns) -> str:
    """How the runs made again in a later part's store compare with their first line."""
    if reruns.empty:
        return ""
    first = study.set_index(["id", "seed", "data"])
    diffs = [abs(r.test_acc - first.loc[(r.id, r.seed, r.data), "test_acc"])
             for r in reruns.itertuples()]
    same = sum(d == 0 for d in diffs)
    rows = ", ".join(sorted(set(reruns["id"])))
    return (f"\nRun again in a later part's store ({rows}, {len(reruns)} runs): {same} of "
            f"{len(reruns)} give the same test accuracy to 4 decimals as their first run"
            + ("" if same == len(reruns) else f" (largest difference {max(diffs):.4f} pp)")
            + ".\n")


def _num(value, digits=2) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def _cos_header(runs) -> str:
    """The alignment column's name: a report made since `lcp report` reads each run's cosine as
    its median over the epochs writes `cos_to_gradient_last` beside it; an older report's
    column is the last epoch's cosine."""
    return ("Cos. to grad. (median over epochs)" if "cos_to_gradient_last" in runs
            else "Cos. to grad. (last epoch)")


def _compact(summary, dataset: str | None, cos_header: str) -> str:
    """The report's summary in the columns a reader needs first; `dataset` replaces "MNIST" in
    the manifest's section names (its rows are Table 1's MNIST rows run on another dataset);
    `cos_header` names the alignment column (`_cos_header`)."""
    margin = summary["margin"].iloc[0] if "margin" in summary and len(summary) else 1.0
    lines = [f"| Section | Method | n | Test acc. (%) | Verdict vs BP/RBP (±{margin:g} pp) | "
             f"Best acc. (%) | Health | {cos_header} | Wall time / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        if r.n == 0:
            continue
        acc = _num(r.test_acc_mean) + ("" if math.isnan(r.test_acc_std)
                                       else f" ± {_num(r.test_acc_std)}")
        verdict = "(baseline)" if r.is_baseline else (
            f"{r.verdict}" + ("" if math.isnan(r.verdict_p) else " (p < 0.001)"
                              if r.verdict_p < 0.001 else f" (p {r.verdict_p:.3f})"))
        section = r.section.replace("MNIST", dataset) if dataset else r.section
        lines.append(f"| {section} | {r.label} | {r.n} | {acc} | {verdict} | "
                     f"{_num(r.best_acc_mean)} | {r.health} | {_num(r.cos_to_gradient, 3)} | "
                     f"{_duration(r.wall_time_s)} |")
    return "\n".join(lines) + "\n"


def _verdict(word, p) -> str:
    if not isinstance(word, str) or not word:
        return "—"
    return word + ("" if math.isnan(p) else " (p < 0.001)" if p < 0.001 else f" (p {p:.3f})")


def _beside_paper(summary, cos_header: str) -> str:
    """Table 1 on MNIST: each row's seeds beside the paper's mean ± std, with the verdict
    against the paper and against its section's BP/RBP (both Welch TOST, ±margin pp)."""
    margin = summary["margin"].iloc[0] if len(summary) else 1.0
    lines = [f"| Section | Method | n | Test acc. (%) | Paper (%) | Verdict vs paper (±{margin:g} "
             f"pp) | Verdict vs BP/RBP (±{margin:g} pp) | Best acc. (%) | Health | "
             f"{cos_header} | Wall time / run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        acc = "—" if r.n == 0 else _num(r.test_acc_mean) + (
            "" if math.isnan(r.test_acc_std) else f" ± {_num(r.test_acc_std)}")
        paper = _num(r.paper) + ("" if math.isnan(r.paper_std) else f" ± {_num(r.paper_std)}")
        versus = "(baseline)" if r.is_baseline else _verdict(r.verdict, r.verdict_p)
        health = r.health if r.n else "*not run yet*"
        lines.append(f"| {r.section} | {r.label} | {r.n} | {acc} | {paper} | "
                     f"{_verdict(r.verdict_paper, r.verdict_paper_p)} | "
                     f"{versus if r.n else '—'} | {_num(r.best_acc_mean)} | {health} | "
                     f"{_num(r.cos_to_gradient, 3)} | {_duration(r.wall_time_s)} |")
    return "\n".join(lines) + "\n"


def _beside_s3(summary) -> str:
    """Train accuracy and NLL beside the paper's appendix (Table S3), rows that have run."""
    lines = ["| Section | Method | n | Train acc. (%) | Paper | Train NLL | Paper | Test NLL | "
             "Paper |", "|---|---|---|---|---|---|---|---|---|"]
    sci = lambda v: "—" if math.isnan(v) else f"{v:.1e}"  # train NLLs go down to 1e-5
    pm = lambda m, s, d: _num(m, d) + ("" if math.isnan(s) else f" ± {_num(s, d)}")
    pm_sci = lambda m, s: sci(m) + ("" if math.isnan(s) else f" ± {sci(s)}")
    for r in summary.itertuples():
        if r.n == 0 or math.isnan(r.paper_train_acc):
            continue
        lines.append(f"| {r.section} | {r.label} | {r.n} | {_num(r.train_acc_mean)} | "
                     f"{pm(r.paper_train_acc, r.paper_train_acc_std, 2)} | "
                     f"{sci(r.train_nll_mean)} | "
                     f"{pm_sci(r.paper_train_nll, r.paper_train_nll_std)} | "
                     f"{_num(r.test_nll_mean, 4)} | {pm(r.paper_test_nll, r.paper_test_nll_std, 4)} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else "*(no row has run yet)*\n"


def _mnist_runs(runs) -> str:
    """Which runs of section 0 exist, on which CPU, at which commit."""
    if runs.empty:
        return "No run yet.\n"
    out = []
    for (cpu, commit), group in runs.groupby(["cpu", "commit"], dropna=False):
        ids = ", ".join(f"{i} ({len(g)})" for i, g in group.groupby("id"))
        short = (commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")
                 if isinstance(commit, str) else "?")
        out.append(f"- {len(group)} run{'s' * (len(group) > 1)} on "
                   f"{cpu if isinstance(cpu, str) else 'an unrecorded CPU'}, commit `{short}`: "
                   f"{ids}")
    return "\n".join(out) + "\n"


def _duration(seconds: float) -> str:
    from pipeline.runs.budget import format_duration

    return "—" if math.isnan(seconds) else format_duration(seconds)


def _storage(store: Path):
    """The Optuna storage: the store's journal or, for a store made without it, the copy run.sh
    committed beside the study's plots; None when neither exists."""
    journal = store / "optuna-journal.log"
    if not journal.exists():
        journal = HERE / "tuning" / "optuna-journal.log"
    if not journal.exists():
        return None
    import optuna

    from pipeline.tuning.optuna_study import open_storage, resolve_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return open_storage(resolve_storage(str(journal), f"sqlite:///{store / 'mlflow.db'}"))


def _load(storage, name: str):
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage) if storage else None
    except KeyError:
        return None


def _tuning(storage) -> str:
    """The 5-epoch study: its counts, best trial and trials; the paper's setting beside it."""
    study = _load(storage, STUDY_NAME)
    if study is None:
        return "*(not run yet: see 'What is left')*\n"
    text = _study_text(study)
    paper = _load(storage, PAPER_STUDY_NAME)  # the paper's setting over all epochs, not pruned
    if paper is None:
        return text
    return (text + f"\nThe row's own setting scored by the same objective over all its epochs "
            f"(study `{PAPER_STUDY_NAME}`, one trial, not pruned):\n\n" + _trials_table(paper))


def _tuning_10(storage) -> str:
    """The 10-epoch study of run.sh's tune10 step."""
    study = _load(storage, STUDY_10_NAME)
    if study is None:
        return "*(not run yet: `bash docs/study/run.sh tune10`)*\n"
    return _study_text(study)


def _study_text(study) -> str:
    from pipeline.tuning.optuna_study import tally

    name = study.study_name
    counts = tally(study.get_trials(deepcopy=False))
    lines = [f"Study `{name}`: {counts['complete']} complete, {counts['pruned']} pruned "
             f"({counts['diverged']} diverged), {counts['failed']} failed"
             + (f", {counts['running']} running" if counts["running"] else "")
             + (f", {counts['interrupted']} interrupted" if counts["interrupted"] else "")
             + " trials."]
    try:
        best = study.best_trial
    except ValueError:
        return lines[0] + " No complete trial.\n\n" + _trials_table(study)
    params = ", ".join(f"{k} = {v:.4g}" for k, v in best.params.items())
    lines.append(f"Best: trial {best.number}, validation accuracy {100 * best.value:.2f} % "
                 f"({params}).")
    complete = [t.value for t in study.trials if t.state.name == "COMPLETE"]
    lines.append(f"The {len(complete)} complete trials span "
                 f"{100 * (max(complete) - min(complete)):.2f} pp "
                 f"({100 * min(complete):.2f}–{100 * max(complete):.2f} %).")
    return " ".join(lines) + "\n\n" + _trials_table(study)


def _trials_table(study) -> str:
    """One line per trial: its parameters, how it ended, its validation accuracy per epoch."""
    names = list(study.trials[0].params) if study.trials else []
    epochs = max((max(t.intermediate_values, default=0) for t in study.trials), default=0)
    lines = ["| Trial | " + " | ".join(names) + " | State | "
             + " | ".join(f"Val. acc. ep. {e} (%)" for e in range(1, epochs + 1)) + " | Time |",
             "|---" * (len(names) + epochs + 3) + "|"]
    for t in sorted(study.trials, key=lambda t: t.number):
        took = (t.datetime_complete - t.datetime_start).total_seconds() \
            if t.datetime_complete and t.datetime_start else float("nan")
        accs = [_num(100 * t.intermediate_values[e]) if e in t.intermediate_values else ""
                for e in range(1, epochs + 1)]
        mark = " (the row's own setting, `--baseline`)" if t.user_attrs.get("lcp.baseline") else ""
        lines.append(f"| {t.number}{mark} | " + " | ".join(f"{t.params[n]:.3g}" for n in names)
                     + f" | {t.state.name.lower()} | " + " | ".join(accs)
                     + f" | {_duration(took)} |")
    return "\n".join(lines) + "\n"


def _budget(planner: "_Planner", study) -> str:
    """The planner's first-epoch training time (steps × measured step) beside each study run's
    measured `epoch_time` of epoch 1, from the cache run.sh's `lcp budget` calls filled."""
    import pandas as pd

    if study.empty:
        return "*(no run yet)*\n"
    # A run this store does not hold (a part made from an earlier store, whose report files
    # are committed): its line of the budget.csv made then, as it is (the estimate and the
    # measured first epoch from the machine that made that store; a planner's estimate is only
    # comparable with runs on its own machine).
    earlier = ({(r["id"], int(r["seed"]), r["data"]): r
                for r in pd.read_csv(HERE / "budget.csv").to_dict("records")}
               if (HERE / "budget.csv").exists() else {})
    rows = []
    for r in study.itertuples():
        row = planner.first_epoch(r.run_id, r.id, r.seed, r.data, r.wall_time_s)
        if row is None and (r.id, int(r.seed), r.data) in earlier:
            row = {"machine": "earlier session (not recorded)",
                   **earlier[(r.id, int(r.seed), r.data)]}
        if row is not None:
            rows.append(row)
    if not rows:
        return "*(no cached measurement matches a run yet)*\n"
    return _check_table(pd.DataFrame(rows), HERE / "budget.csv")


def _planner_check(planner: "_Planner") -> str:
    """The planner beside the one-epoch runs of run.sh's planner-check step (the study's
    configurations, one epoch each, on a quiet machine); the committed CSV where this store
    has none."""
    import pandas as pd

    out = HERE / "planner-check.csv"
    rows = []
    if planner.tracker is not None:
        exp = planner.tracker.get_experiment_id("lcp-table-1")
        for run in planner.tracker.search_runs([exp] if exp else [],
                                               "attributes.status = 'FINISHED' and "
                                               "params.num_epochs = '1'"):
            tags, params = run.data.tags, run.data.params
            row = planner.first_epoch(run.info.run_id, tags.get("id"), int(params["seed"]),
                                      params["data"], run.data.metrics.get("wall_time_s"))
            if row is not None:
                rows.append(row)
    # the committed lines this store does not hold (checks made from other stores: the
    # sample's and Fashion-MNIST's, MNIST's) stay beside this store's
    key = ["machine", "id", "seed", "data"]
    committed = pd.read_csv(out) if out.exists() else pd.DataFrame(columns=key)
    table = pd.DataFrame(rows)
    if rows:
        held = set(map(tuple, table[key].astype(str).values))
        committed = committed[[tuple(r) not in held
                               for r in committed[key].astype(str).values]]
    parts = [t for t in (committed, table) if not t.empty]
    table = pd.concat(parts, ignore_index=True) if parts else table
    if table.empty:
        return "*(not run yet: `bash docs/study/run.sh planner-check`)*\n"
    return _check_table(table.sort_values(["machine", "data", "id", "seed"], kind="stable"),
                        out if rows else None)


class _Planner:
    """The planner's cached measurements on this machine, and the store's runs."""

    def __init__(self, store: Path):
        from pipeline.runs import budget
        from pipeline.tracking.store import Tracker

        self.machine = budget.machine_key(1)
        self.known = budget.read_cache(budget.cache_path()).get(self.machine, {})
        db = store / "mlflow.db"
        self.tracker = (Tracker(f"sqlite:///{db}", create=False)
                        if self.known and db.exists() else None)
        self.sizes: dict[str, int] = {}

    def first_epoch(self, run_id: str, row_id: str, seed: int, data: str, wall_time_s):
        """The run's first epoch as measured and as the planner estimates it; None when the
        store does not hold the run or the planner has not measured its configuration."""
        from lcp.data import build_loaders
        from pipeline.runs import budget

        cfg = _stored_config(self.tracker, run_id) if self.tracker is not None else None
        if cfg is None:
            return None
        entry = self.known.get(budget.measure_key(cfg), {})
        if entry.get("version") != budget.MEASURE_VERSION:
            return None  # not measured yet, or by an older method of the planner
        first = [m.value for m in self.tracker.metric_history(run_id, "epoch_time")
                 if m.step == 1]
        if not first:
            return None
        if cfg.data not in self.sizes:
            self.sizes[cfg.data] = len(build_loaders(cfg)[0])
        est = self.sizes[cfg.data] * entry["step_s"]
        return {"machine": self.machine.split(" | ")[0], "id": row_id, "seed": seed,
                "data": data, "estimate_s": est, "measured_s": first[0],
                "ratio": first[0] / est, "wall_time_s": wall_time_s}


def _check_table(table, csv_path: Path | None) -> str:
    """Per machine, how many first epochs are within ±35 % of the estimate; per row, the
    estimate beside the measured mean and the ratios' range."""
    if csv_path is not None:
        table.to_csv(csv_path, index=False, float_format="%.3f")
    lines = []
    for where, part in table.groupby("machine", sort=False):
        ok = (abs(part["ratio"] - 1) <= 0.35)
        lines.append(f"- {where}: {int(ok.sum())} of {len(part)} runs' first epochs within "
                     f"±35 % of the planner's estimate (measured ÷ estimate: median "
                     f"{part['ratio'].median():.2f}, range {part['ratio'].min():.2f}–"
                     f"{part['ratio'].max():.2f}).")
    lines += ["", "| Machine | Run | Data | Estimate, epoch 1 | Measured, epoch 1 | "
              "Measured ÷ estimate |", "|---|---|---|---|---|---|"]
    for r in table.groupby(["machine", "id", "data"], sort=False).agg(
            est=("estimate_s", "mean"), lo=("ratio", "min"), hi=("ratio", "max"),
            m=("measured_s", "mean"), n=("seed", "count")).reset_index().itertuples():
        lines.append(f"| {r.machine} | {r.id} ({r.n} seeds) | {r.data} | {r.est:.1f} s | "
                     f"{r.m:.1f} s (mean) | {r.lo:.2f}–{r.hi:.2f} |")
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


def _param(value: str):
    return None if value == "None" else value


def fill_speed_block(argv: list[str], script: str, marker: str, make_text) -> int:
    """The command line of a check that fills one generated block of docs/speed.md from a
    study store (`python docs/study/SCRIPT STORE`, STORE the folder run.sh used): the block's
    text, `make_text(store)`, written into docs/speed.md and printed."""
    if len(argv) != 1:
        print(f"usage: python docs/study/{script} STORE", file=sys.stderr)
        return 2
    text = make_text(Path(argv[0]).resolve())
    _fill(ROOT / "docs" / "speed.md", {marker: text})
    print(text, end="")
    return 0


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
