"""Training data: MNIST in its IDX files (gzip or raw) and `.npz` files with `x` and `y`.

Every reader checks what it reads (magic numbers, sizes, that images and labels agree) and
says what is wrong in one line; nothing here trusts a file's header to size an allocation
beyond the bytes actually present.
"""

from __future__ import annotations

import gzip
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .diagnostics import CnncError


class CnncDataError(CnncError):
    """Data that cannot be used: missing, damaged, or not matching the network."""


def _refuse(message: str) -> CnncDataError:
    return CnncDataError.single(message)


@dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # N x C x H x W (or N x features), float32 in [0, 1] for MNIST
    y: np.ndarray  # N int64 labels, or N x ... float targets

    def __len__(self) -> int:
        return len(self.x)

    def take(self, indices: np.ndarray) -> Dataset:
        return Dataset(self.x[indices], self.y[indices])


IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed if it ends in .gz)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise _refuse(f"cannot read {path}: {error}") from None
    if len(raw) < 8:
        raise _refuse(f"{path} is too short to be an IDX file")
    found, = struct.unpack(">i", raw[:4])
    if found != magic:
        raise _refuse(f"{path} has magic number {found}, expected {magic}")
    dims = magic & 0xFF
    header = 4 + 4 * dims
    shape = struct.unpack(f">{dims}i", raw[4:header]) if len(raw) >= header else ()
    if len(shape) != dims or int(np.prod(shape)) != len(raw) - header:
        raise _refuse(f"{path}: its header promises {shape}, which does not match its "
                      f"{len(raw) - min(header, len(raw))} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_mnist_split(folder: Path, split: str) -> Dataset | None:
    """The train or test split of a folder, None if its files are absent."""
    image_stem, label_stem = MNIST_FILES[split]
    images, labels = _find(folder, image_stem), _find(folder, label_stem)
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        missing = image_stem if images is None else label_stem
        raise _refuse(f"{folder} has the {split} split's {'labels' if images else 'images'} "
                      f"but not {missing}[.gz]")
    x = read_idx(images, IMAGES_MAGIC)
    y = read_idx(labels, LABELS_MAGIC)
    if len(x) != len(y):
        raise _refuse(f"{images.name} holds {len(x)} images but {labels.name} {len(y)} labels")
    return Dataset((x[:, None].astype(np.float32) / 255.0), y.astype(np.int64))


def load_npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive.files or "y" not in archive.files:
                raise _refuse(f"{path} must hold the arrays x and y, it has "
                              + ", ".join(archive.files))
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise _refuse(f"cannot read {path}: {error}") from None
    if x.ndim < 2 or y.ndim < 1:
        raise _refuse(f"{path}: x must hold samples along its first axis (got shape {x.shape})"
                      f" and y one label or target a sample (got shape {y.shape})")
    if len(x) != len(y):
        raise _refuse(f"{path}: x has {len(x)} samples but y has {len(y)}")
    if y.dtype.kind == "u" and y.size and y.max() > np.iinfo(np.int64).max:
        raise _refuse(f"{path}: y holds labels too large for any class")
    y = y.astype(np.int64) if y.dtype.kind in "iu" else y
    return Dataset(x, y)


def load(path: str | Path, val_split: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(training, held-out) data from an MNIST folder or an .npz file.

    A folder with both splits gives train and t10k; with only one split (or an .npz), a
    deterministic fraction `val_split` of it is held out instead.
    """
    path = Path(path)
    if path.is_dir():
        train, test = load_mnist_split(path, "train"), load_mnist_split(path, "test")
        if train is not None and test is not None:
            return train, test
        whole = train or test
        if whole is None:
            raise _refuse(f"{path} holds no MNIST files (train-* or t10k-*-idx*-ubyte[.gz])")
    elif path.is_file():
        whole = load_npz(path)
    else:
        raise _refuse(f"no data at {path}")
    return hold_out(whole, val_split, seed)


def hold_out(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split off the last `fraction` of a seeded permutation as held-out data."""
    if not 0 < fraction < 1:
        raise _refuse(f"the validation split must be between 0 and 1, got {fraction}")
    if len(data) < 2:
        raise _refuse(f"{len(data)} samples are too few to hold some out for evaluation")
    order = np.random.default_rng(seed).permutation(len(data))
    held = max(1, round(len(data) * fraction))
    return data.take(order[:-held]), data.take(order[-held:])
