"""`cnnc compile NET --emit lib -o DIR`: the network's inference pass (its `forward` and
`pack` entry points) compiled for a target, with the C API around it:

    DIR/NET.h             the API and the network's constants
    DIR/libNET.a          the kernels' object code and the API's
    DIR/libNET.so         the same, shared (not for wasm32)
    DIR/NET.wasm          wasm32 only: a module exporting the API
    DIR/NET.weights.bin   unless --embed-weights put them in the library
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnc.artifact.format import (
    ModuleFile,
    params_from_bytes,
    params_to_bytes,
    with_params,
    write_atomically,
)
from cnnc.backends.llvm.codegen import compile_functions
from cnnc.backends.llvm.library import data_object, library_object
from cnnc.backends.target import CpuTarget, host_cpu
from cnnc.diagnostics import CnncInputError, Source
from cnnc.driver.lowering import ENTRY_NAMES
from cnnc.driver.pipeline import Build, Options, Stage, advance
from cnnc.graph.ir import Role
from cnnc.library.csource import header_text, model_source
from cnnc.library.layout import Layout, make_layout
from cnnc.library.toolchain import Toolchain, find_toolchain
from cnnc.library.weights import weights_bytes
from cnnc.passes.initialise import initial_parameters

API = ("init", "init_from_memory", "free", "strerror", "workspace_size", "forward",
       "scalar_size", "input_size", "output_size")
WASM_API = (*API, "alloc", "release")  # the loader's memory for inputs, outputs, weights


@dataclass(frozen=True, slots=True)
class Library:
    layout: Layout
    files: tuple[Path, ...]
    target: CpuTarget


def build_library(source: Source, out: Path, options: Options,
                  weights: dict[str, np.ndarray] | None = None,
                  embed: bool = False) -> Library:
    """Compile `source`'s inference pass for `options.target` and write the library's files
    into `out` (made if missing). `weights`: values for the parameters and buffers (by
    name; the others keep their initial values), as `cnnc compile --weights` takes them."""
    target = options.cpu()
    tools = find_toolchain(target.triple, host_cpu().triple)  # before minutes of compiling
    front = advance(Build(source), options, Stage.LOWER)
    layout, code, has_pack = _compiled(front, options)
    values = _values(front, weights)
    offsets, payload_size = layout.weight_offsets()
    data = weights_bytes([values[name] for name in offsets], list(offsets.values()),
                         payload_size, layout.weights_hash)
    net = layout.net
    made: dict[str, bytes] = {f"{net}.h": header_text(layout, source.name, embed).encode()}
    with tempfile.TemporaryDirectory(prefix="cnnc-lib-") as scratch:
        folder = Path(scratch)
        (folder / f"{net}.h").write_bytes(made[f"{net}.h"])
        objects = _objects(folder, layout, code, has_pack, data if embed else None, tools)
        made.update((path.name, path.read_bytes()) for path in _link(tools, objects, folder,
                                                                      net))
    if not embed:
        made[f"{net}.weights.bin"] = data
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CnncInputError.single(f"cannot make the folder {out}: {error.strerror}") from None
    for name, blob in made.items():  # each whole or not at all, as every file cnnc writes
        write_atomically(out / name, blob)
    files = [out / name for name in made]
    return Library(layout, tuple(files), target)


def _compiled(front: Build, options: Options):
    """The layout of the forward and pack entry points' buffers, and their native code."""
    lowered = front.lowered
    by_name = {f.name: f for f in lowered.functions}
    forward = lowered.entries[ENTRY_NAMES["forward"]]
    pack = _packs_read_by(forward, lowered.entries.get(ENTRY_NAMES["pack"], []), by_name)
    wanted = set(forward) | set(pack)
    functions = tuple(f for f in lowered.functions if f.name in wanted)
    used = {b.name for f in functions for b in f.buffers}
    names = [t.name for t in lowered.storage if t.name in used]  # the table, in storage order
    graph = front.graph
    layout = make_layout(graph.name, graph.dtype, lowered.storage, names, graph.input,
                         front.kernels.output, tuple(graph.tensor(graph.input).shape[1:]),
                         tuple(graph.tensor(graph.output).shape[1:]))
    refused = [s.name for s in layout.of_kind("work")
               if s.role in (Role.TARGET, Role.HYPER, Role.NOISE, Role.STATE)]
    if refused:  # inference reads none of these; a library has no way to give them
        raise CnncInputError.single(f"the inference pass reads {', '.join(refused)}, which "
                                    "a C library cannot supply")
    entries = {ENTRY_NAMES["forward"]: forward, **({ENTRY_NAMES["pack"]: pack} if pack else {})}
    code = compile_functions(functions, names, options.opt_level, entries,
                             target=options.cpu(), rarely=frozenset(pack), serial=True)
    return layout, code, bool(pack)


def _packs_read_by(forward: list[str], pack: list[str], by_name: dict) -> list[str]:
    """The pack entry's functions (in order) whose results forward reads, itself or through
    another of them: not the backward kernels' repacked weights, which inference never
    reads (a third of LeNet-5's model memory)."""
    read = {b.name for name in forward for b in by_name[name].buffers}
    kept = []
    for name in reversed(pack):
        buffers = by_name[name].buffers
        if any(b.is_output and b.name in read for b in buffers):
            kept.append(name)
            read |= {b.name for b in buffers}
    return kept[::-1]


def _values(front: Build, given: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The initial parameters and buffers, with `given` in their place, checked as
    `cnnc compile --weights` checks them (artifact.format.with_params)."""
    initial = initial_parameters(front.graph)
    if not given:
        return initial
    stored = ModuleFile({}, {"params": params_to_bytes(initial)})
    return params_from_bytes(with_params(stored, given).sections["params"])


def _objects(scratch: Path, layout: Layout, code, has_pack: bool, embedded: bytes | None,
             tools: Toolchain) -> list[Path]:
    """The kernels' object, the API's (compiled from its source with the header beside it)
    and, with embedded weights, theirs."""
    net = layout.net
    kernels = scratch / f"{net}_kernels.o"
    kernels.write_bytes(library_object(code, {
        ENTRY_NAMES["forward"]: f"{net}__forward_kernels",
        ENTRY_NAMES["pack"]: f"{net}__pack_kernels"}))
    api_source = scratch / f"{net}.c"
    api_source.write_text(model_source(layout, has_pack,
                                       None if embedded is None else len(embedded)))
    api = scratch / f"{net}_api.o"
    tools.compile_c(api_source, api, scratch)
    objects = [api, kernels]
    if embedded is not None:
        blob = scratch / f"{net}_weights.o"
        blob.write_bytes(data_object(code.target, f"{net}__embedded_weights", embedded))
        objects.append(blob)
    return objects


def _link(tools: Toolchain, objects: list[Path], out: Path, net: str) -> list[Path]:
    archive = out / f"lib{net}.a"
    tools.archive(objects, archive)
    if tools.is_wasm:
        module = out / f"{net}.wasm"
        tools.link_wasm(objects, module, [f"{net}_{name}" for name in WASM_API])
        return [archive, module]
    shared = out / f"lib{net}.so"
    tools.link_shared(objects, shared)
    return [archive, shared]
