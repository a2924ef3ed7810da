"""A plain numpy interpreter of the graph IR: the oracle of the numeric tests, never the
fast path. It follows the same definitions as the compiled kernels (language.md), including
the corner cases: relu and max pooling let NaN through, max pooling pads with −∞ and records
the first position holding the maximum, average pooling divides by the whole window.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cnnc.graph.ir import BATCH, ConvAttrs, Graph, Node, Op, PoolAttrs, Window


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
        batch = x.shape[0]
        shape = tuple(batch if d == BATCH else d for d in graph.tensor(node.output).shape)
        result = evaluate(node, [values[name] for name in node.inputs], shape)
        values.update(zip(node.outputs, result if isinstance(result, tuple) else (result,),
                          strict=True))
    return values


def forward(graph: Graph, x: np.ndarray, params: Mapping[str, np.ndarray]) -> np.ndarray:
    return run(graph, x, params)[graph.output]


def evaluate(node: Node, args: list[np.ndarray],
             shape: tuple[int, ...] | None = None) -> np.ndarray | tuple[np.ndarray, ...]:
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
    assert shape is not None, "backward ops need the shape of their result"
    return evaluate_backward(node, args, shape)


def evaluate_backward(node: Node, args: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The backward ops, written directly from cnn-algorithm.md section 5; `shape` is the
    result's (the input it differentiates cannot always be told from δ's size)."""
    dy = args[0]
    match node.op:
        case Op.CONV2D_GRAD_INPUT:
            return conv2d_grad_input(dy, args[1], node.attrs.window, shape)
        case Op.CONV2D_GRAD_WEIGHT:
            return conv2d_grad_weight(dy, args[1], node.attrs.window)  # (x, dy)
        case Op.BIAS_GRAD:
            return dy.sum(axis=tuple(a for a in range(dy.ndim) if a != 1))
        case Op.DENSE_GRAD_INPUT:
            return (dy @ args[1]).reshape(shape)
        case Op.DENSE_GRAD_WEIGHT:
            x, grad = args
            return grad.T @ x.reshape(x.shape[0], -1)
        case Op.MAXPOOL2D_GRAD:
            return maxpool2d_grad(dy, args[1], node.attrs.window, shape)
        case Op.AVGPOOL2D_GRAD:
            return avgpool2d_grad(dy, node.attrs.window, shape)
        case Op.RELU_GRAD:
            return np.where(args[1] > 0, dy, np.zeros_like(dy))
        case Op.SIGMOID_GRAD:
            return dy * args[1] * (1 - args[1])
        case Op.TANH_GRAD:
            return dy * (1 - args[1] * args[1])
        case Op.SOFTMAX_GRAD:
            y = args[1]
            return y * (dy - (dy * y).sum(axis=1, keepdims=True))
        case Op.SOFTMAX_CROSS_ENTROPY_GRAD:
            p, labels = args
            onehot = np.zeros_like(p)
            onehot[np.arange(p.shape[0]), labels] = 1
            return (p - onehot) / p.shape[0]
        case Op.MSE_GRAD:
            y, t = args
            return 2 * (y - t) / y.size
        case Op.RESHAPE:
            return dy.reshape(shape)
        case Op.ADD:
            return dy + args[1]
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


def conv2d_grad_input(dy: np.ndarray, weight: np.ndarray, window: Window,
                      input_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """δ^{l-1} = δ^l * rot180(W) as a full correlation: each δ goes back through the window
    positions it came from (δ dilated by the stride, padding cropped off)."""
    (kh_size, kw_size), (sh, sw), (ph, pw) = window.kernel, window.stride, window.pad
    n, _, out_h, out_w = dy.shape
    channels = weight.shape[1]
    height, width = input_shape[2:] if input_shape else _input_size(dy, window)
    padded = np.zeros((n, channels, height + 2 * ph, width + 2 * pw), dtype=dy.dtype)
    for kh in range(kh_size):
        for kw in range(kw_size):
            rows = slice(kh, kh + sh * (out_h - 1) + 1, sh)
            cols = slice(kw, kw + sw * (out_w - 1) + 1, sw)
            padded[:, :, rows, cols] += np.einsum("nfhw,fc->nchw", dy, weight[:, :, kh, kw])
    return padded[:, :, ph:ph + height, pw:pw + width]


def conv2d_grad_weight(x: np.ndarray, dy: np.ndarray, window: Window) -> np.ndarray:
    """∂J/∂W(p, q) = Σ a(i·S + p, j·S + q) · δ(i, j): the input correlated with δ."""
    kernel = window.kernel
    grad = np.zeros((dy.shape[1], x.shape[1], *kernel), dtype=x.dtype)
    for kh, kw, patch in _windows(x, window, 0.0):
        grad[:, :, kh, kw] = np.einsum("nchw,nfhw->fc", patch, dy)
    return grad


def maxpool2d_grad(dy: np.ndarray, argmax: np.ndarray, window: Window,
                   input_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Each δ goes to where the forward pass found the maximum; the rest of the window gets 0."""
    n, c = dy.shape[:2]
    height, width = input_shape[2:] if input_shape else _input_size(dy, window)
    grad = np.zeros((n, c, height * width), dtype=dy.dtype)
    rows = np.arange(n)[:, None, None]
    chans = np.arange(c)[None, :, None]
    np.add.at(grad, (rows, chans, argmax.reshape(n, c, -1)), dy.reshape(n, c, -1))
    return grad.reshape(n, c, height, width)


def avgpool2d_grad(dy: np.ndarray, window: Window,
                   input_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Each δ, divided by k·k, goes to every position of its window."""
    (kh_size, kw_size), (sh, sw), (ph, pw) = window.kernel, window.stride, window.pad
    n, c, out_h, out_w = dy.shape
    height, width = input_shape[2:] if input_shape else _input_size(dy, window)
    padded = np.zeros((n, c, height + 2 * ph, width + 2 * pw), dtype=dy.dtype)
    share = dy / (kh_size * kw_size)
    for kh in range(kh_size):
        for kw in range(kw_size):
            padded[:, :, kh:kh + sh * (out_h - 1) + 1:sh, kw:kw + sw * (out_w - 1) + 1:sw] += share
    return padded[:, :, ph:ph + height, pw:pw + width]


def _input_size(dy: np.ndarray, window: Window) -> tuple[int, int]:
    """The smallest input that gives dy's size (callers with the true shape pass it)."""
    (kh, kw), (sh, sw), (ph, pw) = window.kernel, window.stride, window.pad
    return (dy.shape[2] - 1) * sh + kh - 2 * ph, (dy.shape[3] - 1) * sw + kw - 2 * pw
