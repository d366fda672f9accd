"""Trainers by name: `build_trainer(cfg, model)`."""

from __future__ import annotations

from lcp.errors import LcpError
from lcp.trainers import native_check
from lcp.trainers.backprop import BackpropTrainer, RecurrentBackpropTrainer
from lcp.trainers.base import Trainer
from lcp.trainers.lcp_di import DynamicInversionTrainer, LeastControlTrainer
from lcp.trainers.lcp_ebd import EnergyBasedTrainer
from lcp.trainers.lcp_kp import KolenPollackTrainer
from lcp.trainers.lcp_lf import LinearFeedbackTrainer

TRAINERS: dict[str, type[Trainer]] = {
    "bp": BackpropTrainer,
    "rbp": RecurrentBackpropTrainer,
    "lcp-di": DynamicInversionTrainer,
    "lcp-kp": KolenPollackTrainer,
    "lcp-lf": LinearFeedbackTrainer,
    "lcp-ebd": EnergyBasedTrainer,
}


def build_trainer(cfg, model) -> Trainer:
    """The trainer named by `cfg.trainer` (docs/equations.md), bound to `model`, running the
    compiled passes where they apply (`native_check.library`: loaded and checked against the
    trainers' definitions on the first request)."""
    try:
        cls = TRAINERS[cfg.trainer]
    except KeyError:
        raise LcpError(f"unknown trainer {cfg.trainer!r}; valid: {', '.join(TRAINERS)}") from None
    trainer = cls(cfg, model)
    trainer.kernels = native_check.library
    return trainer


__all__ = ["TRAINERS", "Trainer", "LeastControlTrainer", "build_trainer"]
