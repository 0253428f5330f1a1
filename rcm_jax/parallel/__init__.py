"""Device mesh, logical-axis sharding rules (params, activations, KV cache), multi-host start-up; Ulysses context
parallelism itself lives in `rcm_jax.models.attention` and runs under `activate(plan)`."""
from rcm_jax.parallel.mesh import AXES, MeshError, check_config, make_mesh, resolve_shape
from rcm_jax.parallel.plan import (Plan, activate, build, global_batch, jit_activated, jit_update,
                                  kv_cache_shardings, place, plan_from_config, shardings)
from rcm_jax.parallel.sharding import DEFAULT_RULES, ShardingError, constrain, parse_rules, tree_specs
