#!/usr/bin/env bash
# Turns a Raspberry Pi 4 or 5 running Raspberry Pi OS 64-bit (Bookworm or Trixie) into a Tapshare
# dispenser. Idempotent: running it again upgrades or repairs. See ./deploy.sh --help.
set -euo pipefail
# the releases, venvs and unit must be readable by the service user whatever root's own umask is (077 on
# hardened systems); files that must stay private get their modes explicitly
umask 022

usage() {
  cat <<'EOF'
Usage: sudo ./deploy.sh [options]

Installs this checkout as a Tapshare dispenser: Debian packages, a service user, a release in
/opt/tapshare/releases/<id> with a virtualenv from the hashed lock file for the Pi's Python (reused when
no requirement changed), /etc/tapshare/config.toml (never overwritten), the managed blocks in config.txt
and cmdline.txt, a hardened systemd unit with a watchdog, the hardware watchdog, capped logs.

A new release goes live only after it proves itself: it must report "serving" (first frame drawn, ledger
written as the service user) and then run for --soak seconds with the same main PID, no restart and the
watchdog fed. Otherwise the previous release is put back and deploy.sh exits 3. Releases older than the
previous one are removed.

Options:
  --machine-id ID        machine id for a new config (default: the hostname)
  --server-url URL       the cloud's URL for a new config (default: https://cloud.example.com)
  --layout L             landscape_800x480 (default) or portrait_720x1280, for a new config
  --provision TOKEN      enrol with the cloud using this single-use token (stores the device secret)
  --pin                  set the technicians' maintenance PIN (from TAPSHARE_MAINTENANCE_PIN or asked)
  --soak SECONDS         how long a new release must run unchanged before it is live (default 45; 30-600)
  --release-key FILE     pin this Ed25519 public key (PEM) for fleet updates (default: keys/*.pub.pem in this
                         checkout); updates signed by no pinned key are refused, and updates never change the pins
  --leave-desktop        on Raspberry Pi OS Desktop: switch the desktop off (boot to the console) and go on;
                         run it from SSH or a text console, not a terminal on the desktop it stops
  --root DIR             install under DIR instead of / (for tests; implies no service restarts)
  --dry-run              say what would change, change nothing
  -h, --help             this text

Exit codes: 0 done, 1 refused or failed (nothing switched), 2 bad option, 3 the new release failed its
health check and the previous one runs again.

Environment for tests: TAPSHARE_DEPLOY_STUB=1 replaces apt-get, useradd, groupadd, usermod, chown, runuser,
systemctl, venv and pip with logged no-ops; TAPSHARE_DEPLOY_HEALTH is the health-check command (default: the
real one); TAPSHARE_DEPLOY_RELEASE names the release (default: a hash of the checkout's files).
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
SOAK_S=45
LEAVE_DESKTOP=0
RELEASE_KEY=""
FORCE_CHECK=0
LIVE=""
LIVE_STATUS=""
STUB=${TAPSHARE_DEPLOY_STUB:-0}
CHANGED=0
REBOOT=0
PYVER=""

while [[ $# -gt 0 ]]; do
  case $1 in
    --machine-id) MACHINE_ID=$2; shift 2 ;;
    --server-url) SERVER_URL=$2; shift 2 ;;
    --layout) LAYOUT=$2; shift 2 ;;
    --provision) TOKEN=$2; shift 2 ;;
    --pin) SET_PIN=1; shift ;;
    --soak) SOAK_S=$2; shift 2 ;;
    --leave-desktop) LEAVE_DESKTOP=1; shift ;;
    --release-key) RELEASE_KEY=$2; shift 2 ;;
    --root) ROOT=$(cd "$2" && pwd); shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "deploy.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $LAYOUT in landscape_800x480|portrait_720x1280) ;; *) echo "deploy.sh: --layout $LAYOUT is not a layout" >&2; exit 2 ;; esac
if ! [[ $SOAK_S =~ ^[0-9]+$ ]] || ((SOAK_S < 30 || SOAK_S > 600)); then
  echo "deploy.sh: --soak $SOAK_S: a number of seconds from 30 to 600" >&2; exit 2
fi
if [[ -n $ROOT && ${TAPSHARE_DEPLOY_STUB:-0} != 1 && $DRY == 0 ]]; then
  echo "deploy.sh: --root is for tests: use it with TAPSHARE_DEPLOY_STUB=1 or --dry-run" >&2; exit 2
fi

APP=$ROOT/opt/tapshare
ETC=$ROOT/etc/tapshare
DATA=$ROOT/var/lib/tapshare
UNIT=$ROOT/etc/systemd/system/tapshare.service
# Raspberry Pi OS ships 70-rpi-enable-watchdog.conf; drop-ins apply in name order, so ours comes last
WATCHDOG_CONF=$ROOT/etc/systemd/system.conf.d/99-tapshare-watchdog.conf
JOURNAL_CONF=$ROOT/etc/systemd/journald.conf.d/99-tapshare.conf
USER_NAME=tapshare
GROUPS_NEEDED=(gpio spi video render input)
ESCALATE=$ROOT/usr/local/lib/tapshare/escalate
ESCALATE_UNIT=$ROOT/etc/systemd/system/tapshare-escalate.service
DEPLOYING=/run/tapshare-deploy.pid    # while deploy.sh checks a release: escalate leaves the roll-back to it
LOG=${ROOT:-/tmp}/tapshare-deploy-stub.log

say() { echo "deploy.sh: $*"; }
die() { echo "deploy.sh: error: $*" >&2; exit 1; }

# Run a command that changes the system (or log it, in stub mode; or only say it, in a dry run).
run() {
  if [[ $DRY == 1 ]]; then say "would run: $*"; return 0; fi
  if [[ $STUB == 1 ]]; then echo "$*" >> "$LOG"; return 0; fi
  "$@"
}

# Run a dispenser command as the service user, so that what it writes in the data dir stays the service's.
as_service_user() {
  run runuser -u "$USER_NAME" -- "$@"
}

# Write a file only if its content differs (idempotency); mode given. Returns 0 if it changed.
put_file() {
  local path=$1 mode=$2 content
  content=$(cat)
  if [[ -f $path ]] && [[ $(cat "$path") == "$content" ]]; then
    return 1
  fi
  CHANGED=1
  if [[ $DRY == 1 ]]; then say "would write $path"; return 0; fi
  mkdir -p "$(dirname "$path")"
  if [[ -n ${BACKUP_TO:-} && -f $path ]]; then cp -p "$path" "$BACKUP_TO"; fi
  local tmp
  tmp=$(mktemp "$path.XXXXXX")
  printf '%s\n' "$content" > "$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$path"
  say "wrote $path"
}

# ---------------------------------------------------------------- the system
# The board's name: the device tree's model, else the Model line the Pi's kernel puts in /proc/cpuinfo.
board_model() {
  local dt=$ROOT/proc/device-tree/model
  if [[ -r $dt ]]; then tr -d '\0' < "$dt"; return; fi
  sed -n 's/^Model[[:space:]]*:[[:space:]]*//p' "$ROOT/proc/cpuinfo" 2>/dev/null | head -n 1
}

check_system() {
  local os=$ROOT/etc/os-release id codename model
  [[ -r $os ]] || die "cannot read $os: this is not Raspberry Pi OS"
  id=$(sed -n 's/^ID=//p' "$os" | tr -d '"')
  codename=$(sed -n 's/^VERSION_CODENAME=//p' "$os" | tr -d '"')
  case $id in debian|raspbian) ;; *) die "unsupported system '$id': Raspberry Pi OS (Debian) Bookworm or Trixie is needed" ;; esac
  case $codename in bookworm|trixie) ;; *) die "unsupported release '$codename': Bookworm or Trixie is needed" ;; esac
  model=$(board_model)
  [[ -n $model ]] || die "no board model in $ROOT/proc/device-tree/model or /proc/cpuinfo: this is not a Raspberry Pi"
  if ! grep -Eq 'Raspberry Pi (4|5)|Compute Module (4|5)' <<< "$model"; then
    die "unsupported board '$model': a Raspberry Pi 4 or 5 is needed"
  fi
  PYVER=$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  case $PYVER in
    3.11|3.13) ;;
    *) die "Python $PYVER: the dispenser's lock files are for Python 3.11 (Bookworm) and 3.13 (Trixie)" ;;
  esac
  if [[ -z $ROOT && $DRY == 0 && $(id -u) != 0 ]]; then die "run as root (sudo ./deploy.sh)"; fi
  say "system: $id $codename, $model, Python $PYVER"
}

# Raspberry Pi OS Desktop: its compositor holds the screen, so the kiosk (SDL on KMSDRM) could not draw. Refused
# with the reason, or with --leave-desktop switched off: the Pi boots to the console from now on, and the running
# desktop is stopped (from SSH or a text console only: stopping it would end a terminal on that desktop, and us).
leave_desktop() {
  local dm=$ROOT/etc/systemd/system/display-manager.service
  [[ -e $dm || -L $dm ]] || return 0
  if [[ $LEAVE_DESKTOP == 0 ]]; then
    die "this is Raspberry Pi OS Desktop: its display manager holds the screen the kiosk draws on." \
      "Run deploy.sh again with --leave-desktop (from SSH or a text console) to switch the desktop off and boot" \
      "to the console (undo: sudo systemctl set-default graphical.target && sudo systemctl enable display-manager)"
  fi
  if [[ -n ${DISPLAY:-}${WAYLAND_DISPLAY:-} ]]; then
    die "--leave-desktop stops the desktop this terminal runs on, and deploy.sh with it: run it from SSH or a" \
      "text console (Ctrl+Alt+F2)"
  fi
  CHANGED=1
  say "Raspberry Pi OS Desktop: switching the desktop off (display manager disabled and stopped; the Pi boots" \
    "to the console, multi-user.target, with the kiosk on the screen)"
  run systemctl disable display-manager.service
  run systemctl set-default multi-user.target
  run systemctl stop display-manager.service
}

install_packages() {
  run apt-get update -qq
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    python3-venv python3-lgpio python3-dev fonts-noto-cjk libsdl2-2.0-0 libgl1 libegl1 libgles2 libmtdev1 \
    libdrm2 libgbm1 systemd-timesyncd sqlite3 python3-cryptography
}

create_user() {
  local g
  for g in "${GROUPS_NEEDED[@]}"; do
    if ! grep -q "^$g:" "$ROOT/etc/group" 2>/dev/null; then run groupadd --system "$g"; fi
  done
  if [[ -z $ROOT ]] && id "$USER_NAME" >/dev/null 2>&1; then
    run usermod -a -G "$(IFS=,; echo "${GROUPS_NEEDED[*]}")" "$USER_NAME"
  else
    run useradd --system --create-home --home-dir /var/lib/tapshare --shell /usr/sbin/nologin \
      --groups "$(IFS=,; echo "${GROUPS_NEEDED[*]}")" "$USER_NAME"
  fi
}

# ---------------------------------------------------------------- the release
tracked_files() {
  cd "$SRC"
  if git rev-parse --git-dir >/dev/null 2>&1; then
    git ls-files -z
  else
    find . -type f -not -path './.venv/*' -not -path './data/*' -not -path './.git/*' -print0 | sort -z
  fi
}

release_id() {
  if [[ -n ${TAPSHARE_DEPLOY_RELEASE:-} ]]; then echo "$TAPSHARE_DEPLOY_RELEASE"; return; fi
  (tracked_files | (cd "$SRC" && xargs -0 sha256sum) | sha256sum | cut -c1-12)
}

lock_name() { echo "requirements-pi-py${PYVER/./}.lock"; }

# The release's virtualenv: one per lock file and Python, shared by releases whose requirements are equal.
install_venv() {
  local dir=$1 lock key venv
  lock=$dir/$(lock_name)
  [[ -f $lock ]] || die "no $(lock_name) in this checkout (scripts/lock-pi.sh makes it)"
  key=py$PYVER-$(sha256sum < "$lock" | cut -c1-12)
  venv=$APP/venvs/$key
  if [[ -f $venv/.installed ]]; then
    say "reusing the virtualenv $key: no requirement changed"
  elif [[ $STUB == 1 ]]; then
    mkdir -p "$venv" && touch "$venv/.installed"
    echo "python3 -m venv --system-site-packages $venv" >> "$LOG"
    echo "$venv/bin/pip install --require-hashes -r $lock" >> "$LOG"
  else
    rm -rf "$venv"
    python3 -m venv --system-site-packages "$venv"
    # every package at its locked version and hash; lgpio is not among them: it comes from apt
    "$venv/bin/pip" install -q --disable-pip-version-check --no-input --require-hashes -r "$lock" ||
      { rm -rf "$venv"; die "pip could not install $(lock_name) (see above); nothing was switched"; }
    touch "$venv/.installed"
  fi
  ln -sfn "../../venvs/$key" "$dir/.venv"
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
  tracked_files | (cd "$SRC" && xargs -0 cp --parents -t "$dir")
  install_venv "$dir"
  touch "$dir/.installed"
  say "installed release $RELEASE"
}

# The release's own config loader checks the config (a bad key or a TOML syntax error is named), and
# lgpio must import: it comes from apt's python3-lgpio (the Raspberry Pi archive), never from PyPI.
check_release() {
  [[ $DRY == 0 && $STUB == 0 ]] || return 0
  local dir=$APP/releases/$RELEASE out
  if ! out=$("$dir/.venv/bin/python" "$dir/main.py" --config "$ETC/config.toml" --print-config 2>&1 >/dev/null); then
    die "$ETC/config.toml: ${out#configuration error: } (fix it and run deploy.sh again; nothing was switched)"
  fi
  if [[ $PIN_FACTORY == lgpio ]] && ! out=$("$dir/.venv/bin/python" -c 'import lgpio' 2>&1); then
    die "lgpio does not import ($out): it comes from the apt package python3-lgpio, which only the Raspberry Pi" \
      "archive has (PyPI's lgpio has no working build for every Python: its cp313 upload is empty)"
  fi
}

# Keep the live release and the one before it; drop the rest, and virtualenvs no release uses.
prune_releases() {
  [[ $DRY == 0 ]] || return 0
  local keep=" " dir used=" " v
  keep+="$(readlink -f "$APP/current" 2>/dev/null || true) "
  [[ -f $APP/previous ]] && keep+="$(readlink -f "$APP/$(cat "$APP/previous")" 2>/dev/null || true) "
  [[ -f $APP/live ]] && keep+="$(readlink -f "$APP/$(sed -n 1p "$APP/live")" 2>/dev/null || true) "
  for dir in "$APP"/releases/*; do
    [[ -d $dir ]] || continue
    if [[ $keep == *" $(readlink -f "$dir") "* ]]; then
      used+="$(basename "$(readlink "$dir/.venv")") "
    else
      rm -rf "$dir"; CHANGED=1; say "removed old release $(basename "$dir")"
    fi
  done
  for v in "$APP"/venvs/*; do
    [[ -d $v ]] || continue
    [[ $used == *" $(basename "$v") "* ]] || { rm -rf "$v"; CHANGED=1; say "removed unused virtualenv $(basename "$v")"; }
  done
}

# ---------------------------------------------------------------- configuration
write_config() {
  local cfg=$ETC/config.toml
  if [[ -f $cfg ]]; then
    say "kept $cfg (a technician's edits are never overwritten)"
    return 0
  fi
  local id=${MACHINE_ID:-$(hostname)}
  put_file "$cfg" 0644 <<EOF || true
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
rotation_deg = 0
display_overlay = ""

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

# What deploy.sh needs from the (possibly edited) config: valve pin, its active level, the 1-Wire pin, the pin
# factory, the data dir, whether a TDS probe (SPI) is fitted, and the display overlay. A file that is not TOML
# is refused here, in words (the release's own loader checks every key later).
read_config() {
  local out data_dir
  out=$(python3 - "$ETC/config.toml" <<'EOF'
import sys, tomllib
try:
    with open(sys.argv[1], "rb") as f:
        cfg = tomllib.load(f)
except FileNotFoundError:
    cfg = {}
except tomllib.TOMLDecodeError as e:
    sys.exit(f"{sys.argv[1]} is not valid TOML: {e}")
pins, hw, screen = cfg.get("pins", {}), cfg.get("hardware", {}), cfg.get("screen", {})
data_dir = cfg.get("paths", {}).get("data_dir", "/var/lib/tapshare")
if not isinstance(data_dir, str) or not data_dir.startswith("/") or " " in data_dir:
    sys.exit(f"{sys.argv[1]}: paths.data_dir must be an absolute path without spaces on a dispenser, got {data_dir!r}")
print(pins.get("valve", 17), "1" if pins.get("valve_active_high", True) else "0", pins.get("onewire", 4),
      hw.get("pin_factory", "lgpio"), data_dir, "1" if cfg.get("sensors", {}).get("tds_fitted") else "0",
      screen.get("display_overlay", "") or "-")
EOF
  ) || die "${out:-cannot read $ETC/config.toml} (fix it and run deploy.sh again; nothing was switched)"
  read -r VALVE_PIN VALVE_ACTIVE ONEWIRE_PIN PIN_FACTORY data_dir TDS_FITTED DISPLAY_OVERLAY <<< "$out"
  [[ $DISPLAY_OVERLAY == - ]] && DISPLAY_OVERLAY=""
  DATA_DIR=$data_dir
  DATA=$ROOT$data_dir
  return 0
}

# Replace a file on the boot partition (FAT) safely: the new text is written and synced beside it, the old one
# kept as .bak, then renamed over it, so a power cut leaves either the old file or the new one, never half.
replace_boot_file() {
  local path=$1 content=$2
  printf '%s\n' "$content" > "$path.tapshare-new"
  sync "$path.tapshare-new"
  cp -p "$path" "$path.bak"
  mv -f "$path.tapshare-new" "$path"
  sync "$(dirname "$path")"
}

boot_file() {
  local f=$ROOT/boot/firmware/$1
  [[ -f $f ]] || f=$ROOT/boot/$1
  echo "$f"
}

# The managed block at the end of config.txt. It opens with [all]: lines after a [cm5] or [pi4] filter
# would otherwise apply only to that board.
boot_config() {
  local txt block current level spi=""
  txt=$(boot_file config.txt)
  [[ -f $txt ]] || die "no config.txt in $ROOT/boot/firmware or $ROOT/boot"
  level=dl; [[ $VALVE_ACTIVE == 0 ]] && level=dh      # the valve's inactive level, driven from boot
  [[ $TDS_FITTED == 1 ]] && spi="dtparam=spi=on"       # the MCP3008 of the TDS probe
  block=$(printf '%s\n' "# BEGIN tapshare (managed by deploy.sh: edit /etc/tapshare/config.toml, then run it again)" \
    "[all]" "dtoverlay=w1-gpio,gpiopin=$ONEWIRE_PIN" "gpio=$VALVE_PIN=op,$level" "dtparam=watchdog=on" \
    ${spi:+"$spi"} ${DISPLAY_OVERLAY:+"dtoverlay=$DISPLAY_OVERLAY"} "# END tapshare")
  current=$(sed -n '/^# BEGIN tapshare/,/^# END tapshare/p' "$txt")
  [[ $current == "$block" ]] && return 0
  CHANGED=1
  REBOOT=1
  if [[ $DRY == 1 ]]; then say "would update the tapshare block in $txt"; return 0; fi
  replace_boot_file "$txt" "$(sed '/^# BEGIN tapshare/,/^# END tapshare/d' "$txt")
$block"
  say "updated $txt (1-Wire on GPIO $ONEWIRE_PIN, valve GPIO $VALVE_PIN held $level from boot${DISPLAY_OVERLAY:+, display $DISPLAY_OVERLAY}): reboot to apply"
}

# A kiosk's console: never blanked, no blinking cursor over the picture (cmdline.txt is one line).
kiosk_cmdline() {
  local txt line word add=()
  txt=$(boot_file cmdline.txt)
  if [[ ! -f $txt ]]; then say "no cmdline.txt: set consoleblank=0 vt.global_cursor_default=0 yourself"; return 0; fi
  line=$(head -n 1 "$txt")
  for word in consoleblank=0 vt.global_cursor_default=0; do
    [[ " $line " == *" $word "* ]] || add+=("$word")
  done
  ((${#add[@]})) || return 0
  CHANGED=1
  REBOOT=1
  if [[ $DRY == 1 ]]; then say "would add ${add[*]} to $txt"; return 0; fi
  replace_boot_file "$txt" "$line ${add[*]}"
  say "added ${add[*]} to $txt"
}

write_unit() {
  # the unit the live release ran under, kept only when this run changes it: a roll-back puts it back
  [[ $DRY == 1 ]] || rm -f "$APP/tapshare.service.before"
  BACKUP_TO=$APP/tapshare.service.before put_file "$UNIT" 0644 <<EOF || true
[Unit]
Description=Tapshare drinking-water dispenser
# No network-online.target or time-sync.target: the kiosk must come up (offline) at once without a
# network, and it corrects its clock from the cloud itself.
# Restart storms end: after 5 failed starts in 10 minutes the unit fails, and tapshare-escalate reboots the
# Pi (a wedged display or driver often comes back), at most 3 times an hour; then it stays down, valve closed.
StartLimitIntervalSec=600
StartLimitBurst=5
OnFailure=tapshare-escalate.service

[Service]
Type=notify
NotifyAccess=main
User=$USER_NAME
Group=$USER_NAME
SupplementaryGroups=${GROUPS_NEEDED[*]}
WorkingDirectory=/opt/tapshare/current
Environment=GPIOZERO_PIN_FACTORY=$PIN_FACTORY
Environment=LG_WD=$DATA_DIR
Environment=KIVY_HOME=$DATA_DIR/kivy
Environment=KIVY_WINDOW=sdl2
Environment=SDL_VIDEODRIVER=kmsdrm
Environment=PYTHONUNBUFFERED=1
Environment=PYTHONDONTWRITEBYTECODE=1
ExecStart=/opt/tapshare/current/.venv/bin/python /opt/tapshare/current/main.py --config /etc/tapshare/config.toml
ExecStopPost=/opt/tapshare/current/.venv/bin/python -m hal.valve_off --config /etc/tapshare/config.toml
Restart=always
RestartSec=2
WatchdogSec=30
TimeoutStartSec=90
TimeoutStopSec=15
StandardOutput=journal
StandardError=journal
LogRateLimitIntervalSec=30s
LogRateLimitBurst=2000
# Hardening: the dispenser writes only its data dir and reaches only the devices it drives.
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=$DATA_DIR
ProtectHome=yes
PrivateTmp=yes
UMask=0077
CapabilityBoundingSet=
AmbientCapabilities=
DevicePolicy=closed
DeviceAllow=char-gpiochip rw
DeviceAllow=/dev/gpiomem rw
DeviceAllow=char-spi rw
DeviceAllow=char-drm rw
DeviceAllow=char-input r
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
LockPersonality=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
EOF
  put_file "$ESCALATE_UNIT" 0644 <<'EOF' || true
[Unit]
Description=Tapshare: reboot when the dispenser keeps failing to start (at most 3 times an hour)
[Service]
Type=oneshot
ExecStart=/usr/local/lib/tapshare/escalate
EOF
  put_file "$ESCALATE" 0755 <<'EOF' || true
#!/bin/bash
# Started by systemd when tapshare.service hit its start limit (5 failed starts in 10 minutes): reboots the
# Pi, at most 3 times an hour; after that the dispenser stays down with the valve closed until someone looks.
set -euo pipefail
# a fleet update on trial is the applier's to undo: it rolls back and restarts the service; no reboot for it
trial=${TAPSHARE_ESCALATE_TRIAL:-/opt/tapshare/state/trial.json}
if [[ -f $trial ]]; then
  echo "tapshare.service failed during an update's trial: apply-update rolls the release back; not rebooting" >&2
  exit 0
fi
# deploy.sh checking a release it just installed rolls it back itself (its PID is in this file while it checks)
checking=${TAPSHARE_ESCALATE_DEPLOYING:-/run/tapshare-deploy.pid}
pid=$(cat "$checking" 2>/dev/null || true)
# only a live deploy.sh: a PID file left by a killed one (its PID reused by another process) does not count
if [[ $pid =~ ^[1-9][0-9]*$ ]] && tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -q 'deploy\.sh'; then
  echo "tapshare.service failed while deploy.sh checks a new release: deploy.sh rolls it back; not rebooting" >&2
  exit 0
fi
state=${TAPSHARE_ESCALATE_STATE:-/var/lib/tapshare-escalate/reboots}
mkdir -p "${state%/*}"
now=$(date +%s)
recent=$(awk -v now="$now" 'now - $1 < 3600' "$state" 2>/dev/null || true)
count=$(grep -c . <<< "$recent" || true)
if ((count >= 3)); then
  echo "tapshare.service failed again after $count reboots in the last hour: no more reboots, the valve stays closed" >&2
  exit 0
fi
printf '%s\n%s\n' "$recent" "$now" | grep . > "$state.new"
mv "$state.new" "$state"
echo "tapshare.service keeps failing to start: rebooting (reboot $((count + 1)) of at most 3 an hour)" >&2
systemctl reboot
EOF
  write_update_units
  local old_watchdog=$ROOT/etc/systemd/system.conf.d/10-tapshare-watchdog.conf    # its old name, overridden by Pi OS
  if [[ -f $old_watchdog ]]; then CHANGED=1; [[ $DRY == 1 ]] || rm -f "$old_watchdog"; fi
  put_file "$WATCHDOG_CONF" 0644 <<'EOF' || true
# The Pi's hardware watchdog, fed by systemd: a hung kernel or systemd reboots the machine.
[Manager]
RuntimeWatchdogSec=15
RebootWatchdogSec=2min
EOF
  if put_file "$JOURNAL_CONF" 0644 <<'EOF'; then JOURNAL_CHANGED=1; fi
# Logs must not fill the SD card, even in a restart storm.
[Journal]
SystemMaxUse=200M
SystemKeepFree=1G
RuntimeMaxUse=64M
MaxRetentionSec=1month
EOF
}

prepare_dirs() {
  if [[ $DRY == 1 ]]; then return 0; fi
  mkdir -p "$DATA" "$ETC" "$APP/releases" "$APP/venvs"
  chmod 0750 "$DATA"
  run chown "$USER_NAME:$USER_NAME" "$DATA"
}

provision() {
  [[ -n $TOKEN ]] || return 0
  local dir=$APP/releases/$RELEASE
  # as root (the secret lives in /etc/tapshare; it never touches the ledger), with the release about to go live,
  # before the switch: a refused token changes nothing
  run "$dir/.venv/bin/python" "$dir/main.py" --config /etc/tapshare/config.toml --provision "$TOKEN" ||
    die "enrolment failed (see above); nothing was switched"
  run chown "$USER_NAME:$USER_NAME" /etc/tapshare/device.secret
  run chmod 0600 /etc/tapshare/device.secret
  FORCE_CHECK=1                                  # the running service reads the secret when it starts
}

set_pin() {
  [[ $SET_PIN == 1 ]] || return 0
  # runuser keeps the environment, so TAPSHARE_MAINTENANCE_PIN (if set) reaches it without showing in ps or logs
  as_service_user "$APP/current/.venv/bin/python" "$APP/current/main.py" --config /etc/tapshare/config.toml \
    --set-maintenance-pin
}

# ---------------------------------------------------------------- switch, check, roll back
# $APP/live: the release that last passed its health check, and the status it reported. $APP/previous: the one
# live before it. A release that is current but not live (a failed check before a reboot) is checked again.
unit_prop() { systemctl show tapshare.service -p "$1" --value; }

# The release proves itself: it says "serving" (sent after its first frame and first ledger write as the
# service user), then runs --soak seconds with the same main PID, no restart and the watchdog fed. A release that
# cannot drive the hardware the live one could fails too.
health_check() {
  HEALTH_STATUS=""
  if [[ -n ${TAPSHARE_DEPLOY_HEALTH:-} ]]; then
    bash -c "$TAPSHARE_DEPLOY_HEALTH"
    return
  fi
  [[ -z $ROOT ]] || return 0
  systemctl reset-failed tapshare.service 2>/dev/null || true
  # returns once the new process has sent READY=1 (Type=notify), or fails if it died before that
  if ! systemctl restart tapshare.service; then HEALTH_WHY="it died before it was ready"; return 1; fi
  local restarts pid status wd deadline=$((SECONDS + 90)) end
  restarts=$(unit_prop NRestarts)
  pid=$(unit_prop MainPID)
  if [[ $pid == 0 ]]; then HEALTH_WHY="it has no main process after starting"; return 1; fi
  while :; do
    status=$(unit_prop StatusText)
    if [[ $(unit_prop MainPID) != "$pid" || $(unit_prop NRestarts) != "$restarts" ]]; then
      HEALTH_WHY="it crashed after it was ready (PID $pid is gone; last status: ${status:-none})"; return 1
    fi
    [[ $status == serving* ]] && break
    if ((SECONDS > deadline)); then HEALTH_WHY="it did not report serving within 90 s (status: ${status:-none})"; return 1; fi
    sleep 1
  done
  HEALTH_STATUS=$status
  if [[ $status == *"out of service: hardware"* ]]; then
    if [[ -n $LIVE && $LIVE_STATUS != *"out of service: hardware"* ]]; then
      HEALTH_WHY="it cannot drive the hardware the release before it could: ${status#*out of service: }"; return 1
    fi
    say "warning: the machine is out of service: ${status#*out of service: }"
  fi
  wd=$(unit_prop WatchdogTimestampMonotonic)
  say "release $RELEASE says \"$status\"; watching it for ${SOAK_S} s (main PID $pid)"
  end=$((SECONDS + SOAK_S))
  while ((SECONDS < end)); do
    sleep 2
    if [[ $(unit_prop MainPID) != "$pid" || $(unit_prop NRestarts) != "$restarts" ]]; then
      HEALTH_WHY="its main process (PID $pid) exited $((SOAK_S - (end - SECONDS))) s into the ${SOAK_S} s soak"
      return 1
    fi
    if [[ $(unit_prop ActiveState) != active ]]; then HEALTH_WHY="the service is $(unit_prop ActiveState)"; return 1; fi
  done
  if [[ $(unit_prop WatchdogTimestampMonotonic) == "$wd" ]]; then
    HEALTH_WHY="it did not feed the watchdog for ${SOAK_S} s"; return 1
  fi
  return 0
}

switch_release() {
  local link=$APP/current was="" target=releases/$RELEASE
  [[ -L $link ]] && was=$(readlink "$link")
  if [[ $was == "$target" && $LIVE == "$target" && $FORCE_CHECK == 0 ]]; then
    return 0
  fi
  CHANGED=1
  if [[ $DRY == 1 ]]; then say "would switch $link to $target and check it"; return 0; fi
  run systemctl stop tapshare.service       # the running release's own ExecStopPost closes the valve
  ln -sfn "$target" "$link.new" && mv -T "$link.new" "$link"
  run systemctl daemon-reload
  HEALTH_WHY="its health check failed"
  # a release that crashes in a loop while this checks it must not hit the start limit and reboot the Pi
  # (tapshare-escalate) under this script: the roll-back below is the answer to it
  if [[ -z $ROOT ]]; then echo $$ > "$DEPLOYING"; trap 'rm -f "$DEPLOYING"' EXIT; fi
  if health_check; then
    [[ -n $ROOT ]] || rm -f "$DEPLOYING"
    say "release $RELEASE is live"
    if [[ -n $LIVE && $LIVE != "$target" ]]; then echo "$LIVE" > "$APP/previous"; fi
    printf '%s\n%s\n' "$target" "$HEALTH_STATUS" > "$APP/live"
    return 0
  fi
  run systemctl stop tapshare.service || true     # at once: no more restarts of a crashing release
  say "release $RELEASE failed: $HEALTH_WHY"
  if [[ -z $ROOT && $STUB == 0 ]]; then     # (its stop's own lines come last: enough lines for the failure too)
    journalctl -u tapshare.service -n 40 --no-pager -o cat 2>/dev/null | sed 's/^/    /' || true
  fi
  if [[ -n $LIVE && $LIVE != "$target" && -d $APP/$LIVE ]]; then
    roll_back
  elif [[ $REBOOT == 1 ]]; then
    # A first install whose boot settings (display overlay, 1-Wire) take effect only after a reboot: the
    # release stays current and enabled, unproven, and the next run of deploy.sh checks it.
    say "there is no earlier release, and this one may need the reboot its boot settings wait for: it starts at" \
      "the next boot. Reboot (sudo reboot), then run deploy.sh again to check it"
    exit 3
  else
    run systemctl disable tapshare.service    # nothing to run: no restart storm, no reboot loop
    rm -f "$link"
    say "no earlier release: the service is stopped and disabled (the valve stays closed)"
  fi
  [[ -n $ROOT ]] || rm -f "$DEPLOYING"
  rm -rf "${APP:?}/$target"
  prune_releases
  exit 3
}

# Back to the last live release, with the unit file it ran under.
roll_back() {
  local link=$APP/current
  say "rolling back to $LIVE"
  if [[ -f $APP/tapshare.service.before ]] && ! cmp -s "$APP/tapshare.service.before" "$UNIT"; then
    cp -p "$APP/tapshare.service.before" "$UNIT"
    say "restored the unit file $LIVE ran under"
  fi
  ln -sfn "$LIVE" "$link.new" && mv -T "$link.new" "$link"
  run systemctl daemon-reload
  run systemctl reset-failed tapshare.service
  if run systemctl start tapshare.service; then
    say "release ${LIVE#releases/} runs again"
  else
    run systemctl disable --now tapshare.service || true
    say "ALERT: the earlier release ${LIVE#releases/} does not start either: the service is stopped and" \
      "disabled, the valve closed. The machine is out of service until someone looks (journalctl -u tapshare)"
  fi
}

# Fleet updates: the kiosk (unprivileged) downloads and checks a release and asks by writing apply.json; root's
# applier, kept outside every release so no update can replace it, checks it again, installs and switches. Its
# release keys and state are root's: the service user can read them, never change them.
write_update_units() {
  local updates=$DATA_DIR/updates keys=$ETC/release-keys k found=0
  if [[ $DRY == 1 ]]; then say "would install the update applier and its units"; return 0; fi
  mkdir -p "$ROOT/usr/local/lib/tapshare" "$keys" "$APP/state" "$ROOT$updates"
  chmod 0755 "$keys" "$APP/state"
  run chown "$USER_NAME:$USER_NAME" "$ROOT$updates"
  put_file "$ROOT/usr/local/lib/tapshare/apply-update.py" 0755 < "$SRC/scripts/apply-update.py" || true
  for k in ${RELEASE_KEY:-} "$SRC"/keys/*.pub.pem; do
    [[ -f $k ]] || continue
    found=1
    if put_file "$keys/$(basename "${k%.pub.pem}" .pem).pub.pem" 0644 < "$k"; then say "pinned the release key $k"; fi
  done
  [[ $found == 1 || -n $(ls "$keys" 2>/dev/null) ]] ||
    say "no release key pinned (--release-key FILE): this machine refuses every fleet update"
  put_file "$ROOT/etc/systemd/system/tapshare-update.path" 0644 <<EOF || true
[Unit]
Description=Tapshare: install or switch to a release when the dispenser asks
[Path]
PathExists=$updates/apply.json
[Install]
WantedBy=multi-user.target
EOF
  put_file "$ROOT/etc/systemd/system/tapshare-update.service" 0644 <<EOF || true
[Unit]
Description=Tapshare: install or switch to a downloaded release (checked again here)
[Service]
Type=oneshot
Environment=TAPSHARE_UPDATES_DIR=$updates
ExecStart=/usr/bin/python3 /usr/local/lib/tapshare/apply-update.py run
TimeoutStartSec=30min
EOF
  put_file "$ROOT/etc/systemd/system/tapshare-update-recover.service" 0644 <<EOF || true
[Unit]
Description=Tapshare: finish or undo an update that power loss interrupted
Before=tapshare.service
[Service]
Type=oneshot
Environment=TAPSHARE_UPDATES_DIR=$updates
ExecStart=/usr/bin/python3 /usr/local/lib/tapshare/apply-update.py recover --boot
[Install]
WantedBy=multi-user.target
EOF
}

enable_services() {
  run systemctl daemon-reload
  run systemctl enable tapshare-update.path tapshare-update-recover.service
  run systemctl start tapshare-update.path
  if [[ ${JOURNAL_CHANGED:-0} == 1 ]]; then run systemctl restart systemd-journald.service; fi
  run systemctl enable tapshare.service
  run systemctl enable --now systemd-timesyncd.service
  # the kiosk owns the screen: no login prompt on tty1 under it
  local getty=$ROOT/etc/systemd/system/getty@tty1.service
  if [[ $(readlink "$getty" 2>/dev/null) != /dev/null ]]; then
    CHANGED=1
    if [[ $DRY == 1 ]]; then say "would mask getty@tty1.service"; else ln -sfn /dev/null "$getty"; say "masked getty@tty1.service"; fi
  fi
}

main() {
  if [[ -z $ROOT && $DRY == 0 ]]; then
    exec 9> /run/lock/tapshare-deploy.lock
    flock -n 9 || die "another deploy.sh is running"
  fi
  check_system
  read_config
  leave_desktop
  install_packages
  create_user
  prepare_dirs
  write_config
  read_config
  install_release
  check_release
  boot_config
  kiosk_cmdline
  write_unit
  enable_services
  LIVE=$(sed -n 1p "$APP/live" 2>/dev/null || true)
  LIVE_STATUS=$(sed -n 2p "$APP/live" 2>/dev/null || true)
  provision
  switch_release
  prune_releases
  set_pin
  if [[ $DRY == 1 ]]; then
    say "dry run: nothing was changed"
  elif [[ $CHANGED == 0 ]]; then
    say "nothing to change: the dispenser is up to date"
  fi
  if [[ $REBOOT == 1 ]]; then say "reboot needed for the boot settings (sudo reboot)"; fi
  say "logs: journalctl -u tapshare -f    status: systemctl status tapshare"
}

main
