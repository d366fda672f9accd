"""The paper's claim measured during training: how well a trainer's update aligns with the
exact gradient as the weights move.

At the end of every epoch (and every `align_every` steps when that is > 0), on one fixed probe
batch (the first `batch_size` training samples), the update a trainer writes into `.grad` is
compared with the exact gradient of the loss at the same weights, as the section's baseline
computes it: `bp` on the feedforward models (their unroll is the network), `rbp` (the
implicit-function gradient at the free equilibrium) on the recurrent ones. Over the model's
parameters, flattened:

    align/cos_to_gradient   cos(update, gradient)
    align/norm_ratio        ‖update‖ / ‖gradient‖
    align/u_norm            the controller effort ‖u*‖ on the probe batch (batch mean)
    align/loss_gap          controlled loss − free loss on the probe batch
    align/seconds           what the measurement cost

Where either update's dynamics diverge on the probe batch (the exact gradient's adjoint does
where the weights leave the free state's Jacobian with spectral radius ≥ 1, which training by
an LCP rule does not prevent), the cosine and the norm ratio are NaN and `align/unmeasured` is
1: the measurement is lost, never the run.

Nothing of the run changes: the parameters' `.grad`, the model's and the trainer's state and
attributes and every random generator are saved before and restored after, so a run's
trajectory is bit-identical with the probe on or off. bp and rbp runs have no probe.
"""

from __future__ import annotations

import math
import time

import torch

from lcp.errors import DivergenceError
from lcp.preserve import preserved
from lcp.trainers import build_trainer

# the exact-gradient trainer of each model (the baseline of its section)
REFERENCE = {"ff": "bp", "conv-ff": "bp", "rnn": "rbp", "conv-rnn": "rbp"}


class AlignmentProbe:
    def __init__(self, cfg, model, trainer, x: torch.Tensor, y: torch.Tensor):
        self.model, self.trainer, self.x, self.y = model, trainer, x, y
        self.every = cfg.align_every
        self.reference = build_trainer(cfg.replace(trainer=REFERENCE[cfg.model]), model)
        self.params = list(model.parameters())
        self.all_params = self.params + trainer.parameters()

    @classmethod
    def for_run(cls, cfg, model, trainer, loader, device) -> "AlignmentProbe | None":
        """The probe of a run, or None (bp/rbp, `align` off, or a loader without tensors)."""
        if not cfg.align or cfg.trainer in REFERENCE.values() or not hasattr(loader, "x"):
            return None
        n = cfg.batch_size
        return cls(cfg, model, trainer, loader.x[:n].to(device), loader.y[:n].to(device))

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def measure(self, prefix: str = "align/") -> dict[str, float]:
        start = time.perf_counter()
        with preserved(self.model, self.trainer, self.all_params):
            try:
                update, stats = self._update(self.trainer)
                gradient, _ = self._update(self.reference)
            except DivergenceError:
                update = gradient = None
        if update is None:
            return {prefix + k: v for k, v in (("cos_to_gradient", math.nan),
                    ("norm_ratio", math.nan), ("unmeasured", 1.0),
                    ("seconds", time.perf_counter() - start))}
        dot = torch.dot(update, gradient).item()
        norm_u, norm_g = update.norm().item(), gradient.norm().item()
        out = {"cos_to_gradient": dot / max(norm_u * norm_g, 1e-300),
               "norm_ratio": norm_u / max(norm_g, 1e-300)}
        if "u_norm" in stats:
            out["u_norm"] = stats["u_norm"]
        if "controlled_loss" in stats and "loss" in stats:
            out["loss_gap"] = stats["controlled_loss"] - stats["loss"]
        out["seconds"] = time.perf_counter() - start
        return {prefix + k: float(v) for k, v in out.items()}

    def _update(self, trainer) -> tuple[torch.Tensor, dict[str, float]]:
        """`trainer`'s update on the probe batch over the model's parameters, as one float64
        vector (a parameter the update leaves alone counts as zeros)."""
        for p in self.all_params:
            p.grad = None
        stats = trainer.compute_update(self.x, self.y)
        flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in self.params]
        return torch.cat(flat).double(), stats
