"""lcp-kp: dynamic inversion with learned Kolen–Pollack feedback weights (docs/equations.md,
"Controlled dynamics" and "lcp-kp").

B has, for every forward block `in → out`, a bias-free map `out → in` (a Linear of transposed
shape, or a ConvTranspose2d with the block's kernel/stride/padding), each initialised by
PyTorch's default and divided by its Frobenius norm. D_t (H_readout × C) starts
N(0, 1/(C·H_readout)); P places D_t·u in the readout slice. With the decay of `pre_update`, the
feedback weights come to mirror the forward weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lcp.errors import LcpError
from lcp.models import LinearReadoutModel
from lcp.trainers.lcp_di import LeastControlTrainer


class FeedbackWeights(nn.Module):
    """B (one transposed map per forward block) and D_t, for a LinearReadoutModel."""

    def __init__(self, model: LinearReadoutModel):
        super().__init__()
        self.specs = model.block_specs
        self.state_size = model.state_size
        self.readout_start = model.readout_start
        maps, self._out_shapes = [], []  # the out shape each map reads (None: flat)
        for spec, layer in zip(model.block_specs, model.blocks):
            if spec.conv is None:
                fb = nn.Linear(layer.out_features, layer.in_features, bias=False)
                self._out_shapes.append(None)
            else:
                fb = nn.ConvTranspose2d(layer.out_channels, layer.in_channels,
                                        kernel_size=layer.kernel_size, stride=spec.conv["stride"],
                                        padding=spec.conv["padding"], bias=False)
                side = int(round(math.sqrt((spec.out_end - spec.out_start) / layer.out_channels)))
                self._out_shapes.append((layer.out_channels, side, side))
            with torch.no_grad():
                fb.weight /= fb.weight.norm()
            maps.append(fb)
        self.maps = nn.ModuleList(maps)
        c, h_r = model.num_classes, model.readout_size
        self.D_t = nn.Parameter(torch.randn(h_r, c) / math.sqrt(c * h_r))

    def forward(self, e: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """B(e) + P(D_t·u), a vector in state space."""
        out = torch.zeros_like(e)
        for spec, fb, shape in zip(self.specs, self.maps, self._out_shapes):
            piece = e[:, spec.out_start:spec.out_end]
            if shape is not None:
                piece = piece.reshape(-1, *shape)
            out[:, spec.in_start:spec.in_end] += fb(piece).flatten(1)
        out[:, self.readout_start:] += u @ self.D_t.t()
        return out


class KolenPollackTrainer(LeastControlTrainer):
    name = "lcp-kp"

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        if not isinstance(model, LinearReadoutModel):
            raise LcpError(f"lcp-kp needs a model with a block structure (ff, rnn, conv-ff), "
                           f"not {model.name}")
        device = next(model.parameters()).device
        self.auxiliary = FeedbackWeights(model).to(device)
        self.kp_wd = cfg.kp_wd

    @torch.no_grad()
    def pre_update(self):
        """p ← p − kp_wd·p for every feedback parameter and every parameter of f and D."""
        if self.kp_wd == 0:
            return
        for p in self.rule_updated_tensors():
            p.sub_(self.kp_wd * p)

    def rule_updated_tensors(self):
        if self.kp_wd == 0:
            return []
        return (list(self.auxiliary.parameters()) + list(self.model.blocks.parameters())
                + list(self.model.readout.parameters()))

    def feedback(self, f, v, e, u):
        """e' = e + dt_e·(−e + φ'(v) ⊙ (B(e) + P(D_t·u))); v driven by the old e."""
        return e + self.dt_e * (-e + self.model.act_grad(v) * self.auxiliary(e, u)), e

    def feedback_matrices(self):
        # contiguous copies (once per batch): a product with a transposed view of a matrix
        # costs ~20% more at every step of the solve
        fb = self.auxiliary
        return ("transpose", [m.weight.detach().t().contiguous() for m in fb.maps],
                fb.D_t.detach().t())

    def compute_update(self, x, y):
        stats = super().compute_update(x, y)
        last = self.last
        # Kolen–Pollack: the feedback weights receive −φ(ṽ) pulled back through B(e*) + P(D_t·u*)
        self.auxiliary(last["e"], last["u"]).backward(-self.model.act(last["v_tilde"]))
        return stats
