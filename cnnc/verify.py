"""What a module file may be trusted with, checked before any of its code runs.

A `.cnnm` holds native object code (or, for cuda, Python source that Numba compiles), so
loading one runs its code. Its hashes only catch damage: whoever edits a file can compute
them again. So a file also keeps the program it was compiled from, and loading it derives
the module from that program again, without LLVM, and compares:

- trust="code" (the default, for files you built): every manifest field must be what the
  stored program compiles to here (buffer table, entry points, kernels, optimizer
  settings, ...), so a buffer smaller than the code writes, a swapped entry point or an
  out-of-range learning rate is refused. The object code itself is trusted.
- trust="rebuild" (for files from elsewhere): the stored code is ignored and the stored
  program is compiled again, validated like a new program; only the parameters are taken
  from the file, after checking their names, shapes and dtypes. Such a file can do no more
  than a `.cnn` program can.
"""

from __future__ import annotations

import json
from typing import Any

from . import module as artifact
from .diagnostics import CnncError, Source
from .ir import Graph

TRUST_MODES = ("code", "rebuild")

# Fields that describe the code rather than what the program implies: checked elsewhere
# (loader: version, target, code hash; unpack: sections) or inputs of the derivation.
NOT_DERIVED = ("cnnc_version", "code_sha256", "sections", "build", "target")


def trusted_file(file: artifact.ModuleFile, source: str, trust: str = "code"
                 ) -> artifact.ModuleFile:
    """`file` itself once its manifest is what its program implies (trust="code"), or the
    program compiled again with the file's parameters (trust="rebuild")."""
    if trust not in TRUST_MODES:
        raise CnncError.single(f"trust must be 'code' or 'rebuild', got {trust!r}")
    manifest = _checked_fields(file, source)
    graph, program = _stored_graph(file, manifest, source)
    if trust == "rebuild":
        return _rebuilt(file, manifest, graph, program, source)
    if manifest["target"]["kind"] == "cuda":
        _compare_cuda(file, manifest, graph, program, source)
    else:
        _compare(manifest, _planned(manifest, graph, program), source)
    return file


def _refuse(source: str, reason: str) -> artifact.CnncModuleError:
    return artifact.CnncModuleError.single(f"cannot load {source}: {reason}")


def _checked_fields(file: artifact.ModuleFile, source: str) -> dict[str, Any]:
    """The fields the derivation itself reads, by type and range."""
    manifest = file.manifest
    if not isinstance(manifest, dict):
        raise _refuse(source, "the manifest is malformed (not a JSON object)")
    _field(manifest, "dtype", source, lambda v: v in ("f32", "f64"), "f32 or f64")
    _field(manifest, "opt_level", source, lambda v: type(v) is int and 0 <= v <= 3,
           "an integer from 0 to 3")
    _field(manifest, "target", source, _is_target, "an object of kind, triple, cpu and features")
    _field(manifest, "build", source, lambda v: isinstance(v, dict), "an object")
    build = manifest["build"]
    _field(build, "program", source, lambda v: isinstance(v, str), "the program's name",
           "build.")
    if manifest["target"]["kind"] == "cpu":
        _field(build, "scheduled", source, lambda v: type(v) is bool, "true or false",
               "build.")
        _field(build, "machine", source, _is_machine, MACHINE_RANGES_TEXT, "build.")
    return manifest


def _field(record: dict[str, Any], key: str, source: str, valid, expected: str,
           prefix: str = "") -> None:
    if key not in record:
        raise _refuse(source, f"the manifest is malformed: it has no field {prefix}{key}")
    if not valid(record[key]):
        raise _refuse(source, f"the manifest is malformed: {prefix}{key} must be {expected}, "
                              f"got {_shown(record[key])}")


def _is_target(value: Any) -> bool:
    return (isinstance(value, dict) and value.get("kind") in ("cpu", "cuda")
            and isinstance(value.get("triple"), str) and isinstance(value.get("cpu"), str)
            and isinstance(value.get("features"), list)
            and all(isinstance(f, str) for f in value["features"]))


# The cost model's inputs, within what real CPUs have: absurd values could make it search
# forever or pick blocks that do not fit.
MACHINE_RANGES = {"vector_bits": (128, 512), "registers": (8, 64),
                  "l1_bytes": (1024, 2**24), "l2_bytes": (2**14, 2**30)}
MACHINE_RANGES_TEXT = ("vector_bits 128, 256 or 512, registers 8..64, l1_bytes 1 KiB..16 MiB "
                       "and l2_bytes 16 KiB..1 GiB")


def _is_machine(value: Any) -> bool:
    if not isinstance(value, dict) or set(value) != set(MACHINE_RANGES):
        return False
    if value.get("vector_bits") not in (128, 256, 512):
        return False
    return all(type(value[k]) is int and low <= value[k] <= high
               for k, (low, high) in MACHINE_RANGES.items())


def _shown(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _stored_graph(file: artifact.ModuleFile, manifest: dict[str, Any],
                  source: str) -> tuple[Graph, Source]:
    """The stored program through the whole front end, like a new program."""
    from .pipeline import MAX_SOURCE_BYTES, front_end

    data = file.sections.get("program", b"")
    if len(data) > MAX_SOURCE_BYTES:
        raise _refuse(source, "its stored program is too large to be a .cnn program")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _refuse(source, "its stored program is not UTF-8 text") from None
    program = Source(text, f"{source} (stored program)")
    try:
        graph = front_end(program, manifest["dtype"])
    except CnncError as error:
        raise _refuse(source, "its stored program is not a valid program:\n"
                      + error.render()) from None
    return graph, program


def _planned(manifest: dict[str, Any], graph: Graph, program: Source) -> dict[str, Any]:
    from .pipeline import plan_module
    from .schedule import Machine

    build = manifest["build"]
    return plan_module(graph, program, manifest["opt_level"], build["scheduled"],
                       Machine(**build["machine"])).manifest


def _compare(stored: dict[str, Any], derived: dict[str, Any], source: str) -> None:
    """Every derived field equal in the file, and no field the derivation lacks."""
    for key in sorted(set(stored) | set(derived)):
        if key in NOT_DERIVED or stored.get(key) == derived.get(key):
            continue
        if key not in derived:
            raise _refuse(source, f"the manifest has the field {key}, which its program "
                                  "does not give")
        raise _refuse(source, f"the manifest's {key} does not match its stored program: "
                      + _difference(key, stored.get(key), derived[key])
                      + "; compile the program again (or load with trust='rebuild')")


def _difference(key: str, stored: Any, derived: Any) -> str:
    if key == "storage" and isinstance(stored, list):
        for index, wanted in enumerate(derived):
            have = stored[index] if index < len(stored) else None
            if have != wanted:
                return (f"buffer {index} is {_shown(have)} in the file, but the program "
                        f"gives {_shown(wanted)}")
        return f"the file has {len(stored)} buffers, the program {len(derived)}"
    return f"{_shown(stored)} in the file, {_shown(derived)} from the program"


def _compare_cuda(file: artifact.ModuleFile, manifest: dict[str, Any], graph: Graph,
                  program: Source, source: str) -> None:
    """CUDA modules are Python source for Numba: derived in full, source included."""
    from .pipeline import compile_cuda_module

    derived = compile_cuda_module(graph, program)
    _compare(manifest, derived.manifest, source)
    if manifest["target"] != derived.manifest["target"]:
        raise _refuse(source, "the manifest's target does not match a cuda module's")
    if file.sections["cuda"] != derived.sections["cuda"]:
        raise _refuse(source, "its CUDA source is not what its program compiles to; load "
                              "it with trust='rebuild' to use the program's")


def _rebuilt(file: artifact.ModuleFile, manifest: dict[str, Any], graph: Graph,
             program: Source, source: str) -> artifact.ModuleFile:
    """The stored program compiled here, with the file's parameters checked against it."""
    from .loader import validated_params
    from .pipeline import compile_cuda_module, compile_module

    if manifest["target"]["kind"] == "cuda":
        fresh = compile_cuda_module(graph, program)
    else:
        fresh = compile_module(graph, program, manifest["opt_level"],
                               manifest["build"]["scheduled"])
    expected = dict(fresh.manifest, storage=[
        dict(e, dtype_numpy=artifact.numpy_dtype_name(e["dtype"]))
        for e in fresh.manifest["storage"]])
    params = validated_params(file, expected, source)
    sections = dict(fresh.sections, params=artifact.params_to_bytes(params))
    return artifact.ModuleFile(fresh.manifest, sections)
