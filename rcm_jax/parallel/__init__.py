"""Device mesh, logical-axis sharding rules, multi-host start-up (context parallelism: not yet)."""
from rcm_jax.parallel.mesh import AXES, MeshError, check_config, make_mesh, resolve_shape
from rcm_jax.parallel.plan import Plan, global_batch, jit_update, place, plan_from_config, shardings
from rcm_jax.parallel.sharding import DEFAULT_RULES, ShardingError, parse_rules, tree_specs
