# The library and its CLI `reprolora`, built from ./python against the pinned nixpkgs' Python packages.
{ lib, python3Packages }:

let
  pyproject = builtins.fromTOML (builtins.readFile ../python/pyproject.toml);

  # Keep in step with [project].dependencies in python/pyproject.toml. nixpkgs checks at build time that the
  # versions it has satisfy the ranges declared there, so those lower bounds must admit this pin's versions.
  # gguf, the `gguf` extra, is not here: only pkgs/base-model.nix converts a GGUF file, and nixpkgs' gguf pulls in
  # Qt, which the infer wrapper and the image must not carry.
  dependencies = with python3Packages; [
    numpy
    peft
    safetensors
    torch
    tqdm
    transformers
  ];
in
python3Packages.buildPythonPackage {
  pname = "reprolora";
  inherit (pyproject.project) version;
  pyproject = true;

  src = ../python;

  build-system = [ python3Packages.setuptools ];

  inherit dependencies;

  # The test suite lives outside ./python (tests/ at the repository root): the `pytest` check in
  # pkgs/checks.nix runs it against this package.
  doCheck = false;
  pythonImportsCheck = [ "reprolora" ];

  # For environments that add to the library's own dependencies (the dev shell, the base model's converter).
  passthru = { inherit dependencies; };

  meta = {
    description = "LoRA fine-tuning on CPU whose adapter is bit-identical wherever it is rebuilt";
    license = lib.licenses.asl20;
    mainProgram = "reprolora";
  };
}
