# `nix run .#infer -- "prompt"`: the library's greedy inference, with the base model and the adapter baked in.
# Other arguments are passed on: `--check` replays the golden probes kept in the adapter's manifest, `--json`
# prints JSON. `serve [OPTIONS]` runs the HTTP server instead (on all interfaces, port 8000, as a container needs).
{
  lib,
  writeShellApplication,
  runtime,
  baseModel,
  adapter,
}:

writeShellApplication {
  name = "reprolora-infer";
  meta = {
    description = "Greedy answers from a reprolora adapter and its base model, baked in; --check replays the golden probes";
    license = lib.licenses.asl20;
    mainProgram = "reprolora-infer";
  };
  text = ''
    # The store is read-only and a container may have no HOME: caches go to a temp dir unless one is set.
    export XDG_CACHE_HOME="''${XDG_CACHE_HOME:-''${TMPDIR:-/tmp}/reprolora-cache}"
    export PYTHONDONTWRITEBYTECODE=1
    if [ "''${1:-}" = serve ]; then
      shift
      exec ${lib.getExe runtime} serve ${adapter} --base-model ${baseModel} --host 0.0.0.0 --port 8000 "$@"
    fi
    exec ${lib.getExe runtime} infer ${adapter} --base-model ${baseModel} "$@"
  '';
}
