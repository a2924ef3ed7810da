"""Weights packed once (schedule.prepack, driver.packing): the pack entry point runs after
every change of the parameters or buffers, and never serves stale weights."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import cnnc
from cnnc.backends.target import host_cpu
from cnnc.driver.lowering import ENTRY_NAMES
from cnnc.driver.pipeline import Options, Stage, run
from cnnc.frontend.source import to_source
from cnnc.graph.ir import Role
from cnnc.loops.ir import Store, VecStore
from cnnc.loops.walk import walk_all
from cnnc.passes import reference

PLAIN = ("network p\ninput: 3x9x9\nconv c1: 10 3x3 pad=1 -> relu\nconv c2: 9 3x3 stride=2\n"
         "maxpool 2x2\ndense d: 5 -> softmax\nloss cross_entropy\n")
NORMED = ("network q\ninput: 3x8x8\nconv c1: 11 3x3 pad=1 bias=false\nbatchnorm bn1 -> relu\n"
          "conv c2: 6 3x3 stride=2 bias=false\nbatchnorm bn2 -> relu\ndense d: 4 -> softmax\n"
          "loss cross_entropy\n")


def _x(batch: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


def _expected(text: str, module: cnnc.Module, x: np.ndarray) -> np.ndarray:
    """The numpy reference with the module's current parameters and running statistics."""
    return reference.forward(cnnc.check(text), x, {**module.params, **module.buffers})


def _lowered(text: str):
    return run(to_source(text), Options(host_cpu(), scheduled=True), until=Stage.LOWER).lowered


@pytest.mark.parametrize("text", [PLAIN, NORMED])
def test_kernels_no_longer_write_what_the_pack_entry_fills(text):
    lowered = _lowered(text)
    packed = {t.name for t in lowered.storage if t.role is Role.PACKED}
    pack = lowered.entries[ENTRY_NAMES["pack"]]
    assert packed and pack
    by_name = dict(lowered.kernels)
    written_by_pack = {node.buffer for name in pack for f in by_name[name]
                       for node in walk_all(f.body) if isinstance(node, (Store, VecStore))}
    assert written_by_pack == packed
    for symbol, names in lowered.entries.items():
        if symbol == ENTRY_NAMES["pack"]:
            continue
        assert not set(names) & set(pack), symbol
        for name in names:
            stores = {node.buffer for f in by_name[name] for node in walk_all(f.body)
                      if isinstance(node, (Store, VecStore))}
            assert not stores & packed, (symbol, name)
    if text is NORMED:  # batch norm folded into the convolutions' weights, once
        assert {"c1.weight.folded", "c2.weight.folded"} <= packed


@pytest.mark.parametrize("text, shape", [(PLAIN, (3, 9, 9)), (NORMED, (3, 8, 8))])
def test_every_change_of_the_parameters_is_seen_by_the_next_forward(text, shape):
    module = cnnc.compile(text, cache=False)
    x, y = _x(4, shape), np.array([0, 1, 2, 3])
    np.testing.assert_allclose(module.forward(x), _expected(text, module, x), atol=1e-5)
    module.set_params({name: value * -0.7 for name, value in module.params.items()})
    np.testing.assert_allclose(module.forward(x), _expected(text, module, x), atol=1e-5)
    for _ in range(2):
        module.train_step(x, y, lr=0.1)  # parameters, and batch norm's running statistics
        np.testing.assert_allclose(module.forward(x), _expected(text, module, x), atol=1e-5)
    gradients = module.gradients(x, y)
    module.apply_gradients({name: g * 50 for name, g in gradients.items()}, lr=0.1)
    np.testing.assert_allclose(module.forward(x), _expected(text, module, x), atol=1e-5)
    loss = module.loss(x, y)
    probabilities = _expected(text, module, x)
    assert loss == pytest.approx(-np.mean(np.log(probabilities[np.arange(4), y])), rel=1e-4)


def test_threaded_training_steps_repack_between_steps():
    module = cnnc.compile(PLAIN, cache=False, threads=3)
    x, y = _x(24, (3, 9, 9), seed=1), np.arange(24) % 5
    for _ in range(3):
        module.train_step(x, y, lr=0.2)  # gradients in three slices, then the update
        np.testing.assert_allclose(module.forward(x), _expected(PLAIN, module, x), atol=1e-5)


def test_concurrent_forwards_after_set_params_all_see_the_new_weights():
    module = cnnc.compile(PLAIN, cache=False, threads=1)
    x = _x(2, (3, 9, 9), seed=2)
    module.forward(x)
    for round_ in range(3):
        module.set_params({name: value * 1.5 for name, value in module.params.items()})
        expected = _expected(PLAIN, module, x)
        results: list[np.ndarray] = []
        start = threading.Barrier(4)
        threads = [threading.Thread(target=_forward_after, args=(start, module, x, results))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(results) == 4, round_
        for result in results:
            np.testing.assert_allclose(result, expected, atol=1e-5)


def _forward_after(start: threading.Barrier, module: cnnc.Module, x: np.ndarray,
                   results: list[np.ndarray]) -> None:
    start.wait()
    results.append(module.forward(x))


def test_a_saved_module_and_a_weights_file_load_with_their_weights_packed(tmp_path):
    module = cnnc.compile(NORMED, cache=False)
    x, y = _x(3, (3, 8, 8), seed=3), np.array([0, 1, 3])
    module.train_step(x, y, lr=0.1)
    module.save(tmp_path / "q.cnnm")
    module.save_weights(tmp_path / "q.npz")
    loaded = cnnc.load(tmp_path / "q.cnnm")
    np.testing.assert_array_equal(loaded.forward(x), module.forward(x))
    fresh = cnnc.compile(NORMED, cache=False)
    fresh.forward(x)  # packed with the initial weights first
    fresh.load_weights(tmp_path / "q.npz")
    np.testing.assert_array_equal(fresh.forward(x), module.forward(x))


def test_the_packed_buffers_are_not_activations():
    module = cnnc.compile(NORMED, cache=False)
    names = set(module.activations(_x(1, (3, 8, 8))))
    assert "bn1" in names and not any(name.endswith(".folded") for name in names)
