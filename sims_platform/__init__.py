"""SIMS Platform: self-improving diffusion models with synthetic data, from laptop to cluster."""
