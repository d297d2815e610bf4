"""Reusable pieces of the runnable experiments in ``experiments/`` (tested library code)."""
