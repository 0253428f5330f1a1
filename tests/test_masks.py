"""Video mask builders against an independent dense construction, plus errors and Wan-scale cost."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pallas_kernels.mask import Mask
from rcm_jax.models import masks


# --- brute force, written from the rules in the paper notes (section 3), not from masks.py ---

def _frame_block(f, first, chunk):
  return 0 if f < first else 1 + (f - first) // chunk


def _sees(i, j, local, sink):
  """Query block i may see key block j (block-causal with window and sinks)."""
  return j <= i and (local is None or i - j < local or j < sink)


def _dense_block_causal(nf, tpf, first, chunk, local, sink):
  blk = np.array([_frame_block(tok // tpf, first, chunk) for tok in range(nf * tpf)])
  out = np.zeros((len(blk), len(blk)), bool)
  for q in range(len(blk)):
    for k in range(len(blk)):
      out[q, k] = _sees(blk[q], blk[k], local, sink)
  return out


def _dense_teacher_forcing(nf, tpf, first, chunk, local, sink):
  n = nf * tpf
  blk = [_frame_block(tok // tpf, first, chunk) for tok in range(n)]
  out = np.zeros((2 * n, 2 * n), bool)
  for q in range(2 * n):
    q_noisy, bq = q >= n, blk[q % n]
    for k in range(2 * n):
      k_noisy, bk = k >= n, blk[k % n]
      if not q_noisy and not k_noisy:
        out[q, k] = _sees(bq, bk, local, sink)
      elif q_noisy and not k_noisy:
        out[q, k] = bk < bq and _sees(bq, bk, local, sink)
      elif q_noisy and k_noisy:
        out[q, k] = bq == bk
      # clean -> noisy: never
  return out


PATTERNS = [  # (num_frames, tokens_per_frame, first_chunk_frames, chunk_frames, local_blocks, sink_blocks)
    (4, 2, 1, 1, None, 0),   # c1-1 frame-wise
    (6, 3, 3, 3, None, 0),   # c3-3 chunk-wise
    (9, 2, 1, 4, None, 0),   # c1-4
    (7, 2, 1, 1, 3, 0),      # sliding window of 3 blocks
    (7, 1, 1, 1, 2, 1),      # window + 1 sink
    (10, 2, 1, 3, 2, 2),     # sinks reaching the window
    (9, 2, 3, 3, 1, 0),      # window of 1: own block only
    (8, 1, 2, 2, 1, 3),      # window 1, 3 sinks
]


@pytest.mark.parametrize("nf,tpf,first,chunk,local,sink", PATTERNS)
def test_block_causal_matches_bruteforce(nf, tpf, first, chunk, local, sink):
  m = masks.block_causal(nf, tpf, first_chunk_frames=first, chunk_frames=chunk, local_blocks=local,
                         sink_blocks=sink)
  assert isinstance(m, Mask) and m.ranges is not None and m.shape == (nf * tpf, nf * tpf)
  np.testing.assert_array_equal(m.to_dense(), _dense_block_causal(nf, tpf, first, chunk, local, sink))


@pytest.mark.parametrize("nf,tpf,first,chunk,local,sink", PATTERNS)
def test_teacher_forcing_matches_bruteforce(nf, tpf, first, chunk, local, sink):
  m = masks.teacher_forcing(nf, tpf, first_chunk_frames=first, chunk_frames=chunk, local_blocks=local,
                            sink_blocks=sink)
  assert isinstance(m, Mask) and m.ranges is not None and m.shape == (2 * nf * tpf, 2 * nf * tpf)
  np.testing.assert_array_equal(m.to_dense(), _dense_teacher_forcing(nf, tpf, first, chunk, local, sink))


@settings(max_examples=40, deadline=None)
@given(first=st.integers(1, 3), chunk=st.integers(1, 3), extra_blocks=st.integers(0, 4),
       tpf=st.integers(1, 3), local=st.one_of(st.none(), st.integers(1, 4)), sink=st.integers(0, 3))
def test_masks_match_bruteforce_random(first, chunk, extra_blocks, tpf, local, sink):
  nf = first + extra_blocks * chunk
  kw = dict(first_chunk_frames=first, chunk_frames=chunk, local_blocks=local, sink_blocks=sink)
  np.testing.assert_array_equal(masks.block_causal(nf, tpf, **kw).to_dense(),
                                _dense_block_causal(nf, tpf, first, chunk, local, sink))
  np.testing.assert_array_equal(masks.teacher_forcing(nf, tpf, **kw).to_dense(),
                                _dense_teacher_forcing(nf, tpf, first, chunk, local, sink))


def test_block_ids():
  np.testing.assert_array_equal(masks.block_ids(7, first_chunk_frames=1, chunk_frames=3), [0, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(masks.block_ids(4, first_chunk_frames=1, chunk_frames=1), [0, 1, 2, 3])
  np.testing.assert_array_equal(masks.block_ids(21, first_chunk_frames=3, chunk_frames=3), np.arange(21) // 3)
  assert masks.block_frame_ranges(9, first_chunk_frames=1, chunk_frames=4) == [(0, 1), (1, 5), (5, 9)]


def test_bad_patterns_name_the_key():
  with pytest.raises(ValueError, match="num_frames.*chunk_frames"):
    masks.block_ids(7, first_chunk_frames=1, chunk_frames=4)
  with pytest.raises(ValueError, match="first_chunk_frames"):
    masks.block_ids(2, first_chunk_frames=3, chunk_frames=1)
  with pytest.raises(ValueError, match="chunk_frames"):
    masks.block_ids(4, first_chunk_frames=1, chunk_frames=0)
  with pytest.raises(ValueError, match="local_blocks"):
    masks.block_causal(4, 2, first_chunk_frames=1, chunk_frames=1, local_blocks=0)
  with pytest.raises(ValueError, match="sink_blocks"):
    masks.teacher_forcing(4, 2, first_chunk_frames=1, chunk_frames=1, sink_blocks=-1)
  with pytest.raises(ValueError, match="tokens_per_frame"):
    masks.block_causal(4, 0, first_chunk_frames=1, chunk_frames=1)


def test_wan_scale_is_cheap():
  # Wan 480p: 21 latent frames x 1560 tokens; teacher forcing packs 2 x that. Never densify here.
  for first, chunk in ((1, 1), (3, 3), (1, 4)):
    m = masks.teacher_forcing(21, 1560, first_chunk_frames=first, chunk_frames=chunk)
    assert m.shape == (2 * 21 * 1560,) * 2
    assert len(m.ranges) < 200
  m = masks.teacher_forcing(21, 1560, first_chunk_frames=1, chunk_frames=1, local_blocks=7, sink_blocks=1)
  assert m.shape == (65520, 65520)
  hash(m)  # static: usable as a jit constant / module attribute


def test_chunk_attention_ranges_is_a_block_row():
  nf, tpf, kw = 10, 2, dict(first_chunk_frames=1, chunk_frames=3, local_blocks=2, sink_blocks=1)
  dense = masks.block_causal(nf, tpf, **kw).to_dense()
  tok = masks.block_frame_ranges(nf, first_chunk_frames=1, chunk_frames=3)
  for blk, (f0, f1) in enumerate(tok):
    row = np.zeros(nf * tpf, bool)
    for k0, k1 in masks.chunk_attention_ranges(nf, tpf, blk, **kw):
      row[k0:k1] = True
    for q in range(f0 * tpf, f1 * tpf):
      np.testing.assert_array_equal(dense[q], row)


def test_bidirectional_is_none():
  assert masks.bidirectional is None
