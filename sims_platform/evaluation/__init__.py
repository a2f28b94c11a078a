"""Evaluation: what is sampled (plan), which networks each method uses, part files, and results."""
