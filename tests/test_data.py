"""Toy worlds and their ArrayRecord + grain pipeline (rcm_jax/data)."""

import json
import os

import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rcm_jax import data
from rcm_jax.data import pipeline, records, worlds

SMALL = {
    "moving_digits": dict(size=24, frames=6, channels=1, digit_size=10, max_digits=2),
    "camera_pan": dict(size=16, frames=6, channels=3, photo_height=48, step=2),
}


@pytest.fixture(params=sorted(SMALL))
def world(request):
  return data.get_world(request.param, SMALL[request.param])


# ------------------------------------------------------------------------------------------------ worlds


def test_deterministic_by_seed_and_prefix_stable(world):
  a = world.generate(5, seed=3, split="train")
  b = world.generate(5, seed=3, split="train")
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  tail = world.generate(2, seed=3, split="train", start=3)
  for k in a:
    np.testing.assert_array_equal(a[k][3:], tail[k])


def test_seeds_and_splits_differ(world):
  a = world.generate(4, seed=0, split="train")["video"]
  assert not np.array_equal(a, world.generate(4, seed=1, split="train")["video"])
  assert not np.array_equal(a, world.generate(4, seed=0, split="test")["video"])


def test_shapes_dtypes_and_range(world):
  batch = world.generate(4, seed=0, split="test")
  v = batch["video"]
  assert v.dtype == np.float32 and v.shape == (4,) + world.frame_shape
  assert v.min() >= -1.0 and v.max() <= 1.0
  # frames are on the 8-bit grid, so uint8 storage round-trips exactly
  np.testing.assert_array_equal(worlds.dequantize(worlds.quantize(v)), v)
  for k in world.meta_keys:
    assert len(batch[k]) == 4


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_and_size_configurable(channels):
  for name, extra in (("moving_digits", dict(digit_size=10)), ("camera_pan", dict(photo_height=40, step=2))):
    w = data.get_world(name, dict(size=16, frames=3, channels=channels, **extra))
    assert w.generate(1, 0)["video"].shape == (1, 3, 16, 16, channels)


def test_digits_bounce_inside_canvas_and_draw_where_recorded():
  w = data.get_world("moving_digits", dict(size=24, frames=24, digit_size=10, max_digits=1, min_speed=2.0,
                                           max_speed=3.0))
  b = w.generate(8, seed=0, split="train")
  c = w.config
  top_left = b["positions"][:, :, 0] - (c.digit_size - 1) / 2  # [N, T, 2]
  assert top_left.min() >= -1e-5 and top_left.max() <= c.size - c.digit_size + 1e-5
  # at >= 2 px/frame for 24 frames over a 14 px range every video bounces: the velocity sign flips
  step = np.diff(top_left, axis=1)
  assert np.all((np.sign(step[:, 1:]) != np.sign(step[:, :-1])).any(axis=(1, 2)))
  # the ink lies inside the recorded box (plus the one extra pixel of the sub-pixel shift)
  for n in range(8):
    for t in range(c.frames):
      ys, xs = np.nonzero(b["video"][n, t, ..., 0] > -1)
      r0, c0 = np.floor(top_left[n, t]).astype(int)
      assert ys.min() >= r0 and ys.max() <= r0 + c.digit_size
      assert xs.min() >= c0 and xs.max() <= c0 + c.digit_size


def test_digits_labels_null_slots_and_disjoint_image_splits():
  w = data.get_world("moving_digits", dict(size=24, frames=2, digit_size=10, max_digits=2))
  tr, te = w.generate(40, 0, "train"), w.generate(40, 0, "test")
  for b in (tr, te):
    present = b["image_ids"] >= 0
    assert np.all((b["labels"] == worlds.NULL_LABEL) == ~present)
    assert present[:, 0].all() and (~present[:, 1]).any() and present[:, 1].any()
    _, all_labels = worlds.upscaled_digits(10)
    np.testing.assert_array_equal(b["labels"][present], all_labels[b["image_ids"][present]])
  assert not set(tr["image_ids"][tr["image_ids"] >= 0]) & set(te["image_ids"][te["image_ids"] >= 0])
  split = worlds.digit_split_indices(0.2)
  assert len(split["train"]) + len(split["test"]) == 1797


def test_camera_renderer_matches_generated_frames():
  w = data.get_world("camera_pan", SMALL["camera_pan"])
  b = w.generate(6, seed=2, split="train")
  for i in range(6):
    frames = w.render_pan(b["image_index"][i], b["origins"][i, 0], b["actions"][i])
    np.testing.assert_array_equal(frames, b["video"][i])
    np.testing.assert_array_equal(w.pan_origins(b["image_index"][i], b["origins"][i, 0], b["actions"][i]),
                                  b["origins"][i])
  np.testing.assert_array_equal(b["first_frame"], b["video"][:, 0])
  assert np.all(b["actions"][:, 0] == 0)
  # the action at frame t moves the window from t-1 to t
  eff = w.effective_actions(b["origins"])
  moved = eff[:, 1:] != 0
  np.testing.assert_array_equal(eff[:, 1:][moved], b["actions"][:, 1:][moved])


def test_camera_actions_move_content_and_clamp_at_border():
  w = data.get_world("camera_pan", SMALL["camera_pan"])
  s = w.config.step
  hi_r, hi_c = w.origin_bounds(0)
  # right, right, then "up" from the top row (clamped), then down
  origins = w.pan_origins(0, (0, 0), [0, 4, 4, 1, 2])
  np.testing.assert_array_equal(origins, [[0, 0], [0, s], [0, 2 * s], [0, 2 * s], [s, 2 * s]])
  frames = w.render_pan(0, (0, 0), [0, 4, 4, 1, 2])
  np.testing.assert_array_equal(frames[2], frames[3])  # clamped: the frame repeats
  np.testing.assert_array_equal(frames[1][:, :-s], frames[0][:, s:])  # moving right slides content left
  np.testing.assert_array_equal(w.effective_actions(origins), [0, 4, 4, 0, 2])
  # a move with less than one step of room left is not performed at all (no partial step)
  far = w.pan_origins(0, (hi_r, hi_c - 1), [0, 4, 4, 2, 1])
  np.testing.assert_array_equal(far, [[hi_r, hi_c - 1]] * 4 + [[hi_r - s, hi_c - 1]])
  with pytest.raises(ValueError, match="null action"):
    w.render_pan(0, (0, 0), [0, worlds.NULL_ACTION])
  with pytest.raises(ValueError, match="outside"):
    w.render_pan(0, (hi_r + 1, 0), [0])


def test_camera_random_policy_has_real_motion():
  w = data.get_world("camera_pan", dict(size=16, frames=16, photo_height=48, step=2))
  b = w.generate(32, 0, "train")
  eff = w.effective_actions(b["origins"])[:, 1:]
  assert (eff != 0).mean() > 0.4
  assert set(np.unique(b["actions"][:, 1:])) == {0, 1, 2, 3, 4}
  # persistence: consecutive actions repeat far more often than the 1/5 of an i.i.d. policy
  assert (b["actions"][:, 2:] == b["actions"][:, 1:-1]).mean() > 0.6


def test_model_inputs_and_null_inputs():
  d = data.get_world("moving_digits", SMALL["moving_digits"])
  b = d.generate(3, 0)
  np.testing.assert_array_equal(d.model_inputs(b)["labels"], b["labels"])
  assert np.all(d.null_inputs(b)["labels"] == worlds.NULL_LABEL)
  assert d.model_overrides() == {"in_channels": 1, "out_channels": 1, "num_classes": 10}

  c = data.get_world("camera_pan", SMALL["camera_pan"])
  b = c.generate(3, 0)
  inp = c.model_inputs(b)
  t, h, w, ch = c.frame_shape
  assert inp["actions"].dtype == np.int32 and inp["actions"].shape == (3, t)
  assert inp["y"].dtype == np.float32 and inp["y"].shape == (3, t, h, w, ch + 1)
  np.testing.assert_array_equal(inp["y"][:, 0, ..., :ch], b["video"][:, 0])
  assert np.all(inp["y"][:, 0, ..., ch] == 1) and np.all(inp["y"][:, 1:] == 0)
  null = c.null_inputs(b)
  assert np.all(null["actions"] == worlds.NULL_ACTION) and not null["y"].any()
  assert c.model_overrides()["cond_channels"] == ch + 1


def test_registry_and_config_errors():
  with pytest.raises(ValueError, match="camera_pan.*moving_digits"):
    data.get_world("pong")
  with pytest.raises(ValueError, match="digit_szie"):
    data.get_world("moving_digits", {"digit_szie": 12})
  with pytest.raises(ValueError, match="channels"):
    data.get_world("camera_pan", {"channels": 2})
  with pytest.raises(ValueError, match="split"):
    data.get_world("camera_pan").generate(1, 0, "validation")
  cfg = ml_collections.ConfigDict(dict(size=16, frames=2, digit_size=8))
  assert data.get_world("moving_digits", cfg).config.size == 16


# ------------------------------------------------------------------------------------------------ records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  path = data.ensure_dataset("moving_digits", SMALL["moving_digits"], 37, 5, "train", root, shard_size=10,
                             progress=False)
  return root, path


def test_dataset_layout_and_roundtrip(dataset):
  root, path = dataset
  assert path == os.path.join(root, "moving_digits_train")
  manifest = records.read_manifest(path)
  assert manifest["world"] == "moving_digits" and manifest["num_videos"] == 37 and manifest["seed"] == 5
  assert [s["num_records"] for s in manifest["shards"]] == [10, 10, 10, 7]
  loaded = data.load_all(path, progress=False)
  expected = data.get_world("moving_digits", SMALL["moving_digits"]).generate(37, 5, "train")
  assert loaded.keys() == expected.keys()
  for k in expected:
    np.testing.assert_array_equal(loaded[k], expected[k])


def test_ensure_dataset_reuses_and_never_overwrites(dataset):
  root, path = dataset
  stamp = os.path.getmtime(os.path.join(path, "manifest.json"))
  assert data.ensure_dataset("moving_digits", SMALL["moving_digits"], 37, 5, "train", root) == path
  assert os.path.getmtime(os.path.join(path, "manifest.json")) == stamp
  for change, key in (({"size": 28}, "config.size"), ({}, "seed")):
    cfg = dict(SMALL["moving_digits"], **change)
    seed = 6 if key == "seed" else 5
    with pytest.raises(data.DatasetMismatchError, match=key):
      data.ensure_dataset("moving_digits", cfg, 37, seed, "train", root)
  with pytest.raises(data.DatasetMismatchError, match="num_videos"):
    data.ensure_dataset("moving_digits", SMALL["moving_digits"], 38, 5, "train", root)
  assert os.path.getmtime(os.path.join(path, "manifest.json")) == stamp


def test_split_alias_and_foreign_directory(tmp_path):
  assert data.dataset_dir(tmp_path, "camera_pan", "eval") == os.path.join(tmp_path, "camera_pan_test")
  os.makedirs(tmp_path / "camera_pan_train")
  with pytest.raises(data.DatasetError, match="manifest"):
    data.ensure_dataset("camera_pan", SMALL["camera_pan"], 4, 0, "train", tmp_path)


def _copy(path, dst):
  import shutil
  shutil.copytree(path, dst)
  return str(dst)


def test_truncated_shard_names_the_file(dataset, tmp_path):
  path = _copy(dataset[1], tmp_path / "ds")
  shard = os.path.join(path, records.read_manifest(path)["shards"][1]["file"])
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) // 2)
  for fn in (lambda: data.load_all(path), lambda: data.make_batches(path, 4, 0)):
    with pytest.raises(data.DatasetError, match=f"corrupt shard {shard}"):
      fn()


def test_missing_shard_names_the_file(dataset, tmp_path):
  path = _copy(dataset[1], tmp_path / "ds")
  shard = os.path.join(path, records.read_manifest(path)["shards"][2]["file"])
  os.remove(shard)
  for fn in (lambda: data.load_all(path), lambda: data.make_batches(path, 4, 0)):
    with pytest.raises(data.DatasetError, match=f"missing shard {shard}"):
      fn()


def test_flipped_bytes_name_the_file(dataset, tmp_path):
  path = _copy(dataset[1], tmp_path / "ds")
  shard = os.path.join(path, records.read_manifest(path)["shards"][1]["file"])
  raw = bytearray(open(shard, "rb").read())
  for off in range(200, 600, 7):  # same size, damaged payload: caught by the shard's chunk hashes on read
    raw[off] ^= 0xFF
  open(shard, "wb").write(bytes(raw))
  with pytest.raises(data.DatasetError, match=f"corrupt shard {shard}"):
    data.load_all(path)


def test_record_count_mismatch_is_reported(dataset, tmp_path):
  path = _copy(dataset[1], tmp_path / "ds")
  mpath = os.path.join(path, "manifest.json")
  manifest = json.load(open(mpath))
  manifest["shards"][0]["num_records"] = 11
  json.dump(manifest, open(mpath, "w"))
  with pytest.raises(data.DatasetError, match="shard-00000"):
    data.load_all(path)


# ------------------------------------------------------------------------------------------------ pipeline


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_resumed_iterator_sees_the_same_batches(dataset):
  path = dataset[1]
  unbroken = _take(data.make_batches(path, 8, seed=1), 9)
  resumed = _take(data.make_batches(path, 8, seed=1, start_step=6), 3)
  for a, b in zip(unbroken[6:], resumed):
    _assert_batches_equal(a, b)
  other = next(data.make_batches(path, 8, seed=2))
  assert not np.array_equal(other["video"], unbroken[0]["video"])
  assert unbroken[0]["video"].shape == (8,) + tuple(SMALL["moving_digits"][k] for k in ("frames", "size", "size", "channels"))


def test_shuffle_covers_each_epoch_and_reshuffles(dataset):
  path = dataset[1]
  ds = pipeline.batch_dataset(path, 37, seed=0)  # one batch = one epoch
  first, second = ds[0]["image_ids"][:, 0], ds[1]["image_ids"][:, 0]
  all_ids = data.load_all(path, progress=False)["image_ids"][:, 0]
  assert sorted(first) == sorted(all_ids) == sorted(second)
  assert not np.array_equal(first, second)
  plain = pipeline.batch_dataset(path, 37, seed=0, shuffle=False)
  np.testing.assert_array_equal(plain[0]["image_ids"][:, 0], all_ids)


def test_process_shards_partition_the_global_batch(dataset):
  path = dataset[1]
  global_batches = _take(data.make_batches(path, 12, seed=3), 4)
  parts = [_take(data.make_batches(path, 12, seed=3, process_index=p, process_count=3), 4) for p in range(3)]
  for step in range(4):
    for k in global_batches[step]:
      joined = np.concatenate([parts[p][step][k] for p in range(3)])
      np.testing.assert_array_equal(joined, global_batches[step][k])
  with pytest.raises(ValueError, match="divisible"):
    data.make_batches(path, 10, seed=0, process_count=3)


def test_finite_epochs_and_remainder(dataset):
  path = dataset[1]
  assert len(list(data.make_batches(path, 10, 0, num_epochs=1))) == 3
  last = list(data.make_batches(path, 10, 0, num_epochs=1, drop_remainder=False))
  assert [len(b["video"]) for b in last] == [10, 10, 10, 7]


@settings(max_examples=60, deadline=None)
@given(actions=st.lists(st.integers(0, 4), min_size=1, max_size=30), image=st.integers(0, 1),
       start=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_pan_origins_stay_inside_and_follow_actions(actions, image, start):
  w = data.get_world("camera_pan", SMALL["camera_pan"])
  hi = np.array(w.origin_bounds(image))
  o0 = np.floor(np.array(start) * hi).astype(int)
  origins = w.pan_origins(image, o0, actions)
  assert np.all(origins >= 0) and np.all(origins <= hi)
  np.testing.assert_array_equal(origins[0], o0)
  eff = w.effective_actions(origins)
  # every step either performs its action exactly or, blocked by the border, does not move at all
  deltas = w.action_deltas()
  for t in range(1, len(actions)):
    step = origins[t] - origins[t - 1]
    target = origins[t - 1] + deltas[actions[t]]
    blocked = np.any(target < 0) or np.any(target > hi)
    np.testing.assert_array_equal(step, 0 if blocked else deltas[actions[t]])
    assert eff[t] == (0 if blocked else actions[t])
