#!/usr/bin/env bash
# Runs the desktop simulation: the dispenser core with simulated hardware and simulated users.
# Extra arguments go to main.py (see: .venv/bin/python main.py --help).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
exec .venv/bin/python main.py --simulate --headless "$@"
