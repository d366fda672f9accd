"""Every chart of the pipeline (matplotlib, written as PNG files): a run's learning curves (an
artifact of every run), a table report's accuracy bars, learning and alignment curves (from its
`Collected`: rows, runs, curves), and a tuning study's
optimisation history and parameter importances (with its trials.csv)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

from lcp.errors import first_line

ALIGN_KEY = "align/cos_to_gradient"  # the cosine of an LCP update to the exact gradient


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ====================================================================== one run


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_run_curves(history: list[Mapping[str, float]], path: str | Path, title: str = "") -> None:
    """Loss and accuracy per epoch of one run (an artifact of every run)."""
    plt = _plt()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(history)]
    for key, ax, style in (("train/loss", ax_loss, "-"), ("eval_test/loss", ax_loss, "--"),
                           ("train/accuracy", ax_acc, "-"), ("eval_test/accuracy", ax_acc, "--")):
        points = [(e, r[key]) for e, r in zip(epochs, history) if key in r]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, style, marker="o", markersize=3, label=key)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        _epoch_axis(ax, name)
    _save_figure(fig, path, title)


def _epoch_axis(ax, ylabel: str) -> bool:
    """Integer epochs on x, `ylabel`, a grid and the legend; False when nothing was plotted."""
    _integer_ticks(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not ax.get_legend_handles_labels()[0]:
        return False
    ax.legend(fontsize=8)
    return True


def _save_figure(fig, path, title) -> None:
    plt = _plt()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ====================================================================== a table report


def bar_chart(summary, path: str | Path, title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(summary) + 2), 4))
    sections = list(dict.fromkeys(summary["section"]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xs, labels = [], []
    x = 0.0
    for s_index, section in enumerate(sections):
        part = summary[summary["section"] == section]
        for r in part.itertuples():
            height = 0.0 if math.isnan(r.test_acc_mean) else r.test_acc_mean
            err = 0.0 if math.isnan(r.test_acc_std) else r.test_acc_std
            ax.bar(x, height, yerr=err, capsize=4, color=colors[s_index % len(colors)],
                   label=section if r.Index == part.index[0] else None)
            if math.isnan(r.test_acc_mean):
                ax.text(x, 1, "no runs", ha="center", va="bottom", rotation=90, fontsize=8)
            else:  # the verdict against the section's baseline, and any health flag
                word = "baseline" if r.is_baseline else (getattr(r, "verdict", "") or "")
                if getattr(r, "collapsed", 0):
                    word += f"\n{r.collapsed} collapsed"
                ax.text(x, height + err + 0.2, word, ha="center", va="bottom", fontsize=7)
            xs.append(x)
            labels.append(r.label)
            x += 1
        x += 0.6
    finite = summary["test_acc_mean"].dropna()
    if len(finite):
        low = max(0.0, float((finite - summary["test_acc_std"].fillna(0)).min()) - 5)
        high = float((finite + summary["test_acc_std"].fillna(0)).max()) + 4
        ax.set_ylim(low, min(100.0, high))
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save_figure(fig, path, title)


def _mean_curve(collected, row_id: str, key: str, scale: float = 1.0):
    """(epochs, mean over the row's seeds) of metric `key`, or None when no run has it."""
    runs = collected.runs
    per_epoch: dict[int, list[float]] = {}
    for run_id in runs[runs["id"] == row_id]["run_id"]:
        for step, value in collected.curves.get(run_id, {}).get(key, []):
            per_epoch.setdefault(step, []).append(scale * value)
    if not per_epoch:
        return None
    steps = sorted(per_epoch)
    return steps, [sum(per_epoch[s]) / len(per_epoch[s]) for s in steps]


def _section_panels(collected, path, title: str, ylabel: str, curves) -> None:
    """One panel per section; `curves(exp)` gives [(key, scale, style, label)] per row."""
    plt = _plt()
    sections = list(dict.fromkeys(r.section for r in collected.rows))
    fig, axes = plt.subplots(1, len(sections), figsize=(5 * len(sections), 3.8), squeeze=False)
    for ax, section in zip(axes[0], sections):
        for n, exp in enumerate(r for r in collected.rows if r.section == section):
            for key, scale, style, label in curves(exp):
                curve = _mean_curve(collected, exp.id, key, scale)
                if curve is not None:
                    ax.plot(*curve, style, color=f"C{n % 10}", marker="o", markersize=3,
                            label=label)
        ax.set_title(section)
        if not _epoch_axis(ax, ylabel):
            ax.text(0.5, 0.5, "no finished runs", ha="center", transform=ax.transAxes)
    _save_figure(fig, path, title)


def learning_curves(collected, path: str | Path, title: str = "") -> None:
    """Per section: test accuracy per epoch, mean over seeds (train accuracy dashed)."""
    _section_panels(collected, path, title, "accuracy (%) — test solid, train dashed",
                    lambda exp: [("eval_test/accuracy", 100, "-", exp.label),
                                 ("train/accuracy", 100, "--", None)])


def alignment_curves(collected, path: str | Path, title: str = "") -> None:
    """Per section: the cosine of each LCP row's update to the exact gradient per epoch."""
    _section_panels(collected, path, title, "cosine of the update to the BP/RBP gradient",
                    lambda exp: [(ALIGN_KEY, 1, "-", exp.label)])


# ====================================================================== a tuning study


def write_study_files(study, folder: Path, notes: list[str]) -> list[Path]:
    """optimization_history.png, param_importances.png (≥ 2 complete trials) and trials.csv."""
    out: list[Path] = []
    folder.mkdir(parents=True, exist_ok=True)
    try:
        path = folder / "trials.csv"
        study.trials_dataframe().to_csv(path, index=False)
        out.append(path)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"trials.csv not written: {first_line(exc)}")
    try:
        path = folder / "optimization_history.png"
        plot_history(study, path)
        out.append(path)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"optimisation history not plotted: {first_line(exc)}")
    path = folder / "param_importances.png"
    done = importance_plot(study, path, notes)
    if done:
        out.append(path)
    return out


def plot_history(study, path: Path) -> None:
    from optuna.trial import TrialState

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED and t.intermediate_values]
    if complete:
        ax.scatter([t.number for t in complete], [t.value for t in complete], s=18,
                   label="complete (final validation accuracy)", color="tab:blue", zorder=3)
        best, xs, ys = -math.inf, [], []
        for t in sorted(complete, key=lambda t: t.number):
            best = max(best, t.value)
            xs.append(t.number)
            ys.append(best)
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    if pruned:
        ax.scatter([t.number for t in pruned],
                   [t.intermediate_values[max(t.intermediate_values)] for t in pruned], s=18,
                   marker="x", color="tab:gray", label="pruned (last reported)")
    failed = [t for t in study.trials if t.state == TrialState.FAIL or (
        t.state == TrialState.PRUNED and not t.intermediate_values)]
    if failed:
        ax.scatter([t.number for t in failed], [0.0] * len(failed), marker="v", s=18,
                   color="tab:orange", label="failed / diverged")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    if complete or pruned or failed:
        ax.legend(fontsize=8, loc="lower right")
    _save_figure(fig, path, f"Optimisation history: study {study.study_name}")


def importance_plot(study, path: Path, notes: list[str]) -> bool:
    from optuna.trial import TrialState

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if len(complete) < 2:
        notes.append(f"parameter importances skipped: they need ≥ 2 complete trials "
                     f"(the study has {len(complete)})")
        return False
    try:
        import warnings

        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "importances will be equal" on ties
            importances = optuna.importance.get_param_importances(study)
    except Exception as exc:  # noqa: BLE001 - e.g. every trial with the same value
        notes.append(f"parameter importances skipped: {first_line(exc)}")
        return False
    if not importances:
        notes.append("parameter importances skipped: no parameter varies")
        return False
    plt = _plt()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance for validation accuracy")
    _save_figure(fig, path, f"Parameter importances: study {study.study_name} "
                 f"({len(complete)} complete)")
    return True
