"""Sliding-window geometry shared by convolution and pooling: padding worked out for an
input size (`same`, ceil mode), the output size and its arithmetic for error notes, the
shape rule, the reference's padded patches and the loop IR's window positions. Registers no
op.

Every consumer that reads pads first calls `resolve`, which gives a window of plain zero
padding (top, left, bottom, right) in floor mode that reads exactly the same positions:
`same` padding worked out, and a ceil-mode last window's overhang added at the bottom and
right. The output size is then floor((H + top + bottom − extent) / S) + 1 with the
dilated extent (K − 1)·D + 1, for every op alike.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cnnc.graph.ir import BATCH, Shape, Window, format_shape
from cnnc.loops.build import add, const, mul
from cnnc.loops.ir import Binary, BinOp, Expr, Var
from cnnc.ops.registry import ShapeContext, ShapeProblem


def extent(kernel: int, dilation: int) -> int:
    """The input rows a dilated kernel spans: (K − 1)·D + 1."""
    return (kernel - 1) * dilation + 1


def _same_pads(size: int, span: int, stride: int) -> tuple[int, int]:
    """Output ceil(size / S); the total padding split with the odd one after (SAME_UPPER)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


def _out(size: int, span: int, stride: int, before: int, after: int, ceil: bool) -> int:
    """PyTorch's pooling_output_shape: in ceil mode the last window must start inside the
    input or its top/left padding."""
    room = size + before + after - span
    if not ceil:
        return room // stride + 1
    out = -(-room // stride) + 1
    if (out - 1) * stride >= size + before:
        out -= 1
    return out


def _axes(window: Window, height: int, width: int) -> list[tuple[int, int, int, int, int]]:
    """Per axis (height, width): (size, extent, stride, pad before, pad after), with `same`
    worked out but no ceil-mode overhang."""
    axes = []
    for axis, size in enumerate((height, width)):
        span = extent(window.kernel[axis], window.dilation[axis])
        stride = window.stride[axis]
        if window.same:
            before, after = _same_pads(size, span, stride)
        else:
            before, after = window.pad[axis], window.pad[axis + 2]
        axes.append((size, span, stride, before, after))
    return axes


def window_of(kernel: tuple[int, int], stride: tuple[int, int],
              pad: tuple[int, int, int, int] | str, dilation: tuple[int, int] = (1, 1),
              ceil: bool = False) -> Window:
    """The window of a layer's options; `pad` as `options.window_padding` gives it. `same`
    pads are known now for stride 1 (the extent less one, the odd one at the bottom and
    right), else only with the input's size."""
    if pad == "valid":
        pad = (0, 0, 0, 0)
    elif pad == "same" and stride == (1, 1):
        (top, bottom), (left, right) = (_same_pads(1, extent(k, d), 1)
                                        for k, d in zip(kernel, dilation, strict=True))
        pad = (top, left, bottom, right)
    elif pad == "same":
        return Window(kernel, stride, (0, 0, 0, 0), dilation, ceil, same=True)
    return Window(kernel, stride, pad, dilation, ceil)


def pads(window: Window, height: int, width: int) -> tuple[int, int, int, int]:
    """The padding the program asked for (top, left, bottom, right), `same` worked out for
    an input of height x width; without the overhang of a ceil-mode last window."""
    (_, _, _, top, bottom), (_, _, _, left, right) = _axes(window, height, width)
    return top, left, bottom, right


def output_size(height: int, width: int, window: Window) -> tuple[int, int]:
    rows, cols = (_out(size, span, stride, before, after, window.ceil)
                  for size, span, stride, before, after in _axes(window, height, width))
    return rows, cols


def resolve(window: Window, height: int, width: int) -> Window:
    """The same window with plain padding for an input of height x width: `same` worked out,
    and in ceil mode the bottom and right pads grown to cover the last window."""
    if not window.same and not window.ceil:
        return window
    out_h, out_w = output_size(height, width, window)
    top, left, bottom, right = pads(window, height, width)
    for axis, (size, out, before) in enumerate(((height, out_h, top), (width, out_w, left))):
        reach = (out - 1) * window.stride[axis] + extent(window.kernel[axis],
                                                          window.dilation[axis])
        overhang = max(0, reach - (size + before + (bottom, right)[axis]))
        if axis == 0:
            bottom += overhang
        else:
            right += overhang
    return dataclasses.replace(window, pad=(top, left, bottom, right), ceil=False, same=False)


def arithmetic(height: int, width: int, window: Window) -> str:
    """`floor((8 + 0 - 2) / 2) + 1 = 4`, once when height and width are computed alike."""
    out = output_size(height, width, window)
    texts = []
    for (size, span, stride, before, after), result in zip(_axes(window, height, width), out,
                                                            strict=True):
        if window.same:
            texts.append(f"ceil({size} / {stride}) = {result}")
            continue
        rounding = "ceil" if window.ceil else "floor"
        text = f"{rounding}(({size} + {before + after} - {span}) / {stride}) + 1"
        if window.ceil and result < -(-(size + before + after - span) // stride) + 1:
            text += " - 1"  # the last window would start in the bottom/right padding
        texts.append(f"{text} = {result}")
    rows, cols = texts
    return rows if rows == cols else f"H: {rows}, W: {cols}"


def sample(shape: Shape) -> str:
    """One sample's shape, `6x4x4`: the batch dimension left out, as the program writes it."""
    return format_shape(tuple(shape[1:]), "x")


def _pair(p: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in p)


def pad_text(window: Window) -> str:
    """`1x1`, `0x0x1x1` (top, left, bottom, right) where it is not symmetric, or `same`."""
    if window.same:
        return "same"
    return _pair(window.pad[:2]) if window.symmetric else _pair(window.pad)


def windowed_shape(ctx: ShapeContext, window: Window, channels: int) -> Shape:
    """Output N x channels x H' x W' of a conv or pool, H' = floor((H + T + B − E) / S) + 1
    with E the dilated kernel extent (rounded up in ceil mode)."""
    x, source = ctx.x, ctx.sources[0]
    if len(x) != 4:
        raise ShapeProblem(f"{ctx.subject} needs a CxHxW input, but {source} gives "
                           f"{sample(x)}")
    (_, eh, _, top, bottom), (_, ew, _, left, right) = _axes(window, x[2], x[3])
    if x[2] + top + bottom < eh or x[3] + left + right < ew:
        need = f"{max(eh - top - bottom, 1)}x{max(ew - left - right, 1)}"
        raise ShapeProblem(f"{ctx.subject} needs an input of at least {need}"
                           f"{_window_words(window, eh, ew)}, but {source} gives {sample(x)}")
    height, width = output_size(x[2], x[3], window)
    return (BATCH, channels, height, width)


def _window_words(window: Window, eh: int, ew: int) -> str:
    """` (a 7x7 window with pad 1x1)`, ` (a 3x3 window dilated 2x2, 5x5 in all)`, or ``."""
    (kh, kw), dilated = window.kernel, window.dilation != (1, 1)
    padded = any(window.pad)
    if not padded and not dilated:
        return ""
    words = f"a {kh}x{kw} window"
    if dilated:
        words += f" dilated {_pair(window.dilation)}, {eh}x{ew} in all,"
    if padded:
        words += f" with pad {pad_text(window)}"
    return f" ({words.rstrip(',')})"


def format_window(window: Window) -> str:
    text = (f"kernel={_pair(window.kernel)} stride={_pair(window.stride)} "
            f"pad={pad_text(window)}")
    if window.dilation != (1, 1):
        text += f" dilation={_pair(window.dilation)}"
    if window.ceil:
        text += " ceil=true"
    return text


# -- the reference's view: padded patches ----------------------------------------------------

def patches(x: np.ndarray, window: Window, fill: float):
    """Yield (kh, kw, patch) with patch[n, c, i, j] = padded x[n, c, i·S + kh·D, j·S + kw·D]
    (padding `fill`)."""
    n, c, h, w = x.shape
    out_h, out_w = output_size(h, w, window)
    window = resolve(window, h, w)
    (kh_size, kw_size), (sh, sw), (dh, dw) = window.kernel, window.stride, window.dilation
    top, left, bottom, right = window.pad
    padded = np.full((n, c, h + top + bottom, w + left + right), fill, dtype=x.dtype)
    padded[:, :, top:top + h, left:left + w] = x
    for kh in range(kh_size):
        for kw in range(kw_size):
            rows = slice(kh * dh, kh * dh + sh * (out_h - 1) + 1, sh)
            cols = slice(kw * dw, kw * dw + sw * (out_w - 1) + 1, sw)
            yield kh, kw, padded[:, :, rows, cols]


def input_size(dy: np.ndarray, window: Window) -> tuple[int, int]:
    """The smallest input that gives dy's size for a window of plain padding (callers with
    the true shape pass it)."""
    (kh, kw), (sh, sw), (dh, dw) = window.kernel, window.stride, window.dilation
    top, left, bottom, right = window.pad
    return ((dy.shape[2] - 1) * sh + extent(kh, dh) - top - bottom,
            (dy.shape[3] - 1) * sw + extent(kw, dw) - left - right)


# -- the loop IR's view: window positions -----------------------------------------------------

def _source_index(out_var: str, kernel_var: str, stride: int, pad: int,
                  dilation: int = 1) -> Expr:
    """ih = oh·S + kh·D − P, written without the terms that are 0 or ×1."""
    position: Expr = Var(out_var) if stride == 1 else mul(Var(out_var), const(stride))
    tap: Expr = Var(kernel_var) if dilation == 1 else mul(Var(kernel_var), const(dilation))
    position = add(position, tap)
    return Binary(BinOp.SUB, position, const(pad)) if pad else position


def _inside(window: Window, ih: Expr, iw: Expr, height: int, width: int) -> Expr | None:
    """The bounds test of a padded window position; None where no padding can be read."""
    tests = []
    top, left, bottom, right = window.pad
    for index, size, padded in ((ih, height, top or bottom), (iw, width, left or right)):
        if padded:
            tests.append(Binary(BinOp.AND, Binary(BinOp.GE, index, const(0)),
                                Binary(BinOp.LT, index, const(size))))
    if not tests:
        return None
    return tests[0] if len(tests) == 1 else Binary(BinOp.AND, tests[0], tests[1])


def window_position(window: Window, height: int, width: int) -> tuple[Expr, Expr, Expr | None]:
    """(ih, iw, in-bounds test or None) of window position (kh, kw) of output (oh, ow), for
    an input of `height` x `width`: the same geometry forward and backward."""
    window = resolve(window, height, width)
    (sh, sw), (dh, dw) = window.stride, window.dilation
    top, left = window.pad[:2]
    ih = _source_index("oh", "kh", sh, top, dh)
    iw = _source_index("ow", "kw", sw, left, dw)
    return ih, iw, _inside(window, ih, iw, height, width)
