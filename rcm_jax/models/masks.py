"""Video attention masks over blocks of latent frames (Causal-rCM section 3), as `pallas_kernels.Mask`.

A block is 1 or more latent frames: the first block holds `first_chunk_frames` frames, every later block
`chunk_frames` (c1-1: frame-wise; c3-3: 3-frame chunks; c1-4: one frame, then 4-frame chunks). Tokens are
ordered frame-major (`frame * tokens_per_frame + token`), as the DiT flattens them.

Every builder returns rectangles (`Mask.from_ranges`), a few per block, so a teacher-forcing mask over
2 x 21 x 1560 tokens costs microseconds and never materialises [L, L]. `None` means bidirectional.

Visibility rule shared by all builders (and the KV-cache rollout): a query in block i sees key block j iff
`j <= i` and (`local_blocks is None` or `j > i - local_blocks` or `j < sink_blocks`), i.e. a sliding window
of `local_blocks` blocks that includes block i itself, plus the first `sink_blocks` blocks always.
"""
from __future__ import annotations

import numpy as np

from pallas_kernels.mask import Mask

bidirectional = None  # no mask: every token sees every token


def _check_int(name: str, value, minimum: int):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")


def block_ids(num_frames: int, *, first_chunk_frames: int, chunk_frames: int) -> np.ndarray:
  """Block index of each latent frame: int32[num_frames].

  e.g. num_frames=7, first_chunk_frames=1, chunk_frames=3 -> [0, 1, 1, 1, 2, 2, 2].
  """
  _check_int("num_frames", num_frames, 1)
  _check_int("first_chunk_frames", first_chunk_frames, 1)
  _check_int("chunk_frames", chunk_frames, 1)
  if first_chunk_frames > num_frames:
    raise ValueError(f"first_chunk_frames ({first_chunk_frames}) > num_frames ({num_frames}): lower "
                     "first_chunk_frames or use more frames.")
  rest = num_frames - first_chunk_frames
  if rest % chunk_frames:
    raise ValueError(
        f"num_frames ({num_frames}) - first_chunk_frames ({first_chunk_frames}) = {rest} is not divisible by "
        f"chunk_frames ({chunk_frames}); use num_frames = {first_chunk_frames} + k * {chunk_frames} "
        f"(e.g. {first_chunk_frames + (rest // chunk_frames + 1) * chunk_frames}) or change the chunk pattern.")
  ids = np.zeros(num_frames, np.int32)
  ids[first_chunk_frames:] = 1 + np.arange(rest) // chunk_frames
  return ids


def block_frame_ranges(num_frames: int, *, first_chunk_frames: int, chunk_frames: int) -> list[tuple[int, int]]:
  """[(first_frame, end_frame)] of every block, in order."""
  ids = block_ids(num_frames, first_chunk_frames=first_chunk_frames, chunk_frames=chunk_frames)
  starts = np.flatnonzero(np.diff(ids, prepend=-1))
  ends = np.append(starts[1:], num_frames)
  return [(int(s), int(e)) for s, e in zip(starts, ends)]


def visible_blocks(block: int, *, local_blocks: int | None = None, sink_blocks: int = 0) -> list[tuple[int, int]]:
  """Key blocks a query in `block` may see (the module docstring's rule), as sorted disjoint [lo, hi) ranges."""
  _check_window(local_blocks, sink_blocks)
  if local_blocks is None:
    return [(0, block + 1)]
  lo = max(0, block - local_blocks + 1)
  if sink_blocks >= lo:  # the sinks reach the window: one contiguous range
    return [(0, block + 1)]
  return ([(0, sink_blocks)] if sink_blocks else []) + [(lo, block + 1)]


def _check_window(local_blocks, sink_blocks):
  if local_blocks is not None:
    _check_int("local_blocks", local_blocks, 1)
  _check_int("sink_blocks", sink_blocks, 0)


def _token_ranges(num_frames, tokens_per_frame, first_chunk_frames, chunk_frames):
  _check_int("tokens_per_frame", tokens_per_frame, 1)
  frames = block_frame_ranges(num_frames, first_chunk_frames=first_chunk_frames, chunk_frames=chunk_frames)
  return [(f0 * tokens_per_frame, f1 * tokens_per_frame) for f0, f1 in frames]


def _block_span(tok, lo, hi, offset=0):
  """Token range [k0, k1) covering blocks [lo, hi), shifted by `offset`."""
  return offset + tok[lo][0], offset + tok[hi - 1][1]


def block_causal(num_frames: int, tokens_per_frame: int, *, first_chunk_frames: int, chunk_frames: int,
                 local_blocks: int | None = None, sink_blocks: int = 0) -> Mask:
  """Mask[L, L], L = num_frames * tokens_per_frame: block i sees blocks <= i (window/sinks apply),
  bidirectional within a block. Used by diffusion forcing and causal inference."""
  _check_window(local_blocks, sink_blocks)
  tok = _token_ranges(num_frames, tokens_per_frame, first_chunk_frames, chunk_frames)
  length = num_frames * tokens_per_frame
  rects = []
  for i, (q0, q1) in enumerate(tok):
    for lo, hi in visible_blocks(i, local_blocks=local_blocks, sink_blocks=sink_blocks):
      rects.append((q0, q1, *_block_span(tok, lo, hi)))
  return Mask.from_ranges(length, length, rects)


def teacher_forcing(num_frames: int, tokens_per_frame: int, *, first_chunk_frames: int, chunk_frames: int,
                    local_blocks: int | None = None, sink_blocks: int = 0) -> Mask:
  """Mask[2L, 2L] over the packed sequence `[clean x0 (L tokens) | noisy x_t (L tokens)]`.

  Clean query in block i: clean blocks visible from i (<= i, window/sinks).
  Noisy query in block i: clean blocks visible from i except i itself (< i), plus its own noisy block i.
  Never noisy -> other noisy, never clean -> noisy. Both halves share RoPE positions (the caller's job).
  """
  _check_window(local_blocks, sink_blocks)
  tok = _token_ranges(num_frames, tokens_per_frame, first_chunk_frames, chunk_frames)
  length = num_frames * tokens_per_frame
  rects = []
  for i, (q0, q1) in enumerate(tok):
    for lo, hi in visible_blocks(i, local_blocks=local_blocks, sink_blocks=sink_blocks):
      rects.append((q0, q1, *_block_span(tok, lo, hi)))  # clean -> clean
      if lo < i:  # noisy -> clean context, blocks < i
        rects.append((length + q0, length + q1, *_block_span(tok, lo, min(hi, i))))
    rects.append((length + q0, length + q1, length + q0, length + q1))  # noisy -> own noisy block
  return Mask.from_ranges(2 * length, 2 * length, rects)


def chunk_attention_ranges(num_frames: int, tokens_per_frame: int, block: int, *, first_chunk_frames: int,
                           chunk_frames: int, local_blocks: int | None = None,
                           sink_blocks: int = 0) -> list[tuple[int, int]]:
  """Token ranges [(k0, k1)] of the full causal sequence that block `block`'s queries attend to.

  This is one block row of `block_causal`: what a KV-cache rollout must keep (cache) plus the chunk
  itself. Ranges are in the coordinates of the un-windowed sequence of `num_frames` frames.
  """
  tok = _token_ranges(num_frames, tokens_per_frame, first_chunk_frames, chunk_frames)
  if not 0 <= block < len(tok):
    raise ValueError(f"block must be in [0, {len(tok)}) for this pattern, got {block}.")
  return [_block_span(tok, lo, hi)
          for lo, hi in visible_blocks(block, local_blocks=local_blocks, sink_blocks=sink_blocks)]


def chunk_vs_cache(slot_blocks, block: int, chunk_frames: int, tokens_per_frame: int, *,
                   local_blocks: int | None = None, sink_blocks: int = 0, key_len: int | None = None,
                   chunk_at: int | None = None) -> Mask:
  """Mask[Lq, S + Lq] of a KV-cache rollout step: block `block`'s chunk (Lq = chunk_frames * tokens_per_frame
  queries) against keys `[cache (S = len(slot_blocks) * tokens_per_frame) | chunk]`.

  slot_blocks: the block held by each cache frame slot (-1 = empty). A slot is visible iff its block is an
  earlier block visible from `block` (the module docstring's rule); the chunk sees itself bidirectionally.
  key_len: Mask[Lq, key_len] instead, keys past S + Lq never visible (a cache buffer with the chunk's rows in
  place and tile padding after them: `rollout.init_cache(scratch_tokens=...)`).
  chunk_at: the key row of the chunk's own keys (default S, after the cache). A row inside the cache must start
  a run of chunk_frames empty slots: the chunk then sits in the slots it will be written to.
  """
  _check_window(local_blocks, sink_blocks)
  _check_int("chunk_frames", chunk_frames, 1)
  _check_int("tokens_per_frame", tokens_per_frame, 1)
  lq, s = chunk_frames * tokens_per_frame, len(slot_blocks) * tokens_per_frame
  chunk_at = s if chunk_at is None else chunk_at
  if chunk_at < s and (chunk_at % tokens_per_frame or chunk_at < 0 or chunk_at + lq > s or any(
      j >= 0 for j in slot_blocks[chunk_at // tokens_per_frame:chunk_at // tokens_per_frame + chunk_frames])):
    raise ValueError(f"chunk_at={chunk_at}: inside the cache ({s} tokens) the chunk's {lq} keys must fill "
                     f"{chunk_frames} empty frame slots (slots {list(slot_blocks)}, {tokens_per_frame} tokens each).")
  key_len = max(s, chunk_at + lq) if key_len is None else key_len
  if key_len < max(s, chunk_at + lq):
    raise ValueError(f"key_len={key_len} is shorter than the cache plus the chunk ({s} + {lq} tokens).")
  ranges = visible_blocks(block, local_blocks=local_blocks, sink_blocks=sink_blocks)
  visible = [0 <= j < block and any(lo <= j < hi for lo, hi in ranges) for j in slot_blocks]
  rects, start = [], None
  for i, vis in enumerate(list(visible) + [False]):   # merge runs of visible slots into rectangles
    if vis and start is None:
      start = i
    elif not vis and start is not None:
      rects.append((0, lq, start * tokens_per_frame, i * tokens_per_frame))
      start = None
  rects.append((0, lq, chunk_at, chunk_at + lq))
  return Mask.from_ranges(lq, key_len, rects)
