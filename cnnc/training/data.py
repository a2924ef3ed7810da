"""Training data: MNIST in its IDX files (gzip or raw) and `.npz` files with `x` and `y`.

Every reader checks what it reads (magic numbers, sizes, that images and labels agree) and
says what is wrong in one line; nothing here trusts a file's header to size an allocation
beyond the bytes actually present. IDX files promise at most `MAX_IDX_BYTES` of data; .npz
files are read by `cnnc.support.npzfile.read_npz`, under its limits.
"""

from __future__ import annotations

import gzip
import math
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cnnc.diagnostics import CnncError
from cnnc.support.npzfile import (
    DEFLATE_MAX_RATIO,
    file_status,
    open_regular,
    read_bytes,
    read_npz,
    shown_path,
)


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
# The most data bytes one IDX file may promise: 2 GiB, some 40 times MNIST's training
# images. As float32 images that is 8 GiB, as much as cnnc should take without asking.
MAX_IDX_BYTES = 2**31
IDX_TYPES = {0x08: "unsigned bytes", 0x09: "signed bytes", 0x0B: "16-bit integers",
             0x0C: "32-bit integers", 0x0D: "32-bit floats", 0x0E: "64-bit floats"}


def read_idx(path: Path | str, magic: int, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """An IDX file of unsigned bytes (gzip-compressed if it ends in .gz).

    The header is checked before any data is read: every dimension above 0, their product
    at most `max_bytes`, and no more than the file can hold (its size if raw; 1032 times it,
    deflate's limit, if compressed). The data are then read incrementally and reading stops
    one byte past the promised size, so a gzip bomb is never inflated beyond it.
    """
    path = Path(path)
    file, size = open_regular(path, "MNIST file", CnncDataError)
    try:
        with file, _idx_stream(file, path) as stream:
            return _read_idx_stream(stream, path, magic, size, max_bytes)
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        reason = f"not gzip data, or damaged ({error})" if path.suffix == ".gz" else error
        raise _refuse(f"cannot read MNIST file {shown_path(path)}: {reason}") from None


def _idx_stream(file: BinaryIO, path: Path) -> BinaryIO:
    # GzipFile inflates only as much as each read asks for, never the whole stream.
    return gzip.GzipFile(fileobj=file, mode="rb") if path.suffix == ".gz" else file


def _read_idx_stream(stream: BinaryIO, path: Path, magic: int, size: int,
                     max_bytes: int) -> np.ndarray:
    found = _read_header_int(stream, path, 1)[0]
    if found != magic:
        held = _idx_kind(found)
        raise _refuse(f"{shown_path(path)} has magic number {found}, expected {magic} for "
                      f"{_idx_kind(magic)}; "
                      + (f"it holds {held}" if held else "it is not an IDX file"))
    dims = magic & 0xFF
    shape = _read_header_int(stream, path, dims)
    count = _promised_bytes(path, shape, size, 4 + 4 * dims, max_bytes)
    try:
        data = read_bytes(stream, count)
    except MemoryError:
        raise _refuse(f"{shown_path(path)}: its {count:,} bytes of data need more memory "
                      "than is free") from None
    if len(data) < count:
        raise _refuse(f"{shown_path(path)}: its header promises {shape}, which does not "
                      f"match its {len(data):,} bytes of data")
    if stream.read(1):  # inflates at most one byte (and gzip's buffer) past the promise
        raise _refuse(f"{shown_path(path)}: its header promises {shape}, {count:,} bytes, "
                      "but more data follows them")
    return data.reshape(shape)


def _read_header_int(stream: BinaryIO, path: Path, count: int) -> tuple[int, ...]:
    """`count` big-endian signed 32-bit integers of the header, as IDX writes them."""
    raw = stream.read(4 * count)
    if len(raw) < 4 * count:
        raise _refuse(f"{shown_path(path)} is too short to be an IDX file")
    return struct.unpack(f">{count}i", raw)


def _idx_kind(magic: int) -> str | None:
    """What an IDX magic number means: its third byte the type, its fourth the dimensions."""
    kind = IDX_TYPES.get(magic >> 8)  # the two leading bytes of a real magic are zero
    return f"{magic & 0xFF}-dimensional {kind}" if kind else None


def _promised_bytes(path: Path, shape: tuple[int, ...], size: int, header: int,
                    max_bytes: int) -> int:
    """The data bytes the header promises, once known to be possible for this file."""
    shown = shown_path(path)
    if any(dim <= 0 for dim in shape):
        raise _refuse(f"{shown}: its header promises {shape}, but every dimension must be "
                      "above 0")
    count = math.prod(shape)  # a Python integer: the product cannot overflow
    if count > max_bytes:
        raise _refuse(f"{shown}: its header promises {shape}, {count:,} bytes, more than "
                      f"cnnc's limit of {max_bytes:,} bytes for an IDX file")
    if path.suffix != ".gz" and count != size - header:
        raise _refuse(f"{shown}: its header promises {shape}, which does not match its "
                      f"{max(size - header, 0):,} bytes of data")
    if path.suffix == ".gz" and count > DEFLATE_MAX_RATIO * size:
        raise _refuse(f"{shown}: its header promises {shape}, {count:,} bytes, more than "
                      f"its {size:,} compressed bytes can hold")
    return count


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        status = file_status(folder / name, "MNIST file", CnncDataError)
        if status is not None and stat.S_ISREG(status.st_mode):
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
        raise _refuse(f"{shown_path(folder)} has the {split} split's "
                      f"{'labels' if images else 'images'} but not {missing}[.gz]")
    x = read_idx(images, IMAGES_MAGIC)
    y = read_idx(labels, LABELS_MAGIC)
    if len(x) != len(y):
        raise _refuse(f"{images.name} holds {len(x)} images but {labels.name} {len(y)} labels")
    try:
        pixels = x[:, None].astype(np.float32)
        pixels /= 255.0  # in place: one float copy of the images in memory, not two
    except MemoryError:
        raise _refuse(f"{shown_path(images)}: {len(x):,} images need more memory as "
                      "float32 than is free") from None
    return Dataset(pixels, y.astype(np.int64))


def load_npz(path: Path | str) -> Dataset:
    """An .npz dataset: samples `x` along the first axis, labels or targets `y`."""
    arrays = read_npz(path, "", CnncDataError)  # "cannot read d.npz: ..."
    shown = shown_path(path)
    if "x" not in arrays or "y" not in arrays:
        held = ", ".join(arrays) or "no arrays"
        raise _refuse(f"{shown} must hold the arrays x and y, it has {held}")
    x, y = _native(arrays["x"]), _native(arrays["y"])
    if x.ndim < 2 or y.ndim < 1:
        raise _refuse(f"{shown}: x must hold samples along its first axis (got shape {x.shape})"
                      f" and y one label or target a sample (got shape {y.shape})")
    if len(x) != len(y):
        raise _refuse(f"{shown}: x has {len(x)} samples but y has {len(y)}")
    if y.dtype.kind == "u" and y.size and y.max() > np.iinfo(np.int64).max:
        raise _refuse(f"{shown}: y holds labels too large for any class")
    y = y.astype(np.int64) if y.dtype.kind in "iu" else y
    return Dataset(x, y)


def _native(array: np.ndarray) -> np.ndarray:
    """The array in this machine's byte order, which the runtime requires."""
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def load(path: str | Path, val_split: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(training, held-out) data from an MNIST folder or an .npz file.

    A folder with both splits gives train and t10k; with only one split (or an .npz), a
    deterministic fraction `val_split` of it is held out instead.
    """
    kind = data_kind(path)
    if kind is None:
        raise _refuse(f"no data at {shown_path(path)}")
    path = Path(path)
    if kind == "folder":
        train, test = load_mnist_split(path, "train"), load_mnist_split(path, "test")
        if train is not None and test is not None:
            return train, test
        whole = train or test
        if whole is None:
            raise _refuse(f"{shown_path(path)} holds no MNIST files "
                          "(train-* or t10k-*-idx*-ubyte[.gz])")
    else:
        whole = load_npz(path)  # which refuses a FIFO or device by name
    return hold_out(whole, val_split, seed)


def data_kind(path: str | Path) -> str | None:
    """What is at `path`: "folder", "file" (also a FIFO or device, which reading refuses by
    name), or None when nothing is. Unlike Path.is_dir, a path the OS refuses (too long, a
    NUL byte, no permission) is a CnncDataError, not an OSError or a silent False."""
    if not isinstance(path, (str, os.PathLike)):
        raise _refuse(f"cannot read data: expected a path, got {type(path).__name__}")
    status = file_status(path, "", CnncDataError)
    if status is None:
        return None
    return "folder" if stat.S_ISDIR(status.st_mode) else "file"


def hold_out(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split off the last `fraction` of a seeded permutation as held-out data."""
    if not 0 < fraction < 1:
        raise _refuse(f"the validation split must be between 0 and 1, got {fraction}")
    if len(data) < 2:
        raise _refuse(f"{len(data)} samples are too few to hold some out for evaluation")
    order = np.random.default_rng(seed).permutation(len(data))
    held = max(1, round(len(data) * fraction))
    return data.take(order[:-held]), data.take(order[-held:])
