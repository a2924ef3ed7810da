"""The fields of a module file's manifest: each one's type and range, and their consistency
with each other, checked before anything reads a field. A forged manifest is a
CnncModuleError naming the field, never a Python exception or a wrong buffer size.

These are pure data checks, so the runtime makes them without the compiler. The limits the
language sets (names, sizes, losses, the train line's settings) are written out here as the
file format's own; tests/artifact/test_manifest.py checks that they agree with the front end's.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from cnnc.artifact import format as artifact

_shown = artifact.shown_value  # a manifest value as messages quote it

MAX_SIZE = 2**31 - 1  # frontend.options.MAX_SIZE: sizes index native arrays with int32
MAX_NAME = 64  # frontend.irgen.MAX_NAME: characters of a network or layer name
NETWORK_NAME = re.compile(rf"[A-Za-z_][A-Za-z0-9_]{{0,{MAX_NAME - 1}}}")  # a .cnn identifier
# tensors, kernels and entry points: identifiers joined by dots, never a path
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,199}")
TARGET_WORD = re.compile(r"[A-Za-z0-9_.+-]{1,100}")  # a triple, CPU or feature name
VERSION = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6}){1,3}[A-Za-z0-9.+-]{0,30}")
SHA256 = re.compile(r"[0-9a-f]{64}")
# graph.ir.Role and graph.ir.DType, by value
ROLES = ("input", "target", "param", "value", "loss", "state", "hyper", "scratch", "buffer",
         "noise", "packed")
STORAGE_DTYPES = ("f32", "f64", "i32", "i64")
# driver.lowering.ENTRY_NAMES' roles: what a network without a loss line has, and with one
FORWARD_ROLES = frozenset({"forward"})
# a network whose training computes otherwise (batch norm, dropout) has these too
TRAINING_MODE_ROLES = frozenset({"forward_train", "loss_train"})
TRAINING_ROLES = frozenset({"forward", "loss", "gradients", "input_gradient", "train_step",
                            "update"})
FIELDS = frozenset({"cnnc_version", "network", "dtype", "input", "output", "storage",
                    "entry_points", "kernels", "activations", "opt_level", "build", "layers",
                    "target", "code_sha256"})
# the section table of a file, checked as the file is read (artifact.format.unpack); a module made
# in memory has none
TABLE_FIELDS = frozenset({"sections"})
# a CPU module's regions of buffers that may share memory (driver.memory), where it has any
OPTIONAL_FIELDS = frozenset({"shared"})
# the buffers a region may hold: a call's own working memory, never what it is given or keeps
SHARED_ROLES = ("value", "scratch")
TRAINING_FIELDS = frozenset({"loss", "gradients", "optimizer"})
# the loss ops a loss line may add, as the op registry defines them (tests check): each
# LossDef's op, then its logits op if it has one
LOSS_KINDS = ("cross_entropy", "softmax_cross_entropy", "mse")


def _refuse(source: str, reason: str) -> artifact.CnncModuleError:
    return artifact.CnncModuleError.single(f"cannot load {source}: {reason}")


def _fraction(value: Any) -> bool:
    return _is_number(value) and 0 <= value < 1


def _positive(value: Any) -> bool:
    return _is_number(value) and value > 0


def _count(value: Any) -> bool:
    return _is_int(value, 1, MAX_SIZE)


def _at_least_zero(value: Any) -> bool:
    return _is_number(value) and value >= 0


# The train line's options (each OptimizerDef's, then frontend.options.TRAINING_OPTIONS) as
# JSON values, in that order: each one's check, and what it expects. An option that may be
# left out (max_iter) is null. tests/artifact/test_manifest.py checks they agree.
RATE = (_positive, "a finite number above 0")
FRACTION = (_fraction, "a number from 0 up to (not including) 1")
COUNT = (_count, "a whole number from 1 to 2**31 - 1")
AT_LEAST_ZERO = (_at_least_zero, "a finite number of at least 0")
SCHEDULES = ("constant", "step", "cosine")  # frontend.options.SCHEDULES
COMMON_SETTINGS = {
    "batch": COUNT, "epochs": COUNT,
    "max_iter": (lambda v: v is None or _count(v), f"null or {COUNT[1]}"),
    "tol": AT_LEAST_ZERO,
    "seed": (lambda v: _is_int(v, 0, 2**63 - 1), "a whole number from 0 to 2**63 - 1"),
    "schedule": (lambda v: v in SCHEDULES, "constant, step or cosine"),
    "step_size": COUNT, "gamma": RATE,
    "warmup": (lambda v: _is_int(v, 0, MAX_SIZE), "a whole number from 0 to 2**31 - 1"),
}
ADAM_SETTINGS = {"lr": RATE, "beta1": FRACTION, "beta2": FRACTION, "eps": RATE,
                 "weight_decay": AT_LEAST_ZERO, **COMMON_SETTINGS}
OPTIMIZER_SETTINGS = {
    "sgd": {"lr": RATE, "momentum": FRACTION, "weight_decay": AT_LEAST_ZERO,
            "nesterov": (lambda v: type(v) is bool, "true or false"), **COMMON_SETTINGS},
    "adam": ADAM_SETTINGS,
    "adamw": ADAM_SETTINGS,
}


def _either(words: tuple[str, ...]) -> str:
    """('sgd', 'adam', 'adamw') -> 'sgd, adam or adamw'."""
    return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high  # not bool, not 3.0


def _is_number(value: Any) -> bool:
    """A finite number that fits a float (an int of 400 digits does not)."""
    if type(value) is int:
        return abs(value) <= 2**63
    return type(value) is float and math.isfinite(value)


def _matches(pattern: re.Pattern, value: Any) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def _is_dims(value: Any, batch: bool) -> bool:
    """A shape: sizes from 1 to options.MAX_SIZE, and with `batch`, the batch size N
    anywhere."""
    return isinstance(value, list) and len(value) <= 8 and all(
        _is_int(d, 1, MAX_SIZE) or (batch and d == "N") for d in value)


def _is_launch(value: Any) -> bool:
    """One CUDA kernel launch (backends.cuda.launches_to_json)."""
    return (isinstance(value, dict)
            and set(value) == {"kernel", "buffers", "threads", "block_reduce", "block_threads"}
            and _matches(NAME, value["kernel"])
            and isinstance(value["buffers"], list)
            and all(_matches(NAME, b) for b in value["buffers"])
            and _is_dims(value["threads"], batch=True)
            and type(value["block_reduce"]) is bool
            and _is_int(value["block_threads"], 1, 1024))


class _Fields:
    """Checks of one manifest, each refusing with the path of the field it is about."""

    def __init__(self, source: str) -> None:
        self.source = source

    def wrong(self, path: str, expected: str, value: Any) -> artifact.CnncModuleError:
        return _refuse(self.source, f"the manifest is malformed: {path} must be {expected}, "
                                    f"got {_shown(value)}")

    def record(self, value: Any, path: str, required: set | frozenset,
               optional: set | frozenset = frozenset()) -> dict[str, Any]:
        """An object with every `required` key and no key beyond `optional`."""
        if not isinstance(value, dict):
            raise self.wrong(path, "an object", value)
        missing = sorted(set(required) - set(value))
        if missing:
            raise _refuse(self.source, "the manifest is malformed: it has no field "
                                       f"{_joined(path, missing[0])}")
        unknown = sorted(set(value) - set(required) - set(optional))
        if unknown:
            raise _refuse(self.source, f"the manifest has the field {_joined(path, unknown[0])}, "
                                       "which this cnnc does not know")
        return value

    def field(self, record: dict[str, Any], key: str, path: str, valid, expected: str) -> Any:
        value = record[key]
        if not valid(value):
            raise self.wrong(_joined(path, key), expected, value)
        return value

    def names(self, value: Any, path: str, within: dict[str, dict] | None = None,
              roles: tuple[str, ...] = ()) -> list[str]:
        """A list of distinct names, each (with `within`) a buffer of one of `roles`."""
        if not isinstance(value, list) or not all(_matches(NAME, v) for v in value):
            raise self.wrong(path, "a list of names", value)
        if len(set(value)) != len(value):
            raise self.wrong(path, "a list of distinct names", value)
        for index, name in enumerate(value):
            if within is not None:
                self.buffer(name, f"{path}[{index}]", within, roles)
        return value

    def buffer(self, name: Any, path: str, storage: dict[str, dict],
               roles: tuple[str, ...]) -> dict[str, Any]:
        """The buffer table's entry `name`, which must have one of `roles`."""
        entry = storage.get(name) if isinstance(name, str) else None
        if entry is not None and entry["role"] in roles:
            return entry
        known = f"; the buffer {name} has the role {entry['role']}" if entry else ""
        raise _refuse(self.source, f"the manifest is malformed: {path} must be the name of a "
                                   f"buffer of role {' or '.join(roles)}, got {_shown(name)}"
                                   + known)


def _joined(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check_fields(manifest: Any, source: str) -> None:
    """Every field of `manifest` of the type and range it must have, and consistent with the
    others, before anything reads it (names and shapes of the buffer table, entry points,
    optimizer settings, ...); else a CnncModuleError that names the field."""
    fields = _Fields(source)
    training = _check_outline(fields, manifest)
    fields.field(manifest, "cnnc_version", "", lambda v: _matches(VERSION, v),
                 "a version like 1.2.3")
    fields.field(manifest, "network", "", lambda v: _matches(NETWORK_NAME, v),
                 "a network name (a letter or _, then letters, digits or _; up to 64)")
    fields.field(manifest, "dtype", "", lambda v: v in ("f32", "f64"), "f32 or f64")
    fields.field(manifest, "code_sha256", "", lambda v: _matches(SHA256, v),
                 "a SHA-256 in hex")
    fields.field(manifest, "opt_level", "", lambda v: _is_int(v, 0, 3),
                 "an integer from 0 to 3")
    fields.field(manifest, "layers", "", lambda v: isinstance(v, list) and all(
        isinstance(row, dict) for row in v), "a list of objects")
    kind = _check_target(fields, manifest)
    _check_build(fields, manifest, kind)
    storage = _check_storage(fields, manifest)
    _check_io(fields, manifest, storage)
    kernels = fields.names(manifest["kernels"], "kernels")  # none: a network that only flattens
    fields.names(manifest["activations"], "activations", storage, ("value",))
    _check_entry_points(fields, manifest, storage, kernels, kind, training)
    if "shared" in manifest:
        _check_shared(fields, manifest, storage, kind)
    if training:
        _check_training(fields, manifest, storage)


def check_outline(manifest: Any, source: str) -> dict[str, Any]:
    """The manifest's target, once the manifest is an object with the fields it must have
    and its target is typed: what the loader checks first, against this machine."""
    fields = _Fields(source)
    _check_outline(fields, manifest)
    _check_target(fields, manifest)
    return manifest["target"]


def _check_outline(fields: _Fields, manifest: Any) -> bool:
    """An object with every field a module has, and no other; whether it is a training
    module's (a loss line: loss, gradients and optimizer)."""
    if not isinstance(manifest, dict):
        raise _refuse(fields.source, "the manifest is malformed (not a JSON object)")
    training = bool(TRAINING_FIELDS & set(manifest))
    fields.record(manifest, "", FIELDS | (TRAINING_FIELDS if training else frozenset()),
                  TABLE_FIELDS | OPTIONAL_FIELDS)
    return training


def _check_target(fields: _Fields, manifest: dict[str, Any]) -> str:
    target = fields.record(manifest["target"], "target", {"kind", "triple", "cpu", "features"})
    kind = fields.field(target, "kind", "target", lambda v: v in ("cpu", "cuda"), "cpu or cuda")
    fields.field(target, "triple", "target", lambda v: _matches(TARGET_WORD, v),
                 "a target triple like x86_64-unknown-linux-gnu")
    fields.field(target, "cpu", "target", lambda v: _matches(TARGET_WORD, v),
                 "a CPU name like skylake")
    fields.field(target, "features", "target", lambda v: isinstance(v, list) and len(v) <= 1000
                 and all(_matches(TARGET_WORD, f) for f in v), "a list of CPU feature names")
    return kind


def _check_build(fields: _Fields, manifest: dict[str, Any], kind: str) -> None:
    keys = {"program", "scheduled", "machine"} if kind == "cpu" else {"program"}
    build = fields.record(manifest["build"], "build", keys)
    fields.field(build, "program", "build", lambda v: isinstance(v, str) and len(v) <= 4096,
                 "the program's name")
    if kind == "cpu":
        fields.field(build, "scheduled", "build", lambda v: type(v) is bool, "true or false")
        fields.field(build, "machine", "build", _is_machine, MACHINE_RANGES_TEXT)


def _check_storage(fields: _Fields, manifest: dict[str, Any]) -> dict[str, dict]:
    """The buffer table by name: each entry's name, role, dtype and shape checked."""
    table = manifest["storage"]
    if not isinstance(table, list) or not table:
        raise fields.wrong("storage", "a list of buffers", table)
    by_name: dict[str, dict] = {}
    for index, entry in enumerate(table):
        path = f"storage[{index}]"
        fields.record(entry, path, {"name", "role", "dtype", "shape"})
        name = fields.field(entry, "name", path, lambda v: _matches(NAME, v), "a tensor name")
        fields.field(entry, "role", path, lambda v: v in ROLES, " or ".join(ROLES))
        fields.field(entry, "dtype", path, lambda v: v in STORAGE_DTYPES,
                     " or ".join(STORAGE_DTYPES))
        fields.field(entry, "shape", path, lambda v: _is_dims(v, batch=True),
                     "a list of up to 8 sizes (whole numbers from 1 to 2**31 - 1) and N")
        if name in by_name:
            raise fields.wrong(f"{path}.name", "a name no other buffer has", name)
        by_name[name] = entry
    inputs = [e["name"] for e in table if e["role"] == "input"]
    if len(inputs) != 1:
        raise fields.wrong("storage", "a buffer table with one input buffer", inputs)
    return by_name


def _check_io(fields: _Fields, manifest: dict[str, Any], storage: dict[str, dict]) -> None:
    """The input and output: a buffer each, of the network's dtype, N samples of the shape."""
    # a network that only flattens outputs its input buffer itself (a view of it)
    for key, roles in (("input", ("input",)), ("output", ("value", "input"))):
        record = fields.record(manifest[key], key, {"name", "shape"})
        shape = fields.field(record, "shape", key, lambda v: _is_dims(v, batch=False) and v,
                             "a list of 1 to 8 sizes (whole numbers from 1 to 2**31 - 1)")
        entry = fields.buffer(record["name"], f"{key}.name", storage, roles)
        if key == "output":  # a flatten's view: the buffer's elements in the output's shape
            _check_output_size(fields, manifest, entry, shape)
        elif not same_json(entry["shape"], ["N", *shape]):
            index = manifest["storage"].index(entry)
            raise fields.wrong(f"storage[{index}].shape", f"N and then {key}.shape "
                               f"{_shown(shape)}, as the buffer {entry['name']} is the "
                               f"network's {key}", entry["shape"])
        if entry["dtype"] != manifest["dtype"]:
            raise fields.wrong("dtype", f"the dtype of the {key} buffer ({entry['dtype']})",
                               manifest["dtype"])


def _check_output_size(fields: _Fields, manifest: dict[str, Any], entry: dict[str, Any],
                       shape: list[int]) -> None:
    sample = entry["shape"][1:] if entry["shape"][:1] == ["N"] else None
    if sample is None or math.prod(sample) != math.prod(shape):
        index = manifest["storage"].index(entry)
        raise fields.wrong(f"storage[{index}].shape", f"N and then {math.prod(shape)} "
                           f"elements a sample, as the buffer {entry['name']} holds the "
                           f"network's output {_shown(shape)}", entry["shape"])


def _check_entry_points(fields: _Fields, manifest: dict[str, Any], storage: dict[str, dict],
                        kernels: list[str], kind: str, training: bool) -> None:
    """An entry point for each role the network has: on the CPU a symbol of its own that
    names no kernel, on cuda the launches it runs, each on buffers of the table."""
    roles = TRAINING_ROLES if training else FORWARD_ROLES
    # pack: the CPU's repacking of weights into the buffers of role packed (schedule.prepack)
    optional = {"forward_train", "pack"} | (TRAINING_MODE_ROLES if training else set())
    entries = fields.record(manifest["entry_points"], "entry_points", roles, optional)
    if ("loss_train" in entries) != ("forward_train" in entries) and training:
        raise fields.wrong("entry_points", "forward_train and loss_train together, or "
                                           "neither", sorted(entries))
    if kind == "cuda":
        for role in entries:
            launches = fields.field(entries, role, "entry_points", lambda v: isinstance(
                v, list) and v and all(_is_launch(item) for item in v), "a list of launches")
            for index, launch in enumerate(launches):
                for place, name in enumerate(launch["buffers"]):
                    fields.buffer(name, f"entry_points.{role}[{index}].buffers[{place}]",
                                  storage, ROLES)
        return
    for role in entries:
        symbol = fields.field(entries, role, "entry_points", lambda v: _matches(NAME, v),
                              "the symbol of an entry point")
        if symbol in kernels:
            raise fields.wrong(f"entry_points.{role}", "an entry point's symbol, not a "
                                                       "kernel's", symbol)
    if len(set(entries.values())) != len(entries):
        raise fields.wrong("entry_points", "a symbol of its own for each role", entries)


def _check_shared(fields: _Fields, manifest: dict[str, Any], storage: dict[str, dict],
                  kind: str) -> None:
    """A CPU module's shared regions: for entry points it has, lists of value and scratch
    buffers, each buffer in one region at most. (A region that holds buffers live at once
    would give wrong results, never a wrong size: the runtime sizes each region for its
    largest buffer.)"""
    if kind != "cpu":
        raise _refuse(fields.source, "the manifest has the field shared, which only a cpu "
                                     "module has")
    shared = fields.record(manifest["shared"], "shared", frozenset(),
                           frozenset(manifest["entry_points"]))
    for role, found in shared.items():
        path = f"shared.{role}"
        if not isinstance(found, list) or not found:
            raise fields.wrong(path, "a list of regions", found)
        for index, region in enumerate(found):
            fields.names(region, f"{path}[{index}]", storage, SHARED_ROLES)
        every = [name for region in found for name in region]
        if len(set(every)) != len(every):
            raise fields.wrong(path, "regions with no buffer in two of them", found)


def _check_training(fields: _Fields, manifest: dict[str, Any], storage: dict[str, dict]) -> None:
    """The loss, the gradient of every parameter and the input, the optimizer's settings."""
    loss = fields.record(manifest["loss"], "loss", {"kind", "target", "value"})
    fields.field(loss, "kind", "loss", lambda v: v in LOSS_KINDS, " or ".join(LOSS_KINDS))
    fields.buffer(loss["target"], "loss.target", storage, ("target",))
    fields.buffer(loss["value"], "loss.value", storage, ("loss",))
    params = {name for name, entry in storage.items() if entry["role"] == "param"}
    wanted = params | {manifest["input"]["name"]}
    gradients = fields.record(manifest["gradients"], "gradients", wanted)
    for name, where in gradients.items():
        fields.buffer(where, f"gradients.{name}", storage, ("value",))
    settings = manifest["optimizer"]
    if not isinstance(settings, dict) or settings.get("kind") not in tuple(OPTIMIZER_SETTINGS):
        shown = settings.get("kind") if isinstance(settings, dict) else settings
        raise fields.wrong("optimizer.kind" if isinstance(settings, dict) else "optimizer",
                           _either(tuple(OPTIMIZER_SETTINGS)) if isinstance(settings, dict)
                           else "an object", shown)
    ranges = OPTIMIZER_SETTINGS[settings["kind"]]
    unknown = sorted(set(settings) - set(ranges) - {"kind"})
    if unknown:
        raise _refuse(fields.source, f"the manifest is malformed: optimizer.{unknown[0]} is "
                                     f"no setting of {settings['kind']}")
    fields.record(settings, "optimizer", {"kind", "lr"}, set(ranges))  # unknown: refused above
    for key, (valid, expected) in ranges.items():
        if key in settings:
            fields.field(settings, key, "optimizer", valid, expected)


# The cost model's inputs, within what real CPUs have: absurd values could make it search
# forever or pick blocks that do not fit.
MACHINE_RANGES = {"vector_bits": (128, 512), "registers": (8, 64),
                  "l1_bytes": (1024, 2**24), "l2_bytes": (2**14, 2**30)}
MACHINE_RANGES_TEXT = ("vector_bits 128, 256 or 512, registers 8..64, l1_bytes 1 KiB..16 MiB "
                       "and l2_bytes 16 KiB..1 GiB, and winograd false or absent")


def _is_machine(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    # written only by a --no-winograd build, so files of earlier builds keep their form
    if "winograd" in value and value["winograd"] is not False:
        return False
    if set(value) - {"winograd"} != set(MACHINE_RANGES):
        return False
    if value.get("vector_bits") not in (128, 256, 512):
        return False
    return all(type(value[k]) is int and low <= value[k] <= high
               for k, (low, high) in MACHINE_RANGES.items())


def same_json(stored: Any, derived: Any) -> bool:
    """Equal as JSON, types included: Python's == has 4.0 == 4 and True == 1, and a size of
    4.0 or true in a buffer table is no size the runtime can allocate."""
    return _canonical(stored) == _canonical(derived)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
