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
from lcp.models import ConvRNNModel, EquilibriumModel, LinearReadoutModel


def _linear_readout_key(model: LinearReadoutModel, key: str) -> str | None:
    m = re.fullmatch(r"_implicit_module\.module_list\.(\d+)\.1\.(weight|bias)", key)
    if m:
        return f"blocks.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"_decoder_module\.2\.(weight|bias)", key)
    if m:
        return f"readout.{m.group(1)}"
    if model.name in ("ff", "rnn"):
        m = re.fullmatch(r"_encoder_module\.1\.(weight|bias)", key)
        if m:
            return f"encoder.1.{m.group(1)}"
    else:  # conv-ff: Conv2d is the encoder's first module
        m = re.fullmatch(r"_encoder_module\.0\.(weight|bias)", key)
        if m:
            return f"encoder.0.{m.group(1)}"
    return None


def _conv_rnn_key(key: str) -> str | None:
    m = re.fullmatch(r"_encoder_module\.([01])\.(.+)", key)
    if m:
        return f"encoder.{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"_implicit_module\.((?:conv|norm)\d)\.(.+)", key)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    m = re.fullmatch(r"_decoder_module\.0\.(.+)", key)
    if m:
        return f"decoder_norm.{m.group(1)}"
    m = re.fullmatch(r"_decoder_module\.3\.(weight|bias)", key)
    if m:
        return f"readout.{m.group(1)}"
    return None


def convert_reference_state_dict(model: EquilibriumModel,
                                 state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's key names → ours (raises on keys it cannot place)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if isinstance(model, ConvRNNModel):
            new = _conv_rnn_key(key)
        elif isinstance(model, LinearReadoutModel):
            new = _linear_readout_key(model, key)
        else:
            raise LcpError(f"no reference mapping for model {type(model).__name__}")
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
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
