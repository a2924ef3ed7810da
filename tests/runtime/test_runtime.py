"""The runtime checks every array before native code sees it; parameters and weights files."""

from __future__ import annotations

import numpy as np
import pytest

import cnnc
from cnnc.passes import reference

TEXT = "network r\ninput: 2x6x6\nconv c: 3 3x3 -> relu\nmaxpool 2x2\ndense d: 4 -> softmax\n"


@pytest.fixture(scope="module")
def module():
    return cnnc.compile(TEXT)


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((3, 2, 6, 6)).astype(np.float32)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 6, 6), np.float32),
     r"x must have shape \(N, 2, 6, 6\), got \(2, 6, 6\); for one sample, add a batch axis"),
    (np.zeros((3, 2, 6, 5), np.float32), r"x must have shape \(N, 2, 6, 6\), got \(3, 2, 6, 5\)"),
    (np.zeros((3, 2, 36), np.float32), r"x must have shape \(N, 2, 6, 6\), got \(3, 2, 36\)"),
    (np.zeros((0, 2, 6, 6), np.float32), r"x is an empty batch \(N = 0\)"),
    (np.zeros((3, 2, 6, 6), np.int64), "x must have dtype float32, got int64"),
    (np.zeros((3, 2, 6, 6), np.float16), "x must have dtype float32, got float16"),
    (np.zeros((3, 2, 6, 6), ">f4"), "x must be a numeric array in native byte order"),
    (np.array([["a"]]), "x must be a numeric array"),
    ([[1, 2], [3]], "x is not an array"),
])
def test_bad_inputs_are_refused_before_native_code(module, bad, message):
    with pytest.raises(cnnc.CnncRuntimeError, match=message):
        module(bad)


def test_float64_input_is_rounded_and_non_contiguous_input_copied(module, x):
    expected = module(x)
    np.testing.assert_array_equal(module(x.astype(np.float64)), expected)
    wide = np.zeros((3, 2, 6, 12), np.float32)
    wide[..., ::2] = x
    view = wide[..., ::2]
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(module(view), expected)
    reversed_batch = np.ascontiguousarray(x[::-1])
    np.testing.assert_array_equal(module(x[::-1]), module(reversed_batch))


def test_any_batch_size_matches_the_reference(module):
    graph = cnnc.check(TEXT)
    for batch in (1, 2, 13):
        x = np.random.default_rng(batch).standard_normal((batch, 2, 6, 6)).astype(np.float32)
        np.testing.assert_allclose(module(x), reference.forward(graph, x, module.params),
                                   rtol=1e-5, atol=1e-6)


def test_params_are_copies_and_set_params_checks_names_shapes_dtypes(module, x):
    before = module(x)
    params = module.params
    with pytest.raises(ValueError, match="read-only"):  # a copy: writing it would be lost
        params["c.weight"][:] = 0
    writable = params["c.weight"].copy()
    writable[:] = 0  # a copy of the copy is the user's own, and the module is unchanged
    np.testing.assert_array_equal(module(x), before)
    assert not np.shares_memory(module.params["c.weight"], module.params["c.weight"])
    with pytest.raises(cnnc.CnncRuntimeError, match=r"unknown parameter 'c\.wieght'"):
        module.set_params({"c.wieght": params["c.weight"]})
    with pytest.raises(cnnc.CnncRuntimeError, match=r"c\.bias must have shape \(3,\), got \(4,\)"):
        module.set_params({"c.bias": np.zeros(4, np.float32)})
    with pytest.raises(cnnc.CnncRuntimeError, match=r"c\.bias must have dtype float32, got int64"):
        module.set_params({"c.bias": np.zeros(3, np.int64)})
    with pytest.raises(cnnc.CnncRuntimeError, match="set_params takes a dict"):
        module.set_params([1, 2])


def test_weights_files_round_trip_and_are_checked(tmp_path, x):
    module = cnnc.compile(TEXT)
    original = module.params
    module.save_weights(tmp_path / "w.npz")
    module.set_params({name: value * 2 for name, value in original.items()})
    module.load_weights(tmp_path / "w.npz")
    for name, value in original.items():
        np.testing.assert_array_equal(module.params[name], value)
    np.savez(tmp_path / "partial.npz", **{"c.weight": original["c.weight"]})
    with pytest.raises(cnnc.CnncRuntimeError, match=r"lacks the parameters c\.bias, d\.weight"):
        module.load_weights(tmp_path / "partial.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(cnnc.CnncRuntimeError, match="cannot read weights from"):
        module.load_weights(tmp_path / "junk.npz")
    np.save(tmp_path / "one.npy", original["c.bias"])
    with pytest.raises(cnnc.CnncRuntimeError, match=r"not an \.npz archive \(a \.npy array"):
        module.load_weights(tmp_path / "one.npy")
    with pytest.raises(cnnc.CnncRuntimeError, match="cannot read weights"):
        module.load_weights(tmp_path / "absent.npz")


def test_initial_parameters_are_deterministic_and_scaled():
    text = TEXT + "loss cross_entropy\ntrain sgd seed=7\n"
    first = cnnc.compile(text, cache=False).params  # two real compiles, not a cache hit
    second = cnnc.compile(text, cache=False).params
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    other = cnnc.compile(text.replace("seed=7", "seed=8")).params
    assert not np.array_equal(first["c.weight"], other["c.weight"])
    assert not first["c.bias"].any()
    # He for the relu conv: std sqrt(2 / (2*3*3)); Glorot bound for the softmax dense.
    big = cnnc.compile("network b\ninput: 64x8x8\nconv c: 64 3x3 -> relu\n").params["c.weight"]
    assert abs(big.std() - np.sqrt(2 / (64 * 9))) < 0.02 * np.sqrt(2 / (64 * 9)) * 5
    limit = np.sqrt(6 / (12 + 4))
    assert np.abs(first["d.weight"]).max() <= limit


def test_compile_arguments_are_checked():
    with pytest.raises(cnnc.CnncError, match="target 'tpu' is not available; the targets "
                                             "are cpu and cuda"):
        cnnc.compile(TEXT, target="tpu")
    with pytest.raises(cnnc.CnncError, match="opt_level must be 0, 1, 2 or 3"):
        cnnc.compile(TEXT, opt_level=5)
    with pytest.raises(cnnc.CnncError, match="opt_level must be 0, 1, 2 or 3"):
        cnnc.compile(TEXT, opt_level=3.0)
    with pytest.raises(cnnc.CnncInputError, match="a program is its text or a path"):
        cnnc.compile(None)
    with pytest.raises(cnnc.CnncSemanticError):
        cnnc.compile("network n\ninput: 1x2x2\nconv c: 1 3x3\n")


@pytest.mark.parametrize("batch", [1, 7, 13, 64])
def test_thread_counts_1_2_and_3_give_identical_results(module, batch):
    x = np.random.default_rng(batch).standard_normal((batch, 2, 6, 6)).astype(np.float32)
    results = []
    for threads in (1, 2, 3):
        module.set_threads(threads)
        results.append(module(x))
    module.set_threads(1)
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])
    np.testing.assert_allclose(results[0], reference.forward(cnnc.check(TEXT), x, module.params),
                               rtol=1e-5, atol=1e-6)


def test_thread_count_option_and_environment(monkeypatch):
    monkeypatch.setenv("CNNC_NUM_THREADS", "3")
    assert cnnc.compile(TEXT).threads == 3
    assert cnnc.compile(TEXT, threads=2).threads == 2
    monkeypatch.setenv("CNNC_NUM_THREADS", "many")
    with pytest.raises(cnnc.CnncRuntimeError, match="CNNC_NUM_THREADS must be a whole number"):
        cnnc.compile(TEXT)
    monkeypatch.delenv("CNNC_NUM_THREADS")
    with pytest.raises(cnnc.CnncRuntimeError, match="at least 1, got 0"):
        cnnc.compile(TEXT, threads=0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("optimizer", ["sgd lr=0.1 momentum=0.9", "adam lr=0.01"])
def test_gradients_and_loss_then_apply_gradients_is_a_train_step(threads, optimizer):
    """The two halves data-parallel training uses, against the whole step (itself checked
    against numpy's optimizer elsewhere)."""
    text = TEXT + f"loss cross_entropy\ntrain {optimizer}\n"
    whole, halves = cnnc.compile(text, threads=threads), cnnc.compile(text, threads=threads)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 2, 6, 6)).astype(np.float32)
    y = rng.integers(0, 4, 6)
    for _ in range(3):
        gradients, loss = halves.gradients_and_loss(x, y)
        assert loss == pytest.approx(halves.loss(x, y), rel=1e-6)
        for name, value in halves.gradients(x, y).items():
            np.testing.assert_allclose(gradients[name], value, rtol=1e-6, err_msg=name)
        halves.apply_gradients(gradients)
        assert whole.train_step(x, y) == pytest.approx(loss, rel=1e-6)
    for name, value in whole.params.items():
        np.testing.assert_allclose(halves.params[name], value, rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    np.testing.assert_array_equal(halves.optimizer_state()["optimizer.step"], 3)


def test_apply_gradients_checks_every_gradient():
    module = cnnc.compile(TEXT + "loss cross_entropy\ntrain sgd\n", threads=1)
    gradients = {name: np.zeros_like(value) for name, value in module.params.items()}
    before = module.params
    with pytest.raises(cnnc.CnncRuntimeError, match="a gradient for each parameter"):
        module.apply_gradients({k: v for k, v in gradients.items() if k != "d.bias"})
    with pytest.raises(cnnc.CnncRuntimeError, match=r"d.bias must be float32 of shape \(4,\)"):
        module.apply_gradients({**gradients, "d.bias": np.zeros(5, np.float32)})
    with pytest.raises(cnnc.CnncRuntimeError, match="must be a numeric array"):
        module.apply_gradients({**gradients, "d.bias": np.array(["a"] * 4)})
    module.apply_gradients({**gradients, "d.bias": np.ones(4)})  # float64 is rounded
    np.testing.assert_allclose(module.params["d.bias"], before["d.bias"] - 0.01, rtol=1e-6)
    with pytest.raises(cnnc.CnncRuntimeError, match="no loss line"):
        cnnc.compile(TEXT, threads=1).apply_gradients({})


def test_weights_and_checkpoints_are_read_safely(tmp_path):
    """A 1 TB header, a FIFO and a non-path: refused in cnnc's words, nothing inflated."""
    import os
    import threading

    from npzfiles import npy_header, zip_of

    from cnnc.training.loop import TrainOptions, _resume

    module = cnnc.compile(TEXT, opt_level=1)
    huge = tmp_path / "huge.npz"
    huge.write_bytes(zip_of({"c.weight.npy": npy_header((2**38,), "<f4")}))
    with pytest.raises(cnnc.CnncRuntimeError, match=r"cannot read weights from .*huge\.npz: .*"
                                                    r"limit"):
        module.load_weights(huge)
    with pytest.raises(cnnc.CnncError, match=r"cannot resume from .*huge\.npz"):
        _resume(module, np.random.default_rng(0), huge)
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_refusal(module, fifo)),
                              daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert outcome and "not a regular file" in outcome[0]
    with pytest.raises(cnnc.CnncRuntimeError, match="load_weights takes a path, got int"):
        module.load_weights(123)
    assert TrainOptions().resume is None


def _refusal(module, path) -> str:
    try:
        module.load_weights(path)
    except cnnc.CnncError as error:
        return str(error)
    return "loaded"


@pytest.mark.parametrize("lines, labels", [
    ("dense d: 3 -> softmax\nloss cross_entropy", True),
    ("dense d: 3\nloss mse", False),
    ("dense d: 3", False),
])
def test_takes_labels_follows_the_losss_target_tensor(lines, labels):
    module = cnnc.compile(f"network t\ninput: 4\n{lines}\n", opt_level=0)
    assert module.takes_labels is labels
