#!/bin/sh
# Compare a built adapter folder with the hashes committed for its system.
#
#   sh .github/scripts/check-adapter-hashes.sh RESULT_DIR expected/adapter-<system>.sha256
#
# The committed file is the single source of truth: `sha256sum` lines of every file in the folder, names
# sorted. Any difference (a hash, a missing or an extra file) fails. Where no file is committed yet, this
# prints what it should hold and fails: commit that output, from a real `nix build .#adapter` on that system.
set -eu

result=$1
expected=$2

actual=$(cd "$result" && LC_ALL=C sha256sum -- *)

if [ ! -f "$expected" ]; then
  echo "::error::$expected is missing. A real build on this system gave the lines below; commit them as $expected:"
  printf '%s\n' "$actual"
  exit 1
fi

if [ "$actual" != "$(cat "$expected")" ]; then
  echo "::error::the adapter differs from $expected (expected: -, built: +):"
  printf '%s\n' "$actual" | diff -u "$expected" - || true
  exit 1
fi

echo "adapter matches $expected:"
printf '%s\n' "$actual"
