"""The compile cache (`cnnc.driver.cache`): a hit is the module a fresh compile gives, byte for
byte and output for output; every option that changes the module misses; cache=False and
--no-cache leave it alone; damaged entries are rebuilt; threads and processes compiling at
once share one whole entry; a folder that cannot be written only warns. The oracle is always
a compile with the cache off."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import cnnc
from cnnc.artifact import format as artifact
from cnnc.diagnostics import CnncWarning, Source
from cnnc.driver import cache
from conftest import run_cli

SMALL = ("network small\ninput: 1x6x6\nconv c: 3 3x3 -> relu\nmaxpool 2x2\n"
         "dense out: 3 -> softmax\nloss cross_entropy\ntrain sgd lr=0.1 momentum=0.9 seed=4\n")


def small(seed: int) -> str:
    return SMALL.replace("seed=4", f"seed={seed}")


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own cache folder (not made yet: the first store makes it)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("CNNC_CACHE_DIR", str(path))
    monkeypatch.setattr(cache, "_WARNED", set())
    return path


@pytest.fixture
def codegen_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The backend of each code generation the compiles ran: a hit runs none."""
    from cnnc.backends.cuda import codegen as cuda_codegen
    from cnnc.backends.llvm import codegen as llvm_codegen

    runs: list[str] = []

    def counted(name: str, real):
        def run(*args, **kwargs):
            runs.append(name)
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(llvm_codegen, "compile_functions",
                        counted("llvm", llvm_codegen.compile_functions))
    monkeypatch.setattr(cuda_codegen, "generate", counted("cuda", cuda_codegen.generate))
    return runs


def entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.cnnm")) if folder.is_dir() else []


def saved(module: cnnc.Module, path: Path) -> bytes:
    module.save(path)
    return path.read_bytes()


def same_outputs(a: cnnc.Module, b: cnnc.Module, seed: int = 0) -> bool:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, *a.input_shape)).astype(a.dtype)
    first, second = a(x), b(x)
    return first.dtype == second.dtype and first.tobytes() == second.tobytes()


# --- hits ----------------------------------------------------------------------------------

def test_a_hit_runs_no_code_generation_and_is_a_fresh_compile(folder, codegen_runs, tmp_path):
    first = cnnc.compile(SMALL)
    assert codegen_runs == ["llvm"] and len(entries(folder)) == 1
    hit = cnnc.compile(SMALL)
    assert codegen_runs == ["llvm"]  # mapped from the cache
    fresh = cnnc.compile(SMALL, cache=False)
    assert codegen_runs == ["llvm", "llvm"]
    assert same_outputs(hit, fresh) and same_outputs(first, fresh, seed=1)
    assert hit.manifest == fresh.manifest
    expected = saved(fresh, tmp_path / "fresh.cnnm")
    assert saved(hit, tmp_path / "hit.cnnm") == expected
    assert entries(folder)[0].read_bytes() == expected  # the entry is the module file
    labels = np.array([0, 2, 1])
    x = np.random.default_rng(2).standard_normal((3, 1, 6, 6)).astype(np.float32)
    assert hit.train_step(x, labels) == fresh.train_step(x, labels)
    assert same_outputs(hit, fresh, seed=3)


def test_cnnc_compile_from_the_cache_writes_the_same_file(folder, codegen_runs, tmp_path,
                                                          capsys):
    program = tmp_path / "small.cnn"
    program.write_text(SMALL)
    code, out, err = run_cli(capsys, "compile", str(program), "-o", str(tmp_path / "a.cnnm"))
    assert (code, err) == (0, "") and "from the compile cache" not in out
    code, out, err = run_cli(capsys, "compile", str(program), "-o", str(tmp_path / "b.cnnm"))
    assert (code, err) == (0, "") and out.rstrip().endswith(", from the compile cache)")
    code, out, err = run_cli(capsys, "compile", str(program), "--no-cache", "-o",
                             str(tmp_path / "c.cnnm"))
    assert (code, err) == (0, "") and "from the compile cache" not in out
    assert codegen_runs == ["llvm", "llvm"]
    first = (tmp_path / "a.cnnm").read_bytes()
    assert (tmp_path / "b.cnnm").read_bytes() == first == (tmp_path / "c.cnnm").read_bytes()
    assert [entry.read_bytes() for entry in entries(folder)] == [first]
    # the command and cnnc.compile share entries: the same program under the same name
    cnnc.compile(program)
    assert codegen_runs == ["llvm", "llvm"]


def test_a_cuda_module_is_cached_for_any_opt_level(folder, codegen_runs, tmp_path):
    first = cnnc.compile(SMALL, target="cuda")
    hit = cnnc.compile(SMALL, target="cuda", opt_level=1)  # the CPU's option only
    assert codegen_runs == ["cuda"]
    fresh = cnnc.compile(SMALL, target="cuda", cache=False)
    assert codegen_runs == ["cuda", "cuda"]
    assert same_outputs(hit, fresh) and same_outputs(first, fresh)
    assert saved(hit, tmp_path / "hit.cnnm") == saved(fresh, tmp_path / "fresh.cnnm")
    cnnc.compile(SMALL, opt_level=0)  # the CPU module is another entry
    assert codegen_runs == ["cuda", "cuda", "llvm"] and len(entries(folder)) == 2


def test_the_front_end_runs_on_a_hit(folder, codegen_runs):
    """Warnings are said on every compile, and the entry is used after them."""
    text = ("network t\ninput x: 2x6x6\nconv a: 3 1x1\nconv b: 3 1x1 from=x\nflatten\n"
            "dense out: 2\n")
    said = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cnnc.compile(text)
        said.append([str(w.message) for w in caught if issubclass(w.category, CnncWarning)])
    assert said[0] == said[1] and len(said[0]) == 1
    assert "warning: the output of conv a is never read" in said[0][0]
    assert codegen_runs == ["llvm"]


# --- misses ----------------------------------------------------------------------------------

CHANGES = {
    "program": ({"program": small(5)}, lambda m: m.params["c.weight"].dtype == np.float32),
    "dtype": ({"dtype": "f64"}, lambda m: m.dtype == np.float64),
    "opt level": ({"opt_level": 1}, lambda m: m.manifest["opt_level"] == 1),
    "schedule": ({"schedule": False}, lambda m: m.manifest["build"]["scheduled"] is False),
    "name": ({"program": Source(SMALL, "other.cnn")},
             lambda m: m.manifest["build"]["program"] == "other.cnn"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_that_changes_the_module_misses(change, folder, codegen_runs):
    base = cnnc.compile(SMALL, opt_level=0)
    arguments, built = CHANGES[change]
    arguments = {"program": SMALL, "opt_level": 0, **arguments}
    changed = cnnc.compile(arguments.pop("program"), **arguments)
    assert codegen_runs == ["llvm", "llvm"] and len(entries(folder)) == 2
    assert built(changed)
    if change == "program":  # another seed: other initial parameters
        assert not np.array_equal(changed.params["c.weight"], base.params["c.weight"])
    cnnc.compile(SMALL, opt_level=0)  # both are kept
    assert codegen_runs == ["llvm", "llvm"]


def test_another_cnnc_version_misses(folder, codegen_runs, monkeypatch):
    from cnnc import version

    cnnc.compile(SMALL, opt_level=0)
    monkeypatch.setattr(version, "__version__", "999.0.0")
    cnnc.compile(SMALL, opt_level=0)
    assert codegen_runs == ["llvm", "llvm"] and len(entries(folder)) == 2


def test_an_edited_compiler_misses(folder, codegen_runs, monkeypatch):
    """The version string stays while cnnc is worked on; its files' hash does not."""
    cnnc.compile(SMALL, opt_level=0)
    monkeypatch.setattr(cache, "compiler_fingerprint", lambda: "0" * 64)
    cnnc.compile(SMALL, opt_level=0)
    assert codegen_runs == ["llvm", "llvm"] and len(entries(folder)) == 2


# --- off -------------------------------------------------------------------------------------

def test_cache_false_neither_reads_nor_writes(folder, codegen_runs):
    cnnc.compile(SMALL, opt_level=0, cache=False)
    assert not folder.exists()
    cnnc.compile(SMALL, opt_level=0)
    entry = entries(folder)[0]
    os.utime(entry, ns=(10**18, 10**18))  # a hit would make it the most recently used
    before = entry.read_bytes()
    cnnc.compile(SMALL, opt_level=0, cache=False)
    assert codegen_runs == ["llvm"] * 3
    assert entry.read_bytes() == before and entry.stat().st_mtime_ns == 10**18
    assert entries(folder) == [entry]


def test_no_cache_for_train_and_eval(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.cnn").write_text(SMALL)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((20, 1, 6, 6)).astype(np.float32),
             y=rng.integers(0, 3, 20))
    train = ["train", "small.cnn", "--data", "d.npz", "--epochs", "1", "--no-progress"]
    assert run_cli(capsys, *train, "--no-cache")[0] == 0
    evaluate = ["eval", "small.cnn", "--weights", "small.weights.npz", "--data", "d.npz"]
    code, out, _ = run_cli(capsys, *evaluate, "--no-cache")
    assert code == 0 and "small on " in out
    assert not folder.exists()
    assert run_cli(capsys, *evaluate)[0] == 0
    assert len(entries(folder)) == 1


def test_emit_and_explain_schedule_leave_the_cache_alone(folder, codegen_runs, tmp_path,
                                                         capsys):
    program = tmp_path / "small.cnn"
    program.write_text(SMALL)
    assert run_cli(capsys, "compile", str(program), "-o", str(tmp_path / "a.cnnm"))[0] == 0
    before = [(entry, entry.read_bytes()) for entry in entries(folder)]
    for extra in (["--emit", "llvm"], ["--emit", "loops"], ["--explain-schedule"]):
        code, out, _ = run_cli(capsys, "compile", str(program), *extra)
        assert code == 0 and out
    assert codegen_runs == ["llvm", "llvm"]  # --emit llvm generated its code
    assert [(entry, entry.read_bytes()) for entry in entries(folder)] == before


# --- damage and concurrency --------------------------------------------------------------------

def _truncated(good: bytes, other: bytes) -> bytes:
    return good[:len(good) // 2]


def _one_byte_changed(good: bytes, other: bytes) -> bytes:
    middle = len(good) // 2
    return good[:middle] + bytes([good[middle] ^ 0xFF]) + good[middle + 1:]


DAMAGE = {"truncated": _truncated, "one byte changed": _one_byte_changed,
          "no module": lambda good, other: b"not a module file",
          "empty": lambda good, other: b"",
          "another build's entry": lambda good, other: other}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_built_again_and_replaced(damage, folder, codegen_runs, tmp_path):
    cnnc.compile(SMALL, opt_level=0)
    entry, = entries(folder)
    good = entry.read_bytes()
    other = b""
    if damage == "another build's entry":  # whole, but of the same program at -O1
        cnnc.compile(SMALL, opt_level=1)
        other, = (e.read_bytes() for e in entries(folder) if e != entry)
    entry.write_bytes(DAMAGE[damage](good, other))
    module = cnnc.compile(SMALL, opt_level=0)
    assert codegen_runs == ["llvm"] * (len(entries(folder)) + 1)
    assert entry.read_bytes() == good  # the fresh build's bytes
    assert saved(module, tmp_path / "m.cnnm") == good


def test_threads_compiling_one_program_at_once_share_one_entry(folder, codegen_runs):
    with ThreadPoolExecutor(4) as pool:
        modules = list(pool.map(lambda _: cnnc.compile(SMALL), range(4)))
    assert codegen_runs == ["llvm"]  # the others waited for the first, then read its entry
    fresh = cnnc.compile(SMALL, cache=False)
    assert all(same_outputs(module, fresh) for module in modules)
    assert [p.name for p in folder.iterdir()] == [entries(folder)[0].name]  # no temporaries
    artifact.unpack(entries(folder)[0].read_bytes(), "entry")


PROCESS = """
import sys
import numpy as np
import cnnc
module = cnnc.compile(sys.argv[1], opt_level=0)
x = np.random.default_rng(0).standard_normal((4, 1, 6, 6)).astype(np.float32)
sys.stdout.write(module(x).tobytes().hex())
"""


def test_two_processes_compiling_at_once_both_succeed(folder, tmp_path):
    program = tmp_path / "small.cnn"
    program.write_text(SMALL)
    runs = [subprocess.Popen([sys.executable, "-c", PROCESS, str(program)], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(*run.communicate(timeout=300), run.returncode) for run in runs]
    assert [code for _, _, code in results] == [0, 0], [err for _, err, _ in results]
    fresh = cnnc.compile(program, opt_level=0, cache=False)
    x = np.random.default_rng(0).standard_normal((4, 1, 6, 6)).astype(np.float32)
    assert [out for out, _, _ in results] == [fresh(x).tobytes().hex()] * 2
    assert [p.name for p in folder.iterdir()] == [entries(folder)[0].name]
    assert artifact.unpack(entries(folder)[0].read_bytes(), "entry").manifest["build"][
        "program"] == str(program)


# --- folders that cannot be used, eviction, where -----------------------------------------------

@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_folder_that_cannot_be_written_warns_once_and_compiles(where, tmp_path, monkeypatch,
                                                                 codegen_runs, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    given = blocker if where == "a file" else blocker / "cache"
    monkeypatch.setenv("CNNC_CACHE_DIR", str(given))
    monkeypatch.setattr(cache, "_WARNED", set())
    with pytest.warns(cache.CnncCacheWarning, match="cannot be used") as caught:
        module = cnnc.compile(SMALL, opt_level=0)
    assert len(caught) == 1 and str(given) in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once a process
        again = cnnc.compile(SMALL, opt_level=0)
    assert codegen_runs == ["llvm", "llvm"] and blocker.read_text() == "not a folder"
    assert same_outputs(module, again)
    monkeypatch.setattr(cache, "_WARNED", set())
    program = tmp_path / "small.cnn"
    program.write_text(SMALL)
    code, out, err = run_cli(capsys, "compile", str(program), "-o", str(tmp_path / "a.cnnm"))
    assert code == 0 and out.startswith("wrote ")
    assert err.count("\n") == 1 and err.startswith("warning: the compile cache ")


def test_an_entry_that_cannot_be_written_is_left_out_quietly(folder, codegen_runs,
                                                             monkeypatch):
    """A full disk or a file size limit: the command's own output will say so."""
    from cnnc.diagnostics import CnncError

    def full(path, data, error=CnncError):
        raise error.single(f"cannot write {path}: No space left on device")

    monkeypatch.setattr(cache.files, "write_atomically", full)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = cnnc.compile(SMALL, opt_level=0)
    assert folder.is_dir() and entries(folder) == []
    assert same_outputs(module, cnnc.compile(SMALL, opt_level=0, cache=False))


def test_the_least_recently_used_entries_are_evicted(folder, codegen_runs, monkeypatch):
    monkeypatch.setattr(cache, "MAX_ENTRIES", 2)
    names = {}
    for seed in (1, 2):
        known = set(entries(folder))
        cnnc.compile(small(seed), opt_level=0)
        names[seed], = set(entries(folder)) - known
    os.utime(names[1], ns=(10**9, 10**9))
    os.utime(names[2], ns=(2 * 10**9, 2 * 10**9))
    cnnc.compile(small(1), opt_level=0)  # a hit: now the most recently used
    cnnc.compile(small(3), opt_level=0)
    assert codegen_runs == ["llvm"] * 3
    assert names[1].exists() and not names[2].exists() and len(entries(folder)) == 2
    cnnc.compile(small(1), opt_level=0)
    assert codegen_runs == ["llvm"] * 3


def test_the_cache_keeps_to_its_bytes_and_clears_dead_writers_files(folder, codegen_runs,
                                                                   monkeypatch):
    cnnc.compile(small(1), opt_level=0)
    first, = entries(folder)
    monkeypatch.setattr(cache, "MAX_BYTES", first.stat().st_size + 1)
    stale, live = (folder / f".{'a' * 64}.cnnm.{pid}.0123abcd.tmp" for pid in (1, 2))
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    os.utime(stale, ns=(10**9, 10**9))
    cnnc.compile(small(2), opt_level=0)
    assert not first.exists() and len(entries(folder)) == 1  # the newest stays
    assert not stale.exists() and live.exists()


def test_where_the_cache_is(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNC_CACHE_DIR", str(tmp_path / "given"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_folder() == tmp_path / "given"
    monkeypatch.setenv("CNNC_CACHE_DIR", "")  # empty: as if not set
    assert cache.cache_folder() == tmp_path / "xdg" / "cnnc"
    monkeypatch.delenv("CNNC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # ignored, as the XDG rules say
    assert cache.cache_folder() == tmp_path / "home" / ".cache" / "cnnc"
