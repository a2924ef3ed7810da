"""The fuse pass groups ops by their registered fusion roles and checks who reads each
intermediate: an epilogue joins its anchor's kernel only where nothing else reads the
result it replaces."""

from __future__ import annotations

import dataclasses

import cnnc
from cnnc.graph.ir import Layer, Node, Role, Tensor
from cnnc.passes.fuse import fuse

PROGRAM = "network f\ninput: 2x6x6\nconv c: 3 3x3 -> relu\nmaxpool 2x2\n"


def kernel_names(graph) -> list[str]:
    return [k.name for k in fuse(graph).kernels]


def test_an_anchor_takes_its_bias_activation_and_pool():
    program = fuse(cnnc.check(PROGRAM))
    assert [k.name for k in program.kernels] == ["c_conv_relu_maxpool_fwd"]
    kernel = program.kernels[0]
    assert (kernel.op, kernel.activation, kernel.has_bias, kernel.pool.op) == \
        ("conv2d", "relu", True, "maxpool2d")
    # the pool's input stays stored: the backward pass reads the relu's output
    assert kernel.outputs == ("c", "maxpool1", "maxpool1.argmax")


def test_an_intermediate_read_twice_is_not_fused_away():
    graph = cnnc.check(PROGRAM)
    span = graph.nodes[0].span
    extra = Node("add", ("c.conv", "c"), ("both",), "both", span)
    tensors = (*graph.tensors, Tensor("both", Role.VALUE, graph.dtype, graph.tensor("c").shape))
    layers = (*graph.layers, Layer("both", "add", False, "both", span))
    graph = dataclasses.replace(graph, nodes=(*graph.nodes, extra), tensors=tensors,
                                layers=layers, output="both")
    # c.conv is read by the bias and by the add: it must be stored, so the bias and relu
    # that follow the convolution run as kernels of their own
    assert kernel_names(graph) == ["c_conv_fwd", "c_bias_fwd", "c_relu_fwd", "maxpool1_fwd",
                                   "both_add_fwd"]


def test_the_network_output_is_never_fused_away():
    graph = dataclasses.replace(cnnc.check(PROGRAM), output="c.pre")
    program = fuse(graph)
    assert [k.name for k in program.kernels] == ["c_conv_fwd", "c_relu_fwd", "maxpool1_fwd"]
    assert program.kernels[0].outputs == ("c.pre",)
