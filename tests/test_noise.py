"""lcp-lf's counter-based noise (lcp.noise): the definition equals its formula (SplitMix64's
words, Box–Muller), its numbers are i.i.d. N(0, 1) by the usual statistics, and the Q update it
drives has the mean and covariance of the update driven by PyTorch's generator (the paper's
stream) within their sampling error. That the compiled pass computes the same numbers is tested in
tests/test_native.py (and checked when the kernels load)."""

from __future__ import annotations

import math

import pytest
import torch

from lcp.config import RunConfig
from lcp.models import build_model
from lcp.noise import GAMMA, _signed, counter_normal, draw_key, mix64
from lcp.trainers import build_trainer

MASK = (1 << 64) - 1


def splitmix64_word(key: int, w: int) -> int:
    """SplitMix64's output for state key + (w + 1)·γ, in Python's integers."""
    z = (key + (w + 1) * GAMMA) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def reference_normal(key: int, c: int) -> float:
    """The number at counter c, from lcp.noise's formula in Python's integers and floats."""
    z = splitmix64_word(key, c // 2)
    u1 = ((z >> 40) + 1) / 2**24
    u2 = ((z >> 16) & 0xFFFFFF) / 2**24
    angle = u2 if c % 2 == 0 else (u2 + 0.75) % 1.0
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * angle)


def test_the_words_are_splitmix64s_stream():
    """Seeded with 0, SplitMix64's first three outputs (the published test vector)."""
    words = mix64(torch.tensor([_signed(k * GAMMA) for k in (1, 2, 3)]))
    assert [int(w) & MASK for w in words] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4,
                                              0x06C45D188009454F]
    assert [splitmix64_word(0, w) for w in range(3)] == [int(w) & MASK for w in words]


@pytest.mark.parametrize("key", [0, 12345, (1 << 62) - 1, 0x2545F4914F6CDD1D])
def test_counter_normal_is_its_formula(key):
    """Every position of a few steps (odd row length: rows start on both halves of a pair),
    with keys whose sums wrap past 2⁶⁴."""
    shape = (3, 7)
    for step in (0, 1, 5, 10**6):
        got = counter_normal(key, step, shape, torch.float64)
        want = torch.tensor([reference_normal(key, step * 21 + i) for i in range(21)],
                            dtype=torch.float64).view(shape)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (step, got, want)
    assert counter_normal(key, 2, shape, torch.float32).dtype == torch.float32


def test_the_numbers_are_standard_normal():
    """2·10⁶ numbers over 40 steps: mean, variance, skew, kurtosis within 5 standard errors, and
    the Kolmogorov–Smirnov distance to Φ below its 1 % critical value."""
    x = torch.cat([counter_normal(987654321, s, (50_000,), torch.float64) for s in range(40)])
    n = x.numel()
    assert abs(x.mean().item()) < 5 / math.sqrt(n)
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((x**3).mean().item()) < 5 * math.sqrt(15 / n)
    assert abs((x**4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    s = x.sort().values
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - cdf, cdf - (i - 1) / n).max().item()
    assert ks < 1.63 / math.sqrt(n)


def test_the_numbers_are_uncorrelated():
    """Box–Muller's pair partners, neighbouring steps, the squares of partners (which share a
    radius) and two keys: every correlation within 5 standard errors of 0."""
    a = counter_normal(42, 0, (500_000,), torch.float64)
    b = counter_normal(42, 1, (500_000,), torch.float64)
    other = counter_normal(43, 0, (500_000,), torch.float64)

    def corr(p, q):
        return torch.corrcoef(torch.stack([p, q]))[0, 1].item()

    limit = 5 / math.sqrt(250_000)
    assert abs(corr(a[0::2], a[1::2])) < limit
    assert abs(corr(a[0::2] ** 2, a[1::2] ** 2)) < limit
    assert abs(corr(a[1:-1:2], a[2::2])) < limit  # across pairs
    assert abs(corr(a, b)) < limit / math.sqrt(2)
    assert abs(corr(a, other)) < limit / math.sqrt(2)


def test_the_key_comes_from_pytorchs_generator():
    torch.manual_seed(3)
    first = draw_key()
    torch.manual_seed(3)
    assert draw_key() == first
    assert 0 <= first < 1 << 62 and draw_key() != first


def test_the_q_update_has_the_paper_streams_mean_and_covariance():
    """One batch's noisy phase (lcp-lf on a small ff model, fixed weights, batch and controlled
    equilibrium) run 400 times with each stream: each element of A's batch mean has the same mean
    (|z| < 5) and variance, and 16 random projections of A the same variance (the covariance), as
    with PyTorch's generator, within their sampling error."""
    torch.manual_seed(0)
    cfg = RunConfig(model="ff", trainer="lcp-lf", rnn_hidden_units=16, alpha=0.1,
                    solver_max_iter=30, sigma=0.1)
    net = build_model(cfg, (1, 4, 4), 10)
    tr = build_trainer(cfg, net)
    x, y = torch.rand(8, 1, 4, 4), torch.arange(8) % 10
    tr.compute_update(x, y)
    last = tr.last
    draws = 400

    def samples(stream: str) -> torch.Tensor:
        tr.cfg = cfg.replace(lf_noise=stream)
        torch.manual_seed(1 if stream == "paper" else 2)
        return torch.stack([tr.noisy_phase(last)[0].flatten() for _ in range(draws)])

    paper, counter = samples("paper"), samples("counter")
    z = (paper.mean(0) - counter.mean(0)) / torch.sqrt(
        (paper.var(0) + counter.var(0)) / draws)
    assert z.abs().max().item() < 5, z.abs().max()
    assert (z**2).mean().item() < 1.5
    # log of a variance ratio: standard error about sqrt((kurtosis − 1)/draws) each; 5 of them
    kurt = ((paper - paper.mean(0)) ** 4).mean(0) / paper.var(0) ** 2
    log_ratio = torch.log(paper.var(0) / counter.var(0))
    assert (log_ratio.abs() < 5 * torch.sqrt(2 * (kurt - 1) / draws)).all()
    paper, counter = paper.double(), counter.double()
    w = torch.randn(paper.shape[1], 16, dtype=torch.float64)
    p, c = paper @ w, counter @ w
    assert (torch.log(p.var(0) / c.var(0)).abs() < 5 * math.sqrt(2 * 2 / draws)).all()
    assert not torch.allclose(paper.mean(0), torch.zeros_like(paper[0]))  # A is not noise alone


def test_several_steps_at_once_are_the_steps_one_by_one():
    block = counter_normal(77, 3, (4, 5), torch.float64, steps=6)
    assert block.shape == (6, 4, 5)
    for i in range(6):
        assert torch.equal(block[i], counter_normal(77, 3 + i, (4, 5), torch.float64))
