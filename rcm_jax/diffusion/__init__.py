"""Diffusion math: RF / TrigFlow interpolants, time samplers and shifts, ODE samplers, CFG."""
from rcm_jax.diffusion import flow, samplers  # noqa: F401
