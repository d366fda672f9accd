"""The compiled backend of `lcp.native` computes what the PyTorch definition computes.

- one step of the controlled dynamics, compiled against `LeastControlTrainer.controlled_step`
  (the one definition), for lcp-di/kp/lf on ff and rnn, with the paper's settings and with
  dt ≠ 1, k_p ≠ 0: the same next state (float64 to 1e-12, float32 to rounding) and the same
  stopping error;
- whole solves (controlled with Euler and Anderson, free, noisy, energy descent) with the backend
  and with `LCP_NATIVE=0` (the public setting that switches it off): the same iterations and
  results;
- no compiler, a failing compiler, a failed check on load, LCP_NATIVE=0: no kernels, one warning
  line with the reason, and training still runs;
- each pass's binding rejects a tensor of the wrong dtype, device, shape or layout with an error
  that names the argument;
- the check on load: a pass made wrong (here, by a wrapper that changes its output) is the one
  pass turned off, named by one warning line and by `status()`; the other passes stay in use.

No test here is timed: speed is measured by benchmarks/step_time.py.
"""

import contextlib
import os
import shutil
import stat
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from extras import require
from lcp import native
from lcp.config import RunConfig
from lcp.models import build_model
from lcp.noise import counter_normal
from lcp.solvers import relative_error
from lcp.trainers import build_trainer, native_check


@pytest.fixture
def kernels():
    lib = native_check.library()
    require(lib is not None, native_check.status())
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
        compiled = native.ControlledStep(tr, native.plan_for(net, h, native_check.library), onehot,
                                          ring=3)
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
        assert native_check.library() is None
    assert "no C++ compiler" in native_check.status() and "set CXX" in native_check.status()
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
        assert native_check.library() is None
    assert "no headers here" in native_check.status()
    assert not list((tmp_path / "cache" / "native").rglob("*.so"))  # nothing half-built left


def test_a_library_that_fails_its_check_on_load_is_not_used(fresh_native, kernels, tmp_path):
    assert native_check.compare_all(kernels) == {}  # the real library agrees with the definitions
    fresh_native.setenv("LCP_CACHE_DIR", str(tmp_path / "again"))  # load afresh
    every_pass_differs = {name: "its controlled step differs" for name in native.PASSES}
    fresh_native.setattr(native_check, "compare_all", lambda lib: every_pass_differs)
    with pytest.warns(RuntimeWarning, match="its controlled step differs"):
        assert native_check.library() is None
    assert native_check.summary().startswith("off: ")
    assert "its controlled step differs" in native_check.summary()


def test_lcp_native_0_switches_the_kernels_off(fresh_native):
    fresh_native.setenv("LCP_NATIVE", "0")
    assert native_check.library() is None
    assert "LCP_NATIVE=0" in native_check.status()


def test_the_build_is_cached(fresh_native, kernels):
    lib = native_check.library()
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
        assert native.plan_for(net, h, native_check.library) is not None
        fast, fast_stats = tr.free_equilibrium(h)
        with native_off():
            assert native.plan_for(net, h, native_check.library) is None
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


@pytest.mark.parametrize("lf_noise", ["counter", "paper"])
@pytest.mark.parametrize("model", ["ff", "rnn"])
def test_compiled_noisy_phase_moves_q_as_the_pytorch_one(kernels, model, lf_noise):
    """lcp-lf's noisy phase with the compiled pass: the same noise draws and the same Q after
    `post_update` (float64) as the PyTorch definition (`noisy_step`), with PyTorch's draws and
    with the counter-based noise the pass computes itself (31 hidden units: the rnn's rows of 31
    start on both halves of the noise's pairs)."""
    cfg = RunConfig(model=model, trainer="lcp-lf", rnn_hidden_units=31, alpha=0.1,
                    solver_max_iter=100, lf_noise=lf_noise)

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


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lf_noise", ["counter", "paper"])
@pytest.mark.parametrize("model", ["ff", "rnn"])
def test_the_compiled_noisy_loop_equals_its_steps_bit_for_bit(kernels, model, lf_noise, dtype):
    """`NoisySteps.run` (the loop in one compiled call, the trainer's path) gives exactly what
    `NoisySteps.step` (one call per piece, from Python) gives: the state, A's sum and the
    generator's position after it, for runs that start and end inside a block of steps and on
    an odd step."""
    # 37 units: rows of 37 (rnn) and 74 (ff) columns, a whole tile of the pass and a part
    cfg = RunConfig(model=model, trainer="lcp-lf", rnn_hidden_units=37, alpha=0.1,
                    solver_max_iter=50, lf_noise=lf_noise)
    net, tr, x, y, _ = model_and_batch(cfg, dtype)
    tr.compute_update(x, y)

    def noisy(run):
        torch.manual_seed(3)
        with torch.no_grad():
            h, onehot, u_ref, state, key = tr.noisy_start(tr.last)
            plan = native.plan_for(net, h, lambda: kernels, *native.NoisySteps.passes)
            loop = native.NoisySteps(plan, state, tr.Q, onehot, u_ref, tr.noisy_rates(), chunk=4,
                                     noise_key=key)
            run(loop)
            return [t.clone() for t in loop.state()], loop.finish().clone(), torch.rand(2)

    def by_steps(loop):
        for _ in range(11):
            loop.step()

    def by_runs(loop):
        for steps in (1, 0, 6, 4):
            loop.run(steps)

    (state, a_sum, after), (state_ref, a_ref, after_ref) = noisy(by_runs), noisy(by_steps)
    assert a_ref.abs().sum() > 0
    assert all(torch.equal(s, r) for s, r in zip(state, state_ref))
    assert torch.equal(a_sum, a_ref) and torch.equal(after, after_ref)


def test_the_noisy_pass_without_its_noise_or_tanh_leaves_just_that_out(kernels):
    """`NoisySteps.run_pass`'s flags (the loop profile's parts of the pass): with the noise left
    out, ξ is read from `xi`, so filling it with the step's counter numbers gives the full
    pass's state; with tanh(v′) left out, t keeps the tanh it had while the state moves alike."""
    cfg = RunConfig(model="ff", trainer="lcp-lf", rnn_hidden_units=37, alpha=0.1,
                    solver_max_iter=5)
    net, tr, x, y, _ = model_and_batch(cfg)
    tr.compute_update(x, y)

    def one_pass(xi_scale=1.0, **flags):
        torch.manual_seed(3)
        with torch.no_grad():
            h, onehot, u_ref, state, key = tr.noisy_start(tr.last)
            plan = native.plan_for(net, h, lambda: kernels, *native.NoisySteps.passes)
            loop = native.NoisySteps(plan, state, tr.Q, onehot, u_ref, tr.noisy_rates(),
                                     chunk=2, noise_key=key)
            loop.xi.copy_(xi_scale * loop.noise_scale
                          * counter_normal(key, 0, loop.xi.shape, loop.xi.dtype))
            t_before = plan.t.clone()
            loop.products()
            loop.run_pass(**flags)
        return torch.cat([loop.v_next, loop.vh_next, loop.u_i, loop.eps], 1), t_before, plan.t

    full, t_before, t_full = one_pass()
    read, _, _ = one_pass(noise=False)
    read_zeros, _, _ = one_pass(xi_scale=0.0, noise=False)
    kept, t_kept_before, t_kept = one_pass(next_tanh=False)
    assert torch.allclose(read, full, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(read_zeros, full, rtol=1e-10, atol=1e-12)  # ξ is read from xi
    assert not torch.equal(t_full, t_before)  # the full pass wrote tanh(v′)
    assert torch.equal(kept, full) and torch.equal(t_kept, t_kept_before)


def test_the_noisy_loop_rejects_bad_arguments_naming_them(kernels):
    cfg = RunConfig(model="ff", trainer="lcp-lf", rnn_hidden_units=8, alpha=0.1,
                    solver_max_iter=5)
    net, tr, x, y, _ = model_and_batch(cfg)
    tr.compute_update(x, y)
    with torch.no_grad():
        h, onehot, u_ref, state, key = tr.noisy_start(tr.last)
        plan = native.plan_for(net, h, lambda: kernels, *native.NoisySteps.passes)
        loop = native.NoisySteps(plan, state, tr.Q, onehot, u_ref, tr.noisy_rates(), chunk=2,
                                 noise_key=key)
    fn = kernels.get("noisy_steps")

    def call(**change):
        args = dict(first=0, steps=1, forward=plan.forward)
        args.update(zip(("v", "v_next", "v_hat", "v_hat_next"), loop.buffers))
        names = ("u_i", "eps", "xi", "t", "p_v", "h_b", "q_t", "w_d", "r_d", "b_d", "onehot",
                 "u_ref")
        args.update(zip(names, loop._fixed))
        args.update(fb=loop.fb, du=loop.du, A_sum_t=loop.A_sum_t, chunk=loop.chunk)
        names = ("k_i", "k_p", "sigma", "eps_keep", "rate_v", "rate_slow_v", "keep_ui",
                 "target_rate", "soft_rate", "threads", "next_tanh", "counter_noise",
                 "noise_key", "noise_scale")
        args.update(zip(names, loop._scalars))
        args.update(change)
        return fn(**args)

    with pytest.raises(ValueError, match="noisy_steps: argument 'chunk' must be >= 1"):
        call(chunk=0)
    with pytest.raises(ValueError, match="noisy_steps: argument 'fb' must have shape"):
        call(chunk=3)  # fb holds 2 blocks of B rows
    with pytest.raises(ValueError, match="noisy_steps: argument 'A_sum_t' must have shape"):
        call(A_sum_t=loop.A_sum_t.t().contiguous())
    with pytest.raises(ValueError, match="'first' and 'steps' must be >= 0"):
        call(steps=-1)
    a, b, out, overwrite = plan.forward[0]
    with pytest.raises(TypeError, match="noisy_steps: forward's b must be a CPU float64 tensor"):
        call(forward=[(a, b.float(), out, overwrite)])
    call(steps=0)  # nothing to do: accepted, nothing moved
    assert loop.A_sum_t.abs().sum() == 0


# ------------------------------------------------------------------ the bindings' checks
B, N, C, R = 3, 6, 4, 2  # batch, state size, classes, the readout's first column


def valid_arguments(name: str, dtype=torch.float64) -> dict:
    """Arguments that the binding of pass `name` accepts, by keyword (zeros: only the checks
    matter here), their tensors in the binding's order."""
    def z(*shape):
        return torch.zeros(*shape, dtype=dtype)

    s = 2 * N + 2 * C
    if name == "step":
        return {"src": z(B, s), "dst": z(B, s), "t": z(B, N), "onehot": z(B, C),
                "h_b": z(B, N), "p_v": z(B, N), "p_e": z(B, N), "w_d": z(C, N - R), "r_d": R,
                "b_d": z(C), "m_u": z(C, N), "r_u": 0, "k_i": 1.0, "k_p": 0.0, "keep_ui": 0.9,
                "target_rate": 0.1, "soft_rate": -0.1, "plain_u": True, "dt_v": 1.0,
                "dt_e": 1.0, "linear_e": False, "per_sample": z(B), "next_tanh": True,
                "threads": 1}
    if name == "free_step":
        return {"src": z(B, N), "dst": z(B, N), "h_b": z(B, N), "p_v": z(B, N),
                "per_sample": z(B), "threads": 1}
    if name == "noisy_step":
        return {"v": z(B, N), "v_next": z(B, N), "v_hat": z(B, C), "v_hat_next": z(B, C),
                "u_i": z(B, C), "eps": z(B, N), "xi": z(B, N), "t": z(B, N), "p_v": z(B, N),
                "h_b": z(B, N), "q_t": z(C, N), "w_d": z(C, N - R), "r_d": R, "b_d": z(C),
                "onehot": z(B, C), "u_ref": z(B, C), "fb": z(B, N), "du": z(B, C), "k_i": 1.0,
                "k_p": 0.0, "sigma": 0.1, "eps_keep": 0.9, "rate_v": 1.0, "rate_slow_v": 0.1,
                "keep_ui": 0.9, "target_rate": 0.1, "soft_rate": -0.1, "threads": 1,
                "next_tanh": True, "counter_noise": True, "noise_key": 5, "noise_scale": 0.2, "noise_step": 3}
    if name == "ebd_residuals":
        return {"x": z(B, N + C), "t": z(B, N), "p_v": z(B, N), "h_b": z(B, N),
                "w_d": z(C, N - R), "r_d0": R, "b_d": z(C), "r_f": z(B, N), "r_d": z(B, C),
                "threads": 1}
    assert name == "ebd_descend"
    return {"x": z(B, N + C), "t": z(B, N), "r_f": z(B, N), "r_d": z(B, C), "p_e": z(B, N),
            "w_d": z(C, N - R), "r_d0": R, "onehot": z(B, C), "inv_alpha_b": 1.0,
            "exp_avg": z(B, N + C), "exp_avg_sq": z(B, N + C), "adam": True, "lr": 0.01,
            "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "bias_correction1": 0.1,
            "bias_correction2": 0.001, "next_tanh": True, "threads": 1}


def tensor_arguments(name: str) -> list[str]:
    return [k for k, v in valid_arguments(name).items() if isinstance(v, torch.Tensor)]


CASES = [(name, arg) for name in native.PASSES for arg in tensor_arguments(name)]


def faulty(name: str, arg: str, fault: str):
    """The tensor `arg` of pass `name` made wrong by `fault`."""
    good = valid_arguments(name)[arg]
    first = arg == tensor_arguments(name)[0]
    if fault == "dtype":  # the first tensor sets the dtype: there, one that is no float type
        return good.to(torch.int32 if first else torch.float32)
    if fault == "device":
        return good.to("meta")
    if fault == "dims":
        return good.unsqueeze(0)
    if fault == "size":  # one row (or element) too many
        return torch.zeros(good.shape[0] + 1, *good.shape[1:], dtype=good.dtype)
    assert fault == "layout"  # the right shape, not contiguous
    if good.dim() == 1:
        return torch.zeros(2 * good.shape[0], dtype=good.dtype)[::2]
    return torch.zeros(good.shape[1], good.shape[0], dtype=good.dtype).t()


EXPECTED = {"dtype": (TypeError, "must be a float"), "device": (TypeError, "must be a CPU tensor"),
            "dims": (ValueError, "must have 2 dimensions|must have 1 dimension"),
            "size": (ValueError, "must have"), "layout": (ValueError, "must be contiguous")}


@pytest.mark.parametrize("name", native.PASSES)
def test_each_binding_runs_on_valid_tensors_of_either_dtype(kernels, name):
    for dtype in (torch.float64, torch.float32):
        kernels.get(name)(**valid_arguments(name, dtype))
    if name in ("step", "ebd_descend"):  # p_e may be left out
        kernels.get(name)(**(valid_arguments(name) | {"p_e": None}))


# every fault for every tensor argument, but a wrong size of a pass's first tensor: its rows are
# B, and a wrong B is reported at the tensor checked next
FAULTS = [(name, arg, fault) for name, arg in CASES for fault in EXPECTED
          if not (fault == "size" and arg == tensor_arguments(name)[0])]


@pytest.mark.parametrize("name,arg,fault", FAULTS)
def test_each_binding_rejects_a_wrong_tensor_naming_it(kernels, name, arg, fault):
    """Every tensor argument of every pass: a wrong dtype, a tensor off the CPU, a wrong number
    of dimensions, a wrong size and a non-contiguous tensor are refused before the pass runs,
    with the pass and the argument named."""
    error, expectation = EXPECTED[fault]
    arguments = valid_arguments(name) | {arg: faulty(name, arg, fault)}
    with pytest.raises(error, match=f"^{name}: argument '{arg}' ({expectation})"):
        kernels.get(name)(**arguments)


def test_the_bindings_reject_inconsistent_sizes_and_columns(kernels):
    step = kernels.get("step")
    with pytest.raises(ValueError, match="argument 'src' must have 2N \\+ 2C = 20 columns"):
        step(**(valid_arguments("step") | {"src": torch.zeros(B, 21, dtype=torch.float64)}))
    with pytest.raises(ValueError, match="argument 'r_d' must be a column of the state"):
        step(**(valid_arguments("step") | {"r_d": N + 1}))
    with pytest.raises(ValueError, match="argument 'dst' must not be the memory of 'src'"):
        args = valid_arguments("step")
        step(**(args | {"dst": args["src"]}))
    with pytest.raises(ValueError, match="argument 'threads' must be from 1 to 65536"):
        step(**(valid_arguments("step") | {"threads": 0}))
    # the passes that write tanh(v') into t while they read the state: t apart from it
    # (any overlap of bytes: t ends inside the state's memory)
    args, s = valid_arguments("step"), 2 * N + 2 * C
    shared = torch.zeros(B * s + 1, dtype=torch.float64)
    state, t_over_end = shared[:B * s].view(B, s), shared[B * s - B * N + 1:].view(B, N)
    with pytest.raises(ValueError, match="argument 't' must not be the memory of 'src'"):
        step(**(args | {"src": state, "t": t_over_end}))
    with pytest.raises(ValueError, match="argument 't' must not be the memory of 'dst'"):
        step(**(args | {"dst": state, "t": t_over_end}))
    step(**(args | {"dst": state, "t": t_over_end, "next_tanh": False}))  # t only read then
    descend, args = kernels.get("ebd_descend"), valid_arguments("ebd_descend")
    x = torch.zeros(B * (N + C) + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="argument 't' must not be the memory of 'x'"):
        descend(**(args | {"x": x[:B * (N + C)].view(B, N + C),
                           "t": x[B * (N + C) - B * N + 1:].view(B, N)}))
    with pytest.raises(TypeError):  # a pointer (an int) where a tensor goes
        step(**(valid_arguments("step") | {"h_b": 12345}))


def test_plan_for_knows_the_passes(kernels):
    assert set(native_check.CHECKS) == set(native.PASSES)
    net = build_model(RunConfig(model="ff", trainer="lcp-di", rnn_hidden_units=8), (1, 4, 4), 10)
    h = net.encode(torch.rand(2, 1, 4, 4))
    assert native.plan_for(net, h, native_check.library, *native.PASSES) is not None
    with pytest.raises(ValueError, match="no compiled pass 'steps'"):
        native.plan_for(net, h, native_check.library, "steps")


def test_only_build_trainer_hands_out_the_checked_kernels(kernels):
    """The trainers `build_trainer` makes get their passes from `native_check.library` (loaded
    and checked once); one made from its class alone runs the PyTorch definition."""
    from lcp.trainers import TRAINERS

    cfg = RunConfig(model="ff", trainer="rbp", rnn_hidden_units=8)
    net = build_model(cfg, (1, 4, 4), 10)
    h = net.encode(torch.rand(2, 1, 4, 4))
    assert build_trainer(cfg, net).kernels is native_check.library
    with mock.patch.object(native, "FreeStep",
                           side_effect=AssertionError("a pass ran without its check")):
        TRAINERS["rbp"](cfg, net).free_equilibrium(h)


# ------------------------------------------------------------------------ the check on load
# where each pass writes what the check compares (the index of that tensor among its arguments)
OUTPUT = {"step": 1, "free_step": 1, "noisy_step": 1, "ebd_residuals": 7, "ebd_descend": 0,
          "noisy_steps": 4}
# the loops that run a pass (the trainer's path, which the check runs): made wrong with it
LOOP_OF = {"noisy_step": "noisy_steps"}


@pytest.fixture
def reloaded(monkeypatch, tmp_path, kernels):
    """Loads the kernels afresh (their own cache folder, with a copy of the built library: no
    build) when `native_check.library()` is next called."""
    folder = tmp_path / "copy" / "native"
    folder.mkdir(parents=True)
    shutil.copyfile(kernels.path, folder / kernels.path.name)
    monkeypatch.setenv("LCP_CACHE_DIR", str(folder.parent))
    return monkeypatch


@pytest.mark.parametrize("name", native.PASSES)
def test_a_pass_that_differs_from_its_definition_is_turned_off_alone(reloaded, name):
    real_get = native.Kernels.get

    def get(self, pass_name):
        fn = real_get(self, pass_name)
        if pass_name not in (name, LOOP_OF.get(name)):
            return fn

        def wrong(*args):  # the real pass, then its output moved a little
            result = fn(*args)
            args[OUTPUT[pass_name]].add_(1e-3)
            return result

        return wrong

    reloaded.setattr(native.Kernels, "get", get)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = native_check.library()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert lib is not None and list(lib.off) == [name]
    assert len(messages) == 1 and f"the compiled pass {name} is not in use" in messages[0]
    assert "differs from its definition" in messages[0]
    assert name in native_check.status() and "failed their check" in native_check.status()
    assert native_check.summary().startswith(f"on but {name} (")
    net = build_model(RunConfig(model="ff", trainer="lcp-di", rnn_hidden_units=8), (1, 4, 4), 10)
    h = net.encode(torch.rand(2, 1, 4, 4))
    assert native.plan_for(net, h, native_check.library, name) is None  # the definition runs
    for other in native.PASSES:
        if other != name:
            assert native.plan_for(net, h, native_check.library, other) is not None


@pytest.mark.parametrize("name", native.PASSES)
def test_a_pass_that_raises_in_its_check_is_turned_off_alone(reloaded, name):
    def broken(kernels):
        raise RuntimeError("broken on purpose")

    reloaded.setitem(native_check.CHECKS, name, broken)
    with pytest.warns(RuntimeWarning, match=f"compiled pass {name} is not in use .*broken"):
        lib = native_check.library()
    assert list(lib.off) == [name]


def test_with_a_pass_off_its_phase_runs_the_definition(reloaded):
    """lcp-lf with its noisy pass off: the controlled phase compiled, the noisy phase by the
    PyTorch definition, and Q moves as with the backend switched off."""
    reloaded.setitem(native_check.CHECKS, "noisy_step", lambda lib: "made to differ")
    with pytest.warns(RuntimeWarning, match="noisy_step"):
        assert native_check.library().off == {"noisy_step": "made to differ"}
    cfg = RunConfig(model="ff", trainer="lcp-lf", rnn_hidden_units=32, alpha=0.1,
                    solver_max_iter=50)

    def q_after_one_step(compiled):
        with native_on(compiled):
            _, tr, x, y, _ = model_and_batch(cfg)
            with mock.patch.object(native.NoisySteps, "__init__",
                                   side_effect=AssertionError("the pass that is off was used")):
                tr.compute_update(x, y)
                torch.manual_seed(7)
                tr.post_update()
            return tr.Q.clone()

    assert torch.allclose(q_after_one_step(True), q_after_one_step(False), rtol=1e-9,
                          atol=1e-11)
