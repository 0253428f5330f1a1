#!/usr/bin/env bash
# Creates .venv-ref: the PyTorch reference stack (torch CPU, diffusers, transformers) that the Wan2.1 interop
# parity tests run in a subprocess to build small random reference models, save them and record their outputs.
# It is test-only: rcm-jax itself never imports torch. Needs a Python for which a CPU build of torch exists
# (here: Python 3.11 with torch 2.13.0 CPU); set REF_PYTHON to choose one. Re-running is cheap (stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."
pins="torch==2.13.0 diffusers==0.42.1 transformers==5.24.0 safetensors sentencepiece tokenizers numpy<3"
if [ ! -x .venv-ref/bin/python ]; then
  py=""
  for c in "${REF_PYTHON:-}" python3.11 python3; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 || continue
    if "$c" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' 2>/dev/null; then py=$c; break; fi
  done
  if [ -z "$py" ]; then
    echo "== no Python 3.11 for the torch reference stack: interop parity tests will be skipped (set REF_PYTHON)" >&2
    exit 0
  fi
  echo "== creating .venv-ref (torch CPU reference stack for the parity tests) with $($py --version)"
  "$py" -m venv .venv-ref
fi
stamp=.venv-ref/.installed
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$pins" ]; then
  echo "== installing the reference stack into .venv-ref (about a minute)"
  # shellcheck disable=SC2086
  .venv-ref/bin/python -m pip install -q $pins 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
  .venv-ref/bin/python -c "import torch, diffusers, transformers" 
  echo "$pins" > "$stamp"
fi
