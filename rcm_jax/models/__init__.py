"""Flax linen models: the Wan2.1 DiT (causal-capable), its config and sizes, video attention masks, attention."""
from rcm_jax.models import masks
from rcm_jax.models.attention import attention
from rcm_jax.models.config import SIZES, WanConfig, get_config
from rcm_jax.models.wan import (WanModel, build_model, count_params, init_params, loop_to_scan_params,
                                remat_policy, scan_to_loop_params)

__all__ = ["SIZES", "WanConfig", "WanModel", "attention", "build_model", "count_params", "get_config",
           "init_params", "loop_to_scan_params", "masks", "remat_policy", "scan_to_loop_params"]
