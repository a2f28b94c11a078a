"""Sampling: the EDM Heun sampler and guidance compositions of denoisers."""
