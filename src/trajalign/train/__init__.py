"""Trajectory alignment training: recipes, losses and the TRL/PEFT trainer."""

from trajalign.train.recipes import RECIPES, RecipeConfig, TrainingRow, build_rows

__all__ = ["RECIPES", "RecipeConfig", "TrainingRow", "build_rows"]
