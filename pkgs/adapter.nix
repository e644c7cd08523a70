# The trained LoRA adapter: result/ holds adapter_model.safetensors, adapter_config.json and manifest.json.
# It runs in the sandbox (no network, no HOME) and its output depends only on these inputs, so
# `nix build .#adapter --rebuild` gives the same bytes. Another job is a one-line override:
#   adapter.override { dataset = ./my.jsonl; trainConfig = ./my.toml; baseModel = ./my-hf-folder; }
{
  lib,
  runCommand,
  runtimeShell,
  reprolora,
  baseModel,
  dataset,
  # A TOML file naming what differs from the library's defaults; null for the defaults themselves.
  trainConfig ? ./adapter.toml,
}:

runCommand "reprolora-adapter"
  {
    nativeBuildInputs = [ reprolora ];
    inherit baseModel dataset trainConfig;
    passthru = { inherit baseModel dataset trainConfig; };
    meta = {
      description = "LoRA adapter trained by reprolora: adapter_model.safetensors, adapter_config.json, manifest.json";
      license = lib.licenses.asl20;
    };
  }
  ''
    ${runtimeShell} ${./build-step.sh} adapter
  ''
