"""Analyses of trained models that need no LLM in the loop (linear probes of the visual features)."""
