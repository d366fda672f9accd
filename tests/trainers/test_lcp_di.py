"""lcp-di: the update vs the BP/RBP gradient, the controlled equilibrium, divergence."""

import pytest
import torch
import torch.nn.functional as F

from lcp.config import RunConfig
from lcp.errors import DivergenceError
from lcp.models import build_model
from lcp.trainers import build_trainer
from lcp.trainers.base import loss_gradient

BASELINE = {"ff": "bp", "rnn": "rbp"}


def flat_update(cfg, net, x, y):
    net.zero_grad()
    trainer = build_trainer(cfg, net)
    stats = trainer.compute_update(x, y)
    return torch.cat([p.grad.flatten() for p in net.parameters()]), stats, trainer


def problem(model, hidden=64, batch=32, seed=0):
    torch.manual_seed(seed)
    cfg = RunConfig(model=model, trainer=BASELINE[model], rnn_hidden_units=hidden,
                    solver_max_iter=2000, solver_error_threshold=1e-10)
    net = build_model(cfg, (1, 28, 28), 10)
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    return cfg, net, x, y


@pytest.mark.parametrize("model", ["ff", "rnn"])
def test_alpha_one_gives_the_backprop_gradient(model):
    cfg, net, x, y = problem(model, hidden=256, batch=64)
    g_ref, _, _ = flat_update(cfg, net, x, y)
    g, stats, _ = flat_update(cfg.replace(trainer="lcp-di", alpha=1.0), net, x, y)
    cos = F.cosine_similarity(g, g_ref, dim=0).item()
    assert cos >= 0.999
    assert g.norm() / g_ref.norm() == pytest.approx(1.0, abs=0.02)
    assert stats["controlled/hit_max_iter"] == 0


@pytest.mark.parametrize("model", ["ff", "rnn"])
def test_alpha_small_stays_aligned_and_scales_up(model):
    # at the paper's sizes (256 hidden units, batch 64); smaller nets align a little less
    cfg, net, x, y = problem(model, hidden=256, batch=64)
    g_ref, _, _ = flat_update(cfg, net, x, y)
    g, _, _ = flat_update(cfg.replace(trainer="lcp-di", alpha=0.1), net, x, y)
    assert F.cosine_similarity(g, g_ref, dim=0).item() >= 0.99
    assert 7 < (g.norm() / g_ref.norm()).item() < 11


def test_controlled_equilibrium_residual_is_under_the_threshold():
    cfg, net, x, y = problem("rnn")
    cfg = cfg.replace(trainer="lcp-di", alpha=0.1, solver_error_threshold=1e-6)
    trainer = build_trainer(cfg, net)
    h = net.encode(x).detach()
    v, v_hat, u_i, e, u, stats = trainer.controlled_equilibrium(h, y, 10)
    assert stats.converged and stats.residual < 1e-6
    # apply one more step of the dynamics by hand: the state barely moves
    onehot = F.one_hot(y, 10).to(h.dtype)
    step = trainer.controlled_step(h, onehot)
    nxt = step(v, v_hat, u_i, e)
    old = torch.cat([t.flatten(1) for t in (v, v_hat, u_i, e)], 1)
    new = torch.cat([t.flatten(1) for t in nxt], 1)
    rel = ((new - old).norm(dim=1) / (1e-5 + old.norm(dim=1))).max().item()
    assert rel < 1e-6
    # and the equilibrium conditions hold: e* = Jᵀe* + Dᵀu*, v* = f(v*) + e*, αuᵢ* = −∇L
    f_v, jt_e = net.implicit_vjp(h, v, e)
    _, dt_u = net.decode_vjp(v, u)
    assert torch.allclose(v, f_v + e, atol=1e-4)
    assert torch.allclose(e, jt_e + dt_u, atol=1e-5)
    assert torch.allclose(0.1 * u_i, -loss_gradient(v_hat, onehot), atol=1e-6)


def test_large_alpha_diverges_with_a_reason_not_nan():
    cfg, net, x, y = problem("ff")
    cfg = cfg.replace(trainer="lcp-di", alpha=10.0, dt=1.0, solver_max_iter=800)
    with pytest.raises(DivergenceError) as info:
        build_trainer(cfg, net).compute_update(x, y)
    assert info.value.phase == "controlled"
    assert "alpha" in str(info.value)


def test_predict_uses_the_free_equilibrium():
    cfg, net, x, y = problem("rnn")
    trainer = build_trainer(cfg.replace(trainer="lcp-di"), net)
    logits = trainer.predict(x)
    h = net.encode(x)
    v = torch.zeros_like(h)
    for _ in range(3000):
        v = net.implicit(h, v)
    assert torch.allclose(logits, net.decode(v), atol=1e-6)
