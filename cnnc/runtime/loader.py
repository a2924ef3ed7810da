"""Checks a module file's manifest against this cnnc and this machine, and maps its object
code into memory as callable native code. Nothing here imports the compiler."""

from __future__ import annotations

import ctypes
import struct
from typing import Any

import llvmlite.binding as llvm

from cnnc.artifact import format as artifact
from cnnc.artifact.checks import check_fields, check_outline
from cnnc.artifact.manifest import Manifest, Target
from cnnc.backends.llvm.host import LLVM_LOCK, host_target, target_machine
from cnnc.backends.llvm.objects import unpack_objects
from cnnc.version import __version__

ForwardEntry = Any  # a ctypes function: (batch: int, buffers: void*[]) -> None


def _refuse(source: str, reason: str) -> artifact.CnncModuleError:
    return artifact.CnncModuleError.single(f"cannot load {source}: {reason}")


def validated_manifest(file: artifact.ModuleFile, source: str, kind: str = "cpu") -> Manifest:
    """The manifest's records once `check_manifest` has passed it."""
    check_manifest(file, source, kind)
    try:
        return Manifest.from_json(file.manifest)
    except ValueError as error:  # a field the checks leave to the comparison with the program
        raise _refuse(source, f"the manifest is malformed: {error}") from None


def check_manifest(file: artifact.ModuleFile, source: str, kind: str = "cpu") -> None:
    """Check version, target (`kind`: the runtime's, cpu or cuda), CPU, code hash and every
    field's type, range and consistency (`artifact.checks`)."""
    manifest = file.manifest
    if not isinstance(manifest, dict):
        raise _refuse(source, "the manifest is malformed (not a JSON object)")
    made_by = manifest.get("cnnc_version")
    if isinstance(made_by, str) and _version(made_by) > _version(__version__):
        # first: a newer cnnc's file may have fields this one does not know
        raise _refuse(source, f"it was made by cnnc {made_by}, newer than this cnnc "
                              f"{__version__}")
    # a file for another machine is no damage: say so before the code hash, which binds it
    target = Target.from_json(check_outline(manifest, source))
    if target.kind != kind:
        raise _refuse(source, f"it was compiled for the target {target.kind!r}, and "
                              f"this runtime runs {kind} modules; cnnc.load picks the runtime "
                              "from the file")
    if kind == "cpu":
        _check_target(source, target)
    _check_code_hash(file, source)  # before the other fields: damage is the likelier story
    check_fields(manifest, source)


def _check_code_hash(file: artifact.ModuleFile, source: str) -> None:
    manifest = file.manifest
    code = file.sections.get(artifact.code_section(manifest), b"")
    program = file.sections.get("program", b"")
    try:
        matches = artifact.code_hash(code, manifest, program) == manifest.get("code_sha256")
    except (ValueError, TypeError, RecursionError):  # not JSON a hash can be taken of
        matches = False
    if not matches:
        raise _refuse(source, "the code hash does not match the code and its buffer table")


def _check_target(source: str, target: Target) -> None:
    host = host_target()
    if target.triple.split("-")[0] != host.triple.split("-")[0]:
        raise _refuse(source, f"it was compiled for {target.triple}, this machine is "
                              f"{host.triple}")
    have = {f[1:] for f in host.features.split(",") if f.startswith("+")}
    missing = sorted(set(target.features) - have)
    if missing:
        raise _refuse(source, "it needs CPU features this CPU lacks: " + ", ".join(missing)
                      + "; compile it again on this machine")


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(".")[:3])
    except ValueError:
        return (0,)


def native_entries(file: artifact.ModuleFile, manifest: Manifest,
                   source: str) -> tuple[dict[str, ForwardEntry], llvm.ExecutionEngine]:
    """Map the object code (no parsing, no optimisation) and return every entry point by
    its role (forward, loss, ...); the engine must live as long as they are called."""
    symbols = {entry.role: str(entry.symbol) for entry in manifest.entry_points}
    try:
        entries, engine = native_entries_from_object(file.sections["object"],
                                                     list(symbols.values()))
    except RuntimeError as error:
        raise _refuse(source, f"its object code does not load: {error}") from None
    except KeyError as error:
        raise _refuse(source, f"its object code has no entry point {error}") from None
    by_role = {role: entries[symbol] for role, symbol in symbols.items()}
    return by_role, engine


def native_entries_from_object(object_code: bytes, symbols: list[str]
                               ) -> tuple[dict[str, ForwardEntry], llvm.ExecutionEngine]:
    """Map object code and look up `symbols` (KeyError for a missing one)."""
    try:
        objects = unpack_objects(object_code)
        for index, obj in enumerate(objects):
            check_object_file(obj, index)
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


TEAM_WORKER = "cnnc_team_worker"  # see backends.llvm.team


def team_worker(engine: llvm.ExecutionEngine) -> Any | None:
    """The helper threads' entry point `void cnnc_team_worker(i64* team)` of loaded code, or
    None where the code predates thread teams."""
    with LLVM_LOCK:
        address = engine.get_function_address(TEAM_WORKER)
    return ctypes.CFUNCTYPE(None, ctypes.c_void_p)(address) if address else None


# ELF (System V ABI): what LLVM's object loader reads. It trusts these tables, and a file
# whose tables point outside it or hold a relocation it does not implement crashes the
# process (SIGSEGV, an abort) where it should be refused. Checking them does not make the
# code itself trustworthy: trust="code" runs whatever machine code the file holds.
ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
ELF_SECTION = struct.Struct("<IIQQQQIIQQ")
ELF_SYMBOL_SIZE, ELF_RELA_SIZE, ELF_REL_SIZE = 24, 24, 16
SHT_SYMTAB, SHT_STRTAB, SHT_RELA, SHT_NOBITS, SHT_REL = 2, 3, 4, 8, 9
ET_REL = 1
ELF_MACHINES = {"x86_64": 62, "aarch64": 183, "arm64": 183}
# the x86-64 relocations LLVM's RuntimeDyldELF resolves (others abort the process), with
# the bytes each one writes; elsewhere, at least 4 bytes are written where a relocation is
X86_64_RELOCATIONS = {0: 0, 1: 8, 2: 4, 4: 4, 9: 4, 10: 4, 11: 4, 24: 8, 25: 8, 26: 4, 29: 8,
                      41: 4, 42: 4}
SHN_LORESERVE = 0xFF00  # section indexes from here on are special (absolute, common)


def check_object_file(obj: bytes, index: int = 0) -> None:
    """A relocatable 64-bit little-endian ELF object for this machine's architecture whose
    section, symbol and relocation tables lie inside it; else ValueError."""
    def bad(reason: str) -> ValueError:
        return ValueError(f"object file {index} {reason}")

    if len(obj) < ELF_HEADER.size or not obj.startswith(b"\x7fELF\x02\x01\x01"):
        raise bad("is not a 64-bit little-endian ELF object file")
    (_, kind, machine, _, _, _, shoff, _, _, _, _, shentsize, shnum,
     shstrndx) = ELF_HEADER.unpack_from(obj)
    arch = host_target().triple.split("-")[0]
    if kind != ET_REL or machine != ELF_MACHINES.get(arch, machine):
        raise bad(f"is not a relocatable object file for {arch}")
    if shentsize != ELF_SECTION.size or shnum == 0 or shstrndx >= shnum or \
            shoff + shnum * ELF_SECTION.size > len(obj):
        raise bad("has a damaged section table")
    sections = [ELF_SECTION.unpack_from(obj, shoff + i * ELF_SECTION.size)
                for i in range(shnum)]
    if sections[shstrndx][1] != SHT_STRTAB:
        raise bad("has no table of section names")
    for number, section in enumerate(sections):
        _check_section(obj, sections, section, arch, lambda r, n=number: bad(f"section {n} {r}"))


def _check_section(obj: bytes, sections: list[tuple], section: tuple, arch: str, bad) -> None:
    """One section header: its bytes inside the file, its links to other sections, and for
    symbol and relocation tables every entry."""
    _, kind, _, _, offset, size, link, _, align, _ = section
    if kind != SHT_NOBITS and offset + size > len(obj):
        raise bad("lies outside the file")
    if align & (align - 1) or link >= len(sections):
        raise bad("has a damaged header")
    if kind == SHT_SYMTAB:
        _check_symbols(obj, sections, section, bad)
    elif kind in (SHT_RELA, SHT_REL):
        _check_relocations(obj, sections, section, arch, bad)


def _check_symbols(obj: bytes, sections: list[tuple], section: tuple, bad) -> None:
    _, _, _, _, offset, size, link, _, _, entsize = section
    names = sections[link]
    if entsize != ELF_SYMBOL_SIZE or size % entsize or names[1] != SHT_STRTAB:
        raise bad("is a damaged symbol table")
    for at in range(offset, offset + size, entsize):
        name, _, _, shndx, value, length = struct.unpack_from("<IBBHQQ", obj, at)
        if name >= names[5] or (shndx >= len(sections) and shndx < SHN_LORESERVE):
            raise bad("holds a damaged symbol")
        if 0 < shndx < SHN_LORESERVE and value + length > sections[shndx][5]:
            raise bad("holds a symbol outside its section")


def _check_relocations(obj: bytes, sections: list[tuple], section: tuple, arch: str,
                       bad) -> None:
    _, kind, _, _, offset, size, link, info, _, entsize = section
    width = ELF_RELA_SIZE if kind == SHT_RELA else ELF_REL_SIZE
    if entsize != width or size % width or info >= len(sections) or \
            sections[link][1] != SHT_SYMTAB:
        raise bad("is a damaged relocation table")
    symbols = sections[link][5] // ELF_SYMBOL_SIZE
    patched = sections[info][5]  # the size of the section the relocations patch
    for at in range(offset, offset + size, width):
        where, how = struct.unpack_from("<QQ", obj, at)
        relocation = how & 0xFFFFFFFF
        written = X86_64_RELOCATIONS.get(relocation, -1) if arch == "x86_64" else 4
        if written < 0 or where + written > patched or how >> 32 >= symbols:
            raise bad("holds a relocation the loader cannot apply")


def validated_params(file: artifact.ModuleFile, manifest: Manifest,
                     source: str) -> dict[str, Any]:
    """The stored parameters, each with the name, shape and dtype the code was built for."""
    params = artifact.params_from_bytes(file.sections["params"],
                                        f"the parameters stored in {source}")
    # the trainable parameters and the buffers saved with them (running statistics)
    expected = {entry.name: entry for entry in manifest.buffers("param") +
                manifest.buffers("buffer")}
    if set(params) != set(expected):
        raise _refuse(source, "its parameters do not match the manifest")
    for name, value in params.items():
        entry = expected[name]
        if value.shape != entry.shape or value.dtype.name != entry.numpy_dtype.name:
            raise _refuse(source, f"the stored parameter {name} has shape {value.shape} and "
                                  f"dtype {value.dtype}, not {list(entry.shape)} {entry.dtype}")
    return params
