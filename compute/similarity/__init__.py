"""Similarity of whole sets: layer similarity (matched correlation, CKA) from the engine's moments, and function
similarity from stored predictions."""
