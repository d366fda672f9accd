"""Measuring a run without changing it: `preserved` puts back everything a measurement could
move, so a run is bit-identical with or without it (the alignment probe, the watching
evaluations of `RunConfig.watch_epochs`)."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


@contextlib.contextmanager
def preserved(model, trainer, params=()):
    """Code inside leaves the run as it found it: the model's and the trainer's state (weights,
    buffers such as batch-norm running statistics, which an evaluation in training mode
    updates), the trainer's attributes, the `.grad` of `params` and every global random
    generator (torch's CPU and CUDA, numpy's, Python's) are put back on exit."""
    grads = [p.grad for p in params]
    attributes = dict(vars(trainer))
    states = [(m, {k: v.clone() for k, v in m.state_dict().items()}) for m in
              (model, trainer)]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None,
           np.random.get_state(), random.getstate())
    try:
        yield
    finally:
        for module, state in states:
            module.load_state_dict(state)
        vars(trainer).clear()
        vars(trainer).update(attributes)
        for p, g in zip(params, grads):
            p.grad = g
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        np.random.set_state(rng[2])
        random.setstate(rng[3])
