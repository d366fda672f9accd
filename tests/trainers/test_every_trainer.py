"""Every trainer gives a finite update to every trainable parameter, on every model it supports,
and predicts; the conv models take a training step."""

import pytest
import torch

from lcp.config import SUPPORTED_PAIRS, RunConfig
from lcp.models import build_model
from lcp.trainers import build_trainer

FLAT = [(m, t) for m in ("ff", "rnn") for t in SUPPORTED_PAIRS[m]]


def run_step(model, trainer, batch=4, **kw):
    data = "cifar10" if model.startswith("conv") else "mnist"
    shape = (3, 32, 32) if data == "cifar10" else (1, 28, 28)
    cfg = RunConfig(model=model, trainer=trainer, data=data, rnn_hidden_units=16,
                    solver_max_iter=60, alpha=0.5, **kw)
    torch.manual_seed(0)
    net = build_model(cfg, shape, 10)
    tr = build_trainer(cfg, net)
    x, y = torch.rand(batch, *shape), torch.randint(0, 10, (batch,))
    tr.pre_update()
    stats = tr.compute_update(x, y)
    tr.post_update()
    return net, tr, stats, x


@pytest.mark.parametrize("model,trainer", FLAT)
def test_finite_update_for_every_trainable_parameter(model, trainer):
    net, tr, stats, x = run_step(model, trainer)
    params = list(net.named_parameters()) + list(tr.auxiliary.named_parameters())
    for name, p in params:
        assert p.grad is not None, f"{name} got no update"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero update"
    assert all(v == v for v in stats.values())
    assert tr.predict(x).shape == (x.shape[0], 10)


@pytest.mark.parametrize("trainer", SUPPORTED_PAIRS["conv-ff"])
def test_conv_ff_takes_a_step_and_predicts(trainer):
    net, tr, stats, x = run_step("conv-ff", trainer, batch=2, solver_error_threshold=1e-3)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert tr.predict(x).shape == (2, 10)


@pytest.mark.parametrize("trainer", ["rbp", "lcp-di"])
def test_conv_rnn_takes_a_step_and_predicts(trainer):
    net, tr, stats, x = run_step("conv-rnn", trainer, batch=2, solver_error_threshold=1e-3)
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert tr.predict(x).shape == (2, 10)
