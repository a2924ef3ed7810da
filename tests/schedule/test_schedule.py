"""Scheduled kernels against the plain loop nests and the reference interpreter: hypothesis
draws shapes, strides, pads, channel counts that are not whole vectors and batch sizes that
are not whole register blocks or thread counts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import assert_close, random_params
from programs import conv_programs

import cnnc
from cnnc.backends.llvm.objects import pack_objects, unpack_objects
from cnnc.backends.target import host_cpu
from cnnc.graph.ir import DType
from cnnc.passes import reference
from cnnc.passes.autodiff import differentiate
from cnnc.schedule.cost import Block, Machine, choose_block
from conftest import REPO

FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _run_all(module: cnnc.Module, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    values = {"output": module(x), "input gradient": module.input_gradient(x, y)}
    values.update(module.gradients(x, y))
    return values


def _expected(text: str, x: np.ndarray, y: np.ndarray, params) -> dict[str, np.ndarray]:
    graph = differentiate(cnnc.check(text))
    values = reference.run(graph, x, params, y)
    wanted = {"output": values[graph.output],
              "input gradient": values[dict(graph.gradients)[graph.input]]}
    wanted.update({name: values[g] for name, g in graph.gradients if name != graph.input})
    return wanted


def _check_schedules(text: str, batch: int) -> None:
    scheduled = cnnc.compile(text, opt_level=1, threads=1)
    plain = cnnc.compile(text, opt_level=1, threads=1, schedule=False)
    params = random_params(scheduled)
    plain.set_params(params)
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, *scheduled.input_shape)).astype(np.float32)
    y = rng.standard_normal((batch, *scheduled.output_shape)).astype(np.float32)
    want = _expected(text, x, y, params)
    got_scheduled, got_plain = _run_all(scheduled, x, y), _run_all(plain, x, y)
    for name, value in want.items():
        expected = value.reshape(got_scheduled[name].shape)
        assert_close(got_scheduled[name], expected, np.float32, f"scheduled {name}\n{text}")
        assert_close(got_plain[name], expected, np.float32, f"plain {name}\n{text}")


@FEW
@given(conv_programs(), st.integers(1, 7))
def test_scheduled_conv_and_dense_kernels_match_plain_loops_and_reference(text, batch):
    _check_schedules(text, batch)


@pytest.mark.parametrize("text", [
    # LeNet's small layers: 1 -> 6 and 6 -> 16 channels, 5x5, pooled
    "network a\ninput: 1x12x12\nconv c1: 6 5x5 -> relu\nmaxpool 2x2\n"
    "conv c3: 16 3x3 -> relu\nflatten\ndense d: 10\nloss mse\n",
    # whole vectors of channels, stride 2: four stride phases in the input gradient
    "network b\ninput: 16x9x9\nconv c: 16 3x3 stride=2 pad=1\nflatten\ndense d: 8\nloss mse\n",
    # a kernel smaller than its stride: some input positions get no gradient at all
    "network c\ninput: 3x8x8\nconv c: 9 1x1 stride=2\nflatten\ndense d: 5\nloss mse\n",
    "network d\ninput: 2x7x7\nconv c: 5 2x3 stride=3 pad=1\nflatten\ndense d: 17\nloss mse\n",
    # strides of two digits: phases (1, 11) and (11, 1) must not share a scratch buffer
    # (156 stride phases: half a minute to compile)
    pytest.param("network e\ninput: 1x36x29\nconv c: 3 24x16 stride=12x13\nflatten\ndense d: 2"
                 "\nloss mse\n", marks=pytest.mark.slow),
])
def test_named_schedule_corner_cases(text):
    _check_schedules(text, batch=5)


def test_float64_modules_are_scheduled_with_half_the_lanes():
    text = "network t\ninput: 3x6x6\nconv c: 7 3x3 pad=1\nflatten\ndense d: 5\nloss mse\n"
    module = cnnc.compile(text, dtype="f64", opt_level=1)
    plain = cnnc.compile(text, dtype="f64", opt_level=1, schedule=False)
    params = random_params(module)
    plain.set_params(params)
    x = np.random.default_rng(3).standard_normal((4, 3, 6, 6))
    y = np.random.default_rng(4).standard_normal((4, 5))
    np.testing.assert_allclose(module(x), plain(x), rtol=1e-12, atol=1e-12)
    for name, value in module.gradients(x, y).items():
        np.testing.assert_allclose(value, plain.gradients(x, y)[name], rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("batch", [1, 7, 13])
def test_thread_counts_one_two_three_agree(batch):
    text = ("network t\ninput: 2x10x10\nconv c: 9 3x3 pad=1 -> relu\nmaxpool 2x2\nflatten\n"
            "dense d: 4 -> softmax\nloss cross_entropy\ntrain sgd lr=0.1 momentum=0.9\n")
    modules = [cnnc.compile(text, opt_level=1, threads=t) for t in (1, 2, 3)]
    params = random_params(modules[0])
    for module in modules[1:]:
        module.set_params(params)
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch * 4, 2, 10, 10)).astype(np.float32)
    y = rng.integers(0, 4, batch * 4)
    outputs = [m(x) for m in modules]
    np.testing.assert_array_equal(outputs[0], outputs[1])  # samples are independent
    np.testing.assert_array_equal(outputs[0], outputs[2])
    gradients = [m.gradients(x, y) for m in modules]
    losses = [[m.train_step(x, y) for _ in range(3)] for m in modules]
    for other in (1, 2):
        for name in params:
            assert_close(gradients[other][name], gradients[0][name], np.float32, name)
            assert_close(modules[other].params[name], modules[0].params[name], np.float32, name)
        np.testing.assert_allclose(losses[other], losses[0], rtol=1e-5)


def test_threaded_training_step_equals_the_reference_step():
    """The weighted sum of the slices' gradients is the batch's gradient: one sgd step with
    three threads lands where the reference's full-batch gradient says."""
    text = ("network t\ninput: 1x6x6\nconv c: 3 3x3\nflatten\ndense d: 3 -> softmax\n"
            "loss cross_entropy\ntrain sgd lr=0.5\n")
    module = cnnc.compile(text, opt_level=1, threads=3)
    params = random_params(module)
    x = np.random.default_rng(1).standard_normal((14, 1, 6, 6)).astype(np.float32)
    y = np.random.default_rng(2).integers(0, 3, 14)
    graph = differentiate(cnnc.check(text))
    values = reference.run(graph, x, params, y)
    loss = module.train_step(x, y)
    np.testing.assert_allclose(loss, values[graph.loss], rtol=1e-5)
    for name, gradient in graph.gradients:
        if name in params:
            assert_close(module.params[name], params[name] - 0.5 * values[gradient],
                         np.float32, name)


def test_cost_model_keeps_half_the_registers_for_accumulators():
    machine = Machine(256, 16, 32 * 1024, 512 * 1024)
    for rows, channels in [(56, 64), (10, 16), (28, 6), (None, 120), (9, 64)]:
        block, score = choose_block(machine, DType.F32, rows, channels)
        assert block.lanes == 8
        assert block.rows * block.vectors <= 8
        assert 0 < score <= 1
    wide = Machine(512, 32, 48 * 1024, 1024 * 1024)
    block, _ = choose_block(wide, DType.F32, 56, 64)
    assert block.lanes == 16 and block.rows * block.vectors <= 16
    assert choose_block(wide, DType.F64, 56, 64)[0].lanes == 8


def test_a_reduction_that_loads_every_operand_afresh_may_use_most_registers():
    """fresh_operands: the block's accumulators, its vector loads, one broadcast and one
    spare fit the registers, with no more rows than half the registers (a block of one
    row: no more vectors than half the registers); where more
    accumulators than 8 estimate as well, the block has more (a 28-tile Winograd chunk of
    64 filters: 6 x 2, 12 accumulators)."""
    for machine in (Machine(256, 16, 32 * 1024, 512 * 1024),
                    Machine(512, 32, 48 * 1024, 1024 * 1024)):
        for rows, channels in [(28, 64), (56, 64), (10, 16), (7, 6), (None, 120), (1, 8)]:
            block, score = choose_block(machine, DType.F32, rows, channels,
                                        fresh_operands=True)
            if block.rows == 1:  # a row of vectors streamed: half the registers
                assert block.vectors <= machine.registers // 2
            else:
                assert block.rows * block.vectors + block.vectors + 2 <= machine.registers
                assert block.rows <= machine.registers // 2
            assert 0 < score <= 1
            _, kept_score = choose_block(machine, DType.F32, rows, channels)
            assert score >= kept_score - 1e-9  # every kept block is a candidate too
    avx2 = Machine(256, 16, 32 * 1024, 512 * 1024)
    assert choose_block(avx2, DType.F32, 28, 64, fresh_operands=True)[0] == Block(6, 2, 8)


def test_a_filter_gradient_tile_keeps_its_delta_rows_in_l1():
    """cost.filter_tile_rows: the tile's δ rows of every channel plus one input channel's
    rows fit half of L1, one row more would not, and a tile has at least PASS_MIN_STEPS
    positions whatever the channels."""
    import math

    from cnnc.schedule.cost import PASS_MIN_STEPS, filter_tile_rows

    machine = Machine(256, 16, 32 * 1024, 512 * 1024)
    for ow, channels, in_w, stride, kh in [(56, 64, 58, 1, 3), (32, 64, 66, 2, 3),
                                            (32, 16, 34, 1, 3), (8, 64, 10, 1, 3),
                                            (4, 960, 4, 1, 1), (14, 8, 16, 1, 3)]:
        rows = filter_tile_rows(machine, 4, ow, channels, in_w, stride, kh)

        def size(r: int) -> int:
            return (r * ow * channels + ((r - 1) * stride + kh) * in_w) * 4  # noqa: B023

        minimum = math.ceil(PASS_MIN_STEPS / ow)
        assert rows >= minimum
        if rows > minimum:
            assert size(rows) <= machine.l1_bytes // 2 < size(rows + 1)
    # W3: 56 columns of 64 channels are 14 KiB a row: one row a tile
    assert filter_tile_rows(machine, 4, 56, 64, 58, 1, 3) == 1


def test_a_channel_vector_tile_is_stored_a_channel_at_a_time():
    """The scatter of a block over output channels stores one channel's columns in turn
    (rows innermost), not one column's channels a plane apart; a block over output
    columns stores one channel's row of columns in turn (channels of the tile outermost)."""
    from cnnc.loops.ir import For
    from cnnc.passes.fuse import fuse
    from cnnc.schedule.apply import lower_blocked

    def inner_scatter_loops(function) -> set[str]:
        found: set[str] = set()

        def walk(stmts, parent):
            for stmt in stmts:
                if isinstance(stmt, For):
                    if parent in ("er", "ej") and stmt.var in ("er", "ej"):
                        found.add(stmt.var)
                    walk(stmt.body, stmt.var)
                elif hasattr(stmt, "body"):
                    walk(stmt.body, parent)
        walk(function.body, None)
        return found

    avx2 = Machine(256, 16, 32 * 1024, 512 * 1024, winograd=False)
    text = ("network t\ninput: 16x32x32\nconv c: 16 3x3 pad=1\n"
            "conv d: 32 3x3 stride=2 pad=1\nconv e: 2 3x3 pad=1\nloss mse\n")
    program = fuse(cnnc.check(text))
    lowered = {k.name: lower_blocked(k, program, avx2)
               for k in program.kernels if k.name in ("c_conv_fwd", "d_conv_fwd", "e_conv_fwd")}
    assert lowered["c_conv_fwd"].schedule.pattern == "correlation"
    assert lowered["d_conv_fwd"].schedule.pattern == "correlation over 4 stride phase(s)"
    assert lowered["e_conv_fwd"].schedule.pattern == "correlation over output width"
    assert inner_scatter_loops(lowered["c_conv_fwd"].function) == {"er"}
    assert inner_scatter_loops(lowered["d_conv_fwd"].function) == {"er"}
    assert inner_scatter_loops(lowered["e_conv_fwd"].function) == {"ej"}


def test_cost_model_prefers_blocks_without_waste():
    machine = Machine(256, 16, 32 * 1024, 512 * 1024)
    block, score = choose_block(machine, DType.F32, 56, 64)
    assert 56 % block.rows == 0 and 64 % block.width == 0 and score == 1.0
    # six channels fill six of eight lanes whatever the block: the estimate says so
    assert choose_block(machine, DType.F32, 28, 6)[1] <= 0.75


def test_host_cpu_reads_vector_width_and_caches():
    machine = host_cpu().machine
    assert machine.vector_bits in (128, 256, 512)
    assert machine.l1_bytes >= 16 * 1024 and machine.l2_bytes >= machine.l1_bytes


def test_object_files_pack_and_unpack():
    objects = (b"\x7fELF one", b"", b"\x7fELF three")
    assert unpack_objects(pack_objects(objects)) == list(objects)
    packed = pack_objects(objects)
    for damaged in (packed[:-1], packed + b"x", b"garbage", packed[:10]):
        with pytest.raises(ValueError):
            unpack_objects(damaged)


def test_block_width():
    assert Block(4, 2, 8).width == 16


def test_explain_schedule_names_every_scheduled_kernel_and_its_block(capsys, monkeypatch):

    from cnnc.cli.main import main

    monkeypatch.chdir(REPO)
    assert main(["compile", "examples/lenet.cnn", "--explain-schedule"]) == 0
    out = capsys.readouterr().out
    machine = host_cpu().machine
    assert f"{machine.vector_bits}-bit vectors, {machine.registers} vector registers" in out
    for kernel, pattern in [("c1_conv_relu_maxpool_fwd", "correlation"),
                            ("c3_conv_relu_maxpool_fwd", "correlation"),
                            ("c3_conv2d_grad_input_bwd", "correlation of δ"),
                            ("c3_conv2d_grad_weight_bwd", "filter gradient"),
                            ("f5_dense_relu_fwd", "matrix product"),
                            ("f5_dense_grad_weight_bwd", "matrix product")]:
        assert f"{kernel}: {pattern}" in out
    block, _ = choose_block(machine, DType.F32, 10, 16)  # c3: 10 output columns, 16 channels
    assert (f"register block {block.rows} x {block.vectors} vectors of {block.lanes}"
            in out.split("c3_conv_relu_maxpool_fwd")[1])
    assert "fused: max pool 2x2 stride 2x2 of each sample" in out.split("c3_conv_relu")[1]
    once = next(line for line in out.splitlines() if line.startswith("run once per change"))
    assert "c3_conv_relu_maxpool_fwd.pack" in once and "f5_dense_relu_fwd.pack" in once
    # LeNet-5's convolutions are too small to share a sample; only its bias gradients
    # (summed over the whole batch) share their channels, from a batch that pays for it
    sharing, kernel = [], ""
    for line in out.splitlines():
        kernel = line if not line.startswith(" ") else kernel
        if line.startswith("  parallel:") and "shares its" in line:
            sharing.append(kernel.split(":")[0])
    assert sharing and all(k.endswith("_bias_grad_bwd") for k in sharing), sharing
    assert main(["compile", "examples/lenet.cnn", "--explain-schedule", "--no-schedule"]) == 0
    assert "no kernel is scheduled" in capsys.readouterr().out


def test_no_schedule_module_gives_the_same_output(tmp_path, monkeypatch):

    from cnnc.cli.main import main

    monkeypatch.chdir(REPO)
    plain, scheduled = tmp_path / "plain.cnnm", tmp_path / "scheduled.cnnm"
    assert main(["compile", "examples/mlp.cnn", "-O1", "--no-schedule", "-o", str(plain)]) == 0
    assert main(["compile", "examples/mlp.cnn", "-O1", "-o", str(scheduled)]) == 0
    a, b = cnnc.load(plain), cnnc.load(scheduled)
    x = np.random.default_rng(0).standard_normal((9, *a.input_shape)).astype(np.float32)
    assert_close(b(x), a(x), np.float32, "mlp output")
    roles = [{t["role"] for t in m.manifest["storage"]} for m in (a, b)]
    assert "scratch" not in roles[0] and "scratch" in roles[1]  # packed copies: scheduled only


FEW_CHANNELS = ("network w\ninput: 3x7x19\nconv c: 2 3x3 pad=1 -> relu\nconv d: 3 1x4\n"
                "flatten\ndense e: 4\nloss mse\n")


# a 1x1 projection to few channels: a block over output columns with up to 12 accumulators
PROJECTION = ("network p\ninput: 20x6x32\nconv c: 12 1x1 -> relu\nconv d: 13 1x1\n"
              "loss mse\n")


def test_a_one_by_one_projection_over_output_width_matches_plain_loops_and_reference():
    from cnnc.passes.fuse import fuse
    from cnnc.schedule.apply import lower_blocked

    program = fuse(cnnc.check(PROJECTION))
    avx2 = Machine(256, 16, 32 * 1024, 512 * 1024)
    kernel = next(k for k in program.kernels if k.name == "c_conv_relu_fwd")
    schedule = lower_blocked(kernel, program, avx2).schedule
    assert schedule.pattern == "correlation over output width"
    assert schedule.block.rows * schedule.block.vectors > 8  # its one loop: fresh operands
    _check_schedules(PROJECTION, batch=3)


def test_few_output_channels_vectorize_over_output_width():
    """2 or 3 channels would fill 2 or 3 of 8 lanes; 17 or 16 columns fill most of them."""
    from cnnc.passes.fuse import fuse
    from cnnc.schedule.apply import lower_blocked

    program = fuse(differentiate(cnnc.check(FEW_CHANNELS)))
    avx2 = Machine(256, 16, 32 * 1024, 512 * 1024)
    patterns = {k.name: lower_blocked(k, program, avx2).schedule.pattern
                for k in program.kernels if k.name in ("c_conv_relu_fwd", "d_conv_fwd")}
    assert patterns == {"c_conv_relu_fwd": "correlation over output width",
                        "d_conv_fwd": "correlation over output width"}
    strided = fuse(cnnc.check(FEW_CHANNELS.replace("1x4", "1x4 stride=2")))
    kernel = next(k for k in strided.kernels if k.name == "d_conv_fwd")
    # strided: a block over output channels, over the stride phases (1x4 of stride 2: the
    # kernel's columns 0, 2 and 1, 3; its one row, phase 0)
    assert lower_blocked(kernel, strided, avx2).schedule.pattern == \
        "correlation over 2 stride phase(s)"


def test_width_schedule_matches_plain_loops_and_reference():
    _check_schedules(FEW_CHANNELS, batch=3)


def test_compiles_from_several_threads_at_once_finish_and_agree():
    """Compiling forks workers; a fork while another thread was inside llvmlite used to
    leave a child waiting forever on llvmlite's inherited lock."""
    import threading

    text = ("network t\ninput: 3x9x11\nconv c: 13 3x3 stride=2 pad=1 -> relu\nmaxpool 2x2\n"
            "flatten\ndense d: 5 -> softmax\nloss cross_entropy\n")
    x = np.random.default_rng(0).standard_normal((4, 3, 9, 11)).astype(np.float32)
    results: dict[int, np.ndarray] = {}

    def compile_and_run(k: int) -> None:
        for _ in range(2):
            module = cnnc.compile(text, opt_level=1)
            module.set_params(reference_params)
            results[k] = module(x)

    reference_params = random_params(cnnc.compile(text, opt_level=1))
    threads = [threading.Thread(target=compile_and_run, args=(k,), daemon=True)
               for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a compile never finished"
    graph = cnnc.check(text)
    expected = reference.forward(graph, x, reference_params)
    for k in range(3):
        assert_close(results[k], expected, np.float32, f"thread {k}")


def test_a_pool_shut_down_under_a_threaded_call_does_not_fail_it():
    """set_threads from another thread may shut the pool down while a call is handing out
    slices; the call then computes the slices itself."""
    text = "network t\ninput: 2x6x6\nconv c: 3 3x3\nflatten\ndense d: 4\n"
    module = cnnc.compile(text, opt_level=1, threads=2)
    x = np.random.default_rng(0).standard_normal((16, 2, 6, 6)).astype(np.float32)
    expected = module(x)
    module._engine.thread_pool().shutdown(wait=True)  # what a concurrent set_threads leaves behind
    np.testing.assert_array_equal(module(x), expected)


def test_a_short_reduction_is_blocked_over_output_columns():
    """cost.with_output_cost: a correlation over output channels stores its outputs one
    at a time; where each output has few FMAs (a 1x1 convolution of few channels), that
    decides for a block over output columns, and a long reduction leaves it unchanged."""
    from cnnc.schedule.cost import SCATTER_CYCLES, with_output_cost

    lanes = 16
    short, long = with_output_cost(1.0, 16, lanes, True), with_output_cost(1.0, 288, lanes, True)
    fma, fma_long = 16 / (lanes * 2), 288 / (lanes * 2)
    assert short == pytest.approx(fma / (fma + SCATTER_CYCLES))
    assert long == pytest.approx(fma_long / (fma_long + SCATTER_CYCLES))
    assert long > 0.95 > short
    assert with_output_cost(1.0, 16, lanes, False) == 1.0
    from cnnc.backends.target import named_target
    from cnnc.driver.pipeline import Build, Options, Stage, advance
    from cnnc.frontend.source import to_source

    text = ("network t\ninput: 16x32x32\nconv expand: 96 1x1 -> relu6\n"
            "conv wide: 32 3x3 pad=1 -> relu\n")
    # the direct correlations compared (Winograd would take the 3x3 layer)
    target = named_target(None, "x86-64-v4").with_winograd(False)
    lowered = advance(Build(to_source(text)), Options(target), Stage.LOWER).lowered
    patterns = {s.kernel.split("_")[0]: s.pattern for s in lowered.schedules}
    assert patterns == {"expand": "correlation over output width", "wide": "correlation"}
