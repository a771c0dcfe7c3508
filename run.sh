#!/usr/bin/env bash
# Runs the whole system on a desktop: the reference cloud (embedded), the kiosk window with simulated
# hardware, and the phone pages; prints the phone link. Without a display it runs headless (the phone
# pages still work; stop a pour from the phone). The first start also seeds a demo fleet for the operators' console
# and prints how to sign in to it. Extra arguments go to main.py (.venv/bin/python main.py --help).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
ui=()
if [[ -z ${DISPLAY:-} && -z ${WAYLAND_DISPLAY:-} ]]; then
  echo "no display (DISPLAY is not set): running without the kiosk window" >&2
  ui=(--headless)
fi
exec .venv/bin/python main.py --simulate --embedded-cloud --demo-fleet "${ui[@]}" "$@"
