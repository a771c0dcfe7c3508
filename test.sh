#!/usr/bin/env bash
# The whole test suite: lint, layering check, pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
.venv/bin/ruff check .
if [[ -f ../shared/tools/check_layers.py ]]; then
  .venv/bin/python ../shared/tools/check_layers.py
fi
exec .venv/bin/python -m pytest "$@"
