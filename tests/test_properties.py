"""Property-based tests: no input makes the front end raise anything but a CnncError, and
every valid program drawn from the grammar's forms checks with the directly computed shapes."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cnnc.diagnostics import CnncError, Source
from cnnc.driver.pipeline import front_end
from cnnc.graph.ir import verify

ACTIVATIONS = ["relu", "sigmoid", "tanh", "none"]
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def front_end_or_cnnc_error(text: str) -> None:
    try:
        front_end(Source(text, "h.cnn"))
    except CnncError as error:
        assert error.diagnostics, "a CnncError must say what is wrong"
        assert str(error)  # renders without raising


@FAST
@given(st.text(max_size=200))
def test_random_text_raises_only_cnnc_errors(text):
    front_end_or_cnnc_error(text)


ALPHABET = "networkinputconvmaxpoolavgdenseflattenlosstrainrelusoftmax0123456789x:=->#. \n\t_-"


@FAST
@given(st.text(alphabet=ALPHABET, max_size=300))
def test_language_shaped_noise_raises_only_cnnc_errors(text):
    front_end_or_cnnc_error(text)


# -- valid programs, generated with their expected shapes ---------------------------------------

def window_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return math.floor((size + 2 * pad - kernel) / stride) + 1


@st.composite
def windowed_layer(draw, shape: tuple[int, int, int], kind: str):
    channels, height, width = shape
    kh = draw(st.integers(1, min(height, 5)))
    kw = draw(st.integers(1, min(width, 5)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if kind == "conv":
        same = kh % 2 == 1 and kw % 2 == 1 and stride == (1, 1) and draw(st.booleans())
        pad = ((kh - 1) // 2, (kw - 1) // 2) if same else (draw(st.integers(0, 2)),
                                                           draw(st.integers(0, 2)))
        pad_text = "same" if same else _pair(pad)
        filters = draw(st.integers(1, 8))
        text = f"conv {_label(draw, 'conv')}{filters} {kh}x{kw} stride={_pair(stride)} " \
               f"pad={pad_text}{_suffix(draw)}"
        channels = filters
    else:
        pad = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
        text = f"{kind} {_label(draw, kind)}{kh}x{kw} stride={_pair(stride)} pad={_pair(pad)}"
    out = (channels, window_size(height, kh, stride[0], pad[0]),
           window_size(width, kw, stride[1], pad[1]))
    return text, out


def _pair(pair: tuple[int, int]) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


_names = iter(range(10**9))


def _label(draw, kind: str) -> str:
    """Sometimes a name; `nK` never collides with the automatic `conv1`, `maxpool2`, ..."""
    return f"n{next(_names)}: " if draw(st.booleans()) else ""


def _suffix(draw) -> str:
    activation = draw(st.sampled_from([*ACTIVATIONS, None]))
    return "" if activation is None else f" -> {activation}"


@st.composite
def valid_programs(draw):
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 20)), draw(st.integers(1, 20)))
    lines = ["network generated", f"input image: {shape[0]}x{shape[1]}x{shape[2]}"]
    expected = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["conv", "maxpool", "avgpool"]))
        text, shape = draw(windowed_layer(shape, kind))
        lines.append(text)
        expected.append(shape)
    features = shape[0] * shape[1] * shape[2]
    if draw(st.booleans()):
        lines.append("flatten")
        expected.append((features,))
    for _ in range(draw(st.integers(1, 3))):
        units = draw(st.integers(1, 16))
        lines.append(f"dense {units} bias={draw(st.sampled_from(['true', 'false']))}"
                     f"{_suffix(draw)}")
        expected.append((units,))
    if draw(st.booleans()):
        lines[-1] = lines[-1].split(" -> ")[0] + " -> softmax"
        lines.append("loss cross_entropy")
        rate, batch = draw(st.floats(1e-4, 1.0)), draw(st.integers(1, 512))
        lines.append(f"train sgd lr={rate:.6g} batch={batch}")
    lines = [_decorate(draw, line) for line in lines]
    return "\n".join(lines) + "\n", expected


def _decorate(draw, line: str) -> str:
    """Free whitespace and comments around a line, as the language allows."""
    spaced = line.replace(" ", " " * draw(st.integers(1, 3)))
    comment = draw(st.sampled_from(["", "  # note", "\t# x -> y"]))
    blank = draw(st.sampled_from(["", "\n", "\n# comment line\n"]))
    return blank + spaced + comment


@FAST
@given(valid_programs())
def test_valid_programs_check_with_directly_computed_shapes(case):
    text, expected = case
    graph = front_end(Source(text, "gen.cnn"))
    verify(graph)
    got = [tuple(graph.tensor(layer.output).shape[1:]) for layer in graph.layers[1:]]
    assert got == expected


def mutate(tokens: list[str], data) -> list[str]:
    position = data.draw(st.integers(0, len(tokens) - 1))
    action = data.draw(st.sampled_from(["delete", "duplicate", "swap"]))
    result = list(tokens)
    if action == "delete":
        del result[position]
    elif action == "duplicate":
        result.insert(position, result[position])
    else:
        other = data.draw(st.integers(0, len(tokens) - 1))
        result[position], result[other] = result[other], result[position]
    return result


@FAST
@given(valid_programs(), st.data())
def test_mutated_valid_programs_raise_only_cnnc_errors(case, data):
    text, _ = case
    # tokens are words and line breaks, so a mutation can also join or split lines
    tokens = text.replace("\n", " \n ").split(" ")
    tokens = [t for t in tokens if t]
    assume(len(tokens) > 1)
    for _ in range(data.draw(st.integers(1, 3))):
        tokens = mutate(tokens, data)
    front_end_or_cnnc_error(" ".join(tokens))
