"""`cnnc plot METRICS.jsonl -o curve.png`: the training curve from a `--log` file.

matplotlib is an optional extra (`pip install 'cnnc[plot]'`); nothing else in cnnc needs it.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from cnnc.support.files import write_atomically
from cnnc.training.data import CnncDataError

MAX_LOG_BYTES = 64 * 2**20  # a line an epoch: millions of epochs before this is reached
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}


def read_log(path: Path) -> list[dict[str, Any]]:
    """The epochs of a metrics log, each checked: a JSON object with an integer epoch and a
    finite training loss; held-out loss and accuracy may be null."""
    try:
        if not path.is_file():
            reason = "it is not a regular file" if path.exists() else "no such file"
            raise CnncDataError.single(f"cannot read {path}: {reason}")
        with path.open("rb") as handle:
            data = handle.read(MAX_LOG_BYTES + 1)
    except OSError as error:
        raise CnncDataError.single(f"cannot read {path}: {error.strerror or error}") from None
    if len(data) > MAX_LOG_BYTES:
        raise CnncDataError.single(f"{path} is larger than {MAX_LOG_BYTES // 2**20} MiB, not "
                                   "a metrics log")
    records = [_record(path, number, line)
               for number, line in enumerate(data.splitlines(), start=1) if line.strip()]
    if not records:
        raise CnncDataError.single(f"{path} holds no epochs")
    return records


def _record(path: Path, number: int, line: bytes) -> dict[str, Any]:
    def refuse(reason: str) -> CnncDataError:
        return CnncDataError.single(f"{path}:{number}: {reason}")

    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        raise refuse("not a JSON line of cnnc train --log") from None
    if not isinstance(record, dict):
        raise refuse("not a JSON object")
    if type(record.get("epoch")) is not int:
        raise refuse("its epoch must be an integer")
    for key in ("loss", "held_out_loss", "accuracy"):
        value = record.get(key)
        optional = key != "loss"
        if (value is None and optional) or (isinstance(value, (int, float))
                                            and not isinstance(value, bool)
                                            and math.isfinite(value)):
            continue
        raise refuse(f"its {key} must be a finite number{' or null' if optional else ''}")
    return record


def figure(records: list[dict[str, Any]]):
    """Losses against epochs, and the held-out accuracy on a second axis when there is one."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    axes = fig.add_subplot()
    axes.plot(epochs, [r["loss"] for r in records], marker="o", label="training loss")
    held = [(r["epoch"], r["held_out_loss"]) for r in records
            if r.get("held_out_loss") is not None]
    if held:
        axes.plot(*zip(*held, strict=True), marker="o", label="held-out loss")
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("loss")
    accuracy = [(r["epoch"], r["accuracy"]) for r in records if r.get("accuracy") is not None]
    if accuracy:
        right = axes.twinx()
        right.plot(*zip(*accuracy, strict=True), marker="s", color="tab:green",
                   label="held-out accuracy")
        right.set_ylabel("accuracy")
        fig.legend(loc="outside lower center", ncols=3)
    else:
        axes.legend()
    return fig


def plot_log(log: Path, output: Path) -> None:
    """Draw `log` into `output` (its suffix picks the format), written atomically."""
    kind = FORMATS.get(output.suffix.lower())
    if kind is None:
        raise CnncDataError.single(f"cannot tell the image format of {output}: name it "
                                   ".png, .svg or .pdf")
    records = read_log(log)
    try:
        import matplotlib  # noqa: F401  (only to say clearly when it is missing)
    except ImportError:
        raise CnncDataError.single("cnnc plot needs matplotlib: pip install 'cnnc[plot]'") \
            from None
    image = io.BytesIO()
    figure(records).savefig(image, format=kind, dpi=120)
    write_atomically(output, image.getvalue(), CnncDataError)
