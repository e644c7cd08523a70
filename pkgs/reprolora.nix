# The library and its CLI `reprolora`, built from ./python against the pinned nixpkgs' Python packages.
{ python3Packages }:

let
  pyproject = builtins.fromTOML (builtins.readFile ../python/pyproject.toml);
in
python3Packages.buildPythonPackage {
  pname = "reprolora";
  inherit (pyproject.project) version;
  pyproject = true;

  src = ../python;

  build-system = [ python3Packages.setuptools ];

  # Keep in step with [project].dependencies in python/pyproject.toml. nixpkgs checks at build time that the
  # versions it has satisfy the ranges declared there, so those lower bounds must admit this pin's versions.
  dependencies = with python3Packages; [
    gguf
    numpy
    peft
    safetensors
    torch
    tqdm
    transformers
  ];

  # The test suite lives outside ./python (tests/ at the repository root): the `pytest` check in
  # pkgs/checks.nix runs it against this package.
  doCheck = false;
  pythonImportsCheck = [ "reprolora" ];

  meta = {
    description = "LoRA fine-tuning on CPU whose adapter is bit-identical wherever it is rebuilt";
    mainProgram = "reprolora";
  };
}
