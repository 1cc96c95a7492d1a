"""Controlled comparisons: a grid of arms x seeds (`dsvlm ablate`) and its report."""
