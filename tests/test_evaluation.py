"""Toy-world metrics (rcm_jax/evaluation): real held-out videos near the ceiling, noise at the floor, and
damaged videos (wrong conditions, shifted or frozen frames) scoring worse, so each metric can fail."""

import numpy as np
import pytest

from rcm_jax import data, evaluation
from rcm_jax.evaluation import camera, digits, frechet

DIGITS = dict(size=32, frames=8, channels=1, digit_size=14, max_digits=2)  # the toy recipe's setting
CAMERA = dict(size=32, frames=8, channels=3, photo_height=96, step=3)


@pytest.fixture(scope="module")
def digits_case():
  world = data.get_world("moving_digits", DIGITS)
  batch = world.generate(32, seed=0, split="test")
  return world, batch, evaluation.calibrate(world, meta=batch)


@pytest.fixture(scope="module")
def camera_case():
  world = data.get_world("camera_pan", CAMERA)
  batch = world.generate(32, seed=0, split="test")
  return world, batch, evaluation.calibrate(world, meta=batch)


def test_digits_real_near_ceiling_noise_at_floor(digits_case):
  _, _, cal = digits_case
  real, noise = cal["ceiling"], cal["noise"]
  assert set(real) == set(evaluation.METRICS["moving_digits"])
  assert real["digits/class_accuracy"] >= 0.7 and noise["digits/class_accuracy"] <= 0.2
  assert real["digits/detection_rate"] >= 0.9 and noise["digits/detection_rate"] <= 0.1
  assert real["digits/motion_rms_px"] <= 1.0 and noise["digits/motion_rms_px"] >= 8.0
  assert real["digits/frechet"] * 10 < noise["digits/frechet"]
  assert cal["floor"] == noise  # no untrained model passed: the noise floor stands in


def test_digits_metrics_can_fail(digits_case):
  world, batch, cal = digits_case
  real = cal["ceiling"]
  wrong = dict(batch, labels=np.where(batch["labels"] == 10, 10, (batch["labels"] + 3) % 10).astype(np.int32))
  assert evaluation.evaluate(world, batch["video"], wrong)["digits/class_accuracy"] < 0.3
  rng = np.random.default_rng(0)
  shuffled = batch["video"][:, rng.permutation(world.config.frames)]
  assert evaluation.evaluate(world, shuffled, batch)["digits/motion_rms_px"] > 2 * real["digits/motion_rms_px"]
  frozen = np.repeat(batch["video"][:, :1], world.config.frames, axis=1)
  f = evaluation.evaluate(world, frozen, batch)
  assert f["digits/motion_rms_px"] > 1.5 * real["digits/motion_rms_px"]
  assert f["digits/frechet"] > 1.5 * real["digits/frechet"]  # the feature sees frame-to-frame change
  blank = -np.ones_like(batch["video"])
  scores = evaluation.evaluate(world, blank, batch)
  assert scores["digits/class_accuracy"] == 0 and scores["digits/frechet"] > 5 * real["digits/frechet"]


def test_bounce_fit_recovers_exact_trajectories():
  travel, centre = 18.0, 6.5
  t = np.arange(12.0)
  from rcm_jax.data.worlds import _reflect

  pos = np.stack([centre + 1.0 + _reflect(3.0 + 2.1 * t, travel), centre - 0.5 + _reflect(15.0 - 1.3 * t, travel)], -1)
  valid = np.ones(12, bool)
  assert digits.fit_bounce_track(pos, valid, travel, 1.0, 2.5, centre) < 0.05
  still = np.full((12, 2), 9.0)
  assert digits.fit_bounce_track(still, valid, travel, 1.0, 2.5, centre) > 1.0
  jumpy = pos + np.random.default_rng(0).normal(0, 3, pos.shape)
  assert digits.fit_bounce_track(jumpy, valid, travel, 1.0, 2.5, centre) > 1.5


def test_camera_real_near_ceiling_noise_at_floor(camera_case):
  _, _, cal = camera_case
  real, noise = cal["ceiling"], cal["noise"]
  assert set(real) == set(evaluation.METRICS["camera_pan"])
  assert real["camera/psnr"] == camera.PSNR_CAP_DB and noise["camera/psnr"] < 12
  assert real["camera/ssim"] > 0.999 and noise["camera/ssim"] < 0.1
  assert real["camera/action_accuracy"] >= 0.95 and noise["camera/action_accuracy"] < 0.5


def test_camera_metrics_can_fail(camera_case):
  world, batch, cal = camera_case
  real = cal["ceiling"]
  shifted = np.roll(batch["video"], 2, axis=3)
  s = evaluation.evaluate(world, shifted, batch)
  assert s["camera/psnr"] < real["camera/psnr"] - 20 and s["camera/ssim"] < 0.9
  rng = np.random.default_rng(1)
  wrong = dict(batch, actions=np.concatenate([batch["actions"][:, :1], rng.integers(0, 5, batch["actions"][:, 1:].shape)], 1))
  w = evaluation.evaluate(world, batch["video"], wrong)
  assert w["camera/action_accuracy"] < 0.6 and w["camera/psnr"] < 30
  frozen = np.repeat(batch["video"][:, :1], world.config.frames, axis=1)
  assert evaluation.evaluate(world, frozen, batch)["camera/action_accuracy"] < 0.7


def test_action_estimate_matches_effective_actions_of_real_pans():
  world = data.get_world("camera_pan", dict(size=32, frames=12, photo_height=96, step=4))
  b = world.generate(16, 3, "test")
  est = camera.estimate_actions(b["video"], world.config.step)
  assert (est == world.effective_actions(b["origins"])).mean() > 0.95


def test_psnr_ssim_frechet_basics():
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  assert np.all(camera.psnr(a, a) == camera.PSNR_CAP_DB)
  np.testing.assert_allclose(camera.ssim(a, a), 1.0, atol=1e-9)
  assert np.all(camera.ssim(a, -a) < 0)
  np.testing.assert_allclose(camera.psnr(a, a + 0.02), 10 * np.log10(4 / 0.0004), rtol=1e-4)
  x, y = rng.normal(size=(500, 4)), rng.normal(1.0, 1.0, size=(500, 4))
  mx, sx = frechet.stats(x)
  assert frechet.frechet_distance(mx, sx, mx, sx) < 1e-6
  my, sy = frechet.stats(y)
  assert abs(frechet.frechet_distance(mx, sx, my, sy) - 4.0) < 0.6


def test_calibrate_with_untrained_floor_and_table(camera_case):
  world, batch, _ = camera_case
  untrained = np.zeros_like(batch["video"])
  cal = evaluation.calibrate(world, meta=batch, floor=untrained)
  assert cal["floor"] != cal["noise"]
  half = np.clip(batch["video"] + np.random.default_rng(0).normal(0, 0.1, batch["video"].shape), -1, 1)
  rows = {"model A": evaluation.evaluate(world, half, batch)}
  table = evaluation.format_table(rows, cal)
  lines = table.splitlines()
  assert "model A" in lines[0] and "ceiling" in lines[0] and "floor" in lines[0] and "noise" in lines[0]
  assert len(lines) == 2 + len(evaluation.METRICS["camera_pan"])
  assert all(name in table for name in evaluation.METRICS["camera_pan"])
  assert "%" in table
  assert all(evaluation.HIGHER_IS_BETTER[n] for n in evaluation.METRICS["camera_pan"])
  assert not evaluation.HIGHER_IS_BETTER["digits/motion_rms_px"]


def test_evaluate_rejects_bad_inputs(camera_case):
  world, batch, _ = camera_case
  with pytest.raises(ValueError, match="shape"):
    evaluation.evaluate(world, batch["video"][:, :4], batch)
  with pytest.raises(ValueError, match="meta lacks"):
    evaluation.evaluate(world, batch["video"], {"video": batch["video"]})
