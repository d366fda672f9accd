"""Shared fixtures. Tests run on CPU with small synthetic data written in the real formats."""

import os
import signal
import sys
from pathlib import Path

# Before torch starts OpenMP: its threads sleep instead of spinning while they wait, so the
# suite and the workers it starts share a small CPU well (benchmarks/shared_cpu.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # `import synthetic` from any test folder


@pytest.fixture(autouse=True)
def _cpu_only_and_few_threads(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    torch.set_num_threads(2)
    yield


@pytest.fixture(autouse=True, scope="session")
def _private_budget_cache(tmp_path_factory):
    """The budget planner's measurements of test configs stay out of the user's cache, and the
    tables the tests run print no measured estimate before they start (a few seconds each;
    tests/pipeline/test_first_look.py and test_budget.py switch it back on)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LCP_CACHE_DIR", str(tmp_path_factory.mktemp("lcp-cache")))
        mp.setenv("LCP_BUDGET", "off")
        yield


@pytest.fixture
def mnist_dir(tmp_path):
    from synthetic import write_idx_dataset

    return write_idx_dataset(tmp_path / "mnist", n_train=256, n_test=64)


@pytest.fixture
def cifar_dir(tmp_path):
    from synthetic import write_cifar10_batches

    return write_cifar10_batches(tmp_path / "cifar", n_per_batch=16)


# ---------------------------------------------------------------------- Ctrl-C stops the suite
# An in-process `lcp train` turns Ctrl-C into click's "Aborted!" (exit 1): the test fails and
# the suite would go on. The first Ctrl-C is remembered here and the session ends after the
# test it interrupted. (While an in-process scheduler holds SIGINT, Ctrl-C stops that
# scheduler cleanly first; the next one ends the session.)
_INTERRUPTED = []


def _on_sigint(signum, frame):
    _INTERRUPTED.append(signum)
    raise KeyboardInterrupt


def pytest_sessionstart(session):
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    if _INTERRUPTED:
        pytest.exit("interrupted by Ctrl-C", returncode=2)
