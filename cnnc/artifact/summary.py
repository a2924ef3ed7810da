"""The per-layer summary a module file records: its rows, the table `cnnc summary` prints,
and its JSON. It needs no front end: `from_manifest` reads a manifest, and
`passes.summary.summarize` makes the same rows from a typed graph at compile time."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cnnc.artifact.manifest import LayerRow, Manifest

FLOPS_NOTE = "FLOPs: 2 per multiply-add of conv and dense layers, for one sample"
MEMORY_NOTE = ("memory: the parameters' bytes, and the bytes of the tensors a layer writes "
               "for one sample (its output; max pooling also its argmax)")
DTYPE_BYTES = {"f32": 4, "f64": 8, "i32": 4, "i64": 8}


@dataclass(frozen=True)
class Summary:
    """What `cnnc summary` shows; `str()` and `repr()` are the table."""

    network: str
    dtype: str
    input: tuple[str, tuple[int, ...]]
    output: tuple[str, tuple[int, ...]]
    rows: tuple[LayerRow, ...]
    parameters: tuple[tuple[str, tuple[int, ...]], ...]
    loss: str | None

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def trainable_params(self) -> int:
        return self.total_params  # every parameter of a cnnc network is trained

    def __str__(self) -> str:
        return format_table(self)

    __repr__ = __str__


def rows_to_json(summary: Summary) -> list[dict[str, Any]]:
    """The rows as a module file's manifest records them."""
    return [row.to_json() for row in summary.rows]


def from_manifest(manifest: Manifest | dict[str, Any]) -> Summary:
    """The summary a module file's manifest holds (checked against its program on load);
    a dict is a manifest's JSON, after the field checks."""
    if isinstance(manifest, dict):
        manifest = Manifest.from_json(manifest)
    params = tuple((e.name, tuple(e.shape)) for e in manifest.storage if e.role == "param")
    loss = manifest.loss.kind if manifest.loss is not None else None
    return Summary(manifest.network, manifest.dtype,
                   (manifest.input.name, manifest.input.shape),
                   (manifest.output.name, manifest.output.shape), manifest.layers, params, loss)


def format_table(summary: Summary) -> str:
    rows = summary.rows
    header = ("layer", "kind", "output shape", "params", "FLOPs", "param bytes",
              "act. bytes")
    cells = [(r.name, r.kind, _shape(r.output_shape), f"{r.params:,}",
              f"{r.flops:,}", f"{r.param_bytes:,}", f"{r.activation_bytes:,}") for r in rows]
    total = ("total", "", "", f"{summary.total_params:,}", f"{sum(r.flops for r in rows):,}",
             f"{sum(r.param_bytes for r in rows):,}",
             f"{sum(r.activation_bytes for r in rows):,}")
    widths = [max(len(row[i]) for row in [header, *cells, total]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        left = [row[i].ljust(widths[i]) for i in range(3)]
        right = [row[i].rjust(widths[i]) for i in range(3, len(row))]
        return "  ".join(left + right).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [f"network {summary.network} ({summary.dtype}; shapes are per sample, "
           f"the batch size is chosen at run time)", line(header), rule]
    out += [line(c) for c in cells]
    out += [rule, line(total),
            f"parameters: {summary.total_params:,} in all, {summary.trainable_params:,} "
            f"trainable ({human_bytes(sum(r.param_bytes for r in rows))}); activations of "
            f"one sample: {human_bytes(sum(r.activation_bytes for r in rows))}",
            FLOPS_NOTE, MEMORY_NOTE]
    return "\n".join(out) + "\n"


def _shape(shape: tuple[int, ...]) -> str:
    """A row's output shape as the graph printer shows it (graph.ir.format_shape, "x")."""
    return "x".join(str(d) for d in shape) if shape else "scalar"


def human_bytes(count: int) -> str:
    """1,536 -> '1.5 KiB': sizes a reader takes in at a glance."""
    if count < 1024:
        return f"{count:,} bytes"
    size = count / 1024
    for unit in ("KiB", "MiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} GiB"


def to_json(summary: Summary) -> str:
    data = {
        "network": summary.network,
        "dtype": summary.dtype,
        "input": {"name": summary.input[0], "shape": list(summary.input[1])},
        "output": {"name": summary.output[0], "shape": list(summary.output[1])},
        "layers": rows_to_json(summary),
        "parameters": [{"name": n, "shape": list(s)} for n, s in summary.parameters],
        "total_params": summary.total_params,
        "trainable_params": summary.trainable_params,
        "total_flops": sum(r.flops for r in summary.rows),
        "param_bytes": sum(r.param_bytes for r in summary.rows),
        "activation_bytes_per_sample": sum(r.activation_bytes for r in summary.rows),
        "loss": summary.loss,
    }
    return json.dumps(data, indent=2) + "\n"
