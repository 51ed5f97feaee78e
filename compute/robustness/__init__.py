"""Interventional robustness across seeds and training steps (after Avery et al.)."""

INTERVENTIONS = ("ablate", "generate", "edits")  # the kinds of a robustness run
