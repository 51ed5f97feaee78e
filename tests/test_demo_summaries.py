"""The demo's similarity table names each compared set's loss beside the agreement numbers."""

from __future__ import annotations

from actdb.query.demo import _losses_by_step


def test_losses_by_step_average_each_set_once_per_step():
    pairs = [
        {"model": "s0", "step": 200, "other_model": "s0", "other_step": 800, "mean_loss": 5.0, "other_mean_loss": 4.0},
        {"model": "s0", "step": 800, "other_model": "s0", "other_step": 200, "mean_loss": 4.0, "other_mean_loss": 5.0},
        {"model": "s1", "step": 200, "other_model": "s1", "other_step": 800, "mean_loss": 5.5, "other_mean_loss": 4.5},
    ]
    assert _losses_by_step(pairs) == "200: 5.25, 800: 4.25"
    assert _losses_by_step([{"model": "s0", "step": 0, "other_model": "s1", "other_step": 0}]) is None
