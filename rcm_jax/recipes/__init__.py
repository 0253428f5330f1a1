"""Training objectives, one module each, registered by name so a config picks one with a string.

The trainer sees a recipe only through `rcm_jax.recipes.base.Recipe`: init the params, a pure loss.
"""
from rcm_jax.recipes.base import RECIPES, Recipe, get_recipe, register  # noqa: F401
from rcm_jax.recipes import rf  # noqa: F401  (registers "rf")
