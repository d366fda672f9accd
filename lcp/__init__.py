"""lcp — the least-control principle for learning at equilibrium (Meulemans et al., NeurIPS 2022).

The library: equilibrium models, fixed-point solvers, the trainers (bp, rbp, lcp-di, lcp-kp,
lcp-lf, lcp-ebd), data and the training loop. It reports through callbacks and never imports a
tracker, a tuner or a command-line framework.

    cfg = lcp.RunConfig(model="ff", trainer="lcp-di", alpha=0.1, solver_max_iter=800)
    model = lcp.build_model(cfg, input_shape=(1, 28, 28), num_classes=10)
    trainer = lcp.build_trainer(cfg, model)
    stats = trainer.compute_update(x, y)     # fills .grad with the update (docs/equations.md)
    result = lcp.fit(cfg, callbacks=[...])  # the whole training loop
"""

from lcp.callbacks import Callback, FitResult, FitState
from lcp.config import ConfigError, RunConfig
from lcp.errors import DivergenceError, LcpError
from lcp.models import EquilibriumModel, build_model
from lcp.reference import import_reference_state_dict
from lcp.solvers import SOLVERS, Solver, SolverStats, get_solver
from lcp.trainers import TRAINERS, Trainer, build_trainer

__version__ = "0.1.0"


def fit(cfg, callbacks=(), **kwargs):
    """The training loop (see `lcp.training.fit` and docs/equations.md)."""
    from lcp.training import fit as _fit  # imports the data stack only when training

    return _fit(cfg, callbacks, **kwargs)


__all__ = [
    "Callback", "FitResult", "FitState", "ConfigError", "RunConfig", "DivergenceError",
    "LcpError", "EquilibriumModel", "build_model", "import_reference_state_dict", "SOLVERS",
    "Solver", "SolverStats", "get_solver", "TRAINERS", "Trainer", "build_trainer", "fit",
]
