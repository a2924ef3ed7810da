"""The learning rate of each training iteration, from the train line's schedule settings.

- `warmup=W` epochs: the rate rises linearly over the first W·B iterations (B: iterations an
  epoch), α·(t + 1)/(W·B) at iteration t, reaching α at the last of them
  (torch.optim.lr_scheduler.LinearLR(start_factor=1/(W·B), total_iters=W·B − 1), stepped each
  iteration). The schedule's own clock starts when the warm-up ends, as with
  torch.optim.lr_scheduler.SequentialLR.
- `schedule=constant`: α.
- `schedule=step`: α·γ^⌊e / step_size⌋ in epoch e (counted from 0 after the warm-up), as
  StepLR(step_size, gamma) stepped each epoch.
- `schedule=cosine`: α·(1 + cos(π·t/T))/2 at iteration t after the warm-up, where T is the
  run's iterations after it (epochs·B, or max_iter where that is fewer), as
  CosineAnnealingLR(T_max=T, eta_min=0) stepped each iteration: it anneals towards 0 over
  the whole run.

α is the train line's `lr`, or the rate given to the run (`--lr`, `fit(lr=...)`). The
training loop computes each iteration's rate and passes it to the step; `Module.train_step`
called on its own uses the rate it is given, or α.
"""

from __future__ import annotations

import math
import sys
from typing import Any

# a module file records every setting; these are for one written before they existed, and
# agree with frontend.options.TRAINING_OPTIONS
DEFAULTS = {"schedule": "constant", "step_size": 30, "gamma": 0.1, "warmup": 0}
# the runtime refuses a rate of 0 (a step schedule with a small gamma can underflow to it);
# the smallest positive float changes the parameters just as little
SMALLEST_RATE = sys.float_info.min


def _setting(settings: Any, key: str) -> Any:
    value = settings.get(key)
    return DEFAULTS[key] if value is None else value


def learning_rate(settings: Any, iteration: int, iterations_per_epoch: int, epochs: int, *,
                  lr: float | None = None, max_iter: int | None = None) -> float:
    """The rate of iteration `iteration` (from 0) of a run of `epochs` epochs of
    `iterations_per_epoch` iterations each, under the train line's `settings` (anything
    with .get: Module.optimizer); `lr` replaces the line's base rate, and `max_iter` ends the
    run earlier."""
    assert iteration >= 0 and iterations_per_epoch >= 1 and epochs >= 1
    base = float(lr if lr is not None else settings.get("lr"))
    warm = _setting(settings, "warmup") * iterations_per_epoch
    if iteration < warm:
        return base * (iteration + 1) / warm
    elapsed = iteration - warm
    kind = _setting(settings, "schedule")
    if kind == "step":
        decays = (elapsed // iterations_per_epoch) // _setting(settings, "step_size")
        return max(base * _setting(settings, "gamma") ** decays, SMALLEST_RATE)
    if kind == "cosine":
        total = epochs * iterations_per_epoch
        if max_iter is not None:
            total = min(total, max_iter)
        span = max(total - warm, 1)
        rate = base * (1 + math.cos(math.pi * min(elapsed, span) / span)) / 2
        return max(rate, SMALLEST_RATE)
    return base


def varies(settings: Any) -> bool:
    """Whether the rate changes during a run (a schedule other than constant, or warm-up)."""
    return _setting(settings, "schedule") != "constant" or _setting(settings, "warmup") > 0


def describe(settings: Any) -> str:
    """The schedule in words, for the line that says how a network is trained; '' for a
    constant rate."""
    kind = _setting(settings, "schedule")
    words = {"constant": "", "cosine": "cosine schedule",
             "step": f"step schedule (x{_setting(settings, 'gamma'):g} every "
                     f"{_setting(settings, 'step_size')} epochs)"}[kind]
    warmup = _setting(settings, "warmup")
    if warmup:
        plural = "s" if warmup > 1 else ""
        words = f"{words} after " if words else "constant rate after "
        words += f"{warmup} warm-up epoch{plural}"
    return words
