"""The alignment probe (lcp.alignment): its numbers, and that it leaves a run untouched."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lcp.alignment import AlignmentProbe
from lcp.callbacks import Callback
from lcp.config import RunConfig
from lcp.data import build_loaders
from lcp.errors import DivergenceError
from lcp.models import build_model
from lcp.trainers import build_trainer
from lcp.training import fit


def config(mnist_dir, **changes) -> RunConfig:
    values = dict(model="ff", trainer="lcp-di", data_dir=str(mnist_dir), seed=0, num_epochs=2,
                  limit_train_batches=3, limit_eval_batches=1, eval_epochs=1, batch_size=16,
                  rnn_hidden_units=16, alpha=0.1, solver_max_iter=60, device="cpu")
    values.update(changes)
    return RunConfig.from_dict(values)


class Final(Callback):
    """Everything a later step could depend on, at the end of the run."""

    def __init__(self):
        self.step_keys: dict[int, list[str]] = {}

    def on_step_end(self, state, stats):
        self.step_keys[state.global_step] = sorted(k for k in stats if k.startswith("align"))

    def on_fit_end(self, state, result):
        self.model = copy.deepcopy(state.model.state_dict())
        self.trainer = copy.deepcopy(state.trainer.state_dict())
        self.optimizer = copy.deepcopy(state.optimizer.state_dict()["state"])
        self.rng = torch.get_rng_state()


@pytest.mark.parametrize("trainer,model", [("lcp-di", "ff"), ("lcp-kp", "ff"), ("lcp-lf", "ff"),
                                           ("lcp-ebd", "ff"), ("lcp-di", "rnn")])
def test_the_probe_leaves_the_trajectory_bit_identical(trainer, model, mnist_dir):
    runs = {}
    for align in (False, True):
        final = Final()
        result = fit(config(mnist_dir, trainer=trainer, model=model, align=align,
                            align_every=2), [final])
        runs[align] = (final, result)
    (off, r_off), (on, r_on) = runs[False], runs[True]
    for name in ("model", "trainer"):
        a, b = getattr(off, name), getattr(on, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert all(torch.equal(off.optimizer[i][k], on.optimizer[i][k])
               for i in off.optimizer for k in off.optimizer[i])
    assert torch.equal(off.rng, on.rng)
    assert r_off.final == r_on.final
    assert not any(k.startswith("align") for record in r_off.history for k in record)
    for record in r_on.history:
        assert -1 <= record["align/cos_to_gradient"] <= 1 and record["align/norm_ratio"] > 0
        assert record["align/u_norm"] > 0 and "align/loss_gap" in record
    # every 2nd optimizer step also measured, for callbacks (not in the epoch records)
    assert {s for s, keys in on.step_keys.items() if keys} == {2, 4, 6}
    assert "align_step/cos_to_gradient" in on.step_keys[2]


@pytest.mark.parametrize("model", ["ff", "rnn"])
def test_the_probe_measures_the_cosine_to_the_exact_gradient(model, mnist_dir):
    cfg = config(mnist_dir, model=model, alpha=1.0, solver_max_iter=400,
                 solver_error_threshold=1e-8)
    torch.manual_seed(0)
    train, _, shape, classes = build_loaders(cfg, download=False)
    net = build_model(cfg, shape, classes)
    probe = AlignmentProbe.for_run(cfg, net, build_trainer(cfg, net), train, "cpu")
    measured = probe.measure()

    def update(trainer_name):  # directly, on a copy of the model
        copy_ = copy.deepcopy(net)
        build_trainer(cfg.replace(trainer=trainer_name), copy_).compute_update(
            train.x[:cfg.batch_size], train.y[:cfg.batch_size])
        return torch.cat([p.grad.reshape(-1) for p in copy_.parameters()]).double()

    lcp, exact = update("lcp-di"), update({"ff": "bp", "rnn": "rbp"}[model])
    cos = torch.nn.functional.cosine_similarity(lcp, exact, dim=0).item()
    assert measured["align/cos_to_gradient"] == pytest.approx(cos, abs=1e-6)
    assert measured["align/norm_ratio"] == pytest.approx((lcp.norm() / exact.norm()).item(),
                                                         rel=1e-6)
    # at alpha = 1 the least-control update is parallel to the gradient with the same norm
    # (tests/trainers check it to 0.999 in float64; here float32)
    assert cos > 0.99 and measured["align/norm_ratio"] == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("trainer,model", [("bp", "ff"), ("rbp", "rnn")])
def test_baselines_have_no_probe(trainer, model, mnist_dir):
    result = fit(config(mnist_dir, trainer=trainer, model=model, num_epochs=1))
    assert not any(k.startswith("align") for k in result.history[0])


def test_align_every_must_not_be_negative(mnist_dir):
    from lcp.config import ConfigError

    with pytest.raises(ConfigError, match="align_every"):
        config(mnist_dir, align_every=-1)


def test_a_diverging_reference_loses_the_measurement_not_the_run(mnist_dir, monkeypatch):
    """The exact gradient's dynamics diverge on the probe batch (as RBP's adjoint did at an
    RNN LCP-DI run's weights on MNIST): the epoch records NaN and `align/unmeasured`, and the
    run trains on, bit-identical to the run without the probe, though the failed reference
    moved weights and drew random numbers before it raised."""
    made = AlignmentProbe.__init__

    def init(self, *args, **kwargs):
        made(self, *args, **kwargs)

        def diverges(x, y):
            torch.randn(3)
            with torch.no_grad():
                for p in self.params:
                    p.add_(1.0)
            raise DivergenceError("diverged in phase 'adjoint'", phase="adjoint")

        self.reference.compute_update = diverges

    runs = {}
    for align in (False, True):
        final = Final()
        if align:
            monkeypatch.setattr(AlignmentProbe, "__init__", init)
        result = fit(config(mnist_dir, model="rnn", align=align), [final])
        runs[align] = (final, result)
    (off, r_off), (on, r_on) = runs[False], runs[True]
    assert all(torch.equal(off.model[k], on.model[k]) for k in off.model)
    assert torch.equal(off.rng, on.rng) and r_off.final == r_on.final
    assert len(r_on.history) == 2
    for record in r_on.history:
        assert record["align/unmeasured"] == 1.0
        assert math.isnan(record["align/cos_to_gradient"]) and math.isnan(record["align/norm_ratio"])
