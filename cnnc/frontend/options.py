"""The `key=value` options each kind of line accepts, their types, ranges and defaults.

One table per line kind; a validator turns the AST value into a Python value or raises
`OptionError` with words that say what was expected. irgen attaches the layer and the span.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

from cnnc.frontend import syntax as ast

# Sizes index native arrays with 32-bit integers.
MAX_SIZE = 2**31 - 1


class OptionError(Exception):
    """A value of the wrong type or range; the message completes "stride expects ..."."""


Validator = Callable[[ast.Value], object]


def _number(value: ast.Value) -> float:
    if not isinstance(value, ast.Number):
        raise OptionError(f"a number like 0.05, got {_shown(value)}")
    if not math.isfinite(value.value):
        raise OptionError(f"a finite number, got {value.text}")
    return float(value.value)


def _integer(value: ast.Value) -> int:
    if not isinstance(value, ast.Number) or not isinstance(value.value, int):
        raise OptionError(f"an integer, got {_shown(value)}")
    return value.value


def positive_int(value: ast.Value) -> int:
    number = _integer(value)
    if number < 1:
        raise OptionError(f"an integer of at least 1, got {number}")
    if number > MAX_SIZE:
        raise OptionError(f"an integer of at most {MAX_SIZE}, got {value.text}")
    return number


def seed(value: ast.Value) -> int:
    number = _integer(value)
    if not 0 <= number < 2**63:
        raise OptionError(f"an integer from 0 to 2**63 - 1, got {value.text}")
    return number


def positive_number(value: ast.Value) -> float:
    number = _number(value)
    if number <= 0:
        raise OptionError(f"a number above 0, got {value.text}")
    return number


def non_negative_number(value: ast.Value) -> float:
    number = _number(value)
    if number < 0:
        raise OptionError(f"a number of at least 0, got {value.text}")
    return number


def fraction(value: ast.Value) -> float:
    """Momentum and Adam's betas: in [0, 1)."""
    number = _number(value)
    if not 0 <= number < 1:
        raise OptionError(f"a number from 0 up to (not including) 1, got {value.text}")
    return number


def boolean(value: ast.Value) -> bool:
    if isinstance(value, ast.Word) and value.text in ("true", "false"):
        return value.text == "true"
    raise OptionError(f"true or false, got {_shown(value)}")


def non_negative_int(value: ast.Value) -> int:
    """A count that may be 0 (warm-up epochs)."""
    number = _integer(value)
    if number < 0:
        raise OptionError(f"an integer of at least 0, got {number}")
    if number > MAX_SIZE:
        raise OptionError(f"an integer of at most {MAX_SIZE}, got {value.text}")
    return number


# training.schedule computes each iteration's learning rate by one of these
SCHEDULES = ("constant", "step", "cosine")


def schedule_name(value: ast.Value) -> str:
    if isinstance(value, ast.Word) and value.text in SCHEDULES:
        return value.text
    words = ", ".join(SCHEDULES[:-1]) + f" or {SCHEDULES[-1]}"
    close = difflib.get_close_matches(value.text, SCHEDULES, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise OptionError(f"{words}, got {_shown(value)}{hint}")


def dtype_name(value: ast.Value) -> str:
    if isinstance(value, ast.Word) and value.text in ("f32", "f64"):
        return value.text
    raise OptionError(f"f32 or f64, got {_shown(value)}")


def stride(value: ast.Value) -> tuple[int, int]:
    pair = _pair(value, "a stride like 2 or 2x1")
    if min(pair) < 1:
        raise OptionError(f"strides of at least 1, got {value.text}")
    return pair


def padding(value: ast.Value) -> tuple[int, int] | str:
    """A pad of P or PHxPW zeros, or the word `same` (checked against the kernel by irgen)."""
    if isinstance(value, ast.Word) and value.text == "same":
        return "same"
    pair = _pair(value, "a padding like 1, 1x0 or same")
    if min(pair) < 0:
        raise OptionError(f"a padding of at least 0, got {value.text}")
    return pair


def shape(value: ast.Value) -> tuple[int, ...]:
    if isinstance(value, ast.Number) and isinstance(value.value, int):
        sizes: tuple[int, ...] = (value.value,)
    elif isinstance(value, ast.Dims):
        sizes = value.values
    else:
        raise OptionError(f"a shape like 10 or 1x28x28, got {_shown(value)}")
    if min(sizes) < 1 or max(sizes) > MAX_SIZE:
        raise OptionError(f"sizes from 1 to {MAX_SIZE}, got {value.text}")
    return sizes


def _pair(value: ast.Value, expected: str) -> tuple[int, int]:
    if isinstance(value, ast.Number) and isinstance(value.value, int):
        pair = (value.value, value.value)
    elif isinstance(value, ast.Dims) and len(value.values) == 2:
        pair = (value.values[0], value.values[1])
    else:
        raise OptionError(f"{expected}, got {_shown(value)}")
    if max(pair) > MAX_SIZE:
        raise OptionError(f"sizes of at most {MAX_SIZE}, got {value.text}")
    return pair


def _shown(value: ast.Value) -> str:
    return f"{value.text!r}" if isinstance(value, ast.Word) else value.text


@dataclass(frozen=True, slots=True)
class OptionSpec:
    validate: Validator
    default: object


INPUT_OPTIONS = {"dtype": OptionSpec(dtype_name, "f32")}
# The train line's options that every optimizer takes, after its own (OptimizerDef.options).
# The last four are the learning-rate schedule's (training.schedule): step_size and gamma
# are read by schedule=step only, warmup (epochs of linear warm-up) by every schedule.
TRAINING_OPTIONS = {"batch": OptionSpec(positive_int, 64), "epochs": OptionSpec(positive_int, 1),
                    "max_iter": OptionSpec(positive_int, None),
                    "tol": OptionSpec(non_negative_number, 0.0), "seed": OptionSpec(seed, 0),
                    "schedule": OptionSpec(schedule_name, "constant"),
                    "step_size": OptionSpec(positive_int, 30),
                    "gamma": OptionSpec(positive_number, 0.1),
                    "warmup": OptionSpec(non_negative_int, 0)}


def train_options(optimizer_options: dict[str, OptionSpec]) -> dict[str, OptionSpec]:
    """Every option of `train NAME`: the optimizer's own, then the common ones."""
    return {**optimizer_options, **TRAINING_OPTIONS}


# -- sliding windows (conv and pooling layers) ----------------------------------------------

def window_padding(value: ast.Value) -> tuple[int, int, int, int] | str:
    """A pad of P, PHxPW or TxLxBxR (top, left, bottom, right) zeros, or the words `same`
    (output ceil(input / stride)) and `valid` (no padding), worked out by the layer."""
    if isinstance(value, ast.Word) and value.text in ("same", "valid"):
        return value.text
    if isinstance(value, ast.Number) and isinstance(value.value, int):
        sizes = (value.value,) * 4
    elif isinstance(value, ast.Dims) and len(value.values) in (2, 4):
        sizes = tuple(value.values) * (4 // len(value.values))
    else:
        raise OptionError(f"a padding like 1, 1x0, 0x0x1x1 (top, left, bottom, right), same "
                          f"or valid, got {_shown(value)}")
    if min(sizes) < 0:
        raise OptionError(f"a padding of at least 0, got {value.text}")
    if max(sizes) > MAX_SIZE:
        raise OptionError(f"sizes of at most {MAX_SIZE}, got {value.text}")
    return sizes[0], sizes[1], sizes[2], sizes[3]


def dilation(value: ast.Value) -> tuple[int, int]:
    pair = _pair(value, "a dilation like 2 or 2x1")
    if min(pair) < 1:
        raise OptionError(f"dilations of at least 1, got {value.text}")
    return pair
