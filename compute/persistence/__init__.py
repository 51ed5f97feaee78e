"""Persistence of universal neurons across one model's checkpoints."""
