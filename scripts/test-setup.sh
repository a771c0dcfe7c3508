#!/usr/bin/env bash
# Sourced by test.sh: makes this machine able to run every test.
#  - As root on Debian/Ubuntu (apt-get): installs the Debian packages the tests drive (Chromium, CJK
#    fonts, Xvfb and Mesa for the Kivy window, xdotool, shellcheck, PostgreSQL, HAProxy, debootstrap and
#    systemd-nspawn for the boot test), starts PostgreSQL, exports TAPSHARE_TEST_POSTGRES_URL, and sets
#    TAPSHARE_TEST_ALL=1 so that a test whose tool is still missing fails instead of skipping.
#  - Otherwise: says exactly what to install (and how), then the tests that need it skip with that reason.
# TAPSHARE_TEST_SETUP=0 skips all of this (the tests then use what is there).

# libatomic1: Playwright's bundled Node.js needs it, and a minimal Debian lacks it
test_packages=(chromium fonts-noto-cjk xvfb xauth xdotool libgl1-mesa-dri libgl1 libegl1 libgles2 libmtdev1
  libsdl2-2.0-0 shellcheck postgresql debootstrap systemd-container libatomic1 haproxy)

missing_packages() {
  local p
  for p in "${test_packages[@]}"; do
    dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || echo "$p"
  done
}

test_setup() {
  [[ ${TAPSHARE_TEST_SETUP:-1} == 0 ]] && return 0
  if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
    echo "test.sh: not Debian/Ubuntu: install Chromium, Noto CJK fonts, Xvfb, xdotool, Mesa, SDL2, shellcheck," \
      "PostgreSQL, debootstrap and systemd-nspawn yourself; tests needing a missing one skip" >&2
    return 0
  fi
  local missing
  mapfile -t missing < <(missing_packages)
  if [[ $(id -u) != 0 ]]; then
    if ((${#missing[@]})); then
      echo "test.sh: not root, so nothing is installed; the tests that need these skip. To run every test:" >&2
      echo "  sudo apt-get install --no-install-recommends ${missing[*]}" >&2
      echo "  then run ./test.sh as root once (it starts PostgreSQL and tells the tests where), or" >&2
      echo "  sudo ./scripts/postgres-for-tests.sh and export TAPSHARE_TEST_POSTGRES_URL=<the URL it prints>" >&2
    fi
    return 0
  fi
  if ((${#missing[@]})); then
    echo "test.sh: installing the Debian packages the tests need: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || { sleep 10; apt-get update -qq; }
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  if [[ -z ${TAPSHARE_TEST_POSTGRES_URL:-} ]]; then
    TAPSHARE_TEST_POSTGRES_URL=$("$(dirname "${BASH_SOURCE[0]}")/postgres-for-tests.sh" | tail -n 1)
    export TAPSHARE_TEST_POSTGRES_URL
  fi
  export TAPSHARE_TEST_ALL=1
}

test_setup
