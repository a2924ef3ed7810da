"""Buffers that share memory (driver.memory, runtime.workspace): the regions never hold two
buffers live at once (checked against liveness computed here by brute force, on drawn
kernel sequences), a region's buffers really are one piece of memory, and the modules
compute what the numpy reference does with them, on 1-3 threads, in every entry point.
A call that reads back a buffer of a region runs on buffers of its own."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import random_params

import cnnc
from cnnc.driver.memory import regions
from cnnc.graph.ir import DType, Role, Tensor
from cnnc.loops.ir import Buffer, LoopFunction
from cnnc.ops.registry import Mode
from cnnc.passes import reference
from cnnc.passes.autodiff import differentiate

TRAINING = Mode(training=True)
ROLES = [Role.VALUE, Role.SCRATCH, Role.PARAM, Role.PACKED, Role.INPUT]


@st.composite
def entry_points(draw):
    """Kernels over a pool of tensors: each kernel reads and writes some of them."""
    count = draw(st.integers(1, 8))
    tensors = tuple(Tensor(f"t{i}", draw(st.sampled_from(ROLES)), DType.F32,
                           ("N", draw(st.integers(1, 50))) if draw(st.booleans())
                           else (draw(st.integers(1, 500)),)) for i in range(count))
    kernels = []
    for k in range(draw(st.integers(1, 10))):
        used = draw(st.lists(st.sampled_from(tensors), unique_by=lambda t: t.name,
                             max_size=count))
        buffers = tuple(Buffer(t.name, t.shape, t.dtype, draw(st.booleans())) for t in used)
        kernels.append(LoopFunction(f"k{k}", buffers, (), ()))
    kept = draw(st.sets(st.sampled_from([t.name for t in tensors])))
    return kernels, tensors, kept


def _transient_spans(kernels, tensors, kept) -> dict[str, tuple[int, int]]:
    """By brute force: a value or scratch buffer not kept whose first use writes it is live
    from its first use to its last."""
    roles = {t.name: t.role for t in tensors}
    spans = {}
    for name in roles:
        uses = [(k, b.is_output) for k, f in enumerate(kernels) for b in f.buffers
                if b.name == name]
        if uses and uses[0][1] and name not in kept and roles[name] in (Role.VALUE,
                                                                        Role.SCRATCH):
            spans[name] = (uses[0][0], uses[-1][0])
    return spans


@settings(max_examples=300, deadline=None)
@given(entry_points())
def test_regions_hold_each_transient_buffer_once_and_none_live_at_once(drawn):
    kernels, tensors, kept = drawn
    found = regions(kernels, tensors, kept)
    spans = _transient_spans(kernels, tensors, kept)
    members = [name for region in found for name in region]
    assert sorted(members) == sorted(spans)  # every transient buffer, once; nothing else
    for region in found:
        for i, first in enumerate(region):
            for second in region[i + 1:]:
                (a, b), (c, d) = spans[first], spans[second]
                assert b < c or d < a, (first, second, spans[first], spans[second])


RESIDUAL = """network shared
input: 3x10x10
conv a: 8 3x3 pad=1 -> relu
batchnorm an
conv b: 8 3x3 pad=1 from=an
add r: b, a -> relu
conv c: 16 3x3 stride=2 pad=1
maxpool 2x2
dense out: 4
loss mse
train sgd lr=0.01
"""


@pytest.fixture(scope="module")
def residual() -> cnnc.Module:
    return cnnc.compile(RESIDUAL, dtype="f64")


def _close(got, want, what):
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * scale, err_msg=what)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 5])
def test_every_entry_point_computes_the_reference_with_shared_memory(residual, threads,
                                                                     batch):
    assert {"forward", "gradients", "train_step"} <= set(residual.manifest["shared"])
    residual.set_threads(threads)
    params = random_params(residual, seed=3)  # the running statistics too
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, 3, 10, 10))
    y = rng.standard_normal((batch, 4))
    graph = differentiate(cnnc.check(RESIDUAL, dtype="f64"))
    inference = reference.forward(graph, x, params)
    values = reference.run(graph, x, params, y, mode=TRAINING)  # batch statistics
    _close(residual(x), inference, "output")
    gradients, loss = residual.gradients_and_loss(x, y)
    _close(loss, values[graph.loss], "loss")
    for name, gradient in gradients.items():
        _close(gradient, values[dict(graph.gradients)[name]], name)
    _close(residual.input_gradient(x, y), values[dict(graph.gradients)[graph.input]],
           "input gradient")
    # a train step: the loss of the batch, then SGD's update of each parameter
    assert residual.train_step(x, y) == pytest.approx(float(values[graph.loss]), rel=1e-9)
    for name, value in residual.params.items():
        _close(value, params[name] - 0.01 * gradients[name], f"{name} after a step")


def test_a_regions_buffers_are_one_piece_of_memory(residual):
    x = np.zeros((2, 3, 10, 10))
    residual.set_threads(1)
    residual(x)
    engine = residual._engine
    workspace = engine._workspace(2)
    index = {b.name: i for i, b in enumerate(engine._storage)}
    shared, plain = workspace.table("forward"), workspace.table(None)
    for region in residual.manifest["shared"]["forward"]:
        addresses = {shared.pointers[index[name]] for name in region}
        assert len(addresses) == 1, region
    starts = [shared.pointers[index[region[0]]]
              for region in residual.manifest["shared"]["forward"]]
    assert len(set(starts)) == len(starts)  # a region of its own each
    owned = [plain.pointers[i] for i, b in enumerate(engine._storage)
             if b.role in ("value", "scratch")]
    assert len(set(owned)) == len(owned)  # the plain table: every buffer its own


def test_reading_back_a_shared_buffer_runs_on_buffers_of_their_own(residual):
    """Module.activations reads every forward value after the call: with the regions, the
    later buffers of a region would have overwritten the earlier."""
    residual.set_threads(1)
    params = random_params(residual, seed=5)
    x = np.random.default_rng(0).standard_normal((3, 3, 10, 10))
    shared = {name for region in residual.manifest["shared"]["forward"] for name in region}
    activations = residual.activations(x)
    values = reference.run(cnnc.check(RESIDUAL, dtype="f64"), x, params)
    read = shared & set(activations) & set(values)
    assert read  # values that share memory in a forward call, read back here
    for name in read:
        _close(activations[name], values[name], name)
    _close(activations[residual.manifest["output"]["name"]], residual(x), "output")
