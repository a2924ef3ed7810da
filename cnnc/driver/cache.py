"""The compile cache: a module file kept by what it was built from, so compiling the same
program again with the same options maps its code instead of running LLVM again.

The key is a SHA-256 over everything the module's bytes depend on: the program's text and
the name it is compiled under (the manifest records it), its dtype, the backend, and for
the CPU the opt level, whether kernels are scheduled, and the whole `CpuTarget` (triple,
CPU, features, the cost model's machine); then cnnc's version, a hash of the compiler's own
files (so an edited checkout never reuses what older code built), llvmlite's and LLVM's
versions, numpy's (it draws the initial parameters), the module format's and this cache's.
The value is the module file's bytes, exactly what `cnnc compile -o` writes.

Where: `CNNC_CACHE_DIR` if set, else `$XDG_CACHE_HOME/cnnc`, else `~/.cache/cnnc`; each
entry is `KEY.cnnm`. The cache never fails a compile: an entry that cannot be read, does not
unpack, or whose program or build record is not the key's is a miss, and the fresh module
overwrites it. A folder that cannot be used (it cannot be made, a file is in the way, it
is not writable) gives one warning a process, and the compile goes on without it; an entry
that cannot be written (a full disk, a file size limit) is left out without a word.
Entries are written atomically (`support.files`: a temporary file beside the entry, renamed
over it), so processes and threads compiling at once each see a whole entry or none;
threads of one process wait for the one compiling the same key, then read what it stored.
At most `MAX_ENTRIES` entries and `MAX_BYTES` bytes are kept: after each write the least
recently used go (a hit touches its entry).

An entry's native code runs when it is used, as a module file's does: the cache folder is
trusted like your own module files (it is made private to you). Its hashes are checked
(damage: `artifact.format.unpack`), its stored program and build record must be the key's,
and the `Module` made from it checks its manifest as it checks any module's; it is not
derived again from its program (`driver.trust`), which takes longer than the cache saves.
CUDA modules are kept too: the same file, for any CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnc import version
from cnnc.artifact import format as artifact
from cnnc.diagnostics import CnncError
from cnnc.driver.module_file import CUDA_TARGET, build_record
from cnnc.driver.pipeline import advance
from cnnc.support import files

if TYPE_CHECKING:
    from cnnc.driver.pipeline import Build, Options

CACHE_FORMAT = 1  # of the key and the entries: a new one leaves the old entries unused
MAX_ENTRIES = 500
MAX_BYTES = 2 * 2**30  # ResNet-20 forward and backward is a 14 MB entry, LeNet-5 under 1 MB
STALE_TEMPORARY_S = 24 * 3600  # a temporary file this old belongs to a writer that died

_ENTRY = re.compile(r"[0-9a-f]{64}\.cnnm")
_TEMPORARY = re.compile(r"\.[0-9a-f]{64}\.cnnm\..*\.tmp")


class CnncCacheWarning(UserWarning):
    """The compile cache's folder cannot be used; compiles go on without it."""


def module_file(front: Build, options: Options, use: bool = True
                ) -> tuple[artifact.ModuleFile, bool]:
    """The module file of `front` (a build whose front end has run) built with `options`,
    and whether it came from the cache. `use=False` neither reads nor writes the cache."""
    folder = cache_folder() if use else None
    try:
        key = None if folder is None else cache_key(front, options)
    except OSError:  # one of cnnc's own files cannot be read for the fingerprint
        key = None
    if key is None:
        return advance(front, options).module, False
    entry = folder / f"{key}.cnnm"
    with _key_lock(key):  # a second thread waits, then finds what the first stored
        found = _read(entry, front, options)
        if found is not None:
            return found, True
        built = advance(front, options).module
        _store(folder, entry, built)
        return built, False


def cache_folder() -> Path | None:
    """`CNNC_CACHE_DIR`, `$XDG_CACHE_HOME/cnnc` or `~/.cache/cnnc`; None without a home."""
    given = os.environ.get("CNNC_CACHE_DIR")
    if given:
        return Path(given)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG rule: a relative path is to be ignored
        return Path(xdg) / "cnnc"
    try:
        return Path.home() / ".cache" / "cnnc"
    except RuntimeError:  # no HOME and no password entry
        return None


def cache_key(front: Build, options: Options) -> str:
    """SHA-256 over the program, the options that change the module, and the versions of
    everything that made it (see the module's docstring)."""
    import llvmlite
    import llvmlite.binding as llvm
    import numpy as np

    fields: dict[str, Any] = {
        "cache": CACHE_FORMAT, "format": artifact.FORMAT_VERSION,
        "cnnc": version.__version__, "compiler": compiler_fingerprint(),
        "llvmlite": llvmlite.__version__, "llvm": list(llvm.llvm_version_info),
        "numpy": np.__version__, "program": front.source.text, "name": front.source.name,
        "dtype": front.graph.dtype.value, "backend": options.backend,
    }
    if options.backend == "llvm":  # a CUDA module is the same for any opt level and CPU
        target = options.cpu()
        fields.update(opt_level=options.opt_level, scheduled=bool(options.scheduled),
                      target={"triple": target.triple, "cpu": target.cpu,
                              "features": target.features,
                              "machine": dataclasses.asdict(target.machine)})
    text = json.dumps(fields, sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@functools.cache
def compiler_fingerprint() -> str:
    """SHA-256 of cnnc's own source files and grammar: the version string alone does not
    change while the compiler is worked on. About 5 ms, once a process."""
    from cnnc.frontend.grammar import grammar_text

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(grammar_text().encode("utf-8"))
    for path in sorted(root.rglob("*.py")):
        digest.update(b"\0" + path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


# --- reading ---------------------------------------------------------------------------

def _read(entry: Path, front: Build, options: Options) -> artifact.ModuleFile | None:
    """The module file of `entry` when it is whole and is what the key describes."""
    try:
        data = entry.read_bytes()
    except OSError:  # none yet, or a folder that cannot be read: a miss
        return None
    try:
        file = artifact.unpack(data, str(entry))
    except CnncError:  # damaged (its hashes do not match) or truncated: build it again
        return None
    if artifact.missing_sections(file):  # a stripped file: the cache keeps whole ones
        return None
    if not _is_build_of(file.manifest, file.sections, front, options):
        return None
    with contextlib.suppress(OSError):  # a read-only cache: still a hit
        os.utime(entry)  # the least recently used entries are the ones evicted
    # as the build made it, so that it packs to the same bytes: the section table is
    # pack's, and the sections in the order they were packed (unpack gives the table's)
    table = file.manifest["sections"]
    manifest = {key: value for key, value in file.manifest.items() if key != "sections"}
    order = sorted(file.sections, key=lambda name: table[name]["offset"])
    return artifact.ModuleFile(manifest, {name: file.sections[name] for name in order})


def _is_build_of(manifest: dict[str, Any], sections: dict[str, bytes], front: Build,
                 options: Options) -> bool:
    """Whether the entry holds this program built with these options, as its manifest
    records them: a file renamed into the cache, or a key of another meaning, is a miss."""
    if sections.get("program") != front.source.text.encode("utf-8") \
            or manifest.get("dtype") != front.graph.dtype.value:
        return False
    if options.backend == "cuda":
        return (manifest.get("target") == CUDA_TARGET
                and manifest.get("build") == {"program": front.source.name})
    target = options.cpu()
    features = [f[1:] for f in target.features.split(",") if f.startswith("+")]
    return (manifest.get("opt_level") == options.opt_level
            and manifest.get("build") == build_record(front.source, options.scheduled,
                                                      target.machine)
            and manifest.get("target") == {"kind": "cpu", "triple": target.triple,
                                           "cpu": target.cpu, "features": features})


# --- writing and evicting --------------------------------------------------------------

def _store(folder: Path, entry: Path, file: artifact.ModuleFile) -> None:
    """Write the entry atomically, then evict. A folder that cannot be used warns (once);
    an entry that cannot be written (a full disk, a file size limit) is left out quietly:
    the cache did nothing wrong, and the command's own output will meet the same limit."""
    problem = _unusable(folder)
    if problem is not None:
        _warn_once(folder, problem)
        return
    try:
        files.write_atomically(entry, artifact.pack(file))
    except CnncError:  # its temporary file is removed: no half entry is ever left
        return
    _evict(folder, entry)


def _unusable(folder: Path) -> str | None:
    """Why `folder` cannot hold the cache, once it is made (private to the user) if need be."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        return "it is not a folder"
    except OSError as error:
        return (error.strerror or str(error)).lower()
    if not os.access(folder, os.W_OK | os.X_OK):
        return "it is not writable"
    return None


_WARNED: set[str] = set()


def _warn_once(folder: Path, reason: str) -> None:
    if str(folder) in _WARNED:
        return
    _WARNED.add(str(folder))
    warnings.warn(CnncCacheWarning(
        f"the compile cache {files.shown_path(str(folder))} cannot be used ({reason}); "
        "compiling without it (set CNNC_CACHE_DIR to a folder you can write; --no-cache or "
        "cache=False turns the cache off)"), stacklevel=4)


def _evict(folder: Path, keep: Path) -> None:
    """The least recently used entries, until at most MAX_ENTRIES and MAX_BYTES are left
    (`keep`, just written, stays), and temporary files that dead writers left."""
    entries, now = [], time.time()
    try:
        with os.scandir(folder) as scan:
            for item in scan:
                if _ENTRY.fullmatch(item.name):
                    status = item.stat()
                    entries.append((status.st_mtime_ns, status.st_size, item.path))
                elif _TEMPORARY.fullmatch(item.name) and \
                        now - item.stat().st_mtime > STALE_TEMPORARY_S:
                    _unlink_quietly(item.path)
    except OSError:  # another process evicting at the same moment: its turn
        return
    count, total = len(entries), sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if count <= MAX_ENTRIES and total <= MAX_BYTES:
            break
        if path != str(keep):
            _unlink_quietly(path)
            count, total = count - 1, total - size


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):  # gone already: another process evicted it
        os.unlink(path)


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def _key_lock(key: str) -> threading.Lock:
    with _LOCKS_LOCK:
        return _LOCKS.setdefault(key, threading.Lock())
