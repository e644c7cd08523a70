# `nix run .#infer -- "prompt"`: the library's greedy inference, with the base model and the adapter baked in.
# Other arguments are passed on: `--check` replays the golden probes kept in the adapter's manifest, `--json`
# prints JSON.
{
  writeShellApplication,
  reprolora,
  baseModel,
  adapter,
}:

writeShellApplication {
  name = "reprolora-infer";
  runtimeInputs = [ reprolora ];
  text = ''
    # The store is read-only and a container may have no HOME: caches go to a temp dir unless one is set.
    export XDG_CACHE_HOME="''${XDG_CACHE_HOME:-''${TMPDIR:-/tmp}/reprolora-cache}"
    export PYTHONDONTWRITEBYTECODE=1
    exec reprolora infer ${adapter} --base-model ${baseModel} "$@"
  '';
}
