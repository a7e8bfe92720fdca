"""Training: the loop, distribution, optimizers and schedules, and the torchrun worker."""
