"""Fetching MNIST for machines with internet: each file from the first mirror that serves
it intact, checked against a known checksum, written atomically (a partial download never
sits under the final name)."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from .data import MNIST_FILES, CnncDataError
from .module import CnncModuleError, write_atomically

DEFAULT_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                   "https://storage.googleapis.com/cvdf-datasets/mnist/")

# MD5 of the original .gz files as the mirrors publish them, and, where known, of the
# decompressed bytes (which survive a recompression, as in a locally repacked copy).
CHECKSUMS = {
    "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", None),
    "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", None),
    "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3",
                               "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c",
                               "27ae3e4e09519cfbb04c329615203637"),
}


def intact(stem: str, data: bytes) -> bool:
    """Whether `data` is the genuine `stem`.gz: by its own checksum or its contents'."""
    packed, unpacked = CHECKSUMS[stem]
    if hashlib.md5(data).hexdigest() == packed:
        return True
    if unpacked is None:
        return False
    try:
        return hashlib.md5(gzip.decompress(data)).hexdigest() == unpacked
    except (OSError, EOFError):
        return False


def download_mnist(folder: str | Path, splits: Sequence[str] = ("train", "test"),
                   mirrors: Sequence[str] = DEFAULT_MIRRORS, timeout: float = 60.0,
                   report: Callable[[str], None] = print) -> list[Path]:
    """The files of `splits` in `folder`; files already there and intact are kept."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CnncDataError.single(f"cannot make the folder {folder}: "
                                   f"{error.strerror or error}") from None
    written = []
    for split in splits:
        for stem in MNIST_FILES[split]:
            target = folder / f"{stem}.gz"
            if target.is_file() and intact(stem, target.read_bytes()):
                report(f"{target}: already here and intact")
            else:
                _fetch_first_intact(stem, target, mirrors, timeout, report)
            written.append(target)
    return written


def _fetch_first_intact(stem: str, target: Path, mirrors: Sequence[str], timeout: float,
                        report: Callable[[str], None]) -> None:
    problems = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + f"/{stem}.gz"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
            problems.append(f"{url}: {getattr(error, 'reason', error)}")
            continue
        if not intact(stem, data):
            problems.append(f"{url}: the checksum does not match")
            continue
        try:
            write_atomically(target, data)
        except CnncModuleError as error:
            raise CnncDataError(error.diagnostics) from None
        report(f"{target}: {len(data):,} bytes from {url}")
        return
    raise CnncDataError.single(f"could not download {stem}.gz: " + "; ".join(problems))
