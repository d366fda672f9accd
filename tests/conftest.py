"""Shared fixtures. Tests run on CPU with small synthetic data written in the real formats."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # `import synthetic` from any test folder


@pytest.fixture(autouse=True)
def _cpu_only_and_few_threads(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    torch.set_num_threads(2)
    yield


@pytest.fixture(autouse=True, scope="session")
def _private_budget_cache(tmp_path_factory):
    """The budget planner's measurements of test configs stay out of the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LCP_CACHE_DIR", str(tmp_path_factory.mktemp("lcp-cache")))
        yield


@pytest.fixture
def mnist_dir(tmp_path):
    from synthetic import write_idx_dataset

    return write_idx_dataset(tmp_path / "mnist", n_train=256, n_test=64)


@pytest.fixture
def cifar_dir(tmp_path):
    from synthetic import write_cifar10_batches

    return write_cifar10_batches(tmp_path / "cifar", n_per_batch=16)
