#!/usr/bin/env bash
# Runs the test suite on CPU (creates .venv first if missing). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` for the end-to-end runs, `-k flash` for one area.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
bash scripts/setup_ref_env.sh
export JAX_PLATFORMS=cpu
set +e
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --durations=15 "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; exit 1; fi
exit $rc
