"""Reading the .npz archives a user hands cnnc, trusting nothing the archive claims.

`numpy.load` believes a file: a member whose header claims a terabyte is allocated (a
MemoryError), a FIFO is opened and waited on forever, a .npy file comes back as a bare array,
and its messages give advice (`allow_pickle`) that is wrong for cnnc. `read_npz` and
`read_npz_bytes` instead check every size against the file's real length and a limit before
anything is allocated or inflated, read only plain number arrays, and report every fault as
one `CnncError` line that names the file and says what is wrong.

Limits (all in bytes):

- `MAX_NPZ_BYTES` (4 GiB): the default cap on the array data of one archive, all members
  together; far above any network or dataset cnnc is meant for, far below a bomb's claims.
- `MAX_HEADER_BYTES` (10,000): the longest .npy header dictionary, numpy's own limit.
- `DEFLATE_MAX_RATIO` (1032): no deflate stream inflates to more than 1032 times its size,
  so a member that declares more than that is refused before it is opened.

`open_regular`, `file_status`, `shown_path` and `read_bytes` are shared with the IDX reader
in `cnnc.training.data`.
"""

from __future__ import annotations

import io
import math
import os
import stat
import struct
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib.format import read_array_header_1_0, read_array_header_2_0

from cnnc.diagnostics import CnncError

MAX_NPZ_BYTES = 4 * 2**30
MAX_HEADER_BYTES = 10_000
DEFLATE_MAX_RATIO = 1032
# A deflate stream's own framing can make a tiny input come out a little larger than the
# ratio alone allows; this much slack covers it without letting a bomb through.
DEFLATE_SLACK = 1024
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a first member, or an archive of no members
# The dtypes cnnc computes with: bool, integers and floats of the usual widths, either
# byte order. Objects would need pickle; structures, strings, longdouble mean nothing here.
PLAIN_ITEMSIZES = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8)}
MAX_DIMENSIONS = 32  # numpy 1.x's limit; numpy 2 allows 64, no cnnc array needs either
CHUNK = 1 << 20  # bytes read at a time, so nothing is read twice over in memory

# What zipfile, zlib and numpy's header parser raise on a damaged archive.
READ_FAILURES = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, KeyError,
                 NotImplementedError, RuntimeError, OverflowError, struct.error)

Refuse = Callable[[str], CnncError]


def read_npz(path: Path | str, what: str, error: type[CnncError],
             max_bytes: int = MAX_NPZ_BYTES) -> dict[str, np.ndarray]:
    """The named arrays of the .npz file at `path`, each a writable array as it was saved.

    `what` names the file's role in messages ("cannot read {what} {path}: ..."), e.g.
    "weights" or "checkpoint", or is "" for none; every refusal is `error.single(...)`.
    At most `max_bytes` of array data are read, all members together. Output of numpy.savez
    and savez_compressed reads back exactly (dtype, byte order, shape and memory order).
    """
    refuse = _path_refuser(path, what, error)
    file, size = _open_regular(path, refuse)
    with file:
        return _read_archive(file, size, refuse, max_bytes)


def read_npz_bytes(data: bytes, what: str, error: type[CnncError],
                   max_bytes: int = MAX_NPZ_BYTES) -> dict[str, np.ndarray]:
    """`read_npz` of an archive held in memory (a module file's parameters section).

    `what` is the whole description of the bytes, as in "cannot read {what}: ...", e.g.
    "the parameters of net.cnnm".
    """
    refuse = _refuser(f"cannot read {what}", error)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise refuse(f"expected the bytes of an .npz archive, got {type(data).__name__}")
    buffer = io.BytesIO(data)
    return _read_archive(buffer, buffer.getbuffer().nbytes, refuse, max_bytes)


def shown_path(path: str | os.PathLike[str]) -> str:
    """The path as a message shows it: on one line, with control characters and undecodable
    bytes escaped (printing them could garble the terminal or fail), and a path too long for
    any OS cut in the middle, with its length, so the message stays readable."""
    text = os.fsdecode(os.fspath(path))
    if not text.isprintable():
        text = repr(text)[1:-1]
    if len(text) > 200:
        text = f"{text[:80]}...{text[-80:]} ({len(text):,} characters)"
    return text


def file_status(path: Path | str, what: str, error: type[CnncError]) -> os.stat_result | None:
    """os.stat of `path`, or None when nothing is there. Anything else the OS refuses (a name
    too long, a NUL byte, no permission, a loop of links) is `error`, "cannot read ...".
    Path.is_dir and is_file raise some of these (ENAMETOOLONG) and hide others."""
    return _status(path, _path_refuser(path, what, error))


def _status(path: Path | str, refuse: Refuse) -> os.stat_result | None:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError:  # os.stat's answer to a NUL byte in the path
        raise refuse("the path contains a NUL byte") from None
    except OSError as failure:
        raise refuse(failure.strerror or str(failure)) from None


def open_regular(path: Path | str, what: str, error: type[CnncError]) -> tuple[BinaryIO, int]:
    """`path` opened for binary reading, with its size in bytes, if it is a regular file.

    It is checked twice: os.stat before opening refuses a FIFO or a device without touching
    it, and fstat of the open descriptor refuses one swapped in meanwhile. O_NONBLOCK makes
    even that open return at once rather than wait for a FIFO's writer.
    """
    return _open_regular(path, _path_refuser(path, what, error))


def _open_regular(path: Path | str, refuse: Refuse) -> tuple[BinaryIO, int]:
    status = _status(path, refuse)
    if status is None:
        raise refuse("no such file")
    _require_regular(status, refuse)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as failure:
        raise refuse(failure.strerror or str(failure)) from None
    try:
        status = os.fstat(descriptor)
        _require_regular(status, refuse)
    except BaseException:
        os.close(descriptor)
        raise
    return os.fdopen(descriptor, "rb"), status.st_size


def read_bytes(stream: BinaryIO, count: int) -> np.ndarray:
    """Up to `count` bytes of `stream` as a writable uint8 array, fewer only at its end.

    The array is allocated once and filled a chunk at a time, so memory never holds more
    than `count` bytes plus one chunk, however much the stream could still produce.
    """
    buffer = np.empty(count, dtype=np.uint8)
    view = memoryview(buffer)
    filled = 0
    while filled < count:
        chunk = stream.read(min(CHUNK, count - filled))
        if not chunk:
            return buffer[:filled]
        view[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    return buffer


def _refuser(label: str, error: type[CnncError]) -> Refuse:
    def refuse(reason: str) -> CnncError:
        return error.single(f"{label}: {reason}")

    return refuse


def _path_refuser(path: object, what: str, error: type[CnncError]) -> Refuse:
    """Refusals that begin "cannot read {what} {path}", once `path` is known to be a path.
    An empty `what` leaves the role out: "cannot read {path}"."""
    label = f"cannot read {what}".rstrip()
    if not isinstance(path, (str, os.PathLike)):
        raise error.single(f"{label}: expected the path of a file, got {type(path).__name__}")
    try:
        shown = shown_path(path)
    except TypeError:  # an os.PathLike whose __fspath__ returns neither str nor bytes
        raise error.single(f"{label}: expected the path of a file, "
                           f"got {type(path).__name__}") from None
    return _refuser(f"{label} {shown}", error)


def _require_regular(status: os.stat_result, refuse: Refuse) -> None:
    mode = status.st_mode
    if stat.S_ISREG(mode):
        return
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    kind = next((name for test, name in kinds if test(mode)), "an unusual kind of file")
    raise refuse(f"it is {kind}, not a regular file")


def _one_line(failure: BaseException) -> str:
    """An exception's message on one short line (numpy's span several, and quote headers)."""
    return _short(str(failure)) or type(failure).__name__


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 160 else text[:157] + "..."


def _read_archive(file: BinaryIO, size: int, refuse: Refuse,
                  max_bytes: int) -> dict[str, np.ndarray]:
    try:
        start = file.read(len(NPY_MAGIC))
        _require_zip(start, refuse)
        file.seek(0)
        with zipfile.ZipFile(file) as archive:
            return _Members(refuse, size, max_bytes).read(archive)
    except READ_FAILURES as failure:
        raise refuse(f"damaged .npz archive ({_one_line(failure)})") from None


def _require_zip(start: bytes, refuse: Refuse) -> None:
    if not start:
        raise refuse("not an .npz archive (the file is empty)")
    if start.startswith(NPY_MAGIC):
        raise refuse("not an .npz archive (a .npy array? cnnc needs named arrays, "
                     "as numpy.savez writes them)")
    if not start.startswith(ZIP_MAGICS):
        raise refuse("not an .npz archive (it does not start like a zip file)")


class _Members:
    """Reads an archive's members in turn, keeping count of the bytes they hold so far."""

    def __init__(self, refuse: Refuse, size: int, max_bytes: int) -> None:
        self.refuse, self.size, self.max_bytes = refuse, size, max_bytes
        self.used = 0

    def read(self, archive: zipfile.ZipFile) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for info in archive.infolist():
            refuse = self._member_refuser(info)
            name = _array_name(info, arrays, refuse)
            self._check_declared_sizes(info, refuse)
            with archive.open(info) as member:
                array = self._read_member(member, info, refuse)
            self.used += array.nbytes
            arrays[name] = array
        return arrays

    def _member_refuser(self, info: zipfile.ZipInfo) -> Refuse:
        def refuse(reason: str) -> CnncError:
            return self.refuse(f"member {info.filename!r} {reason}")

        return refuse

    def _check_declared_sizes(self, info: zipfile.ZipInfo, refuse: Refuse) -> None:
        """The zip directory's sizes against the file's real length, before inflating."""
        if info.flag_bits & 0x1:
            raise refuse("is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise refuse(f"is compressed with zip method {info.compress_type}; numpy writes "
                         "members stored or deflated")
        if info.compress_size > self.size:
            raise refuse(f"claims {info.compress_size:,} bytes of the archive's {self.size:,}")
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise refuse(f"is stored uncompressed, yet declares {info.file_size:,} bytes "
                         f"in {info.compress_size:,}")
        if info.file_size > DEFLATE_MAX_RATIO * info.compress_size + DEFLATE_SLACK:
            raise refuse(f"declares {info.file_size:,} bytes, more than its "
                         f"{info.compress_size:,} compressed bytes can inflate to")

    def _read_member(self, member: BinaryIO, info: zipfile.ZipInfo,
                     refuse: Refuse) -> np.ndarray:
        shape, fortran_order, dtype, header_length = _read_npy_header(member, refuse)
        count = _byte_count(shape, dtype, refuse)
        if count > self.max_bytes - self.used:
            raise refuse(f"claims shape {shape} of {dtype}, {count:,} bytes, which takes the "
                         f"archive over cnnc's limit of {self.max_bytes:,} bytes")
        if count != info.file_size - header_length:
            raise refuse(f"claims shape {shape} of {dtype}, {count:,} bytes, but the archive "
                         f"declares {info.file_size - header_length:,} bytes of data for it")
        try:
            data = read_bytes(member, count)
        except MemoryError:
            raise refuse(f"needs {count:,} bytes, more memory than is free") from None
        if len(data) < count:
            raise refuse(f"ends after {len(data):,} of its {count:,} bytes")
        flat = data.view(dtype)
        # numpy stores a Fortran-ordered array as its transpose in C order.
        return flat.reshape(shape[::-1]).T if fortran_order else flat.reshape(shape)


def _array_name(info: zipfile.ZipInfo, arrays: dict[str, np.ndarray], refuse: Refuse) -> str:
    """The array's name: the member's name less `.npy`, as numpy.savez writes it."""
    if not info.filename.endswith(".npy"):
        raise refuse("is not an .npy array (its name does not end in .npy)")
    name = info.filename[:-len(".npy")]
    if name in arrays:
        raise refuse("appears twice in the archive")
    return name


def _read_npy_header(stream: BinaryIO,
                     refuse: Refuse) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, header length in bytes) of a .npy stream.

    The header's length is checked before the header is read, since a version 2.0 header
    may claim 4 GiB; numpy's own parser then reads the dictionary.
    """
    prefix = _read_header_part(stream, len(NPY_MAGIC) + 2, refuse)
    if prefix[:len(NPY_MAGIC)] != NPY_MAGIC:
        raise refuse("is not an .npy array (it does not start with the .npy magic string)")
    version = (prefix[-2], prefix[-1])
    parsers = {(1, 0): (2, read_array_header_1_0), (2, 0): (4, read_array_header_2_0)}
    if version not in parsers:
        # 3.0 exists only for structured dtypes with non-latin-1 field names.
        raise refuse(f"is in .npy format version {version[0]}.{version[1]}; cnnc reads "
                     "versions 1.0 and 2.0")
    length_size, parse = parsers[version]
    length_field = _read_header_part(stream, length_size, refuse)
    length = int.from_bytes(length_field, "little")
    if length > MAX_HEADER_BYTES:
        raise refuse(f"has a .npy header of {length:,} bytes, more than the "
                     f"{MAX_HEADER_BYTES:,} numpy allows")
    header = _read_header_part(stream, length, refuse)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy's hint to re-save a Python 2 header
            shape, fortran_order, dtype = parse(io.BytesIO(length_field + header))
    except Exception as failure:  # numpy's parser of the header text raises many kinds,
        # tokenize.TokenError and RecursionError among them; every one means a bad header
        raise refuse(f"has a .npy header that does not parse ({_one_line(failure)})") from None
    _require_plain(dtype, refuse)
    return shape, fortran_order, dtype, len(prefix) + length_size + length


def _read_header_part(stream: BinaryIO, count: int, refuse: Refuse) -> bytes:
    data = read_bytes(stream, count).tobytes()
    if len(data) < count:
        raise refuse("ends inside its .npy header")
    return data


def _require_plain(dtype: np.dtype, refuse: Refuse) -> None:
    if dtype.itemsize not in PLAIN_ITEMSIZES.get(dtype.kind, ()):
        raise refuse(f"holds dtype {_short(str(dtype))}, not plain numbers "
                     "(bool, int, uint or float)")


def _byte_count(shape: tuple[int, ...], dtype: np.dtype, refuse: Refuse) -> int:
    """The bytes an array of `shape` needs, in Python integers so no product overflows."""
    if len(shape) > MAX_DIMENSIONS:
        raise refuse(f"claims {len(shape)} dimensions, more than {MAX_DIMENSIONS}")
    if any(dim < 0 for dim in shape):
        raise refuse(f"claims shape {shape}, with a negative dimension")
    return math.prod(shape) * dtype.itemsize
