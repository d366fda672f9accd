"""Watching a run changes nothing; the paper's --eval_epochs keeps the paper's meaning.

The pipeline evaluates the test set after every epoch to draw curves and judge a run's health
(`watch_epochs`). That evaluation must leave the run bit-identical to an unwatched one. The
paper's own `eval_epochs` is different: making an evaluation loader's iterator draws from the
global generator, so every later shuffle moves; a run with the paper's flags must move with it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lcp.callbacks import Callback
from lcp.config import RunConfig
from lcp.training import fit


def config(data_dir, **changes) -> RunConfig:
    values = dict(model="ff", trainer="bp", data_dir=str(data_dir), seed=0, num_epochs=3,
                  limit_train_batches=4, limit_eval_batches=2, eval_epochs=0, batch_size=16,
                  rnn_hidden_units=16, alpha=0.1, solver_max_iter=40, device="cpu")
    values.update(changes)
    return RunConfig.from_dict(values)


class Final(Callback):
    """The whole state a later step could depend on, at the end of the run."""

    def on_fit_end(self, state, result):
        self.model = copy.deepcopy(state.model.state_dict())
        self.trainer = copy.deepcopy(state.trainer.state_dict())
        self.optimizer = copy.deepcopy(state.optimizer.state_dict()["state"])
        self.rng = torch.get_rng_state()


def run(cfg):
    final = Final()
    result = fit(cfg, [final])
    return final, result


def same_state(a: Final, b: Final) -> bool:
    tensors = all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                  for x, y in ((a.model, b.model), (a.trainer, b.trainer)))
    optimizer = all(torch.equal(a.optimizer[i][k], b.optimizer[i][k])
                    for i in a.optimizer for k in a.optimizer[i])
    return tensors and optimizer and torch.equal(a.rng, b.rng)


@pytest.mark.parametrize("model,trainer", [("ff", "bp"), ("rnn", "rbp"), ("ff", "lcp-di"),
                                           ("rnn", "lcp-kp")])
def test_a_watched_run_trains_bit_identically_to_an_unwatched_one(model, trainer, mnist_dir):
    off, r_off = run(config(mnist_dir, model=model, trainer=trainer, watch_epochs=0))
    on, r_on = run(config(mnist_dir, model=model, trainer=trainer, watch_epochs=1))
    assert same_state(off, on)
    assert r_off.final == r_on.final
    assert all("eval_test/accuracy" not in record for record in r_off.history)
    assert [r["epoch"] for r in r_on.history if "eval_test/accuracy" in r] == [1, 2, 3]


def test_watching_puts_back_the_batch_norm_statistics_an_evaluation_moves(cifar_dir):
    """The paper evaluates in training mode, so an evaluation updates the conv-rnn's running
    statistics; watching must not."""
    cfg = config(cifar_dir, data="cifar10", model="conv-rnn", trainer="rbp", num_epochs=2,
                 limit_train_batches=2, limit_eval_batches=1, batch_size=8, solver_max_iter=8)
    off, r_off = run(cfg)
    on, r_on = run(cfg.replace(watch_epochs=1))
    assert any(k.endswith("running_mean") for k in on.model)
    assert same_state(off, on)
    assert r_off.final == r_on.final


def test_the_papers_eval_epochs_moves_every_later_shuffle_as_in_the_papers_code(mnist_dir):
    """--eval_epochs 1 (the paper's flag) perturbs the run from epoch 2 on, as the paper's
    script does; its evaluation after epoch 1 (before any perturbation) is the watched one."""
    watched, r_watched = run(config(mnist_dir, watch_epochs=1))
    paper, r_paper = run(config(mnist_dir, eval_epochs=1))
    first = {k: v for k, v in r_paper.history[0].items() if k.startswith("eval_")}
    assert first and all(r_watched.history[0][k] == v for k, v in first.items())
    assert not same_state(watched, paper)
    # with both set, an epoch the paper's flag evaluates is evaluated once, the paper's way
    both, r_both = run(config(mnist_dir, eval_epochs=1, watch_epochs=1))
    assert same_state(both, paper) and r_both.final == r_paper.final


def test_watching_counts_in_the_planned_evaluations():
    cfg = RunConfig(model="ff", trainer="bp", num_epochs=30, eval_epochs=5, watch_epochs=1)
    kinds = [cfg.evaluation_after(e) for e in range(1, 31)]
    assert kinds.count("paper") == 6 and kinds.count("watch") == 24
    assert RunConfig(model="ff", trainer="bp").evaluation_after(3) is None
