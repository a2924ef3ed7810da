"""The module file a build ends in: the manifest (which `driver.trust` derives again from
the stored program when the file is loaded), the hash of the code, the sections, and the check
that the manifest is what its typed records (`artifact.manifest`) give back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cnnc.artifact.format import ModuleFile, code_hash, params_to_bytes
from cnnc.driver.lowering import ENTRY_NAMES
from cnnc.graph.ir import Role
from cnnc.ops import registry
from cnnc.passes.summary import rows_to_json, summarize
from cnnc.version import __version__

if TYPE_CHECKING:
    from cnnc.backends.target import CpuTarget
    from cnnc.diagnostics import Source
    from cnnc.driver.lowering import Lowered
    from cnnc.driver.pipeline import Build, Options
    from cnnc.graph.kernels import KernelProgram
    from cnnc.schedule.cost import Machine


def make_module_file(build: Build, options: Options) -> ModuleFile:
    """The module file, which also keeps the program it was compiled from (`trust="rebuild"`
    compiles that) and the loop functions as text."""
    from cnnc.passes.initialise import initial_parameters

    manifest = module_manifest(build, options)
    if options.backend == "cuda":
        manifest["target"] = CUDA_TARGET
        hashed = build.code.source.encode()
        code = {"cuda": hashed}
    else:
        manifest["target"] = _cpu_target_record(options.cpu())
        hashed = build.code.object_code
        code = {"object": hashed, "llvm_ir": build.code.llvm_ir.encode()}
    program = build.source.text.encode("utf-8")
    manifest["code_sha256"] = code_hash(hashed, manifest, program)
    sections = {**code, "loops": "\n".join(build.lowered.texts).encode(),
                "params": params_to_bytes(initial_parameters(build.graph)),
                "program": program}
    return ModuleFile(manifest, sections)


CUDA_TARGET = {"kind": "cuda", "triple": "nvptx64-nvidia-cuda", "cpu": "numba", "features": []}


def _cpu_target_record(target: CpuTarget) -> dict[str, Any]:
    """The manifest's `target` of a CPU module: the features LLVM turned on."""
    features = [f[1:] for f in target.features.split(",") if f.startswith("+")]
    return {"kind": "cpu", "triple": target.triple, "cpu": target.cpu, "features": features}


def module_manifest(build: Build, options: Options) -> dict[str, Any]:
    """Every manifest field but the code's own (target, code_sha256): on the CPU known once
    the build is lowered; a CUDA module's entry points are its launches, known from codegen."""
    lowered, graph = build.lowered, build.graph
    if options.backend == "cuda":
        from cnnc.backends.cuda.launch import launches_to_json

        launches = launches_to_json(build.code.launches)
        # each entry point is its launches, in order: what the runtime runs for it
        entry_table = {role: [launch for name in lowered.entries[symbol]
                              for launch in launches[name]]
                       for role, symbol in ENTRY_NAMES.items() if symbol in lowered.entries}
        opt_level, record = 0, {"program": build.source.name}
    else:
        entry_table = {role: symbol for role, symbol in ENTRY_NAMES.items()
                       if symbol in lowered.entries}
        opt_level = options.opt_level
        record = build_record(build.source, options.scheduled, options.cpu().machine)
    manifest = _manifest(build.kernels, lowered, entry_table, opt_level, record,
                         rows_to_json(summarize(graph)))
    if options.backend != "cuda":
        shared = shared_memory(lowered, _read_after_calls(manifest))
        if shared:  # after the entry points, where Manifest.to_json writes it
            manifest = _inserted_after(manifest, "entry_points", "shared", shared)
    return manifest


def _inserted_after(record: dict[str, Any], key: str, new: str, value: Any) -> dict[str, Any]:
    items = list(record.items())
    at = [k for k, _ in items].index(key) + 1
    return dict([*items[:at], (new, value), *items[at:]])


# the entry points whose buffers are the runtime's own workspace: pack and update run on the
# kept arrays and the gradients a caller gives (runtime.cpu)
WORKSPACE_ROLES = ("forward", "forward_train", "loss", "loss_train", "gradients",
                   "input_gradient", "train_step")


def shared_memory(lowered: Lowered, kept: set[str]) -> dict[str, list[list[str]]]:
    """Each workspace entry point's regions of buffers that may share memory
    (driver.memory), those of more than one buffer."""
    from cnnc.driver.memory import regions

    functions = {f.name: f for f in lowered.functions}
    shared = {}
    for role in WORKSPACE_ROLES:
        names = lowered.entries.get(ENTRY_NAMES[role])
        if names:
            found = [r for r in regions([functions[n] for n in names], lowered.storage, kept)
                     if len(r) > 1]
            if found:
                shared[role] = found
    return shared


def _read_after_calls(manifest: dict[str, Any]) -> set[str]:
    """What the runtime reads back after an entry point's call: the output, the loss and the
    gradients (a call that reads anything else, `Module.activations`, runs without the
    shared regions)."""
    kept = {manifest["output"]["name"]}
    if "loss" in manifest:
        kept |= {manifest["loss"]["value"], *manifest["gradients"].values()}
    return kept


def build_record(source: Source, scheduled: bool, machine: Machine) -> dict[str, Any]:
    """How the module was built, beyond its program and opt level: what `driver.trust` needs to
    derive the same buffer table on another machine."""
    return {"program": source.name, "scheduled": bool(scheduled),
            "machine": machine.record()}


def _manifest(program: KernelProgram, lowered: Lowered, entry_table: dict, opt_level: int,
              build: dict[str, Any], layers: list) -> dict:
    graph = program.graph
    table = [{"name": t.name, "role": t.role.value, "dtype": t.dtype.value,
              "shape": list(t.shape)} for t in lowered.storage]
    io_shape = {name: list(graph.tensor(name).shape[1:]) for name in (graph.input, graph.output)}
    manifest = {
        "cnnc_version": __version__,
        "network": graph.name,
        "dtype": graph.dtype.value,
        "input": {"name": graph.input, "shape": io_shape[graph.input]},
        "output": {"name": program.output, "shape": io_shape[graph.output]},
        "storage": table,
        "entry_points": entry_table,
        "kernels": [k.name for k in program.kernels],
        "activations": _activations(program, lowered),
        "opt_level": opt_level,
        "build": build,
        "layers": layers,
    }
    if graph.loss is not None:
        manifest["loss"] = {"kind": graph.producer(graph.loss).op,
                            "target": graph.target, "value": graph.loss}
        manifest["gradients"] = {name: program.storage_of(g) for name, g in graph.gradients}
        settings = dict(graph.train.settings) if graph.train else \
            dict(registry.DEFAULT_SETTINGS)
        manifest["optimizer"] = {"kind": lowered.optimizer, **settings}
    return manifest


def _activations(program: KernelProgram, lowered: Lowered) -> list[str]:
    """What `forward` writes, kernel by kernel: what `Module.activations` reads back (not
    what the pack entry point computes from the parameters, batch norm's folded weights)."""
    by_name = {k.name: k for k in program.kernels}
    values = {t.name for t in lowered.storage if t.role is Role.VALUE}
    return list(dict.fromkeys(program.storage_of(out) for name in program.forward_kernels(False)
                              for out in by_name[name].outputs
                              if program.storage_of(out) in values))


def check_manifest(manifest: dict[str, Any]) -> None:
    """The whole manifest (target and code hash included) is what its typed records give
    back, field for field: the runtime reads a module through those records, so a field
    they lose or change would be a module that runs other than it was built."""
    from cnnc.artifact.manifest import Manifest

    try:
        typed = Manifest.from_json(manifest).to_json()
    except (KeyError, TypeError, ValueError) as error:  # a field the records cannot hold
        raise AssertionError(f"the manifest has no typed form: {error!r}") from error
    assert typed == manifest, "the manifest differs from its typed records in " + ", ".join(
        sorted(key for key in manifest.keys() | typed.keys()
               if manifest.get(key) != typed.get(key)))
