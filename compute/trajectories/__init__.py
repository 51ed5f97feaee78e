"""Function-space and weight-space trajectories: every checkpoint against every other (Gigastep, Fort et al.)."""
