"""One CLI for every job: python -m rcm_jax.main <command> --config=configs/...py[:arg] --workdir=DIR.

Commands: train (one stage), sample, eval, generate (teacher samples as a dataset), recipe (a chain of
stages). Override any config key with --config.<key>=<value>; the resolved config is written to
<workdir>/config.json. `convert --src DIR --dst DIR` (no config, no workdir) turns a Wan2.1 DiT checkpoint
(diffusers or original layout) into an orbax checkpoint (rcm_jax.interop.wan). `play --config=...
--checkpoint=STAGE_DIR [--port=8000 --host=127.0.0.1]` (no workdir) serves the action-conditioned world model
in the browser (rcm_jax.play.server); `--no_kv_cache` (sample, play) sets sample.no_kv_cache. sample and play add
rcm_jax.xla_flags.GEMM_EPILOGUES to XLA_FLAGS unless sample.gemm_epilogues=False.
"""
from absl import app, flags, logging
from ml_collections import config_flags

from rcm_jax.errors import UserError

COMMANDS = ("train", "sample", "eval", "generate", "recipe", "convert", "play")
config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally with :arg.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs, samples and metrics.json go.")
flags.DEFINE_string("src", None, "convert: a diffusers WanTransformer3DModel folder or an original Wan2.1 checkpoint.")
flags.DEFINE_string("dst", None, "convert: a new directory for the orbax checkpoint (<dst>/ckpt).")
flags.DEFINE_bool("scan_layers", False, "convert: stack the blocks for configs with model.scan_layers=True.")
flags.DEFINE_bool("no_kv_cache", False, "sample/play: recompute the context every chunk (sets sample.no_kv_cache).")
flags.DEFINE_string("checkpoint", None, "play: the causal stage directory to play.")
flags.DEFINE_integer("port", 8000, "play: the port of the local web server.")
flags.DEFINE_string("host", "127.0.0.1", "play: the address to listen on (loopback by default).")


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"Usage: python -m rcm_jax.main <{'|'.join(COMMANDS)}> --config=... --workdir=...; "
                         f"got {argv[1:]}.")
  if not flags.FLAGS["verbosity"].present:   # orbax logs every save at INFO; keep the console readable
    logging.set_verbosity(logging.WARNING)
  _check_flags(argv[1])
  if argv[1] == "convert":
    return _convert()
  if argv[1] in ("sample", "play") and flags.FLAGS.config.get("sample", {}).get("gemm_epilogues", True):
    from rcm_jax import xla_flags   # before any backend starts: XLA reads XLA_FLAGS once
    xla_flags.add(xla_flags.GEMM_EPILOGUES)
  from rcm_jax.parallel import distributed
  try:   # multi-host when COORDINATOR_ADDRESS / NUM_PROCESSES / PROCESS_ID or SLURM say so
    distributed.maybe_initialize()
  except UserError as e:
    raise SystemExit(f"rcm_jax {argv[1]}: {e}") from None
  from rcm_jax.data import records  # noqa: E402  (imports after flag parsing keep --help fast)
  from rcm_jax.training import generate, jobs, pipeline, trainer
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  command = argv[1]
  if flags.FLAGS.no_kv_cache:
    with config.unlocked():
      config.sample.no_kv_cache = True
  try:
    if command == "play":
      from rcm_jax.play import server
      return server.main(config, checkpoint=flags.FLAGS.checkpoint, host=flags.FLAGS.host, port=flags.FLAGS.port)
    _run(command, config, workdir, jobs, pipeline, trainer, generate)
  except (UserError, FileNotFoundError, records.DatasetError, records.DatasetMismatchError) as e:
    raise SystemExit(f"rcm_jax {command}: {e}") from None


def _check_flags(command):
  """convert takes --src/--dst only; play --config and --checkpoint; every other command --config and --workdir."""
  f = flags.FLAGS
  need, refuse = ("src", "dst"), ("config", "workdir")
  if command == "play":
    need, refuse = ("config", "checkpoint"), ("workdir", "src", "dst")
  elif command != "convert":
    need, refuse = refuse, need
  missing = [n for n in need if f[n].value is None]
  extra = [n for n in refuse if f[n].value is not None]
  if missing or extra:
    raise app.UsageError(f"`{command}` needs {' and '.join('--' + n for n in need)}" +
                         (f" (missing {', '.join('--' + n for n in missing)})" if missing else "") +
                         (f" and takes no {', '.join('--' + n for n in extra)}" if extra else "") + ".")


def _convert():
  from rcm_jax.interop import wan
  try:
    info = wan.convert(flags.FLAGS.src, flags.FLAGS.dst, scan_layers=flags.FLAGS.scan_layers)
  except UserError as e:
    raise SystemExit(f"rcm_jax convert: {e}") from None
  print(f"Converted {info['layout']} checkpoint {flags.FLAGS.src} ({info['num_params']:,} params) -> "
        f"{flags.FLAGS.dst}/ckpt; model: {info['model']}")


def _run(command, config, workdir, jobs, pipeline, trainer, generate):
  if command == "recipe":
    if "stages" not in config:
      raise app.UsageError("`recipe` needs a config with `stages` and `stage_order` (e.g. configs/toy/quickstart.py).")
    pipeline.run_recipe(config, workdir)
  else:
    {"train": trainer.train, "sample": jobs.sample, "eval": jobs.evaluate,
     "generate": generate.generate}[command](config, workdir)


if __name__ == "__main__":
  app.run(main)
