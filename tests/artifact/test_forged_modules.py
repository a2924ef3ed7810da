"""Forged module files: edited, then every hash computed again (tests/forge.py), so only the
checks of what the file means stand in the way. Each is refused with a CnncModuleError that
names the field, in both trust modes where the field is malformed, before any of its code
runs; trust="rebuild" ignores the stored code and computes what the original module does.

The oracle throughout is the original module: its outputs on a fixed batch."""

from __future__ import annotations

import json
import math
import random
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llvmlite.binding as llvm
import numpy as np
import pytest
from forge import forge, unpacked

import cnnc
from cnnc.backends.llvm.host import host_target, target_machine
from cnnc.backends.llvm.objects import pack_objects, unpack_objects
from cnnc.cli.main import main
from conftest import REPO

SMALL = ("network small\ninput: 1x6x6\nconv c: 3 3x3 -> relu\nmaxpool 2x2\n"
         "dense out: 3 -> softmax\nloss cross_entropy\ntrain sgd lr=0.1 momentum=0.9 seed=4\n")
# the same buffer table, index for index (only scratch names differ), other arithmetic
TANH = SMALL.replace("-> relu", "-> tanh")
X = np.random.default_rng(0).standard_normal((5, 1, 6, 6)).astype(np.float32)
Y = np.array([0, 1, 2, 0, 1])


@dataclass(frozen=True)
class Original:
    module: cnnc.Module
    path: Path
    data: bytes  # the file's bytes

    @property
    def output(self) -> np.ndarray:
        return self.module(X)


def _compiled(tmp_path_factory, text: str, name: str, **options: Any) -> Original:
    module = cnnc.compile(text, **options)
    path = tmp_path_factory.mktemp(name) / f"{name}.cnnm"
    module.save(path)
    return Original(module, path, path.read_bytes())


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Original:
    return _compiled(tmp_path_factory, SMALL, "small", opt_level=1)


@pytest.fixture(scope="module")
def tanh(tmp_path_factory) -> Original:
    return _compiled(tmp_path_factory, TANH, "tanh", opt_level=1)


@pytest.fixture(scope="module")
def small_cuda(tmp_path_factory) -> Original:
    return _compiled(tmp_path_factory, SMALL, "cuda", target="cuda")


def written(tmp_path: Path, data: bytes, name: str = "forged.cnnm") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def refusal(path: Path, trust: str = "code") -> str:
    """The message of the CnncModuleError loading `path` raises."""
    with pytest.raises(cnnc.CnncModuleError,
                       match=rf"cannot load .*{re.escape(path.name)}: ") as caught:
        cnnc.load(path, trust=trust)
    return str(caught.value)


def setter(*keys: str | int, value: Any = None, delete: bool = False):
    """An edit that sets (or deletes) manifest[keys[0]][keys[1]]..."""
    def edit(manifest: dict[str, Any]) -> None:
        record = manifest
        for key in keys[:-1]:
            record = record[key]
        if delete:
            del record[keys[-1]]
        else:
            record[keys[-1]] = value
    return edit


def test_the_forge_alone_changes_nothing(small, tmp_path):
    """Without this, every refusal below could be the forge's fault."""
    path = written(tmp_path, forge(small.data))
    for trust in ("code", "rebuild"):
        assert np.array_equal(cnnc.load(path, trust=trust)(X), small.output)


# -- the buffer table ------------------------------------------------------------------------
def _shape_forgeries(shape: list) -> dict[str, Any]:
    """Each way to lie about a buffer's shape: the sizes the code writes no longer fit."""
    sizes = [i for i, d in enumerate(shape) if d != "N"]

    def at_first(value: Any) -> list:
        return [value(d) if i == sizes[0] else d for i, d in enumerate(shape)]

    without_n = [d for d in shape if d != "N"]
    forgeries = {"grown": [*shape, 2] if not sizes else at_first(lambda d: d + 1),
                 "whole": None, "a string": "N",
                 "N last": [*without_n, "N"], "N first": ["N", *without_n]}
    if sizes:
        forgeries.update({"shrunk": at_first(lambda d: d - 1),
                          "negative": at_first(lambda d: -d), "float": at_first(float),
                          "string": at_first(str), "null": at_first(lambda d: None),
                          "list": at_first(lambda d: [d]), "bool": at_first(lambda d: True)})
    # as JSON: in Python, [3.0] == [3] and [True] == [1], the lies this is about
    return {kind: forged for kind, forged in forgeries.items()
            if json.dumps(forged) != json.dumps(shape)}


def test_every_buffer_with_a_forged_shape_is_refused(small, tmp_path):
    """Every buffer of the table, every kind of lie: a smaller or larger buffer than the code
    writes, a size of 4.0 or true (equal to 4 and 1 in Python), N moved. A malformed one is
    refused in both trust modes; a well-formed lie, by trust="code" (see the next test)."""
    for index, entry in enumerate(small.module.manifest["storage"]):
        for kind, shape in _shape_forgeries(entry["shape"]).items():
            path = written(tmp_path, forge(small.data, setter("storage", index, "shape",
                                                              value=shape)))
            message = refusal(path)
            assert "storage" in message, (entry["name"], kind, message)
            if "the manifest is malformed" in message:
                assert refusal(path, "rebuild") == message


def test_a_shrunk_buffer_is_refused_and_ignored_when_rebuilt(small, tmp_path):
    conv = next(i for i, e in enumerate(small.module.manifest["storage"]) if e["name"] == "c")
    path = written(tmp_path, forge(small.data, setter("storage", conv, "shape",
                                                      value=["N", 3, 4, 3])))
    assert "the manifest's storage does not match its stored program: buffer" in refusal(path)
    assert np.array_equal(cnnc.load(path, trust="rebuild")(X), small.output)


def _remove(index: int):
    return lambda manifest: manifest["storage"].pop(index)


def _add(manifest):
    manifest["storage"].append({"name": "extra", "role": "value", "dtype": "f32",
                                "shape": ["N", 1]})


@pytest.mark.parametrize("edit, field", [
    (_remove(5), "activations[0]"),  # c, a kernel's output
    (_remove(-1), "storage"),
    (_add, "storage"),
    (setter("storage", 5, "name", value="renamed"), "activations[0]"),
    (setter("storage", 5, "name", value="../c"), "storage[5].name"),
    (setter("storage", 5, "name", value="maxpool1"), "storage[6].name"),
    (setter("storage", 5, "role", value="param"), "the buffer c has the role param"),
    (setter("storage", 5, "role", value="scratch"), "activations[0]"),
    (setter("storage", 5, "role", value=7), "storage[5].role"),
    (setter("storage", 5, "dtype", value="f64"), "storage"),
    (setter("storage", 7, "dtype", value="f32"), "storage"),  # maxpool1.argmax is i32
    (setter("storage", 5, "dtype", value=None), "storage[5].dtype"),
    (setter("storage", 3, value="x"), "storage[3]"),
    (setter("storage", 3, "extra", value=1), "storage[3].extra"),
    (setter("storage", value={}), "storage"),
    (setter("storage", value=[]), "storage"),
    (setter("input", "shape", value=[1, 6, 5]), "storage[0].shape must be N and then input.shape"),
    (setter("input", "shape", value=[1, 6.0, 6]), "input.shape"),
    (setter("input", "shape", value=None), "input.shape"),
    (setter("input", "name", value="c"), "input.name"),
    (setter("output", "shape", value=[4]), "storage[9].shape"),
    (setter("output", "shape", value=[3.0]), "output.shape"),
    (setter("output", "name", value="c"), "storage[5].shape"),
    (setter("output", "name", value="nothing"), "output.name"),
    (setter("dtype", value="f64"), "dtype"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_buffer_table_forgeries_are_refused_naming_the_field(small, tmp_path, edit, field):
    path = written(tmp_path, forge(small.data, edit))
    assert field in refusal(path)


# -- entry points, kernels, activations, gradients, loss ------------------------------------
def _swap_entries(first: str, second: str):
    def edit(manifest):
        entries = manifest["entry_points"]
        entries[first], entries[second] = entries[second], entries[first]
    return edit


def _reversed(key: str):
    return lambda manifest: manifest[key].reverse()


@pytest.mark.parametrize("edit, field", [
    (setter("entry_points", "forward", value="c_conv_relu_maxpool_fwd"), "entry_points.forward"),
    (setter("entry_points", "forward", value="cnnc_train_step"), "entry_points"),
    (_swap_entries("forward", "loss"), "entry_points"),
    (setter("entry_points", "extra", value="cnnc_forward"), "entry_points.extra"),
    (setter("entry_points", "forward", delete=True), "entry_points.forward"),
    (setter("entry_points", "forward", value=3), "entry_points.forward"),
    (setter("entry_points", "forward", value=["cnnc_forward"]), "entry_points.forward"),
    (setter("entry_points", value=None), "entry_points"),
    (_reversed("kernels"), "kernels"),
    (setter("kernels", 0, value=7), "kernels"),
    (setter("kernels", value="c_conv_relu_maxpool_fwd"), "kernels"),
    (setter("kernels", value=None), "kernels"),
    (setter("kernels", delete=True), "kernels"),
    (lambda m: m["activations"].pop(), "activations"),
    (lambda m: m["activations"].append("c.weight"), "activations"),
    (setter("activations", value=None), "activations"),
    (setter("gradients", "c.bias", value="c.weight.grad"), "gradients"),
    (setter("gradients", "c.bias", value="nothing"), "gradients.c.bias"),
    (setter("gradients", "c.bias", delete=True), "gradients.c.bias"),
    (setter("gradients", value=[]), "gradients"),
    (setter("loss", "kind", value="mse"), "loss"),
    (setter("loss", "kind", value="hinge"), "loss.kind"),
    (setter("loss", "value", value="out"), "loss.value"),
    (setter("loss", value=None), "loss"),
    (setter("layers", value=None), "layers"),
    (lambda m: m["layers"].pop(), "layers"),
    (setter("layers", 1, "params", value=0), "layers"),
    (setter("unknown", value=1), "unknown"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_code_and_graph_forgeries_are_refused_naming_the_field(small, tmp_path, edit, field):
    path = written(tmp_path, forge(small.data, edit))
    assert field in refusal(path)


# -- the buffers that share memory (driver.memory) -------------------------------------------
def _merged_regions(role: str):
    """The first two regions of `role` made one: well-formed, but buffers live at once
    would share memory."""
    def edit(manifest):
        found = manifest["shared"][role]
        found[0:2] = [found[0] + found[1]]
    return edit


def _in_two_regions(manifest):
    """The first region's first buffer put in the second region too. (Which buffers share
    a region depends on the host's schedules, so the name is taken from the manifest.)"""
    found = manifest["shared"]["forward"]
    assert len(found) >= 2, found  # else this forges nothing
    found[1][0] = found[0][0]


@pytest.mark.parametrize("edit, field", [
    (setter("shared", "forward", 0, 0, value="c.weight"),
     "shared.forward[0][0] must be the name of a buffer of role value or scratch"),
    (setter("shared", "forward", 0, 0, value="input"), "shared.forward[0][0]"),
    (setter("shared", "forward", 0, 0, value="nothing"), "shared.forward[0][0]"),
    (setter("shared", "forward", 0, value="out.pre"), "shared.forward[0]"),
    (setter("shared", "forward", 1, value=["out.dense_fwd.tile", "out.pre"]),
     "shared.forward[1][0]"),
    (_in_two_regions, "shared.forward must be regions with no buffer in two of them"),
    (setter("shared", "forward", value=[]), "shared.forward"),
    (setter("shared", "forward", value=None), "shared.forward"),
    (setter("shared", "pack", value=[["out.pre", "c"]]), "shared.pack"),
    (setter("shared", "sideways", value=[["out.pre", "c"]]), "shared.sideways"),
    (setter("shared", value=[]), "shared"),
    (_merged_regions("gradients"), "the manifest's shared does not match its stored program"),
    (setter("shared", delete=True), "the manifest's shared does not match its stored program"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_shared_region_forgeries_are_refused_naming_the_field(small, tmp_path, edit, field):
    assert "shared" in small.module.manifest  # else this forges nothing
    path = written(tmp_path, forge(small.data, edit))
    assert field in refusal(path)
    if "does not match" in field:  # well-formed: rebuilt, it computes what the original does
        assert np.array_equal(cnnc.load(path, trust="rebuild")(X), small.output)


# -- the optimizer: every scalar reaches the native update -----------------------------------
@pytest.mark.parametrize("edit, field", [
    (setter("optimizer", "lr", value=None), "optimizer.lr"),
    (setter("optimizer", "lr", value=-1), "optimizer.lr"),
    (setter("optimizer", "lr", value=math.nan), "optimizer.lr"),
    (setter("optimizer", "lr", value=math.inf), "optimizer.lr"),  # 1e400 in JSON
    (setter("optimizer", "lr", value=10**400), "optimizer.lr"),
    (setter("optimizer", "lr", value="x"), "optimizer.lr"),
    (setter("optimizer", "lr", value=True), "optimizer.lr"),
    (setter("optimizer", "lr", delete=True), "optimizer.lr"),
    (setter("optimizer", "momentum", value=1.5), "optimizer.momentum"),
    (setter("optimizer", "momentum", value=-0.1), "optimizer.momentum"),
    (setter("optimizer", "batch", value=0), "optimizer.batch"),
    (setter("optimizer", "epochs", value=2.5), "optimizer.epochs"),
    (setter("optimizer", "seed", value=-1), "optimizer.seed"),
    (setter("optimizer", "tol", value=math.nan), "optimizer.tol"),
    (setter("optimizer", "kind", value="adam"), "optimizer.momentum"),  # not adam's
    (setter("optimizer", "kind", value="lbfgs"), "optimizer.kind"),
    (setter("optimizer", "beta1", value=0.9), "optimizer.beta1"),  # not sgd's
    (setter("optimizer", value=None), "optimizer"),
    (setter("optimizer", delete=True), "optimizer"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_malformed_optimizer_settings_are_refused_in_both_trust_modes(small, tmp_path, edit,
                                                                      field):
    path = written(tmp_path, forge(small.data, edit))
    for trust in ("code", "rebuild"):
        assert field in refusal(path, trust)


def test_an_optimizer_setting_other_than_the_programs_is_refused_or_ignored(small, tmp_path):
    path = written(tmp_path, forge(small.data, setter("optimizer", "lr", value=0.5)))
    assert "the manifest's optimizer does not match its stored program: optimizer.lr is " \
           "0.5 in the file, 0.1 from the program" in refusal(path)
    rebuilt = cnnc.load(path, trust="rebuild")
    assert rebuilt.optimizer["lr"] == 0.1
    reference = cnnc.load(small.path)
    assert rebuilt.train_step(X, Y) == reference.train_step(X, Y)
    assert all(np.array_equal(value, reference.params[name])
               for name, value in rebuilt.params.items())


# -- names that could be paths ---------------------------------------------------------------
def _training_data(folder: Path) -> Path:
    rng = np.random.default_rng(1)
    path = folder / "d.npz"
    np.savez(path, x=rng.standard_normal((12, 1, 6, 6)).astype(np.float32),
             y=rng.integers(0, 3, 12))
    return path


@pytest.mark.parametrize("name", ["../escaped", "ABSOLUTE"])
def test_a_network_name_that_is_a_path_is_refused_and_train_writes_nowhere(
        small, tmp_path, monkeypatch, capsys, name):
    outside = tmp_path / "outside"
    work = outside / "work"
    work.mkdir(parents=True)
    name = str(outside / "absolute") if name == "ABSOLUTE" else name
    path = written(work, forge(small.data, setter("network", value=name)))
    data = _training_data(work)
    for trust in ("code", "rebuild"):
        assert "network must be a network name" in refusal(path, trust)
    monkeypatch.chdir(work)
    before = sorted(tmp_path.rglob("*"))
    for rebuild in ([], ["--rebuild"]):
        code = main(["train", path.name, "--data", data.name, "--epochs", "1", "--no-progress",
                     *rebuild])
        assert code == 1 and "network must be a network name" in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before
    assert not list(outside.glob("*escaped*")) and not list(outside.glob("absolute*"))


# -- malformed fields through every command that reads a module file: exit 1, never 3 -----
CLI_FORGERIES = [
    (setter("target", "cpu", value=5), "target.cpu"),
    (setter("target", "features", value="avx"), "target.features"),
    (setter("target", "features", value=[None]), "target.features"),
    (setter("target", "triple", value=None), "target.triple"),
    (setter("target", "triple", value=""), "target.triple"),
    (setter("target", "kind", value="tpu"), "target.kind"),
    (setter("target", value=[]), "target"),
    (setter("target", delete=True), "target"),
    (setter("optimizer", delete=True), "optimizer"),
    (setter("optimizer", value="sgd"), "optimizer"),
    (setter("optimizer", "lr", value=None), "optimizer.lr"),
    (setter("kernels", value=None), "kernels"),
    (setter("kernels", value=[1, 2]), "kernels"),
    (setter("sections", "params", "length", value="x"), "sections.params"),
    (setter("sections", "params", "length", value=-1), "sections.params"),
]


@pytest.mark.parametrize("edit, field", CLI_FORGERIES,
                         ids=lambda value: value if isinstance(value, str) else None)
def test_a_malformed_field_is_exit_1_in_every_command(small, tmp_path, monkeypatch, capsys,
                                                      edit, field):
    monkeypatch.chdir(tmp_path)
    path = written(tmp_path, forge(small.data, edit))
    data = _training_data(tmp_path)
    small.module.save_weights(tmp_path / "w.npz")
    train = ["train", path.name, "--data", data.name, "--epochs", "1", "--no-progress"]
    evaluate = ["eval", path.name, "--data", data.name, "--weights", "w.npz"]
    for command in (["inspect", path.name], ["summary", path.name], train, evaluate,
                    [*train, "--rebuild"], [*evaluate, "--rebuild"]):
        assert main(command) == 1, command
        assert field in capsys.readouterr().err
    assert field in refusal(path)


def test_a_mistyped_target_is_exit_1_in_a_fresh_process(small, tmp_path):
    path = written(tmp_path, forge(small.data, setter("target", "cpu", value=5)))
    data = _training_data(tmp_path)
    for command in (["inspect", path.name],
                    ["train", path.name, "--data", data.name, "--no-progress"]):
        done = subprocess.run([sys.executable, "-m", "cnnc", *command], cwd=tmp_path,
                              capture_output=True, text=True, check=False)
        assert done.returncode == 1, done.stderr
        assert "target.cpu must be a CPU name" in done.stderr
        assert "Traceback" not in done.stderr


def test_a_module_for_another_machine_is_refused_and_moves_when_rebuilt(small, tmp_path):
    """Well-formed fields of another machine are no forgery: trust="code" cannot run its
    code here, trust="rebuild" compiles the program here."""
    here = host_target().triple.split("-")[0]
    other = "x86_64-unknown-linux-gnu" if here in ("aarch64", "arm64") else \
        "aarch64-unknown-linux-gnu"

    def other_machine(manifest):
        manifest["target"].update(triple=other, cpu="generic", features=["neon"])

    path = written(tmp_path, forge(small.data, other_machine))
    assert f"it was compiled for {other}" in refusal(path)
    assert np.array_equal(cnnc.load(path, trust="rebuild")(X), small.output)


# -- the section table and the sections ------------------------------------------------------
def _shifted(name: str | None, by: int):
    """Move a section (None: the first) by `by` bytes."""
    def edit(manifest):
        table = manifest["sections"]
        first = next(n for n, where in table.items() if where["offset"] == 0)
        table[name or first]["offset"] += by
    return edit


@pytest.mark.parametrize("edit, expected", [
    (setter("sections", "params", "length", value=-1), "sections.params"),
    (setter("sections", "params", "length", value=2**70), "the file is truncated"),
    (setter("sections", "params", "length", value=3.5), "sections.params"),
    (setter("sections", "params", "length", value="1290"), "sections.params"),
    (setter("sections", "params", "length", value=True), "sections.params"),
    (setter("sections", "params", "offset", value=-100), "sections.params"),
    (setter("sections", "params", "offset", value=1.5e300), "sections.params"),
    (setter("sections", "params", "sha256", value=None), "sections.params"),
    (setter("sections", "params", value=None), "sections.params"),
    (setter("sections", value=[]), "sections"),
    (setter("sections", delete=True), "sections"),
    (_shifted("params", 1), "section params starts at"),  # a gap before, an overlap after
    (_shifted(None, 1), "starts at 1, where the one before it ends at 0"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_a_forged_section_table_is_refused(small, tmp_path, edit, expected):
    path = written(tmp_path, forge(small.data, edit))
    for trust in ("code", "rebuild"):
        assert expected in refusal(path, trust)


def test_sections_that_do_not_tile_the_file_are_refused(small, tmp_path):
    trailing = written(tmp_path, forge(small.data) + b"\0", "trailing.cnnm")
    assert "the file has 1 byte after its last section" in refusal(trailing, "rebuild")
    extra = written(tmp_path, forge(small.data, sections={"extra": b"x"}), "extra.cnnm")
    assert "the section extra, which a cpu module does not have" in refusal(extra, "rebuild")


@pytest.mark.parametrize("program, expected", [
    (b"\xff\xfe network", "its stored program is not UTF-8 text"),
    (b"network x\n", "its stored program is not a valid program"),
    (b"", "its stored program is not a valid program"),
    (b" " * (16 * 2**20 + 1), "its stored program is too large"),
    (None, "the file lacks the sections program"),
], ids=["not UTF-8", "invalid", "empty", "huge", "missing"])
def test_a_stored_program_that_is_no_program_is_refused(small, tmp_path, program, expected):
    path = written(tmp_path, forge(small.data, sections={"program": program}))
    for trust in ("code", "rebuild"):
        assert expected in refusal(path, trust)


def test_another_valid_program_is_refused_with_this_manifest_and_rebuilt_as_itself(
        small, tanh, tmp_path):
    """trust="rebuild" makes the module the stored program says, whatever the manifest
    says: a consistent forgery is just another network, run as compiled code of its own."""
    path = written(tmp_path, forge(small.data, sections={"program": TANH.encode()}))
    assert "does not match its stored program" in refusal(path)
    rebuilt = cnnc.load(path, trust="rebuild")
    assert rebuilt.manifest["kernels"] == tanh.module.manifest["kernels"]
    reference = cnnc.load(tanh.path)
    reference.set_params(small.module.params)  # the file's parameters, which fit its program
    assert np.array_equal(rebuilt(X), reference(X))


def test_another_program_whose_parameters_do_not_fit_is_refused_when_rebuilt(small, tmp_path):
    wider = SMALL.replace("conv c: 3 3x3", "conv c: 4 3x3")
    path = written(tmp_path, forge(small.data, sections={"program": wider.encode()}))
    assert "the stored parameter c.weight has shape (3, 1, 3, 3)" in refusal(path, "rebuild")


@pytest.mark.parametrize("edit, field", [
    (setter("build", "machine", "vector_bits", value=10**9), "build.machine"),
    (setter("build", "machine", "registers", value=0), "build.machine"),
    (setter("build", "machine", "registers", value=32.0), "build.machine"),
    (setter("build", "machine", "l1_bytes", value=-1), "build.machine"),
    (setter("build", "machine", "l2_bytes", delete=True), "build.machine"),
    (setter("build", "machine", "extra", value=1), "build.machine"),
    (setter("build", "machine", value=None), "build.machine"),
    (setter("build", "scheduled", value="yes"), "build.scheduled"),
    (setter("build", "program", value=7), "build.program"),
    (setter("build", value=None), "build"),
    (setter("opt_level", value=7), "opt_level"),
    (setter("opt_level", value=-1), "opt_level"),
    (setter("opt_level", value="3"), "opt_level"),
    (setter("opt_level", value=True), "opt_level"),
    (setter("opt_level", value=3.0), "opt_level"),
    (setter("cnnc_version", value=None), "cnnc_version"),
    (setter("cnnc_version", value=1), "cnnc_version"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_absurd_build_settings_are_refused_in_both_trust_modes(small, tmp_path, edit, field):
    path = written(tmp_path, forge(small.data, edit))
    for trust in ("code", "rebuild"):
        assert field in refusal(path, trust)


def test_a_module_in_a_manifest_it_was_not_scheduled_for_is_refused(small, tmp_path):
    """Well-formed, but a buffer table (and, unscheduled, entry points: no weights to pack)
    the program gives on another machine model."""
    for edit, field in ((setter("build", "machine", "vector_bits", value=128), "storage"),
                        (setter("build", "scheduled", value=False), "entry_points")):
        path = written(tmp_path, forge(small.data, edit))
        assert f"the manifest's {field} does not match its stored program" in refusal(path)


# -- object code that is not what the program compiles to -----------------------------------
def _elf_with(obj: bytes, offset: int, value: bytes) -> bytes:
    return obj[:offset] + value + obj[offset + len(value):]


def _objects(original: Original) -> tuple[bytes, ...]:
    return tuple(unpack_objects(unpacked(original.data)[1]["object"]))


GARBAGE = {
    "empty": lambda objs: b"",
    "junk": lambda objs: b"\x7fELF" + bytes(100),
    "a junk object": lambda objs: pack_objects((b"junk",)),
    "zeros": lambda objs: pack_objects((bytes(1000),)),
    "truncated": lambda objs: pack_objects((objs[0][:200], *objs[1:])),
    "headers only": lambda objs: pack_objects((objs[0][:64] + bytes(len(objs[0]) - 64),)),
    "for i386": lambda objs: pack_objects((_elf_with(objs[0], 18, b"\x03\x00"), *objs[1:])),
    "sections outside": lambda objs: pack_objects(
        (_elf_with(objs[0], 0x28, (2**40).to_bytes(8, "little")), *objs[1:])),
}


LOAD_EACH = """
import sys
import cnnc

for path in sys.argv[1:]:
    try:
        cnnc.load(path)
        print(path, "loaded", flush=True)
    except cnnc.CnncError as error:
        print(path, " ".join(str(error).split()), flush=True)
"""


def test_garbage_object_code_is_refused_without_a_crash(small, tmp_path):
    """LLVM's object loader trusts the ELF tables (a table pointing outside the file was a
    SIGSEGV, an unknown relocation an abort): such files are refused before LLVM reads them.
    In a fresh process, where a crash is a signal and not the end of the test run."""
    paths = [written(tmp_path, forge(small.data, sections={"object": make(_objects(small))}),
                     f"garbage{number}.cnnm") for number, make in enumerate(GARBAGE.values())]
    none = written(tmp_path, forge(small.data, sections={"object": pack_objects(())}), "none.cnnm")
    done = subprocess.run([sys.executable, "-c", LOAD_EACH, *map(str, [*paths, none])],
                          capture_output=True, text=True, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.rstrip("\n").split("\n")
    assert len(lines) == len(GARBAGE) + 1, done.stdout
    for kind, line in zip(GARBAGE, lines[:-1], strict=True):
        assert "its object code does not load" in line, (kind, line)
    assert "its object code has no entry point 'cnnc_forward'" in lines[-1]


def test_garbage_object_code_is_ignored_when_rebuilt(small, tmp_path):
    path = written(tmp_path, forge(small.data, sections={"object": b"junk"}))
    assert np.array_equal(cnnc.load(path, trust="rebuild")(X), small.output)


def test_another_networks_object_code_runs_trusted_and_is_ignored_when_rebuilt(
        small, tanh, tmp_path):
    """The same buffer table with another network's code: nothing in the manifest can tell,
    so trust="code" runs that network (the risk the README states); trust="rebuild" runs
    the stored program's."""
    def layout(original: Original) -> list:
        return [(e["role"], e["dtype"], e["shape"]) for e in original.module.manifest["storage"]]

    assert layout(small) == layout(tanh)
    swapped = forge(small.data, sections={"object": unpacked(tanh.data)[1]["object"]})
    path = written(tmp_path, swapped)
    trusted = cnnc.load(path)
    reference = cnnc.load(tanh.path)
    reference.set_params(small.module.params)
    assert np.array_equal(trusted(X), reference(X))
    assert not np.array_equal(trusted(X), small.output)
    assert np.array_equal(cnnc.load(path, trust="rebuild")(X), small.output)


def test_a_consistent_forgery_of_the_build_record_is_trusted_like_the_code(small, tmp_path):
    """Another machine model and the buffer table the program gives for it: consistent, so
    trust="code" loads it, though the code was scheduled for wider vectors (its scratch
    buffers are larger than the table says). Like the code, the record of what it was built
    for is trusted (verify); trust="rebuild" computes what the original does."""
    from cnnc.diagnostics import Source
    from cnnc.driver.modules import plan_module
    from cnnc.driver.pipeline import front_end
    from cnnc.schedule.cost import Machine

    built_for = small.module.manifest["build"]["machine"]
    machine = dict(built_for, vector_bits=256 if built_for["vector_bits"] == 128 else 128)
    program = Source(SMALL)
    derived = plan_module(front_end(program), program, 1, True, Machine(**machine)).manifest
    table = [{k: e[k] for k in ("name", "role", "dtype", "shape")}
             for e in small.module.manifest["storage"]]
    assert derived["storage"] != table  # other scratch sizes: else this forges nothing

    def other_build(manifest):
        manifest["build"]["machine"], manifest["storage"] = machine, derived["storage"]
        manifest["shared"] = derived["shared"]  # the regions of that buffer table

    path = written(tmp_path, forge(small.data, other_build))
    cnnc.load(path)  # not called: its kernels would write past the scratch buffers
    assert np.array_equal(cnnc.load(path, trust="rebuild")(X), small.output)


def system_calling_objects(command: str, symbols: list[str]) -> bytes:
    """Object code whose every entry point calls libc's system(command) and returns."""
    text = command.encode() + b"\0"
    constant = "".join(f"\\{byte:02X}" for byte in text)
    array = f"[{len(text)} x i8]"
    functions = "".join(f"""
define void @{symbol}(i64 %n, i8** %buffers) {{
  %command = getelementptr {array}, {array}* @command, i64 0, i64 0
  %status = call i32 @system(i8* %command)
  ret void
}}""" for symbol in symbols)
    module = llvm.parse_assembly(f'target triple = "{host_target().triple}"\n'
                                 f'@command = private constant {array} c"{constant}"\n'
                                 f"declare i32 @system(i8*)\n{functions}")
    module.verify()
    return pack_objects((target_machine().emit_object(module),))


FORWARD_IN_DEFAULT_TRUST = """
import sys
import numpy as np, cnnc
cnnc.load(sys.argv[1])(np.zeros((1, 1, 6, 6), np.float32))
"""


def test_object_code_that_runs_a_shell_command(small, tmp_path):
    """Rebuilt, it never runs; trusted (the default), loading maps it without running it,
    and a forward pass runs it: what the README says of loading a file you did not build."""
    marker = tmp_path / "MARKER"
    symbols = list(small.module.manifest["entry_points"].values())
    evil = system_calling_objects(f"touch {shlex.quote(str(marker))}", symbols)
    path = written(tmp_path, forge(small.data, sections={"object": evil}))
    rebuilt = cnnc.load(path, trust="rebuild")
    assert np.array_equal(rebuilt(X), small.output)
    rebuilt.train_step(X, Y)
    assert not marker.exists()
    cnnc.load(path)  # maps the code: runs none of it
    assert not marker.exists()
    done = subprocess.run([sys.executable, "-c", FORWARD_IN_DEFAULT_TRUST, str(path)],
                          capture_output=True, text=True, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert marker.exists()


# -- cuda: the module's code is Python source ------------------------------------------------
def test_cuda_source_that_runs_python_is_refused_or_replaced(small_cuda, tmp_path):
    marker = tmp_path / "MARKER"
    source = unpacked(small_cuda.data)[1]["cuda"]
    evil = f"open({str(marker)!r}, 'w').close()\n".encode() + source
    path = written(tmp_path, forge(small_cuda.data, sections={"cuda": evil}))
    assert "its CUDA source is not what its program compiles to" in refusal(path)
    assert not marker.exists()
    rebuilt = cnnc.load(path, trust="rebuild")
    assert np.array_equal(rebuilt(X), small_cuda.output)
    assert not marker.exists()


def _launch(role: str, *keys: str | int, value: Any):
    return setter("entry_points", role, 0, *keys, value=value)


@pytest.mark.parametrize("edit, field", [
    (_launch("forward", "threads", 3, value=3), "entry_points"),
    (_launch("forward", "threads", 3, value=-4), "entry_points.forward"),
    (_launch("forward", "buffers", 0, value="nothing"), "entry_points.forward[0].buffers[0]"),
    (_launch("forward", "kernel", value="c_conv_relu_maxpool_fwd_1"), "entry_points"),
    (_launch("forward", "block_threads", value=10**6), "entry_points.forward"),
    (setter("entry_points", "forward", value="cnnc_forward"), "entry_points.forward"),
    (setter("build", "scheduled", value=True), "build.scheduled"),
    (setter("target", "cpu", value="skylake"), "target"),
    (setter("storage", 5, "shape", value=["N", 3, 4, 3]), "storage"),
    (setter("shared", value={"forward": [["c", "out.pre"]]}), "shared, which only a cpu"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_cuda_manifest_forgeries_are_refused(small_cuda, tmp_path, edit, field):
    path = written(tmp_path, forge(small_cuda.data, edit))
    assert field in refusal(path)


# -- the API ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path, trust, expected", [
    (123, "code", "load takes the path of a .cnnm file, got int"),
    (None, "code", "load takes the path of a .cnnm file, got NoneType"),
    (b"x.cnnm", "code", "got bytes"),
    ("x.cnnm", "nonsense", "trust must be 'code' or 'rebuild', got 'nonsense'"),
    ("x.cnnm", None, "trust must be 'code' or 'rebuild', got None"),
])
def test_load_refuses_arguments_of_the_wrong_kind(path, trust, expected):
    with pytest.raises(cnnc.CnncModuleError, match=expected):
        cnnc.load(path, trust=trust)


# -- property: random forgeries never crash, never mislead ----------------------------------
FORGE_WRITES = ("sections", "code_sha256")  # what the forge computes again after an edit


def _places(value: Any):
    """(container, key) of every value inside `value`, at any depth."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, inner in list(items):
        yield value, key
        if isinstance(inner, dict | list):
            yield from _places(inner)


def _tweaked(value: Any, rng: random.Random, others: list) -> Any:
    """A value of another type, range or meaning than `value`."""
    numeric = type(value) in (int, float)
    choices = [None, True, "N", "../x", [value], {"x": value}, json.dumps(value), math.nan,
               rng.choice(others)]
    if numeric:
        choices += [value + 1, value - 1, value * 100, -value, float(value) + 0.5]
    else:
        choices += [0, -1, 1.5, 2**40]
    return rng.choice(choices)


def random_edit(manifest: dict[str, Any], rng: random.Random) -> None:
    """One to three edits, each of a field drawn first (so that the long buffer table does
    not take most of them), then of a value anywhere inside it: changed, or removed."""
    for _ in range(rng.choice((1, 1, 2, 3))):
        fields = sorted(set(manifest) - set(FORGE_WRITES))
        top = rng.choice(fields)
        inner = manifest[top]
        places = [(manifest, top)] + (list(_places(inner)) if isinstance(inner, dict | list)
                                      else [])
        container, key = rng.choice(places)
        if rng.random() < 0.15:
            del container[key]
        else:
            everywhere = list(_places({k: manifest[k] for k in fields}))
            others = [c[k] for c, k in rng.sample(everywhere, 5)]
            container[key] = _tweaked(container[key], rng, others)


def flipped(blob: bytes, rng: random.Random) -> bytes:
    data = bytearray(blob)
    for _ in range(rng.choice((1, 2, 4))):
        index = rng.randrange(len(data))
        data[index] ^= 1 << rng.randrange(8)
    return bytes(data)


def random_forgeries(original: Original, folder: Path, seed: int = 20240611
                     ) -> list[tuple[str, str]]:
    """(path, trust) of each forged file: manifest edits and bit flips in the sections that
    hold no code (trust="code" runs the stored code as it is, see the README), and bit flips
    in the object code, which trust="rebuild" never runs."""
    rng = random.Random(seed)
    _, sections = unpacked(original.data)
    cases = []
    for number in range(64):
        path = folder / f"m{number:02d}.cnnm"
        if number % 4 == 3:
            name = rng.choice(("program", "params", "loops", "llvm_ir"))
            path.write_bytes(forge(original.data, sections={name: flipped(sections[name], rng)}))
        else:
            path.write_bytes(forge(original.data, lambda m: random_edit(m, rng)))
        cases.append((str(path), "code"))
    for number in range(4):
        path = folder / f"o{number}.cnnm"
        path.write_bytes(forge(original.data, sections={"object": flipped(sections["object"],
                                                                          rng)}))
        cases.append((str(path), "rebuild"))
    return cases


PROBE = """
import json, sys
import numpy as np
import cnnc

original, x, y = sys.argv[1], np.load(sys.argv[2]), np.load(sys.argv[3])
oracle = cnnc.load(original)

def computed(module):
    gradients, loss = module.gradients_and_loss(x, y)
    return [module(x), np.array(loss), *(gradients[name] for name in sorted(gradients))]

for path, trust in json.loads(sys.argv[4]):
    try:
        module = cnnc.load(path, trust=trust)
    except cnnc.CnncError as error:
        print(path, "refused:", " ".join(str(error).split()), flush=True)  # one line
        continue
    oracle.set_params(module.params)  # parameters are data: the oracle runs the file's
    same = all(np.array_equal(a, b, equal_nan=True)
               for a, b in zip(computed(module), computed(oracle), strict=True))
    print(path, "ok-identical" if same else "ok-different", flush=True)
"""


def test_random_forgeries_are_refused_or_compute_what_the_original_does(small, tmp_path):
    cases = random_forgeries(small, tmp_path)
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", Y)
    done = subprocess.run([sys.executable, "-c", PROBE, str(small.path), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy"), json.dumps(cases)], capture_output=True,
                          text=True, check=False, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # a signal is a negative code
    statuses = [line.split(" ", 1)[1] for line in done.stdout.rstrip("\n").split("\n")]
    assert len(statuses) == len(cases), done.stdout
    wrong = [s for s in statuses if s != "ok-identical" and not s.startswith("refused: error:")]
    assert not wrong, wrong
    # every hash is right (forge): a refusal for damage would mean the checks went unreached
    assert not [s for s in statuses if "(its hash does not match)" in s or "code hash" in s
                or "its checksum does not match" in s]
    assert sum(s.startswith("refused") for s in statuses) >= len(cases) // 2


def test_random_forgeries_are_exit_0_or_1_in_inspect_and_summary(small, tmp_path):
    cases = random_forgeries(small, tmp_path, seed=7)[:5]
    for path, _ in [(str(small.path), "code"), *cases]:
        for command in ("inspect", "summary"):
            done = subprocess.run([sys.executable, "-m", "cnnc", command, path],
                                  capture_output=True, text=True, check=False, cwd=REPO)
            assert done.returncode in (0, 1), (command, path, done.stderr)
            assert "Traceback" not in done.stderr and "internal error" not in done.stderr
            assert done.returncode == 0 or path != str(small.path)
