"""`cnnc compile --emit lib`: the C library's forward against the Python module's (bit for
bit on this CPU), from C on several threads, through ctypes for every error status, with
embedded and given weights, and the weights file read back by an independent parser."""

from __future__ import annotations

import ctypes
import re
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from clib import GRAPH, build, harness, host_cc, need, perturbed, run_harness

import cnnc
from conftest import EXAMPLES, run_cli


@pytest.fixture(name="host_cc")
def host_cc_fixture() -> str:
    return host_cc()


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    out = tmp_path_factory.mktemp("lenet")
    return build(out, EXAMPLES / "lenet.cnn"), out


@pytest.fixture(scope="module")
def graph_net(tmp_path_factory):
    """The graph network's library with perturbed weights, and the module with the same."""
    out = tmp_path_factory.mktemp("graph")
    module = cnnc.compile(GRAPH)
    weights = perturbed(module, 3)
    module.set_params(weights)
    return build(out, GRAPH, weights=weights), out, module


def test_lenet_from_c_is_bit_identical_to_module_forward(lenet, host_cc):
    library, out = lenet
    program = harness(library, out, [host_cc])
    x = np.random.default_rng(0).uniform(0, 1, (13, 1, 28, 28)).astype(np.float32)
    y = run_harness(program, str(out / "lenet5.weights.bin"), x, out, threads=3)
    expected = cnnc.compile(EXAMPLES / "lenet.cnn").forward(x)
    assert np.array_equal(y.reshape(expected.shape), expected)


def test_graph_network_with_given_weights_matches_bit_for_bit(graph_net, host_cc):
    library, out, module = graph_net
    assert library.layout.of_kind("packed")  # the folds run at init, in the pack entry
    # and only what forward reads: the backward kernels' repacked weights stay out
    assert not [s.name for s in library.layout.slots if "_bwd" in s.name]
    program = harness(library, out, [host_cc])
    x = np.random.default_rng(1).normal(0, 1, (5, 3, 11, 11)).astype(np.float32)
    y = run_harness(program, str(out / "tiny_graph.weights.bin"), x, out, threads=2)
    assert np.array_equal(y.reshape(5, 7), module.forward(x))
    for batch in (1, 2):  # batch 1 runs another path in the Python module (one piece)
        y = run_harness(program, str(out / "tiny_graph.weights.bin"), x[:batch], out)
        assert np.array_equal(y.reshape(batch, 7), module.forward(x[:batch]))


def test_weights_file_holds_the_arrays_in_the_headers_order(graph_net):
    library, out, module = graph_net
    data = (out / "tiny_graph.weights.bin").read_bytes()
    magic, version, count, layout_hash, size, crc = struct.unpack_from("<8sIIQQI", data)
    assert (magic, version) == (b"CNNCWTS\0", 1) and size == len(data) - 64
    assert crc == zlib.crc32(data[64:]) and layout_hash == library.layout.weights_hash
    expected = {**module.params, **module.buffers}
    header = (out / "tiny_graph.h").read_text()
    offset, seen = 64, []
    for weight in library.layout.of_kind("weight"):
        offset = (offset - 64 + 63) // 64 * 64 + 64
        value = expected[weight.name]
        stored = np.frombuffer(data, np.float32, value.size, offset).reshape(value.shape)
        assert np.array_equal(stored, value), weight.name
        offset += value.nbytes
        seen.append(weight.name)
        assert f"  {weight.name}: " in header
    assert offset == len(data) and count == len(seen)
    assert set(seen) == {k for k in expected if not k.endswith("num_batches_tracked")}


def test_embedded_weights_need_no_file(tmp_path, host_cc):
    library = build(tmp_path, EXAMPLES / "lenet.cnn", embed=True)
    assert not (tmp_path / "lenet5.weights.bin").exists()
    assert "#define LENET5_HAS_EMBEDDED_WEIGHTS 1" in (tmp_path / "lenet5.h").read_text()
    program = harness(library, tmp_path, [host_cc])
    x = np.random.default_rng(2).uniform(0, 1, (4, 1, 28, 28)).astype(np.float32)
    y = run_harness(program, "-", x, tmp_path)
    assert np.array_equal(y.reshape(4, 10), cnnc.compile(EXAMPLES / "lenet.cnn").forward(x))


def test_two_networks_link_into_one_program(lenet, graph_net, tmp_path, host_cc):
    """Every symbol is the network's: the two libraries' kernels and tables do not clash."""
    (_, out_a), (_, out_b, _) = lenet, graph_net
    main = tmp_path / "both.c"
    main.write_text('#include "lenet5.h"\n#include "tiny_graph.h"\n#include <stdio.h>\n'
                    "int main(void) { lenet5_model *a; tiny_graph_model *b;\n"
                    f'  int s = lenet5_init(&a, "{out_a}/lenet5.weights.bin");\n'
                    f'  int t = tiny_graph_init(&b, "{out_b}/tiny_graph.weights.bin");\n'
                    '  printf("%d %d %zu %zu\\n", s, t, lenet5_output_size(), '
                    "tiny_graph_output_size());\n"
                    "  lenet5_free(a); tiny_graph_free(b); return 0; }\n")
    program = tmp_path / "both"
    subprocess.run([host_cc, "-std=c99", "-Wall", "-Werror", f"-I{out_a}", f"-I{out_b}",
                    str(main), str(out_a / "liblenet5.a"), str(out_b / "libtiny_graph.a"),
                    "-lm", "-o", str(program)], check=True)
    assert subprocess.run([str(program)], capture_output=True, text=True).stdout == "0 0 10 7\n"


def test_shared_library_exports_only_the_networks_api(lenet):
    _, out = lenet
    need("nm")
    listed = subprocess.run(["nm", "-D", "--defined-only", str(out / "liblenet5.so")],
                            capture_output=True, text=True, check=True).stdout.split("\n")
    names = {line.split()[-1] for line in listed if line.strip()}
    assert names == {"lenet5_init", "lenet5_init_from_memory", "lenet5_free",
                     "lenet5_strerror", "lenet5_workspace_size", "lenet5_forward",
                     "lenet5_scalar_size", "lenet5_input_size", "lenet5_output_size",
                     "lenet5_params"}


def test_header_compiles_strictly_as_c_and_cpp(lenet, tmp_path, host_cc):
    _, out = lenet
    source = tmp_path / "use.c"
    source.write_text('#include "lenet5.h"\nint main(void) { return lenet5_params[0].rank '
                      "== 4 && LENET5_INPUT_SIZE == 784 && LENET5_OUTPUT_SIZE == 10 ? 0 : 1; }"
                      "\n")
    for compiler, flags in ((host_cc, ["-std=c99", "-pedantic"]),
                            (host_cc, ["-std=c89", "-pedantic"]),
                            ("g++", ["-x", "c++", "-std=c++98", "-pedantic"])):
        need(compiler)
        subprocess.run([compiler, *flags, "-Wall", "-Wextra", "-Werror", f"-I{out}",
                        "-c", str(source), "-o", str(tmp_path / "use.o")], check=True)


class Api:
    """The shared library through ctypes, for the argument checks C callers get."""

    def __init__(self, path: Path, net: str) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.net = net
        for name, result, args in (
                ("init", ctypes.c_int, [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]),
                ("init_from_memory", ctypes.c_int,
                 [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_size_t]),
                ("forward", ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                           ctypes.c_void_p, ctypes.c_void_p]),
                ("workspace_size", ctypes.c_size_t, [ctypes.c_int]),
                ("strerror", ctypes.c_char_p, [ctypes.c_int]),
                ("free", None, [ctypes.c_void_p])):
            function = getattr(self.lib, f"{net}_{name}")
            function.restype, function.argtypes = result, args
            setattr(self, name, function)

    def load(self, data: bytes) -> tuple[int, ctypes.c_void_p]:
        model = ctypes.c_void_p(1)  # init sets it, to NULL on failure
        buffer = ctypes.create_string_buffer(data, len(data))
        return self.init_from_memory(ctypes.byref(model), buffer, len(data)), model


STATUS = {"OK": 0, "NULL": 1, "BATCH": 2, "OPEN": 3, "SHORT": 4, "MISMATCH": 5, "CORRUPT": 6,
          "FORMAT": 7, "MEMORY": 8, "NO_WEIGHTS": 9, "ALIGN": 10}


def test_statuses_are_the_headers_and_have_words(lenet):
    _, out = lenet
    header = (out / "lenet5.h").read_text()
    api = Api(out / "liblenet5.so", "lenet5")
    for name, code in STATUS.items():
        shown = f"LENET5_{name}" if name == "OK" else f"LENET5_ERR_{name}"
        assert re.search(rf"^    {shown} = {code},? /\*", header, re.MULTILINE), shown
        assert api.strerror(code) and api.strerror(code) != b"unknown status"
    assert api.strerror(99) == b"unknown status"


def test_bad_weights_get_their_status_and_no_model(lenet, graph_net, tmp_path):
    _, out = lenet
    api = Api(out / "liblenet5.so", "lenet5")
    good = (out / "lenet5.weights.bin").read_bytes()
    damaged = bytearray(good)
    damaged[5000] ^= 1
    other = (graph_net[1] / "tiny_graph.weights.bin").read_bytes()
    cases = {"SHORT": good[:-1], "MISMATCH": good + b"\0", "CORRUPT": bytes(damaged),
             "FORMAT": b"PK\3\4" + good[4:], "": b"", "OTHER": other, "HEADER": good[:40]}
    expected = {"": "SHORT", "OTHER": "MISMATCH", "HEADER": "SHORT"}
    for case, data in cases.items():
        status, model = api.load(data)
        assert status == STATUS[expected.get(case, case)], case
        assert model.value is None
    status, model = api.load(good)
    assert status == 0 and model.value
    api.free(model)
    model = ctypes.c_void_p(1)
    assert api.init(ctypes.byref(model), str(tmp_path / "none.bin").encode()) == STATUS["OPEN"]
    assert api.init(ctypes.byref(model), None) == STATUS["NO_WEIGHTS"]
    assert model.value is None
    assert api.init(None, b"x") == STATUS["NULL"]
    assert api.init_from_memory(ctypes.byref(model), None, 10) == STATUS["NULL"]
    api.free(None)  # nothing


def test_forward_checks_its_arguments(lenet):
    _, out = lenet
    api = Api(out / "liblenet5.so", "lenet5")
    status, model = api.load((out / "lenet5.weights.bin").read_bytes())
    assert status == 0
    x = np.zeros((2, 784), np.float32)
    y = np.zeros((2, 10), np.float32)
    work = np.zeros(api.workspace_size(2), np.uint8)
    pointers = (model, x.ctypes.data, 2, y.ctypes.data, work.ctypes.data)
    assert api.forward(*pointers) == 0 and np.allclose(y.sum(axis=1), 1, atol=1e-5)
    for index, null in ((0, None), (1, None), (3, None), (4, None)):
        assert api.forward(*pointers[:index], null, *pointers[index + 1:]) == STATUS["NULL"]
    for batch in (0, -3):
        assert api.forward(model, x.ctypes.data, batch, y.ctypes.data, work.ctypes.data) \
            == STATUS["BATCH"]
        assert api.workspace_size(batch) == 0
    assert api.workspace_size(2**31 - 1) > api.workspace_size(1)  # 64 bits: addressable
    assert api.forward(model, x.ctypes.data + 1, 1, y.ctypes.data, work.ctypes.data) \
        == STATUS["ALIGN"]
    api.free(model)


def test_workspace_grows_with_the_batch_as_the_activations_do(lenet):
    library, out = lenet
    api = Api(out / "liblenet5.so", "lenet5")
    work = library.layout.of_kind("work")
    per_sample = sum(s.elements * s.itemsize for s in work if s.per_batch)
    growth = api.workspace_size(101) - api.workspace_size(1)
    assert 100 * per_sample <= growth <= 100 * (per_sample + 64 * len(work))


def test_cli_writes_the_files_and_refuses_bad_options(capsys, tmp_path, monkeypatch):
    lenet = str(EXAMPLES / "lenet.cnn")
    code, out, err = run_cli(capsys, "compile", lenet, "--emit", "lib", "-o", str(tmp_path))
    assert code == 0, err
    assert {p.name for p in tmp_path.iterdir()} == {
        "lenet5.h", "liblenet5.a", "liblenet5.so", "lenet5.weights.bin"}
    assert "lenet5.weights.bin (247,080 bytes)" in out  # 64 + the 61,706 floats aligned
    (tmp_path / "file").write_text("")
    refusals = [
        (["--emit", "lib", "-o", str(tmp_path / "file")], "must be a folder"),
        (["--emit", "lib", "--triple", "sparc"], "no known target 'sparc'"),
        (["--emit", "lib", "--triple", "aarch64-linux-gnu", "--cpu", "native"],
         "--cpu native is this"),
        (["--emit", "lib", "--cpu", "pentium"], "no known CPU 'pentium'"),
        (["--embed-weights"], "--embed-weights is for --emit lib"),
        (["--target", "cuda", "--cpu", "x86-64-v3"], "--triple and --cpu choose a CPU")]
    for extra, message in refusals:
        code, out, err = run_cli(capsys, "compile", lenet, *extra)
        assert code in (1, 2) and message in err and "Traceback" not in err, (extra, err)
    code, _, err = run_cli(capsys, "compile", lenet, "--emit", "lib", "--target", "cuda")
    assert code == 1 and "has no --target cuda" in err
    monkeypatch.setenv("CC", "/nowhere/cc")
    code, _, err = run_cli(capsys, "compile", lenet, "--emit", "lib", "-o", str(tmp_path))
    assert code == 1 and "needs a C compiler" in err and "/nowhere/cc" in err


@pytest.mark.parametrize("cpu", ["x86-64-v2", "x86-64-v3"])
def test_portable_x86_builds_run_here_within_rounding(cpu, tmp_path, host_cc):
    from cnnc.backends.target import host_cpu, named_target

    if not host_cpu().triple.startswith("x86_64") or \
            (cpu == "x86-64-v3" and "+avx2" not in host_cpu().features):
        pytest.skip(f"this machine cannot run {cpu} code")
    library = build(tmp_path, EXAMPLES / "lenet.cnn", named_target(None, cpu))
    program = harness(library, tmp_path, [host_cc])
    x = np.random.default_rng(4).uniform(0, 1, (3, 1, 28, 28)).astype(np.float32)
    y = run_harness(program, str(tmp_path / "lenet5.weights.bin"), x, tmp_path)
    expected = cnnc.compile(EXAMPLES / "lenet.cnn").forward(x)
    np.testing.assert_allclose(y.reshape(3, 10), expected, rtol=1e-5, atol=1e-6)


def test_an_onnx_model_becomes_a_library_with_its_weights(capsys, tmp_path, host_cc):
    pytest.importorskip("onnx")
    model = tmp_path / "digits.onnx"
    trained = cnnc.compile(EXAMPLES / "lenet.cnn")
    trained.set_params(perturbed(trained, 7))
    trained.save_weights(tmp_path / "w.npz")
    code, _, err = run_cli(capsys, "export", str(EXAMPLES / "lenet.cnn"), "--weights",
                           str(tmp_path / "w.npz"), "-o", str(model))
    assert code == 0, err
    out = tmp_path / "lib"
    code, _, err = run_cli(capsys, "compile", str(model), "--emit", "lib", "-o", str(out))
    assert code == 0, err
    header = (out / "digits.h").read_text()
    assert "#define DIGITS_INPUT_SHAPE {1, 28, 28}" in header
    x = np.random.default_rng(8).uniform(0, 1, (6, 1, 28, 28)).astype(np.float32)
    # the harness needs the layout's name only: that of the same model built in-process
    program = harness(build(tmp_path / "again", model), out, [host_cc])
    y = run_harness(program, str(out / "digits.weights.bin"), x, out)
    assert np.array_equal(y.reshape(6, 10), cnnc.compile(model).forward(x))
    assert np.array_equal(y.reshape(6, 10), trained.forward(x))


def test_schedules_take_the_targets_vectors_not_the_hosts(capsys):
    lenet = str(EXAMPLES / "lenet.cnn")
    for extra, machine in ((["--triple", "aarch64-linux-gnu", "--cpu", "generic"],
                            "128-bit vectors, 32 vector registers"),
                           (["--cpu", "x86-64-v3"], "256-bit vectors, 16 vector registers"),
                           (["--cpu", "x86-64-v4"], "512-bit vectors, 32 vector registers"),
                           (["--triple", "wasm32", "--cpu", "generic"],
                            "128-bit vectors, 16 vector registers")):
        code, out, err = run_cli(capsys, "compile", lenet, "--explain-schedule", *extra)
        assert code == 0, err
        assert out.startswith(f"machine: {machine}"), (extra, out[:80])


def test_a_float64_network_takes_doubles(tmp_path, host_cc):
    from cnnc.backends.target import host_cpu
    from cnnc.driver.pipeline import Options
    from cnnc.frontend.source import to_source
    from cnnc.library.build import build_library

    library = build_library(to_source(GRAPH), tmp_path, Options(host_cpu(), dtype="f64"))
    header = (tmp_path / "tiny_graph.h").read_text()
    assert "typedef double tiny_graph_scalar;" in header and "const double *x" in header
    x = np.random.default_rng(9).normal(0, 1, (3, 3, 11, 11))
    y = run_harness(harness(library, tmp_path, [host_cc]),
                    str(tmp_path / "tiny_graph.weights.bin"), x, tmp_path, dtype=np.float64)
    assert np.array_equal(y.reshape(3, 7), cnnc.compile(GRAPH, dtype="f64").forward(x))
