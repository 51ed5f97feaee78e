"""Interventional robustness across seeds and training steps (after Avery et al.)."""
