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

from cnnc.cli.main import emit_stage
from cnnc.driver.pipeline import compile_cuda_module, compile_module, front_end, read_source

REPO = Path(__file__).resolve().parent.parent


def record(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    hashes: dict[str, dict[str, str]] = {}
    for path in sorted((REPO / "examples").glob("*.cnn")):
        source = read_source(path.relative_to(REPO))
        graph = front_end(source)
        name = path.stem
        for stage in ("ir", "grad", "kernels", "loops", "llvm"):
            if stage == "grad" and graph.loss is None:
                continue
            (out / f"{name}.{stage}").write_text(emit_stage(graph, source, stage, 3, True))
        (out / f"{name}.plain-loops").write_text(emit_stage(graph, source, "loops", 3, False))
        (out / f"{name}.cuda").write_text(emit_stage(graph, source, "cuda", 3, True))
        hashes[name] = {
            "cpu-O3": compile_module(graph, source, 3, True).manifest["code_sha256"],
            "cpu-O0-plain": compile_module(graph, source, 0, False).manifest["code_sha256"],
            "cuda": compile_cuda_module(graph, source).manifest["code_sha256"],
        }
    (out / "hashes.json").write_text(json.dumps(hashes, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    record(Path(sys.argv[1]))
