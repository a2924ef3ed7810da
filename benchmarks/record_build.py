"""Record what the compiler produces for every example, to prove a refactor changed nothing.

    python benchmarks/record_build.py OUT_DIR

writes, per example: the text of every --emit stage (plain and scheduled loops, LLVM IR at
-O3, the CUDA source) and a JSON file of module code hashes (CPU -O3 scheduled, CPU -O0
plain, CUDA). Run it before and after a change and compare the two folders with `diff -r`.
Outputs depend on the host CPU (vector width), so compare folders made on one machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cnnc.backends.target import host_cpu
from cnnc.cli.compile import emit_stage
from cnnc.driver.pipeline import Options, Stage, advance, run
from cnnc.frontend.source import read_source

REPO = Path(__file__).resolve().parent.parent


def record(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cpu = host_cpu()
    scheduled, plain = Options(cpu, opt_level=3), Options(cpu, opt_level=3, scheduled=False)
    hashes: dict[str, dict[str, str]] = {}
    for path in sorted((REPO / "examples").glob("*.cnn")):
        front = run(read_source(path.relative_to(REPO)), scheduled, until=Stage.SHAPES)
        name = path.stem
        for stage in ("ir", "grad", "kernels", "loops", "llvm"):
            if stage == "grad" and front.graph.loss is None:
                continue
            (out / f"{name}.{stage}").write_text(emit_stage(front, stage, scheduled))
        (out / f"{name}.plain-loops").write_text(emit_stage(front, "loops", plain))
        (out / f"{name}.cuda").write_text(emit_stage(front, "cuda", scheduled))
        hashes[name] = {
            "cpu-O3": _code_hash(front, scheduled),
            "cpu-O0-plain": _code_hash(front, Options(cpu, opt_level=0, scheduled=False)),
            "cuda": _code_hash(front, Options(backend="cuda")),
        }
    (out / "hashes.json").write_text(json.dumps(hashes, indent=2, sort_keys=True) + "\n")


def _code_hash(front, options: Options) -> str:
    return advance(front, options).module.manifest["code_sha256"]


if __name__ == "__main__":
    record(Path(sys.argv[1]))
