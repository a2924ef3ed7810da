"""The MNIST downloader against HTTP servers on 127.0.0.1: one serving the real files, and
others misbehaving: damaged bytes, a transfer cut short, a response trickled a byte at a time,
bodies too large, redirects elsewhere."""

from __future__ import annotations

import http.server
import os
import socketserver
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from cnnc.cli.main import main
from cnnc.training.data import CnncDataError, load_mnist_split
from cnnc.training.download import KNOWN_SIZES, SIZE_CAPS, download_mnist
from conftest import REPO

MNIST = REPO.parent / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist is not here")

QUIET = {"report": lambda _: None}


class _Damaged(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"\x1f\x8b not really gzip"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _CutShort(_Damaged):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        self.wfile.write(b"\x1f\x8b" + b"\0" * 100)  # then the connection closes


def _send_slowly(write, data: bytes) -> None:
    """One byte every 0.25 s, until the client hangs up (or 250 s have passed)."""
    for byte in data:
        try:
            write(bytes([byte]))
        except OSError:
            return
        time.sleep(0.25)


def _send_endlessly(wfile) -> None:
    """Zeros until the client hangs up (or 6.5 GB have gone, should it never)."""
    block = bytes(64 * 1024)
    for _ in range(100_000):
        try:
            wfile.write(block)
        except OSError:
            return


class _TrickledHeaders(_Damaged):
    def do_GET(self):
        _send_slowly(self.wfile.write, b"HTTP/1.0 200 OK\r\nX-Trickle: " + b"a" * 1000)


class _TrickledBody(_Damaged):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        _send_slowly(self.wfile.write, bytes(1000))


class _TrickledTLSHandshake(socketserver.StreamRequestHandler):
    def handle(self):
        # A TLS record header announcing 16 KiB of handshake, which the client waits for.
        _send_slowly(self.wfile.write, b"\x16\x03\x03\x40\x00" + bytes(1000))


class _Endless(_Damaged):
    def do_GET(self):
        self.send_response(200)  # HTTP/1.0 and no Content-Length: the body ends at the close
        self.end_headers()
        _send_endlessly(self.wfile)


class _AnnouncesATerabyte(_Damaged):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(10**12))
        self.end_headers()
        self.wfile.write(bytes(1000))


class _FiveThousandBytes(_Damaged):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(bytes(5000))


def _redirect_to(location: str) -> type[http.server.BaseHTTPRequestHandler]:
    class Redirect(_Damaged):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", location + self.path.lstrip("/"))
            self.end_headers()
            _send_endlessly(self.wfile)  # a body urllib alone would read to its end

    return Redirect


def _redirect_late_to(location: str) -> type[http.server.BaseHTTPRequestHandler]:
    class LateRedirect(_Damaged):
        def do_GET(self):
            time.sleep(1.5)
            self.send_response(302)
            self.send_header("Location", location + self.path.lstrip("/"))
            self.end_headers()

    return LateRedirect


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    started = []

    def start(handler) -> str:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        started.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}/"

    yield start
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


@needs_mnist
def test_download_verifies_and_falls_over_to_the_next_mirror(tmp_path, server):
    bad = server(_Damaged)
    good = server(partial(_Files, directory=str(MNIST)))
    files = download_mnist(tmp_path, ["test"], [bad, good], timeout=10, report=lambda _: None)
    assert [f.name for f in files] == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    for file in files:
        assert file.read_bytes() == (MNIST / file.name).read_bytes()
    assert len(load_mnist_split(tmp_path, "test")) == 10000
    again = []
    download_mnist(tmp_path, ["test"], [bad], timeout=10, report=again.append)
    assert all("already here and intact" in line for line in again)


def test_damaged_or_cut_downloads_leave_no_file(tmp_path, server):
    mirrors = [server(_Damaged), server(_CutShort)]
    with pytest.raises(CnncDataError, match=r"could not download t10k-images-idx3-ubyte\.gz: "
                                            r".*the checksum does not match; .*IncompleteRead"):
        download_mnist(tmp_path, ["test"], mirrors, timeout=10, report=lambda _: None)
    assert list(tmp_path.iterdir()) == []


@needs_mnist
def test_download_command(tmp_path, server, capsys):
    good = server(partial(_Files, directory=str(MNIST)))
    assert main(["download", str(tmp_path / "m"), "--split", "test", "--mirror", good]) == 0
    out = capsys.readouterr().out
    assert "t10k-labels-idx1-ubyte.gz: " in out and f"bytes from {good}" in out
    assert (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").exists()
    assert main(["download", str(tmp_path / "n"), "--split", "test", "--mirror",
                 "http://127.0.0.1:9/", "--timeout", "2"]) == 1
    assert "could not download" in capsys.readouterr().err


def _timed_failure(folder: Path, mirrors: list[str], timeout: float) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(CnncDataError) as raised:
        download_mnist(folder, ["test"], mirrors, timeout=timeout, **QUIET)
    return str(raised.value), time.monotonic() - start


@pytest.mark.parametrize("handler", [_TrickledHeaders, _TrickledBody])
def test_a_trickling_server_is_given_up_at_the_timeout(tmp_path, server, handler):
    message, seconds = _timed_failure(tmp_path, [server(handler)], timeout=1)
    assert "t10k-images-idx3-ubyte.gz: gave up after 1 s without a complete response" in message
    assert 0.9 < seconds < 2.0
    assert list(tmp_path.iterdir()) == []


def test_a_trickled_tls_handshake_is_given_up_at_the_timeout(tmp_path, server):
    mirror = server(_TrickledTLSHandshake).replace("http://", "https://")
    message, seconds = _timed_failure(tmp_path, [mirror], timeout=1)
    assert "gave up after 1 s without a complete response" in message
    assert 0.9 < seconds < 2.0


def test_the_deadline_holds_across_a_redirect(tmp_path, server):
    # Python bounds a TLS handshake by the socket timeout, but from its own start: here it
    # starts 1.5 s into the request and would end 2 s later, not at the deadline.
    handshake = server(_TrickledTLSHandshake).replace("http://", "https://")
    message, seconds = _timed_failure(tmp_path, [server(_redirect_late_to(handshake))],
                                      timeout=2)
    assert "gave up after 2 s without a complete response" in message
    assert 1.9 < seconds < 3.0


def test_after_a_timeout_the_next_mirror_is_tried(tmp_path, server):
    slow, damaged = server(_TrickledHeaders), server(_Damaged)
    reported = []
    with pytest.raises(CnncDataError, match=r"gave up after 1 s .*; .*checksum does not match"):
        download_mnist(tmp_path, ["test"], [slow, damaged], timeout=1, report=reported.append)
    assert reported == [f"{slow}t10k-images-idx3-ubyte.gz: gave up after 1 s without a "
                        "complete response; trying the next mirror"]


def test_an_endless_body_is_cut_off_at_the_size_cap(tmp_path, server):
    cap = SIZE_CAPS["t10k-images-idx3-ubyte"]
    message, seconds = _timed_failure(tmp_path, [server(_Endless)], timeout=30)
    assert f"it sent more than the {cap:,} bytes allowed for this file" in message
    assert seconds < 5


def test_a_body_of_the_cap_is_read_and_one_byte_more_is_not(tmp_path, server, monkeypatch):
    mirror = server(_FiveThousandBytes)
    monkeypatch.setitem(SIZE_CAPS, "t10k-images-idx3-ubyte", 5000)
    message, _ = _timed_failure(tmp_path, [mirror], timeout=10)
    assert "the checksum does not match" in message
    monkeypatch.setitem(SIZE_CAPS, "t10k-images-idx3-ubyte", 4999)
    message, _ = _timed_failure(tmp_path, [mirror], timeout=10)
    assert "it sent more than the 4,999 bytes allowed for this file" in message


def test_a_content_length_above_the_cap_is_refused_before_reading(tmp_path, server):
    cap = SIZE_CAPS["t10k-images-idx3-ubyte"]
    message, _ = _timed_failure(tmp_path, [server(_AnnouncesATerabyte)], timeout=10)
    assert f"it announces 1,000,000,000,000 bytes, more than the {cap:,} allowed" in message


def test_the_caps_leave_room_for_a_repacked_copy():
    assert all(SIZE_CAPS[stem] == 2 * size for stem, size in KNOWN_SIZES.items())


@needs_mnist
def test_the_known_sizes_are_those_of_the_test_files():
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert (MNIST / f"{name}.gz").stat().st_size == KNOWN_SIZES[name]


def test_a_redirect_is_followed_without_reading_its_body(tmp_path, server):
    damaged = server(_Damaged)
    message, seconds = _timed_failure(tmp_path, [server(_redirect_to(damaged))], timeout=10)
    assert "the checksum does not match" in message
    assert seconds < 5


def test_a_redirect_to_anything_but_http_is_not_followed(tmp_path, server):
    message, _ = _timed_failure(tmp_path, [server(_redirect_to("ftp://127.0.0.1:9/"))],
                                timeout=10)
    assert "unknown url type: ftp" in message


@pytest.mark.parametrize("timeout", ["inf", "nan", "0", "-1", "1e9"])
def test_the_command_refuses_a_timeout_out_of_range(tmp_path, capsys, timeout):
    folder = tmp_path / "m"
    assert main(["download", str(folder), "--timeout", timeout]) == 1
    assert ("the timeout must be more than 0 and at most 86400 seconds (one day), not "
            in capsys.readouterr().err)
    assert not folder.exists()


@pytest.mark.parametrize("mirror", ["file:///etc/passwd", "ftp://x/", "not a url", "",
                                    "http://", "http://127.0.0.1:99999/", "https://x:0/"])
def test_only_http_and_https_mirrors_are_taken(tmp_path, mirror):
    with pytest.raises(CnncDataError, match="is not an http:// or https:// URL"):
        download_mnist(tmp_path / "m", ["test"], [mirror], **QUIET)
    assert not (tmp_path / "m").exists()


def test_the_command_refuses_a_file_mirror(tmp_path, capsys):
    assert main(["download", str(tmp_path / "m"), "--mirror", "file:///etc/passwd"]) == 1
    assert "the mirror 'file:///etc/passwd' is not an http:// or https:// URL" in (
        capsys.readouterr().err)
    assert not (tmp_path / "m").exists()


def test_no_mirrors_at_all(tmp_path):
    with pytest.raises(CnncDataError, match="no mirror to download from"):
        download_mnist(tmp_path, ["test"], [], **QUIET)


def test_a_folder_that_is_a_file_or_too_long_a_name(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(CnncDataError, match=r"cannot make the folder .*file"):
        download_mnist(tmp_path / "file", ["test"], ["http://127.0.0.1:9/"], **QUIET)
    with pytest.raises(CnncDataError, match=r"cannot make the folder .*: File name too long"):
        download_mnist(tmp_path / ("x" * 300), ["test"], ["http://127.0.0.1:9/"], **QUIET)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PATH_MAX of Linux (4096)")
def test_a_folder_whose_files_would_have_too_long_a_path(tmp_path):
    # A folder Linux can make, whose files' paths are longer than the 4095 characters it takes.
    folder = tmp_path
    while len(str(folder)) < 4080 - 101:
        folder = folder / ("d" * 100)
    folder = folder / ("d" * (4080 - len(str(folder)) - 1))
    with pytest.raises(CnncDataError, match=r"cannot use .*: File name too long"):
        download_mnist(folder, ["test"], ["http://127.0.0.1:9/"], **QUIET)
    assert folder.is_dir()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs a user whom a folder's permissions stop")
def test_an_unwritable_folder_is_refused_before_downloading(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    try:
        with pytest.raises(CnncDataError, match=r"cannot write .*: Permission denied"):
            download_mnist(folder, ["test"], ["http://127.0.0.1:9/"], **QUIET)
    finally:
        folder.chmod(0o700)


def test_a_gzip_bomb_is_not_inflated_past_the_genuine_size():
    """The contents' checksum inflates a download no further than the real file's size, so a
    200 MB bomb costs at most that much memory, and a recompressed genuine copy still passes."""
    import gzip
    import tracemalloc

    from cnnc.training.download import intact

    bomb = gzip.compress(b"\0" * 200_000_000, 9)  # about 0.2 MB
    tracemalloc.start()
    try:
        assert not intact("t10k-images-idx3-ubyte", bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000  # a quarter of the bomb; inflated whole, it takes 200 MB
    if (MNIST / "t10k-labels-idx1-ubyte.gz").is_file():
        raw = gzip.decompress((MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())
        assert intact("t10k-labels-idx1-ubyte", gzip.compress(raw, 1))
        assert not intact("t10k-labels-idx1-ubyte", gzip.compress(raw + b"\0", 1))
