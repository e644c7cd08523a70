# The library and its CLI `reprolora`, built from python/ against the pinned nixpkgs' Python packages. Called with
# python3Packages.callPackage, as nixpkgs calls a Python package.
{
  lib,
  buildPythonPackage,
  setuptools,
  numpy,
  peft,
  safetensors,
  torch,
  tqdm,
  transformers,
  gguf,
  cryptography,
}:

let
  pyproject = builtins.fromTOML (builtins.readFile ../python/pyproject.toml);
in
buildPythonPackage {
  pname = "reprolora";
  inherit (pyproject.project) version;
  pyproject = true;

  # The library's tree and its build configuration only: editing a test, a benchmark or the README rebuilds
  # nothing (nor retrains the adapter, which depends on this package).
  src = lib.fileset.toSource {
    root = ../python;
    fileset = lib.fileset.unions [
      ../python/reprolora
      ../python/pyproject.toml
    ];
  };

  build-system = [ setuptools ];

  # Keep in step with [project].dependencies in python/pyproject.toml. nixpkgs checks at build time that the
  # versions it has satisfy the ranges declared there, so those lower bounds must admit this pin's versions.
  dependencies = [
    numpy
    peft
    safetensors
    torch
    tqdm
    transformers
  ];

  # The extras of python/pyproject.toml that have a use in Nix. gguf (the base model's conversion, pkgs/base-model.nix)
  # is an extra, not a dependency, so that it stays out of the adapter's, the infer wrapper's and the image's
  # runtime closures.
  optional-dependencies = {
    gguf = [ gguf ];
    sign = [ cryptography ];
  };

  # The test suite lives outside python/ (tests/ at the repository root): the `pytest` check in pkgs/checks.nix
  # runs it against this package.
  doCheck = false;
  pythonImportsCheck = [ "reprolora" ];

  meta = {
    description = "LoRA fine-tuning on CPU whose adapter is bit-identical wherever it is rebuilt";
    license = lib.licenses.asl20;
    mainProgram = "reprolora";
  };
}
