#!/usr/bin/env bash
# The whole test suite: set-up (as root on Debian/Ubuntu it installs and starts what the tests need; see
# scripts/test-setup.sh), lint, layering check, pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/test-setup.sh
source scripts/bootstrap.sh
.venv/bin/ruff check .
# the team's own layering tool where it is checked out beside us; tests/test_layers.py checks the same in pytest
if [[ -f ../shared/tools/check_layers.py ]]; then
  .venv/bin/python ../shared/tools/check_layers.py
fi
# two workers (this machine's 2 cores; most tests wait on servers, windows and a booted root, not the CPU), each
# taking whole files (a file's module fixtures, such as the booted root, are made once); TAPSHARE_TEST_WORKERS=0
# runs in one process, and "-n 0" among the arguments does too
exec .venv/bin/python -m pytest -n "${TAPSHARE_TEST_WORKERS:-2}" --dist loadfile "$@"
