#!/usr/bin/env bash
# Proves that the README's quick start works for a newcomer on a fresh Debian 12 (bookworm) machine, as
# root: on a minimal bookworm root with only python3, git and ca-certificates (no python3-venv, no test
# packages, no .venv), a `git clone` of this repository runs `./test.sh` (which must install the Debian
# test packages, python3-venv and the pinned Python packages itself) and then `./run.sh` (headless, no
# DISPLAY) until it prints the phone link, which is then fetched. Slow and not part of the test suite.
#
# Usage (root): scripts/fresh-machine-check.sh [pytest arguments]
#   no arguments: test.sh runs the whole suite with `-ra -q`; otherwise `-ra` and the arguments, e.g.
#   scripts/fresh-machine-check.sh -x tests/test_config.py tests/test_deploy.py
#   (-ra: the short summary lists every skipped test with its reason, and failures; pytest's -r is not
#   additive, so a later -rs lists skips only)
# How long: building the cached root (debootstrap) takes 1-5 minutes, once; each run then copies it
# and clones (seconds), spends 1-10 minutes in test.sh's set-up before pytest starts (apt: about 300 MB
# of Chromium, fonts, PostgreSQL, Mesa...; pip: the pinned packages), then the tests themselves (the
# whole suite: tens of minutes), then about 10 seconds for run.sh. Measured on a fast link, 2 cores:
# root 40s, copy + clone 4s, test.sh with two test files 1m05s, run.sh 7s, clean-up 3s.
# Network: deb.debian.org and PyPI.
#
# How: the root is built once with `debootstrap --variant=minbase` into a cache keyed by suite, mirror
# and package list, and copied to a fresh work folder each run (the cache is never touched). The copy
# gets what a Debian installer leaves and debootstrap does not: apt sources with bookworm-updates and
# bookworm-security, /etc/hosts, and this host's resolv.conf and local CA certificates (so TLS through
# an intercepting proxy still verifies; none on a plain machine). It is entered with chroot (not
# systemd-nspawn: the suite starts nspawn containers itself, and nested nspawn fails), with /proc and
# a fresh /run, /dev/shm bound or mounted; the chroot shares this host's network, so ports in use here
# (e.g. a PostgreSQL on 5432, run.sh's 8700) are in use there too. A policy-rc.d keeps apt from
# starting daemons in the chroot (as on a machine without systemd: test.sh starts PostgreSQL itself).
# On exit, also on Ctrl-C: PostgreSQL clusters in the root are stopped (pg_ctlcluster), every process
# whose root is inside it is killed, everything mounted under it is unmounted, and the root is removed.
#
# Environment:
#   TAPSHARE_FRESH_CACHE      cached roots and download caches (default /var/cache/tapshare-fresh)
#   TAPSHARE_FRESH_WORKDIR    where each run's folder is made (default /var/tmp); logs stay there
#   TAPSHARE_FRESH_REPO       repository to clone (default: the one holding this script)
#   TAPSHARE_FRESH_REF        commit or branch to test (default main): committed state only
#   TAPSHARE_FRESH_KEEP=1     keep the run's root afterwards (unmounted) for inspection
#   TAPSHARE_FRESH_DOWNLOAD_CACHE=0  no shared apt/pip download cache (default 1: the .deb files and
#                             wheels are kept in the cache folder between runs; what gets installed is
#                             the same, only not downloaded again)
#   TAPSHARE_FRESH_RUN_TIMEOUT  seconds to wait for run.sh's link (default 600)
# Exit status: 0 when test.sh passed, run.sh printed the link and the link answered; 1 otherwise;
# 2 for a usage or host problem; 130 on Ctrl-C.
set -euo pipefail

suite=bookworm
mirror=http://deb.debian.org/debian
packages=(python3 git ca-certificates)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
repo=${TAPSHARE_FRESH_REPO:-$here}
ref=${TAPSHARE_FRESH_REF:-main}
cache=${TAPSHARE_FRESH_CACHE:-/var/cache/tapshare-fresh}
workbase=${TAPSHARE_FRESH_WORKDIR:-/var/tmp}
keep=${TAPSHARE_FRESH_KEEP:-0}
download_cache=${TAPSHARE_FRESH_DOWNLOAD_CACHE:-1}
run_timeout=${TAPSHARE_FRESH_RUN_TIMEOUT:-600}
app=/root/tapshare                     # where the clone lives inside the root

if [[ ${1:-} == --help ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
if (($#)); then pytest_args=(-ra "$@"); else pytest_args=(-ra -q); fi

die() { echo "fresh-machine-check: $*" >&2; exit 2; }
say() { printf '\n=== %s\n' "$*"; }

[[ $(id -u) == 0 ]] || die "must run as root (debootstrap, chroot, mount)"
for tool in debootstrap chroot mount umount git flock sha256sum; do
  command -v "$tool" >/dev/null || die "missing $tool on this host (apt-get install debootstrap git)"
done
[[ $run_timeout =~ ^[0-9]+$ ]] || die "TAPSHARE_FRESH_RUN_TIMEOUT must be a number of seconds"
git -C "$repo" rev-parse --verify -q "$ref^{commit}" >/dev/null || die "$repo has no commit '$ref'"

# ---- bookkeeping: phases, summary, clean-up --------------------------------------------------------
phase_names=()
phase_secs=()
phase_name=""
phase_t0=0
phase() {                              # phase NAME: ends the current phase (if any), starts NAME
  if [[ -n $phase_name ]]; then
    phase_names+=("$phase_name")
    phase_secs+=($((SECONDS - phase_t0)))
  fi
  phase_name=$1
  phase_t0=$SECONDS
  [[ -n $phase_name ]] && say "$phase_name"
  return 0
}
fmt_secs() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

work=""
root=""
partial=""
test_rc=""
test_log=""
run_log=""
link_line=""
link_status=""
run_stop=""
commit=""
cleaned=0
summarised=0

mounts_under() {                       # mount points at or under $1, deepest first
  awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r
}

unmount_all_under() {
  local dir=$1 m round ms
  for round in 1 2 3; do
    mapfile -t ms < <(mounts_under "$dir")
    ((${#ms[@]})) || return 0
    for m in "${ms[@]}"; do
      umount "$m" 2>/dev/null || { ((round < 3)) || umount -l "$m" 2>/dev/null; } || true
    done
  done
  [[ -z $(mounts_under "$dir") ]]
}

procs_in() {                           # pids of processes whose root is $1 or inside it
  local p r
  for p in /proc/[0-9]*; do
    r=$(readlink "$p/root" 2>/dev/null) || continue
    if [[ $r == "$1" || $r == "$1"/* ]]; then echo "${p#/proc/}"; fi
  done
}

stop_root() {                          # PostgreSQL, then every process inside, of root $1
  local dir=$1 pids i
  if [[ -e $dir/usr/bin/pg_lsclusters && -r $dir/proc/self/stat ]]; then   # installed, and /proc mounted
    # shellcheck disable=SC2016  # expanded by the shell in the root
    timeout 90 chroot "$dir" /bin/sh -c 'pg_lsclusters -h 2>/dev/null | while read -r v c _ s _; do
      if [ "$s" = online ]; then
        echo "stopping PostgreSQL $v/$c in the root"; pg_ctlcluster --force "$v" "$c" stop
      fi
    done' || true
  fi
  mapfile -t pids < <(procs_in "$dir")
  ((${#pids[@]})) || return 0
  echo "stopping ${#pids[@]} process(es) left in the root: ${pids[*]}"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for i in $(seq 1 20); do
    mapfile -t pids < <(procs_in "$dir")
    ((${#pids[@]})) || return 0
    ((i < 20)) && sleep 0.5
  done
  echo "killing: ${pids[*]}"
  kill -KILL "${pids[@]}" 2>/dev/null || true
  sleep 1
}

remove_tree() {                        # remove $1 only when nothing is mounted under it any more
  local dir=$1
  [[ -n $dir && -e $dir ]] || return 0
  if unmount_all_under "$dir"; then
    rm -rf --one-file-system "$dir"
  else
    echo "NOT removing $dir: still mounted under it: $(mounts_under "$dir" | tr '\n' ' ')" >&2
    return 1
  fi
}

cleanup() {
  ((cleaned)) && return 0
  cleaned=1
  trap '' INT TERM HUP                 # a second Ctrl-C must not leave mounts behind
  if [[ -n $partial && -e $partial ]]; then   # an interrupted debootstrap
    stop_root "$partial"
    remove_tree "$partial" || true
  fi
  if [[ -n $root && -d $root ]]; then
    stop_root "$root"
    if unmount_all_under "$root"; then
      if [[ $keep == 1 ]]; then
        echo "kept the root (unmounted): $root"
      else
        rm -rf --one-file-system "$root"
      fi
    else
      echo "WARNING: could not unmount: $(mounts_under "$root" | tr '\n' ' ')" >&2
    fi
  fi
}

summary() {
  ((summarised)) && return 0
  summarised=1
  local i total=0 final skipped
  say "summary"
  echo "tested: $repo at $ref (${commit:-not cloned}), on a fresh Debian $suite root (minbase + ${packages[*]})"
  if [[ -n $test_log && -f $test_log ]]; then
    final=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s' "$test_log" | tail -n 1 |
      sed 's/^=* *//; s/ *=*$//')
    echo "test.sh: exit ${test_rc:-(not finished)}; pytest: ${final:-(no pytest result line: see the log)}"
    mapfile -t skipped < <(grep -E '^SKIPPED ' "$test_log" || true)
    if ((${#skipped[@]})); then
      echo "skipped (${#skipped[@]} line(s)):"
      printf '  %s\n' "${skipped[@]}"
    else
      echo "skipped: none"
    fi
    if [[ ${test_rc:-1} != 0 ]]; then
      echo "last lines of the test log:"
      tail -n 25 "$test_log" | sed 's/^/  | /'
    fi
  else
    echo "test.sh: not run"
  fi
  if [[ -n $link_line ]]; then
    echo "run.sh printed: $link_line"
    echo "  the link answered: ${link_status:-?}; run.sh stopped: ${run_stop:-?}"
  elif [[ -n $run_log && -f $run_log ]]; then
    echo "run.sh: NO link printed; last lines of its output:"
    tail -n 25 "$run_log" | sed 's/^/  | /'
  else
    echo "run.sh: not run"
  fi
  echo "wall time per phase:"
  for i in "${!phase_names[@]}"; do
    printf '  %-42s %s\n' "${phase_names[$i]}" "$(fmt_secs "${phase_secs[$i]}")"
    total=$((total + phase_secs[i]))
  done
  printf '  %-42s %s\n' "total" "$(fmt_secs "$total")"
  [[ -n $work ]] && echo "logs: $work"
  return 0
}

# shellcheck disable=SC2317  # run by the EXIT trap
on_exit() {
  local rc=$?
  if [[ -n $phase_name && $phase_name != "clean-up" ]]; then
    phase "clean-up (after an interruption or error)"
  fi
  cleanup
  phase ""
  summary
  exit "$rc"
}
trap on_exit EXIT
trap 'echo "interrupted" >&2; exit 130' INT
trap 'exit 143' TERM HUP

# ---- 1. the cached root ----------------------------------------------------------------------------
phase "root: build or reuse the cached root"
key=$(printf '%s\n' "$suite" minbase "$mirror" "${packages[@]}" | sha256sum | cut -c1-16)
cached=$cache/$suite-minbase-$key
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9                                # one build at a time; runs only read the cache
if [[ -f $cached.ok && -d $cached ]]; then
  echo "reusing $cached (built $(cat "$cached.ok"))"
else
  partial=$cached.partial
  remove_tree "$partial" || die "cannot clear $partial"
  rm -rf "$cached" "$cached.ok"
  echo "debootstrap --variant=minbase --include=$(IFS=,; echo "${packages[*]}") $suite from $mirror (a few minutes) ..."
  debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" "$suite" "$partial" "$mirror" \
    >"$cache/debootstrap-$key.log" 2>&1 ||
    { tail -n 20 "$cache/debootstrap-$key.log" >&2; die "debootstrap failed (log: $cache/debootstrap-$key.log)"; }
  unmount_all_under "$partial" || die "debootstrap left mounts under $partial"
  rm -f "$partial"/var/cache/apt/archives/*.deb
  mv "$partial" "$cached"
  partial=""
  printf '%s\n' "${packages[@]}" >"$cached.packages"
  date -u +%Y-%m-%dT%H:%M:%SZ >"$cached.ok"
  echo "built $cached"
fi
exec 9>&-

phase "root: copy to a work folder"
mkdir -p "$workbase"
work=$(mktemp -d "$workbase/tapshare-fresh.XXXXXX")
root=$work/root
test_log=$work/test.log
run_log=$work/run.log
mkdir "$root"
cp -a --reflink=auto "$cached/." "$root/"
echo "root: $root ($(du -sh "$root" | cut -f1))"

# What a Debian 12 installation has and a debootstrap root lacks.
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb http://deb.debian.org/debian-security $suite-security main
EOF
cat >"$root/etc/hosts" <<EOF
127.0.0.1	localhost
127.0.1.1	tapshare-fresh
::1	localhost ip6-localhost ip6-loopback
EOF
# Not starting daemons from package scripts: there is no init in a chroot (test.sh starts PostgreSQL).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"

# ---- 2. the clone -------------------------------------------------------------------------------------
phase "clone: git clone $ref"
if [[ -n $(git -C "$repo" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
  echo "note: $repo has uncommitted changes; only committed $ref is tested"
fi
git clone -q --no-hardlinks "$repo" "$root$app"
git -C "$root$app" checkout -q "$ref"
commit=$(git -C "$root$app" log -1 --format='%h %s' | cut -c1-100)
echo "cloned into $app: $commit"

# ---- 3. enter the root, test.sh --------------------------------------------------------------------------
mount_root() {
  # the root bound onto itself, so that / inside the chroot is a mount point: systemd-nspawn, which the boot
  # test starts, makes / a slave mount first and fails (EINVAL) on a plain directory
  mount --bind "$root" "$root"
  mount --make-private "$root"
  mount -t proc proc "$root/proc"
  mount --rbind /sys "$root/sys"
  mount --make-rslave "$root/sys"
  mount --bind /dev "$root/dev"
  mount --make-private "$root/dev"
  mount --bind /dev/pts "$root/dev/pts"
  mount --make-private "$root/dev/pts"
  mount -t tmpfs -o mode=1777,nosuid,nodev shm "$root/dev/shm"
  mount -t tmpfs -o mode=755,nosuid,nodev run "$root/run"
  mkdir -m 1777 "$root/run/lock"
  if [[ $download_cache == 1 ]]; then
    mkdir -p "$cache/apt-archives/partial" "$cache/pip" "$root/root/.cache/pip"
    mount --bind "$cache/apt-archives" "$root/var/cache/apt/archives"
    mount --make-private "$root/var/cache/apt/archives"
    mount --bind "$cache/pip" "$root/root/.cache/pip"
    mount --make-private "$root/root/.cache/pip"
  fi
}

# a root login's environment: no DISPLAY, nothing inherited from here
root_env=(/usr/bin/env -i HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM="${TERM:-dumb}" LANG=C.UTF-8
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
in_root() { chroot "$root" "${root_env[@]}" "$@"; }

mount_root
# Local CA certificates of this host (an egress proxy's); a plain machine has none.
shopt -s nullglob
site_cas=(/usr/local/share/ca-certificates/*.crt)
shopt -u nullglob
if ((${#site_cas[@]})); then
  cp "${site_cas[@]}" "$root/usr/local/share/ca-certificates/"
  in_root update-ca-certificates >/dev/null 2>&1 || echo "warning: update-ca-certificates failed in the root" >&2
  echo "added this host's local CA certificate(s): ${site_cas[*]##*/}"
fi

phase "test.sh (set-up + ruff + pytest)"
echo "in the root: cd $app && ./test.sh ${pytest_args[*]}   (log: $test_log)"
set +e
# shellcheck disable=SC2016  # expanded by bash in the root
in_root /bin/bash -l -c 'cd "$1" && shift && exec ./test.sh "$@"' fresh-check "$app" "${pytest_args[@]}" \
  </dev/null 2>&1 | tee "$test_log"
test_rc=${PIPESTATUS[0]}
set -e
echo "test.sh exited with $test_rc"

# ---- 4. run.sh until the phone link ------------------------------------------------------------------
phase "run.sh until the phone link"
if (exec 3<>/dev/tcp/127.0.0.1/8700) 2>/dev/null; then
  echo "warning: port 8700 is already in use on this host (the chroot shares its network): run.sh will fail" >&2
fi
echo "in the root: cd $app && ./run.sh   (no DISPLAY; log: $run_log)"
# shellcheck disable=SC2016  # expanded by bash in the root
chroot "$root" "${root_env[@]}" /bin/bash -l -c 'cd "$1" && exec ./run.sh' fresh-check "$app" \
  </dev/null >"$run_log" 2>&1 &       # not via a function: $! is then run.sh itself (exec'd to main.py)
run_pid=$!
deadline=$((SECONDS + run_timeout))
while :; do
  # the phone link is printed on a line of its own (log lines, e.g. the web server's, are not)
  link_line=$(grep -m 1 -E '^[[:space:]]*https?://' "$run_log" 2>/dev/null | sed 's/^ *//' || true)
  [[ -n $link_line ]] && break
  if ! kill -0 "$run_pid" 2>/dev/null; then
    rc=0; wait "$run_pid" || rc=$?
    run_stop="exited by itself with $rc"
    echo "run.sh ended before printing a link ($run_stop)"
    break
  fi
  if ((SECONDS >= deadline)); then
    echo "run.sh printed no link within ${run_timeout}s"
    break
  fi
  sleep 1
done
if [[ -n $link_line ]]; then
  echo "link: $link_line"
  url=$(grep -o -m 1 -E 'https?://[^ ]+' <<<"$link_line")
  sleep 1
  link_status=$(in_root python3 -c '
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=30) as r:
        print(f"HTTP {r.status}, {len(r.read())} bytes")
except Exception as e:
    print(f"no: {e}")
    sys.exit(1)' "$url") || true
  echo "GET $url: $link_status"
fi
if kill -0 "$run_pid" 2>/dev/null; then
  t0=$SECONDS
  kill -TERM "$run_pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$run_pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$run_pid" 2>/dev/null; then
    kill -KILL "$run_pid" 2>/dev/null || true
    run_stop="did not stop within 30s of SIGTERM: killed"
  fi
  rc=0; wait "$run_pid" 2>/dev/null || rc=$?
  run_stop=${run_stop:-"stopped on SIGTERM in $((SECONDS - t0))s, exit $rc"}
  echo "run.sh $run_stop"
fi

# ---- 5. clean-up and summary ------------------------------------------------------------------------------
phase "clean-up"
cleanup
phase ""
summary
if [[ $test_rc == 0 && -n $link_line && $link_status == HTTP\ 2* ]]; then
  echo "RESULT: OK: the README's ./test.sh and ./run.sh work on a fresh Debian $suite machine"
  exit 0
fi
echo "RESULT: FAILED$([[ $test_rc != 0 ]] && echo ": test.sh exited $test_rc")$([[ -z $link_line ]] &&
  echo ": run.sh printed no link")$([[ -n $link_line && $link_status != HTTP\ 2* ]] && echo ": the link did not answer")"
exit 1
