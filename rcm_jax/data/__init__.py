"""Toy video worlds and their data pipeline: worlds.py (the worlds), records.py (ArrayRecord shards and
manifest), pipeline.py (grain batches)."""

from rcm_jax.data.pipeline import batch_dataset, load_all, make_batches, source
from rcm_jax.data.records import (DatasetError, DatasetMismatchError, dataset_dir, ensure_dataset,
                                  read_manifest, validate_shards)
from rcm_jax.data.worlds import (ACTION_NAMES, NULL_ACTION, NULL_LABEL, NUM_ACTIONS, NUM_CLASSES, WORLDS,
                                 CameraConfig, CameraPan, DigitsConfig, MovingDigits, canonical_split,
                                 get_world, model_overrides)
