"""Loading state_dicts saved by the paper's code (key names and shapes recorded from it)."""

import json
from pathlib import Path

import pytest
import torch

from lcp.config import RunConfig
from lcp.errors import LcpError
from lcp.models import build_model
from lcp.reference import import_reference_state_dict

KEYS = json.loads((Path(__file__).parent / "data" / "reference_state_dict_keys.json").read_text())


def fresh(model):
    data = "cifar10" if model.startswith("conv") else "mnist"
    shape = (3, 32, 32) if data == "cifar10" else (1, 28, 28)
    cfg = RunConfig(model=model, trainer="rbp", data=data, rnn_hidden_units=32)
    return build_model(cfg, shape, 10), shape


def reference_state(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randint(0, 5, shape) if k.endswith("num_batches_tracked")
                else torch.randn(*shape, generator=g)) for k, shape in KEYS[model].items()}


@pytest.mark.parametrize("model", ["ff", "rnn", "conv-ff", "conv-rnn"])
def test_every_reference_tensor_finds_its_place(model):
    net, _ = fresh(model)
    state = reference_state(model)
    import_reference_state_dict(net, state)
    ours = net.state_dict()
    assert len(ours) == len(state)
    # every reference tensor landed somewhere, unchanged
    for key, tensor in state.items():
        assert any(torch.equal(tensor, v) for v in ours.values()), key


def test_ff_reference_weights_compute_the_reference_network():
    net, _ = fresh("ff")
    s = reference_state("ff")
    import_reference_state_dict(net, s)
    x = torch.rand(3, 1, 28, 28)
    a1 = x.flatten(1) @ s["_encoder_module.1.weight"].T + s["_encoder_module.1.bias"]
    a2 = torch.tanh(a1) @ s["_implicit_module.module_list.0.1.weight"].T + \
        s["_implicit_module.module_list.0.1.bias"]
    logits = torch.tanh(a2) @ s["_decoder_module.2.weight"].T + s["_decoder_module.2.bias"]
    h = net.encode(x)
    v = net.implicit(h, net.implicit(h, torch.zeros_like(h)))
    assert torch.allclose(net.decode(v), logits, atol=1e-5)


def test_conv_rnn_batchnorm_statistics_are_imported():
    net, _ = fresh("conv-rnn")
    s = reference_state("conv-rnn")
    import_reference_state_dict(net, s)
    assert torch.equal(net.decoder_norm.running_mean, s["_decoder_module.0.running_mean"])
    assert torch.equal(net.encoder[1].running_var, s["_encoder_module.1.running_var"])


def test_a_state_dict_of_another_model_is_refused_with_a_reason():
    net, _ = fresh("ff")
    with pytest.raises(LcpError, match="another --model"):
        import_reference_state_dict(net, reference_state("conv-rnn"))
    with pytest.raises(LcpError, match="rnn_hidden_units"):
        small = {k: torch.zeros(*[d // 2 for d in shape]) for k, shape in KEYS["ff"].items()}
        import_reference_state_dict(net, small)
