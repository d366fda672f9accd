import pytest
import torch


@pytest.fixture(autouse=True)
def float64():
    """Gradient identities are checked in float64 (tight tolerances), then the default returns."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
