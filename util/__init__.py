"""Shared helpers for the DeepMIM training scripts (one concept per module)."""
