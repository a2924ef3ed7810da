import pytest

from cnnc.diagnostics import CnncSyntaxError, Source
from cnnc.frontend import syntax as ast
from cnnc.frontend.parse import MAX_SYNTAX_ERRORS, parse
from conftest import EXAMPLES


def parse_text(text: str) -> ast.Program:
    return parse(Source(text, "p.cnn"))


def syntax_errors(text: str) -> list[tuple[int, int, str]]:
    with pytest.raises(CnncSyntaxError) as caught:
        parse_text(text)
    return [(d.span.line, d.span.col, d.message) for d in caught.value.diagnostics]


def test_lenet_statements_with_spans_and_values():
    program = parse(Source((EXAMPLES / "lenet.cnn").read_text(), "lenet.cnn"))
    kinds = [type(s).__name__ for s in program.statements]
    assert kinds == ["NetworkStmt", "InputStmt", "ConvStmt", "PoolStmt", "ConvStmt",
                     "PoolStmt", "DenseStmt", "DenseStmt", "DenseStmt", "LossStmt", "TrainStmt"]
    conv = program.statements[2]
    assert conv.name.text == "c1" and conv.filters.value == 6 and conv.kernel.values == (5, 5)
    assert conv.activation.text == "relu"
    assert (conv.span.line, conv.span.col, conv.span.end_col) == (6, 1, 29)
    assert conv.options[0].key.text == "pad" and conv.options[0].value.value == 2
    train = program.statements[-1]
    assert {o.key.text: o.value.value for o in train.options} == {
        "lr": 0.05, "momentum": 0.9, "batch": 64, "epochs": 5, "seed": 0}


def test_ast_nodes_are_frozen():
    program = parse_text("network n\n")
    with pytest.raises(AttributeError):
        program.statements[0].name = None


@pytest.mark.parametrize("text", ["1e-4", "0.05", ".5", "3.", "2E+3"])
def test_float_spellings(text):
    program = parse_text(f"train sgd lr={text}\n")
    assert program.statements[0].options[0].value.value == float(text)


def test_rectangular_kernels_strides_pads_and_input_forms():
    program = parse_text("input x: 3x9x7 dtype=f64\nconv 4 3x1 stride=2x1 pad=1x0\n"
                         "input: 784\ninput 1x2x3\n")
    first, conv, flat, bare = program.statements
    assert first.name.text == "x" and first.shape.values == (3, 9, 7)
    assert conv.kernel.values == (3, 1)
    assert [o.value.values for o in conv.options] == [(2, 1), (1, 0)]
    assert flat.name is None and flat.shape.values == (784,)
    assert bare.shape.values == (1, 2, 3)


def test_comments_blank_lines_crlf_tabs_and_missing_final_newline():
    text = "# head\r\n\r\nnetwork n   # trailing\r\n\t\n\tinput:\t1x4x4\r\n  relu"
    kinds = [type(s).__name__ for s in parse_text(text).statements]
    assert kinds == ["NetworkStmt", "InputStmt", "ActivationStmt"]


@pytest.mark.parametrize("line, col, message", [
    ("conv c1: 5x5 -> relu", 10, 'expected a filter count like 6, got "5x5"'),
    ("conv c1 6 3x3", 9, "expected ':' after the name, got \"6\""),
    ("conv 6 3x3 stride 2", 19, "expected '=' after the option name, got \"2\""),
    ("conv 6", 7, "expected a kernel size like 5x5, got the end of the line"),
    ("dense f1: relu", 11, 'expected a unit count like 120, got "relu"'),
    ("maxpool 2", 9, 'expected a layer name or a window size like 2x2, got "2"'),
    ("dense 10 ->", 12, "expected an activation (relu, sigmoid, tanh, relu6, leaky_relu, "
                        "silu, gelu, hardswish, hardsigmoid, clip, softmax, log_softmax or "
                        "none), got the end of the line"),
    ("loss", 5, "expected a loss (cross_entropy or mse), got the end of the line"),
    ("train sgd lr=", 14, "expected a value, got the end of the line"),
    ("network", 8, "expected a network name, got the end of the line"),
    ("maxpol 2x2", 1, "unknown statement 'maxpol'; did you mean 'maxpool'?"),
    ("conv 6 3x3 @", 12, "unexpected character '@'; names use letters, digits and _"),
    ("= 3", 1, "expected a statement (network, input, conv, maxpool, avgpool, dense, "
               "flatten, add, concat, mul, batchnorm, dropout, globalavgpool, globalmaxpool, "
               "upsample, activation, pad, block, end, use, loss, train or an activation), "
               "got \"=\""),
])
def test_syntax_error_messages_in_words(line, col, message):
    assert syntax_errors(f"network n\n{line}\n") == [(2, col, message)]


def test_every_broken_line_is_reported_once():
    text = "network n\nconv c1: 5x5\ninput: 1x4x4\ndense 10 ->\nloss\n"
    assert [e[0] for e in syntax_errors(text)] == [2, 4, 5]


def test_error_count_is_bounded():
    text = "network n\n" + "conv\n" * (MAX_SYNTAX_ERRORS + 20)
    assert len(syntax_errors(text)) == MAX_SYNTAX_ERRORS


def test_huge_numbers_do_not_overflow_the_parser():
    program = parse_text("conv " + "9" * 5000 + " 3x3\n")
    assert program.statements[0].filters.value > 2**31


def test_syntax_error_render_has_file_line_col_and_caret():
    with pytest.raises(CnncSyntaxError) as caught:
        parse(Source("network n\nconv c1: 5x5 -> relu\n", "net.cnn"))
    assert str(caught.value).splitlines() == [
        'net.cnn:2:10: error: expected a filter count like 6, got "5x5"',
        "    conv c1: 5x5 -> relu",
        "             ^~~",
    ]
