"""A plain numpy interpreter of the graph IR: the oracle of the numeric tests, never the
fast path. It follows the same definitions as the compiled kernels (language.md), including
the corner cases: relu and max pooling let NaN through, max pooling pads with −∞ and records
the first position holding the maximum, average pooling divides by the whole window.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .ir import ConvAttrs, Graph, Node, Op, PoolAttrs, Window


def run(graph: Graph, x: np.ndarray, params: Mapping[str, np.ndarray],
        target: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every tensor of the graph, computed from input `x` (N x sample shape) and `params`.

    With `target` (labels or regression targets) and a loss line, the loss is computed too.
    """
    values: dict[str, np.ndarray] = {graph.input: x, **params}
    if target is not None and graph.target is not None:
        values[graph.target] = target
    for node in graph.nodes:
        if any(name not in values for name in node.inputs):
            continue  # the loss, when no target was given
        result = evaluate(node, [values[name] for name in node.inputs])
        values.update(zip(node.outputs, result if isinstance(result, tuple) else (result,),
                          strict=True))
    return values


def forward(graph: Graph, x: np.ndarray, params: Mapping[str, np.ndarray]) -> np.ndarray:
    return run(graph, x, params)[graph.output]


def evaluate(node: Node, args: list[np.ndarray]) -> np.ndarray | tuple[np.ndarray, ...]:
    """One op, one case; an op with several outputs returns them as a tuple."""
    x = args[0]
    match node.op:
        case Op.CONV2D:
            assert isinstance(node.attrs, ConvAttrs)
            return conv2d(x, args[1], node.attrs.window)
        case Op.MAXPOOL2D:
            assert isinstance(node.attrs, PoolAttrs)
            return maxpool2d(x, node.attrs.window)
        case Op.AVGPOOL2D:
            assert isinstance(node.attrs, PoolAttrs)
            return avgpool2d(x, node.attrs.window)
        case Op.DENSE:
            return x.reshape(x.shape[0], -1) @ args[1].T
        case Op.BIAS_ADD:
            return x + args[1].reshape((1, -1) + (1,) * (x.ndim - 2))
        case Op.FLATTEN:
            return x.reshape(x.shape[0], -1)
        case Op.RELU:
            return np.where(x < 0, np.zeros_like(x), x)
        case Op.SIGMOID:
            return 1 / (1 + np.exp(-x))
        case Op.TANH:
            return np.tanh(x)
        case Op.SOFTMAX:
            shifted = np.exp(x - x.max(axis=1, keepdims=True))
            return shifted / shifted.sum(axis=1, keepdims=True)
        case Op.CROSS_ENTROPY:
            labels = args[1]
            picked = x[np.arange(x.shape[0]), labels]
            return np.asarray(-np.mean(np.log(picked)), dtype=x.dtype)
        case Op.MSE:
            return np.asarray(np.mean((x - args[1]) ** 2), dtype=x.dtype)
    raise AssertionError(f"no reference for {node.op}")


def _out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _windows(x: np.ndarray, window: Window, fill: float):
    """Yield (kh, kw, patch) with patch[n, c, i, j] = padded x[n, c, i*S + kh, j*S + kw]."""
    (kh_size, kw_size), (sh, sw), (ph, pw) = window.kernel, window.stride, window.pad
    n, c, h, w = x.shape
    out_h, out_w = _out_size(h, kh_size, sh, ph), _out_size(w, kw_size, sw, pw)
    padded = np.full((n, c, h + 2 * ph, w + 2 * pw), fill, dtype=x.dtype)
    padded[:, :, ph:ph + h, pw:pw + w] = x
    for kh in range(kh_size):
        for kw in range(kw_size):
            patch = padded[:, :, kh:kh + sh * (out_h - 1) + 1:sh, kw:kw + sw * (out_w - 1) + 1:sw]
            yield kh, kw, patch


def conv2d(x: np.ndarray, weight: np.ndarray, window: Window) -> np.ndarray:
    """s(i, j) = Σ_c Σ_m Σ_n X_c(i·S + m, j·S + n) · W_c(m, n): cross-correlation, no flip."""
    out = None
    for kh, kw, patch in _windows(x, window, 0.0):
        term = np.einsum("nchw,fc->nfhw", patch, weight[:, :, kh, kw])
        out = term if out is None else out + term
    return out


def maxpool2d(x: np.ndarray, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """(maxima, argmax): argmax is the flat index h·W + w of the maximum in its input plane.

    Window positions are visited row by row; a later position wins only if strictly larger
    or NaN, and the first in-bounds position is always taken (so a window of −∞ has one).
    """
    (sh, sw), (ph, pw) = window.stride, window.pad
    height, width = x.shape[2], x.shape[3]
    best = argmax = None
    for kh, kw, patch in _windows(x, window, -np.inf):
        rows = np.arange(patch.shape[2]) * sh + kh - ph
        cols = np.arange(patch.shape[3]) * sw + kw - pw
        inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None]
        index = rows[:, None] * width + cols[None, :]
        if best is None:
            best = np.full(patch.shape, -np.inf, dtype=x.dtype)
            argmax = np.full(patch.shape, -1, dtype=np.int32)
        take = inside & ((argmax < 0) | (patch > best) | np.isnan(patch))
        best = np.where(take, patch, best)
        argmax = np.where(take, np.broadcast_to(index, patch.shape), argmax).astype(np.int32)
    return best, argmax


def avgpool2d(x: np.ndarray, window: Window) -> np.ndarray:
    """The mean over the whole window, padding counted as zeros (PyTorch's default)."""
    total = None
    for _, _, patch in _windows(x, window, 0.0):
        total = patch.copy() if total is None else total + patch
    return total / (window.kernel[0] * window.kernel[1])
