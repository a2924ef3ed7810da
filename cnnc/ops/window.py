"""Sliding-window geometry shared by convolution and pooling: the output size and its
arithmetic for error notes, the shape rule, the reference's padded patches and the loop
IR's window positions. Registers no op."""

from __future__ import annotations

import numpy as np

from cnnc.graph.ir import BATCH, Shape, Window, format_shape
from cnnc.loops.build import add, const, mul
from cnnc.loops.ir import Binary, BinOp, Expr, Var
from cnnc.ops.registry import ShapeContext, ShapeProblem


def output_size(height: int, width: int, window: Window) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw) = window.kernel, window.stride, window.pad
    return out_size(height, kh, sh, ph), out_size(width, kw, sw, pw)


def arithmetic(height: int, width: int, window: Window) -> str:
    """`floor((8 + 0 - 2) / 2) + 1 = 4`, once when height and width are computed alike."""
    out_h, out_w = output_size(height, width, window)

    def one(size: int, pad: int, kernel: int, stride: int, out: int) -> str:
        return f"floor(({size} + {2 * pad} - {kernel}) / {stride}) + 1 = {out}"

    rows = one(height, window.pad[0], window.kernel[0], window.stride[0], out_h)
    cols = one(width, window.pad[1], window.kernel[1], window.stride[1], out_w)
    return rows if rows == cols else f"H: {rows}, W: {cols}"


def sample(shape: Shape) -> str:
    """One sample's shape, `6x4x4`: the batch dimension left out, as the program writes it."""
    return format_shape(tuple(shape[1:]), "x")


def windowed_shape(ctx: ShapeContext, window: Window, channels: int) -> Shape:
    """Output N x channels x H' x W' of a conv or pool, H' = floor((H + 2P - K) / S) + 1."""
    x, source = ctx.x, ctx.sources[0]
    if len(x) != 4:
        raise ShapeProblem(f"{ctx.subject} needs a CxHxW input, but {source} gives "
                           f"{sample(x)}")
    (kh, kw), (ph, pw) = window.kernel, window.pad
    if x[2] + 2 * ph < kh or x[3] + 2 * pw < kw:
        need = f"{max(kh - 2 * ph, 1)}x{max(kw - 2 * pw, 1)}"
        padded = f" (a {kh}x{kw} window with pad {ph}x{pw})" if ph or pw else ""
        raise ShapeProblem(f"{ctx.subject} needs an input of at least {need}{padded}, "
                           f"but {source} gives {sample(x)}")
    height, width = output_size(x[2], x[3], window)
    return (BATCH, channels, height, width)


def format_window(window: Window) -> str:
    def pair(p: tuple[int, int]) -> str:
        return f"{p[0]}x{p[1]}"

    return f"kernel={pair(window.kernel)} stride={pair(window.stride)} pad={pair(window.pad)}"


# -- the reference's view: padded patches ----------------------------------------------------

def out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def patches(x: np.ndarray, window: Window, fill: float):
    """Yield (kh, kw, patch) with patch[n, c, i, j] = padded x[n, c, i*S + kh, j*S + kw]."""
    (kh_size, kw_size), (sh, sw), (ph, pw) = window.kernel, window.stride, window.pad
    n, c, h, w = x.shape
    out_h, out_w = out_size(h, kh_size, sh, ph), out_size(w, kw_size, sw, pw)
    padded = np.full((n, c, h + 2 * ph, w + 2 * pw), fill, dtype=x.dtype)
    padded[:, :, ph:ph + h, pw:pw + w] = x
    for kh in range(kh_size):
        for kw in range(kw_size):
            patch = padded[:, :, kh:kh + sh * (out_h - 1) + 1:sh, kw:kw + sw * (out_w - 1) + 1:sw]
            yield kh, kw, patch


def input_size(dy: np.ndarray, window: Window) -> tuple[int, int]:
    """The smallest input that gives dy's size (callers with the true shape pass it)."""
    (kh, kw), (sh, sw), (ph, pw) = window.kernel, window.stride, window.pad
    return (dy.shape[2] - 1) * sh + kh - 2 * ph, (dy.shape[3] - 1) * sw + kw - 2 * pw


# -- the loop IR's view: window positions -----------------------------------------------------

def _source_index(out_var: str, kernel_var: str, stride: int, pad: int) -> Expr:
    """ih = oh·S + kh − P, written without the terms that are 0 or ×1."""
    position: Expr = Var(out_var) if stride == 1 else mul(Var(out_var), const(stride))
    position = add(position, Var(kernel_var))
    return Binary(BinOp.SUB, position, const(pad)) if pad else position


def _inside(window: Window, ih: Expr, iw: Expr, height: int, width: int) -> Expr | None:
    """The bounds test of a padded window position; None where no padding can be read."""
    tests = []
    for index, size, pad in ((ih, height, window.pad[0]), (iw, width, window.pad[1])):
        if pad:
            tests.append(Binary(BinOp.AND, Binary(BinOp.GE, index, const(0)),
                                Binary(BinOp.LT, index, const(size))))
    if not tests:
        return None
    return tests[0] if len(tests) == 1 else Binary(BinOp.AND, tests[0], tests[1])


def window_position(window: Window, height: int, width: int) -> tuple[Expr, Expr, Expr | None]:
    """(ih, iw, in-bounds test or None) of window position (kh, kw) of output (oh, ow), for
    an input of `height` x `width`: the same geometry forward and backward."""
    (sh, sw), (ph, pw) = window.stride, window.pad
    ih = _source_index("oh", "kh", sh, ph)
    iw = _source_index("ow", "kw", sw, pw)
    return ih, iw, _inside(window, ih, iw, height, width)
