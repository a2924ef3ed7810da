"""The MNIST downloader against HTTP servers on 127.0.0.1: one serving the real files, one
serving damaged bytes, one cutting the transfer short."""

from __future__ import annotations

import http.server
import threading
from functools import partial
from pathlib import Path

import pytest

from cnnc.cli import main
from cnnc.data import CnncDataError, load_mnist_split
from cnnc.download import download_mnist

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
pytestmark = pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist is not here")


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


def test_download_command(tmp_path, server, capsys):
    good = server(partial(_Files, directory=str(MNIST)))
    assert main(["download", str(tmp_path / "m"), "--split", "test", "--mirror", good]) == 0
    out = capsys.readouterr().out
    assert "t10k-labels-idx1-ubyte.gz: " in out and f"bytes from {good}" in out
    assert (tmp_path / "m" / "t10k-labels-idx1-ubyte.gz").exists()
    assert main(["download", str(tmp_path / "n"), "--split", "test", "--mirror",
                 "http://127.0.0.1:9/", "--timeout", "2"]) == 1
    assert "could not download" in capsys.readouterr().err
