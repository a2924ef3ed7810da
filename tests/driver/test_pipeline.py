"""The build's one pass list: --emit shows what the module holds, a broken invariant after a
stage is an internal error that names the stage, and the CPU target is an argument."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest

import cnnc
from cnnc.backends.target import host_cpu
from cnnc.cli.main import EXIT_BROKEN_INVARIANT, EXIT_INTERNAL, EXIT_USAGE, EXIT_USER_ERROR
from cnnc.diagnostics import CnncInternalError, Source
from cnnc.driver.modules import compile_cuda_module, compile_module
from cnnc.driver.pipeline import Options, Stage, advance, front_end, run
from cnnc.schedule.cost import Machine
from conftest import run_cli

SMALL = ("network t\ninput: 1x6x6\nconv c: 2 3x3 -> relu\nmaxpool 2x2\nflatten\n"
         "dense d: 3 -> softmax\nloss cross_entropy\ntrain adam lr=0.01\n")
FIRST_KERNEL = "c_conv_relu_maxpool_fwd"


@pytest.fixture
def small(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.cnn").write_text(SMALL)
    return "small.cnn"


@pytest.mark.parametrize("flags", [[], ["--no-schedule"]], ids=["scheduled", "plain"])
def test_emit_loops_and_llvm_are_the_sections_of_the_module(capsys, small, flags):
    source = Source(SMALL, small)
    module = compile_module(front_end(source), source, 1, scheduled=not flags)
    code, loops, _ = run_cli(capsys, "compile", small, "--emit", "loops", "-O1", *flags)
    assert code == 0 and loops == module.sections["loops"].decode()
    assert "func d_weight_adam_update(" in loops and "func d_bias_adam_update(" in loops
    code, llvm_ir, _ = run_cli(capsys, "compile", small, "--emit", "llvm", "-O1", *flags)
    assert code == 0 and llvm_ir == module.sections["llvm_ir"].decode()
    for symbol in ("d_weight_adam_update", "cnnc_update", "cnnc_train_step"):
        assert f"@{symbol}(" in llvm_ir


def test_emit_loops_for_cuda_are_the_cuda_module_loops(capsys, small):
    source = Source(SMALL, small)
    module = compile_cuda_module(front_end(source), source)
    code, loops, _ = run_cli(capsys, "compile", small, "--target", "cuda", "--emit", "loops")
    assert code == 0 and loops == module.sections["loops"].decode()
    code, cuda, _ = run_cli(capsys, "compile", small, "--emit", "cuda")
    assert code == 0 and cuda == module.sections["cuda"].decode()


def test_run_stops_after_the_stage_asked_for_and_advance_goes_on():
    options = Options(host_cpu())
    build = run(Source(SMALL), options, until=Stage.FUSE)
    assert build.last is Stage.FUSE and build.kernels is not None and build.lowered is None
    assert build.differentiated is not None and build.differentiated.gradients
    lowered = advance(build, options, Stage.LOWER).lowered
    assert [f.name for f in lowered.functions][-2:] == ["d_weight_adam_update",
                                                        "d_bias_adam_update"]
    assert lowered.entries["cnnc_train_step"][-2:] == ["d_weight_adam_update",
                                                        "d_bias_adam_update"]


def test_the_syntax_tree_needs_no_valid_program(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.cnn").write_text("network t\ninput: 1x4x4\nconv c: 2 9x9\n")
    assert run_cli(capsys, "compile", "bad.cnn", "--emit", "ast")[0] == 0
    assert run_cli(capsys, "compile", "bad.cnn", "--emit", "ir")[0] == EXIT_USER_ERROR


def test_emit_grad_of_a_network_without_a_loss_line_is_autodiff_error(capsys, tmp_path,
                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.cnn").write_text("network f\ninput: 1x4x4\nflatten\ndense d: 2\n")
    code, out, err = run_cli(capsys, "compile", "f.cnn", "--emit", "grad")
    assert code == EXIT_USER_ERROR and out == ""
    assert "has no loss line, so there is nothing to differentiate" in err


# --- internal errors -------------------------------------------------------------------

def _fuse_reading_nowhere(monkeypatch) -> None:
    """fuse, with its first kernel reading a tensor that no one writes."""
    import cnnc.passes.fuse as fusing

    real = fusing.fuse

    def fuse(graph):
        program = real(graph)
        first = dataclasses.replace(program.kernels[0], inputs=("nowhere",))
        return dataclasses.replace(program, kernels=(first, *program.kernels[1:]))

    monkeypatch.setattr(fusing, "fuse", fuse)


FUSE_MESSAGE = (f"internal error in stage fuse: kernel {FIRST_KERNEL} reads nowhere before "
                "it is written; please report it")


def test_a_broken_kernel_program_is_an_internal_error_naming_fuse(monkeypatch):
    _fuse_reading_nowhere(monkeypatch)
    with pytest.raises(CnncInternalError) as caught:
        cnnc.compile(SMALL)
    assert str(caught.value) == f"error: {FUSE_MESSAGE}"
    with pytest.raises(CnncInternalError, match="stage fuse"):
        cnnc.compile(SMALL, target="cuda")


def test_the_command_exits_70_without_a_traceback(capsys, small, monkeypatch):
    _fuse_reading_nowhere(monkeypatch)
    assert len({EXIT_BROKEN_INVARIANT, EXIT_INTERNAL, EXIT_USAGE, EXIT_USER_ERROR}) == 4
    for argv in (["--emit", "kernels"], ["--emit", "loops"], ["--explain-schedule"], []):
        code, out, err = run_cli(capsys, "compile", small, *argv)
        assert (code, out, err) == (EXIT_BROKEN_INVARIANT, "", f"error: {FUSE_MESSAGE}\n")


def test_a_broken_graph_after_autodiff_names_autodiff(monkeypatch):
    import cnnc.passes.autodiff as autodiff

    real = autodiff.differentiate

    def differentiate(graph):
        done = real(graph)
        return dataclasses.replace(done, tensors=(*done.tensors, done.tensors[0]))

    monkeypatch.setattr(autodiff, "differentiate", differentiate)
    with pytest.raises(CnncInternalError, match=r"^error: internal error in stage autodiff: "
                                                r"duplicate tensor names .*; please report it$"):
        run(Source(SMALL), Options(), until=Stage.FUSE)


def test_an_assertion_inside_a_pass_names_that_pass(monkeypatch):
    import cnnc.loops.lower as lowering

    def lower_kernel(kernel, program):
        raise AssertionError(f"no lowering for {kernel.name}")

    monkeypatch.setattr(lowering, "lower_kernel", lower_kernel)
    with pytest.raises(CnncInternalError) as caught:
        run(Source(SMALL), Options(host_cpu(), scheduled=False), until=Stage.LOWER)
    assert caught.value.diagnostics[0].message == (
        f"internal error in stage lower: no lowering for {FIRST_KERNEL}; please report it")


def test_every_loop_function_goes_through_the_loop_verifier(monkeypatch):
    seen = []

    def verify_function(function):
        seen.append(function.name)
        if function.name.endswith("_update"):
            raise AssertionError(f"{function.name} is broken")

    fake = types.ModuleType("cnnc.loops.verify")
    fake.verify_function = verify_function
    monkeypatch.setitem(sys.modules, "cnnc.loops.verify", fake)
    with pytest.raises(CnncInternalError, match="stage lower: c_weight_adam_update is broken"):
        run(Source(SMALL), Options(host_cpu()), until=Stage.LOWER)
    assert seen[0] == FIRST_KERNEL and seen[-1] == "c_weight_adam_update"


# --- the target ------------------------------------------------------------------------

def test_the_schedule_is_made_for_the_target_machine():
    narrow = Machine(128, 16, 32 * 1024, 512 * 1024)
    target = host_cpu().with_machine(narrow)
    module = run(Source(SMALL), Options(target, opt_level=0)).module
    assert module.manifest["build"]["machine"] == narrow.record()
    assert module.manifest["target"]["triple"] == target.triple


def test_a_build_for_the_cpu_without_a_target_says_so():
    with pytest.raises(ValueError, match=r"needs options\.target"):
        run(Source(SMALL), Options(), until=Stage.LOWER)
