"""The same network in PyTorch (and ONNX Runtime), with cnnc's parameters, for bench.py and
gpu_bench.py.

`GraphModel` walks the forward nodes of any cnnc graph in order and runs each by the torch
function of the same meaning (`OPS`, one entry an op; the loss by `LOSSES`), reading the
parameters and buffers by their cnnc names. So every network of the registered forward ops
has a peer, with no model written by hand. Batch norm follows the model's mode as torch's
does: batch statistics in `train()`, running statistics in `eval()` (cnnc folds those into
the convolution in front; PyTorch eager does not, ONNX Runtime does by itself).
"""

from __future__ import annotations

import copy
import functools
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cnnc.graph.ir import Graph, Node, Phase, Role
from cnnc.ops.window import pads, resolve

Run = Callable[[list, bool], torch.Tensor]  # (inputs in the node's order, training) -> output
ANCHORS = ("conv2d", "dense")  # take the bias of the bias_add after them, as nn.Conv2d does


# -- one torch function an op; each builder sees the node and the typed graph once ---------

def _conv(node: Node, graph: Graph) -> Run:
    """Groups and dilation as F.conv2d takes them; `same` and ceil padding worked out for
    the input's size; an asymmetric pad by F.pad in front."""
    height, width = graph.tensor(node.inputs[0]).shape[2:]
    window = resolve(node.attrs.window, height, width)
    top, left, bottom, right = window.pad
    edges = None if window.symmetric else (left, right, top, bottom)
    padding = (0, 0) if edges else (top, left)
    groups = node.attrs.groups

    def run(args: list, training: bool) -> torch.Tensor:
        x, weight, *bias = args
        if edges:
            x = F.pad(x, edges)
        return F.conv2d(x, weight, bias[0] if bias else None, window.stride, padding,
                        window.dilation, groups)
    return run


def _dense(node: Node, graph: Graph) -> Run:
    return lambda args, training: F.linear(args[0].flatten(1), args[1],
                                           args[2] if len(args) > 2 else None)


def _bias_add(node: Node, graph: Graph) -> Run:
    def run(args: list, training: bool) -> torch.Tensor:
        x, bias = args
        return x + bias.reshape((1, -1) + (1,) * (x.dim() - 2))
    return run


def _pool(node: Node, graph: Graph) -> Run:
    """torch's pools where the pad is symmetric (cnnc's ceil mode is PyTorch's); otherwise
    the input padded explicitly (−∞ for max) and, for the average, the window means
    rescaled to the counts cnnc divides by, worked out once for this input size."""
    window, count_pad = node.attrs.window, node.attrs.count_pad
    kernel, stride = window.kernel, window.stride
    is_max = node.op == "maxpool2d"
    if window.symmetric and not window.same:
        padding = window.pad[:2]
        if is_max:
            return lambda args, training: F.max_pool2d(args[0], kernel, stride, padding,
                                                       window.dilation, window.ceil)
        return lambda args, training: F.avg_pool2d(args[0], kernel, stride, padding,
                                                   window.ceil, count_pad)
    height, width = graph.tensor(node.inputs[0]).shape[2:]
    edges = _edges(resolve(window, height, width).pad)
    if is_max:
        return lambda args, training: F.max_pool2d(F.pad(args[0], edges, value=-math.inf),
                                                   kernel, stride, 0, window.dilation)
    divisor = _avg_divisor(window, height, width, count_pad)
    # both pools divide by the window's area, which cancels (ONNX has no divisor_override)
    return lambda args, training: F.avg_pool2d(F.pad(args[0], edges), kernel,
                                               stride) / divisor.to(args[0])


def _edges(pad: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """cnnc's (top, left, bottom, right) as F.pad's (left, right, top, bottom)."""
    top, left, bottom, right = pad
    return left, right, top, bottom


def _avg_divisor(window, height: int, width: int, count_pad: bool) -> torch.Tensor:
    """Per output position, the share of the window's positions that cnnc counts: inside
    the padded input (or inside the input alone), never a ceil-mode window's overhang."""
    asked = _edges(pads(window, height, width))
    whole = _edges(resolve(window, height, width).pad)
    overhang = tuple(w - a for w, a in zip(whole, asked, strict=True))
    mask = F.pad(torch.ones(1, 1, height, width), asked, value=1.0 if count_pad else 0.0)
    mask = F.pad(mask, overhang)
    return F.avg_pool2d(mask, window.kernel, window.stride)


def _batchnorm(node: Node, graph: Graph) -> Run:
    """Inputs (x, γ, β, running mean, running var); the running statistics are updated in
    training, as cnnc's train_step updates them."""
    eps, momentum = node.attrs.eps, node.attrs.momentum
    return lambda args, training: F.batch_norm(args[0], args[3], args[4], args[1], args[2],
                                               training, momentum, eps)


def _add(node: Node, graph: Graph) -> Run:
    return lambda args, training: functools.reduce(torch.add, args[1:], args[0])


def _upsample(node: Node, graph: Graph) -> Run:
    factor = tuple(float(f) for f in node.attrs.factor)
    return lambda args, training: F.interpolate(args[0], scale_factor=factor, mode="nearest")


def _dropout(node: Node, graph: Graph) -> Run:
    """torch draws its own mask; cnnc's noise input is not read (so a training step with
    dropout is timed, not compared)."""
    rate = node.attrs.rate
    return lambda args, training: F.dropout(args[0], rate, training)


def _plain(function: Callable[[torch.Tensor], torch.Tensor]):
    return lambda node, graph: lambda args, training: function(args[0])


OPS: dict[str, Callable[[Node, Graph], Run]] = {
    "conv2d": _conv, "dense": _dense, "bias_add": _bias_add,
    "maxpool2d": _pool, "avgpool2d": _pool,
    "global_avgpool2d": _plain(lambda x: x.mean((2, 3), keepdim=True)),
    "global_maxpool2d": _plain(lambda x: x.amax((2, 3), keepdim=True)),
    "batchnorm": _batchnorm, "dropout": _dropout, "upsample_nearest": _upsample,
    "add": _add,
    "mul": lambda node, graph: lambda args, training: args[0] * args[1],
    "concat": lambda node, graph: lambda args, training: torch.cat(args, 1),
    "flatten": _plain(lambda x: x.flatten(1)),
    "softmax": _plain(lambda x: F.softmax(x, 1)),
    "relu": _plain(F.relu), "relu6": _plain(F.relu6), "sigmoid": _plain(torch.sigmoid),
    "tanh": _plain(torch.tanh), "silu": _plain(F.silu), "gelu": _plain(F.gelu),
    "hardswish": _plain(F.hardswish), "hardsigmoid": _plain(F.hardsigmoid),
    "leaky_relu": lambda node, graph: lambda args, training: F.leaky_relu(
        args[0], node.attrs.slope if node.attrs else 0.01),
}


# -- losses: (output, targets) -> the mean loss ----------------------------------------------

def _probabilities_cross_entropy(node: Node) -> Callable:
    """−Σ target · log p over the classes, target the one-hot row smoothed by ε."""
    eps = node.attrs.label_smoothing

    def loss(p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = torch.log(p)
        value = F.nll_loss(log_p, labels)
        return value if eps == 0 else (1 - eps) * value - eps * log_p.mean(1).mean()
    return loss


LOSSES: dict[str, Callable[[Node], Callable]] = {
    "cross_entropy": _probabilities_cross_entropy,
    "softmax_cross_entropy": lambda node: functools.partial(
        F.cross_entropy, label_smoothing=node.attrs.label_smoothing),
    "mse": lambda node: F.mse_loss,
}


def loss_function(graph: Graph) -> Callable:
    """The torch form of the graph's loss node: (output, targets) -> mean loss."""
    node = next(n for n in graph.nodes if n.phase is Phase.LOSS)
    if node.op not in LOSSES:
        raise ValueError(f"benchmarks/torch_model.py: no torch loss for cnnc's {node.op}")
    return LOSSES[node.op](node)


# -- the model --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Step:
    run: Run
    inputs: tuple[tuple[bool, str], ...]  # (an attribute of the model?, its name)
    output: str


class GraphModel(torch.nn.Module):
    """The graph's forward nodes as torch calls, in order; the graph's parameters are this
    module's (in the graph's order), its buffers registered as torch buffers."""

    def __init__(self, graph: Graph, values: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.input, self.output = graph.input, graph.output
        self.attribute: dict[str, str] = {}  # cnnc name -> attribute of this module
        for index, tensor in enumerate(graph.params):
            self.attribute[tensor.name] = f"p{index}"
            self.register_parameter(f"p{index}", torch.nn.Parameter(_tensor(values, tensor)))
        for index, tensor in enumerate(graph.buffers):
            self.attribute[tensor.name] = f"b{index}"
            self.register_buffer(f"b{index}", _tensor(values, tensor))
        self.steps = tuple(_plan(graph, self.attribute))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = {self.input: x}
        for step in self.steps:
            args = [getattr(self, name) if attribute else values[name]
                    for attribute, name in step.inputs]
            values[step.output] = step.run(args, self.training)
        return values[self.output]

    def named(self, name: str) -> torch.Tensor:
        """A parameter or buffer by its cnnc name."""
        return getattr(self, self.attribute[name])


def _tensor(values: dict[str, np.ndarray], tensor) -> torch.Tensor:
    if tensor.name not in values:
        raise ValueError(f"benchmarks/torch_model.py: no value for {tensor.role.value} "
                         f"{tensor.name} (pass the module's params and buffers)")
    return torch.from_numpy(np.array(values[tensor.name], copy=True))


def _plan(graph: Graph, attribute: dict[str, str]) -> list[_Step]:
    """One step a forward node; a conv or dense takes the bias_add right after it where
    nothing else reads its result, so PyTorch runs them as one call, as nn.Conv2d does."""
    nodes = [n for n in graph.nodes if n.phase is Phase.FORWARD]
    readers: dict[str, int] = {}
    for node in graph.nodes:
        for name in node.inputs:
            readers[name] = readers.get(name, 0) + 1
    steps, skip = [], False
    for node, after in zip(nodes, [*nodes[1:], None], strict=True):
        if skip:
            skip = False
            continue
        if node.op not in OPS:
            raise ValueError(f"benchmarks/torch_model.py: no torch function for cnnc's op "
                             f"{node.op} (layer {node.layer}); add one to OPS")
        inputs = node.inputs
        output = node.output
        if (node.op in ANCHORS and after is not None and after.op == "bias_add"
                and after.inputs[0] == output and readers[output] == 1):
            inputs, output, skip = (*inputs, after.inputs[1]), after.output, True
        steps.append(_Step(OPS[node.op](node, graph), _sources(graph, inputs, attribute),
                           output))
    return steps


def _sources(graph: Graph, names: tuple[str, ...], attribute: dict[str, str]):
    """Where each input comes from; dropout's noise is left out (torch draws its own)."""
    return tuple((name in attribute, attribute.get(name, name)) for name in names
                 if graph.tensor(name).role is not Role.NOISE)


def build(graph: Graph, params: dict[str, np.ndarray]) -> GraphModel:
    """The torch peer of `graph`, with the values of `params` (the module's parameters and
    buffers, cnnc's layouts are PyTorch's)."""
    return GraphModel(graph, params)


# -- what is timed ----------------------------------------------------------------------------

def _close(got: np.ndarray, expected: np.ndarray, tolerance: float, what: str) -> None:
    """rtol `tolerance`, atol a tenth of it scaled by the largest magnitude (deep networks
    of fresh weights grow their activations)."""
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance / 10 * scale,
                               err_msg=what)


def _targets(y: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(y).to(device)


def step_function(model, graph: Graph, mode: str, x: np.ndarray, y: np.ndarray, module,
                  device: str = "cpu"):
    """The same work as cnnc's call for `mode`, after checking the forward result (the
    inference pass; for training, the training pass and one training step as well). On a
    GPU (`device="cuda"`) the inputs live there and each call copies back what cnnc's API
    returns: the output, the gradients or the loss."""
    model = model.to(device)
    tx, ty = torch.from_numpy(x).to(device), _targets(y, device)
    tolerance = 1e-4 if device == "cpu" else 1e-3  # cuDNN picks other summation orders
    model.eval()
    with torch.no_grad():
        _close(model(tx).cpu().numpy(), module(x), tolerance, "the forward pass (inference)")
    if mode == "forward":  # (a network without a loss line, e.g. an imported one, too)
        def forward():
            with torch.no_grad():
                return model(tx).cpu()
        return forward
    criterion = loss_function(graph)

    def loss():
        return criterion(model(tx), ty)

    model.train()
    if mode == "fwd+bwd":
        def backward():
            model.zero_grad(set_to_none=True)
            loss().backward()
            return [p.grad.cpu() for p in model.parameters()]
        return backward
    optimizer = _optimizer(model, module.optimizer)
    if _deterministic(graph):
        _check_training(model, graph, module, x, y, device, tolerance)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        optimizer.step()
        return value.item()
    return train_step


def _optimizer(model, settings: dict) -> torch.optim.Optimizer:
    """torch.optim's form of the train line (sgd; adam and adamw)."""
    decay = settings.get("weight_decay", 0.0)
    kind = settings.get("kind", "sgd")
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=settings["lr"],
                               momentum=settings.get("momentum", 0.0), weight_decay=decay,
                               nesterov=bool(settings.get("nesterov", False)))
    optimizer = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    return optimizer(model.parameters(), lr=settings["lr"],
                     betas=(settings.get("beta1", 0.9), settings.get("beta2", 0.999)),
                     eps=settings.get("eps", 1e-8), weight_decay=decay)


def _deterministic(graph: Graph) -> bool:
    """Whether a training pass is the same function in both systems (dropout's masks are
    drawn by each from its own generator)."""
    return not any(n.op == "dropout" for n in graph.nodes)


def _check_training(model, graph: Graph, module, x: np.ndarray, y: np.ndarray, device: str,
                    tolerance: float) -> None:
    """The training pass, its loss, and one optimizer step of both systems, from the same
    parameters: what the step changes in each parameter and buffer (running statistics)
    must agree. Done on a copy of the peer, and cnnc's module is put back as it was."""
    tx, ty = torch.from_numpy(x).to(device), _targets(y, device)
    peer = copy.deepcopy(getattr(model, "_orig_mod", model))  # torch.compile's wraps it
    optimizer = _optimizer(peer, module.optimizer)
    out = peer(tx)  # once: each training pass of torch moves the running statistics
    _close(out.detach().cpu().numpy(), module.forward(x, training=True), tolerance,
           "the forward pass (training)")
    value = loss_function(graph)(out, ty)
    value.backward()
    optimizer.step()
    saved, state = module.params | module.buffers, module.optimizer_state()
    try:
        np.testing.assert_allclose(module.train_step(x, y), value.item(), rtol=tolerance,
                                   err_msg="the loss of a training step")
        stored = module.params | module.buffers
        for name in peer.attribute:
            _same_change(peer.named(name).detach().cpu().numpy() - saved[name],
                         stored[name] - saved[name], f"{name}'s change in one training step")
    finally:
        # the train step count comes back with the buffers (num_batches_tracked):
        # set_optimizer_state refuses the "train_step.count" that optimizer_state gives
        module.set_params(saved)
        module.set_optimizer_state({k: v for k, v in state.items()
                                    if k != "train_step.count"})


def _same_change(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    """A step's changes (lr · the gradient, with momentum and decay) agree to 5% in norm.
    Not closer: cnnc's batch norm sums over N·H·W one float32 value after another, and its
    gradients of ResNet-20's first layers are 1% from float64 (PyTorch's: 0.2%)."""
    error = float(np.linalg.norm(got - expected))
    size = float(np.linalg.norm(expected))
    assert error <= 0.05 * size + 1e-7, \
        f"{what}: {error:.3g} apart, {error / max(size, 1e-30):.1%} of its norm {size:.3g}"


def onnx_runtime(model, x: np.ndarray, threads: int):
    """An ONNX Runtime session of the model in inference mode, checked against it, or None
    where onnxruntime is missing."""
    try:
        import onnxruntime
    except ImportError:
        return None
    model.eval()
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    torch.onnx.export(model, torch.from_numpy(x), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    # idle workers sleep instead of spinning, as every system here does (see bench.py)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    _close(session.run(None, {"x": x})[0], expected, 1e-4, "ONNX Runtime's forward pass")
    return lambda: session.run(None, {"x": x})
