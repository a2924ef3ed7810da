"""Parallel loops (loops.ir.For, PARALLEL) in generated CPU code, run on a thread team
(backends.llvm.team) of 0-2 helper threads, against numpy: collapsed loops, private scratch
and locals, a team whose helper never comes, helpers that come after the call."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from cnnc.backends.llvm.codegen import compile_functions
from cnnc.backends.target import host_cpu
from cnnc.graph.ir import BATCH, DType
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Buffer,
    Const,
    For,
    Load,
    Local,
    LoopFunction,
    LoopKind,
    Store,
    Var,
)
from cnnc.loops.verify import verify_function
from cnnc.runtime import team as layout
from cnnc.runtime.loader import native_entries_from_object, team_worker

ROWS, COLS = 37, 23
F32 = DType.F32


def _kernel() -> LoopFunction:
    """out[n, i, j] = 2·x[n, i, j] + 1 + (i + j), through a private row and a local: each
    (i, j) writes tmp[j] and reads it back, so shared scratch would race."""
    x = Buffer("x", (BATCH, ROWS, COLS), F32)
    out = Buffer("out", (BATCH, ROWS, COLS), F32, is_output=True)
    tmp = Buffer("tmp", (COLS,), F32, is_output=True)
    at = (Var("n"), Var("i"), Var("j"))
    body = (
        Assign("acc", Binary(BinOp.MUL, Load("x", at), Const(2.0, True))),
        Store("tmp", (Var("j"),), Binary(BinOp.ADD, Var("acc"), Const(1.0, True))),
        Assign("acc", Load("tmp", (Var("j"),))),
        Store("out", at, Binary(BinOp.ADD, Var("acc"), Load("offset", (Var("i"), Var("j"))))),
    )
    offset = Buffer("offset", (ROWS, COLS), F32)
    inner = For("j", Const(COLS, False), body, LoopKind.PARALLEL)
    rows = For("i", Const(ROWS, False), (inner,), LoopKind.PARALLEL, ("tmp",))
    return LoopFunction("k", (x, offset, out, tmp), (Local("acc", F32),),
                        (For("n", Var(BATCH), (rows,)),))


@pytest.fixture(scope="module")
def native():
    function = _kernel()
    verify_function(function)
    code = compile_functions((function,), ["x", "offset", "out", "tmp"], 3,
                             {"run": ["k"]}, target=host_cpu())
    entries, engine = native_entries_from_object(code.object_code, ["run"])
    worker = team_worker(engine)
    assert worker is not None
    yield entries["run"], worker
    del engine


def _call(native, batch: int, helpers: int, come: bool = True, late: bool = False):
    run, worker = native
    rng = np.random.default_rng(batch + helpers)
    x = rng.standard_normal((batch, ROWS, COLS)).astype(np.float32)
    offset = np.add.outer(np.arange(ROWS), np.arange(COLS)).astype(np.float32)
    out = np.full_like(x, np.nan)
    tmp = np.zeros(COLS, np.float32)
    block = np.zeros(layout.TEAM_WORDS, np.int64)
    block[layout.WANTED], block[layout.JOINED] = helpers, -1
    threads = [threading.Thread(target=worker, args=(block.ctypes.data,))
               for _ in range(helpers if come else 0)]
    if not late:
        for thread in threads:
            thread.start()
    team = block.ctypes.data if helpers or not come else None
    table = (ctypes.c_void_p * 5)(x.ctypes.data, offset.ctypes.data, out.ctypes.data,
                                  tmp.ctypes.data, team)
    run(batch, table)
    for thread in threads:
        if late:
            thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive(), "a helper did not leave at the end of the call"
    np.testing.assert_array_equal(out, 2 * x + 1 + offset)
    return block


@pytest.mark.parametrize("helpers", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_team_computes_what_one_thread_does(native, batch, helpers):
    block = _call(native, batch, helpers)
    if helpers:  # every helper that was asked for and started in time took part
        assert 0 <= block[layout.JOINED] <= helpers
        assert block[layout.EPOCH] == (batch if block[layout.JOINED] else 0)


def test_no_team_runs_every_loop_on_the_calling_thread(native):
    _call(native, 2, 0)


def test_a_helper_that_never_comes_is_not_waited_for(native):
    block = _call(native, 2, 1, come=False)
    assert block[layout.JOINED] == 0


def test_helpers_that_come_after_the_call_leave_at_once(native):
    block = _call(native, 2, 2, late=True)
    assert block[layout.STOP] == 1


def test_the_verifier_refuses_nested_parallel_loops_and_shared_private_buffers():
    good = _kernel()
    rows = good.body[0].body[0]
    nested = For("i", Const(ROWS, False), (rows.body[0], For("k", Const(2, False), (
        For("m", Const(2, False), (), LoopKind.PARALLEL),))), LoopKind.PARALLEL)
    with pytest.raises(AssertionError, match="nested in another"):
        verify_function(LoopFunction("k", good.buffers, good.locals,
                                     (For("n", Var(BATCH), (nested,)),)))
    shared = For("i", Const(ROWS, False), rows.body, LoopKind.PARALLEL, ("x",))
    with pytest.raises(AssertionError, match="private buffer x"):
        verify_function(LoopFunction("k", good.buffers, good.locals,
                                     (For("n", Var(BATCH), (shared,)),)))
    serial = For("i", Const(ROWS, False), rows.body, LoopKind.SERIAL, ("tmp",))
    with pytest.raises(AssertionError, match="not parallel"):
        verify_function(LoopFunction("k", good.buffers, good.locals,
                                     (For("n", Var(BATCH), (serial,)),)))
