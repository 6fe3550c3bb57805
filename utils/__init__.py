"""Shared pieces of the training scripts: one concept per module (see the README's layout table)."""
