"""weighted-mtp: weighted multi-token prediction for code models."""

__version__ = "0.1.0"
