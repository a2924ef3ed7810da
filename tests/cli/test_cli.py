"""The cnnc command: exit codes, messages without tracebacks, summary, --emit, bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cnnc.cli.main import main
from conftest import EXAMPLES, REPO, run_cli

ERROR_EXAMPLES = sorted((EXAMPLES / "errors").glob("*.cnn"))


@pytest.mark.parametrize("path", ERROR_EXAMPLES, ids=lambda p: p.stem)
def test_each_error_example_gives_its_expected_message(capsys, monkeypatch, path):
    monkeypatch.chdir(REPO)
    relative = path.relative_to(REPO).as_posix()
    code, out, err = run_cli(capsys, "check", relative)
    assert code == 1 and out == ""
    assert err == path.with_suffix(".expected").read_text(encoding="utf-8")


def test_there_is_an_error_example_for_every_error_kind():
    kinds = {p.stem for p in ERROR_EXAMPLES}
    assert {"kernel_too_large", "size_below_one", "softmax_not_last",
            "cross_entropy_without_softmax", "mse_shape_mismatch", "groups_filters",
            "groups_channels", "zero_count", "negative_count", "duplicate_name",
            "missing_input", "missing_network", "layer_after_loss", "unknown_option",
            "unknown_activation", "train_option_type", "many_errors"} <= kinds


@pytest.mark.parametrize("name", ["lenet", "mlp", "vgg_small"])
def test_check_accepts_every_example(capsys, name):
    code, out, err = run_cli(capsys, "check", str(EXAMPLES / f"{name}.cnn"))
    assert code == 0 and err == ""
    assert f"network {name if name != 'lenet' else 'lenet5'}" in out


def test_summary_table_counts_parameters_and_flops(capsys):
    code, out, _ = run_cli(capsys, "summary", str(EXAMPLES / "lenet.cnn"))
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:11]}
    # c1: 6 filters of 1x5x5 plus 6 biases; 2 FLOPs per multiply-add over 28x28 outputs;
    # 4 bytes a float32 parameter; one sample's output of 6x28x28 floats.
    assert rows["c1"] == ["c1", "conv+relu", "6x28x28", "156", f"{2 * 6 * 25 * 28 * 28:,}",
                          f"{156 * 4:,}", f"{6 * 28 * 28 * 4:,}"]
    assert rows["f5"] == ["f5", "dense+relu", "120", f"{400 * 120 + 120:,}",
                          f"{2 * 400 * 120:,}", f"{(400 * 120 + 120) * 4:,}", f"{120 * 4:,}"]
    # max pooling also writes the int32 position of each maximum
    assert rows["maxpool1"][-1] == f"{6 * 14 * 14 * 4 * 2:,}"
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split()[1] == "61,706" and total.split()[3] == f"{61_706 * 4:,}"
    assert "parameters: 61,706 in all, 61,706 trainable (241.0 KiB)" in out


def test_summary_json_agrees_with_the_parameter_shapes(capsys):
    code, out, _ = run_cli(capsys, "summary", "--json", str(EXAMPLES / "vgg_small.cnn"))
    assert code == 0
    data = json.loads(out)
    products = [1 for _ in data["parameters"]]
    for i, param in enumerate(data["parameters"]):
        for size in param["shape"]:
            products[i] *= size
    assert data["total_params"] == sum(products) == sum(r["params"] for r in data["layers"])
    assert data["output"]["shape"] == [10] and data["input"]["shape"] == [3, 32, 32]
    c2 = next(r for r in data["layers"] if r["name"] == "c2")
    assert c2["flops"] == 2 * 32 * 32 * 9 * 32 * 32 and c2["output_shape"] == [32, 32, 32]


def test_emit_ir_to_a_file_and_dtype_override(capsys, tmp_path):
    target = tmp_path / "lenet.ir"
    code, out, _ = run_cli(capsys, "compile", str(EXAMPLES / "lenet.cnn"), "--emit", "ir",
                       "--dtype", "f64", "-o", str(target))
    assert code == 0 and out == ""
    text = target.read_text()
    assert text.startswith("graph lenet5 dtype=f64\n") and "c1.weight    6 x 1 x 5 x 5 f64" in text


def bad_file(tmp_path, kind: str):
    path = tmp_path / "net.cnn"
    if kind == "missing":
        return tmp_path / "absent.cnn"
    if kind == "directory":
        return tmp_path
    if kind == "fifo":
        os.mkfifo(path)
        return path
    content = {"binary": b"\x7fELF\x00\x01\x02", "empty": b"", "blank": b"  \n\n",
               "bom_only": b"\xef\xbb\xbf\n",
               "latin1": b"network caf\xe9\n"}[kind]
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("kind, reason", [
    ("missing", "no such file"),
    ("directory", "it is a directory, not a .cnn file"),
    ("binary", "it is a binary file, not a .cnn program"),
    ("empty", "the file is empty"),
    ("blank", "the file is empty"),
    ("bom_only", "the file is empty"),
    ("fifo", "it is not a regular file"),
    ("latin1", "it is not valid UTF-8 (line 1, byte offset 11)"),
])
@pytest.mark.parametrize("command", ["check", "summary", "compile", "inspect"])
def test_unreadable_files_get_one_line_and_exit_1(capsys, tmp_path, kind, reason, command):
    path = bad_file(tmp_path, kind)
    argv = [command, str(path)] + (["--emit", "ir"] if command == "compile" else [])
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and out == ""
    if command == "inspect":  # a module file: any unreadable one is refused in one line
        assert err.startswith(f"error: cannot load {path}: ") and err.count("\n") == 1
    else:
        assert err == f"error: cannot read {path}: {reason}\n"


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["check"], ["compile", "x.cnn", "--emit",
                                                                   "nonsense"]])
def test_usage_errors_exit_2(capsys, argv):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "usage:" in err


def test_compile_writes_a_module_named_after_the_source(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "compile", str(EXAMPLES / "mlp.cnn"), "-O1")
    assert code == 0
    assert out.startswith("wrote mlp.cnnm: network mlp, 4 forward kernels and 13 for training")
    assert (tmp_path / "mlp.cnnm").read_bytes().startswith(b"CNNM")
    code, _, err = run_cli(capsys, "compile", str(EXAMPLES / "mlp.cnn"), "-o", str(tmp_path))
    assert code == 1 and err.startswith(f"error: cannot write {tmp_path}:")


def test_console_script_prints_no_traceback(tmp_path):
    broken = tmp_path / "b.cnn"
    broken.write_text("network n\ninput: 1x4x4\nconv c: 2 9x9\n")
    result = subprocess.run([sys.executable, "-m", "cnnc", "check", str(broken)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{broken}:3:1: error: conv c needs an input of at least 9x9")


def test_device_files_and_full_output_are_user_errors(capsys, monkeypatch):
    code, _, err = run_cli(capsys, "check", "/dev/zero")
    assert code == 1 and err == "error: cannot read /dev/zero: it is not a regular file\n"

    class FullStdout:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

    monkeypatch.setattr("sys.stdout", FullStdout())
    assert main(["summary", str(EXAMPLES / "lenet.cnn")]) == 1
    assert "cannot write to standard output: No space left on device" in capsys.readouterr().err
