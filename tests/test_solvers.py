"""Solvers reach known fixed points, agree with each other, and report honest stats."""

import pytest
import torch

from lcp.errors import DivergenceError, LcpError
from lcp.solvers import SOLVERS, Solver, anderson, get_solver, relative_error, vanilla


def linear_map(n=16, batch=4, contraction=0.8, seed=0):
    """x ← A x + b with ‖A‖₂ = contraction: the fixed point is (I − A)⁻¹ b."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = contraction * A / torch.linalg.matrix_norm(A, ord=2)
    b = torch.randn(batch, n, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - A, b.T).T
    return (lambda x: (x @ A.T + b,)), b, exact


@pytest.mark.parametrize("name", ["vanilla", "anderson"])
def test_solvers_reach_the_known_fixed_point(name):
    fn, b, exact = linear_map()
    (x,), stats = get_solver(name)(fn, (torch.zeros_like(b),), max_iter=500, threshold=1e-10)
    assert stats.converged
    assert torch.allclose(x, exact, atol=1e-8)


def test_anderson_agrees_with_vanilla_in_fewer_iterations():
    # a slowly contracting symmetric map (eigenvalues up to 0.97): Picard needs hundreds of steps
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    A = q @ torch.diag(torch.linspace(0.5, 0.97, 16, dtype=torch.float64)) @ q.T
    # (the paper's absolute regulariser 1e-4 damps Anderson once ‖G‖² ≪ 1e-4, hence the scale)
    b = 100 * torch.randn(4, 16, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(16, dtype=torch.float64) - A, b.T).T
    fn = lambda x: (x @ A.T + b,)  # noqa: E731
    (xv,), sv = vanilla(fn, (torch.zeros_like(b),), max_iter=5000, threshold=1e-8)
    (xa,), sa = anderson(fn, (torch.zeros_like(b),), max_iter=5000, threshold=1e-5)
    assert sv.converged and sa.converged
    assert torch.allclose(xv, exact, rtol=1e-5, atol=1e-4)
    assert ((xa - exact).norm() / exact.norm()).item() < 1e-3
    assert sa.iterations * 5 < sv.iterations


def test_vanilla_stats_count_steps_and_stop_at_the_first_step_below_threshold():
    fn, b, _ = linear_map()
    state = (torch.ones_like(b),)
    (x,), stats = vanilla(fn, state, max_iter=1000, threshold=1e-6)
    # replay by hand: count steps until the relative change first drops below 1e-6
    s, steps = state[0], 0
    while True:
        nxt = fn(s)[0]
        steps += 1
        err = ((nxt - s).norm(dim=1) / (1e-5 + s.norm(dim=1))).max().item()
        s = nxt
        if err < 1e-6:
            break
    assert stats.iterations == steps == len(stats.trace)
    assert stats.residual == pytest.approx(err)
    assert stats.residual_per_sample.shape == (b.shape[0],)
    assert torch.equal(x, s)


def test_tighter_threshold_and_lower_max_iter_change_the_iterations():
    fn, b, _ = linear_map()
    z = (torch.zeros_like(b),)
    loose = vanilla(fn, z, max_iter=1000, threshold=1e-3)[1]
    tight = vanilla(fn, z, max_iter=1000, threshold=1e-8)[1]
    capped = vanilla(fn, z, max_iter=5, threshold=1e-8)[1]
    assert tight.iterations > loose.iterations
    assert capped.iterations == 5 and not capped.converged and capped.hit_max_iter


def test_solver_from_config_multiplies_the_vanilla_threshold_by_dt_only():
    from lcp.config import RunConfig

    cfg = RunConfig(model="ff", dt=0.5, solver_error_threshold=1e-4)
    assert Solver.from_config(cfg).threshold == pytest.approx(5e-5)
    assert Solver.from_config(cfg.replace(solver="anderson")).threshold == pytest.approx(1e-4)


def test_metrics_follow_their_definitions():
    old = (torch.tensor([[1.0, 0.0], [0.0, 2.0]]),)
    new = (torch.tensor([[1.5, 0.0], [0.0, 2.0]]),)
    l2, per_sample = relative_error(old, new, "l2")
    assert per_sample.tolist() == pytest.approx([0.5 / (1 + 1e-5), 0.0])
    assert l2.item() == pytest.approx(0.5 / (1 + 1e-5))
    assert relative_error(old, new, "legacy_l2")[0].item() == pytest.approx(
        0.5 / (1e-5 + 5 ** 0.5))
    assert relative_error(old, new, "l_inf")[0].item() == pytest.approx(0.5 / (1 + 1e-5))


def test_multi_tensor_states_use_one_norm_per_sample():
    a, b = torch.ones(2, 3), torch.ones(2, 4)
    err, per_sample = relative_error((a, b), (a * 2, b), "l2")
    assert per_sample[0].item() == pytest.approx(3 ** 0.5 / (1e-5 + 7 ** 0.5))


@pytest.mark.parametrize("name,iteration", [("vanilla", 2), ("anderson", 3)])
def test_divergence_raises_with_the_phase_and_the_iteration(name, iteration):
    # the first step (1e30 per element) is still finite, though its float32 l2 norm overflows;
    # the second is inf. Anderson counts its two starting evaluations of fn, so its first error
    # is that of evaluation 3
    fn = lambda x: (x * 1e30 + 1,)  # noqa: E731 — overflows to inf in two steps
    with pytest.raises(DivergenceError) as info:
        get_solver(name)(fn, (torch.ones(2, 3),), max_iter=50, threshold=1e-6, phase="free")
    assert info.value.phase == "free"
    assert info.value.iteration == iteration
    assert f"at iteration {iteration}." in str(info.value)


def test_a_large_but_finite_state_is_not_divergence():
    # 10× per step: after 20 steps the elements are 1e20, finite in float32, while the float32
    # l2 norm over 256 of them overflowed at ~1e18. The paper's solver goes on (its error is NaN,
    # never below the threshold), and the adjoint of a nearly unstable rbp batch does exactly
    # this before its update is clipped
    fn = lambda x: (x * 10,)  # noqa: E731
    (x,), stats = vanilla(fn, (torch.ones(4, 256),), max_iter=20, threshold=1e-6,
                          phase="adjoint")
    assert torch.isfinite(x).all() and x.max().item() == pytest.approx(1e20, rel=1e-3)
    assert not stats.converged and stats.iterations == 20
    assert stats.residual != stats.residual  # the overflowed error is reported, not hidden


def test_divergence_reports_the_first_step_whose_state_is_not_finite():
    # x counts up by one per step and turns NaN at its 5th step
    fn = lambda x: (torch.where(x >= 4, torch.full_like(x, float("nan")), x + 1),)  # noqa: E731
    with pytest.raises(DivergenceError) as info:
        vanilla(fn, (torch.zeros(2, 3),), max_iter=50, threshold=1e-6, phase="controlled")
    assert (info.value.phase, info.value.iteration) == ("controlled", 5)
    assert "Lower dt or alpha" in str(info.value)


def test_a_diverging_adjoint_names_the_unstable_state_not_the_controller():
    """rbp's adjoint has no dt or alpha: its message says what makes it diverge."""
    fn = lambda x: (x * 1e30 + 1,)  # noqa: E731
    with pytest.raises(DivergenceError) as info:
        vanilla(fn, (torch.ones(2, 3),), max_iter=50, threshold=1e-6, phase="adjoint")
    assert "weights make the free state unstable; lower the learning rate" in str(info.value)
    assert "alpha" not in str(info.value)


def test_anderson_stops_on_the_l2_error_whatever_the_metric():
    """As in the paper's code, Anderson ignores the threshold metric: l_inf and legacy_l2 give
    the run, trace and state of l2 (vanilla's trace does change with the metric)."""
    fn, b, _ = linear_map(contraction=0.9)
    start = (torch.zeros_like(b),)
    runs = {m: anderson(fn, start, max_iter=500, threshold=1e-8, metric=m)
            for m in ("l2", "l_inf", "legacy_l2")}
    (x, ), stats = runs["l2"]
    assert stats.converged
    for other in ("l_inf", "legacy_l2"):
        (x_other,), stats_other = runs[other]
        assert torch.equal(x_other, x)
        assert stats_other.trace == stats.trace and stats_other.iterations == stats.iterations
    assert vanilla(fn, start, max_iter=5, threshold=0.0, metric="l_inf")[1].trace != vanilla(
        fn, start, max_iter=5, threshold=0.0, metric="l2")[1].trace
    # the reported residual is the per-sample relative l2 change between the last iterate and
    # its image (max over the batch)
    image = fn(x)[0]
    assert stats.residual == pytest.approx(
        ((image - x).norm(dim=1) / (1e-5 + image.norm(dim=1))).max().item(), rel=1e-6)


def test_unknown_solver_lists_the_valid_ones():
    with pytest.raises(LcpError, match="vanilla, anderson"):
        get_solver("broyden")
    assert set(SOLVERS) == {"vanilla", "anderson", "anderson_joint"}
