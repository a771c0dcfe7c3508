#!/usr/bin/env bash
# Turns a Raspberry Pi 4 or 5 running Raspberry Pi OS 64-bit (Bookworm or Trixie) into a Tapshare
# dispenser. Idempotent: running it again upgrades or repairs. See ./deploy.sh --help.
set -euo pipefail

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
  --soak SECONDS         how long a new release must run unchanged before it is live (default 45; 20-600)
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
    --root) ROOT=$(cd "$2" && pwd); shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "deploy.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $LAYOUT in landscape_800x480|portrait_720x1280) ;; *) echo "deploy.sh: --layout $LAYOUT is not a layout" >&2; exit 2 ;; esac
if ! [[ $SOAK_S =~ ^[0-9]+$ ]] || ((SOAK_S < 20 || SOAK_S > 600)); then
  echo "deploy.sh: --soak $SOAK_S: a number of seconds from 20 to 600" >&2; exit 2
fi

APP=$ROOT/opt/tapshare
ETC=$ROOT/etc/tapshare
DATA=$ROOT/var/lib/tapshare
UNIT=$ROOT/etc/systemd/system/tapshare.service
# Raspberry Pi OS ships 70-rpi-enable-watchdog.conf; drop-ins apply in name order, so ours comes last
WATCHDOG_CONF=$ROOT/etc/systemd/system.conf.d/99-tapshare-watchdog.conf
JOURNAL_CONF=$ROOT/etc/systemd/journald.conf.d/99-tapshare.conf
USER_NAME=tapshare
GROUPS_NEEDED=(gpio video render input)
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

# Raspberry Pi OS Desktop: its compositor holds the screen, so the kiosk (SDL on KMSDRM) could not draw.
leave_desktop() {
  local dm=$ROOT/etc/systemd/system/display-manager.service
  [[ -e $dm || -L $dm ]] || return 0
  CHANGED=1
  REBOOT=1
  say "Raspberry Pi OS Desktop: its display manager holds the screen the kiosk draws on, so it is switched off:" \
    "the Pi now boots to the console (multi-user.target) with the kiosk on the screen." \
    "Undo: sudo systemctl set-default graphical.target && sudo systemctl enable display-manager"
  run systemctl disable --now display-manager.service
  run systemctl set-default multi-user.target
}

install_packages() {
  run apt-get update -qq
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    python3-venv python3-lgpio python3-dev fonts-noto-cjk libsdl2-2.0-0 libgl1 libegl1 libgles2 libmtdev1 \
    libdrm2 libgbm1 systemd-timesyncd sqlite3
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
  local keep_current keep_previous dir used=" " v
  keep_current=$(readlink "$APP/current" 2>/dev/null || true)
  keep_previous=$(cat "$APP/previous" 2>/dev/null || true)
  for dir in "$APP"/releases/*; do
    [[ -d $dir ]] || continue
    case releases/$(basename "$dir") in
      "$keep_current"|"$keep_previous") used+="$(basename "$(readlink "$dir/.venv")") " ;;
      *) rm -rf "$dir"; say "removed old release $(basename "$dir")" ;;
    esac
  done
  for v in "$APP"/venvs/*; do
    [[ -d $v ]] || continue
    [[ $used == *" $(basename "$v") "* ]] || { rm -rf "$v"; say "removed unused virtualenv $(basename "$v")"; }
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

# What deploy.sh needs from the (possibly edited) config: valve pin, its active level, the 1-Wire pin, the
# pin factory and the display overlay. A file that is not TOML is refused here, in words.
read_config() {
  local out
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
print(pins.get("valve", 17), "1" if pins.get("valve_active_high", True) else "0", pins.get("onewire", 4),
      hw.get("pin_factory", "lgpio"), screen.get("display_overlay", "") or "-")
EOF
  ) || die "${out:-cannot read $ETC/config.toml} (fix it and run deploy.sh again; nothing was switched)"
  read -r VALVE_PIN VALVE_ACTIVE ONEWIRE_PIN PIN_FACTORY DISPLAY_OVERLAY <<< "$out"
  [[ $DISPLAY_OVERLAY == - ]] && DISPLAY_OVERLAY=""
  return 0
}

boot_file() {
  local f=$ROOT/boot/firmware/$1
  [[ -f $f ]] || f=$ROOT/boot/$1
  echo "$f"
}

# The managed block at the end of config.txt. It opens with [all]: lines after a [cm5] or [pi4] filter
# would otherwise apply only to that board.
boot_config() {
  local txt block current level
  txt=$(boot_file config.txt)
  [[ -f $txt ]] || die "no config.txt in $ROOT/boot/firmware or $ROOT/boot"
  level=dl; [[ $VALVE_ACTIVE == 0 ]] && level=dh      # the valve's inactive level, driven from boot
  block=$(printf '%s\n' "# BEGIN tapshare (managed by deploy.sh: edit /etc/tapshare/config.toml, then run it again)" \
    "[all]" "dtoverlay=w1-gpio,gpiopin=$ONEWIRE_PIN" "gpio=$VALVE_PIN=op,$level" "dtparam=watchdog=on" \
    ${DISPLAY_OVERLAY:+"dtoverlay=$DISPLAY_OVERLAY"} "# END tapshare")
  current=$(sed -n '/^# BEGIN tapshare/,/^# END tapshare/p' "$txt")
  [[ $current == "$block" ]] && return 0
  CHANGED=1
  REBOOT=1
  if [[ $DRY == 1 ]]; then say "would update the tapshare block in $txt"; return 0; fi
  local tmp
  tmp=$(mktemp)
  sed '/^# BEGIN tapshare/,/^# END tapshare/d' "$txt" > "$tmp"
  printf '%s\n' "$block" >> "$tmp"
  cat "$tmp" > "$txt"
  rm -f "$tmp"
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
  printf '%s %s\n' "$line" "${add[*]}" > "$txt"
  say "added ${add[*]} to $txt"
}

write_unit() {
  put_file "$UNIT" 0644 <<EOF || true
[Unit]
Description=Tapshare drinking-water dispenser
# No network-online.target or time-sync.target: the kiosk must come up (offline) at once without a
# network, and it corrects its clock from the cloud itself.
# Restart storms end: 5 failed starts in 10 minutes reboot the Pi (a wedged driver or display).
StartLimitIntervalSec=600
StartLimitBurst=5
StartLimitAction=reboot

[Service]
Type=notify
NotifyAccess=main
User=$USER_NAME
Group=$USER_NAME
SupplementaryGroups=${GROUPS_NEEDED[*]}
WorkingDirectory=/opt/tapshare/current
Environment=GPIOZERO_PIN_FACTORY=$PIN_FACTORY
Environment=LG_WD=/var/lib/tapshare
Environment=KIVY_HOME=/var/lib/tapshare/kivy
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
ReadWritePaths=/var/lib/tapshare
ProtectHome=yes
PrivateTmp=yes
UMask=0077
CapabilityBoundingSet=
AmbientCapabilities=
DevicePolicy=closed
DeviceAllow=char-gpiochip rw
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
  # as root (the secret lives in /etc/tapshare); it never touches the ledger
  run "$APP/current/.venv/bin/python" "$APP/current/main.py" --config /etc/tapshare/config.toml --provision "$TOKEN"
  run chown "$USER_NAME:$USER_NAME" /etc/tapshare/device.secret
  run chmod 0600 /etc/tapshare/device.secret
}

set_pin() {
  [[ $SET_PIN == 1 ]] || return 0
  as_service_user env ${TAPSHARE_MAINTENANCE_PIN:+TAPSHARE_MAINTENANCE_PIN="$TAPSHARE_MAINTENANCE_PIN"} \
    "$APP/current/.venv/bin/python" "$APP/current/main.py" --config /etc/tapshare/config.toml --set-maintenance-pin
}

# ---------------------------------------------------------------- switch, check, roll back
unit_prop() { systemctl show tapshare.service -p "$1" --value; }

# The release proves itself: it says "serving" (sent after its first frame and first ledger write as the
# service user), then runs --soak seconds with the same main PID, no restart and the watchdog fed.
health_check() {
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
  while :; do
    status=$(unit_prop StatusText)
    if [[ $(unit_prop MainPID) != "$pid" || $(unit_prop NRestarts) != "$restarts" ]]; then
      HEALTH_WHY="it crashed after it was ready (PID $pid is gone; last status: ${status:-none})"; return 1
    fi
    [[ $status == serving* ]] && break
    if ((SECONDS > deadline)); then HEALTH_WHY="it did not report serving within 90 s (status: ${status:-none})"; return 1; fi
    sleep 1
  done
  wd=$(unit_prop WatchdogTimestampMonotonic)
  say "release $RELEASE says \"$status\"; watching it for ${SOAK_S} s (main PID $pid)"
  [[ $status == *"out of service"* ]] && say "warning: the machine is out of service: ${status#*out of service: }"
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
  HEALTH_WHY="its health check failed"
  if health_check; then
    say "release $RELEASE is live"
    echo "$previous" > "$APP/previous"
    return 0
  fi
  say "release $RELEASE failed: $HEALTH_WHY. Rolling back to ${previous:-nothing}"
  [[ -z $ROOT && $STUB == 0 ]] && journalctl -u tapshare.service -n 15 --no-pager -o cat 2>/dev/null | sed 's/^/    /'
  if [[ -n $previous ]]; then
    ln -sfn "$previous" "$link.new" && mv -T "$link.new" "$link"
    run systemctl reset-failed tapshare.service
    run systemctl restart tapshare.service
    say "release ${previous#releases/} runs again"
  else
    rm -f "$link"
    run systemctl disable --now tapshare.service    # nothing to run: no restart storm, no reboot loop
    say "no earlier release: the service is stopped and disabled (the valve stays closed)"
  fi
  rm -rf "${APP:?}/$target"
  exit 3
}

enable_services() {
  run systemctl daemon-reload
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
  switch_release
  prune_releases
  provision
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
