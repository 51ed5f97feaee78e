"""Ablation: cross-entropy with chosen neurons replaced, against matched random controls."""
