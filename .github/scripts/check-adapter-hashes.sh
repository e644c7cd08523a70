#!/bin/sh
# Compare a built adapter folder with the hashes committed for its system.
#
#   sh .github/scripts/check-adapter-hashes.sh RESULT_DIR expected/adapter-<system>.sha256 [OUT_DIR]
#
# The committed file is the single source of truth: `sha256sum` lines of every file in the folder, names
# sorted. Any difference (a hash, a missing or an extra file) fails. Where no file is committed yet (the first
# run on a new system or a new nixpkgs pin), this is not a failure: it prints a warning annotation with what the
# file should hold, writes those lines to OUT_DIR/<name of the expected file> for CI to upload, and exits 0.
# Commit them once reviewed, from a real `nix build .#adapter` on that system.
set -eu

result=$1
expected=$2
out_dir=${3:-}

actual=$(cd "$result" && LC_ALL=C sha256sum -- *)

if [ ! -f "$expected" ]; then
  echo "::warning::$expected is not committed yet. A real build on this system gave the lines below; review them and commit them as $expected."
  printf '%s\n' "$actual"
  if [ -n "$out_dir" ]; then
    mkdir -p "$out_dir"
    printf '%s\n' "$actual" > "$out_dir/$(basename "$expected")"
  fi
  exit 0
fi

if [ "$actual" != "$(cat "$expected")" ]; then
  echo "::error::the adapter differs from $expected (expected: -, built: +):"
  printf '%s\n' "$actual" | diff -u "$expected" - || true
  exit 1
fi

echo "adapter matches $expected:"
printf '%s\n' "$actual"
