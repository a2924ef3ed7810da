"""The wheel ships the grammar as package data, and an installed copy finds it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import EXAMPLES, REPO

IGNORED = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                 ".hypothesis", ".pytest_cache", ".ruff_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(REPO, source, ignore=IGNORED)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(work / "dist"), str(source)],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = (work / "dist").glob("cnnc-*.whl")
    return built


def test_wheel_contains_the_grammar_and_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        grammar = archive.read("cnnc/grammar/cnn.lark").decode()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert grammar == (REPO / "grammar" / "cnn.lark").read_text()
    assert "cnnc = cnnc.cli:main" in scripts


def test_installed_wheel_parses_with_its_own_grammar(wheel, tmp_path):
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
         str(wheel)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    probe = ("import cnnc, cnnc.parse, sys; g = cnnc.check(sys.argv[1]); "
             "print(cnnc.__file__); print(cnnc.parse.grammar_text() is not None); "
             "print(g.tensor('c1.weight').shape)")
    run = subprocess.run([sys.executable, "-c", probe, str(EXAMPLES / "lenet.cnn")],
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    location, found, shape = run.stdout.splitlines()
    assert Path(location).is_relative_to(target)
    assert found == "True" and shape == "(6, 1, 5, 5)"
