#!/usr/bin/env bash
# The arm64 test environment, built from nothing on an x86_64 Debian machine: an arm64 Debian root made by
# debootstrap that runs here under qemu-user-static, with a Python venv of the aarch64 wheels in
# requirements.txt (fetched by the host's pip: the root has no network). The library itself is not installed:
# tests/arm64/run.sh mounts the working tree into the root on each run.
#
# Cached: the root lies in $REPROLORA_ARM64_CACHE (default /var/cache/reprolora-arm64)/root-KEY, KEY = sha256 of
# this script and requirements.txt; a run that finds it complete only prints it. The downloaded wheels stay in
# the cache's wheels/ folder, so a changed script does not download them again.
#
# Usage: setup.sh          build the environment (or find it); prints the root's path. Needs root.
#        setup.sh --path   print where this key's root lies; builds nothing
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${REPROLORA_ARM64_CACHE:-/var/cache/reprolora-arm64}"
key="$(cat "$here/setup.sh" "$here/requirements.txt" | sha256sum | cut -c1-16)"
root="$cache/root-$key"
complete="$root/.reprolora-arm64-complete"  # written last: a root without it is half-built
if [ "${1:-}" = --path ]; then echo "$root"; exit 0; fi
log() { echo "arm64 setup: $*" >&2; }
[ "$(id -u)" = 0 ] || { log "needs root (apt-get, debootstrap, binfmt_misc, chroot)"; exit 2; }

# qemu-user-static runs aarch64 binaries through binfmt_misc; in a container binfmt_misc may not be mounted yet.
if ! command -v qemu-aarch64-static debootstrap update-binfmts >/dev/null; then
  log "installing qemu-user-static binfmt-support debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support debootstrap >/dev/null
fi
[ -e /proc/sys/fs/binfmt_misc/status ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

if [ -e "$complete" ]; then
  log "cached: $root"
  echo "$root"
  exit 0
fi

started=$SECONDS
mkdir -p "$cache/wheels"
build="$cache/build-$key-$$"
trap 'rm -rf "$build"' EXIT
mkdir -p "$build"

# The Debian mirror this machine's apt uses (deb822 or one-line format), else Debian's own.
mirror="$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p; s/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\) .*/\2/p' \
  /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | grep -v security | head -n 1 || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
log "debootstrap arm64 bookworm from $mirror"
debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv bookworm "$build/root" "$mirror" >"$build/debootstrap.log" \
  || { tail -n 20 "$build/debootstrap.log" >&2; exit 1; }

# The wheels: aarch64, CPython 3.11 (bookworm's), exactly the files requirements.txt hashes.
python3 -m venv "$build/pip"
platforms=(--only-binary :all: --python-version 3.11 --implementation cp --platform manylinux_2_28_aarch64
           --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64)
log "downloading aarch64 wheels"
"$build/pip/bin/pip" download -q --no-deps --require-hashes "${platforms[@]}" -r "$here/requirements.txt" \
  -d "$cache/wheels"
# A venv made inside the root (its python is aarch64), filled by the host's pip: unpacking 600 MB of wheels
# natively takes seconds, under emulation minutes. Byte code is the same on both architectures.
chroot "$build/root" python3 -m venv --without-pip /opt/venv
site="$build/root/opt/venv/lib/python3.11/site-packages"
wheels=()
while read -r name version; do
  wheels+=("$cache/wheels/$(cd "$cache/wheels" && ls | grep -i "^${name//-/[-_]}-${version}-" | head -n 1)")
done < <(sed -n 's/^\([^#= ]*\)==\([^ ]*\) .*/\1 \2/p' "$here/requirements.txt")
log "installing ${#wheels[@]} wheels into the root"
"$build/pip/bin/pip" install -q --no-deps --no-index "${platforms[@]}" --target "$site" "${wheels[@]}"
mkdir -p "$build/root/src" "$build/root/work"  # run.sh mounts the working tree and the test's folder here

chroot "$build/root" /opt/venv/bin/python -c 'import platform, torch; print(platform.machine(), torch.__version__)' \
  > "$build/root/.reprolora-arm64-complete"
rm -rf "$root"
mv "$build/root" "$root"
# Roots of other keys are stale (another script or wheel list): drop them, the disk is not free.
find "$cache" -maxdepth 1 -name 'root-*' ! -name "root-$key" -exec rm -rf {} +
log "built $root ($(cat "$complete")) in $((SECONDS - started)) s"
echo "$root"
