"""Shared helpers: the repository's paths and one-line ways to check a program."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The CUDA tests run in Numba's simulator unless told otherwise (NUMBA_ENABLE_CUDASIM=0 on
# a machine with a GPU, as benchmarks/gpu_check.sh does); numba reads this at its import.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from cnnc.diagnostics import CnncError, Source
from cnnc.driver.pipeline import front_end
from cnnc.graph.ir import Graph

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true",
                     help="rewrite tests/golden/ from the current output instead of comparing")


@pytest.fixture(scope="session", autouse=True)
def compile_cache() -> Iterator[Path]:
    """The session's own compile cache (CNNC_CACHE_DIR, inherited by the cnnc processes the
    tests start): nothing is read from or written to the user's ~/.cache/cnnc, and it is
    removed at the end. A program compiled again with the same options comes from it."""
    with tempfile.TemporaryDirectory(prefix="cnnc-cache-") as folder, \
            pytest.MonkeyPatch.context() as patch:
        patch.setenv("CNNC_CACHE_DIR", folder)
        yield Path(folder)


@pytest.fixture(autouse=True)
def patched_compile_cache(request: pytest.FixtureRequest) -> None:
    """A test that patches (monkeypatch) gets an empty compile cache of its own: a patched
    compiler must neither take the modules the other tests built nor leave them its own."""
    if "monkeypatch" in request.fixturenames:
        folder = request.getfixturevalue("tmp_path_factory").mktemp("cnnc-cache")
        request.getfixturevalue("monkeypatch").setenv("CNNC_CACHE_DIR", str(folder))


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """`cnnc ARGV` in this process: (exit code, stdout, stderr); argparse's usage errors
    give their exit code too."""
    from cnnc.cli.main import main

    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def check_text(text: str, name: str = "t.cnn") -> Graph:
    return front_end(Source(text, name))


def errors_of(text: str, name: str = "t.cnn") -> list[tuple[int, int, str]]:
    """(line, col, message) of every error the program has; fails if it has none."""
    with pytest.raises(CnncError) as caught:
        check_text(text, name)
    return [(d.span.line, d.span.col, d.message) if d.span else (0, 0, d.message)
            for d in caught.value.diagnostics]


def sample_shape(graph: Graph, tensor: str) -> tuple[int, ...]:
    """A tensor's shape without the batch dimension."""
    return tuple(graph.tensor(tensor).shape[1:])


HEADER = "network t\ninput: {shape}\n"


def program(shape: str, *lines: str) -> str:
    """A program with the given input shape and layer lines."""
    return HEADER.format(shape=shape) + "\n".join(lines) + "\n"
