#!/usr/bin/env bash
# The main job on the toy default: set up .venv, then run the quickstart recipe end to end.
# Extra arguments go to the CLI, e.g. `bash scripts/quickstart.sh --config.train.num_steps=300`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
workdir=${WORKDIR:-runs/quickstart}
exec .venv/bin/python -m rcm_jax.main recipe --config=configs/toy/quickstart.py --workdir="$workdir" "$@"
