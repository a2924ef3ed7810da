"""Helpers for numeric tests: compile a small program and compare it with the reference."""

from __future__ import annotations

import numpy as np

import cnnc
from cnnc.ops.pool import maxpool2d
from cnnc.passes import reference

RTOL = {np.float32: 1e-5, np.float64: 1e-12}


def assert_close(got: np.ndarray, want: np.ndarray, dtype, name: str) -> None:
    """rtol of the dtype, with an absolute floor at rtol × the layer's largest magnitude: the
    kernels sum in another order than numpy, so values that cancel to near 0 differ by
    rounding of the terms, not of the result."""
    rtol = RTOL[dtype]
    scale = max(1.0, float(np.nanmax(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=name)


def random_params(module: cnnc.Module, seed: int = 0) -> dict[str, np.ndarray]:
    """Parameters with nonzero biases, so a wrong bias index cannot hide behind zeros."""
    rng = np.random.default_rng(seed)
    values = {name: rng.standard_normal(p.shape).astype(p.dtype) * 0.5
              for name, p in module.params.items()}
    for name, buffer in module.buffers.items():  # running statistics: variances above 0
        if name.endswith(".running_var"):
            values[name] = rng.uniform(0.5, 1.5, buffer.shape).astype(buffer.dtype)
        elif name.endswith(".running_mean"):
            values[name] = rng.standard_normal(buffer.shape).astype(buffer.dtype) * 0.5
    module.set_params(values)
    return values


def training_noise(module: cnnc.Module, batch: int) -> dict[str, np.ndarray]:
    """The random numbers the module's next training call draws (dropout's), for the
    reference to run on."""
    from cnnc.runtime.noise import NoiseSource

    return NoiseSource(module._manifest).draw(batch, module.optimizer_state().get(
        "train_step.count", 0))


def compare_with_reference(text: str, batch: int, dtype=np.float32, seed: int = 0,
                           x: np.ndarray | None = None) -> cnnc.Module:
    """Compile `text`, run it on random input, and check every kernel output."""
    dtype_name = "f32" if dtype == np.float32 else "f64"
    module = cnnc.compile(text, dtype=dtype_name)
    graph = cnnc.check(text, dtype=dtype_name)
    params = random_params(module, seed)
    if x is None:
        x = np.random.default_rng(seed + 1).standard_normal((batch, *module.input_shape))
        x = x.astype(dtype)
    expected = reference.run(graph, x, params)
    for name, got in module.activations(x).items():
        if name.endswith(".argmax"):
            pool = graph.nodes_of(name.removesuffix(".argmax"))[0]
            _, want = maxpool2d(expected[pool.inputs[0]], pool.attrs.window)
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            assert_close(got, expected[name], dtype, name)
    return module


def against_torch_and_plain(text: str, threads: int, batches: tuple[int, ...],
                            reference_of) -> None:
    """`text` scheduled with `threads`: its forward against `reference_of(x, weights)`
    (torch tensors, float64) and its gradients (the parameters' and the input's) against
    the plain loops', at each batch size (float32)."""
    import torch

    scheduled = cnnc.compile(text, opt_level=1, threads=threads, cache=False)
    plain = cnnc.compile(text, opt_level=1, schedule=False, cache=False)
    params = random_params(scheduled)
    plain.set_params(params)
    w = {k: torch.from_numpy(v.astype(np.float64)) for k, v in params.items()}
    for batch in batches:
        rng = np.random.default_rng(batch)
        x = rng.standard_normal((batch, *scheduled.input_shape)).astype(np.float32)
        y = rng.standard_normal((batch, *scheduled.output_shape)).astype(np.float32)
        want = reference_of(torch.from_numpy(x.astype(np.float64)), w).numpy()
        assert_close(scheduled(x), want, np.float32, "forward")
        got, expected = scheduled.gradients(x, y), plain.gradients(x, y)
        for name in expected:
            assert_close(got[name], expected[name], np.float32, name)
        assert_close(scheduled.input_gradient(x, y), plain.input_gradient(x, y), np.float32,
                     "input gradient")
