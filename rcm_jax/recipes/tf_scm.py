"""TF-sCM: continuous-time consistency distillation in RF form under teacher forcing (Causal-rCM section 4).

t ~ LogitNormal(-0.8, 1.6) shared by frames; x_t = (1 - t) x0 + t eps on the noisy half, clean x0 context.
v_T = the frozen causal teacher's velocity (CFG teacher.cfg_scale, clean context). With the student's params
under stop-gradient, one `jax.jvp` through the whole model on the packed sequence with tangent zero on the
clean half and (dx, dt) = (v_T, 1) on the noisy half gives v_sg and dv = d v_sg / dt along the teacher's ODE;
g = -(v_sg - v_T) - r t dv (r = min(1, step / scm.warmup_steps)) is df/dt of the consistency function
f = x - t v. Loss (see cm.py) = 100 ||v_theta - sg(v_theta) - g / (||g|| + 0.1)||^2, NaN samples zeroed and
counted (`nan_samples`). With model.attention_impl = "pallas" the JVP runs through pallas_kernels'
fused forward+JVP kernel; with "xla" the [L, L] scores are materialised, refused beyond scm.max_xla_tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rcm_jax.diffusion import flow
from rcm_jax.recipes import causal, cm
from rcm_jax.recipes.base import register

# Packed sequences longer than this many tokens need attention_impl="pallas" for the JVP (the XLA reference
# materialises [B, H, L, L] scores and their tangents).
MAX_XLA_TOKENS = 16384


def check_jvp_attention(model, num_tokens: int, max_xla_tokens: int, key: str) -> None:
  """Refuse, before any compute, a JVP path whose attention cannot hold the sequence."""
  cfg = model.config
  if cfg.attention_impl == "pallas":
    from pallas_kernels import SUPPORTED_HEAD_DIMS   # smaller head dims are zero-padded by the kernel
    if cfg.head_dim > max(SUPPORTED_HEAD_DIMS):
      raise causal.RecipeConfigError(
          f"model.attention_impl='pallas' but head_dim = dim // num_heads = {cfg.head_dim} exceeds what the flash "
          f"kernel supports (<= {max(SUPPORTED_HEAD_DIMS)}); change model.size / model.dim / model.num_heads, or "
          "use model.attention_impl='xla' for short sequences.")
  elif cfg.attention_impl == "xla" and num_tokens > max_xla_tokens:
    raise causal.RecipeConfigError(
        f"The JVP of {key} would run XLA attention over {num_tokens} tokens (> {key}.max_xla_tokens = "
        f"{max_xla_tokens}), materialising [L, L] scores and tangents: set model.attention_impl='pallas'.")
  elif cfg.attention_impl == "cudnn":
    raise causal.RecipeConfigError("model.attention_impl='cudnn' has no mask and no JVP rule: use 'pallas' for "
                                   f"{key}.")


def jvp_batch(recipe, batch):
  """Clean latents, sizes and packed layout of a JVP recipe's batch, after the attention check."""
  x0 = causal.as_f32(batch)                                        # [B, T, H, W, C]
  b, nf = x0.shape[:2]
  lay = recipe.layout(x0)
  check_jvp_attention(recipe.model, 2 * nf * lay.tokens_per_frame, recipe.cfg.max_xla_tokens, "scm")
  return x0, b, nf, lay


def tf_jvp(fn, x0, x_t, t, dx_noisy, dt_noisy):
  """(v_sg, dv) on the noisy half: `fn(x_packed, t_packed) -> [B, 2T, ...]` pushed forward with tangent
  zero on the clean half and (dx_noisy, dt_noisy) on the noisy half."""
  nf = x0.shape[1]
  primals = (causal.pack(x0, x_t), causal.pack(jnp.zeros_like(t), t))
  tangents = (causal.pack(jnp.zeros_like(x0), dx_noisy), causal.pack(jnp.zeros_like(t), dt_noisy))
  out, dout = jax.jvp(fn, primals, tangents)
  return causal.unpack_noisy(out, nf), causal.unpack_noisy(dout, nf)


@register("tf_scm")
class TeacherForcingSCM(causal.CausalRecipe):
  default_teacher_kind = "causal"

  def __init__(self, config, model, **kw):
    super().__init__(config, model, **kw)
    self.cfg = cm.scm_section(config, "scm", max_xla_tokens=MAX_XLA_TOKENS)
    self.sample_t = flow.time_sampler("logit_normal", mean=self.cfg.time_mean, std=self.cfg.time_std)
    frames = config.get("data") and config.data.get("world", {}).get("frames")
    size = config.get("data") and config.data.get("world", {}).get("size")
    if frames and size:
      _, ph, pw = model.config.patch_size
      check_jvp_attention(model, 2 * frames * (size // ph) * (size // pw), self.cfg.max_xla_tokens, "scm")
    else:
      check_jvp_attention(model, 0, self.cfg.max_xla_tokens, "scm")

  def loss(self, params, frozen, batch, rng, step):
    x0, b, nf, lay = jvp_batch(self, batch)                        # x0: [B, T, H, W, C]
    r_t, r_eps = jax.random.split(rng)
    t = causal.shared_times(self.sample_t, r_t, b, nf)             # [B, T]
    eps = jax.random.normal(r_eps, x0.shape, jnp.float32)
    x_t = flow.interpolate(x0, eps, t)
    cond = batch["cond"]
    v_teacher = self.teacher_velocity(frozen, lay, x0, x_t, t, batch)
    params_sg = jax.lax.stop_gradient(params)
    fn = lambda xp, tp: causal.tf_forward(self.model, params_sg, lay, xp, tp, cond)
    v_sg, dv = tf_jvp(fn, x0, x_t, t, v_teacher, jnp.ones_like(t))
    r = cm.warmup_ratio(step, self.cfg.warmup_steps)
    g = -(v_sg - v_teacher) - r * flow.bcast(t, dv) * dv
    v = causal.tf_velocity(self.model, params, lay, x0, x_t, t, cond)
    loss, metrics = cm.tangent_loss(v, g, norm_eps=self.cfg.norm_eps, loss_scale=self.cfg.loss_scale)
    return loss, dict(metrics, t_mean=jnp.mean(t), warmup_r=r,
                      teacher_gap=jnp.mean(jnp.square(v_sg - v_teacher)))
