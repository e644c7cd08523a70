#!/bin/sh
# Compare a built adapter folder with the hashes committed for its system.
#
#   sh .github/scripts/check-adapter-hashes.sh RESULT_DIR expected/adapter-<system>.sha256 [OUT_DIR]
#
# The committed file is the single source of truth for the files whose bytes the job alone decides: `sha256sum`
# lines, names sorted (under the `reference` profile, adapter_model.safetensors). Each must match the build's,
# bit for bit. The folder's other files record where and with what it was built (manifest.json, the card
# README.md made from it, adapter_config.json with the fields of peft's version): `nix build --rebuild` compares
# those, here they need only be there. Anything else in the folder, or a committed file missing from it, fails.
# Where no file is committed yet (a new system or a new nixpkgs pin), this is not a failure: it prints a warning
# annotation with the lines of every file, writes them to OUT_DIR/<name of the expected file> for CI to upload,
# and exits 0.
set -eu

result=$1
expected=$2
out_dir=${3:-}
records="README.md adapter_config.json manifest.json"

actual=$(cd "$result" && LC_ALL=C sha256sum -- *)

if [ ! -f "$expected" ]; then
  echo "::warning::$expected is not committed yet. A real build on this system gave the lines below; review them and commit the ones the job decides as $expected."
  printf '%s\n' "$actual"
  if [ -n "$out_dir" ]; then
    mkdir -p "$out_dir"
    printf '%s\n' "$actual" > "$out_dir/$(basename "$expected")"
  fi
  exit 0
fi

failed=0
for name in $(cd "$result" && ls); do
  case " $records " in *" $name "*) continue ;; esac
  grep -q "  $name\$" "$expected" || { echo "::error::$result/$name is neither committed in $expected nor one of: $records"; failed=1; }
done
built=$(printf '%s\n' "$actual" | while read -r sum name; do
  if grep -q "  $name\$" "$expected"; then printf '%s  %s\n' "$sum" "$name"; fi
done)
if [ "$built" != "$(cat "$expected")" ]; then
  echo "::error::the adapter differs from $expected (expected: -, built: +):"
  printf '%s\n' "$built" | diff -u "$expected" - || true
  failed=1
fi
[ "$failed" = 0 ] || exit 1

echo "adapter matches $expected:"
printf '%s\n' "$built"
