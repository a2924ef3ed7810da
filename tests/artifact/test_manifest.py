"""The typed manifest (artifact.manifest): the same JSON back, key for key and type for type,
for every example on both targets, with and without a loss line, made in memory or read
from a file; and the file format's own limits (artifact.checks) agree with the language's."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import cnnc
from cnnc.artifact import checks
from cnnc.artifact import format as artifact
from cnnc.artifact.manifest import Manifest
from cnnc.artifact.summary import from_manifest
from cnnc.diagnostics import Source
from cnnc.driver.modules import compile_cuda_module, compile_module
from cnnc.driver.pipeline import front_end
from cnnc.frontend import options as opts
from cnnc.frontend.irgen import MAX_NAME
from cnnc.graph.ir import DType, Role
from cnnc.ops import registry
from cnnc.passes.summary import summarize
from conftest import EXAMPLES

NAMES = ("lenet", "mlp", "vgg_small")


def _without_loss(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True)
                   if not re.match(r"(loss|train)\b", line))


def _module_file(name: str, target: str, loss: bool) -> artifact.ModuleFile:
    text = (EXAMPLES / f"{name}.cnn").read_text()
    source = Source(text if loss else _without_loss(text), f"{name}.cnn")
    graph = front_end(source)
    assert (graph.loss is not None) == loss
    if target == "cuda":
        return compile_cuda_module(graph, source)
    return compile_module(graph, source, opt_level=0, scheduled=True)


@pytest.fixture(scope="module", params=[(n, t, loss) for n in NAMES for t in ("cpu", "cuda")
                                        for loss in (True, False)],
                ids=lambda p: f"{p[0]}-{p[1]}-{'loss' if p[2] else 'forward'}")
def module_file(request) -> artifact.ModuleFile:
    return _module_file(*request.param)


def test_to_json_gives_the_compilers_dict_back_key_for_key(module_file):
    data = module_file.manifest
    checks.check_fields(data, "m")
    again = Manifest.from_json(data).to_json()
    assert again == data
    # the same keys in the same order at every level, and the same types (4 is not 4.0)
    assert json.dumps(again) == json.dumps(data)


def test_a_manifest_read_from_a_file_comes_back_with_its_section_table(module_file, tmp_path):
    artifact.write(module_file, tmp_path / "m.cnnm")
    data = artifact.read(tmp_path / "m.cnnm").manifest
    manifest = Manifest.from_json(data)
    assert manifest.sections is not None
    assert {s.name for s in manifest.sections} == set(module_file.sections)
    again = manifest.to_json()
    assert again == data and json.dumps(again, sort_keys=True) == json.dumps(data, sort_keys=True)
    # the code hash is taken over the JSON, and the typed form changes nothing in it
    code = module_file.sections[artifact.code_section(data)]
    assert artifact.code_hash(code, again, module_file.sections["program"]) == \
        data["code_sha256"]


def test_the_records_answer_what_the_runtime_asks(module_file):
    data = module_file.manifest
    manifest = Manifest.from_json(data)
    assert manifest.numpy_dtype == np.float32
    assert manifest.storage[manifest.output_index].name == data["output"]["name"]
    assert manifest.roles == tuple(data["entry_points"])
    assert [b.name for b in manifest.buffers("param")] == \
        [e["name"] for e in data["storage"] if e["role"] == "param"]
    if "loss" in data:
        assert manifest.loss is not None and manifest.optimizer is not None
        assert manifest.optimizer.get("lr") == data["optimizer"]["lr"]
        for name, where in data["gradients"].items():
            assert manifest.gradient(name) == where
    else:
        assert manifest.loss is None and manifest.optimizer is None and not manifest.gradients


def test_the_summary_from_a_manifest_is_the_graphs(module_file):
    graph = front_end(Source(module_file.sections["program"].decode(), "p"))
    assert from_manifest(Manifest.from_json(module_file.manifest)) == summarize(graph)
    assert from_manifest(module_file.manifest) == summarize(graph)  # its JSON too


def test_a_malformed_layer_row_is_refused_by_the_runtime():
    """The field checks leave the rows to the comparison with the program (cnnc.load); a
    module made from a file directly refuses a row it could not summarise."""
    good = _module_file("mlp", "cpu", True)
    manifest = dict(good.manifest, layers=[{"name": "h1"}])
    code = good.sections["object"]
    manifest["code_sha256"] = artifact.code_hash(code, manifest, good.sections["program"])
    with pytest.raises(cnnc.CnncModuleError, match=r"layers\[0\] must be a layer row"):
        cnnc.Module(artifact.ModuleFile(manifest, good.sections), "forged.cnnm")


def test_the_file_formats_limits_are_the_languages():
    assert checks.MAX_SIZE == opts.MAX_SIZE
    assert checks.MAX_NAME == MAX_NAME
    loss_ops = tuple(op for loss in registry.losses().values()
                     for op in (loss.op, loss.logits_op) if op)
    assert loss_ops == checks.LOSS_KINDS
    assert tuple(role.value for role in Role) == checks.ROLES
    assert tuple(dtype.value for dtype in DType) == checks.STORAGE_DTYPES
    expected = {opts.positive_number: "a finite number above 0",
                opts.fraction: "a number from 0 up to (not including) 1",
                opts.positive_int: "a whole number from 1 to 2**31 - 1",
                opts.non_negative_number: "a finite number of at least 0",
                opts.seed: "a whole number from 0 to 2**63 - 1",
                opts.boolean: "true or false",
                opts.schedule_name: "constant, step or cosine",
                opts.non_negative_int: "a whole number from 0 to 2**31 - 1"}
    assert checks.SCHEDULES == opts.SCHEDULES
    tables = {name: opts.train_options(optimizer.options)
              for name, optimizer in registry.optimizers().items()}
    assert list(checks.OPTIMIZER_SETTINGS) == list(tables)
    for kind, table in tables.items():
        settings = checks.OPTIMIZER_SETTINGS[kind]
        assert list(settings) == list(table), kind
        for key, spec in table.items():
            wanted = expected[spec.validate]
            if spec.default is None:
                wanted = f"null or {wanted}"
            assert settings[key][1] == wanted, (kind, key)
            valid = settings[key][0]
            if spec.default is not None:
                assert valid(spec.default), (kind, key, spec.default)
