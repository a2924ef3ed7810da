"""Blocks: `block NAME(params)` ... `end` and `use PREFIX: NAME(args)`, expanded before the
graph is built (cnnc/frontend/blocks.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gradcheck import numeric_gradient, relative_error

import cnnc
from cnnc.diagnostics import CnncError, Source
from cnnc.frontend import blocks
from cnnc.frontend import syntax as ast
from cnnc.frontend.parse import parse
from conftest import check_text

HEAD = "network t\ninput: 1x4x4\n"  # lines 1 and 2; the lines a test gives start at 3

BASIC = """\
block basic(planes, stride=1):
    conv conv1: $planes 3x3 stride=$stride pad=1 bias=false -> relu
    conv conv2: $planes 3x3 pad=1 bias=false
    add out: conv2, in -> relu
end
"""


def expand(text: str) -> tuple[list[ast.Statement], list]:
    program, diagnostics = blocks.expand(parse(Source(text, "t.cnn")))
    return list(program.statements), diagnostics


def expanded(text: str) -> list[ast.Statement]:
    statements, diagnostics = expand(text)
    assert diagnostics == []
    return statements


def block_errors(text: str) -> list[tuple[int, int, str]]:
    """(line, col, message) of every error expansion finds."""
    _, diagnostics = expand(text)
    assert diagnostics, "expected errors"
    return [(d.span.line, d.span.col, d.message) for d in diagnostics]


def outline(statements: list[ast.Statement]) -> list[tuple]:
    """Each line as (kind, name, what it reads or its numbers), scopes as ("{"/"}", prefix)."""
    rows: list[tuple] = []
    for stmt in statements:
        if isinstance(stmt, ast.ScopeStmt):
            rows.append(("{" if stmt.opening else "}", stmt.prefix.text, stmt.block.text))
        elif isinstance(stmt, ast.ConvStmt):
            options = {o.key.text: o.value.text for o in stmt.options}
            rows.append(("conv", stmt.name.text, stmt.filters.text, options))
        elif isinstance(stmt, ast.MergeStmt):
            rows.append(("add", stmt.name.text, tuple(w.text for w in stmt.inputs)))
    return rows


def params_left(node: object) -> list[ast.Param]:
    """Every ast.Param anywhere inside `node`."""
    if isinstance(node, ast.Param):
        return [node]
    if isinstance(node, tuple):
        return [p for item in node for p in params_left(item)]
    if dataclasses.is_dataclass(node):
        return [p for f in dataclasses.fields(node) for p in params_left(getattr(node, f.name))]
    return []


# -- expansion ----------------------------------------------------------------------------------

def test_a_use_becomes_the_blocks_lines_with_names_prefixed_between_scope_markers():
    text = HEAD + "conv stem: 4 3x3 pad=1\n" + BASIC + "use layer1.0: basic(4)\n"
    statements = expanded(text)
    assert outline(statements[3:]) == [
        ("{", "layer1.0", "basic"),
        ("conv", "layer1.0.conv1", "4", {"stride": "1", "pad": "1", "bias": "false"}),
        ("conv", "layer1.0.conv2", "4", {"pad": "1", "bias": "false"}),
        ("add", "layer1.0.out", ("layer1.0.conv2", "layer1.0.in")),
        ("}", "layer1.0", "basic"),
    ]
    opening, conv1 = statements[3], statements[4]
    use_line = 9
    assert (opening.span.line, opening.span.col) == (use_line, 1)
    assert (opening.block.span.line, opening.block.span.col) == (4, 7)  # at the definition
    # the line keeps its place in the block, and so do its name and the values put in
    assert (conv1.span.line, conv1.name.span.line, conv1.name.span.col) == (5, 5, 10)
    assert (conv1.filters.span.line, conv1.filters.span.col) == (5, 17)  # where $planes is
    assert isinstance(conv1.filters, ast.Number) and conv1.filters.value == 4
    stride = next(o.value for o in conv1.options if o.key.text == "stride")
    assert (stride.value, stride.span.line, stride.span.col) == (1, 5, 36)  # the default


def test_positional_keyword_and_default_arguments():
    text = HEAD + BASIC + "use a: basic(4)\nuse b: basic(planes=4)\nuse c: basic(4, stride=2)\n" \
        "use d: basic(stride=2, planes=8)\n"
    convs = [row for row in outline(expanded(text)) if row[0] == "conv" and "stride" in row[3]]
    assert [(name, filters, options["stride"]) for _, name, filters, options in convs] == [
        ("a.conv1", "4", "1"), ("b.conv1", "4", "1"), ("c.conv1", "4", "2"),
        ("d.conv1", "8", "2")]


def test_names_of_the_block_are_prefixed_and_names_outside_it_are_not():
    text = HEAD + """\
conv stem: 2 3x3 pad=1
block down(planes, stride=2)
    conv conv1: $planes 3x3 stride=$stride pad=1
    conv downsample.0: $planes 1x1 stride=$stride from=in
    conv side: $planes 1x1 stride=$stride from=stem
    add out: conv1, downsample.0, side
end
use layer2.0: down(8)
"""
    assert outline(expanded(text))[2:-1] == [
        ("conv", "layer2.0.conv1", "8", {"stride": "2", "pad": "1"}),
        ("conv", "layer2.0.downsample.0", "8", {"stride": "2", "from": "layer2.0.in"}),
        ("conv", "layer2.0.side", "8", {"stride": "2", "from": "stem"}),
        ("add", "layer2.0.out", ("layer2.0.conv1", "layer2.0.downsample.0", "layer2.0.side")),
    ]


def test_a_use_without_a_name_is_named_by_its_block_and_count():
    text = HEAD + BASIC + "use basic(2)\nuse named: basic(2)\nuse basic(2)\n"
    scopes = [row[1] for row in outline(expanded(text)) if row[0] == "{"]
    assert scopes == ["basic1", "named", "basic3"]  # counted like unnamed layers, named or not


def test_nested_uses_compose_prefixes_and_pass_parameters_on():
    text = HEAD + """\
block inner(width):
    conv c: $width 3x3 pad=1
end
block outer(q, src=in)
    use i: inner($q)
    use j: inner(width=4)
    conv k: 4 1x1 from=$src
    add s: i, j.c, k, in
end
conv stem: 4 1x1
use top: outer(4)
use other: outer(4, src=stem)
"""
    rows = outline(expanded(text))
    assert rows[1:12] == [
        ("{", "top", "outer"),
        ("{", "top.i", "inner"), ("conv", "top.i.c", "4", {"pad": "1"}), ("}", "top.i", "inner"),
        ("{", "top.j", "inner"), ("conv", "top.j.c", "4", {"pad": "1"}), ("}", "top.j", "inner"),
        ("conv", "top.k", "4", {"from": "top.in"}),
        ("add", "top.s", ("top.i", "top.j.c", "top.k", "top.in")),
        ("}", "top", "outer"),
        ("{", "other", "outer"),
    ]
    assert ("conv", "other.k", "4", {"from": "stem"}) in rows  # a name given from outside


def test_nothing_of_the_blocks_is_left_after_expansion():
    text = HEAD + BASIC + "block twice(p):\n    use a: basic($p)\n    use b: basic($p, 2)\nend\n" \
        "use x: twice(4)\nuse basic(4)\n"
    statements = expanded(text)
    leftovers = (ast.BlockStmt, ast.EndStmt, ast.UseStmt)
    assert not [s for s in statements if isinstance(s, leftovers)]
    assert params_left(tuple(statements)) == []
    assert sum(isinstance(s, ast.ScopeStmt) for s in statements) == 8


def test_a_program_without_blocks_is_unchanged():
    program = parse(Source(HEAD + "conv c: 2 3x3\ndense d: 3\n", "t.cnn"))
    assert blocks.expand(program) == (program, [])


# -- errors -------------------------------------------------------------------------------------

USE = HEAD + BASIC  # lines 3 to 7; a use on line 8


@pytest.mark.parametrize("text, expected", [
    (USE + "use a: bsic(2)\n", [(8, 8, "unknown block 'bsic'; did you mean 'basic'?")]),
    (HEAD + "use a: basic(2)\n", [
        (3, 8, "unknown block 'basic'; no block is defined (with 'block NAME(...)' ... 'end' "
               "above its use)")]),
    (USE + "use a: other(2)\n", [(8, 8, "unknown block 'other'; the blocks defined are basic")]),
    (USE + "use a: basic(2, 1, 3)\n", [(8, 20, "too many arguments: block basic takes 2 "
                                              "(planes, stride)")]),
    (USE + "use a: basic(2, strid=2)\n",
     [(8, 17, "block basic has no parameter 'strid'; did you mean 'stride'?")]),
    (USE + "use a: basic(2, planes=3)\n", [(8, 17, "block basic: the parameter planes is "
                                                  "given twice")]),
    (USE + "use a: basic(stride=2, 3)\n", [
        (8, 24, "block basic: an argument without a name after one with a name; the ones "
                "without come first"),
        (8, 1, "block basic needs a value for planes, which has no default")]),
    (USE + "use a: basic()\n", [(8, 1, "block basic needs a value for planes, which has no "
                                       "default")]),
    (USE + "use a: basic(3x3)\n", [(8, 14, "$planes is the filter count of conv a.conv1 in "
                                          "block basic, a whole number like 16; got 3x3")]),
    (HEAD + "block b(planes):\n    conv c: $plane 3x3\nend\n",
     [(4, 13, "block b has no parameter $plane; did you mean $planes?")]),
    (HEAD + "block b(width):\n    conv c: 2 3x3 stride=$stride\nend\n",
     [(4, 26, "block b has no parameter $stride; its parameters are $width")]),
    (HEAD + "block b():\n    conv c: $n 3x3\nend\n",
     [(4, 13, "block b has no parameter $n; it has no parameters")]),
    (HEAD + "conv c: $n 3x3 stride=$s\n",
     [(3, 9, "$n is a block's parameter, but this line is in no block"),
      (3, 23, "$s is a block's parameter, but this line is in no block")]),
    (USE + "use a: basic($n)\n", [(8, 14, "$n is a block's parameter, but this line is in no "
                                         "block")]),
    (USE + "block basic(p):\n    conv c: $p 3x3\nend\n",
     [(8, 7, "a second block named basic; block names are unique")]),
    (HEAD + "conv c: 2 3x3\nend\n",
     [(4, 1, "'end' without a block; it closes the lines of a 'block NAME(...)' line above")]),
    (HEAD + "block b(p):\n    conv c: $p 3x3\n",
     [(3, 1, "block b has no 'end'; a line 'end' closes its lines")]),
    (HEAD + "block a(p):\n    conv c: $p 3x3\nblock b(p):\n    conv d: $p 3x3\nend\n",
     [(5, 1, "block b starts inside block a; blocks are not nested: end block a first (a "
             "block may use another one with 'use')")]),
    ("network t\nblock b(p):\n    input x: 1x4x4\n    conv c: $p 3x3\n    loss mse\nend\n",
     [(3, 5, "the input line cannot be inside block b; a block holds layers and uses of "
             "blocks"),
      (5, 5, "the loss line cannot be inside block b; a block holds layers and uses of "
             "blocks")]),
    (HEAD + "block b(p):\nend\n", [(3, 1, "block b has no lines")]),
    ("block b(p):\n    conv c: $p 3x3\nend\nnetwork t\ninput: 1x4x4\n",
     [(4, 1, "the network line must be the first line of the program")]),
    (HEAD + "use a: basic(2)\n" + BASIC,
     [(3, 8, "block basic is used before its definition; a block is defined above its "
             "first use")]),
    (HEAD + "block b(in):\n    conv c: 2 3x3\nend\n",
     [(3, 9, "block b: the parameter name 'in' is reserved; in a block, in means what the "
             "line above the use made")]),
    (HEAD + "block b(p, p):\n    conv c: $p 3x3\nend\n",
     [(3, 12, "block b: the parameter p is declared twice")]),
    (HEAD + "block b(p, q=$p):\n    conv c: $p 3x3\nend\n",
     [(3, 14, "block b: the default of q must be a value like 1 or 3x3, not $p")]),
    (HEAD + "block b(p):\n    conv in: $p 3x3\nend\n",
     [(4, 10, "in block b, the name 'in' means what the line above the use made; give this "
              "line another name")]),
    (HEAD + "block b(p):\n    relu\n    conv c: $p 3x3\nend\n",
     [(4, 5, "relu on a line of its own applies to the layer above, but it is the first line "
             "of block b; a block starts with a layer or a use")]),
])
def test_block_errors(text, expected):
    assert block_errors(text) == expected


def test_errors_point_at_the_definition_and_the_declaration():
    _, [unknown_keyword] = expand(USE + "use a: basic(2, strid=2)\n")
    assert [(n.message, n.span.line) for n in unknown_keyword.notes] == [
        ("block basic is defined here", 3)]
    _, [missing] = expand(USE + "use a: basic()\n")
    assert [(n.message, n.span.line, n.span.col) for n in missing.notes] == [
        ("planes is declared here", 3, 13)]
    _, [twice] = expand(USE + "block basic(p):\n    conv c: $p 3x3\nend\n")
    assert [(n.message, n.span.line) for n in twice.notes] == [
        ("block basic is first defined here", 3)]
    _, [early] = expand(HEAD + "use a: basic(2)\n" + BASIC)
    assert [(n.message, n.span.line) for n in early.notes] == [("block basic is defined here", 4)]


def test_a_wrong_value_is_reported_at_the_argument_with_the_line_that_uses_it():
    text = USE + "block wrap(n):\n    use inner: basic($n)\nend\nuse w: wrap(relu)\n"
    [error] = block_errors(text)
    assert error == (11, 13, "$planes is the filter count of conv w.inner.conv1 in block "
                             "basic, a whole number like 16; got relu")
    _, [diagnostic] = expand(text)
    assert [(n.message, n.span.line) for n in diagnostic.notes] == [
        ("$planes is used here", 4), ("in block basic, used as w.inner here", 9),
        ("in block wrap, used as w here", 11)]


def test_the_errors_of_a_blocks_lines_are_said_once_however_often_it_is_used():
    text = HEAD + "block b(p):\n    conv c: $pp 3x3\n    use inner: nope()\nend\n" \
        "use x: b(1)\nuse y: b(2)\nuse b(3)\n"
    assert block_errors(text) == [
        (4, 13, "block b has no parameter $pp; did you mean $p?"),
        (5, 16, "unknown block 'nope'; the blocks defined are b")]
    statements, _ = expand(text)  # going on as if $p was meant
    assert [s.filters.value for s in statements if isinstance(s, ast.ConvStmt)] == [1, 2, 3]


def test_recursion_is_an_error_not_a_hang():
    direct = HEAD + "block b(p):\n    conv c: $p 3x3\n    use again: b($p)\nend\nuse x: b(2)\n"
    assert block_errors(direct) == [
        (5, 16, "block b uses itself; a block cannot contain its own lines")]
    indirect = HEAD + "block a(p):\n    use n: b($p)\nend\nblock b(p):\n    conv c: $p 3x3\n" \
        "    use m: a($p)\nend\nuse x: a(2)\nuse y: b(2)\n"
    assert block_errors(indirect) == [
        (4, 12, "block b is used before its definition; a block is defined above its first "
                "use"),
        (4, 12, "block a uses itself through block b; a block cannot contain its own lines")]


def test_expansion_goes_on_after_errors():
    text = USE + "use a: basic(2, strid=2)\nuse b: nope(2)\nuse c: basic()\nuse d: basic(2)\n"
    statements, diagnostics = expand(text)
    assert [d.span.line for d in diagnostics] == [8, 9, 10]
    scopes = [row[1] for row in outline(statements) if row[0] == "{"]
    assert scopes == ["a", "b", "c", "d"]  # the unknown block as an empty scope
    assert params_left(tuple(statements)) == []


def front_end_errors(text: str) -> list:
    with pytest.raises(CnncError) as caught:
        check_text(text)
    return list(caught.value.diagnostics)


def test_irgen_errors_inside_a_block_point_at_its_line_and_name_the_use():
    text = HEAD + "block b(p):\n    conv c: $p 3x3 pad=$p\nend\nconv first: 2 1x1\nuse x: b(-1)\n"
    errors = front_end_errors(text)
    assert [(d.span.line, d.span.col, d.message) for d in errors] == [
        (4, 13, "conv x.c: the filter count must be at least 1, got -1"),
        (4, 24, "conv x.c: pad expects a padding of at least 0, got -1")]
    assert [(n.message, n.span.line) for n in errors[0].notes] == [
        ("in block b, used as x here", 7)]


def test_shape_errors_inside_a_block_name_the_use():
    text = HEAD + "block b(k):\n    conv c: 2 $k\nend\nuse x: b(3x3)\nuse y: b(3x3)\n"
    [error] = front_end_errors(text)
    assert (error.span.line, error.span.col) == (4, 5)
    assert "conv y.c" in error.message
    assert [(n.message, n.span.line) for n in error.notes if n.span] == [
        ("in the block used here", 7)]
    rendered = str(CnncError([error], Source(text, "t.cnn")))
    assert "t.cnn:7:1: note: in the block used here\n    use y: b(3x3)" in rendered


# -- whole networks -----------------------------------------------------------------------------

RESNET = """\
network res
input image: 2x8x8
conv stem: 4 3x3 pad=1 -> relu
block basic(planes, stride=1):
    conv conv1: $planes 3x3 stride=$stride pad=1 bias=false -> relu
    conv conv2: $planes 3x3 pad=1 bias=false
    add out: conv2, in -> relu
end
block down(planes, stride=2)
    conv conv1: $planes 3x3 stride=$stride pad=1 bias=false -> relu
    conv conv2: $planes 3x3 pad=1 bias=false
    conv downsample.0: $planes 1x1 stride=$stride bias=false from=in
    add out: conv2, downsample.0 -> relu
end
use layer1.0: basic(4)
use layer1.1: basic(planes=4)
use layer2.0: down(6)
use layer2.1: basic(6, 1)
dense fc: 3
"""


def _flat_block(prefix: str, planes: int, stride: int, down: bool) -> str:
    lines = [f"conv {prefix}.conv1: {planes} 3x3 stride={stride} pad=1 bias=false -> relu",
             f"conv {prefix}.conv2: {planes} 3x3 pad=1 bias=false"]
    if down:
        lines.append(f"conv {prefix}.downsample.0: {planes} 1x1 stride={stride} bias=false "
                     f"from={prefix}.in")
    skip = f"{prefix}.downsample.0" if down else f"{prefix}.in"
    lines.append(f"add {prefix}.out: {prefix}.conv2, {skip} -> relu")
    return "\n".join(lines)


def flat_resnet() -> str:
    """RESNET written out by hand; `PREFIX.in` is spelt out as the layer above the block."""
    text = "network res\ninput image: 2x8x8\nconv stem: 4 3x3 pad=1 -> relu\n"
    above = "stem"
    for prefix, planes, stride, down in [("layer1.0", 4, 1, False), ("layer1.1", 4, 1, False),
                                         ("layer2.0", 6, 2, True), ("layer2.1", 6, 1, False)]:
        text += _flat_block(prefix, planes, stride, down).replace(f"{prefix}.in", above) + "\n"
        above = f"{prefix}.out"
    return text + "dense fc: 3\n"


def test_a_resnet_builds_the_same_graph_as_its_flat_program():
    with_blocks, flat = check_text(RESNET), check_text(flat_resnet())

    def ops(graph):
        return [(n.op, n.inputs, n.outputs, n.layer, n.attrs) for n in graph.nodes]

    assert ops(with_blocks) == ops(flat)
    assert [(t.name, t.role, t.shape) for t in with_blocks.tensors] == \
        [(t.name, t.role, t.shape) for t in flat.tensors]
    assert [layer.name for layer in with_blocks.layers if layer.uses] == [
        name for prefix in ("layer1.0", "layer1.1", "layer2.0", "layer2.1")
        for name in (f"{prefix}.conv1", f"{prefix}.conv2", f"{prefix}.downsample.0",
                     f"{prefix}.out") if prefix == "layer2.0" or "downsample" not in name]


def conv2d(x: np.ndarray, w: np.ndarray, stride: int = 1, pad: int = 0) -> np.ndarray:
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(2, 3))
    return np.einsum("nchwij,ocij->nohw", windows[:, :, ::stride, ::stride], w)


def numpy_resnet(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """RESNET in numpy, as an independent oracle."""
    h = np.maximum(conv2d(x, p["stem.weight"], pad=1) + p["stem.bias"][:, None, None], 0)
    for prefix, stride, down in [("layer1.0", 1, False), ("layer1.1", 1, False),
                                 ("layer2.0", 2, True), ("layer2.1", 1, False)]:
        y = np.maximum(conv2d(h, p[f"{prefix}.conv1.weight"], stride, 1), 0)
        y = conv2d(y, p[f"{prefix}.conv2.weight"], pad=1)
        skip = conv2d(h, p[f"{prefix}.downsample.0.weight"], stride) if down else h
        h = np.maximum(y + skip, 0)
    return h.reshape(len(h), -1) @ p["fc.weight"].T + p["fc.bias"]


def test_batch_norm_in_a_block_gets_dotted_parameter_names():
    text = HEAD + "block b(n):\n    conv c: $n 3x3 pad=1 bias=false\n    batchnorm bn -> relu\n" \
        "    batchnorm\nend\nuse layer1.0: b(2)\n"
    names = {t.name for t in check_text(text).tensors if t.name.endswith("running_mean")}
    assert names == {"layer1.0.bn.running_mean", "batchnorm2.running_mean"}  # unnamed: no prefix


def test_a_resnet_with_blocks_compiles_and_runs_like_its_flat_program():
    with_blocks = cnnc.compile(RESNET + "loss mse\n", dtype="f64", opt_level=0,
                               schedule=False)
    flat = cnnc.compile(flat_resnet(), dtype="f64", opt_level=0, schedule=False)
    names = sorted(with_blocks.params)
    assert names == sorted(flat.params)
    assert {"layer1.0.conv1.weight", "layer2.0.downsample.0.weight", "fc.bias"} <= set(names)
    rng = np.random.default_rng(3)
    values = {k: rng.standard_normal(v.shape) * 0.5 for k, v in with_blocks.params.items()}
    with_blocks.set_params(values)
    flat.set_params(values)
    x = rng.standard_normal((3, 2, 8, 8))
    out = with_blocks.forward(x)
    np.testing.assert_array_equal(out, flat.forward(x))
    np.testing.assert_allclose(out, numpy_resnet(values, x), rtol=1e-10, atol=1e-10)


def test_the_gradients_of_a_resnet_with_blocks_match_finite_differences():
    module = cnnc.compile(RESNET + "loss mse\n", dtype="f64", opt_level=0, schedule=False)
    rng = np.random.default_rng(4)
    values = {k: rng.standard_normal(v.shape) * 0.5 for k, v in module.params.items()}
    module.set_params(values)
    x, y = rng.standard_normal((2, 2, 8, 8)), rng.standard_normal((2, 3))
    gradients = module.gradients(x, y)
    assert sorted(gradients) == sorted(values)
    for name, array in values.items():
        indices, numeric = numeric_gradient(
            lambda: float(np.mean((numpy_resnet(values, x) - y) ** 2)), array, limit=4)
        assert relative_error(gradients[name].reshape(-1)[indices], numeric) < 1e-6, name


def test_layer_names_with_dots_run_on_the_cuda_target():
    """In Numba's CUDA simulator unless NUMBA_ENABLE_CUDASIM=0 (conftest)."""
    pytest.importorskip("numba.cuda", reason="numba is not installed")
    text = "network t\ninput: 2x3x3\nblock res(n):\n    conv c: $n 1x1 -> relu\n" \
        "    add out: c, in\nend\nuse r.0: res(2)\nuse r.1: res(2)\n"
    module = cnnc.compile(text, target="cuda", dtype="f64")
    rng = np.random.default_rng(5)
    values = {k: rng.standard_normal(v.shape) for k, v in module.params.items()}
    module.set_params(values)
    x = rng.standard_normal((2, 2, 3, 3))
    h = x
    for prefix in ("r.0", "r.1"):
        weight, bias = values[f"{prefix}.c.weight"][:, :, 0, 0], values[f"{prefix}.c.bias"]
        h = np.maximum(np.einsum("oi,nihw->nohw", weight, h) + bias[:, None, None], 0) + h
    np.testing.assert_allclose(module.forward(x), h, rtol=1e-12, atol=1e-12)


def test_a_block_may_end_the_network_with_softmax_for_cross_entropy():
    text = HEAD + "block head(n):\n    dense out: $n -> softmax\nend\nuse h: head(3)\n" \
        "loss cross_entropy\n"
    assert check_text(text).nodes[-1].op == "cross_entropy"  # not of logits: no 2nd softmax
