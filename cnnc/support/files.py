"""Writing files the way a user can rely on: atomically, durably, with ordinary permissions.

Every file cnnc writes (module files, weights, checkpoints, downloads, `--emit -o`) goes
through `write_atomically`: the bytes go to a temporary file beside the target, which is
flushed to disk, given the permissions `open()` would have given the target, and renamed
over it; then the folder itself is flushed, so the rename survives a power loss too. A
reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from pathlib import Path

from cnnc.diagnostics import CnncError

# `.NAME.PID.TOKEN.tmp`: the PID says whether the writer is still alive, so the next write
# of the same file can remove what a killed writer left behind. NAME is cut short when the
# whole would be longer than the file system allows, which then fills it exactly.
_TEMPORARY = re.compile(rb"\.(?P<name>.*)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp", re.DOTALL)


def write_atomically(path: str | Path, data: bytes, error: type[CnncError] = CnncError) -> None:
    """Replace `path` by `data` atomically and durably; failures raise `error` in one line.

    A path that is not a regular file, such as /dev/null or a FIFO, is written to directly:
    renaming over a device would replace the device, not write to it. So is anything
    under /proc, /dev/stdout and /dev/fd/N among them: nothing can be created there, and
    a link to a process's open pipe leads to no path to rename onto.
    """
    shown = shown_path(os.fspath(path))
    problem = unusable_path(os.fspath(path))
    if problem is not None:
        raise error.single(f"cannot write {shown}: {problem}")
    try:
        if _in_proc(Path(path)):
            _write_in_place(Path(path), data)
            return
        target = Path(os.path.realpath(path))  # through a symlink, as open() would write
        existing = _existing_mode(target)
        if existing is not None and not stat.S_ISREG(existing):
            if stat.S_ISDIR(existing):
                raise error.single(f"cannot write {shown}: it is a directory")
            _write_in_place(target, data)
            return
        _remove_stale_temporaries(target)
        _write_and_rename(target, data, existing)
    except OSError as failure:
        raise error.single(f"cannot write {shown}: {_reason(failure)}") from None


def unusable_path(path: str) -> str | None:
    """Why `path` cannot name a file to write, found before the system is asked: a NUL
    byte (the system's paths end at one; only Python callers can pass it), a trailing
    slash (it names a folder; Path() would quietly drop it) or no name at all."""
    if "\0" in path:
        return "the path contains a NUL byte"
    if path == "":
        return "the file name is empty"
    if path.endswith(os.sep):
        return "a file name cannot end in " + os.sep
    return None


def shown_path(path: str) -> str:
    """A path as a one-line message shows it: a NUL byte escaped, an empty one as ''."""
    return path.replace("\0", "\\x00") or "''"


def _in_proc(path: Path) -> bool:
    """Whether `path`, its symlinks followed one at a time, leads into /proc."""
    current = os.path.abspath(path)
    for _ in range(40):  # as many links as Linux follows
        folder = os.path.realpath(os.path.dirname(current))
        if folder == "/proc" or folder.startswith("/proc/"):
            return True
        link = os.path.join(folder, os.path.basename(current))
        if not os.path.islink(link):
            return False
        current = os.path.join(folder, os.readlink(link))
    return False


def _existing_mode(path: Path) -> int | None:
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        return None


def _write_in_place(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def _write_and_rename(target: Path, data: bytes, existing: int | None) -> None:
    temporary = target.parent / _temporary_name(target)
    # 0o666 through the umask, as open() gives a new file; an existing file keeps its mode
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if existing is not None:
            os.fchmod(handle, stat.S_IMODE(existing))
        _write_all(handle, data)
        os.fsync(handle)
    except BaseException:
        os.close(handle)
        _unlink_quietly(temporary)
        raise
    os.close(handle)
    try:
        os.replace(temporary, target)
    except BaseException:
        _unlink_quietly(temporary)
        raise
    _sync_folder(target.parent)


def _write_all(handle: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(handle, view)
        view = view[written:]


def _sync_folder(folder: Path) -> None:
    """Flush the folder's entry for the renamed file; some file systems cannot, which is
    no reason to fail the write."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError as failure:
        if failure.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(handle)


def _temporary_name(target: Path) -> str:
    """`.NAME.PID.TOKEN.tmp`, with NAME cut to fit the folder's longest file name."""
    suffix = f".{os.getpid()}.{secrets.token_hex(4)}.tmp".encode()
    name = b"." + os.fsencode(target.name)
    room = _longest_name(target.parent) - len(suffix)
    return os.fsdecode(name[:room] + suffix)


def _longest_name(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255  # what nearly every file system allows


def _remove_stale_temporaries(target: Path) -> None:
    """Temporary files of `target` whose writer process no longer exists."""
    name = os.fsencode(target.name)
    try:
        entries = list(os.scandir(target.parent))
        longest = _longest_name(target.parent)
    except OSError:
        return  # the write itself will say what is wrong with the folder
    for entry in entries:
        found = _TEMPORARY.fullmatch(os.fsencode(entry.name))
        if found is None:
            continue
        written = found["name"]
        # NAME itself, or NAME cut short, which fills the longest file name exactly
        mine = written == name or (name.startswith(written)
                                   and len(os.fsencode(entry.name)) == longest)
        if mine and not _alive(int(found["pid"])):
            _unlink_quietly(Path(entry.path))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _reason(failure: OSError) -> str:
    return failure.strerror or str(failure)
