"""Concept-expert neurons across seeds and checkpoints (Fedzechkina et al. 2025, after Suau et al.'s expert units)."""
