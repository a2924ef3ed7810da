"""Fetching MNIST for machines with internet: each file from the first mirror that serves
it intact, checked against a known checksum, written atomically (a partial download never
sits under the final name)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import io
import math
import socket
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from cnnc.support.files import write_atomically
from cnnc.training.data import MNIST_FILES, CnncDataError

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

# Sizes of the original .gz files (as listed on the MNIST home page).
KNOWN_SIZES = {
    "train-images-idx3-ubyte": 9_912_422,
    "train-labels-idx1-ubyte": 28_881,
    "t10k-images-idx3-ubyte": 1_648_877,
    "t10k-labels-idx1-ubyte": 4_542,
}

# The most bytes read for each file, so that a server sending gigabytes cannot exhaust the
# memory. Twice the original size, not the size itself: a repacked copy (which passes the
# check of its decompressed bytes) may be compressed less tightly; `gzip -1` makes the test
# images 1.11 times their original size. Only an uncompressed copy would not fit.
SIZE_CAPS = {stem: 2 * size for stem, size in KNOWN_SIZES.items()}

# Beyond this, a timeout is surely a mistake; `inf` would overflow the socket and timer calls.
MAX_TIMEOUT = 24 * 60 * 60.0

CHUNK = 64 * 1024


# The decompressed sizes of the files whose contents' checksum is known: an IDX header of
# 16 (images) or 8 (labels) bytes, then 10,000 28x28 images or 10,000 labels.
UNPACKED_SIZES = {"t10k-images-idx3-ubyte": 16 + 10_000 * 28 * 28,
                  "t10k-labels-idx1-ubyte": 8 + 10_000}


def intact(stem: str, data: bytes) -> bool:
    """Whether `data` is the genuine `stem`.gz: by its own checksum or its contents'."""
    packed, unpacked = CHECKSUMS[stem]
    if hashlib.md5(data).hexdigest() == packed:
        return True
    if unpacked is None:
        return False
    try:  # inflated no further than the genuine file's size: a small bomb stays small
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
            contents = stream.read(UNPACKED_SIZES[stem] + 1)
    except (OSError, EOFError, zlib.error):
        return False
    return len(contents) == UNPACKED_SIZES[stem] and \
        hashlib.md5(contents).hexdigest() == unpacked


def download_mnist(folder: str | Path, splits: Sequence[str] = ("train", "test"),
                   mirrors: Sequence[str] = DEFAULT_MIRRORS, timeout: float = 60.0,
                   report: Callable[[str], None] = print) -> list[Path]:
    """The files of `splits` in `folder`; files already there and intact are kept.

    Each file's request (connect, headers and body) gets `timeout` seconds in all, after
    which that mirror is given up and the next one tried."""
    check_timeout(timeout)
    check_mirrors(mirrors)
    folder = _make_folder(Path(folder))
    targets = [(stem, folder / f"{stem}.gz") for split in splits for stem in MNIST_FILES[split]]
    missing = []
    for stem, target in targets:
        if _already_intact(stem, target):
            report(f"{target}: already here and intact")
        else:
            missing.append((stem, target))
    for _, target in missing:  # before any download, not after one
        _check_writable(target)
    for stem, target in missing:
        _fetch_first_intact(stem, target, mirrors, timeout, report)
    return [target for _, target in targets]


def check_timeout(timeout: float) -> None:
    """Refuse a timeout that is no number of seconds a request could wait."""
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout)
            and 0 < timeout <= MAX_TIMEOUT):
        raise CnncDataError.single(f"the timeout must be more than 0 and at most "
                                   f"{MAX_TIMEOUT:.0f} seconds (one day), not {timeout}")


def check_mirrors(mirrors: Sequence[str]) -> None:
    """Refuse mirrors that are not http:// or https:// URLs with a host (file:// and the
    like would read local files or speak protocols nothing here bounds)."""
    if not mirrors:
        raise CnncDataError.single("no mirror to download from")
    for mirror in mirrors:
        if not _is_web_url(mirror):
            raise CnncDataError.single(f"the mirror {mirror!r} is not an http:// or https:// "
                                       "URL (such as https://example.org/mnist/)")


def _is_web_url(text: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port  # raises ValueError for one out of range
    except (ValueError, TypeError, AttributeError):  # the latter two for no string at all
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and port != 0


def _make_folder(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CnncDataError.single(f"cannot make the folder {folder}: "
                                   f"{error.strerror or error}") from None
    return folder


def _already_intact(stem: str, target: Path) -> bool:
    try:
        # A file larger than any genuine copy is not read into memory to find that out.
        if not target.is_file() or target.stat().st_size > SIZE_CAPS[stem]:
            return False
        return intact(stem, target.read_bytes())
    except OSError as error:  # a path too long, say
        raise CnncDataError.single(f"cannot use {target}: {error.strerror or error}") from None


def _check_writable(target: Path) -> None:
    """Fail before a download that could not be kept: a probe file beside the target shows
    an unwritable folder, or a name too long, before any byte is fetched."""
    try:
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}."):
            pass
    except OSError as error:
        raise CnncDataError.single(f"cannot write {target}: {error.strerror or error}") from None


def _fetch_first_intact(stem: str, target: Path, mirrors: Sequence[str], timeout: float,
                        report: Callable[[str], None]) -> None:
    problems = []
    for number, mirror in enumerate(mirrors, start=1):
        url = mirror.rstrip("/") + f"/{stem}.gz"
        try:
            data = _fetch_intact(url, stem, timeout)
        except _MirrorFailed as failure:
            problems.append(f"{url}: {failure}")
            if number < len(mirrors):
                report(f"{url}: {failure}; trying the next mirror")
            continue
        write_atomically(target, data, CnncDataError)
        report(f"{target}: {len(data):,} bytes from {url}")
        return
    raise CnncDataError.single(f"could not download {stem}.gz: " + "; ".join(problems))


class _MirrorFailed(Exception):
    """Why one mirror did not deliver a file; the next mirror is tried."""


def _fetch_intact(url: str, stem: str, timeout: float) -> bytes:
    """The genuine `stem`.gz from `url`, within `timeout` seconds and SIZE_CAPS[stem] bytes."""
    with _Deadline(timeout) as deadline:
        try:
            with _opener(deadline).open(url, timeout=timeout) as response:
                data = _read_body(response, SIZE_CAPS[stem], deadline)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
            # After the deadline the error is whatever cutting the socket caused.
            deadline.check()
            raise _MirrorFailed(getattr(error, "reason", error)) from None
    if not intact(stem, data):
        raise _MirrorFailed("the checksum does not match")
    return data


def _read_body(response: http.client.HTTPResponse, cap: int, deadline: _Deadline) -> bytes:
    """The body, read in chunks so that neither its size nor its duration goes unchecked."""
    announced = _announced_size(response)
    if announced is not None and announced > cap:
        raise _MirrorFailed(f"it announces {announced:,} bytes, more than the {cap:,} "
                            "allowed for this file")
    chunks, size = [], 0
    while True:
        deadline.bound_next_read()
        chunk = response.read1(CHUNK)  # at most one read from the socket, however slow
        if not chunk:
            break
        size += len(chunk)
        if size > cap:
            raise _MirrorFailed(f"it sent more than the {cap:,} bytes allowed for this file")
        chunks.append(chunk)
    deadline.check()  # an end brought about by the watchdog is no end of the file
    data = b"".join(chunks)
    if announced is not None and size < announced:
        # read1 takes a closed connection for the end; a whole read would have raised this.
        raise http.client.IncompleteRead(data, announced - size)
    return data


def _announced_size(response: http.client.HTTPResponse) -> int | None:
    value = response.getheader("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # http.client reads such a body to its end, and the cap still holds


class _Deadline:
    """A time limit for a whole request: connect, headers and body.

    A socket timeout bounds each read only, so a server sending a byte now and then is never
    cut off by it. Reads of the body are bounded by the time left; the TLS handshake and the
    headers are read inside ssl and http.client, out of reach, so a timer shuts the request's
    sockets down at the deadline, which ends a read blocked on them at once."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()  # between the timer's thread and the request's
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        """Shut `sock` down at the deadline (at once if it is already past)."""
        with self._lock:
            self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut(sock)

    def check(self) -> None:
        if self.expired or time.monotonic() >= self.end:
            raise _MirrorFailed(f"gave up after {self.seconds:g} s without a complete "
                                "response")

    def bound_next_read(self) -> None:
        """Let the next read wait no longer than the time left."""
        self.check()
        left = self.end - time.monotonic()
        with self._lock:
            sock = self._sockets[-1] if self._sockets else None
        if sock is not None:
            # Closed once the body is complete, when there is no read left to bound.
            with contextlib.suppress(OSError):
                sock.settimeout(max(left, 0.001))

    def tls_context(self) -> ssl.SSLContext:
        """The default context for https, with each TLS socket watched from before its
        handshake (which a server could trickle too)."""
        context = ssl.create_default_context()
        context.set_alpn_protocols(["http/1.1"])  # as in the context http.client would make
        deadline = self

        class Watched(ssl.SSLSocket):
            def do_handshake(self, block: bool = False) -> None:
                deadline.watch(self)
                super().do_handshake(block)

        context.sslsocket_class = Watched
        return context

    def connection_class(self, base: type[http.client.HTTPConnection]
                         ) -> type[http.client.HTTPConnection]:
        """`base`, with each socket it connects watched by this deadline."""
        deadline = self

        class Watched(base):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                super().connect()
                deadline.watch(self.sock)

        return Watched

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    # The plain socket's shutdown even for a TLS socket: ssl.SSLSocket's own would also drop
    # its TLS state, under the feet of the thread reading from it.
    with contextlib.suppress(OSError):  # already closed: nothing left to cut off
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _WatchedConnections:
    """A mixin for urllib's HTTP(S) handlers: their connections' sockets are watched."""

    def __init__(self, deadline: _Deadline, **options: object) -> None:
        super().__init__(**options)
        self.deadline = deadline

    def do_open(self, http_class, request, **options):  # urllib's signature
        return super().do_open(self.deadline.connection_class(http_class), request, **options)


class _WatchedHTTPHandler(_WatchedConnections, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPSHandler(_WatchedConnections, urllib.request.HTTPSHandler):
    pass


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect without reading its body first, as urllib would, to the end and
    however long it is."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        fp.close()
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """An opener for http and https only: without urllib's file, ftp and data handlers, a
    redirect cannot lead anywhere else either."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), _Redirects(),
                    urllib.request.HTTPErrorProcessor(), _WatchedHTTPHandler(deadline),
                    _WatchedHTTPSHandler(deadline, context=deadline.tls_context())):
        opener.add_handler(handler)
    return opener
