"""Reproducible recipe that trains sinkstream's bundled default model (see training/README.md)."""
