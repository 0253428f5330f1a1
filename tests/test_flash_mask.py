"""Tile schedules and row intervals built from a Mask: checked against the dense matrix, no kernels run."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels import Mask
from pallas_kernels.mask import EMPTY, FULL, PARTIAL, TileSchedule, tile_schedule
from rcm_jax.models import masks as video


def _brute_state(dense, lq_pad, lk_pad, bq, bk):
  """[nq, nk] tile states from the dense mask; padded rows don't care, padded keys are masked."""
  lq, lk = dense.shape
  any_ = np.zeros((lq_pad, lk_pad), bool)
  all_ = np.ones((lq_pad, lk_pad), bool)
  any_[:lq, :lk] = dense
  all_[:lq, :] = False
  all_[:lq, :lk] = dense
  shape = (lq_pad // bq, bq, lk_pad // bk, bk)
  touched = any_.reshape(shape).any((1, 3))
  full = all_.reshape(shape).all((1, 3))
  return np.where(full, FULL, np.where(touched, PARTIAL, EMPTY))


def _element_mask(sched, lq, lk):
  """The dense mask the kernel sees: intervals (or the dense tile) per row, restricted to real keys."""
  if sched.mode == "dense":
    return sched.mask_arrays[0][:lq, :lk] != 0
  starts, ends = sched.mask_arrays
  cols = np.arange(lk)[None, :, None]
  return ((cols >= starts.T[:lq, None, :]) & (cols < ends.T[:lq, None, :])).any(-1)


def _check(mask, bq, bk):
  lq, lk = mask.shape
  lq_pad, lk_pad = -(-lq // bq) * bq, -(-lk // bk) * bk
  sched = TileSchedule(mask, lq_pad, lk_pad, bq, bk)
  dense = mask.to_dense()
  np.testing.assert_array_equal(sched.tile_state, _brute_state(dense, lq_pad, lk_pad, bq, bk))
  np.testing.assert_array_equal(_element_mask(sched, lq, lk), dense)
  # Work lists: partial tiles first, then full, exactly the non-empty tiles of each row / column.
  for lists, state in (((sched.kv_tiles, sched.kv_partial, sched.kv_full, sched.wq), sched.tile_state),
                       ((sched.q_tiles, sched.q_partial, sched.q_full, sched.wk), sched.tile_state.T)):
    tiles, n_p, n_f, w = lists
    for i, row in enumerate(state):
      got = tiles[i * w:i * w + n_p[i] + n_f[i]]
      assert sorted(got[:n_p[i]]) == list(np.flatnonzero(row == PARTIAL))
      assert sorted(got[n_p[i]:]) == list(np.flatnonzero(row == FULL))
  # Launch orders: every tile once, by decreasing work, ties in index order.
  for order, work in ((sched.kv_order, sched.kv_partial + sched.kv_full),
                      (sched.q_order, sched.q_partial + sched.q_full)):
    assert sorted(order) == list(range(len(work)))
    keys = [(-work[t], t) for t in order]
    assert keys == sorted(keys)
  assert abs(mask.density() - dense.mean()) < 1e-12
  # single_run: in no row does the mask allow two separate runs of keys inside one key tile
  padded = np.zeros((lq, lk_pad), bool)
  padded[:, :lk] = dense
  tiles = padded.reshape(lq, lk_pad // bk, bk)
  runs = tiles[..., 0].astype(int) + (tiles[..., 1:] & ~tiles[..., :-1]).sum(-1)
  assert sched.single_run == (sched.mode == "intervals" and runs.max(initial=0) <= 1)
  return sched


rects = st.lists(st.tuples(st.integers(0, 70), st.integers(0, 70), st.integers(0, 90), st.integers(0, 90)),
                 min_size=0, max_size=6)


@settings(max_examples=60, deadline=None)
@given(rects=rects, lq=st.integers(1, 70), lk=st.integers(1, 90), bq=st.sampled_from([8, 16, 32]),
       bk=st.sampled_from([8, 16]))
def test_schedule_from_random_rectangles(rects, lq, lk, bq, bk):
  clipped = [(min(a, b, lq), min(max(a, b), lq), min(c, d, lk), min(max(c, d), lk)) for a, b, c, d in rects]
  _check(Mask.from_ranges(lq, lk, clipped), bq, bk)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lq=st.integers(1, 50), lk=st.integers(1, 50),
       density=st.sampled_from([0.0, 0.1, 0.5, 0.95, 1.0]))
def test_schedule_from_random_dense(seed, lq, lk, density):
  dense = np.random.default_rng(seed).random((lq, lk)) < density
  _check(Mask.from_dense(dense), 16, 8)


@pytest.mark.parametrize("builder", [video.teacher_forcing, video.block_causal])
@pytest.mark.parametrize("pattern", [(1, 1, None, 0), (1, 3, None, 0), (1, 1, 3, 1), (2, 2, 2, 1)])
def test_schedule_video_masks(builder, pattern):
  first, chunk, local, sinks = pattern
  mask = builder(7 if first == 1 else 8, 10, first_chunk_frames=first, chunk_frames=chunk, local_blocks=local,
                 sink_blocks=sinks)
  sched = _check(mask, 16, 16)
  assert sched.mode == "intervals" and sched.mask_arrays[0].shape[0] <= 3


def test_wan_teacher_forcing_schedule_is_cheap(monkeypatch):
  """131,040 x 131,040 tokens (Wan 480p TF, 2 x 2 x 21 x 1560 tokens): schedule without a dense matrix."""
  mask = video.teacher_forcing(42, 1560, first_chunk_frames=1, chunk_frames=1)
  monkeypatch.setattr(Mask, "to_dense", lambda self: pytest.fail("dense mask materialised"))
  lq = mask.shape[0]
  sched = tile_schedule(mask, -(-lq // 128) * 128, -(-lq // 128) * 128, 128, 64)
  assert 0.2 < sched.computed_fraction() < 0.35
  assert sched.mask_arrays[0].shape == (2, sched.mask_arrays[0].shape[1])
  assert sched.single_run   # a noisy row's clean context and its own frame are never in one key tile
  assert 0.2 < mask.density() < 0.3
