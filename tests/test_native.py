"""The compiled backend of `lcp.native` computes what the PyTorch definition computes.

- one step of the controlled dynamics, compiled against `LeastControlTrainer.controlled_step`
  (the one definition), for lcp-di/kp/lf on ff and rnn, with the paper's settings and with
  dt ≠ 1, k_p ≠ 0: the same next state (float64 to 1e-12, float32 to rounding) and the same
  stopping error;
- whole solves (controlled with Euler and Anderson, free, noisy, energy descent) with the backend
  and with `LCP_NATIVE=0` (the public setting that switches it off): the same iterations and
  results;
- no compiler, a failing compiler, a failed check on load, LCP_NATIVE=0: no kernels, one warning
  line with the reason, and training still runs.

No test here is timed: speed is measured by benchmarks/step_time.py.
"""

import contextlib
import os
import stat
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from extras import require
from lcp import native
from lcp.config import RunConfig
from lcp.models import build_model
from lcp.solvers import relative_error
from lcp.trainers import build_trainer


@pytest.fixture
def kernels():
    lib = native.library()
    require(lib is not None, native.status())
    return lib


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A clean slate for the loader: its own cache folder (the loader tries once per folder)."""
    monkeypatch.setenv("LCP_CACHE_DIR", str(tmp_path / "cache"))
    return monkeypatch


def native_off():
    """The public switch: `LCP_NATIVE=0` runs the PyTorch definition."""
    return mock.patch.dict(os.environ, {"LCP_NATIVE": "0"})


def native_on(on: bool):
    return contextlib.nullcontext() if on else native_off()


def model_and_batch(cfg, dtype=torch.float64, n=8, seed=0):
    """(model, trainer, x, y, generator): the model from seed `seed`, a batch of n MNIST-shaped
    inputs from a generator seeded `seed + 1` (left to draw more from)."""
    torch.manual_seed(seed)
    net = build_model(cfg, (1, 28, 28), 10).to(dtype)
    tr = build_trainer(cfg, net)
    tr.auxiliary.to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(n, 1, 28, 28, generator=g).to(dtype)
    y = torch.randint(0, 10, (n,), generator=g)
    return net, tr, x, y, g


def kernel_pair(cfg, dtype, n=12, seed=0):
    """The controlled step twice — compiled (`lcp.native.ControlledStep`, on a flat state) and
    the PyTorch definition (on the tuple state) — on one batch, and a random non-zero flat state
    to step from."""
    net, tr, x, y, g = model_and_batch(cfg, dtype, n, seed)
    onehot = F.one_hot(y, 10).to(dtype)
    with torch.no_grad():
        h = net.encode(x)
        compiled = native.ControlledStep(tr, native.plan_for(net, h), onehot, ring=3)
        definition = tr.controlled_step(h, onehot)
    state = torch.randn(n, compiled.block.shape[-1], generator=g).to(dtype) * 0.5

    def reference(flat):
        return torch.cat(definition(*(flat[:, r] for r in compiled.rows)), dim=1)

    return compiled, reference, state


SETTINGS = {
    "paper": {},
    "dt-kp": {"dt": 0.5, "tau_e": 0.8, "tau_u": 2.0, "k_p": 0.3, "k_i": 0.7},
}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("model", ["ff", "rnn"])
@pytest.mark.parametrize("trainer", ["lcp-di", "lcp-kp", "lcp-lf"])
def test_compiled_step_equals_the_pytorch_step(kernels, trainer, model, dtype, setting):
    cfg = RunConfig(model=model, trainer=trainer, rnn_hidden_units=32, alpha=0.1,
                    **SETTINGS[setting])
    compiled, reference, state = kernel_pair(cfg, dtype)
    with torch.no_grad():
        want = reference(state.clone())
        got, per_sample, error = compiled.measure(state.clone())
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item())
    # the stopping error the compiled pass measured is the solver's l2 error of that step
    expect_max, expect = relative_error((state,), (want,))
    assert torch.allclose(per_sample, expect, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    assert error == pytest.approx(expect_max.item(), rel=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("model", ["ff", "rnn"])
def test_compiled_solve_at_the_paper_sizes_gives_the_pytorch_update(kernels, model):
    """Float32, 256 units, batch 64, the seed line's settings: the same iteration count and the
    same update as the PyTorch kernels."""
    cfg = RunConfig(model=model, trainer="lcp-di", alpha=0.1)

    def update(compiled):
        with native_on(compiled):
            net, tr, x, y, _ = model_and_batch(cfg, torch.float32, n=64, seed=2)
            stats = tr.compute_update(x, y)
            return torch.cat([p.grad.flatten() for p in net.parameters()]), stats

    fast, fast_stats = update(True)
    ref, ref_stats = update(False)
    assert fast_stats["controlled/iterations"] == ref_stats["controlled/iterations"]
    assert F.cosine_similarity(fast, ref, dim=0).item() > 0.999999
    assert torch.allclose(fast.norm(), ref.norm(), rtol=1e-5)


def test_diverging_dynamics_raise_through_the_compiled_step(kernels):
    from lcp.errors import DivergenceError

    cfg = RunConfig(model="ff", trainer="lcp-di", rnn_hidden_units=32, alpha=10.0,
                    solver_max_iter=800, solver_error_threshold=1e-10)
    torch.manual_seed(0)
    net = build_model(cfg, (1, 28, 28), 10)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    with pytest.raises(DivergenceError) as info:
        build_trainer(cfg, net).compute_update(x, y)
    assert info.value.phase == "controlled"


def one_step_update(cfg):
    net, tr, x, y, _ = model_and_batch(cfg)
    stats = tr.compute_update(x, y)
    return torch.cat([p.grad.flatten() for p in net.parameters()]), stats


def test_without_a_compiler_the_pytorch_definition_runs(fresh_native):
    fresh_native.setenv("CXX", "/nonexistent/c++")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler .* PyTorch definition"):
        assert native.library() is None
    assert "no C++ compiler" in native.status() and "set CXX" in native.status()
    cfg = RunConfig(model="ff", trainer="lcp-di", rnn_hidden_units=32, alpha=0.1)
    update, stats = one_step_update(cfg)
    assert stats["controlled/iterations"] > 1 and torch.isfinite(update).all()


def test_a_failing_compiler_is_reported_and_falls_back(fresh_native, tmp_path):
    fake = tmp_path / "c++"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo 'c++ (fake) 12'; exit 0; }\n"
                    "echo 'fatal: no headers here' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    fresh_native.setenv("CXX", str(fake))
    with pytest.warns(RuntimeWarning, match="no headers here"):
        assert native.library() is None
    assert "no headers here" in native.status()
    assert not list((tmp_path / "cache" / "native").rglob("*.so"))  # nothing half-built left


def test_a_library_that_fails_its_check_on_load_is_not_used(fresh_native, kernels, tmp_path):
    assert native.self_check(kernels) == {}  # the real library agrees with the definitions
    fresh_native.setenv("LCP_CACHE_DIR", str(tmp_path / "again"))  # load afresh
    every_pass_differs = {name: "its controlled step differs" for name in native.PASSES}
    fresh_native.setattr(native, "self_check", lambda lib: every_pass_differs)
    with pytest.warns(RuntimeWarning, match="its controlled step differs"):
        assert native.library() is None
    assert native.summary().startswith("off: ")
    assert "its controlled step differs" in native.summary()


def test_lcp_native_0_switches_the_kernels_off(fresh_native):
    fresh_native.setenv("LCP_NATIVE", "0")
    assert native.library() is None
    assert "LCP_NATIVE=0" in native.status()


def test_the_build_is_cached(fresh_native, kernels):
    lib = native.library()
    assert lib is not None and lib.path.exists()
    first = lib.path.stat().st_mtime_ns
    again = native._build(native._compiler())
    assert again == lib.path and again.stat().st_mtime_ns == first


def test_the_build_cache_is_keyed_by_the_cpu(fresh_native, kernels):
    """A folder shared by machines with other CPUs (containers, resized VMs) never hands one of
    them a build for another instruction set."""
    path = native._build(native._compiler())
    fresh_native.setattr(native, "_cpu_features", lambda: "flags: sse2")
    other = native._build(native._compiler())
    assert other != path and other.exists()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("model", ["ff", "rnn"])
def test_compiled_free_solve_equals_the_pytorch_solve(kernels, monkeypatch, model, dtype):
    cfg = RunConfig(model=model, trainer="rbp", rnn_hidden_units=64,
                    solver_error_threshold=1e-7 if dtype == torch.float64 else 1e-5)
    torch.manual_seed(0)
    net = build_model(cfg, (1, 28, 28), 10).to(dtype)
    tr = build_trainer(cfg, net)
    x = torch.rand(16, 1, 28, 28).to(dtype)
    with torch.no_grad():
        h = net.encode(x)
        assert native.plan_for(net, h) is not None
        fast, fast_stats = tr.free_equilibrium(h)
        with native_off():
            assert native.plan_for(net, h) is None
            ref, ref_stats = tr.free_equilibrium(h)
    assert fast_stats.iterations == ref_stats.iterations > 2
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(fast, ref, rtol=tol, atol=tol)
    # the definition adds the bias after the product (h + (t Wᵀ + b)), the pass before it
    # (h_b + t Wᵀ): each element of f(v) - v is rounded differently, by a few units in the last
    # place of the state's elements, so the two residuals (l2 norms of f(v) - v) may differ by
    # a few eps·‖v‖ — whatever the CPU, its BLAS or the order of its sums
    bound = 8 * torch.finfo(dtype).eps * fast.norm(dim=-1).max().item()
    assert abs(fast_stats.residual - ref_stats.residual) <= bound, (
        fast_stats.residual, ref_stats.residual, bound)
    # it is the fixed point of f
    assert torch.allclose(net.implicit(h, fast), fast, atol=1e-4)


@pytest.mark.parametrize("model", ["ff", "rnn"])
@pytest.mark.parametrize("trainer", ["lcp-di", "lcp-kp", "lcp-lf"])
def test_anderson_on_the_compiled_step_equals_anderson_on_the_definition(trainer, model,
                                                                         kernels):
    """The accelerated controller solver (one Anderson, `lcp.solvers.anderson_joint`) iterating
    the compiled step and the PyTorch definition: the same iterations and update (float64)."""
    cfg = RunConfig(model=model, trainer=trainer, rnn_hidden_units=32, alpha=0.1,
                    controller_solver="anderson", solver_error_threshold=1e-9,
                    solver_max_iter=500)

    def update(compiled):
        with native_on(compiled):
            net, tr, x, y, _ = model_and_batch(cfg, n=16)
            stats = tr.compute_update(x, y)
            return torch.cat([p.grad.flatten() for p in net.parameters()]), stats

    (fast, fast_stats), (ref, ref_stats) = update(True), update(False)
    assert fast_stats["controlled/hit_max_iter"] == 0
    assert fast_stats["controlled/iterations"] == ref_stats["controlled/iterations"]
    assert torch.allclose(fast, ref, rtol=1e-8, atol=1e-10 * ref.abs().max().item())


@pytest.mark.parametrize("optim", ["adam", "gd"])
@pytest.mark.parametrize("model", ["ff", "rnn"])
def test_compiled_energy_descent_equals_the_pytorch_descent(kernels, model, optim):
    """lcp-ebd's 200 descent steps with the compiled passes: the same minimum (float64) as the
    PyTorch kernels with torch.optim.Adam's arithmetic."""
    cfg = RunConfig(model=model, trainer="lcp-ebd", rnn_hidden_units=32, alpha=0.1,
                    solver_max_iter=200, ebd_optim=optim, ebd_lr=0.01 if optim == "adam" else 0.1)
    net, tr, x, y, _ = model_and_batch(cfg)
    with torch.no_grad():
        h = net.encode(x)
        fast = tr.energy_minimum(h, y)
        with native_off():
            ref = tr.energy_minimum(h, y)
    for a, b in zip(fast[:2], ref[:2]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
    assert fast[2]["energy/value"] == pytest.approx(ref[2]["energy/value"], rel=1e-9)


@pytest.mark.parametrize("model", ["ff", "rnn"])
def test_compiled_noisy_phase_moves_q_as_the_pytorch_one(kernels, model):
    """lcp-lf's noisy phase with the compiled pass: the same noise draws and the same Q after
    `post_update` (float64) as the PyTorch definition (`noisy_step`)."""
    cfg = RunConfig(model=model, trainer="lcp-lf", rnn_hidden_units=32, alpha=0.1,
                    solver_max_iter=100)

    def q_after_one_step(compiled):
        with native_on(compiled):
            net, tr, x, y, _ = model_and_batch(cfg)
            tr.compute_update(x, y)
            torch.manual_seed(7)  # the noise
            tr.post_update()
            return tr.Q.clone(), torch.rand(3)  # and where the generator stands after it

    (q_fast, after_fast), (q_ref, after_ref) = q_after_one_step(True), q_after_one_step(False)
    assert not torch.allclose(q_fast, model_and_batch(cfg)[1].Q)  # Q moved
    assert torch.allclose(q_fast, q_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(after_fast, after_ref)
