"""The compiled kernels as the trainers run them: `lcp.native` loads them, this module checks
every pass against its PyTorch definition — which lives in the trainers — before any is used.

`library()` is how the trainers get the kernels (`build_trainer` hands it to each trainer it
builds): it asks `native.load` to build and load them with `compare_all` as their check, so the
check runs once per process (and cache folder), on the first request, whatever was imported
before; `status()` and `summary()` say which passes are in use and why. The check is here, not
in `lcp.native`, because it owns both sides: it needs the trainers' definitions, and the
trainers run the passes through `lcp.native`, which therefore imports nothing of this.

`compare_all(kernels)` runs one check per pass (`CHECKS`, keyed by `lcp.native.PASSES`), each in
float64 (to 1e-10 of the largest value) and float32 (to 1e-4, rounding) on small random ff and
rnn models, through the same Python classes the trainers use, and returns {pass: what differs}
for the passes that do not agree or raise; the loader turns off each pass named. It draws from
its own random generator state (the caller's is left as it was) and never loads the kernels
itself.

What each pass is compared with:

- step: `LeastControlTrainer.controlled_map` (lcp-di on rnn with dt ≠ 1 and k_p ≠ 0, lcp-kp on ff
  with the paper's settings, lcp-lf on ff) and the l2 stopping error of that step
  (`lcp.solvers.relative_error`);
- free_step: f(h, v) (the step of `Trainer.free_equilibrium`) and its stopping error;
- noisy_step: three steps of `LinearFeedbackTrainer.noisy_step` with the same draws, and A
  (draws from PyTorch's generator, and lcp.noise's counter-based numbers computed in the pass);
- ebd_residuals: `EnergyBasedTrainer.residuals`;
- ebd_descend: two steps of torch.optim.Adam, and one of SGD, on
  `EnergyBasedTrainer.energy_gradient` (fed the definition's residuals).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from lcp import native
from lcp.config import RunConfig
from lcp.models import build_model
from lcp.solvers import relative_error
from lcp.trainers.backprop import RecurrentBackpropTrainer
from lcp.trainers.base import Trainer
from lcp.trainers.lcp_di import DynamicInversionTrainer
from lcp.trainers.lcp_ebd import EnergyBasedTrainer
from lcp.trainers.lcp_kp import KolenPollackTrainer
from lcp.trainers.lcp_lf import LinearFeedbackTrainer

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
BATCH, CLASSES, INPUT = 3, 10, (1, 4, 4)
MODELS = ("rnn", "ff")
# settings with dt ≠ 1 (the relaxations) and k_p ≠ 0, k_i ≠ 1 (u's full formula)
RELAXED = {"dt": 0.5, "tau_e": 0.8, "tau_u": 2.0, "k_p": 0.3, "k_i": 0.7}
NOISE_KEY = 0x2545F4914F6CDD1D  # any key: lcp-lf's counter-based noise (lcp.noise)


def _dtype_name(dtype) -> str:
    return str(dtype).rpartition(".")[2]


def _setup(trainer: type[Trainer], model: str, dtype, hidden: int = 8, **settings):
    """(cfg, model, trainer, h, onehot): a small random model (`hidden` units per layer) and a
    batch of BATCH encodings. The trainer is made from its class (this module is below
    `build_trainer`, which hands it `library`): the check runs the passes itself and asks the
    trainer only for definitions."""
    cfg = RunConfig(model=model, trainer=trainer.name, rnn_hidden_units=hidden, alpha=0.5,
                    **settings)
    net = build_model(cfg, INPUT, CLASSES).to(dtype)
    tr = trainer(cfg, net)
    tr.auxiliary.to(dtype)
    h = net.encode(torch.rand(BATCH, *INPUT, dtype=dtype))
    onehot = F.one_hot(torch.tensor([0, 3, 9]), CLASSES).to(dtype)
    return cfg, net, tr, h, onehot


def _randn(*shape, dtype):
    return torch.randn(*shape, dtype=dtype)


def differs(what: str, got, want, dtype) -> str:
    """'' when `got` equals `want` to the tolerance of `dtype`, else what differs and by how
    much."""
    got, want = torch.as_tensor(got, dtype=dtype), torch.as_tensor(want, dtype=dtype)
    tol = TOLERANCE[dtype]
    scale = want.abs().max().item() if want.numel() else 0.0
    if got.shape == want.shape and torch.allclose(got, want, rtol=tol, atol=tol * scale):
        return ""
    if got.shape != want.shape:
        return f"{what} has shape {list(got.shape)}, its definition {list(want.shape)}"
    worst = (got - want).abs().max().item()
    return f"{what} differs from its definition by {worst:.3g} ({_dtype_name(dtype)})"


def _first(*reasons: str) -> str:
    return next((reason for reason in reasons if reason), "")


def check_step(kernels) -> str:
    """`ControlledStep.measure` against `LeastControlTrainer.controlled_map` and the l2
    stopping error of that step; then a second step, from the tanh the first pass wrote."""
    cases = ((DynamicInversionTrainer, "rnn", RELAXED), (KolenPollackTrainer, "ff", {}),
             (LinearFeedbackTrainer, "ff", RELAXED))
    for dtype in TOLERANCE:
        for trainer, model_name, settings in cases:
            _, net, tr, h, onehot = _setup(trainer, model_name, dtype, **settings)
            n = h.shape[1]
            state = (_randn(BATCH, n, dtype=dtype), _randn(BATCH, CLASSES, dtype=dtype),
                     _randn(BATCH, CLASSES, dtype=dtype), _randn(BATCH, n, dtype=dtype))
            want = torch.cat(tr.controlled_map(net.bind(h), onehot, *state), dim=1)
            flat = torch.cat(state, dim=1)
            kernel = native.ControlledStep(tr, native.Plan(net, h, kernels), onehot)
            got, per_sample, error = kernel.measure(flat)
            want_error, want_per_sample = relative_error((flat,), (want,))
            where = f"({trainer.name} on {model_name})"
            reason = _first(
                differs(f"the controlled step {where}", got, want, dtype),
                differs(f"the per-sample stopping error {where}", per_sample, want_per_sample,
                        dtype),
                differs(f"the stopping error {where}", error, want_error, dtype))
            if reason:
                return reason
            want_next = torch.cat(tr.controlled_map(net.bind(h), onehot, *want.split(
                [s.shape[1] for s in state], dim=1)), dim=1)
            reason = differs(f"the second controlled step {where}", kernel.measure(got)[0],
                             want_next, dtype)
            if reason:
                return reason
    return ""


def check_free_step(kernels) -> str:
    """`FreeStep.measure` against v ← f(h, v) and the l2 stopping error of that step."""
    for dtype in TOLERANCE:
        for model_name in MODELS:
            _, net, _, h, _ = _setup(RecurrentBackpropTrainer, model_name, dtype)
            v = _randn(BATCH, h.shape[1], dtype=dtype)
            want = net.bind(h)(v)
            got, per_sample, error = native.FreeStep(native.Plan(net, h, kernels)).measure(v)
            want_error, want_per_sample = relative_error((v,), (want,))
            reason = _first(
                differs(f"the free step (on {model_name})", got, want, dtype),
                differs(f"the per-sample stopping error (on {model_name})", per_sample,
                        want_per_sample, dtype),
                differs(f"the stopping error (on {model_name})", error, want_error, dtype))
            if reason:
                return reason
    return ""


def check_noisy_step(kernels) -> str:
    """Three `NoisySteps` steps (blocks of two; the compiled loop `run`, called for one step,
    then two) against three steps of `LinearFeedbackTrainer.noisy_step` with the same draws:
    the state and A's sum; the draws from PyTorch's generator (lf_noise=paper) and lcp.noise's
    counter-based numbers, which the pass computes itself (lf_noise=counter)."""
    steps = 3
    for dtype, model_name, key in itertools.product(TOLERANCE, MODELS, (None, NOISE_KEY)):
        # 37 units: the pass's rows of 37 (rnn) and 74 (ff) columns hold a whole tile of
        # columns and a part of one, and start on either half of the noise's pairs
        _, net, tr, h, onehot = _setup(LinearFeedbackTrainer, model_name, dtype, hidden=37,
                                       **RELAXED)
        n = h.shape[1]
        state = (_randn(BATCH, n, dtype=dtype), _randn(BATCH, CLASSES, dtype=dtype),
                 _randn(BATCH, CLASSES, dtype=dtype), _randn(BATCH, n, dtype=dtype))
        u_ref = _randn(BATCH, CLASSES, dtype=dtype)
        rates = tr.noisy_rates()
        torch.manual_seed(1)
        kernel = native.NoisySteps(native.Plan(net, h, kernels), state, tr.Q, onehot, u_ref,
                                   rates, chunk=2, noise_key=key)
        kernel.run(1)  # the compiled loop, as the trainer runs it: from an odd step on too
        kernel.run(steps - 1)
        got_a = kernel.finish()
        got = torch.cat(kernel.state(), dim=1)
        torch.manual_seed(1)
        f, want_a, ref = net.bind(h), torch.zeros_like(tr.Q), state
        for i in range(steps):
            ref, d_a = tr.noisy_step(f, onehot, u_ref, rates, tr.noise(key, i, ref[3]), *ref)
            want_a += d_a
        where = f"on {model_name}, {'PyTorch' if key is None else 'counter'} noise"
        reason = _first(
            differs(f"the noisy phase's state after {steps} steps ({where})", got,
                    torch.cat(ref, dim=1), dtype),
            differs(f"A's sum after {steps} steps ({where})", got_a, want_a, dtype))
        if reason:
            return reason
    return ""


def _descent(net, h, kernels, onehot, cfg, x) -> native.EnergyDescent:
    return native.EnergyDescent(native.Plan(net, h, kernels), x, onehot,
                                1.0 / (cfg.alpha * BATCH), cfg.ebd_optim == "adam", cfg.ebd_lr)


def check_ebd_residuals(kernels) -> str:
    """`EnergyDescent.residuals` against `EnergyBasedTrainer.residuals`."""
    for dtype in TOLERANCE:
        for model_name in MODELS:
            cfg, net, tr, h, onehot = _setup(EnergyBasedTrainer, model_name, dtype)
            v, v_hat = _randn(BATCH, h.shape[1], dtype=dtype), _randn(BATCH, CLASSES, dtype=dtype)
            descent = _descent(net, h, kernels, onehot, cfg, torch.cat([v, v_hat], dim=1))
            descent.residuals()
            want_f, want_d = tr.residuals(net.bind(h), v, v_hat)
            reason = _first(differs(f"r_f (on {model_name})", descent.r_f, want_f, dtype),
                            differs(f"r_d (on {model_name})", descent.r_d, want_d, dtype))
            if reason:
                return reason
    return ""


def check_ebd_descend(kernels) -> str:
    """`EnergyDescent.descend` fed the definition's residuals against torch.optim.Adam (two
    steps) and SGD (one) on `EnergyBasedTrainer.energy_gradient`."""
    for dtype in TOLERANCE:
        for model_name in MODELS:
            for optim, lr, steps in (("adam", 0.01, 2), ("gd", 0.1, 1)):
                cfg, net, tr, h, onehot = _setup(EnergyBasedTrainer, model_name, dtype,
                                                 ebd_optim=optim, ebd_lr=lr)
                n, f = h.shape[1], net.bind(h)
                v, v_hat = _randn(BATCH, n, dtype=dtype), _randn(BATCH, CLASSES, dtype=dtype)
                x = torch.cat([v, v_hat], dim=1)
                descent = _descent(net, h, kernels, onehot, cfg, x)
                optimizer = (torch.optim.Adam if optim == "adam" else torch.optim.SGD)(
                    [v, v_hat], lr=lr)
                for step in range(1, steps + 1):
                    torch.tanh(x[:, :n], out=descent.plan.t)
                    r_f, r_d = tr.residuals(f, x[:, :n], x[:, n:])
                    descent.r_f.copy_(r_f)
                    descent.r_d.copy_(r_d)
                    descent.descend(step)
                    v.grad, v_hat.grad = tr.energy_gradient(f, onehot, v, v_hat)
                    optimizer.step()
                reason = _first(
                    differs(f"x after {steps} {optim} step(s) (on {model_name})", x,
                            torch.cat([v, v_hat], dim=1), dtype),
                    differs(f"tanh(v) written by the descent (on {model_name})",
                            descent.plan.t, torch.tanh(v.detach()), dtype))
                if reason:
                    return reason
    return ""


CHECKS = {
    "step": check_step,
    "free_step": check_free_step,
    "noisy_step": check_noisy_step,
    "ebd_residuals": check_ebd_residuals,
    "ebd_descend": check_ebd_descend,
}


def compare_all(kernels) -> dict[str, str]:
    """{pass: what differs from its definition} for each pass of `kernels` that fails its check
    (a pass that raises fails it); empty when every pass agrees."""
    failed = {}
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for name in native.PASSES:
            torch.manual_seed(0)
            try:
                reason = CHECKS[name](kernels)
            except Exception as exc:  # noqa: BLE001 - a pass that raises is one that fails
                reason = f"it raised {type(exc).__name__}: {exc}"
            if reason:
                failed[name] = reason
    return failed


def _loaded() -> tuple[native.Kernels | None, str]:
    """(kernels, '') or (None, why not): loaded and checked by `compare_all` on first use."""
    return native.load(compare_all)


def library() -> native.Kernels | None:
    """The compiled kernels, built and checked on first use; None where they cannot be had, no
    pass passed its check or `LCP_NATIVE=0` is set. Some passes may be off (`Kernels.off`):
    `native.plan_for` asks for the ones a caller needs."""
    return _loaded()[0]


def _passes_off(lib: native.Kernels) -> str:
    return "; ".join(f"{name} ({why})" for name, why in lib.off.items())


def status() -> str:
    """One line: whether the compiled kernels are in use, which passes are off, and why."""
    lib, why = _loaded()
    if lib is None:
        return f"compiled kernels not in use: {why}; the PyTorch definition runs"
    if lib.off:
        return (f"compiled kernels in use ({lib.path}) but for the passes that failed their "
                f"check, whose PyTorch definitions run: {_passes_off(lib)}")
    return f"compiled kernels in use ({lib.path})"


def summary() -> str:
    """'on', 'on but <pass> (<why>); ...' or 'off: <why>' (for run tags and log lines)."""
    lib, why = _loaded()
    if lib is None:
        return f"off: {why}"
    return f"on but {_passes_off(lib)}" if lib.off else "on"
