"""On-demand computation over stored activations: correlations, baselines, universality, persistence, ablation."""
