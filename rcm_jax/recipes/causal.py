"""What every causal recipe shares: the block pattern, teacher-forcing packing and masks, per-block times,
the frozen teacher and its guided velocity. One implementation of each; recipes (tf, df, tf_kd, tf_dcm,
tf_scm, tf_meanflow) only combine them.

Config keys read here (defaults are the paper's, ../shared/reference/causal_rcm.md sections 3-5):
  causal.first_chunk_frames, causal.chunk_frames   block pattern (c1-1 frame-wise, c3-3, c1-4, ...)
  causal.local_blocks (0 = no window), causal.sink_blocks   sliding window and always-visible sink blocks
  teacher_from        stage dir of the frozen teacher (the runner resolves a stage name to its dir)
  teacher.kind        "causal" (a TF/DF stage, clean-context velocity) | "bidirectional" (an rf stage) |
                      "" (the recipe's default)
  teacher.cfg_scale   CFG scale of the teacher's velocity (paper: 3 for TF-CM); teacher.use_ema
A teacher_from / init_from stage is checked against its config.json before loading: model keys, and the block
pattern for a causal teacher or a causal init (errors name the differing key).
Teacher forcing (section 3): the model sees `[clean x0 | noisy x_t]` packed along frames, both halves with the
same RoPE frame positions, under `masks.teacher_forcing`; per-frame conditions (actions, y) are packed the same.
Only patch_size[0] == 1 is supported (one latent frame per token frame, as Wan).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rcm_jax.errors import UserError
from rcm_jax.inference.causal_sample import PER_FRAME_CONDITIONS, guided_call, slice_cond  # noqa: F401
from rcm_jax.models import masks
from rcm_jax.recipes.base import Recipe

TEACHER_KINDS = ("causal", "bidirectional")


class RecipeConfigError(UserError):
  pass


def section(config, name: str, **defaults) -> ml_collections.ConfigDict:
  """config.<name> merged over `defaults`; a key not in defaults is an error naming it."""
  given = config.get(name) or {}
  given = given.to_dict() if isinstance(given, ml_collections.ConfigDict) else dict(given)
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise RecipeConfigError(f"Unknown config key(s) {[f'{name}.{k}' for k in unknown]} for recipe "
                            f"{config.get('recipe')!r}; known: {sorted(f'{name}.{k}' for k in defaults)}.")
  out = dict(defaults)
  out.update(given)
  return ml_collections.ConfigDict(out)


# ----------------------------------------------------------------------------- block pattern
@dataclasses.dataclass(frozen=True)
class BlockPattern:
  """Blocks of latent frames: the first holds `first_chunk_frames`, each later one `chunk_frames`."""
  first_chunk_frames: int = 1
  chunk_frames: int = 1
  local_blocks: int | None = None   # sliding window of blocks (incl. the query's own); None = all
  sink_blocks: int = 0              # first blocks always visible

  @classmethod
  def from_config(cls, config) -> "BlockPattern":
    c = section(config, "causal", first_chunk_frames=1, chunk_frames=1, local_blocks=0, sink_blocks=0)
    for key, minimum in (("first_chunk_frames", 1), ("chunk_frames", 1), ("local_blocks", 0), ("sink_blocks", 0)):
      v = c[key]
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < minimum:
        raise RecipeConfigError(f"causal.{key} must be an int >= {minimum}, got {v!r}.")
    if c.local_blocks and c.sink_blocks >= c.local_blocks:
      raise RecipeConfigError(f"causal.sink_blocks ({c.sink_blocks}) must be < causal.local_blocks "
                              f"({c.local_blocks}), or set causal.local_blocks=0 (no window).")
    return cls(int(c.first_chunk_frames), int(c.chunk_frames), int(c.local_blocks) or None, int(c.sink_blocks))

  def check(self, num_frames: int) -> None:
    """Raise, naming the keys, unless the frames split into whole blocks."""
    rest = num_frames - self.first_chunk_frames
    if rest < 0 or rest % self.chunk_frames:
      k = max(rest // self.chunk_frames + 1, 1)
      raise RecipeConfigError(
          f"{num_frames} latent frames do not split into blocks of causal.first_chunk_frames="
          f"{self.first_chunk_frames} then causal.chunk_frames={self.chunk_frames}: need frames = "
          f"first_chunk_frames + k * chunk_frames (e.g. {self.first_chunk_frames + k * self.chunk_frames}); change "
          f"the pattern or data.world.frames.")

  def kwargs(self) -> dict:
    return dict(first_chunk_frames=self.first_chunk_frames, chunk_frames=self.chunk_frames)

  def window(self) -> dict:
    return dict(local_blocks=self.local_blocks, sink_blocks=self.sink_blocks)

  def block_ids(self, num_frames: int) -> np.ndarray:
    """int32[num_frames]: the block of each frame."""
    self.check(num_frames)
    return masks.block_ids(num_frames, **self.kwargs())

  def frame_ranges(self, num_frames: int) -> list[tuple[int, int]]:
    self.check(num_frames)
    return masks.block_frame_ranges(num_frames, **self.kwargs())


@functools.lru_cache(maxsize=64)
def _tf_mask(pattern: BlockPattern, num_frames: int, tokens_per_frame: int):
  return masks.teacher_forcing(num_frames, tokens_per_frame, **pattern.kwargs(), **pattern.window())


@functools.lru_cache(maxsize=64)
def _causal_mask(pattern: BlockPattern, num_frames: int, tokens_per_frame: int):
  return masks.block_causal(num_frames, tokens_per_frame, **pattern.kwargs(), **pattern.window())


@dataclasses.dataclass(frozen=True)
class Layout:
  """One video geometry under one block pattern: T latent frames of `tokens_per_frame` tokens."""
  pattern: BlockPattern
  num_frames: int
  tokens_per_frame: int

  def tf_mask(self):
    """Mask over the packed [clean | noisy] sequence, 2 T tokens-frames."""
    return _tf_mask(self.pattern, self.num_frames, self.tokens_per_frame)

  def causal_mask(self):
    """Block-causal mask over T frames (DF training, causal inference)."""
    return _causal_mask(self.pattern, self.num_frames, self.tokens_per_frame)

  def tf_positions(self) -> np.ndarray:
    """RoPE frame index of the packed frames: both halves get arange(T)."""
    return np.concatenate([np.arange(self.num_frames)] * 2)

  def block_ids(self) -> np.ndarray:
    return self.pattern.block_ids(self.num_frames)


def tokens_per_frame(model, height: int, width: int) -> int:
  pt, ph, pw = model.config.patch_size
  if pt != 1:
    raise RecipeConfigError(f"causal recipes need model.patch_size[0] == 1 (one latent frame per token frame), "
                            f"got {tuple(model.config.patch_size)}.")
  return (height // ph) * (width // pw)


def layout(pattern: BlockPattern, model, x) -> Layout:
  """Layout of a video batch x: [B, T, H, W, C] (shapes only; checks the pattern divides T)."""
  _, nf, h, w, _ = x.shape
  pattern.check(nf)
  return Layout(pattern, nf, tokens_per_frame(model, h, w))


# ----------------------------------------------------------------------------- packing
def pack(clean, noisy):
  """[B, T, ...] twice -> [B, 2T, ...] along the frame axis: [clean | noisy]."""
  return jnp.concatenate([clean, noisy], axis=1)


def unpack_noisy(packed, num_frames: int):
  """[B, 2T, ...] -> the noisy half [B, T, ...]."""
  return packed[:, num_frames:]


def pack_cond(cond: dict) -> dict:
  """Per-frame conditions (actions [B, T], y [B, T, H, W, C]) doubled along frames; others unchanged."""
  return {k: pack(v, v) if k in PER_FRAME_CONDITIONS else v for k, v in cond.items()}


# ----------------------------------------------------------------------------- network calls
def tf_forward(model, params, lay: Layout, x_packed, t_packed, cond: dict):
  """Model output on the packed sequence: x_packed [B, 2T, H, W, C], t_packed [B, 2T] -> [B, 2T, H, W, C]."""
  return model.apply(params, x_packed, t_packed, **pack_cond(cond), mask=lay.tf_mask(),
                     frame_positions=lay.tf_positions())


def tf_velocity(model, params, lay: Layout, x_ctx, x_t, t, cond: dict, t_ctx=None):
  """Velocity of the noisy half under teacher forcing: context x_ctx (clean x0, or noisy at t_ctx) and
  x_t at t: [B, T, ...] -> v [B, T, H, W, C] fp32."""
  t_ctx = jnp.zeros_like(t) if t_ctx is None else t_ctx
  out = tf_forward(model, params, lay, pack(x_ctx, x_t), pack(t_ctx, t), cond)
  return unpack_noisy(out, lay.num_frames)


def causal_velocity(model, params, lay: Layout, x_t, t, cond: dict):
  """Velocity under the block-causal mask (DF): x_t [B, T, ...], t [B, T] -> [B, T, H, W, C]."""
  return model.apply(params, x_t, t, **cond, mask=lay.causal_mask())


def teacher_velocity(model, teacher_params, kind: str, lay: Layout, x_ctx, x_t, t, cond, null, scale: float,
                     t_ctx=None):
  """The frozen teacher's guided velocity at (x_t, t) [B, T, ...]; a causal teacher sees x_ctx as its
  teacher-forcing context (clean context by default), a bidirectional one ignores it. Stop-gradient."""
  if kind == "causal":
    fn = lambda xc, xt, tt, tc, c: tf_velocity(model, teacher_params, lay, xc, xt, tt, c, tc)
    t_ctx = jnp.zeros_like(t) if t_ctx is None else t_ctx
    v = guided_call(fn, cond, null, scale, x_ctx, x_t, t, t_ctx)
  else:
    fn = lambda xt, tt, c: model.apply(teacher_params, xt, tt, **c)
    v = guided_call(fn, cond, null, scale, x_t, t)
  return jax.lax.stop_gradient(v)


# ----------------------------------------------------------------------------- times and losses
def shared_times(sampler: Callable, rng, b: int, num_frames: int):
  """One time per sample, shared by all frames: [B, T]."""
  return jnp.broadcast_to(sampler(rng, (b, 1)), (b, num_frames))


def block_times(sampler: Callable, rng, b: int, block_ids: np.ndarray):
  """An independent time per block (DF), repeated over the block's frames: [B, T]."""
  nb = int(block_ids.max()) + 1
  return sampler(rng, (b, nb))[:, block_ids]


def frame_sum_mean(sq):
  """[B, T, H, W, C] -> [B]: sum over frames of the per-frame mean (the paper's TF / dCM reduction)."""
  return jnp.sum(jnp.mean(sq, axis=(2, 3, 4)), axis=1)


# ----------------------------------------------------------------------------- frozen teacher
def _abstract_params(model):
  from rcm_jax.models.wan import dummy_inputs
  args, kwargs = dummy_inputs(model.config)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))


def check_params_fit(params, model, key: str) -> None:
  """Params loaded from `key` must have the param tree and shapes of `model`."""
  got = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(_abstract_params(model))}
  if got != want:
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))[:5]
    raise RecipeConfigError(f"{key}: the checkpoint's params do not fit this stage's model (first differences: "
                            f"{[(k, got.get(k), want.get(k)) for k in diff]} as (param, checkpoint, model)); the "
                            f"stages must share config.model and config.data.")


def _is_causal_recipe(name: str) -> bool:
  """Whether a stage's recipe trains a causal model (a bidirectional teacher's config may carry an unused
  `causal` section when it comes from a causal recipe config)."""
  from rcm_jax.recipes.base import RECIPES
  return name in RECIPES and issubclass(RECIPES[name], CausalRecipe)


def _check_stage_config(stage_dir: str, config, key: str, kind: str) -> None:
  """The stage's config.json must agree on the model and, for kind "causal" (or "causal_if_any" when the stage
  has a pattern: an init_from that is itself causal), on the block pattern."""
  path = os.path.join(stage_dir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    other = json.load(f)
  mine = json.loads(config.to_json_best_effort())
  for name in ("size", "patch_size", "dim", "num_heads", "num_layers"):
    a, b = other.get("model", {}).get(name), mine.get("model", {}).get(name)
    if a is not None and b is not None and a != b:
      raise RecipeConfigError(f"{key}={stage_dir} was trained with model.{name}={a!r}, this stage has {b!r}; "
                              "they must match.")
  if kind == "causal_if_any" and "causal" in other and _is_causal_recipe(other.get("recipe", "")):
    kind = "causal"
  if kind != "causal":
    return
  if "causal" not in other:
    raise RecipeConfigError(f"{key}={stage_dir} has no causal block pattern (not a TF/DF stage?) but "
                            f"teacher.kind='causal'; set teacher.kind='bidirectional' or point {key} at a causal "
                            "stage.")
  theirs = BlockPattern.from_config(ml_collections.ConfigDict({"causal": other["causal"]}))
  ours = BlockPattern.from_config(config)
  for field in dataclasses.fields(BlockPattern):
    a, b = getattr(theirs, field.name), getattr(ours, field.name)
    if a != b:
      raise RecipeConfigError(f"{key}={stage_dir} was trained with causal.{field.name}={a!r}, this stage has "
                              f"{b!r}; a causal teacher must share the block pattern.")


def load_frozen(config, model, key: str, *, use_ema: bool = True, kind: str = "bidirectional"):
  """Params of the stage dir at config.<key> (e.g. teacher_from), checked against `model` and the pattern."""
  stage_dir = config.get(key) or ""
  if not stage_dir:
    raise RecipeConfigError(f"Recipe {config.recipe!r} needs a frozen teacher: set {key} to a stage name (in a "
                            "recipe config) or a stage directory.")
  from rcm_jax.training import checkpoint  # lazy: training imports recipes
  _check_stage_config(stage_dir, config, key, kind)
  try:
    params, _ = checkpoint.load_params(stage_dir, use_ema=use_ema)
  except FileNotFoundError as e:
    raise RecipeConfigError(f"{key}={stage_dir}: {e}") from None
  check_params_fit(params, model, key)
  return params


# ----------------------------------------------------------------------------- base class
class CausalRecipe(Recipe):
  """A recipe on a causal student: validated block pattern, layout, optional frozen teacher.

  `teacher_params` (tests, or a caller that already holds them) skips loading from `teacher_from`.
  """
  default_teacher_kind: str | None = None   # None: this recipe uses no teacher

  def __init__(self, config, model, *, teacher_params=None):
    super().__init__(config, model)
    self.pattern = BlockPattern.from_config(config)
    tokens_per_frame(model, 1, 1)   # patch_size check, before any compute
    frames = config.get("data", {}).get("world", {}).get("frames") if config.get("data") else None
    if frames:
      self.pattern.check(int(frames))
    if config.get("init_from"):   # a causal init (tf -> tf_scm) must share the block pattern
      _check_stage_config(config.init_from, config, "init_from", "causal_if_any")
    self.teacher = None
    self._teacher_params = None
    if self.uses_teacher():
      t = section(config, "teacher", kind="", cfg_scale=3.0, use_ema=True)
      kind = t.kind or self.default_teacher_kind
      if kind not in TEACHER_KINDS:
        raise RecipeConfigError(f"teacher.kind={t.kind!r}: choose one of {TEACHER_KINDS} (or '' for the recipe's "
                                f"default, {self.default_teacher_kind!r}).")
      if not 1.0 <= float(t.cfg_scale) <= 20.0:
        raise RecipeConfigError(f"teacher.cfg_scale={t.cfg_scale} is out of range: use 1 (no guidance) to 20; "
                                "the paper uses 3 for TF-CM.")
      self.teacher = ml_collections.ConfigDict(dict(kind=kind, cfg_scale=float(t.cfg_scale), use_ema=t.use_ema))
      self._teacher_params = (teacher_params if teacher_params is not None
                              else load_frozen(config, model, "teacher_from", use_ema=t.use_ema, kind=kind))

  def uses_teacher(self) -> bool:
    return self.default_teacher_kind is not None

  def frozen_params(self):
    return {"teacher": self._teacher_params} if self.uses_teacher() else {}

  def layout(self, x) -> Layout:
    return layout(self.pattern, self.model, x)

  def teacher_velocity(self, frozen, lay, x_ctx, x_t, t, batch, t_ctx=None):
    return teacher_velocity(self.model, frozen["teacher"], self.teacher.kind, lay, x_ctx, x_t, t, batch["cond"],
                            batch["null"], self.teacher.cfg_scale, t_ctx)


def as_f32(batch: dict) -> Any:
  return jnp.asarray(batch["video"], jnp.float32)
