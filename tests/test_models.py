"""Model shapes, the conv-rnn argument order, and closed-form VJPs equal to autograd."""

import pytest
import torch

from lcp.config import RunConfig
from lcp.models import CONV_FF_SIZES, ConvRNNModel, EquilibriumModel, build_model


def make(model, **kw):
    data = "cifar10" if model.startswith("conv") else "mnist"
    shape = (3, 32, 32) if data == "cifar10" else (1, 28, 28)
    cfg = RunConfig(model=model, trainer="rbp", data=data, **kw)
    torch.manual_seed(0)
    return build_model(cfg, shape, 10), shape


@pytest.mark.parametrize("name,state", [("ff", 2 * 32), ("rnn", 32), ("conv-ff", 34272)])
def test_flat_models_have_the_state_size_of_the_spec(name, state):
    model, shape = make(name, rnn_hidden_units=32)
    x = torch.rand(3, *shape)
    h = model.encode(x)
    assert h.shape == (3, state)
    v = model.implicit(h, torch.zeros_like(h))
    assert v.shape == h.shape and model.decode(v).shape == (3, 10)


def test_ff_is_a_two_layer_mlp_after_two_steps():
    model, _ = make("ff", rnn_hidden_units=16)
    x = torch.rand(5, 1, 28, 28)
    W0, b0 = model.encoder[1].weight, model.encoder[1].bias
    W1, b1 = model.blocks[0].weight, model.blocks[0].bias
    a1 = x.flatten(1) @ W0.T + b0
    a2 = torch.tanh(a1) @ W1.T + b1
    h = model.encode(x)
    assert torch.allclose(h[:, :16], a1) and torch.all(h[:, 16:] == 0)
    v = model.implicit(h, model.implicit(h, torch.zeros_like(h)))
    assert torch.allclose(v, torch.cat([a1, a2], 1), atol=1e-6)
    # it is a fixed point: one more step changes nothing
    assert torch.allclose(model.implicit(h, v), v)


def test_conv_ff_blocks_and_fixed_point_in_five_steps():
    model, _ = make("conv-ff")
    assert sum(CONV_FF_SIZES) == 34272 and model.num_bp_steps == 5
    h = model.encode(torch.rand(2, 3, 32, 32))
    v = torch.zeros_like(h)
    for _ in range(5):
        v = model.implicit(h, v)
    assert torch.allclose(model.implicit(h, v), v, atol=1e-5)


def test_conv_rnn_convolutions_read_the_input_not_the_state():
    model, _ = make("conv-rnn")
    h = model.encode(torch.rand(2, 3, 32, 32))
    assert h.shape == (2, 48, 32, 32)
    v = torch.randn_like(h)
    c = model.conv2(model.norm1(torch.relu(model.conv1(h))))
    expected = model.norm3(torch.relu(h + model.norm2(v + c)))
    assert torch.allclose(model.implicit(h, v), expected)
    assert model.decode(v).shape == (2, 10)


@pytest.mark.parametrize("name", ["ff", "rnn", "conv-ff"])
def test_closed_form_vjps_equal_autograd(name):
    model, shape = make(name, rnn_hidden_units=24)
    model = model.double()
    x = torch.rand(3, *shape, dtype=torch.float64)
    h = model.encode(x).detach()
    v = torch.randn_like(h)
    e = torch.randn_like(h)
    u = torch.randn(3, 10, dtype=torch.float64)
    f_closed, jt_closed = model.implicit_vjp(h, v, e)
    d_closed, dt_closed = model.decode_vjp(v, u)
    f_auto, jt_auto = EquilibriumModel.implicit_vjp(model, h, v, e)
    d_auto, dt_auto = EquilibriumModel.decode_vjp(model, v, u)
    assert torch.allclose(f_closed, f_auto) and torch.allclose(d_closed, d_auto)
    assert torch.allclose(jt_closed, jt_auto, atol=1e-10)
    assert torch.allclose(dt_closed, dt_auto, atol=1e-10)


def test_same_seed_same_initial_weights():
    a, _ = make("rnn", rnn_hidden_units=8)
    b, _ = make("rnn", rnn_hidden_units=8)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_conv_rnn_inner_convolutions_start_small():
    model, _ = make("conv-rnn")
    assert isinstance(model, ConvRNNModel)
    assert model.conv1.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert model.conv1.bias is None and model.conv2.bias is None
