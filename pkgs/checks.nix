# `nix flake check`: the test suite against the Nix-built library, the adapter built twice and compared, and
# the infer wrapper run once. Each check is a sandboxed build like any other.
{
  lib,
  runCommand,
  python3Packages,
  reprolora,
  adapter,
  infer,
  src,
  # What the pytest check runs: the fast tests.
  pytestArgs ? [
    "-m"
    "not slow and not nix"
    "tests"
  ],
}:

{
  # The fast tests. Not the slow ones (they fetch the real model) nor the `nix` ones (they drive Nix, git and
  # namespaces from outside, as CI does). tests/ runs from a copy that has no python/ folder, so what they
  # import is the library as Nix built it, not its sources.
  pytest =
    runCommand "reprolora-pytest"
      {
        nativeBuildInputs = [
          (python3Packages.python.withPackages (_: [
            reprolora
            python3Packages.pytest
            python3Packages.cryptography # attestation signatures (tests/test_publish.py)
            python3Packages.openai # the official client against `serve` (tests/test_chat.py)
          ]))
        ];
      }
      ''
        cp -r ${src} source
        chmod -R u+w source
        rm -r source/python
        cd source
        export HOME="$TMPDIR/home" XDG_CACHE_HOME="$TMPDIR/cache" MPLCONFIGDIR="$TMPDIR/cache/matplotlib"
        export PYTHONDONTWRITEBYTECODE=1
        python -c 'import os, reprolora; path = os.path.realpath(reprolora.__file__); assert path.startswith("${reprolora}/"), path'
        python -m pytest -p no:cacheprovider ${lib.escapeShellArgs pytestArgs}
        touch $out
      '';

  # A second, independent derivation (another name, so another store path) trains the same adapter again;
  # every file must be byte for byte the same as the first build's.
  adapter-reproducible =
    let
      secondBuild = adapter.overrideAttrs { name = "reprolora-adapter-second-build"; };
    in
    runCommand "reprolora-adapter-reproducible" { } ''
      diff -r ${adapter} ${secondBuild}
      (cd ${adapter} && sha256sum *) > $out
      cat $out
    '';

  # The infer app answers once and replays the golden probes of the manifest.
  infer-runs = runCommand "reprolora-infer-runs" { nativeBuildInputs = [ infer ]; } ''
    export HOME="$TMPDIR"
    reprolora-infer "Why pin a toolchain?" > $out
    reprolora-infer --check >> $out
    cat $out
  '';
}
