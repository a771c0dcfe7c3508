#!/usr/bin/env bash
# Creates .venv with Python >= 3.11 and installs the pinned requirements (again only when they change).
# Sourced by run.sh and test.sh; needs nothing but python3 (and python3-venv on Debian/Ubuntu).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=""
for cand in python3.13 python3.12 python3.11 python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    py=$cand; break
  fi
done
if [[ -z $py ]]; then
  echo "error: Tapshare needs Python 3.11 or newer (Debian/Ubuntu: sudo apt-get install python3 python3-venv)" >&2
  exit 1
fi
if [[ ! -x .venv/bin/python ]]; then
  if ! "$py" -m venv .venv >/dev/null 2>&1; then
    rm -rf .venv
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
      echo "installing python$ver-venv (Debian's venv module) ..." >&2
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python$ver-venv" >/dev/null
      "$py" -m venv .venv
    else
      echo "error: '$py -m venv' failed; on Debian/Ubuntu run: sudo apt-get install python3-venv" >&2
      exit 1
    fi
  fi
fi
want=$(cat requirements.txt requirements-cloud.txt requirements-dev.txt | sha256sum | cut -c1-16)
if [[ ! -f .venv/.installed || $(cat .venv/.installed) != "$want" ]]; then
  echo "installing Python packages into .venv (first run takes a minute) ..." >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
  echo "$want" > .venv/.installed
fi
