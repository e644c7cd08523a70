#!/usr/bin/env bash
# Run a command in the arm64 root that setup.sh built, under qemu: the working tree read-only at /src (its
# python/ folder on PYTHONPATH, so `python -m reprolora` is this tree's library) and WORKDIR at /work.
# The mounts live in a private mount namespace: they vanish with the command, and the cached root stays clean.
#
# Usage: run.sh ROOT WORKDIR COMMAND [ARG...]      e.g. run.sh "$(setup.sh)" /tmp/x python -m reprolora --version
set -euo pipefail
tree="$(cd "$(dirname "$0")/../.." && pwd)"
root="$1" workdir="$2"
shift 2
[ -e "$root/.reprolora-arm64-complete" ] || { echo "run.sh: $root is not a complete arm64 root (run setup.sh)" >&2; exit 2; }
exec unshare --mount --propagation private -- /bin/sh -c '
  set -e
  root="$1" tree="$2" workdir="$3"
  shift 3
  mount -t proc proc "$root/proc"       # torch reads the CPU from /proc and /sys
  mount -t sysfs sysfs "$root/sys"
  mount --bind /dev "$root/dev"
  mount --bind "$tree" "$root/src"
  mount -o remount,bind,ro "$root/src"
  mount --bind "$workdir" "$root/work"
  exec chroot "$root" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    PYTHONPATH=/src/python PYTHONDONTWRITEBYTECODE=1 "$@"
' run.sh "$root" "$tree" "$workdir" "$@"
