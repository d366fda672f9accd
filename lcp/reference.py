"""Load a `state_dict` saved by the paper's public code (`--save_model=True` → model.pth).

The paper's modules are named `_encoder_module`, `_implicit_module`, `_decoder_module` with
nested Sequentials; ours are named for what they are. This maps one naming onto the other for
each of the four models, so checkpoints of the paper's code can be evaluated and compared here.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from lcp.errors import LcpError
from lcp.models import EquilibriumModel


# the paper's key names (patterns) and ours, per model
_BLOCKS = (r"_implicit_module\.module_list\.(\d+)\.1\.(weight|bias)", r"blocks.\1.\2")
_READOUT = (r"_decoder_module\.2\.(weight|bias)", r"readout.\1")
_KEYS = {
    "ff": [(r"_encoder_module\.1\.(weight|bias)", r"encoder.1.\1"), _BLOCKS, _READOUT],
    "rnn": [(r"_encoder_module\.1\.(weight|bias)", r"encoder.1.\1"), _BLOCKS, _READOUT],
    # conv-ff: Conv2d is the encoder's first module
    "conv-ff": [(r"_encoder_module\.0\.(weight|bias)", r"encoder.0.\1"), _BLOCKS, _READOUT],
    "conv-rnn": [(r"_encoder_module\.([01])\.(.+)", r"encoder.\1.\2"),
                 (r"_implicit_module\.((?:conv|norm)\d)\.(.+)", r"\1.\2"),
                 (r"_decoder_module\.0\.(.+)", r"decoder_norm.\1"),
                 (r"_decoder_module\.3\.(weight|bias)", r"readout.\1")],
}


def convert_reference_state_dict(model: EquilibriumModel,
                                 state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's key names → ours (raises on keys it cannot place)."""
    if model.name not in _KEYS:
        raise LcpError(f"no reference mapping for model {type(model).__name__}")
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        found = [m.expand(ours) for pattern, ours in _KEYS[model.name]
                 if (m := re.fullmatch(pattern, key))]
        if found:
            out[found[0]] = value
        else:
            unknown.append(key)
    if unknown:
        raise LcpError(
            f"these keys of the reference state_dict do not belong to a '{model.name}' model: "
            f"{', '.join(unknown[:8])}{' …' if len(unknown) > 8 else ''}. "
            "Was it saved with another --model?")
    return out


def import_reference_state_dict(model: EquilibriumModel,
                                state_dict: Mapping[str, torch.Tensor]) -> EquilibriumModel:
    """Load the paper's `model.state_dict()` into `model` (strict: every tensor must match)."""
    converted = convert_reference_state_dict(model, state_dict)
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as exc:
        raise LcpError(f"the reference state_dict does not fit this '{model.name}' model "
                       f"(check --rnn_hidden_units and the dataset): {exc}") from None
    return model
