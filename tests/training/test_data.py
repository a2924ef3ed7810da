"""MNIST IDX files and .npz datasets: what is read, and every way a file can be refused."""

from __future__ import annotations

import gzip
import io
import os
import struct
import threading
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from cnnc.training.data import (
    MAX_IDX_BYTES,
    CnncDataError,
    hold_out,
    load,
    load_mnist_split,
    load_npz,
    read_idx,
)
from conftest import REPO

MNIST = REPO.parent / "shared" / "data" / "mnist"


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


def refused(path: Path, message: str, **limits) -> None:
    """Reading `path` as IDX images is refused in one line matching `message`, and without
    Python allocating more than a megabyte on the way (tracemalloc sees numpy's arrays)."""
    tracemalloc.start()
    try:
        with pytest.raises(CnncDataError, match=message) as caught:
            read_idx(path, 2051, **limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(caught.value) and path.name in str(caught.value)
    assert peak < 1 << 20, f"{peak:,} bytes allocated"


def gzip_of_zeros(header: bytes, zeros: int) -> bytes:
    """A gzip stream of `header` and then `zeros` zero bytes, made a megabyte at a time."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip framing
    parts = [compressor.compress(header)]
    block = bytes(min(zeros, 1 << 20))
    for start in range(0, zeros, len(block)):
        parts.append(compressor.compress(block[:zeros - start]))
    return b"".join(parts) + compressor.flush()


@pytest.mark.parametrize("damage", [
    lambda gz: gz[:12] + b"garbage after a valid gzip header" * 3,
    lambda gz: gz[:-5],  # the trailer cut off
    lambda gz: gz[:len(gz) // 2],
    lambda gz: b"not gzip at all",
])
def test_corrupt_and_truncated_gzip_streams_are_refused(tmp_path, damage):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(damage(gzip.compress(idx_bytes(np.ones((4, 5, 5)), 2051))))
    refused(path, "cannot read MNIST file .*: not gzip data, or damaged")


def test_dimensions_that_overflow_are_refused_from_the_header(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(struct.pack(">4i", 2051, 2**31 - 1, 2**31 - 1, 2**31 - 1))
    refused(path, r"promises \(2147483647, 2147483647, 2147483647\), 9,903,520,300,447,9"
            r"\d\d,\d.* bytes, more than cnnc's limit of 2,147,483,648 bytes")
    assert MAX_IDX_BYTES == 2**31


@pytest.mark.parametrize("shape", [(-1000, -1000, 1), (-2, 3, -4), (0, 28, 28)])
def test_negative_or_zero_dimensions_are_refused(tmp_path, shape):
    path = tmp_path / "images"
    path.write_bytes(struct.pack(">4i", 2051, *shape) + bytes(abs(np.prod(shape))))
    refused(path, "every dimension must be above 0")


def test_a_gzip_bomb_is_never_inflated_past_its_promised_size(tmp_path):
    # The header promises one 28 x 28 image; the stream goes on to 64 MiB of zeros.
    bomb = gzip_of_zeros(struct.pack(">4i", 2051, 1, 28, 28), 64 * 2**20)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(bomb)
    assert len(bomb) < 100_000
    refused(path, r"promises \(1, 28, 28\), 784 bytes, but more data follows them")


def test_a_gzip_bomb_over_the_limit_is_refused_before_inflating(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip_of_zeros(struct.pack(">4i", 2051, 100, 100, 100), 10**6))
    refused(path, "1,000,000 bytes, more than cnnc's limit of 100,000 bytes", max_bytes=10**5)


def test_a_promise_no_gzip_stream_of_its_size_can_keep_is_refused(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">4i", 2051, 1000, 1000, 1000)))
    refused(path, r"1,000,000,000 bytes, more than its \d\d compressed bytes can hold")


def test_a_raw_file_is_held_to_its_real_size(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(struct.pack(">4i", 2051, 100, 100, 100) + bytes(10))
    refused(path, r"promises \(100, 100, 100\), which does not match its 10 bytes of data")


@pytest.mark.parametrize("magic, holds", [
    (0x0804, "it holds 4-dimensional unsigned bytes"),
    (0x0D03, "it holds 3-dimensional 32-bit floats"),
    (0x0801, "it holds 1-dimensional unsigned bytes"),
    (0x12345678, "it is not an IDX file"),
])
def test_other_idx_types_and_dimensions_are_named(tmp_path, magic, holds):
    path = tmp_path / "images"
    path.write_bytes(struct.pack(">4i", magic, 2, 3, 3) + bytes(18))
    refused(path, f"has magic number {magic}, expected 2051 for 3-dimensional unsigned "
            f"bytes; {holds}")


def test_more_labels_than_images_is_refused(tmp_path):
    write_split(tmp_path, "test", np.zeros((2, 28, 28)), np.zeros(5), True)
    with pytest.raises(CnncDataError, match=r"holds 2 images but t10k-labels-idx1-ubyte\.gz 5"):
        load(tmp_path)


def test_paths_the_os_refuses_are_data_errors(tmp_path):
    with pytest.raises(CnncDataError, match=r"\(5,000 characters\): File name too long"):
        load("a" * 5000)
    with pytest.raises(CnncDataError, match=r"a\\x00b: the path contains a NUL byte"):
        load("a\0b")
    with pytest.raises(CnncDataError, match="expected a path, got int"):
        load(123)
    with pytest.raises(CnncDataError, match=r"cannot read MNIST file .*File name too long"):
        load_mnist_split(Path("d" * 5000), "train")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_given_as_data_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "data.npz")
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            load(tmp_path / "data.npz")
        except BaseException as error:  # handed to the test's thread to check
            outcome.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO hung"
    assert "it is a FIFO (named pipe), not a regular file" in str(outcome[0])


def test_an_npy_file_is_not_an_npz_dataset(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 3)))
    with pytest.raises(CnncDataError, match=r"cannot read .*x.npy: not an .npz archive "
                                            r"\(a .npy array\?"):
        load(tmp_path / "x.npy")


def test_an_npz_claiming_a_terabyte_is_refused_from_its_header(tmp_path):
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (250000000000, 1), }"
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", member)
        archive.writestr("y.npy", member)
    (tmp_path / "huge.npz").write_bytes(buffer.getvalue())
    tracemalloc.start()
    try:
        with pytest.raises(CnncDataError, match=r"member 'x\.npy' claims shape "
                                                r"\(250000000000, 1\) of float32, "
                                                "1,000,000,000,000 bytes, which takes the "
                                                "archive over cnnc's limit"):
            load(tmp_path / "huge.npz")
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def test_npz_datasets_are_plain_numbers_in_native_byte_order(tmp_path):
    np.savez(tmp_path / "be.npz", x=np.ones((4, 2), ">f4"), y=np.arange(4, dtype=">i2"))
    data = load_npz(tmp_path / "be.npz")
    assert data.x.dtype == np.float32 and data.x.dtype.isnative and data.y.dtype == np.int64
    np.testing.assert_array_equal(data.x, np.ones((4, 2)))
    np.savez(tmp_path / "objects.npz", x=np.array([[{}]], object), y=np.zeros(1))
    with pytest.raises(CnncDataError, match=r"member 'x\.npy' holds dtype object"):
        load_npz(tmp_path / "objects.npz")
    np.savez(tmp_path / "none.npz")
    with pytest.raises(CnncDataError, match="must hold the arrays x and y, it has no arrays"):
        load_npz(tmp_path / "none.npz")


@pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist is not here")
def test_the_real_mnist_test_split_reads_with_its_documented_counts():
    data = load_mnist_split(MNIST, "test")
    assert data.x.shape == (10000, 1, 28, 28)
    assert np.bincount(data.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                                            1009]
