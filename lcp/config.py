"""The one typed place for every run setting and its default.

`RunConfig` holds every flag of the paper's command line (same names, same defaults) plus the
few settings this implementation adds (data folder, device, quick-run limits, validation split).
It is validated on construction: unknown keys, wrong types, values outside their choices and
model/trainer pairs the paper's code does not support are rejected with one message that says
what is wrong and what is valid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from lcp.errors import LcpError

MODELS = ("ff", "rnn", "conv-ff", "conv-rnn")
TRAINERS = ("bp", "rbp", "lcp-di", "lcp-kp", "lcp-lf", "lcp-ebd")
# --controller_solver, as the solver of `lcp.solvers.SOLVERS` it runs: 'euler' (the default) the
# paper's explicit-Euler controlled dynamics iterated by --solver; 'anderson' opt-in Anderson
# acceleration on the joint controlled state (`anderson_joint`: the same fixed point)
CONTROLLER_SOLVERS = {"euler": None, "anderson": "anderson_joint"}
# the valid values of each setting that has a fixed set of them
CHOICES: dict[str, tuple[str, ...]] = {
    "model": MODELS,
    "trainer": TRAINERS,
    "data": ("mnist", "fashion-mnist", "cifar10", "mnist-sample"),
    "solver": ("vanilla", "anderson"),  # the paper's two solvers of lcp.solvers.SOLVERS
    "solver_threshold_metric": ("l2", "l_inf", "legacy_l2"),
    "meta_optimizer": ("adam", "sgd"),
    "meta_scheduler": ("none", "cos"),
    "ebd_optim": ("adam", "gd"),
    "controller_solver": tuple(CONTROLLER_SOLVERS),
    "lf_noise": ("counter", "paper"),
}

# Which trainers each model supports, as in the paper's code: the conv-rnn model exposes no
# readout slice, feedback module or block list, so only rbp and lcp-di can run on it.
SUPPORTED_PAIRS: dict[str, tuple[str, ...]] = {
    "ff": TRAINERS,
    "rnn": TRAINERS,
    "conv-ff": TRAINERS,
    "conv-rnn": ("rbp", "lcp-di"),
}

_TRUE = {"yes", "true", "t", "y", "1"}
_FALSE = {"no", "false", "f", "n", "0"}


# What makes a manifest row that row: never overridden, searched or tuned.
IDENTITY_FIELDS = ("seed", "model", "trainer")
# Where data lives, the device, the output folder, the alignment measurements and the watching
# evaluations (both leave the trajectory bit-identical): not what a run computes (not in the
# config hash).
NOT_HASHED = ("data_dir", "device", "out_dir", "save_model", "align", "align_every",
              "watch_epochs")
# Settings added after runs were recorded, that change nothing at their default for a run
# recorded before: in the hash only when set away from their default, so that every earlier run
# keeps its hash (and is found, resumed and reported as before).
HASHED_WHEN_SET = ("skip_limit",)
# Settings added after runs were recorded, that matter to some trainers only: in the hash only
# for those trainers, and there only away from the value every earlier run computed with (an
# earlier lcp-lf run drew its noise from PyTorch's generator: `lf_noise=paper` keeps its hash;
# the counter-based default is another computation, so another hash; other trainers never draw).
HASHED_FOR = {"lf_noise": (("lcp-lf",), "paper")}


class ConfigError(LcpError, ValueError):
    """A run setting is unknown, of the wrong type or outside its valid values; `field` names
    the setting (None when the problem is not one setting's)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def parse_bool(value: Any) -> bool:
    """The paper's `str2bool`: true/false, yes/no, t/f, y/n, 1/0 (any case)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"expected a boolean (true/false, yes/no, t/f, y/n, 1/0), got {value!r}")


def default_data_dir() -> str:
    return os.environ.get("LCP_DATA_DIR", "./data")


@dataclass
class RunConfig:
    """Every setting of one training run. Field names are the paper's flags."""

    # Setup
    seed: int = -1
    data: str = "mnist"
    num_epochs: int = 30
    eval_epochs: int = 5
    batch_size: int = 64
    out_dir: str = "./out"
    save_model: bool = False
    # Solver
    solver: str = "vanilla"
    solver_max_iter: int = 50
    solver_error_threshold: float = 1e-4
    solver_threshold_metric: str = "l2"
    # Trainer and controller dynamics
    trainer: str = "lcp-di"
    k_p: float = 0.0
    k_i: float = 1.0
    alpha: float = 0.0
    dt: float = 1.0
    tau_v: float = 1.0
    tau_u: float = 1.0
    tau_e: float = 1.0
    # Model (the paper's script has no usable default: it must be given)
    model: str | None = None
    rnn_hidden_units: int = 256
    # Linear feedback (lcp-lf)
    timescale_factor: float = 5.0
    tau_eps: float = 1.0
    tau_Q: float = 100.0
    sigma: float = 0.1
    wd_Q: float = 0.001
    # Kolen-Pollack (lcp-kp)
    kp_wd: float = 0.001
    # Energy based (lcp-ebd)
    ebd_optim: str = "adam"
    ebd_lr: float = 0.01
    ff_init: bool = False
    # Optimisation
    meta_lr: float = 0.001
    meta_wd: float = 0.0
    meta_optimizer: str = "adam"
    meta_scheduler: str = "none"
    gamma: float = 0.1
    metagrad_clip: float = -1.0

    # ---- settings this implementation adds (not flags of the paper's script) ----
    data_dir: str = field(default_factory=default_data_dir)
    device: str = "auto"  # "auto": CUDA when available, else CPU
    limit_train_batches: int = -1  # -1: the whole epoch
    limit_eval_batches: int = -1
    validation_split: float = 0.0  # fraction of the training set held out (seeded) for tuning
    validation_seed: int = 0
    track_free_output: bool = True  # LCP trainers: also solve the free equilibrium for train stats
    controller_solver: str = "euler"  # lcp-di/kp/lf: 'anderson' reaches the same fixed point faster
    align: bool = True  # LCP trainers: cosine of the update to the exact gradient (lcp.alignment)
    align_every: int = 0  # also every K optimizer steps (0: at epoch ends only)
    # Every K epochs, evaluate the test (and validation) set only to watch the run (learning
    # curves, health): the RNGs and buffers are put back afterwards, so the run trains
    # bit-identically to an unwatched one. The paper's eval_epochs keeps the paper's meaning,
    # perturbation included (making a loader's iterator draws from the global generator, so
    # every later shuffle moves). 0: off; an epoch that eval_epochs evaluates is not evaluated twice.
    watch_epochs: int = 0
    # A step whose update (or a solve inside it) is not finite is skipped: weights, optimizer
    # and trainer state stay as before it (as AMP's GradScaler skips such a step). Past this
    # many skipped steps in one epoch the run ends with the divergence: a value below 1 is a
    # share of the epoch's steps (at least 1 step), from 1 a count; 0 never skips (the first
    # such step ends the run). The default, 1 % of an epoch (9 of MNIST's 938 steps at batch
    # 64), lets a run pass a rare bad batch, where one float-order difference sends a solve off,
    # and still ends within its epoch a run whose dynamics diverge on a steady share of batches.
    skip_limit: float = 0.01
    # lcp-lf's noise in its noisy phase: 'counter' (lcp.noise: i.i.d. N(0, 1) numbers computed
    # where they are used, on every thread: faster lcp-lf rows on CPU, docs/speed.md) or 'paper'
    # (PyTorch's generator, the same calls as the paper's code, to compare with it draw for draw)
    lf_noise: str = "counter"

    def __post_init__(self) -> None:
        self._coerce_types()
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def field_kinds(cls) -> dict[str, str]:
        """Each setting's kind: 'bool', 'int', 'float' or 'str'."""
        return {f.name: _field_kind(f) for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RunConfig":
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; valid settings are: "
                + ", ".join(cls.field_names()), unknown[0]
            )
        return cls(**dict(values))

    def replace(self, **changes: Any) -> "RunConfig":
        return RunConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """The hash of what the run computes: every setting but NOT_HASHED, and but those of
        HASHED_WHEN_SET and HASHED_FOR where they leave an earlier run's computation as it was."""
        defaults = RunConfig.__dataclass_fields__
        payload = {k: v for k, v in self.to_dict().items() if k not in NOT_HASHED
                   and not (k in HASHED_WHEN_SET and v == defaults[k].default)
                   and not (k in HASHED_FOR and (self.trainer not in HASHED_FOR[k][0]
                                                 or v == HASHED_FOR[k][1]))}
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def skip_allowance(self, steps_per_epoch: int) -> int:
        """How many steps of one epoch may be skipped (skip_limit as a count)."""
        if self.skip_limit < 1:
            return max(1, math.floor(self.skip_limit * steps_per_epoch)) if self.skip_limit else 0
        return int(self.skip_limit)

    def evaluation_after(self, epoch: int) -> str | None:
        """Which evaluation of the test set follows epoch `epoch` (counted from 1): 'paper'
        (every eval_epochs, as the paper's script), 'watch' (every watch_epochs, leaving the run
        unchanged) or None."""
        if self.eval_epochs > 0 and epoch % self.eval_epochs == 0:
            return "paper"
        if self.watch_epochs > 0 and epoch % self.watch_epochs == 0:
            return "watch"
        return None

    # ------------------------------------------------------------------ validation
    def _coerce_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            kind = _field_kind(f)
            try:
                setattr(self, f.name, _coerce(value, kind))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"setting '{f.name}': {exc}", f.name) from None

    def validate(self) -> None:
        if self.model is None:
            raise ConfigError(
                "setting 'model' must be given (as in the paper's script); valid values are: "
                + ", ".join(MODELS), "model"
            )
        for name, valid in CHOICES.items():
            value = getattr(self, name)
            if value not in valid:
                raise ConfigError(
                    f"setting '{name}' is {value!r}; valid values are: {', '.join(valid)}", name
                )

        if self.trainer not in SUPPORTED_PAIRS[self.model]:
            pairs = "; ".join(f"{m}: {', '.join(t)}" for m, t in SUPPORTED_PAIRS.items())
            raise ConfigError(
                f"trainer '{self.trainer}' does not run on model '{self.model}' "
                f"(supported pairs — {pairs})", "trainer"
            )
        # (ff and rnn on cifar10: the paper never ran it, but it is well defined: 3×32×32 flat)
        if self.model in ("conv-ff", "conv-rnn") and self.data != "cifar10":
            raise ConfigError(
                f"model '{self.model}' takes 3×32×32 images: use --data=cifar10 "
                f"(got --data={self.data})", "data"
            )
        positive = ["num_epochs", "batch_size", "solver_max_iter", "rnn_hidden_units"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"setting '{name}' must be ≥ 1 (got {getattr(self, name)})", name)
        for name in ("dt", "tau_v", "tau_u", "tau_e", "tau_eps", "tau_Q", "timescale_factor",
                     "solver_error_threshold", "meta_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"setting '{name}' must be > 0 (got {getattr(self, name)})", name)
        if self.trainer == "lcp-lf" and not self.sigma > 0:
            raise ConfigError(f"lcp-lf needs 'sigma' > 0 (got {self.sigma})", "sigma")
        if self.trainer == "lcp-ebd" and not self.alpha > 0:
            raise ConfigError(
                f"lcp-ebd weighs the loss by 1/alpha, so 'alpha' must be > 0 (got {self.alpha})",
                "alpha"
            )
        if self.solver == "anderson" and self.solver_max_iter < 3:
            raise ConfigError("the anderson solver needs 'solver_max_iter' ≥ 3", "solver_max_iter")
        if not 0.0 <= self.validation_split < 1.0:
            raise ConfigError(
                f"setting 'validation_split' must be in [0, 1) (got {self.validation_split})",
                "validation_split"
            )
        if self.device != "auto" and not (
            self.device == "cpu" or self.device.startswith("cuda")
        ):
            raise ConfigError(f"setting 'device' is {self.device!r}; use auto, cpu, cuda or cuda:N",
                              "device")
        for name in ("limit_train_batches", "limit_eval_batches"):
            if getattr(self, name) == 0:
                raise ConfigError(f"setting '{name}' must be ≥ 1, or -1 for every batch (got 0: "
                                  "an epoch without batches)", name)
        if not (self.skip_limit >= 0 and (self.skip_limit < 1 or self.skip_limit.is_integer())):
            raise ConfigError("setting 'skip_limit' must be a share of an epoch's steps in "
                              "[0, 1) or a whole count ≥ 1 (0: never skip a step; got "
                              f"{self.skip_limit})", "skip_limit")
        for name in ("eval_epochs", "align_every", "watch_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"setting '{name}' must be ≥ 0 (got {getattr(self, name)})",
                                  name)


def _field_kind(f: dataclasses.Field) -> str:
    """'bool', 'int' or 'float' as annotated, else 'str' (also `str | None`)."""
    return f.type if f.type in ("bool", "int", "float") else "str"


def _coerce(value: Any, kind: str) -> Any:
    """`value` as a setting of `kind`, from its own type or from text (as the paper's argparse
    reads it; an integer may also be written as '1e3' or 800.0)."""
    if value is None:
        return None
    if kind == "bool":
        return parse_bool(value)
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError(f"expected text, got {value!r}")
        return value
    what = "an integer" if kind == "int" else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"expected {what}, got {value!r}")
    if kind == "int" and isinstance(value, int):
        return value
    if kind == "int" and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)  # exact, also beyond float's 53 bits
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"expected {what}, got {value!r}") from None
    if kind == "float":
        if not math.isfinite(number):  # nan/inf pass every comparison check below unnoticed
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if not math.isfinite(number) or not number.is_integer():
        raise ValueError(f"expected an integer, got {value!r}")
    return int(number)
