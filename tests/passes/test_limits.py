"""Programs too large to compile are refused with their sizes said, before anything is
allocated; names have a length limit."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cnnc
from cnnc.cli.main import main
from cnnc.frontend.irgen import MAX_NAME
from cnnc.passes.limits import MAX_PARAMETER_BYTES, MAX_SAMPLE_BYTES
from conftest import errors_of, program


def test_a_huge_dense_layer_is_refused_with_its_bytes():
    errors = errors_of(program("4", "dense d: 2147483647"))
    params = (4 + 1) * 2147483647 * 4  # weights and biases, float32
    assert errors[0][:2] == (3, 1)
    assert errors[0][2].startswith(f"the parameters of network t need "
                                   f"{params / 2**30:.1f} GiB, more than the 2.0 GiB")
    assert "activations of one sample" in errors[1][2]


def test_a_huge_input_before_a_dense_layer_is_refused():
    errors = errors_of(program("1x100000x100000", "dense d: 10"))
    messages = [e[2] for e in errors]
    assert any(m.startswith("the parameters of network t need 372.5 GiB") for m in messages)
    assert any(m.startswith("the activations of one sample of network t need 37.3 GiB")
               for m in messages)


def test_just_under_the_limits_is_accepted():
    # 2 GiB of float32 parameters is 536,870,912 of them: stay just below with dense layers
    units = MAX_PARAMETER_BYTES // 4 // (1024 + 1) - 1
    graph = cnnc.check(program("1024", f"dense d: {units}"))
    assert sum(p.size for p in graph.params) * 4 <= MAX_PARAMETER_BYTES
    assert MAX_SAMPLE_BYTES == 2**30


def test_the_cli_refuses_absurd_sizes_with_exit_1_and_no_memory_error(tmp_path):
    path = tmp_path / "big.cnn"
    path.write_text(program("4", "dense d: 2147483647"))
    for command in ("check", "compile", "summary"):
        result = subprocess.run([sys.executable, "-m", "cnnc", command, str(path)],
                                capture_output=True, text=True, cwd=tmp_path, check=False)
        assert result.returncode == 1, (command, result.stderr)
        assert "MemoryError" not in result.stderr and "Traceback" not in result.stderr
        assert "more than the 2.0 GiB cnnc accepts" in result.stderr
    assert not (tmp_path / "big.cnnm").exists()


@pytest.mark.parametrize("where", ["layer", "network", "input"])
def test_names_longer_than_the_limit_are_refused(capsys, tmp_path, where):
    long = "a" * 70_000
    text = {"layer": program("4", f"dense {long}: 3"),
            "network": f"network {long}\ninput: 4\ndense d: 3\n",
            "input": f"network n\ninput {long}: 4\ndense d: 3\n"}[where]
    path = tmp_path / "long.cnn"
    path.write_text(text)
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"is 70,000 characters long; a name has at most {MAX_NAME}" in err
    assert max(len(line) for line in err.splitlines()) < 200  # the quoted line is cut


def test_a_name_at_the_limit_is_accepted():
    name = "n" * MAX_NAME
    graph = cnnc.check(program("4", f"dense {name}: 3"))
    assert graph.tensor(f"{name}.weight").shape == (3, 4)
