"""Graph networks in the language: `from=NAME`, statements that read several names, names
with or without the colon, and the errors and warnings of names."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import cnnc
from cnnc.diagnostics import CnncWarning
from conftest import check_text, errors_of, program, run_cli


def test_from_reads_an_earlier_layer_and_names_mean_the_activated_output():
    graph = check_text(program("2x6x6", "conv a: 3 3x3 pad=1 -> relu", "conv b: 3 3x3 pad=1",
                               "conv c: 3 1x1 from=a", "add s: b, c -> relu",
                               "flatten", "dense out: 2"))
    c_conv = graph.nodes_of("c")[0]
    assert c_conv.inputs[0] == "a"  # a after its relu
    add = next(n for n in graph.nodes if n.op == "add")
    assert add.inputs == ("b", "c")
    assert graph.producer("a").op == "relu"


def test_a_name_with_or_without_the_colon():
    with_colon = check_text(program("3x4x4", "batchnorm bn1: -> relu", "flatten f:"))
    without = check_text(program("3x4x4", "batchnorm bn1 -> relu", "flatten f"))
    assert [layer.name for layer in with_colon.layers] == \
        [layer.name for layer in without.layers] == ["input", "bn1", "f"]


def test_an_unknown_name_suggests_the_closest():
    assert errors_of(program("2x6x6", "conv stem: 3 3x3", "conv b: 3 1x1 from=stme")) == \
        [(4, 20, "conv b reads 'stme', but no layer above has that name; "
                 "did you mean 'stem'?")]


def test_a_later_name_is_an_error_with_a_note_where_it_is_defined():
    with pytest.raises(cnnc.CnncError) as caught:
        check_text(program("2x6x6", "conv a: 3 1x1 from=b", "conv b: 3 1x1"))
    diagnostic = caught.value.diagnostics[0]
    assert diagnostic.message == ("conv a reads 'b', which is defined later; a layer reads "
                                  "only the layers above it")
    assert (diagnostic.notes[0].span.line, diagnostic.notes[0].message) == \
        (4, "'b' is defined here")


def test_a_layer_cannot_read_itself():
    messages = [m for _, _, m in errors_of(program("2x6x6", "conv a: 3 1x1 from=a"))]
    assert messages == ["conv a reads its own output; a layer reads only the layers above it"]


def test_a_duplicate_name():
    messages = [m for _, _, m in errors_of(program("2x6x6", "conv a: 3 1x1", "conv a: 3 1x1"))]
    assert messages == ["duplicate name 'a'; names are unique within a network"]


def test_add_of_two_shapes_shows_both():
    text = "network t\ninput x: 2x6x6\nconv a: 3 3x3\nconv b: 4 1x1 from=x\nadd s: a, b\n"
    messages = [m for _, _, m in errors_of(text)]
    assert len(messages) == 1 and "conv a gives 3x4x4" in messages[0] \
        and "conv b gives 4x6x6" in messages[0]


def test_from_takes_a_name():
    messages = [m for _, _, m in errors_of(program("2x6x6", "conv a: 3 1x1 from=3"))]
    assert messages == ["conv a: from expects the name of a layer above, got 3"]


def test_a_layer_nothing_reads_is_a_warning_not_an_error(capsys):
    text = "network t\ninput x: 2x6x6\nconv a: 3 1x1\nconv b: 3 1x1 from=x\nflatten\n" \
        "dense out: 2\n"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_text(text)
    messages = [str(w.message) for w in caught if issubclass(w.category, CnncWarning)]
    assert len(messages) == 1
    assert "t.cnn:3:1: warning: the output of conv a is never read" in messages[0]


def test_the_cli_prints_the_warning_and_succeeds(tmp_path, capsys):
    path = tmp_path / "net.cnn"
    path.write_text("network t\ninput x: 2x6x6\nconv a: 3 1x1\nconv b: 3 1x1 from=x\n")
    code, _, err = run_cli(capsys, "check", str(path))
    assert code == 0
    assert "warning: the output of conv a is never read" in err


def test_a_residual_network_computes_what_numpy_does():
    text = ("network t\ninput x: 2x5x5\nconv a: 2 3x3 pad=1 bias=false -> relu\n"
            "conv b: 2 3x3 pad=1 bias=false\nadd s: b, a, x -> relu\nflatten\n"
            "dense out: 3 bias=false\nloss mse\n")
    module = cnnc.compile(text, dtype="f64")
    rng = np.random.default_rng(0)
    wa, wb = rng.standard_normal((2, 2, 3, 3)), rng.standard_normal((2, 2, 3, 3))
    wo = rng.standard_normal((3, 50))
    module.set_params({"a.weight": wa, "b.weight": wb, "out.weight": wo})
    x = rng.standard_normal((4, 2, 5, 5))

    def conv(v, w):  # 3x3, pad 1, by its definition
        padded = np.pad(v, ((0, 0), (0, 0), (1, 1), (1, 1)))
        out = np.zeros((v.shape[0], w.shape[0], 5, 5))
        for i in range(5):
            for j in range(5):
                out[:, :, i, j] = np.einsum("ncij,fcij->nf", padded[:, :, i:i + 3, j:j + 3], w)
        return out

    a = np.maximum(conv(x, wa), 0)
    s = np.maximum(conv(a, wb) + a + x, 0)
    np.testing.assert_allclose(module.forward(x), s.reshape(4, -1) @ wo.T, rtol=1e-12)
