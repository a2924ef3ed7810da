"""Hypothesis strategies that draw valid programs, shared by the front-end and determinism tests."""

from __future__ import annotations

import math

from hypothesis import strategies as st

ACTIVATIONS = ["relu", "sigmoid", "tanh", "none"]


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


@st.composite
def conv_programs(draw) -> str:
    """A conv layer (any stride, pad, channels), often followed by a max pool that fuses into
    its kernel, and a dense head, with an mse loss."""
    channels = draw(st.integers(1, 11))
    height, width = draw(st.integers(3, 13)), draw(st.integers(3, 13))
    kh, kw = draw(st.integers(1, min(5, height))), draw(st.integers(1, min(5, width)))
    stride = draw(st.integers(1, 3))
    pad = draw(st.integers(0, min(kh, kw) - 1))
    filters = draw(st.integers(1, 20))
    units = draw(st.integers(1, 19))
    activation = draw(st.sampled_from(["", " -> relu", " -> tanh"]))
    out_h = (height + 2 * pad - kh) // stride + 1
    out_w = (width + 2 * pad - kw) // stride + 1
    pool = ""
    if draw(st.booleans()):
        window = draw(st.integers(1, min(3, out_h, out_w)))
        pool = (f"maxpool {window}x{window} stride={draw(st.integers(1, 3))} "
                f"pad={draw(st.integers(0, window // 2))}\n")
    return (f"network t\ninput: {channels}x{height}x{width}\n"
            f"conv c: {filters} {kh}x{kw} stride={stride} pad={pad}{activation}\n"
            f"{pool}flatten\ndense d: {units}\nloss mse\n")


_names = iter(range(10**9))


def _decorate(draw, line: str) -> str:
    """Free whitespace and comments around a line, as the language allows."""
    spaced = line.replace(" ", " " * draw(st.integers(1, 3)))
    comment = draw(st.sampled_from(["", "  # note", "\t# x -> y"]))
    blank = draw(st.sampled_from(["", "\n", "\n# comment line\n"]))
    return blank + spaced + comment
