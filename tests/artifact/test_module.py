"""Module files: save and load (in a fresh process without the front end), and refusal of
every kind of damaged or foreign file with a clear error, before any of its code runs."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest
from forge import rewrite, rewrite_text

import cnnc
from conftest import EXAMPLES, REPO

LOADER = """
import sys
import numpy as np, cnnc
from cnnc.backends import llvm

def refuse(*args, **kwargs):
    raise AssertionError("load must map the stored code, not compile")

llvm.compile_functions = llvm._compile_text = refuse
module = cnnc.load(sys.argv[1])
np.save(sys.argv[3], module(np.load(sys.argv[2])))
"""


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    module = cnnc.compile(EXAMPLES / "lenet.cnn")
    path = tmp_path_factory.mktemp("m") / "lenet.cnnm"
    module.save(path)
    return module, path


def test_loaded_in_a_fresh_process_without_compiling_gives_identical_output(lenet, tmp_path):
    module, path = lenet
    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run([sys.executable, "-c", LOADER, str(path), str(tmp_path / "x.npy"),
                             str(tmp_path / "y.npy")], capture_output=True, text=True,
                            cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(tmp_path / "y.npy"), module(x))


def test_saved_parameters_and_manifest_survive_a_round_trip(lenet, tmp_path):
    module, _ = lenet
    changed = {name: value + 1 for name, value in module.params.items()}
    module.set_params(changed)
    module.save(tmp_path / "changed.cnnm")
    loaded = cnnc.load(tmp_path / "changed.cnnm")
    for name, value in changed.items():
        np.testing.assert_array_equal(loaded.params[name], value)
    assert loaded.input_shape == (1, 28, 28) and loaded.output_shape == (10,)
    assert loaded.manifest["kernels"][:3] == ["c1_conv_relu_maxpool_fwd",
                                              "c3_conv_relu_maxpool_fwd", "f5_dense_relu_fwd"]


def _grow_buffer(manifest):
    manifest["storage"][-1]["shape"][-1] *= 100


def _other_cpu(manifest):
    manifest["target"]["features"].append("made-up-feature")


def _other_arch(manifest):
    manifest["target"]["triple"] = "aarch64-unknown-linux-gnu"


def _future_version(manifest):
    manifest["cnnc_version"] = "99.0.0"


def _no_storage(manifest):
    del manifest["storage"]


def _small_input(manifest):
    manifest["input"]["shape"] = [1, 1, 1]


def _kernel_as_entry(manifest):
    manifest["entry_points"]["forward"] = "c1_conv_relu_maxpool_fwd"


def _other_dtype(manifest):
    manifest["dtype"] = "f64"


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[: len(d) // 2], "the file is truncated"),
    (lambda d: d[:40], "the file is truncated"),
    (lambda d: b"", "not a cnnc module file"),
    (lambda d: b"PK\x03\x04" + d[4:], "not a cnnc module file"),
    (lambda d: d[:60] + bytes([d[60] ^ 1]) + d[61:], "the manifest was changed or damaged"),
    (lambda d: d[:-100] + bytes([d[-100] ^ 1]) + d[-99:], "was changed or damaged"),
    (lambda d: d[:8] + struct.pack("<I", 7) + d[12:], "module format 7"),
    (lambda d: rewrite(d, _grow_buffer), "the code hash does not match"),
    (lambda d: rewrite(d, _other_cpu), "needs CPU features this CPU lacks: made-up-feature"),
    (lambda d: rewrite(d, _other_arch), "it was compiled for aarch64-unknown-linux-gnu"),
    (lambda d: rewrite(d, _future_version), "made by cnnc 99.0.0, newer than this cnnc"),
    (lambda d: rewrite(d, _no_storage), "the manifest is malformed"),
    (lambda d: rewrite(d, _small_input), "the code hash does not match"),
    (lambda d: rewrite(d, _kernel_as_entry), "the code hash does not match"),
    (lambda d: rewrite(d, _other_dtype), "the code hash does not match"),
    (lambda d: rewrite_text(d, b"{not json"), "the manifest is malformed"),
    (lambda d: rewrite_text(d, b"null"), "the manifest is malformed"),
    (lambda d: rewrite_text(d, b"[" * 100000), "the manifest is malformed"),
], ids=["half", "header-only", "empty", "zip-magic", "manifest-bit", "section-bit",
        "format", "edited-shapes", "cpu-features", "architecture", "version", "malformed",
        "input-shape", "entry-point", "dtype", "not-json", "null", "deep-json"])
def test_damaged_or_foreign_files_are_refused(lenet, tmp_path, damage, message):
    _, path = lenet
    broken = tmp_path / "broken.cnnm"
    broken.write_bytes(damage(path.read_bytes()))
    with pytest.raises(cnnc.CnncModuleError, match=r"cannot load .*broken\.cnnm: ") as caught:
        cnnc.load(broken)
    assert message in str(caught.value)


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "no such file"),
    (lambda p: (p.mkdir(), p)[1], "it is a directory"),
])
def test_missing_paths(tmp_path, make, message):
    path = make(tmp_path / "m.cnnm")
    with pytest.raises(cnnc.CnncModuleError, match=message):
        cnnc.load(path)


def test_cli_compile_inspect_and_damaged_file(lenet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = [sys.executable, "-m", "cnnc"]
    made = subprocess.run([*run, "compile", str(EXAMPLES / "lenet.cnn")], capture_output=True,
                          text=True, check=False)
    assert made.returncode == 0
    assert made.stdout.startswith("wrote lenet.cnnm: network lenet5, 6 forward kernels")
    shown = subprocess.run([*run, "inspect", "lenet.cnnm"], capture_output=True, text=True,
                           check=False)
    assert shown.returncode == 0
    assert "    c1.weight: 6 x 1 x 5 x 5 f32" in shown.stdout
    assert "kernels  c1_conv_relu_maxpool_fwd, c3_conv_relu_maxpool_fwd," in shown.stdout
    (tmp_path / "bad.cnnm").write_bytes(b"CNNM")
    bad = subprocess.run([*run, "inspect", "bad.cnnm"], capture_output=True, text=True,
                         check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr == "error: cannot load bad.cnnm: not a cnnc module file (no CNNM header)\n"


@pytest.mark.parametrize("stage, expected", [
    ("llvm", "define void @c1_conv_relu_maxpool_fwd("),
    ("asm", "c3_conv_relu_maxpool_fwd:"),
    ("loops", "func f5_dense_relu_fwd(N, maxpool2: f32[N, 400]"),
    ("kernels", "c1_conv_relu_maxpool_fwd(image, c1.weight, c1.bias) -> c1, maxpool1, "
                "maxpool1.argmax"),
])
def test_emit_backend_stages_name_kernels_after_layers(capsys, monkeypatch, stage, expected):
    from cnnc.cli.main import main
    monkeypatch.chdir(REPO)
    assert main(["compile", "examples/lenet.cnn", "--emit", stage, "-O1"]) == 0
    assert expected in capsys.readouterr().out
