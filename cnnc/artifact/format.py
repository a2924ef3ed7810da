"""The compiled artifact (`.cnnm`): a manifest, the native object code, the LLVM IR and the
loop IR for inspection, and the parameters, in one file that loads without the front end.
The LLVM IR and the loop IR are optional: `cnnc compile --strip` leaves them out (`stripped`).

Layout: MAGIC, the format version (u32), the manifest's length (u64) and SHA-256, the
manifest (JSON), then the sections. The manifest records each section's offset, length and
SHA-256, so a truncated, edited or corrupted file is refused with a message saying which
part is wrong, before any code in it runs. The table itself is checked first: only the
sections of the module's kind, whole numbers for offsets and lengths, and sections that
follow each other without gaps or overlaps to the end of the file. (What the manifest's
other fields may hold is `artifact.checks`; their typed form is `artifact.manifest`.)
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnc.diagnostics import CnncError
from cnnc.support import files
from cnnc.version import __version__

if TYPE_CHECKING:
    from cnnc.graph.ir import DType

MAGIC = b"CNNM\r\n\x1a\n"  # the line-ending bytes catch a file mangled by a text transfer
FORMAT_VERSION = 2  # 2: the program a module was compiled from is kept in it
_HEADER = struct.Struct("<8sIQ32s")


class CnncModuleError(CnncError):
    """A module file that cannot be loaded: not one, damaged, or made for another machine."""


@dataclass(frozen=True)
class ModuleFile:
    manifest: dict[str, Any]
    # object, llvm_ir, loops, params, program; cuda: cuda, loops, params, program (the
    # OPTIONAL_SECTIONS may be left out)
    sections: dict[str, bytes]


# a graph.ir.DType's value -> numpy's dtype: the runtime reads a file without the graph IR
NUMPY_DTYPES = {"f32": np.float32, "f64": np.float64, "i32": np.int32, "i64": np.int64}


def numpy_dtype(dtype: DType) -> np.dtype:
    return np.dtype(NUMPY_DTYPES[dtype.value])


def numpy_dtype_name(dtype: str) -> str:
    """The numpy name of a manifest's dtype (f32, f64, i32, i64)."""
    return np.dtype(NUMPY_DTYPES[dtype]).name


def pack(module: ModuleFile) -> bytes:
    """The file's bytes; the section table in the manifest is filled in here."""
    data, table = b"", {}
    for name, blob in module.sections.items():
        table[name] = {"offset": len(data), "length": len(blob),
                       "sha256": hashlib.sha256(blob).hexdigest()}
        data += blob
    manifest = dict(module.manifest, sections=table)
    text = json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(text), hashlib.sha256(text).digest())
    return header + text + data


def unpack(data: bytes, name: str) -> ModuleFile:
    """Parse and check a module file's bytes; every failure is a CnncModuleError."""
    def refuse(reason: str) -> CnncModuleError:
        return CnncModuleError.single(f"cannot load {name}: {reason}")

    if not data.startswith(MAGIC):
        raise refuse("not a cnnc module file (no CNNM header)")
    if len(data) < _HEADER.size:
        raise refuse(f"the file is truncated ({len(data)} bytes, less than its header)")
    _, version, length, digest = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise refuse(f"module format {version}; this cnnc {__version__} reads format "
                     f"{FORMAT_VERSION}: compile the network again")
    text = data[_HEADER.size:_HEADER.size + length]
    if len(text) < length:
        raise refuse(f"the file is truncated (manifest of {length} bytes, {len(text)} present)")
    if hashlib.sha256(text).digest() != digest:
        raise refuse("the manifest was changed or damaged (its checksum does not match)")
    try:
        manifest = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        raise refuse(f"the manifest is malformed ({type(error).__name__})") from None
    places = _section_places(manifest, len(data) - _HEADER.size - length, refuse)
    start = _HEADER.size + length
    sections = {}
    for section, (offset, size, digest) in places.items():
        blob = data[start + offset:start + offset + size]
        if hashlib.sha256(blob).hexdigest() != digest:
            raise refuse(f"section {section} was changed or damaged (its hash does not match)")
        sections[section] = blob
    missing = required_sections(manifest) - set(sections)
    if missing:
        raise refuse("the file lacks the sections " + ", ".join(sorted(missing)))
    return ModuleFile(manifest, sections)


def _section_places(manifest: Any, body: int, refuse) -> dict[str, tuple[int, int, str]]:
    """(offset, length, sha256) of each section in the manifest's table, after checking
    that they are the sections of the module's kind, and that they follow each other
    without gaps or overlaps to the end of the `body` bytes after the manifest."""
    table = manifest.get("sections") if isinstance(manifest, dict) else None
    if not isinstance(table, dict):
        raise refuse("the manifest is malformed: sections must be an object, got "
                     + shown_value(table))
    places = {}
    for name, where in table.items():
        if name not in module_sections(manifest):
            raise refuse(f"the manifest has the section {name}, which a "
                         f"{target_kind(manifest)} module does not have")
        if not (isinstance(where, dict) and set(where) == {"offset", "length", "sha256"}
                and all(type(where[k]) is int and where[k] >= 0 for k in ("offset", "length"))
                and isinstance(where["sha256"], str)):
            raise refuse(f"the manifest is malformed: sections.{name} must be an offset and a "
                         f"length (whole numbers from 0) and a sha256, got {shown_value(where)}")
        places[name] = (where["offset"], where["length"], where["sha256"])
    end = 0
    for name, (offset, size, _) in sorted(places.items(), key=lambda item: item[1][:2]):
        if offset + size > body:
            raise refuse(f"the file is truncated (section {name} is incomplete)")
        if offset != end:
            raise refuse(f"the manifest is malformed: section {name} starts at {offset}, "
                         f"where the one before it ends at {end}")
        end = offset + size
    if end != body:
        extra = body - end
        raise refuse(f"the file has {extra} byte{'s' if extra != 1 else ''} after its last "
                     "section")
    return places


def shown_value(value: Any) -> str:
    """A manifest value as a message quotes it: JSON, cut at 80 characters."""
    try:
        text = json.dumps(value, sort_keys=True)
    except (ValueError, TypeError, RecursionError):
        text = "a value too deeply nested to show"
    return text if len(text) <= 80 else text[:77] + "..."


def target_kind(manifest: dict[str, Any]) -> str:
    target = manifest.get("target")
    return str(target.get("kind")) if isinstance(target, dict) else "cpu"


def code_section(manifest: dict[str, Any]) -> str:
    """The section whose bytes are the module's code: native objects, or CUDA source."""
    return "cuda" if target_kind(manifest) == "cuda" else "object"


# Text for reading only (`cnnc inspect --llvm`, `--loops`): nothing loads or runs it, so a
# file shipped without it (`cnnc compile --strip`) loads, runs, trains and rebuilds the same.
OPTIONAL_SECTIONS = ("llvm_ir", "loops")


def required_sections(manifest: dict[str, Any]) -> set[str]:
    """The sections a file of the manifest's kind is refused without."""
    return module_sections(manifest) - set(OPTIONAL_SECTIONS)


def module_sections(manifest: dict[str, Any]) -> set[str]:
    """Every section a module of the manifest's kind may have; any other is refused."""
    if target_kind(manifest) == "cuda":
        return {"cuda", "loops", "params", "program"}
    return {"object", "llvm_ir", "loops", "params", "program"}


def stripped(module: ModuleFile) -> ModuleFile:
    """The module without its optional sections (`cnnc compile --strip`). Their bytes are
    bound by no hash but the section table's, so the manifest stays as it is."""
    return ModuleFile(module.manifest, {name: blob for name, blob in module.sections.items()
                                        if name not in OPTIONAL_SECTIONS})


def missing_sections(module: ModuleFile) -> list[str]:
    """The optional sections of its kind that the file lacks, in OPTIONAL_SECTIONS' order."""
    kind = module_sections(module.manifest)
    return [name for name in OPTIONAL_SECTIONS if name in kind and name not in module.sections]


def read(path: str | Path) -> ModuleFile:
    path = Path(path)
    try:
        if not path.is_file():
            reason = ("it is a directory" if path.is_dir() else
                      "it is not a regular file" if path.exists() else "no such file")
            raise CnncModuleError.single(f"cannot load {path}: {reason}")
        data = path.read_bytes()
    except OSError as error:
        raise CnncModuleError.single(f"cannot load {path}: {error.strerror or error}") from None
    return unpack(data, str(path))


def write(module: ModuleFile, path: str | Path) -> None:
    """Atomically: a reader never sees a half-written module."""
    write_atomically(Path(path), pack(module))


def write_atomically(path: Path, data: bytes) -> None:
    """Atomically and durably, with the permissions open() would give (`files`)."""
    files.write_atomically(path, data, CnncModuleError)


# Fields that describe the code itself rather than what it computes: not bound by the hash.
UNBOUND_FIELDS = ("sections", "code_sha256")


def code_hash(code: bytes, manifest: dict[str, Any], program: bytes) -> str:
    """SHA-256 of the code, the program it was compiled from and every manifest field it
    relies on: an edit to one of them alone is caught as damage. (A forger can recompute
    it, so `driver.trust` also derives the manifest from the program again.)"""
    bound = {key: value for key, value in manifest.items() if key not in UNBOUND_FIELDS}
    table = json.dumps(bound, sort_keys=True).encode("utf-8")
    return hashlib.sha256(code + b"\0" + program + b"\0" + table).hexdigest()


def params_to_bytes(params: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **params)
    return buffer.getvalue()


def params_from_bytes(data: bytes, what: str = "the parameters") -> dict[str, np.ndarray]:
    """A module file's parameters section: sizes checked before anything is inflated."""
    from cnnc.support.npzfile import read_npz_bytes

    return read_npz_bytes(data, what, CnncModuleError)


def format_manifest(module: ModuleFile) -> str:
    """`cnnc inspect`: what the file holds, in a few readable lines."""
    m = module.manifest
    params = [e for e in m["storage"] if e["role"] == "param"]
    lines = [
        f"module {m['network']} (cnnc {m['cnnc_version']}, format {FORMAT_VERSION})",
        f"  target   {m['target']['kind']} {m['target']['triple']} {m['target']['cpu']} "
        f"-O{m['opt_level']}",
        f"  dtype    {m['dtype']}",
        f"  input    {m['input']['name']}: N x {_dims(m['input']['shape'])}",
        f"  output   {m['output']['name']}: N x {_dims(m['output']['shape'])}",
        "  entry    " + ", ".join(_entry(role, code) for role, code in m["entry_points"].items()),
        f"  kernels  {', '.join(m['kernels'])}",
        f"  code     sha256 {m['code_sha256']}",
        "  parameters:",
    ]
    lines += [f"    {e['name']}: {_dims(e['shape'])} {e['dtype']}" for e in params]
    buffers = [e for e in m["storage"] if e["role"] == "buffer"]
    if buffers:  # saved with the parameters, updated by training steps, no gradient
        lines.append("  buffers:")
        lines += [f"    {e['name']}: {_dims(e['shape'])} {e['dtype']}" for e in buffers]
    return "\n".join(lines + _section_lines(module)) + "\n"


# What each section holds, as `cnnc inspect` names it.
SECTION_CONTENTS = {"object": "native object code", "cuda": "CUDA kernel source",
                    "llvm_ir": "LLVM IR", "loops": "loop IR", "params": "parameters",
                    "program": "the program it was compiled from"}


def _section_lines(module: ModuleFile) -> list[str]:
    """Each section's size and share of the file, in the file's order, then what the file
    holds and which optional sections it was compiled without."""
    table = module.manifest["sections"]
    order = sorted(table, key=lambda name: table[name]["offset"])
    size = file_size(module)
    lines = [f"  sections ({size:,} bytes in all, {size - _body_size(table):,} of them the "
             "header and manifest):"]
    lines += [f"    {name}: {table[name]['length']:,} bytes "
              f"({_share(table[name]['length'], size)})" for name in order]
    lines.append("  holds    " + ", ".join(SECTION_CONTENTS[name] for name in order))
    missing = missing_sections(module)
    if missing:
        lines.append("  stripped: " + ", ".join(f"no {SECTION_CONTENTS[name]}"
                                                for name in missing)
                     + " (cnnc compile --strip)")
    return lines


def file_size(module: ModuleFile) -> int:
    """The bytes of the file as `pack` wrote it for this manifest, section table included:
    the header, the manifest's JSON and the sections."""
    text = json.dumps(module.manifest, indent=1, sort_keys=True).encode("utf-8")
    return _HEADER.size + len(text) + _body_size(module.manifest["sections"])


def _body_size(table: dict[str, Any]) -> int:
    return sum(where["length"] for where in table.values())


def _share(part: int, whole: int) -> str:
    """A percentage with one decimal; a share too small to show as 0.1% says so."""
    percent = 100 * part / whole
    return f"{percent:.1f}%" if percent >= 0.05 or part == 0 else "under 0.1%"


def _entry(role: str, code: Any) -> str:
    if isinstance(code, list):  # cuda: the kernel launches it runs
        return f"{role} = {len(code)} launches"
    return f"{role} = {code}(N, buffers)"


def _dims(shape: list) -> str:
    return " x ".join(str(d) for d in shape)


def with_params(module: ModuleFile, values: dict[str, np.ndarray]) -> ModuleFile:
    """The module file with these parameters (or buffers) as its stored ones; each must be
    one the file has, of its shape. (The code hash covers no parameter, so it stays.)"""
    stored = params_from_bytes(module.sections["params"])
    for name, value in values.items():
        if name.endswith(".num_batches_tracked") and name not in stored:
            continue  # a weights file's count of steps, kept by the optimizer state instead
        if name not in stored or stored[name].shape != np.shape(value):
            raise CnncModuleError.single(
                f"{name} of shape {list(np.shape(value))} is no parameter of this module"
                + (f" (it has {list(stored[name].shape)})" if name in stored else ""))
        stored[name] = np.asarray(value, dtype=stored[name].dtype)
    return ModuleFile(module.manifest, dict(module.sections, params=params_to_bytes(stored)))
