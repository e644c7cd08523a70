# `nix build .#image`: an OCI image whose entrypoint is an infer wrapper built for this image's own adapter and
# base model, so that what it serves, what `--check` replays and what its labels name are always the same
# adapter, overrides included:
#   image.override { adapter = my-adapter; baseModel = ./my-hf-folder; }
#   docker load < result && docker run --rm reprolora-infer:<version> "prompt"
# buildLayeredImage writes a fixed `created` date and fixed file times, so the archive is bit-reproducible.
# Its contents are the wrapper's closure (Python, the libraries, the base model, the adapter) and an empty
# /tmp: no package manager, no coreutils; the only shell is the bash the wrappers need.
{
  lib,
  stdenv,
  dockerTools,
  reprolora,
  adapter,
  baseModel,
  infer,
  revision,
  # The repository's URL, for the org.opencontainers.image.source label; null leaves that label out.
  sourceUrl ? null,
  # The flake's default adapter: the one whose bytes expected/ records.
  defaultAdapter ? adapter,
  # The sha256 of the adapter's adapter_model.safetensors, for a label. Reading it from the built adapter would
  # need import-from-derivation, so for the default adapter it is taken from the hashes committed in expected/
  # (what CI checks the adapter against); another adapter has no label unless its sha256 is given here. The image
  # build fails if the adapter it ships has other bytes than the label says. The adapter's store path is
  # labelled either way.
  adapterSha256 ?
    let
      expected = ../expected + "/adapter-${stdenv.hostPlatform.system}.sha256";
      # The line `<sha256>  adapter_model.safetensors`, as sha256sum writes it.
      weights = builtins.filter (line: builtins.match "[0-9a-f]{64}  adapter_model[.]safetensors" line != null) (
        builtins.filter builtins.isString (builtins.split "\n" (builtins.readFile expected))
      );
    in
    if adapter.outPath == defaultAdapter.outPath && builtins.pathExists expected && weights != [ ] then
      builtins.substring 0 64 (builtins.head weights)
    else
      null,
}:

let
  # The wrapper the image runs: this image's adapter and base model, not the flake's defaults.
  server = infer.override { inherit adapter baseModel; };
in
lib.addMetaAttrs
  {
    description = "OCI image serving a reprolora adapter (greedy inference, HTTP server, golden-probe check)";
    license = lib.licenses.asl20;
  }
  (
    dockerTools.buildLayeredImage {
      name = "reprolora-infer";
      tag = reprolora.version;
      created = "1970-01-01T00:00:01Z";

      extraCommands = ''
        mkdir -m 1777 tmp
      ''
      + lib.optionalString (adapterSha256 != null) ''
        # The label promises these bytes: fail rather than ship an image whose label lies.
        echo "${adapterSha256}  ${adapter}/adapter_model.safetensors" | sha256sum -c
      '';

      config = {
        Entrypoint = [ (lib.getExe server) ];
        User = "65534:65534"; # nobody: the image needs no root
        WorkingDir = "/tmp";
        Env = [ "HOME=/tmp" ];
        ExposedPorts."8000/tcp" = { }; # `docker run -p 8000:8000 IMAGE serve`
        Labels = {
          "org.opencontainers.image.title" = "reprolora-infer";
          "org.opencontainers.image.description" = "Greedy inference with a reprolora LoRA adapter";
          "org.opencontainers.image.version" = reprolora.version;
          "org.opencontainers.image.revision" = revision;
          "org.reprolora.adapter.store-path" = "${adapter}";
          "org.reprolora.base-model.store-path" = "${baseModel}";
        }
        // lib.optionalAttrs (sourceUrl != null) { "org.opencontainers.image.source" = sourceUrl; }
        // lib.optionalAttrs (adapterSha256 != null) { "org.reprolora.adapter.sha256" = adapterSha256; };
      };
    }
  )
