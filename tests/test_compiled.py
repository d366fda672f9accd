"""The dynamics through `torch.compile` (`LCP_COMPILE`) compute what the definition computes.

Eager is the default (`LCP_COMPILE=0`). On CPU the first call of a compiled step function
costs tens of seconds, so the CPU test is `slow`. The CUDA tests (marker `cuda`, selected with `-m cuda`; benchmarks/gpu_check.sh runs
them) compare a training step on the GPU — eager, compiled, and compiled with CUDA graphs —
with the same step on the CPU.
"""

import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from lcp.config import RunConfig
from lcp.errors import LcpError
from lcp.models import build_model
from lcp.trainers import build_trainer
from lcp.trainers.base import compile_mode


def update(cfg, device="cpu", dtype=torch.float64, n=8, **env):
    """(flat update, stats) of one training step from seed 0 under the settings `env`."""
    with mock.patch.dict(os.environ, env):
        torch.manual_seed(0)
        net = build_model(cfg, (1, 28, 28), 10).to(device=device, dtype=dtype)
        tr = build_trainer(cfg, net).to(device)
        tr.auxiliary.to(dtype)
        g = torch.Generator().manual_seed(1)
        x = torch.rand(n, 1, 28, 28, generator=g).to(device=device, dtype=dtype)
        y = torch.randint(0, 10, (n,), generator=g).to(device)
        torch.manual_seed(5)
        tr.pre_update()
        stats = tr.compute_update(x, y)
        tr.post_update()
        params = list(net.parameters()) + tr.parameters()
        return torch.cat([p.grad.flatten() for p in params]).cpu(), stats


def test_the_compile_setting_is_read_and_checked():
    with mock.patch.dict(os.environ):
        os.environ.pop("LCP_COMPILE", None)
        assert compile_mode() is None  # eager by default
        os.environ["LCP_COMPILE"] = "1"
        assert compile_mode() == "default"
        os.environ["LCP_COMPILE"] = "graphs"
        assert compile_mode() == "reduce-overhead"
        os.environ["LCP_COMPILE"] = "sometimes"
        with pytest.raises(LcpError, match="LCP_COMPILE='sometimes' .* use 0, 1 or graphs"):
            compile_mode()


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["lcp-di", "lcp-lf"])
def test_compiled_step_functions_on_cpu_give_the_eager_update(trainer):
    """rnn, the free and controlled phases (and lcp-lf's noisy phase, which moves Q): the same
    iterations and the same update (float64) compiled by inductor as eager."""
    cfg = RunConfig(model="rnn", trainer=trainer, rnn_hidden_units=16, alpha=0.1,
                    solver_max_iter=200, solver_error_threshold=1e-8)
    eager, s_eager = update(cfg, LCP_NATIVE="0", LCP_COMPILE="0")
    compiled, s_compiled = update(cfg, LCP_NATIVE="0", LCP_COMPILE="1")
    assert s_compiled["controlled/iterations"] == s_eager["controlled/iterations"]
    assert torch.allclose(compiled, eager, rtol=1e-9, atol=1e-12 * eager.abs().max().item())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("mode", ["0", "1", "graphs"])
@pytest.mark.parametrize("model,trainer", [("ff", "bp"), ("rnn", "rbp"), ("ff", "lcp-di"),
                                           ("rnn", "lcp-kp"), ("ff", "lcp-lf"),
                                           ("rnn", "lcp-ebd")])
def test_a_cuda_step_gives_the_cpu_update(model, trainer, mode):
    cfg = RunConfig(model=model, trainer=trainer, rnn_hidden_units=32, alpha=0.1,
                    solver_max_iter=300, solver_error_threshold=1e-6)
    want, s_want = update(cfg, dtype=torch.float32, n=32, LCP_NATIVE="0", LCP_COMPILE="0")
    got, s_got = update(cfg, "cuda", torch.float32, n=32, LCP_COMPILE=mode)
    assert F.cosine_similarity(got, want, dim=0).item() > 0.9999
    for key, value in s_want.items():
        if key.endswith("/iterations") and not key.startswith("energy"):
            assert abs(s_got[key] - value) <= 2, key
