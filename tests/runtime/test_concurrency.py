"""One module used from several threads: state-changing calls are serialised (no lost
updates), reads run together and stay correct, and a read never sees half a step."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import cnnc
from cnnc.runtime.locking import StateLock

TEXT = ("network t\ninput: 1x6x6\nconv c: 3 3x3 -> relu\nflatten\ndense out: 4 -> softmax\n"
        "loss cross_entropy\n")
OPTIMIZERS = {"sgd": "train sgd lr=0.05 momentum=0.9\n",
              "adam": "train adam lr=0.01\n"}


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((8, 1, 6, 6)).astype(np.float32), rng.integers(0, 4, 8)


def in_threads(count: int, work) -> None:
    """Run work(i) on `count` threads started together; re-raise the first failure."""
    barrier, failures = threading.Barrier(count), []

    def run(i: int) -> None:
        barrier.wait()
        try:
            work(i)
        except BaseException as error:  # reported on the main thread below
            failures.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_concurrent_train_steps_lose_no_update(optimizer):
    """20 steps on one batch from 4 threads equal 20 steps in a row: the same batch makes
    the order irrelevant, so any difference is a lost or torn update."""
    text = TEXT + OPTIMIZERS[optimizer]
    x, y = batch()
    serial = cnnc.compile(text, opt_level=1, threads=1)
    for _ in range(20):
        serial.train_step(x, y)
    shared = cnnc.compile(text, opt_level=1, threads=1)
    in_threads(4, lambda _: [shared.train_step(x, y) for _ in range(5)])
    assert int(shared.optimizer_state()["optimizer.step"]) == 20
    for name, value in serial.params.items():
        np.testing.assert_array_equal(shared.params[name], value, err_msg=name)


def test_concurrent_forwards_are_each_correct():
    module = cnnc.compile(TEXT, opt_level=1, threads=2)
    inputs = [np.random.default_rng(i).standard_normal((5 + i, 1, 6, 6)).astype(np.float32)
              for i in range(6)]
    expected = [module(x) for x in inputs]
    results: dict[int, list[np.ndarray]] = {i: [] for i in range(6)}
    in_threads(6, lambda i: results[i].extend(module(inputs[i]) for _ in range(10)))
    for i, outputs in results.items():
        for output in outputs:
            np.testing.assert_array_equal(output, expected[i])


def test_a_forward_never_sees_half_a_set_params():
    """Two parameter sets alternate while other threads run forward: every output is one
    of the two sets' outputs, never a mixture."""
    module = cnnc.compile(TEXT, opt_level=1, threads=1)
    x, _ = batch(3)
    first = module.params
    second = {name: value * -0.5 for name, value in first.items()}
    wanted = [module(x)]
    module.set_params(second)
    wanted.append(module(x))
    stop, seen = threading.Event(), []

    def writer() -> None:
        for i in range(60):
            module.set_params(first if i % 2 else second)
        stop.set()

    def reader() -> None:
        while not stop.is_set():
            seen.append(module(x))

    in_threads(3, lambda i: writer() if i == 0 else reader())
    assert seen
    for output in seen:
        assert any(np.array_equal(output, w) for w in wanted)


def test_state_lock_lets_readers_share_and_a_writer_nest():
    lock, inside = StateLock(), []
    with lock.writing(), lock.reading(), lock.writing():  # a writer's own calls pass
        inside.append("nested")
    both = threading.Barrier(2, timeout=5)

    def read(_: int) -> None:
        with lock.reading():
            both.wait()  # both readers inside at once, or this times out

    in_threads(2, read)
    assert inside == ["nested"]
