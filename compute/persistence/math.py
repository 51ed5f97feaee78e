"""The arithmetic of persistence, on label arrays and sets: overlap of universal sets across two steps, the
mean of the finite self-correlations, and each neuron's emergence step."""

from __future__ import annotations

import numpy as np


def layer_overlap(u_from: set[int], u_to: set[int]) -> tuple[int, float | None, float | None]:
    """(|U1 ∩ U2|, |U1 ∩ U2| / |U1|, Jaccard); ratios are None when undefined (empty sets)."""
    kept = len(u_from & u_to)
    union = len(u_from | u_to)
    return kept, (kept / len(u_from) if u_from else None), (kept / union if union else None)


def finite_mean(values: np.ndarray) -> float | None:
    """Mean of the finite values (dead neurons have no self-correlation); None when there are none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def emergence_steps(universal_by_step: list[np.ndarray], steps: list[int]) -> np.ndarray:
    """First analysed step from which each neuron is universal at every later analysed step; -1 if none."""
    flags = np.stack(universal_by_step)  # (n_steps, n_neurons)
    out = np.full(flags.shape[1], -1, dtype=np.int64)
    stays = np.ones(flags.shape[1], dtype=bool)
    for k in range(len(steps) - 1, -1, -1):
        stays &= flags[k]
        out[stays] = steps[k]
    return out
