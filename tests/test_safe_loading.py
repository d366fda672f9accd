"""Loading a model file or a checkpoint never runs code from it: `torch.load(weights_only=True)`
with numpy arrays allowed explicitly; a file whose pickle asks for anything else (here
`os.system`) is refused with one line, and the command in it does not run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lcp.config import RunConfig
from lcp.errors import LcpError
from lcp.training import fit, load_checkpoint, load_model_file


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["model file", "checkpoint"])
def test_a_crafted_file_is_refused_and_its_code_does_not_run(tmp_path, kind):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pth"
    fmt = "lcp-model-1" if kind == "model file" else "lcp-checkpoint-1"
    torch.save({"format": fmt, "model": _RunsACommand(marker)}, path)
    with pytest.raises(LcpError) as err:
        if kind == "model file":
            load_model_file(path, (1, 28, 28))
        else:
            load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"refusing to load {kind} {path}")
    assert "system" in message  # names what the file asked for
    assert not marker.exists()


def _cfg(mnist_dir, **extra):
    return RunConfig.from_dict({
        "data": "mnist", "data_dir": str(mnist_dir), "model": "ff", "trainer": "lcp-di",
        "rnn_hidden_units": 8, "num_epochs": 1, "limit_train_batches": 2,
        "limit_eval_batches": 1, "meta_scheduler": "cos", **extra})


def test_checkpoints_and_model_files_load_weights_only(tmp_path, mnist_dir):
    checkpoint = tmp_path / "checkpoint.pt"
    fit(_cfg(mnist_dir), checkpoint_path=checkpoint)
    # Only tensors and plain data: nothing that weights_only refuses.
    assert torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint) == []
    payload = load_checkpoint(checkpoint)
    assert payload["epoch"] == 1
    cfg, model, _trainer = load_model_file(checkpoint, (1, 28, 28))
    assert cfg.trainer == "lcp-di"
    for name, value in model.state_dict().items():
        assert torch.equal(value, payload["model"][name])


def test_a_checkpoint_with_a_numpy_rng_state_still_resumes(tmp_path, mnist_dir):
    """Checkpoints of earlier versions hold numpy's RNG state as an array: allowed explicitly,
    and resuming from one restores that state."""
    checkpoint = tmp_path / "checkpoint.pt"
    fit(_cfg(mnist_dir), checkpoint_path=checkpoint)
    payload = torch.load(checkpoint, weights_only=True)
    np.random.seed(1234)
    state = np.random.get_state()
    payload["rng"]["numpy"] = state
    torch.save(payload, checkpoint)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint)  # needs numpy's
    assert load_checkpoint(checkpoint)["rng"]["numpy"][1].tolist() == state[1].tolist()
    np.random.seed(0)
    result = fit(_cfg(mnist_dir, num_epochs=2), checkpoint_path=checkpoint)
    assert result.epochs_completed == 2


# ---------------------------------------------------------------------- CIFAR-10 batches


def test_a_forged_cifar_batch_is_refused_before_its_code_runs(tmp_path):
    """A data_batch_1 whose pickle calls os.system: one error naming the file and the global,
    and the command never runs (the unpickler refuses the global before looking it up)."""
    import pickle

    from synthetic import write_cifar10_batches

    from lcp.data import DataCorruptError, load_split

    root = write_cifar10_batches(tmp_path / "cifar", n_per_batch=10)
    marker = tmp_path / "ran"
    path = root / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _RunsACommand(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(DataCorruptError) as err:
        load_split("cifar10", root, train=True, download=False)
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "posix.system" in message or "os.system" in message


def test_real_cifar_batches_still_load_under_either_numpy_module_name(tmp_path):
    """The official batches were pickled by NumPy 1 (numpy.core.multiarray._reconstruct); a
    batch pickled by this NumPy names its own module: both load."""
    import pickle

    from synthetic import write_cifar10_batches

    from lcp.data import load_split

    root = write_cifar10_batches(tmp_path / "cifar", n_per_batch=10)
    folder = root / "cifar-10-batches-py"
    for path in folder.glob("*_batch*"):
        raw = path.read_bytes()
        if b"numpy._core.multiarray" in raw:  # written by NumPy 2: as NumPy 1 names it
            path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
        assert b"numpy.core.multiarray" in path.read_bytes()
        assert pickle.loads(path.read_bytes(), encoding="bytes")[b"data"].shape == (10, 3072)
    x, y = load_split("cifar10", root, train=True, download=False)
    assert x.shape == (50, 3, 32, 32) and y.shape == (50,)
