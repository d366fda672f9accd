"""`lcp report`'s verdict per row (equivalence within a margin by TOST, or a significant
difference) on constructed seed values whose verdict is known, and a run's health (best epoch,
collapse, the controller's slowdown, solves at max_iter) on constructed histories."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from pipeline.reporting.health import COLLAPSE_PP, records_from_histories, run_health
from pipeline.reporting.report import verdict

sys.path.insert(0, str(Path(__file__).parent))  # pipeline_testing

BP = [97.80, 97.90, 98.00]


# ---------------------------------------------------------------------- verdicts


def test_close_seeds_with_little_spread_match():
    word, p = verdict([97.85, 97.95, 98.05], BP, margin=1.0)
    assert word == "matches" and p < 0.05


def test_a_clear_drop_is_below_and_a_clear_gain_above():
    word, p = verdict([95.0, 95.1, 94.9], BP, margin=1.0)
    assert word == "below" and p < 0.05
    word, p = verdict([99.9, 99.95, 99.85], [97.0, 97.1, 96.9], margin=1.0)
    assert word == "above" and p < 0.05


def test_a_small_difference_with_a_wide_spread_is_inconclusive():
    # mean 97.9 as BP's, but seeds so spread that ±1 pp cannot be shown, nor any difference
    word, p = verdict([95.0, 97.9, 100.8], BP, margin=1.0)
    assert word == "inconclusive" and p >= 0.05


def test_a_difference_inside_the_margin_matches_even_when_it_is_significant():
    # 0.5 pp below with a tiny spread: different from BP, but within ±1 pp
    word, _ = verdict([97.40, 97.41, 97.39], [97.90, 97.91, 97.89], margin=1.0)
    assert word == "matches"
    # the same numbers with a margin of 0.2 pp are below
    word, _ = verdict([97.40, 97.41, 97.39], [97.90, 97.91, 97.89], margin=0.2)
    assert word == "below"


def test_one_seed_is_inconclusive():
    assert verdict([97.9], BP)[0] == "inconclusive"
    assert verdict([97.9, 97.95], [97.9])[0] == "inconclusive"
    assert math.isnan(verdict([97.9], BP)[1])


def test_against_the_paper_value_one_sample():
    assert verdict([97.85, 97.95, 98.05], 97.9, margin=1.0)[0] == "matches"
    assert verdict([90.0, 90.2, 90.1], 97.9, margin=1.0)[0] == "below"


def test_identical_deterministic_seeds_are_judged_by_the_difference():
    assert verdict([97.0, 97.0, 97.0], [97.5, 97.5, 97.5], margin=1.0) == ("matches", 0.0)
    assert verdict([95.0, 95.0, 95.0], [97.5, 97.5, 97.5], margin=1.0) == ("below", 0.0)


# ---------------------------------------------------------------------- health


def _history(test_accs, iters=None, hits=None, steps=100):
    out = []
    for i, acc in enumerate(test_accs):
        record = {"epoch": i + 1, "eval_test/accuracy": acc, "epoch_time": 10.0,
                  "steps_per_s": steps / 10.0}
        if iters is not None:
            record["controlled/iterations_mean"] = iters[i]
        if hits is not None:
            record["controlled/hit_max_iter_count"] = hits[i]
        out.append(record)
    return out


def test_a_run_that_peaks_and_falls_is_collapsed():
    health = run_health(_history([0.80, 0.85, 0.84, 0.50, 0.45]))
    assert health.best_epoch == 2 and health.best_acc == pytest.approx(85.0)
    assert health.last_acc == pytest.approx(45.0)
    assert health.collapsed and health.flags == ["collapsed"]
    assert health.tags()["health"] == "collapsed"
    assert health.metrics()["health/best_test_accuracy"] == pytest.approx(0.85)


def test_a_run_that_ends_near_its_best_is_not_collapsed():
    below = (COLLAPSE_PP - 1) / 100
    health = run_health(_history([0.80, 0.90, 0.90 - below]))
    assert not health.collapsed and health.tags()["health"] == "ok"


def test_the_controller_slowdown_and_the_max_iter_share():
    health = run_health(_history([0.8, 0.8, 0.8], iters=[100, 200, 300], hits=[0, 50, 100]))
    assert health.iter_growth == pytest.approx(3.0)
    assert health.max_iter_share == pytest.approx(150 / 300)
    assert "max_iter" in health.flags


def test_histories_from_the_store_regroup_by_epoch():
    records = records_from_histories({"eval_test/accuracy": [(1, 0.9), (2, 0.5)],
                                      "epoch_time": [(1, 1.0), (2, 1.0)],
                                      "steps_per_s": [(1, 10.0), (2, 10.0)],
                                      "controlled/hit_max_iter_count": [(1, 10), (2, 0)]})
    assert [r["epoch"] for r in records] == [1, 2]
    health = run_health(records)
    assert health.collapsed and health.max_iter_share == pytest.approx(10 / 20)


def test_a_run_never_evaluated_has_no_best():
    health = run_health([{"epoch": 1, "train/loss": 1.0}])
    assert health.best_epoch is None and math.isnan(health.best_acc) and not health.collapsed
    assert "health/best_test_accuracy" not in health.metrics()


def test_skipped_steps_show_in_the_health_the_report_and_the_list():
    import pandas as pd

    from pipeline.reporting.report import health_text
    from pipeline.runs.table import state
    from pipeline.runs.table_run import RunPlan

    history = _history([0.8, 0.8, 0.8])
    history[1]["skipped_steps"] = 2
    health = run_health(history)
    assert health.skipped_steps == 2 and health.flags == ["skipped"]
    assert health.metrics()["health/skipped_steps"] == 2.0
    assert run_health(_history([0.8])).tags()["health"] == "ok"
    seeds = pd.DataFrame({"collapsed": [False] * 3, "max_iter_share": [0.0] * 3,
                          "iter_growth": [1.0] * 3, "skipped_steps": [2, 0, 1]})
    assert health_text(seeds, ["finished"] * 3) == "3 steps skipped (2/3 seeds)"
    plan = RunPlan(item=None, action="skip", result={"health/skipped_steps": 3.0})
    assert state(plan) == "done(3 skipped)"
    assert state(RunPlan(item=None, action="skip", result={})) == "done"


def test_the_alignment_column_reads_a_run_over_its_epochs_not_its_last():
    from types import SimpleNamespace

    from pipeline.reporting.report import _median_over_epochs

    def history(*values):
        return [SimpleNamespace(step=i + 1, value=v) for i, v in enumerate(values)]

    # a run whose probe batch is fit by the last epoch: that epoch's cosine is noise
    assert _median_over_epochs(history(0.81, 0.74, 0.78, 0.75, 0.05)) == 0.75
    assert _median_over_epochs(history(0.6, 0.9)) == pytest.approx(0.75)
    # an epoch the probe could not measure (NaN, align/unmeasured) is left out, not counted
    assert _median_over_epochs(history(0.9, math.nan, 0.7, 0.8)) == pytest.approx(0.8)
    assert math.isnan(_median_over_epochs(history(math.nan))) and math.isnan(
        _median_over_epochs([]))


def test_a_runs_skipped_steps_are_tagged_with_where_and_why():
    from types import SimpleNamespace

    from pipeline.worker import skipped_tags

    state = SimpleNamespace(skipped=[{"epoch": 5, "step": 4321, "reason": "the dynamics "
                                      "diverged in phase 'adjoint'"}])
    assert skipped_tags(state) == {
        "skipped_steps": "epoch 5 step 4321: the dynamics diverged in phase 'adjoint'"}
    assert skipped_tags(SimpleNamespace(skipped=[])) == {} and skipped_tags(None) == {}
    many = SimpleNamespace(skipped=[{"epoch": 1, "step": i, "reason": "x" * 100}
                                    for i in range(100)])
    assert len(skipped_tags(many)["skipped_steps"]) <= 4000


# ---------------------------------------------------------------------- against the paper


@pytest.mark.parametrize("ours,theirs", [
    ([98.2, 98.3, 98.4], [98.1, 98.3, 98.5]),  # matches
    ([96.0, 96.1, 95.9], [98.1, 98.3, 98.5]),  # below
    ([98.0, 98.6, 97.2], [98.1, 98.3, 98.5]),  # inconclusive
])
def test_a_published_mean_and_std_is_judged_as_the_sample_it_summarises(ours, theirs):
    """Welch's TOST from the paper's mean, std and n equals the test on the seeds themselves:
    the paper's mean is a sample mean, not an exact value."""
    import numpy as np
    from scipy import stats

    from pipeline.reporting.report import Published

    b = np.asarray(theirs)
    published = Published(float(b.mean()), float(b.std(ddof=1)), len(b))
    assert verdict(ours, published) == pytest.approx(verdict(ours, theirs))
    word, p = verdict(ours, published)
    if word == "below":  # the difference's p is Welch's, from summary statistics
        a = np.asarray(ours)
        want = stats.ttest_ind_from_stats(a.mean(), a.std(ddof=1), 3, b.mean(),
                                          b.std(ddof=1), 3, equal_var=False).pvalue
        assert p == pytest.approx(want)


def test_the_papers_spread_makes_a_close_result_harder_to_call_a_match():
    """The same seeds against the same mean: exact (one-sample) they match; with the paper's
    std of its 3 seeds they cannot be told apart from a 1 pp difference (inconclusive)."""
    from pipeline.reporting.report import Published

    ours = [97.60, 97.70, 97.80]
    assert verdict(ours, 97.9)[0] == "matches"
    assert verdict(ours, Published(97.9, 0.6, 3))[0] == "inconclusive"


def test_every_paper_row_carries_the_papers_numbers():
    from pipeline.manifest.manifest import load_manifest

    manifest = load_manifest("experiments.yaml")
    rows = manifest.table(1) + manifest.table(2)
    assert len(rows) == 15 and all(r.paper is not None and r.paper.n == 3 for r in rows)
    by_id = {r.id: r.paper for r in rows}
    assert (by_id["t1-ff-bp"].test_acc.mean, by_id["t1-ff-bp"].test_acc.std) == (98.29, 0.14)
    assert by_id["t2-conv-rnn-lcp-di"].test_acc.mean == 80.26
    # the appendix's train accuracy and NLL for every Table 1 row and the DEQ rows of Table 2
    with_train = {r.id for r in rows if r.paper.train_acc is not None}
    assert with_train == {r.id for r in manifest.table(1)} | {"t2-conv-rnn-rbp",
                                                              "t2-conv-rnn-lcp-di"}
    assert all(by_id[i].train_nll is not None and by_id[i].test_nll is not None
               for i in with_train)
    assert all(r.paper.source.startswith("arXiv 2207.01332v2") for r in rows)


@pytest.mark.parametrize("value,match", [
    ({"test_acc": [98.0, 0.1]}, r"required key 'n'"),
    ({"n": 3, "test_acc": [98.0]}, r"\[mean, std\]"),
    ({"n": 3, "test_acc": [98.0, -0.1]}, r"std ≥ 0"),
    ({"n": 1, "test_acc": [98.0, 0.1]}, r"integer ≥ 2"),
    ({"n": 3, "test_acc": [980.0, 0.1]}, r"0 to 100"),
    ({"n": 3, "test_acc": [98.0, 0.1], "tests": 1}, r"unknown key 'tests'"),
])
def test_a_bad_paper_result_is_one_clear_error(tmp_path, value, match):
    import yaml

    from pipeline.manifest.manifest import ManifestError, load_manifest
    from pipeline_testing import write_manifest

    path = write_manifest(tmp_path / "m.yaml")
    doc = yaml.safe_load(path.read_text())
    doc["experiments"][0]["paper"] = value
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ManifestError, match=r"paper.*" + match):
        load_manifest(path)
