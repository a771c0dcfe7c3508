#!/usr/bin/env bash
# Turns a Raspberry Pi 4 or 5 running Raspberry Pi OS 64-bit (Bookworm or Trixie) into a Tapshare
# dispenser. Idempotent: running it again upgrades or repairs. See ./deploy.sh --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: sudo ./deploy.sh [options]

Installs this checkout as a Tapshare dispenser: Debian packages, a service user, a release in
/opt/tapshare/releases/<id> with its own virtualenv (the `current` link switches only after a health
check passes; a failing release is rolled back), /etc/tapshare/config.toml (never overwritten), the
1-Wire overlay and the valve pin's boot level in config.txt, a systemd unit with a watchdog, the
hardware watchdog and time sync.

Options:
  --machine-id ID        machine id for a new config (default: the hostname)
  --server-url URL       the cloud's URL for a new config (default: https://cloud.example.com)
  --layout L             landscape_800x480 (default) or portrait_720x1280, for a new config
  --provision TOKEN      enrol with the cloud using this single-use token (stores the device secret)
  --pin                  set the technicians' maintenance PIN (from TAPSHARE_MAINTENANCE_PIN or asked)
  --root DIR             install under DIR instead of / (for tests; implies no service restarts)
  --dry-run              say what would change, change nothing
  -h, --help             this text

Environment for tests: TAPSHARE_DEPLOY_STUB=1 replaces apt-get, useradd, usermod, chown, systemctl, venv
and pip with logged no-ops; TAPSHARE_DEPLOY_HEALTH is the health-check command (default: the real one);
TAPSHARE_DEPLOY_RELEASE names the release (default: a hash of the checkout's files).
EOF
}

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=""
DRY=0
MACHINE_ID=""
SERVER_URL="https://cloud.example.com"
LAYOUT="landscape_800x480"
TOKEN=""
SET_PIN=0
STUB=${TAPSHARE_DEPLOY_STUB:-0}
CHANGED=0
REBOOT=0

while [[ $# -gt 0 ]]; do
  case $1 in
    --machine-id) MACHINE_ID=$2; shift 2 ;;
    --server-url) SERVER_URL=$2; shift 2 ;;
    --layout) LAYOUT=$2; shift 2 ;;
    --provision) TOKEN=$2; shift 2 ;;
    --pin) SET_PIN=1; shift ;;
    --root) ROOT=$(cd "$2" && pwd); shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "deploy.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $LAYOUT in landscape_800x480|portrait_720x1280) ;; *) echo "deploy.sh: --layout $LAYOUT is not a layout" >&2; exit 2 ;; esac

APP=$ROOT/opt/tapshare
ETC=$ROOT/etc/tapshare
DATA=$ROOT/var/lib/tapshare
UNIT=$ROOT/etc/systemd/system/tapshare.service
WATCHDOG_CONF=$ROOT/etc/systemd/system.conf.d/10-tapshare-watchdog.conf
USER_NAME=tapshare
LOG=${ROOT:-/tmp}/tapshare-deploy-stub.log

say() { echo "deploy.sh: $*"; }
die() { echo "deploy.sh: error: $*" >&2; exit 1; }

# Run a command that changes the system (or log it, in stub mode; or only say it, in a dry run).
run() {
  if [[ $DRY == 1 ]]; then say "would run: $*"; return 0; fi
  if [[ $STUB == 1 ]]; then echo "$*" >> "$LOG"; return 0; fi
  "$@"
}

# Write a file only if its content differs (idempotency); mode and owner given.
put_file() {
  local path=$1 mode=$2 content
  content=$(cat)
  if [[ -f $path ]] && [[ $(cat "$path") == "$content" ]]; then
    return 0
  fi
  CHANGED=1
  if [[ $DRY == 1 ]]; then say "would write $path"; return 0; fi
  mkdir -p "$(dirname "$path")"
  local tmp
  tmp=$(mktemp "$path.XXXXXX")
  printf '%s\n' "$content" > "$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$path"
  say "wrote $path"
}

# ---------------------------------------------------------------- the system
check_system() {
  local os=$ROOT/etc/os-release model=$ROOT/proc/device-tree/model id codename
  [[ -r $os ]] || die "cannot read $os: this is not Raspberry Pi OS"
  id=$(sed -n 's/^ID=//p' "$os" | tr -d '"')
  codename=$(sed -n 's/^VERSION_CODENAME=//p' "$os" | tr -d '"')
  case $id in debian|raspbian) ;; *) die "unsupported system '$id': Raspberry Pi OS (Debian) Bookworm or Trixie is needed" ;; esac
  case $codename in bookworm|trixie) ;; *) die "unsupported release '$codename': Bookworm or Trixie is needed" ;; esac
  [[ -r $model ]] || die "no $model: this is not a Raspberry Pi"
  if ! tr -d '\0' < "$model" | grep -Eq 'Raspberry Pi (4|5)|Compute Module (4|5)'; then
    die "unsupported board '$(tr -d '\0' < "$model")': a Raspberry Pi 4 or 5 is needed"
  fi
  local pyver
  pyver=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  case $pyver in 3.11|3.12|3.13) ;; *) die "Python $pyver: Tapshare runs on Python 3.11 to 3.13" ;; esac
  if [[ -z $ROOT && $DRY == 0 && $(id -u) != 0 ]]; then die "run as root (sudo ./deploy.sh)"; fi
  say "system: $id $codename, $(tr -d '\0' < "$model"), Python $pyver"
}

install_packages() {
  run apt-get update -qq
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    python3-venv python3-lgpio python3-dev fonts-noto-cjk libsdl2-2.0-0 libgl1 libegl1 libgles2 libmtdev1 \
    libdrm2 libgbm1 systemd-timesyncd sqlite3
}

create_user() {
  if [[ -z $ROOT ]] && id "$USER_NAME" >/dev/null 2>&1; then
    run usermod -a -G gpio,video,render,input "$USER_NAME"
  else
    run useradd --system --create-home --home-dir /var/lib/tapshare --shell /usr/sbin/nologin \
      --groups gpio,video,render,input "$USER_NAME"
  fi
}

# ---------------------------------------------------------------- the release
release_id() {
  if [[ -n ${TAPSHARE_DEPLOY_RELEASE:-} ]]; then echo "$TAPSHARE_DEPLOY_RELEASE"; return; fi
  if git -C "$SRC" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$SRC" && git ls-files -z | xargs -0 sha256sum | sha256sum | cut -c1-12)
  else
    date +%Y%m%d%H%M%S
  fi
}

install_release() {
  RELEASE=$(release_id)
  local dir=$APP/releases/$RELEASE
  if [[ -d $dir && -f $dir/.installed ]]; then
    say "release $RELEASE is installed"
    return 0
  fi
  CHANGED=1
  if [[ $DRY == 1 ]]; then say "would install release $RELEASE into $dir"; return 0; fi
  rm -rf "$dir"
  mkdir -p "$dir"
  (
    cd "$SRC"
    if git rev-parse --git-dir >/dev/null 2>&1; then
      git ls-files -z
    else
      find . -type f -not -path './.venv/*' -not -path './data/*' -print0
    fi
  ) | (cd "$SRC" && xargs -0 cp --parents -t "$dir")
  if [[ $STUB == 1 ]]; then
    echo "python3 -m venv --system-site-packages $dir/.venv" >> "$LOG"
    echo "$dir/.venv/bin/pip install -r $dir/requirements.txt" >> "$LOG"
  else
    python3 -m venv --system-site-packages "$dir/.venv"
    "$dir/.venv/bin/pip" install -q --disable-pip-version-check -r "$dir/requirements.txt"
  fi
  touch "$dir/.installed"
  say "installed release $RELEASE"
}

# ---------------------------------------------------------------- configuration
write_config() {
  local cfg=$ETC/config.toml
  if [[ -f $cfg ]]; then
    say "kept $cfg (a technician's edits are never overwritten)"
    return 0
  fi
  local id=${MACHINE_ID:-$(hostname)}
  put_file "$cfg" 0644 <<EOF
# Tapshare dispenser configuration, written by deploy.sh on first install and never overwritten.
# Every key and its meaning: /opt/tapshare/current/.venv/bin/python /opt/tapshare/current/main.py --print-config

[machine]
id = "$id"

[cloud]
url = "$SERVER_URL"
secret_file = "/etc/tapshare/device.secret"

[paths]
data_dir = "/var/lib/tapshare"

[screen]
layout = "$LAYOUT"
fullscreen = true

[hardware]
pin_factory = "lgpio"

[pins]
valve = 17
valve_active_high = true
flow_meter = 27
stop_button = 22
onewire = 4
EOF
}

# valve pin, its active level and the 1-Wire pin, from the (possibly edited) config
read_pins() {
  python3 - "$ETC/config.toml" <<'EOF'
import sys, tomllib
try:
    with open(sys.argv[1], "rb") as f:
        pins = tomllib.load(f).get("pins", {})
except FileNotFoundError:
    pins = {}
print(pins.get("valve", 17), "1" if pins.get("valve_active_high", True) else "0", pins.get("onewire", 4))
EOF
}

boot_config() {
  local txt=$ROOT/boot/firmware/config.txt
  [[ -f $txt ]] || txt=$ROOT/boot/config.txt
  [[ -f $txt ]] || die "no config.txt in $ROOT/boot/firmware or $ROOT/boot"
  local valve active onewire level block current
  read -r valve active onewire < <(read_pins)
  level=dl; [[ $active == 0 ]] && level=dh      # the valve's inactive level, driven from boot
  block=$(printf '%s\n' "# BEGIN tapshare (managed by deploy.sh: edit /etc/tapshare/config.toml, then run it again)" \
    "dtoverlay=w1-gpio,gpiopin=$onewire" "gpio=$valve=op,$level" "dtparam=watchdog=on" "# END tapshare")
  current=$(sed -n '/^# BEGIN tapshare/,/^# END tapshare/p' "$txt")
  if [[ $current == "$block" ]]; then
    return 0
  fi
  CHANGED=1
  REBOOT=1
  if [[ $DRY == 1 ]]; then say "would update the tapshare block in $txt"; return 0; fi
  local tmp
  tmp=$(mktemp)
  sed '/^# BEGIN tapshare/,/^# END tapshare/d' "$txt" > "$tmp"
  printf '%s\n' "$block" >> "$tmp"
  cat "$tmp" > "$txt"
  rm -f "$tmp"
  say "updated $txt (1-Wire on GPIO $onewire, valve GPIO $valve held $level from boot): reboot to apply"
}

write_unit() {
  put_file "$UNIT" 0644 <<EOF
[Unit]
Description=Tapshare drinking-water dispenser
After=network-online.target time-sync.target
Wants=network-online.target
StartLimitIntervalSec=0

[Service]
Type=notify
NotifyAccess=main
User=$USER_NAME
Group=$USER_NAME
SupplementaryGroups=gpio video render input
WorkingDirectory=/opt/tapshare/current
Environment=GPIOZERO_PIN_FACTORY=lgpio
Environment=LG_WD=/var/lib/tapshare
Environment=KIVY_HOME=/var/lib/tapshare/kivy
Environment=KIVY_WINDOW=sdl2
Environment=SDL_VIDEODRIVER=kmsdrm
Environment=PYTHONUNBUFFERED=1
ExecStart=/opt/tapshare/current/.venv/bin/python /opt/tapshare/current/main.py --config /etc/tapshare/config.toml
ExecStopPost=/opt/tapshare/current/.venv/bin/python -m hal.valve_off --config /etc/tapshare/config.toml
Restart=always
RestartSec=2
WatchdogSec=30
TimeoutStopSec=15
StandardOutput=journal
StandardError=journal

[Install]
WantedBy=multi-user.target
EOF
  put_file "$WATCHDOG_CONF" 0644 <<'EOF'
# The Pi's hardware watchdog, fed by systemd: a hung kernel or systemd reboots the machine.
[Manager]
RuntimeWatchdogSec=15
RebootWatchdogSec=2min
EOF
}

prepare_dirs() {
  if [[ $DRY == 1 ]]; then return 0; fi
  mkdir -p "$DATA" "$ETC" "$APP/releases"
  chmod 0750 "$DATA"
  run chown "$USER_NAME:$USER_NAME" "$DATA"
}

provision() {
  [[ -n $TOKEN ]] || return 0
  run "$APP/current/.venv/bin/python" "$APP/current/main.py" --config /etc/tapshare/config.toml --provision "$TOKEN"
  run chown "$USER_NAME:$USER_NAME" /etc/tapshare/device.secret
  run chmod 0600 /etc/tapshare/device.secret
}

set_pin() {
  [[ $SET_PIN == 1 ]] || return 0
  run "$APP/current/.venv/bin/python" "$APP/current/main.py" --config /etc/tapshare/config.toml --set-maintenance-pin
}

# ---------------------------------------------------------------- switch, check, roll back
health_check() {
  if [[ -n ${TAPSHARE_DEPLOY_HEALTH:-} ]]; then
    bash -c "$TAPSHARE_DEPLOY_HEALTH"
    return
  fi
  [[ -z $ROOT ]] || return 0
  systemctl restart tapshare
  for _ in $(seq 1 30); do
    if systemctl is-active --quiet tapshare && \
       "$APP/current/.venv/bin/python" "$APP/current/main.py" --config /etc/tapshare/config.toml --status >/dev/null; then
      return 0
    fi
    sleep 1
  done
  return 1
}

switch_release() {
  local link=$APP/current previous=""
  [[ -L $link ]] && previous=$(readlink "$link")
  local target=releases/$RELEASE
  if [[ $previous == "$target" ]]; then
    return 0
  fi
  CHANGED=1
  if [[ $DRY == 1 ]]; then say "would switch $link to $target"; return 0; fi
  ln -sfn "$target" "$link.new" && mv -T "$link.new" "$link"
  run systemctl daemon-reload
  if health_check; then
    say "release $RELEASE is live"
    echo "$previous" > "$APP/previous"
    return 0
  fi
  say "release $RELEASE failed its health check: rolling back to ${previous:-nothing}"
  if [[ -n $previous ]]; then
    ln -sfn "$previous" "$link.new" && mv -T "$link.new" "$link"
    run systemctl restart tapshare
  else
    rm -f "$link"
  fi
  rm -rf "${APP:?}/$target"
  exit 3
}

enable_services() {
  run systemctl daemon-reload
  run systemctl enable tapshare.service
  run systemctl enable --now systemd-timesyncd.service
}

main() {
  check_system
  install_packages
  create_user
  prepare_dirs
  write_config
  install_release
  boot_config
  write_unit
  enable_services
  switch_release
  provision
  set_pin
  if [[ $DRY == 1 ]]; then
    say "dry run: nothing was changed"
  elif [[ $CHANGED == 0 ]]; then
    say "nothing to change: the dispenser is up to date"
  fi
  if [[ $REBOOT == 1 ]]; then say "reboot needed for config.txt changes (sudo reboot)"; fi
  say "logs: journalctl -u tapshare -f    status: systemctl status tapshare"
  say "read-only root (overlay): keep /var/lib/tapshare on its own writable partition (see README)"
}

main
