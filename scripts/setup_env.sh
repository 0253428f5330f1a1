#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 and installs rcm-jax with its test extras. Re-running is cheap:
# the install is skipped while requirements.txt and pyproject.toml are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
find_python() {
  for py in "${PYTHON:-}" python3.13 python3.12 /root/.pyenv/versions/3.12.1/bin/python3.12 python3; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "rcm-jax needs Python >= 3.12 (jax >= 0.11.2 does); set PYTHON=/path/to/python3.12" >&2
  return 1
}
if [ ! -x .venv/bin/python ]; then
  py=$(find_python)
  echo "== creating .venv with $($py --version)"
  "$py" -m venv .venv
fi
stamp=.venv/.rcm_jax_installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "== installing rcm-jax and its dependencies into .venv (about a minute)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
# tests/test_play.py drives Debian's chromium headless through chromedriver (selenium is a test extra).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "== installing chromium and chromium-driver (the play page's browser test)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } ||
    echo "warning: chromium install failed: tests/test_play.py skips (and fails under CI, RCM_REQUIRE_REF=1)" >&2
fi
