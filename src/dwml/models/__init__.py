"""Architectures and presets, parameter and FLOP counts, the Bayesian-optimisation peer search."""
