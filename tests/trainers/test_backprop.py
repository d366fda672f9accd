"""bp equals a hand-written MLP; rbp equals the implicit-function gradient (float64)."""

import pytest
import torch
import torch.nn.functional as F

from lcp.config import RunConfig
from lcp.models import build_model
from lcp.trainers import build_trainer



def setup(model, trainer, hidden=16, seed=0, **kw):
    cfg = RunConfig(model=model, trainer=trainer, rnn_hidden_units=hidden, **kw)
    torch.manual_seed(seed)
    net = build_model(cfg, (1, 28, 28), 10).double()
    x = torch.rand(8, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    return cfg, net, build_trainer(cfg, net), x, y


def grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def test_bp_on_ff_equals_a_hand_written_tanh_mlp():
    cfg, net, trainer, x, y = setup("ff", "bp")
    trainer.compute_update(x, y)
    got = grads(net)
    # the same network written out by hand, on copies of the weights
    W0, b0, W1, b1, W2, b2 = [p.detach().clone().requires_grad_(True) for p in (
        net.encoder[1].weight, net.encoder[1].bias, net.blocks[0].weight, net.blocks[0].bias,
        net.readout.weight, net.readout.bias)]
    logits = torch.tanh(torch.tanh(x.flatten(1) @ W0.T + b0) @ W1.T + b1) @ W2.T + b2
    F.cross_entropy(logits, y).backward()
    assert torch.allclose(trainer.predict(x), logits.detach())
    for name, ref in [("encoder.1.weight", W0), ("encoder.1.bias", b0), ("blocks.0.weight", W1),
                      ("blocks.0.bias", b1), ("readout.weight", W2), ("readout.bias", b2)]:
        assert torch.allclose(got[name], ref.grad, atol=1e-12), name


def test_rbp_on_rnn_equals_the_implicit_function_gradient():
    cfg, net, trainer, x, y = setup("rnn", "rbp", hidden=12, solver_max_iter=2000,
                                    solver_error_threshold=1e-13)
    trainer.compute_update(x, y)
    got = grads(net)

    # dense implicit function theorem, per sample: v* = W0x + b0 + W1 tanh(v*) + b1
    W0, b0 = net.encoder[1].weight.detach(), net.encoder[1].bias.detach()
    W1, b1 = net.blocks[0].weight.detach(), net.blocks[0].bias.detach()
    W2, b2 = net.readout.weight.detach(), net.readout.bias.detach()
    with torch.no_grad():
        h = x.flatten(1) @ W0.T + b0
        v = torch.zeros_like(h)
        for _ in range(5000):
            v = h + torch.tanh(v) @ W1.T + b1
    grads_ref = {k: torch.zeros_like(p) for k, p in net.named_parameters()}
    for i in range(x.shape[0]):
        vi = v[i]
        d = 1 - torch.tanh(vi) ** 2
        J = W1 * d[None, :]  # ∂f/∂v
        logits = torch.tanh(vi) @ W2.T + b2
        p = torch.softmax(logits, 0)
        p[y[i]] -= 1
        p /= x.shape[0]
        gv = (p @ W2) * d  # ∂L/∂v*
        gamma = torch.linalg.solve(torch.eye(12) - J.T, gv)  # (I − Jᵀ)⁻¹ ∂L/∂v
        grads_ref["readout.weight"] += torch.outer(p, torch.tanh(vi))
        grads_ref["readout.bias"] += p
        grads_ref["blocks.0.weight"] += torch.outer(gamma, torch.tanh(vi))
        grads_ref["blocks.0.bias"] += gamma
        grads_ref["encoder.1.weight"] += torch.outer(gamma, x[i].flatten())
        grads_ref["encoder.1.bias"] += gamma
    for name, ref in grads_ref.items():
        assert torch.allclose(got[name], ref, rtol=1e-7, atol=1e-10), name


def test_rbp_solves_the_adjoint_and_reports_it():
    cfg, net, trainer, x, y = setup("rnn", "rbp", solver_max_iter=300)
    stats = trainer.compute_update(x, y)
    assert stats["adjoint/iterations"] > 1 and stats["free/iterations"] > 1
    assert stats["adjoint/residual"] < 1e-4


def test_rbp_takes_the_adjoint_jacobian_at_v_bar_as_the_paper_code_does():
    # The paper's code differentiates f at v̄ = f(h, v*) (the state it attaches to the graph),
    # not at v*. The two differ by the free solve's residual, so stop both solves early (3
    # steps each) and compare with that computation written out by hand.
    cfg, net, trainer, x, y = setup("rnn", "rbp", hidden=12, solver_max_iter=3,
                                    solver_error_threshold=1e-15)
    stats = trainer.compute_update(x, y)
    assert stats["free/iterations"] == 3 and stats["adjoint/iterations"] == 3
    got = grads(net)

    W0, b0 = net.encoder[1].weight.detach(), net.encoder[1].bias.detach()
    W1, b1 = net.blocks[0].weight.detach(), net.blocks[0].bias.detach()
    W2, b2 = net.readout.weight.detach(), net.readout.bias.detach()
    h = x.flatten(1) @ W0.T + b0
    v = torch.zeros_like(h)
    for _ in range(3):
        v = h + torch.tanh(v) @ W1.T + b1
    v_bar = h + torch.tanh(v) @ W1.T + b1
    p = torch.softmax(torch.tanh(v_bar) @ W2.T + b2, 1) - F.one_hot(y, 10).double()
    p /= x.shape[0]
    d_bar = 1 - torch.tanh(v_bar) ** 2
    g = (p @ W2) * d_bar  # ∂L/∂v̄
    gamma = g
    for _ in range(3):
        gamma = d_bar * (gamma @ W1) + g  # Jᵀγ + g with J = ∂f/∂v at v̄
    ref = {"readout.weight": p.T @ torch.tanh(v_bar), "readout.bias": p.sum(0),
           "blocks.0.weight": gamma.T @ torch.tanh(v), "blocks.0.bias": gamma.sum(0),
           "encoder.1.weight": gamma.T @ x.flatten(1), "encoder.1.bias": gamma.sum(0)}
    for name, value in ref.items():
        assert torch.allclose(got[name], value, rtol=1e-10, atol=1e-13), name


@pytest.mark.parametrize("model", ["ff", "rnn", "conv-ff"])
def test_bp_unroll_from_zero_takes_its_first_step_without_products_bit_for_bit(model):
    """f(h, 0) is h plus each block's bias (φ(0) = 0), so the unroll's first step skips the
    blocks' products: the logits and the update equal stepping f from the zero state, bit for
    bit. An activation without φ(0) = 0 takes the full step."""
    shape, data = ((3, 32, 32), "cifar10") if model == "conv-ff" else ((1, 28, 28), "mnist")
    cfg = RunConfig(model=model, trainer="bp", data=data, rnn_hidden_units=16)
    torch.manual_seed(0)
    net = build_model(cfg, shape, 10)
    x, y = torch.rand(4, *shape), torch.randint(0, 10, (4,))
    trainer = build_trainer(cfg, net)
    logits = trainer.forward(x)
    F.cross_entropy(logits, y).backward()
    got = grads(net)
    net.zero_grad()
    h = net.encode(x)
    v = net.zero_state(h)
    for _ in range(net.num_bp_steps):
        v = net.implicit(h, v)
    expected = net.decode(v)
    F.cross_entropy(expected, y).backward()
    assert torch.equal(logits, expected)
    for name, grad in grads(net).items():
        assert torch.equal(got[name], grad), name
    net.act = torch.sigmoid  # φ(0) = 1/2
    assert torch.equal(net.implicit_at_zero(h), net.implicit(h, net.zero_state(h)))
