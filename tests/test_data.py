"""MNIST IDX files and .npz datasets: what is read, and every way a file can be refused."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from cnnc.data import CnncDataError, hold_out, load, load_mnist_split, read_idx

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">i{array.ndim}i", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray,
                compress: bool) -> None:
    stems = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}[split]
    for stem, data in zip(stems, (idx_bytes(images, 2051), idx_bytes(labels, 2049)),
                          strict=True):
        path = folder / (stem + (".gz" if compress else ""))
        path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_images_and_labels_round_trip(tmp_path, compress):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    labels = np.array([3, 1, 4, 1, 5])
    write_split(tmp_path, "train", images, labels, compress)
    data = load_mnist_split(tmp_path, "train")
    assert data.x.shape == (5, 1, 28, 28) and data.x.dtype == np.float32
    np.testing.assert_allclose(data.x[:, 0] * 255, images, atol=1e-4)
    assert data.y.tolist() == [3, 1, 4, 1, 5] and data.y.dtype == np.int64


def test_one_split_holds_out_a_deterministic_fraction(tmp_path):
    images = np.zeros((10, 28, 28))
    write_split(tmp_path, "test", images, np.arange(10) % 10, True)
    train, held = load(tmp_path, val_split=0.2, seed=3)
    _, again_held = load(tmp_path, val_split=0.2, seed=3)
    assert len(train) == 8 and len(held) == 2
    assert held.y.tolist() == again_held.y.tolist()
    assert sorted(train.y.tolist() + held.y.tolist()) == list(range(10))


def test_both_splits_are_train_and_test(tmp_path):
    write_split(tmp_path, "train", np.zeros((6, 28, 28)), np.zeros(6), False)
    write_split(tmp_path, "test", np.ones((4, 28, 28)), np.ones(4), False)
    train, test = load(tmp_path)
    assert len(train) == 6 and len(test) == 4


@pytest.mark.parametrize("damage, message", [
    (lambda b: struct.pack(">i", 2052) + b[4:], "has magic number 2052, expected 2051"),
    (lambda b: b[:4] + struct.pack(">i", 3) + b[8:], "its header promises"),
    (lambda b: struct.pack(">i", 2049) + b[4:], "has magic number 2049, expected 2051"),
    (lambda b: b[:-10], "its header promises"),
    (lambda b: b[:3], "too short"),
])
def test_damaged_idx_files_are_refused(tmp_path, damage, message):
    path = tmp_path / "images"
    path.write_bytes(damage(idx_bytes(np.zeros((2, 3, 3)), 2051)))
    with pytest.raises(CnncDataError, match=message):
        read_idx(path, 2051)


def test_mismatched_counts_missing_files_and_bad_gzip(tmp_path):
    write_split(tmp_path, "train", np.zeros((3, 28, 28)), np.zeros(4), False)
    with pytest.raises(CnncDataError, match=r"holds 3 images but .* 4 labels"):
        load(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(CnncDataError, match="but not train-labels-idx1-ubyte"):
        load(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CnncDataError, match="holds no MNIST files"):
        load(empty)
    bad = tmp_path / "gz"
    bad.mkdir()
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(CnncDataError, match="cannot read"):
        load(bad)
    with pytest.raises(CnncDataError, match="no data at"):
        load(tmp_path / "absent")


def test_npz_datasets(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 4), np.float32), y=np.arange(10))
    train, held = load(tmp_path / "d.npz", val_split=0.3)
    assert len(train) == 7 and len(held) == 3
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    with pytest.raises(CnncDataError, match="must hold the arrays x and y"):
        load(tmp_path / "bad.npz")
    with pytest.raises(CnncDataError, match="between 0 and 1"):
        hold_out(train, 1.5, 0)


@pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist is not here")
def test_the_real_mnist_test_split_reads_with_its_documented_counts():
    data = load_mnist_split(MNIST, "test")
    assert data.x.shape == (10000, 1, 28, 28)
    assert np.bincount(data.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                                            1009]
