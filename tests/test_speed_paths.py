"""The fast paths compute what the reference paths compute.

- the compiled backend (`lcp.native`, the default on CPU) against the PyTorch definition of
  each equation (`LCP_NATIVE=0`, the public setting), for every trainer on ff and rnn, in
  float64: same iteration counts, same updates;
- the vanilla solver checking every k steps against checking every step: the same
  iterations, returned state, residual and trace, bit for bit;
- the accelerated controller solver (`controller_solver = "anderson"`) against the paper's
  explicit Euler iteration: the same update (cosine ≥ 0.999) in fewer iterations.

No test here is timed: speed is measured by benchmarks/step_time.py.
"""

import contextlib
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from lcp.config import RunConfig
from lcp.errors import DivergenceError
from lcp.models import build_model
from lcp.solvers import Solver, anderson_joint, vanilla
from lcp.trainers import build_trainer

FLAT_TRAINERS = ["rbp", "lcp-di", "lcp-kp", "lcp-lf", "lcp-ebd"]


def with_controller(cfg: RunConfig, name: str) -> RunConfig:
    return cfg.replace(controller_solver=name)


def batch(shape=(1, 28, 28), n=16, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=g).to(dtype)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def native_on(on: bool):
    """The compiled backend as it comes (on), or `LCP_NATIVE=0` (the PyTorch definition)."""
    return contextlib.nullcontext() if on else mock.patch.dict(os.environ, {"LCP_NATIVE": "0"})


def run_update(cfg, compiled, shape=(1, 28, 28), n=16, dtype=torch.float64, trainer_state=None,
               seed=0):
    """(flat update of every trainable parameter, stats, trainer) of one step from seed 0, with
    the compiled backend or the PyTorch definition."""
    with native_on(compiled):
        return _run_update(cfg, shape, n, dtype, trainer_state, seed)


def _run_update(cfg, shape, n, dtype, trainer_state, seed):
    torch.manual_seed(seed)
    net = build_model(cfg, shape, 10).to(dtype)
    tr = build_trainer(cfg, net)
    tr.auxiliary.to(dtype)
    if trainer_state is not None:
        tr.load_state_dict(trainer_state)
    x, y = batch(shape, n, dtype=dtype)
    torch.manual_seed(5)  # lcp-lf's noise
    tr.pre_update()
    stats = tr.compute_update(x, y)
    tr.post_update()
    params = list(net.parameters()) + tr.parameters()
    update = torch.cat([p.grad.flatten() for p in params])
    return update, stats, tr


# ------------------------------------------------------------ compiled == the definition
@pytest.mark.parametrize("model", ["ff", "rnn"])
@pytest.mark.parametrize("trainer", FLAT_TRAINERS)
def test_compiled_dynamics_equal_the_definition(model, trainer):
    cfg = RunConfig(model=model, trainer=trainer, rnn_hidden_units=32, alpha=0.1,
                    solver_max_iter=300, solver_error_threshold=1e-8, ff_init=(model == "rnn"))
    ref, ref_stats, ref_tr = run_update(cfg, compiled=False)
    fast, fast_stats, fast_tr = run_update(cfg, compiled=True)
    iterations = [k for k in ref_stats if k.endswith("/iterations")]
    assert iterations
    for key in iterations:
        assert fast_stats[key] == ref_stats[key], key
    # the compiled Adam (lcp-ebd) differs from torch.optim.Adam by rounding, amplified near g = 0
    rtol = 1e-5 if trainer == "lcp-ebd" else 1e-10
    assert torch.allclose(fast, ref, rtol=rtol, atol=rtol * ref.abs().max().item())
    if trainer == "lcp-lf":  # the noisy phase draws the same noise and moves Q the same way
        assert torch.allclose(fast_tr.Q, ref_tr.Q, rtol=1e-10, atol=1e-12)


def test_compiled_controlled_equilibrium_is_a_fixed_point_of_the_definition():
    cfg = RunConfig(model="rnn", trainer="lcp-di", rnn_hidden_units=32, alpha=0.1,
                    solver_max_iter=2000, solver_error_threshold=1e-10)
    torch.manual_seed(0)
    net = build_model(cfg, (1, 28, 28), 10).double()
    tr = build_trainer(cfg, net)
    x, y = batch(dtype=torch.float64)
    h = net.encode(x).detach()
    v, v_hat, u_i, e, u, stats = tr.controlled_equilibrium(h, y, 10)
    assert stats.converged
    nxt = tr.controlled_step(h, F.one_hot(y, 10).double())(v, v_hat, u_i, e)
    for a, b in zip((v, v_hat, u_i, e), nxt):
        assert torch.allclose(a, b, atol=1e-8)


@pytest.mark.parametrize("compiled", [True, False])
def test_compiled_path_still_raises_divergence_with_the_phase(compiled):
    """alpha = 10 with dt = 1: the controlled state stops being finite at step 43 (measured;
    its float32 norm overflows from step 23, which is not yet divergence), with the compiled
    backend as with the PyTorch definition."""
    cfg = RunConfig(model="ff", trainer="lcp-di", rnn_hidden_units=32, alpha=10.0,
                    solver_max_iter=800, solver_error_threshold=1e-10)
    torch.manual_seed(0)
    net = build_model(cfg, (1, 28, 28), 10)
    x, y = batch()
    trainer = build_trainer(cfg, net)
    with native_on(compiled), pytest.raises(DivergenceError) as info:
        trainer.compute_update(x, y)
    assert info.value.phase == "controlled"
    assert info.value.iteration == 43


# ------------------------------------------------------------------ check every k steps
def contracting_map(n=12, bsz=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = 0.9 * A / torch.linalg.matrix_norm(A, ord=2)
    b = torch.randn(bsz, n, generator=g, dtype=torch.float64)
    return (lambda x: (torch.tanh(x @ A.T) + b,)), torch.zeros_like(b)


@pytest.mark.parametrize("k", [2, 3, 8, 50])
@pytest.mark.parametrize("metric", ["l2", "l_inf", "legacy_l2"])
def test_checking_every_k_steps_gives_the_every_step_result(k, metric):
    fn, x0 = contracting_map()
    (a,), sa = vanilla(fn, (x0,), max_iter=500, threshold=1e-9, metric=metric)
    (b,), sb = vanilla(fn, (x0,), max_iter=500, threshold=1e-9, metric=metric, check_every=k)
    assert sa.converged and sb.converged
    assert sb.iterations == sa.iterations
    assert torch.equal(a, b)
    assert sb.residual == sa.residual and sb.trace == sa.trace
    assert torch.equal(sb.residual_per_sample, sa.residual_per_sample)


def test_checking_every_k_steps_on_a_tuple_state_and_at_max_iter():
    fn1, x0 = contracting_map()
    fn = lambda x, z: (fn1(x)[0], 0.5 * z + 1)  # noqa: E731
    state = (x0, torch.zeros(5, 3, dtype=torch.float64))
    ref, sa = vanilla(fn, state, max_iter=13, threshold=1e-12)
    got, sb = vanilla(fn, state, max_iter=13, threshold=1e-12, check_every=4)
    assert not sa.converged and not sb.converged and sb.iterations == sa.iterations == 13
    assert all(torch.equal(p, q) for p, q in zip(ref, got))
    assert sb.trace == sa.trace


def test_checking_every_k_steps_reports_the_first_non_finite_step():
    fn = lambda x: (x * 1e30 + 1,)  # noqa: E731
    with pytest.raises(DivergenceError) as every:
        vanilla(fn, (torch.ones(2, 3),), max_iter=50, threshold=1e-6, phase="free")
    with pytest.raises(DivergenceError) as chunked:
        vanilla(fn, (torch.ones(2, 3),), max_iter=50, threshold=1e-6, phase="free",
                check_every=8)
    assert chunked.value.iteration == every.value.iteration
    assert chunked.value.phase == "free"


@pytest.mark.parametrize("model", ["ff", "rnn"])
def test_compiled_dynamics_with_check_every_k_equal_every_step(model):
    """The compiled step writes into a ring of buffers sized by `Solver.keeps`, so the states a
    chunked solver keeps stay intact: the same equilibrium, bit for bit."""
    cfg = RunConfig(model=model, trainer="lcp-di", rnn_hidden_units=32, alpha=0.1,
                    solver_max_iter=800, solver_error_threshold=1e-6)
    torch.manual_seed(0)
    net = build_model(cfg, (1, 28, 28), 10)
    tr = build_trainer(cfg, net)
    x, y = batch()
    h = net.encode(x).detach()
    every = tr.controlled_equilibrium(h, y, 10)
    tr.solver = Solver.from_config(cfg)
    tr.solver.check_every = 8
    assert tr.solver.keeps() == 8
    chunked = tr.controlled_equilibrium(h, y, 10)
    assert chunked[-1].iterations == every[-1].iterations
    assert chunked[-1].trace == every[-1].trace
    for a, b in zip(every[:5], chunked[:5]):
        assert torch.equal(a, b)


def test_solver_checks_every_step_on_cpu_and_when_the_step_has_side_effects():
    solver = Solver("vanilla", 50, 1e-4)
    cpu_state = (torch.zeros(2, 3),)
    assert solver._check_every(cpu_state, pure=True) == 1
    solver.check_every = 6
    assert solver._check_every(cpu_state, pure=True) == 6
    assert solver._check_every(cpu_state, pure=False) == 1
    assert Solver("anderson", 50, 1e-4).keeps(cpu_state) == 0


def test_conv_rnn_batchnorm_statistics_do_not_see_extra_steps():
    """conv-rnn's decoder BatchNorm updates its statistics at every call of D, so the
    controlled phase checks every step whatever `check_every` says."""
    cfg = RunConfig(model="conv-rnn", trainer="lcp-di", data="cifar10", alpha=1.0, k_i=0.3,
                    solver_max_iter=12, solver_error_threshold=1e-3)
    buffers = []
    for k in (1, 5):
        torch.manual_seed(0)
        net = build_model(cfg, (3, 32, 32), 10)
        tr = build_trainer(cfg, net)
        tr.solver.check_every = k
        x, y = batch((3, 32, 32), n=2)
        tr.compute_update(x, y)
        buffers.append([b.clone() for b in net.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*buffers))


# ------------------------------------------------------------------ accelerated controller
def anderson_problem(model, trainer, seed=0):
    cfg = RunConfig(model=model, trainer=trainer, rnn_hidden_units=256, alpha=0.1,
                    solver_max_iter=800, solver_error_threshold=1e-6, kp_wd=1e-6)
    return cfg


@pytest.mark.parametrize("model", ["ff", "rnn"])
@pytest.mark.parametrize("trainer", ["lcp-di", "lcp-kp", "lcp-lf"])
def test_anderson_controller_gives_the_euler_update_in_fewer_iterations(model, trainer):
    cfg = anderson_problem(model, trainer)
    torch.manual_seed(0)
    state = build_trainer(cfg, build_model(cfg, (1, 28, 28), 10)).state_dict()
    euler, s_euler, _ = run_update(cfg, True, n=64, dtype=torch.float32, trainer_state=state)
    fast, s_fast, _ = run_update(with_controller(cfg, "anderson"), True, n=64,
                                 dtype=torch.float32, trainer_state=state)
    assert s_euler["controlled/hit_max_iter"] == 0 and s_fast["controlled/hit_max_iter"] == 0
    assert F.cosine_similarity(fast, euler, dim=0).item() >= 0.999
    assert s_fast["controlled/iterations"] * 2 < s_euler["controlled/iterations"]


def test_anderson_controller_on_the_definition_agrees_with_the_compiled_step():
    cfg = with_controller(anderson_problem("ff", "lcp-di"), "anderson")
    ref, s_ref, _ = run_update(cfg, False, n=64, dtype=torch.float32)
    fast, s_fast, _ = run_update(cfg, True, n=64, dtype=torch.float32)
    assert F.cosine_similarity(fast, ref, dim=0).item() >= 0.99999
    assert abs(s_fast["controlled/iterations"] - s_ref["controlled/iterations"]) <= 1


def test_anderson_joint_reaches_a_known_fixed_point():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    A = q @ torch.diag(torch.linspace(0.5, 0.97, 16, dtype=torch.float64)) @ q.T
    b = torch.randn(4, 16, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(16, dtype=torch.float64) - A, b.T).T
    fn = lambda x: (x @ A.T + b,)  # noqa: E731
    (xv,), sv = vanilla(fn, (torch.zeros_like(b),), max_iter=5000, threshold=1e-10)
    (xa,), sa = anderson_joint(fn, (torch.zeros_like(b),), max_iter=5000, threshold=1e-10)
    assert sa.converged and sa.iterations * 5 < sv.iterations
    assert torch.allclose(xa, exact, atol=1e-8)


def test_unknown_controller_solver_is_refused():
    from lcp.errors import LcpError

    with pytest.raises(LcpError, match="euler, anderson"):
        RunConfig(model="ff", controller_solver="broyden")


# ------------------------------------------------------------------ lcp-lf's noisy phase
def test_lf_compiled_noisy_phase_draws_the_same_noise_and_leaves_the_generator_alike():
    """The compiled noisy phase draws its noise scaled and sums A in blocks of steps: Q and the
    generator's state afterwards are those of the definition's loop."""
    cfg = RunConfig(model="ff", trainer="lcp-lf", rnn_hidden_units=32, alpha=0.1,
                    solver_max_iter=37, solver_error_threshold=1e-8, sigma=0.05, tau_Q=10.0)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        net = build_model(cfg, (1, 28, 28), 10).double()
        tr = build_trainer(cfg, net)
        tr.auxiliary.double()
        x, y = batch(dtype=torch.float64)
        torch.manual_seed(7)
        with native_on(compiled):
            tr.compute_update(x, y)
            tr.post_update()
        results.append((tr.Q.clone(), torch.rand(4)))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    assert torch.equal(results[0][1], results[1][1])
