"""Training: the two-stage loop, checkpoints, run directory and pictures."""
