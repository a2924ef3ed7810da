"""Checks a module file's manifest against this cnnc and this machine, and maps its object
code into memory as callable native code. Nothing here imports the front end."""

from __future__ import annotations

import ctypes
from typing import Any

import llvmlite.binding as llvm

from . import __version__
from . import module as artifact
from .backends.llvm import LLVM_LOCK, host_target, target_machine, unpack_objects
from .ir import DType

ForwardEntry = Any  # a ctypes function: (batch: int, buffers: void*[]) -> None


def _refuse(source: str, reason: str) -> artifact.CnncModuleError:
    return artifact.CnncModuleError.single(f"cannot load {source}: {reason}")


def validated_manifest(file: artifact.ModuleFile, source: str,
                       kind: str = "cpu") -> dict[str, Any]:
    """The manifest with derived fields, after checking version, target (`kind`: the
    runtime's, cpu or cuda), CPU and code hash."""
    if not isinstance(file.manifest, dict):
        raise _refuse(source, "the manifest is malformed (not a JSON object)")
    manifest = dict(file.manifest)
    try:
        storage = [dict(entry) for entry in manifest["storage"]]
        for entry in storage:
            entry["dtype_numpy"] = artifact.numpy_dtype(DType(entry["dtype"])).name
        names = [entry["name"] for entry in storage]
        manifest["output_index"] = names.index(manifest["output"]["name"])
        manifest["dtype_numpy"] = artifact.numpy_dtype(DType(manifest["dtype"])).name
        target, made_by = manifest["target"], str(manifest["cnnc_version"])
        required = set(target["features"])
        expected_hash = manifest["code_sha256"]
        _ = manifest["entry_points"]["forward"], manifest["input"]["shape"]
        _ = [str(k) for k in manifest["kernels"]], str(manifest["network"])
        _ = [names.index(a) for a in manifest["activations"]]
        _ = [names.index(g) for g in manifest.get("gradients", {}).values()]
        _ = str(target["triple"]).split("-"), int(manifest["opt_level"])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise _refuse(source, f"the manifest is malformed ({type(error).__name__}: {error})") \
            from None
    manifest["storage"] = storage
    if _version(made_by) > _version(__version__):
        raise _refuse(source, f"it was made by cnnc {made_by}, newer than this cnnc "
                              f"{__version__}")
    if target.get("kind") != kind:
        raise _refuse(source, f"it was compiled for the target {target.get('kind')!r}, and "
                              f"this runtime runs {kind} modules; cnnc.load picks the runtime "
                              "from the file")
    if kind == "cpu":
        _check_target(source, target, required)
    code = file.sections[artifact.code_section(file.manifest)]
    program = file.sections.get("program", b"")
    if artifact.code_hash(code, file.manifest, program) != expected_hash:
        raise _refuse(source, "the code hash does not match the code and its buffer table")
    return manifest


def _check_target(source: str, target: dict[str, Any], required: set[str]) -> None:
    host = host_target()
    if not isinstance(target["triple"], str) or \
            target["triple"].split("-")[0] != host.triple.split("-")[0]:
        raise _refuse(source, f"it was compiled for {target['triple']}, this machine is "
                              f"{host.triple}")
    have = {f[1:] for f in host.features.split(",") if f.startswith("+")}
    missing = sorted(required - have)
    if missing:
        raise _refuse(source, "it needs CPU features this CPU lacks: " + ", ".join(missing)
                      + "; compile it again on this machine")


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(".")[:3])
    except ValueError:
        return (0,)


def native_entries(file: artifact.ModuleFile, manifest: dict[str, Any],
                   source: str) -> tuple[dict[str, ForwardEntry], llvm.ExecutionEngine]:
    """Map the object code (no parsing, no optimisation) and return every entry point by
    its role (forward, loss, ...); the engine must live as long as they are called."""
    try:
        entries, engine = native_entries_from_object(file.sections["object"],
                                                     list(manifest["entry_points"].values()))
    except RuntimeError as error:
        raise _refuse(source, f"its object code does not load: {error}") from None
    except KeyError as error:
        raise _refuse(source, f"its object code has no entry point {error}") from None
    by_role = {role: entries[symbol] for role, symbol in manifest["entry_points"].items()}
    return by_role, engine


def native_entries_from_object(object_code: bytes, symbols: list[str]
                               ) -> tuple[dict[str, ForwardEntry], llvm.ExecutionEngine]:
    """Map object code and look up `symbols` (KeyError for a missing one)."""
    try:
        objects = unpack_objects(object_code)
    except ValueError as error:
        raise RuntimeError(str(error)) from None
    with LLVM_LOCK:  # see LLVM_LOCK: compiling may fork meanwhile
        engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), target_machine())
        for obj in objects:
            engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        engine.finalize_object()
        addresses = {str(symbol): engine.get_function_address(str(symbol))
                     for symbol in symbols}
    signature = ctypes.CFUNCTYPE(None, ctypes.c_int64, ctypes.c_void_p)
    entries = {}
    for symbol, address in addresses.items():
        if not address:
            raise KeyError(symbol)
        entries[symbol] = signature(address)
    return entries, engine


def validated_params(file: artifact.ModuleFile, manifest: dict[str, Any],
                     source: str) -> dict[str, Any]:
    """The stored parameters, each with the name, shape and dtype the code was built for."""
    params = artifact.params_from_bytes(file.sections["params"],
                                        f"the parameters stored in {source}")
    expected = {entry["name"]: entry for entry in manifest["storage"] if entry["role"] == "param"}
    if set(params) != set(expected):
        raise _refuse(source, "its parameters do not match the manifest")
    for name, value in params.items():
        entry = expected[name]
        if list(value.shape) != entry["shape"] or value.dtype.name != entry["dtype_numpy"]:
            raise _refuse(source, f"the stored parameter {name} has shape {value.shape} and "
                                  f"dtype {value.dtype}, not {entry['shape']} {entry['dtype']}")
    return params
