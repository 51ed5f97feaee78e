"""Standard deviations as the correlation engine and the adaptive baseline divide by them: one dead-neuron rule."""

from __future__ import annotations

from types import ModuleType

SD_EPS = 1e-6  # a neuron whose standard deviation is below this is dead/constant: it has no correlation


def inverse_sd(sd: object, xp: ModuleType) -> tuple[object, object]:
    """1 / sd as float32, 0 for dead or constant neurons (their scaled values are then replaced by -inf), and the
    mask of those dead neurons."""
    live = sd > SD_EPS
    return xp.where(live, 1.0 / xp.where(live, sd, 1.0), 0.0).astype(xp.float32), ~live
