""".npz archives read safely: exact round trips, and every damaged or hostile file refused
in one line before anything large is allocated or inflated."""

from __future__ import annotations

import io
import os
import pickle
import struct
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest
from npzfiles import npy_header, zip_of

from cnnc.support import npzfile
from cnnc.support.npzfile import read_npz, read_npz_bytes
from cnnc.training.data import CnncDataError

ARRAYS = {
    "w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "fortran": np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
    "big_endian": np.arange(5, dtype=">f8"),
    "flag": np.array(True),
    "empty": np.zeros((0, 7), dtype=np.float16),
    "param/conv1": np.full((2, 1, 3, 3), 7, dtype=np.uint64),  # checkpoints name them so
}


def refusal(path, match: str, **limits) -> None:
    with pytest.raises(CnncDataError, match=match) as caught:
        read_npz(path, "weights", CnncDataError, **limits)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_savez_and_savez_compressed_round_trip_exactly(tmp_path, save):
    save(tmp_path / "a.npz", **ARRAYS)
    read = read_npz(tmp_path / "a.npz", "weights", CnncDataError)
    assert list(read) == list(ARRAYS)
    for name, array in ARRAYS.items():
        assert read[name].dtype == array.dtype and read[name].shape == array.shape, name
        assert read[name].flags.f_contiguous == array.flags.f_contiguous, name
        assert read[name].flags.writeable, name
        np.testing.assert_array_equal(read[name], array)
    buffer = io.BytesIO()
    save(buffer, **ARRAYS)
    from_memory = read_npz_bytes(buffer.getvalue(), "the parameters of m.cnnm", CnncDataError)
    assert all(np.array_equal(from_memory[k], v) for k, v in ARRAYS.items())
    np.savez(tmp_path / "none.npz")
    assert read_npz(str(tmp_path / "none.npz"), "weights", CnncDataError) == {}


def test_version_2_headers_read(tmp_path):
    path = tmp_path / "v2.npz"
    path.write_bytes(zip_of({"a.npy": npy_header((3,), "<i2", version=2) + b"\1\0\2\0\3\0"}))
    assert read_npz(path, "weights", CnncDataError)["a"].tolist() == [1, 2, 3]


def test_a_terabyte_claim_is_refused_from_the_header_alone(tmp_path):
    path = tmp_path / "huge.npz"
    path.write_bytes(zip_of({"x.npy": npy_header((10**12,))}))
    tracemalloc.start()
    try:
        refusal(path, r"member 'x.npy' claims shape \(1000000000000,\) of uint8, "
                r"1,000,000,000,000 bytes, which takes the archive over cnnc's limit")
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def test_the_limit_counts_all_members_together(tmp_path):
    np.savez(tmp_path / "three.npz", a=np.zeros(400), b=np.zeros(400), c=np.zeros(400))
    assert len(read_npz(tmp_path / "three.npz", "weights", CnncDataError, max_bytes=9600)) == 3
    refusal(tmp_path / "three.npz", "member 'c.npy' .* over cnnc's limit of 8,000 bytes",
            max_bytes=8000)


def test_a_compressed_bomb_is_refused_before_it_inflates(tmp_path):
    # 8 MB of zeros deflate to a few KB; with a lowered limit the header alone refuses it.
    np.savez_compressed(tmp_path / "bomb.npz", x=np.zeros(8 * 2**20, np.uint8))
    assert (tmp_path / "bomb.npz").stat().st_size < 100_000
    tracemalloc.start()
    try:
        refusal(tmp_path / "bomb.npz", "8,388,608 bytes, which takes the archive over",
                max_bytes=2**20)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def with_declared_size(archive: bytes, size: int) -> bytes:
    """The one-member archive with its uncompressed size rewritten in both zip headers."""
    patched = bytearray(archive)
    struct.pack_into("<I", patched, 22, size)  # the local file header
    central = archive.index(b"PK\x01\x02")
    struct.pack_into("<I", patched, central + 24, size)
    return bytes(patched)


def test_a_declared_size_beyond_deflate_s_ratio_is_refused_unopened(tmp_path):
    small = zip_of({"x.npy": npy_header((10,)) + bytes(10)}, zipfile.ZIP_DEFLATED)
    (tmp_path / "claim.npz").write_bytes(with_declared_size(small, 0xF000_0000))
    refusal(tmp_path / "claim.npz", "declares 4,026,531,840 bytes, more than its "
            r"\d+ compressed bytes can inflate to")


def test_a_member_inflating_beyond_its_declared_size_is_cut_off_and_refused(tmp_path):
    header = npy_header((16,))
    payload = header + bytes(16 * 2**20)  # its deflate stream holds 16 MiB
    archive = with_declared_size(zip_of({"x.npy": payload}, zipfile.ZIP_DEFLATED),
                                 len(header) + 16)
    (tmp_path / "lying.npz").write_bytes(archive)
    tracemalloc.start()
    try:
        refusal(tmp_path / "lying.npz", "damaged .npz archive .*Bad CRC-32")
        assert tracemalloc.get_traced_memory()[1] < 1 << 20  # never inflated past the cut
    finally:
        tracemalloc.stop()


def test_a_npy_file_a_pickle_and_other_files_are_not_npz_archives(tmp_path):
    np.save(tmp_path / "w.npy", np.zeros(3))
    refusal(tmp_path / "w.npy", r"not an .npz archive \(a .npy array\?")
    (tmp_path / "w.pkl").write_bytes(pickle.dumps({"w": [1, 2]}))
    refusal(tmp_path / "w.pkl", r"not an .npz archive \(it does not start like a zip file\)")
    (tmp_path / "empty.npz").write_bytes(b"")
    refusal(tmp_path / "empty.npz", r"not an .npz archive \(the file is empty\)")


def test_numpy_s_pickle_advice_never_leaks(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CnncDataError) as caught:
        read_npz(tmp_path / "objects.npy", "weights", CnncDataError)
    assert "pickle" not in str(caught.value).replace(str(tmp_path), "")
    np.savez(tmp_path / "objects.npz", o=np.array([{"a": 1}], dtype=object))
    refusal(tmp_path / "objects.npz", "member 'o.npy' holds dtype object, not plain numbers")


@pytest.mark.parametrize("members, message", [
    ({"x.npy": npy_header((3,), "<c8") + bytes(24)}, "holds dtype complex64, not plain"),
    ({"x.npy": npy_header((3,), "|V4") + bytes(12)}, "holds dtype .*, not plain numbers"),
    ({"x.npy": npy_header((3,), "<U2") + bytes(24)}, "holds dtype <U2, not plain numbers"),
    ({"x.npy": npy_header((-2, -2)) + bytes(4)}, r"claims shape \(-2, -2\), with a negative"),
    ({"x.npy": npy_header((1,) * 40) + bytes(1)}, "claims 40 dimensions, more than 32"),
    ({"x.npy": npy_header((4,)) + bytes(3)}, "claims shape .* 4 bytes, but the archive "
                                             "declares 3 bytes of data"),
    ({"x.npy": b"\x93NUMPY\x01\x00\x00\x01" + b"{" * 100}, "ends inside its .npy header"),
    ({"x.npy": b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31)}, "header of 2,147,483,648"),
    ({"x.npy": b"\x93NUMPY\x03\x00" + bytes(10)}, "version 3.0; cnnc reads versions 1.0"),
    ({"x.npy": b"\x93NUMPY\x01\x00\x08\x00" + b"(((((((("}, "header that does not parse"),
    ({"x.npy": b"not npy at all"}, "is not an .npy array .*magic string"),
    ({"x.txt": npy_header((1,)) + bytes(1)}, r"member 'x.txt' is not an .npy array \(its "
                                              "name does not end in .npy"),
])
def test_damaged_members_are_refused(tmp_path, members, message):
    (tmp_path / "bad.npz").write_bytes(zip_of(members))
    refusal(tmp_path / "bad.npz", message)


def test_a_member_appearing_twice_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive, pytest.warns(UserWarning, match="Duplicate"):
        for value in (1, 2):
            archive.writestr("x.npy", npy_header((1,)) + bytes([value]))
    (tmp_path / "twice.npz").write_bytes(buffer.getvalue())
    refusal(tmp_path / "twice.npz", "member 'x.npy' appears twice")


def test_corrupt_and_truncated_archives_are_refused(tmp_path):
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.arange(1000.0))
    data = buffer.getvalue()
    start = data.index(b"x.npy") + len("x.npy") + 20  # inside the deflate stream
    garbled = data[:start] + bytes(b ^ 0x5A for b in data[start:start + 40]) + data[start + 40:]
    (tmp_path / "garbled.npz").write_bytes(garbled)
    refusal(tmp_path / "garbled.npz", r"damaged .npz archive \(")
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    refusal(tmp_path / "cut.npz", r"damaged .npz archive \(File is not a zip file\)")


def test_encrypted_and_unusual_compression_are_refused(tmp_path):
    archive = bytearray(zip_of({"x.npy": npy_header((1,)) + b"\0"}))
    central = archive.index(b"PK\x01\x02")
    archive[central + 8] |= 0x1  # the central directory's "encrypted" flag
    (tmp_path / "locked.npz").write_bytes(bytes(archive))
    refusal(tmp_path / "locked.npz", "member 'x.npy' is encrypted")
    (tmp_path / "bz.npz").write_bytes(zip_of({"x.npy": npy_header((1,)) + b"\0"},
                                             zipfile.ZIP_BZIP2))
    refusal(tmp_path / "bz.npz", "compressed with zip method 12; numpy writes members stored")


def test_random_damage_never_escapes_as_anything_but_a_cnnc_error(tmp_path):
    rng = np.random.default_rng(7)
    for save in (np.savez, np.savez_compressed):
        buffer = io.BytesIO()
        save(buffer, a=np.arange(50.0), b=np.ones((3, 4), np.int8))
        original = buffer.getvalue()
        for _ in range(300):
            data = bytearray(original)
            for where in rng.integers(0, len(data), rng.integers(1, 4)):
                data[where] = rng.integers(0, 256)
            data = data[:rng.integers(len(data) // 2, len(data) + 1)]
            try:
                read_npz_bytes(bytes(data), "a damaged archive", CnncDataError)
            except CnncDataError as error:
                assert "\n" not in str(error)


def test_what_is_not_a_regular_file_is_refused(tmp_path):
    refusal(tmp_path, "it is a folder, not a regular file")
    refusal(tmp_path / "absent.npz", "no such file")
    with pytest.raises(CnncDataError, match="cannot read weights: expected the path of a "
                                            "file, got int"):
        read_npz(123, "weights", CnncDataError)
    with pytest.raises(CnncDataError, match=r"expected the bytes of an \.npz archive, got str"):
        read_npz_bytes("PK", "the parameters of m.cnnm", CnncDataError)
    with pytest.raises(CnncDataError, match="File name too long"):
        read_npz("a" * 5000, "weights", CnncDataError)
    with pytest.raises(CnncDataError, match=r"a\\x00b: the path contains a NUL byte"):
        read_npz("a\0b", "weights", CnncDataError)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "weights.npz"
    os.mkfifo(fifo)
    caught: list[BaseException] = []

    def read() -> None:
        try:
            read_npz(fifo, "weights", CnncDataError)
        except BaseException as error:  # handed to the test's thread to check
            caught.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO hung"
    assert isinstance(caught[0], CnncDataError)
    assert "it is a FIFO (named pipe), not a regular file" in str(caught[0])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_swapped_in_after_the_check_is_refused_by_fstat(tmp_path, monkeypatch):
    fifo = tmp_path / "weights.npz"
    os.mkfifo(fifo)
    np.savez(tmp_path / "real.npz", a=np.zeros(1))
    # The first look finds a regular file; by the time of the open, a FIFO is there.
    real = os.stat(tmp_path / "real.npz")
    monkeypatch.setattr(npzfile, "file_status", lambda path, what, error: real)
    with pytest.raises(CnncDataError, match="it is a FIFO"):
        read_npz(fifo, "weights", CnncDataError)


def test_running_out_of_memory_is_a_cnnc_error(tmp_path, monkeypatch):
    np.savez(tmp_path / "a.npz", a=np.zeros(1000))
    read_bytes = npzfile.read_bytes

    def no_room_for_data(stream, count: int) -> np.ndarray:
        if count > 1000:  # the array's data, not its header
            raise MemoryError
        return read_bytes(stream, count)

    monkeypatch.setattr(npzfile, "read_bytes", no_room_for_data)
    refusal(tmp_path / "a.npz", "member 'a.npy' needs 8,000 bytes, more memory than is free")
