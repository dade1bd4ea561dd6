"""Evaluation without Ray: clean and noisy accuracy (and, later, robust and certified accuracy)."""
