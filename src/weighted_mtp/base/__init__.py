"""The floor of the package: storage paths, atomic file writing, and the user-error type.

Nothing here imports any other part of ``weighted_mtp`` (see docs/ARCHITECTURE.md, "Layers").
"""
