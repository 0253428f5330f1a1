"""Training objectives, one module each, registered by name so a config picks one with a string.

The trainer sees a recipe only through `rcm_jax.recipes.base.Recipe`: init the params, a pure loss.
"""
from rcm_jax.recipes.base import RECIPES, Recipe, get_recipe, register  # noqa: F401
from rcm_jax.recipes import rf  # noqa: F401  (registers "rf")
# Causal recipes (teacher forcing, Causal-rCM sections 3-4) and the bidirectional TrigFlow sCM of rCM.
from rcm_jax.recipes import df, scm_trigflow, tf, tf_dcm, tf_kd, tf_meanflow, tf_scm  # noqa: F401,E402
from rcm_jax.recipes import sf_dmd  # noqa: F401,E402  (self-forcing DMD, section 4)
from rcm_jax.recipes import rcm  # noqa: F401,E402  (joint TF-sCM + SF-DMD, bidirectional rCM)
