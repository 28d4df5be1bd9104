"""Training: the one loop, its schedule, metrics and the checkpoint format."""
