"""Backbones: the registry, weights and checkpoints, the cut-and-pool feature model, CPU graphs."""
