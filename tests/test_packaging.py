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
    assert "cnnc = cnnc.cli.main:main" in scripts
    # every package of the tree, and the C library's source template (--emit lib)
    packages = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "cnnc").rglob("*.py")}
    assert all(f"{package}/__init__.py" in names for package in packages), packages
    with zipfile.ZipFile(wheel) as archive:
        template = archive.read("cnnc/library/model.c.in").decode()
    assert template == (REPO / "cnnc" / "library" / "model.c.in").read_text()


def test_installed_wheel_parses_with_its_own_grammar(wheel, tmp_path):
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
         str(wheel)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    probe = ("import cnnc, cnnc.frontend.parse, sys; g = cnnc.check(sys.argv[1]); "
             "print(cnnc.__file__); print(cnnc.frontend.parse.grammar_text() is not None); "
             "print(g.tensor('c1.weight').shape)")
    run = subprocess.run([sys.executable, "-c", probe, str(EXAMPLES / "lenet.cnn")],
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    location, found, shape = run.stdout.splitlines()
    assert Path(location).is_relative_to(target)
    assert found == "True" and shape == "(6, 1, 5, 5)"


def test_wheel_metadata_license_typing_and_one_version(wheel):
    import cnnc

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith("METADATA"))).decode()
        license_text = archive.read(next(n for n in names if n.endswith("licenses/LICENSE")))
    assert "cnnc/py.typed" in names
    assert license_text.decode().startswith("MIT License")
    assert "License-Expression: MIT" in metadata
    assert f"Version: {cnnc.__version__}" in metadata  # pyproject reads cnnc/version.py
    assert "Classifier: Typing :: Typed" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    base = [line for line in requires if "extra ==" not in line]
    assert not any("numba" in line for line in base)  # numba only in the cuda and test extras
    assert any("numba" in line and 'extra == "cuda"' in line for line in requires)
    assert any("matplotlib" in line and 'extra == "plot"' in line for line in requires)


def test_version_names_llvm_too():
    import llvmlite

    import cnnc

    result = subprocess.run([sys.executable, "-m", "cnnc", "--version"], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0
    assert result.stdout.startswith(f"cnnc {cnnc.__version__} (llvmlite "
                                    f"{llvmlite.__version__}, LLVM ")


def test_the_cpu_path_never_imports_numba(tmp_path):
    probe = ("import sys, numpy as np, cnnc\n"
             "m = cnnc.compile(sys.argv[1], opt_level=0)\n"
             "m.save(sys.argv[2]); m = cnnc.load(sys.argv[2])\n"
             "x = np.zeros((2, 1, 28, 28), np.float32)\n"
             "m(x); m.train_step(x, np.zeros(2, int))\n"
             "print(sorted(k for k in sys.modules if k.split('.')[0] == 'numba'))\n")
    result = subprocess.run([sys.executable, "-c", probe, str(EXAMPLES / "lenet.cnn"),
                             str(tmp_path / "l.cnnm")], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
