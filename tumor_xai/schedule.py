"""A run's clock: learning rate, input size and guidance weight as functions of how far the run is.

Progress runs from 0 to 1: steps done over ``--epochs`` worth of steps or, with ``--time-budget``,
seconds spent over the budget, so a run ends (at a learning rate of zero) inside the time it was
given on whatever machine it runs; a session that starts it knows when it will end.

With ``--low-res-size S`` (progressive resizing) most of the run trains on smaller inputs, S px
growing to 1.25 S in steps of 32, and the last ``--full-res-fraction`` of it at the full size: a
ResNet's cost scales with the pixels, so 128 px steps cost a third of 224 px ones, and the full-size
phase at the end re-fits the network (its BatchNorm statistics and the scale of what it sees) to the
size it is used at. Guidance losses that read the heatmap are on in the full-size phase only.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

__all__ = ["Schedule", "guidance_ramp", "lr_factor", "parse_duration"]

SIZE_STEP = 32  # input sizes stay multiples of the network's stride
GUIDANCE_RAMP = 0.2
WARMUP_SHARE = 0.05  # with a time budget, the warm-up ends by this share of it at the latest  # share of the full-size phase over which guidance losses ramp in


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def guidance_ramp(progress: float, warmup_epochs: float) -> float:
    """Factor on the CAM losses at ``progress`` epochs: 0 for the first half of the warm-up, then linear to 1.

    A CAM loss from the first step can win before the network has features to classify with (the
    map is shaped, the class never learned); the classifier gets a head start instead.
    """
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, max(0.0, 2.0 * progress / warmup_epochs - 1.0))


def parse_duration(text: str | float) -> float:
    """Seconds in ``"2h"``, ``"90m"``, ``"1h30m"``, ``"300s"`` or ``"300"``; raises ``ValueError`` otherwise."""
    if isinstance(text, (int, float)):
        return float(text)
    s = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", s)
    if not parts or "".join(a + b for a, b in parts) != s:
        raise ValueError(f"expected a duration such as 2h, 90m, 1h30m or 300s, got {text!r}")
    return sum(float(v) * {"h": 3600, "m": 60, "s": 1}[u] for v, u in parts)


@dataclass
class Schedule:
    """Where the run is (steps or seconds) and what that means for the learning rate, size and guidance."""

    epochs: int
    steps_per_epoch: int
    warmup_steps: int
    time_budget: float = 0.0  # seconds; 0: the run is ``epochs`` long
    full_size: int = 224
    low_res_size: int = 0  # 0: every step at full size
    full_res_fraction: float = 0.25
    spent: float = 0.0  # seconds spent before this process started (a resumed run)
    _origin: float | None = field(default=None, repr=False)
    _warm_progress: float | None = field(default=None, repr=False)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def start(self) -> None:
        """Start (or, after a resume, continue) the clock."""
        self._origin = time.monotonic() - self.spent

    def elapsed(self) -> float:
        return self.spent if self._origin is None else time.monotonic() - self._origin

    def progress(self, step: int) -> float:
        """0 at the start, 1 when the run is over."""
        if self.time_budget:
            return min(1.0, self.elapsed() / self.time_budget)
        return min(1.0, step / max(1, self.total_steps))

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over the first steps, then a cosine to zero at progress 1."""
        if not self.time_budget:
            return lr_factor(step, self.total_steps, self.warmup_steps)
        # Warm-up: the first warmup_steps steps, but never more than WARMUP_SHARE of the budget.
        warm = max((step + 1) / self.warmup_steps, self.progress(step) / WARMUP_SHARE)
        if warm < 1.0:
            return warm
        if self._warm_progress is None:
            self._warm_progress = self.progress(step)
        p = (self.progress(step) - self._warm_progress) / max(1e-6, 1.0 - self._warm_progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, p))))

    def full_size_phase(self, progress: float) -> bool:
        return not self.low_res_size or progress >= 1.0 - self.full_res_fraction

    def image_size(self, progress: float) -> int:
        """The training input size at ``progress``: growing from ``low_res_size`` to 1.25x, then full."""
        if self.full_size_phase(progress):
            return self.full_size
        top = min(self.full_size, self.low_res_size * 1.25)
        within = progress / max(1e-6, 1.0 - self.full_res_fraction)
        # Equal shares of the low-resolution phase at each step size from low_res_size up to the top one.
        size = self.low_res_size + within * (top - self.low_res_size + SIZE_STEP)
        return int(min(top, max(SIZE_STEP, SIZE_STEP * math.floor(size / SIZE_STEP))))

    def guidance(self, progress: float, epochs_done: float, warmup_epochs: float) -> float:
        """Factor on the heatmap losses (:func:`guidance_ramp`). With progressive resizing they wait for
        the full-size phase and ramp in over its first fifth; with a time budget and no resizing the
        warm-up is the same share of the run as of ``epochs`` epochs."""
        if self.low_res_size:
            start = 1.0 - self.full_res_fraction
            if progress < start:
                return 0.0
            return min(1.0, (progress - start) / max(1e-6, GUIDANCE_RAMP * self.full_res_fraction))
        if self.time_budget:  # epochs are not known in advance: the warm-up is a share of the run
            epochs_done = progress * max(1, self.epochs)
        return guidance_ramp(epochs_done, warmup_epochs)
