"""Concept-expert neurons across seeds and checkpoints (Fedzechkina et al. 2025, after Suau et al.'s expert units)."""

MANTEL_PERMUTATIONS = 10000  # default of `concept run`, and of `concept show` where it has to test afresh
