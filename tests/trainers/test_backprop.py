"""bp equals a hand-written MLP; rbp equals the implicit-function gradient (float64)."""

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
