"""The same network in PyTorch (and ONNX Runtime), with cnnc's parameters, for bench.py."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from cnnc.graph.ir import Graph


def build(graph: Graph, params: dict[str, np.ndarray]) -> torch.nn.Sequential:
    """nn layers in the graph's order, weights copied from `params` (same layouts)."""
    layers: list[torch.nn.Module] = []
    for node in graph.nodes:
        op = node.op.value
        if op == "conv2d":
            window = node.attrs.window
            weight = torch.from_numpy(params[node.inputs[1]].copy())
            conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], window.kernel,
                                   window.stride, window.pad,
                                   bias=f"{node.layer}.bias" in params)
            conv.weight.data = weight
            if conv.bias is not None:
                conv.bias.data = torch.from_numpy(params[f"{node.layer}.bias"].copy())
            layers.append(conv)
        elif op == "dense":
            weight = torch.from_numpy(params[node.inputs[1]].copy())
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0],
                                     bias=f"{node.layer}.bias" in params)
            linear.weight.data = weight
            if linear.bias is not None:
                linear.bias.data = torch.from_numpy(params[f"{node.layer}.bias"].copy())
            layers += [torch.nn.Flatten(), linear]
        elif op in ("maxpool2d", "avgpool2d"):
            window = node.attrs.window
            pool = torch.nn.MaxPool2d if op == "maxpool2d" else torch.nn.AvgPool2d
            layers.append(pool(window.kernel, window.stride, window.pad))
        elif op in ("relu", "sigmoid", "tanh"):
            layers.append({"relu": torch.nn.ReLU, "sigmoid": torch.nn.Sigmoid,
                           "tanh": torch.nn.Tanh}[op]())
        elif op == "softmax":
            layers.append(torch.nn.Softmax(dim=1))
        elif op == "flatten":
            layers.append(torch.nn.Flatten())
    return torch.nn.Sequential(*layers)


def step_function(model, graph: Graph, mode: str, x: np.ndarray, y: np.ndarray, module,
                  device: str = "cpu"):
    """The same work as cnnc's call for `mode`, after checking the forward result. On a GPU
    (`device="cuda"`) the inputs live there and each call copies back what cnnc's API
    returns: the output, the gradients or the loss."""
    model = model.to(device)
    tx, ty = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    tolerance = 1e-4 if device == "cpu" else 1e-3  # cuDNN picks other summation orders
    with torch.no_grad():
        np.testing.assert_allclose(model(tx).cpu().numpy(), module(x), rtol=tolerance,
                                   atol=tolerance / 10)
    cross_entropy = module.manifest["loss"]["kind"] == "cross_entropy"

    def loss():
        out = model(tx)
        if cross_entropy:
            return torch.nn.functional.nll_loss(torch.log(out), ty)
        return torch.nn.functional.mse_loss(out, ty)

    if mode == "forward":
        def forward():
            with torch.no_grad():
                return model(tx).cpu()
        return forward
    if mode == "fwd+bwd":
        def backward():
            model.zero_grad(set_to_none=True)
            loss().backward()
            return [p.grad.cpu() for p in model.parameters()]
        return backward
    settings = module.optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["lr"],
                                momentum=settings.get("momentum", 0.0))

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        optimizer.step()
        return value.item()
    return train_step


def onnx_runtime(model, x: np.ndarray, threads: int):
    """An ONNX Runtime session of the model, or None where onnxruntime is missing."""
    try:
        import onnxruntime
    except ImportError:
        return None
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    torch.onnx.export(model, torch.from_numpy(x), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "n"}}, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    # idle workers sleep instead of spinning, as every system here does (see bench.py)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
    expected = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-5)
    return lambda: session.run(None, {"x": x})
