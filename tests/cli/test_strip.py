"""`cnnc compile --strip`: a module file without its LLVM IR and loop IR, which loads, runs,
trains and rebuilds as the whole file does; and `cnnc inspect` saying what a file lacks."""

from __future__ import annotations

import contextlib
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from synthetic import SMALL, synthetic

import cnnc
from cnnc.artifact import format as artifact
from cnnc.artifact.summary import human_bytes
from cnnc.cli.main import main
from conftest import EXAMPLES, run_cli

HEADER = struct.Struct("<8sIQ32s")  # magic, format version, manifest length, its SHA-256
LEFT_OUT = {"cpu": {"llvm_ir", "loops"}, "cuda": {"loops"}}
PROGRAMS = {"lenet": (EXAMPLES / "lenet.cnn").read_text(), "small": SMALL}


def body_size(data: bytes) -> int:
    """The bytes after the header and manifest, read from the header itself."""
    _, _, manifest_length, _ = HEADER.unpack_from(data)
    return len(data) - HEADER.size - manifest_length


def compiled(folder: Path, name: str, *flags: str) -> tuple[Path, str]:
    """NAME.cnn compiled by the command (in this process) with these flags: the file and
    the "wrote" line."""
    program = folder / f"{name}.cnn"
    program.write_text(PROGRAMS[name])
    suffix = "".join(flag.strip("-") for flag in flags)
    output = folder / f"{name}-{suffix}.cnnm"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["compile", str(program), "-o", str(output), *flags]) == 0
    return output, printed.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, Path, str]]:
    """(network, target) -> (whole file, stripped file, the stripped compile's line)."""
    folder = tmp_path_factory.mktemp("strip")
    made = {}
    for name, target in (("lenet", "cpu"), ("small", "cpu"), ("small", "cuda")):
        whole, _ = compiled(folder, name, "--target", target)
        stripped, line = compiled(folder, name, "--target", target, "--strip")
        made[name, target] = whole, stripped, line
    return made


CASES = [("lenet", "cpu"), ("small", "cpu"), ("small", "cuda")]


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(case))
def test_stripped_file_lacks_the_ir_sections_and_keeps_the_rest_byte_for_byte(files, case):
    whole_path, stripped_path = files[case][:2]
    whole, stripped = artifact.read(whole_path), artifact.read(stripped_path)
    assert set(stripped.sections) == set(whole.sections) - LEFT_OUT[case[1]]
    assert LEFT_OUT[case[1]] <= set(whole.sections)
    for name, blob in stripped.sections.items():
        assert blob == whole.sections[name], name
    drop = ("sections",)  # the section table differs; every other field is the same
    assert {k: v for k, v in stripped.manifest.items() if k not in drop} == \
        {k: v for k, v in whole.manifest.items() if k not in drop}


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(case))
def test_stripped_file_is_smaller_by_exactly_the_removed_sections(files, case):
    whole_path, stripped_path, line = files[case]
    whole_data, stripped_data = whole_path.read_bytes(), stripped_path.read_bytes()
    removed = sum(len(artifact.read(whole_path).sections[name]) for name in LEFT_OUT[case[1]])
    assert body_size(stripped_data) == body_size(whole_data) - removed
    if case == ("lenet", "cpu"):  # most of LeNet-5's file is its LLVM IR and loop IR
        assert len(stripped_data) < 0.25 * len(whole_data)
    shown = human_bytes(stripped_path.stat().st_size)
    left_out = "no LLVM IR, no loop IR" if case[1] == "cpu" else "no loop IR"
    assert line.startswith(f"wrote {stripped_path} (stripped: {left_out}; {shown}): network ")


@pytest.mark.parametrize("case", [("lenet", "cpu"), ("small", "cpu")],
                         ids=lambda case: "-".join(case))
def test_stripped_module_computes_bit_for_bit_what_the_whole_one_does(files, case):
    whole_path, stripped_path = files[case][:2]
    whole, stripped = cnnc.load(whole_path), cnnc.load(stripped_path)
    x = np.random.default_rng(7).standard_normal((4, *whole.input_shape)).astype(np.float32)
    assert np.array_equal(stripped.forward(x), whole.forward(x))
    y = np.random.default_rng(8).integers(0, whole.output_shape[0], 4)
    want, want_loss = whole.gradients_and_loss(x, y)
    have, have_loss = stripped.gradients_and_loss(x, y)
    assert have_loss == want_loss and have.keys() == want.keys()
    for name in want:
        assert np.array_equal(have[name], want[name]), name


def test_stripped_module_trains_and_rebuilds(files, tmp_path):
    whole_path, stripped_path = files["small", "cpu"][:2]
    data = synthetic(8, 3)
    whole, stripped = cnnc.load(whole_path), cnnc.load(stripped_path)
    for _ in range(2):
        assert stripped.train_step(data.x, data.y) == whole.train_step(data.x, data.y)
    for name, value in whole.params.items():
        assert np.array_equal(stripped.params[name], value), name
    rebuilt = cnnc.load(stripped_path, trust="rebuild")  # compiles the stored program again
    fresh = cnnc.load(whole_path)
    assert np.array_equal(rebuilt.forward(data.x), fresh.forward(data.x))


def test_stripped_cuda_module_loads_and_runs(files):
    whole_path, stripped_path = files["small", "cuda"][:2]
    x = synthetic(3, 5).x
    assert np.array_equal(cnnc.load(stripped_path).forward(x), cnnc.load(whole_path).forward(x))


def test_inspect_names_what_a_stripped_file_lacks_and_each_section_share(capsys, files):
    whole_path, stripped_path = files["lenet", "cpu"][:2]
    for path, stripped in ((whole_path, False), (stripped_path, True)):
        code, out, err = run_cli(capsys, "inspect", str(path))
        assert code == 0 and err == ""
        size = path.stat().st_size
        assert f"  sections ({size:,} bytes in all, {size - body_size(path.read_bytes()):,} of " \
               "them the header and manifest):" in out
        for name, blob in artifact.read(path).sections.items():
            share = 100 * len(blob) / size
            shown = f"{share:.1f}%" if share >= 0.05 else "under 0.1%"
            assert f"\n    {name}: {len(blob):,} bytes ({shown})\n" in out
        has_ir = ("    llvm_ir: " in out, "    loops: " in out)
        assert has_ir == ((False, False) if stripped else (True, True))
        note = "  stripped: no LLVM IR, no loop IR (cnnc compile --strip)\n"
        assert (note in out) == stripped
        ir = "" if stripped else "LLVM IR, loop IR, "
        assert f"  holds    native object code, {ir}parameters, the program it was compiled " \
               "from\n" in out


def test_inspect_of_stripped_cuda_file_names_the_loop_ir(capsys, files):
    code, out, _ = run_cli(capsys, "inspect", str(files["small", "cuda"][1]))
    assert code == 0 and "  stripped: no loop IR (cnnc compile --strip)\n" in out
    assert "  holds    CUDA kernel source, parameters, the program it was compiled from\n" in out


@pytest.mark.parametrize("case, flag, what", [
    (("lenet", "cpu"), "--llvm", "LLVM IR"), (("small", "cpu"), "--loops", "loop IR"),
    (("small", "cuda"), "--loops", "loop IR")], ids=["lenet-llvm", "small-loops", "cuda-loops"])
def test_inspect_of_a_stripped_section_is_a_one_line_input_error(capsys, files, case, flag,
                                                                 what):
    whole_path, stripped_path = files[case][:2]
    code, out, err = run_cli(capsys, "inspect", str(stripped_path), flag)
    assert code == 1 and out == ""
    assert err == (f"error: {stripped_path} holds no {what}: it was compiled with --strip "
                   "(compile the program again without --strip to keep it)\n")
    code, out, _ = run_cli(capsys, "inspect", str(whole_path), flag)  # the whole file has it
    section = "llvm_ir" if flag == "--llvm" else "loops"
    assert code == 0 and out == artifact.read(whole_path).sections[section].decode()


def test_inspect_llvm_of_a_stripped_cuda_file_says_it_is_a_cuda_module(capsys, files):
    path = files["small", "cuda"][1]
    code, _, err = run_cli(capsys, "inspect", str(path), "--llvm")
    assert code == 1 and err == f"error: {path} is a cuda module and holds no LLVM IR\n"


@pytest.mark.parametrize("flags, shown", [
    (["--emit", "loops"], "--emit loops"), (["--emit", "ast"], "--emit ast"),
    (["--explain-schedule"], "--explain-schedule")])
def test_strip_with_emit_or_explain_schedule_is_a_usage_error(capsys, tmp_path, flags, shown):
    program = tmp_path / "small.cnn"
    program.write_text(SMALL)
    output = tmp_path / "out.txt"
    code, out, err = run_cli(capsys, "compile", str(program), "--strip", *flags, "-o",
                             str(output))
    assert code == 2 and out == "" and not output.exists()
    assert err == f"error: --strip is for module files; {shown} writes no module file\n"


def test_the_compile_cache_keeps_whole_files(capsys, tmp_path, monkeypatch):
    """monkeypatch: an empty cache of this test's own (conftest)."""
    program = tmp_path / "small.cnn"
    program.write_text(SMALL)
    stripped, whole = tmp_path / "s.cnnm", tmp_path / "w.cnnm"
    code, out, _ = run_cli(capsys, "compile", str(program), "--strip", "-o", str(stripped))
    assert code == 0 and "from the compile cache" not in out
    code, out, _ = run_cli(capsys, "compile", str(program), "-o", str(whole))
    assert code == 0 and "from the compile cache" in out
    assert {"llvm_ir", "loops"} <= set(artifact.read(whole).sections)
    assert not {"llvm_ir", "loops"} & set(artifact.read(stripped).sections)


def section_span(data: bytes, name: str) -> tuple[int, int]:
    """Where a section's bytes are in the file, from its own header and section table."""
    _, _, length, _ = HEADER.unpack_from(data)
    where = json.loads(data[HEADER.size:HEADER.size + length])["sections"][name]
    start = HEADER.size + length + where["offset"]
    return start, start + where["length"]


def test_a_damaged_optional_section_is_still_refused(files, tmp_path):
    data = bytearray(files["small", "cpu"][0].read_bytes())
    start, end = section_span(bytes(data), "llvm_ir")
    data[(start + end) // 2] ^= 1
    damaged = tmp_path / "damaged.cnnm"
    damaged.write_bytes(bytes(data))
    with pytest.raises(cnnc.CnncModuleError, match="section llvm_ir was changed or damaged"):
        cnnc.load(damaged)


def test_a_cuda_file_with_llvm_ir_is_still_refused(files, tmp_path):
    module = artifact.read(files["small", "cuda"][1])
    manifest = {k: v for k, v in module.manifest.items() if k != "sections"}
    forged = artifact.ModuleFile(manifest, dict(module.sections, llvm_ir=b"define void @f()"))
    path = tmp_path / "forged.cnnm"
    artifact.write(forged, path)
    with pytest.raises(cnnc.CnncModuleError,
                       match="the section llvm_ir, which a cuda module does not have"):
        artifact.read(path)
