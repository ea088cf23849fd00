"""Datasets (bundled and user files) and trajectory sources."""

from trajalign.data.datasets import BUNDLED, Behavior, ColumnMap, load_behaviors

__all__ = ["BUNDLED", "Behavior", "ColumnMap", "load_behaviors"]
