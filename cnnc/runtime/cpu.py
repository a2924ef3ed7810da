"""The CPU engine of a module: its native entry points, the parameters and optimizer state
as numpy arrays, a workspace for each thread, and the thread pool a large batch is cut
among."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cnnc.artifact.format import ModuleFile
from cnnc.artifact.manifest import Manifest
from cnnc.runtime.loader import native_entries, team_worker
from cnnc.runtime.team import Team
from cnnc.runtime.threads import thread_count
from cnnc.runtime.workspace import Table, Workspace

# the roles of buffers a call supplies rather than the workspace
SUPPLIED = ("input", "target", "hyper", "param", "state", "buffer", "noise", "packed")
# what the module keeps between calls, by name
KEPT = ("param", "state", "buffer", "packed")
# the entry points that change parameters or buffers: the packed weights are stale after
CHANGES_PARAMS = ("train_step", "update")


class CpuEngine:
    kind = "cpu"
    exclusive = False
    host_threads = True

    @staticmethod
    def check_available() -> None:
        """The CPU is always there; whether the code fits it is the loader's check."""

    def __init__(self, file: ModuleFile, manifest: Manifest, values: dict[str, np.ndarray],
                 source: str, threads: int | None) -> None:
        self._entries, self._llvm = native_entries(file, manifest, source)  # keep both alive
        # the helper threads' entry point (runtime.team), where the code has one
        self._worker = team_worker(self._llvm)
        self._flops = sum(row.flops for row in manifest.layers)  # a sample's forward pass
        self._storage = manifest.storage
        self._dtype = manifest.numpy_dtype
        self._values = values
        # weights repacked for the kernels (schedule.prepack): filled by the pack entry
        # point before the first call that follows a change of the parameters
        self._values.update({b.name: np.zeros(b.shape, b.numpy_dtype)
                             for b in self._storage if b.role == "packed"})
        self._packs = "pack" in self._entries  # older module files pack in each kernel
        self._stale = self._packs
        self._packing = threading.Lock()
        self._threads = thread_count(threads)
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()  # each thread's workspace, see _workspace
        self._supplied = [(i, b.role, b.name) for i, b in enumerate(self._storage)
                          if b.role in SUPPLIED and b.role not in KEPT]
        self._kept = [(i, b.name) for i, b in enumerate(self._storage) if b.role in KEPT]
        # bumped by each write: a workspace's table holds the kept arrays of one generation
        # (setting 20-40 table slots a call cost a batch-1 call of LeNet-5 about 10 us)
        self._generation = 0
        self._index = {b.name: i for i, b in enumerate(self._storage)}
        # by role: the regions of buffers that share memory (driver.memory), as slot indices
        self._shared = {role: tuple(tuple(self._index[name] for name in region)
                                    for region in found) for role, found in manifest.shared}
        self._shared_names = {role: frozenset(name for region in found for name in region)
                              for role, found in manifest.shared}
        # each kept array's address, with the array it is of: `array.ctypes.data` costs
        # about a microsecond, 20 of them a batch-1 call of LeNet-5; an entry is taken
        # only while `_values` still holds that very array (write replaces arrays)
        self._addresses: dict[str, tuple[np.ndarray, int]] = {}

    # -- threads --------------------------------------------------------------------------
    @property
    def threads(self) -> int:
        return self._threads

    def set_threads(self, count: int) -> None:
        self._threads = count
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def map(self, work: Callable[[slice], Any], slices: list[slice]) -> list[Any]:
        """work(slice) for every slice: the first on this thread, the others in the pool."""
        pool = self.thread_pool()
        try:
            others = [pool.submit(work, part) for part in slices[1:]]
        except RuntimeError:  # set_threads shut this pool down meanwhile: do it all here
            return [work(part) for part in slices]
        first = work(slices[0])
        return [first] + [future.result() for future in others]

    @property
    def worker(self) -> Callable[[int], None] | None:
        """The entry point a team's helper thread runs, or None in older module files."""
        return self._worker

    @property
    def flops(self) -> int:
        """A sample's forward pass, in floating-point operations."""
        return self._flops

    def thread_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="cnnc")
        return self._pool

    # -- running --------------------------------------------------------------------------
    def device_array(self, value: Any) -> None:
        return None  # every array is a host array here

    def run(self, role: str, batch: int, given: Mapping[str, Any],
            read: Sequence[str], whole: bool = False) -> dict[str, np.ndarray]:
        """Gather every buffer (in the buffer table's order) and call the entry point.

        The buffers kernels write are the calling thread's workspace, kept for its next call
        with the same batch size (fresh memory would be page-faulted in on every call), so
        calls from several threads do not mix; what is read is copied out of it. A whole
        call with enough work runs its parallel loops on a team of the engine's threads.
        """
        self._pack()
        team = Team.start(self, batch) if whole else None
        try:
            return self._run(role, batch, given, read, team)
        finally:
            if team is not None:
                team.finish()
            if role in CHANGES_PARAMS:
                self._stale = self._packs

    def _pack(self) -> None:
        """Repack the weights if the parameters changed since they were last packed. Calls
        that only read parameters run at the same time (Module's lock), so the first packs
        and the others wait for it; calls that change them run alone."""
        if not self._stale:
            return
        with self._packing:
            if self._stale:
                arrays, table = self._kept_table({})
                self._entries["pack"](1, table)
                del arrays  # held until the call returned
                self._stale = False

    def _kept_table(self, gradients: Mapping[str, np.ndarray],
                    hyper: np.ndarray | None = None) -> tuple[list[np.ndarray], Any]:
        """The arrays and buffer table of a call that reads only kept arrays, `gradients`
        by name and `hyper` (the pack and update entry points): a placeholder elsewhere."""
        unused = np.zeros(1, dtype=self._dtype)
        arrays = [self._values[b.name] if b.role in KEPT else
                  (hyper if hyper is not None else unused) if b.role == "hyper" else
                  gradients.get(b.name, unused) for b in self._storage]
        return arrays, (ctypes.c_void_p * (len(arrays) + 1))(*[a.ctypes.data for a in arrays], 0)

    def _run(self, role: str, batch: int, given: Mapping[str, Any], read: Sequence[str],
             team: Team | None) -> dict[str, np.ndarray]:
        # a call that reads back a buffer of a region (Module.activations) runs on the
        # plain table: a later buffer of its region may have overwritten it
        shared = role in self._shared and self._shared_names[role].isdisjoint(read)
        workspace = self._workspace(batch).table(role if shared else None)
        buffers, table = workspace.buffers, workspace.pointers
        table[len(self._storage)] = None if team is None else team.address
        self._kept_slots(workspace)
        arrays = list(buffers)
        for index, buffer_role, name in self._supplied:
            if buffer_role == "noise":  # a training call's random numbers, by buffer
                array = given.get("noise", {}).get(name)
            else:
                array = given.get(buffer_role)
            if array is None:  # an entry that does not read it: the placeholder, never a
                array = buffers[index]  # pointer left from an earlier call's array
            arrays[index] = array
            table[index] = array.ctypes.data
        self._entries[role](batch, table)  # `arrays` and `_values` keep the buffers alive
        return {name: arrays[self._index[name]].copy() for name in read}

    def _kept_slots(self, workspace: Table) -> None:
        """The kept arrays' (parameters', state's, packed weights') slots of one of this
        thread's tables, set again only after a write: `_values` holds the arrays meanwhile,
        and a write waits for every call (Module's lock), so no call runs on a stale slot."""
        if workspace.generation == self._generation:
            return
        table = workspace.pointers
        for index, name in self._kept:
            array = self._values[name]
            known = self._addresses.get(name)
            if known is None or known[0] is not array:
                known = self._addresses[name] = (array, array.ctypes.data)
            table[index] = known[1]
        workspace.generation = self._generation

    def _workspace(self, batch: int) -> Workspace:
        """This thread's working memory for a batch of `batch` (the slots of supplied
        arrays are filled in by each call, those of kept arrays by `_kept_slots`)."""
        local = self._local
        found = getattr(local, "workspace", None)
        if found is not None and found.batch == batch:
            return found
        local.workspace = None  # free the old one first
        local.workspace = Workspace(self._storage, batch, self._shared, self._dtype)
        return local.workspace

    def update(self, gradients: Mapping[str, np.ndarray], hyper: np.ndarray,
               batch: int) -> None:
        """The update kernels on parameters, state and the given gradients."""
        arrays, table = self._kept_table(gradients, hyper)
        self._entries["update"](batch, table)
        del arrays  # held until the call returned
        self._stale = self._packs

    # -- parameters and optimizer state -----------------------------------------------------
    def values(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {name: self._values[name].copy() for name in names}

    def write(self, values: Mapping[str, np.ndarray]) -> None:
        self._values.update(values)
        self._generation += 1
        self._stale = self._packs
