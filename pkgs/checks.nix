# `nix flake check`: the fast test suite against the Nix-built library, the adapter built twice and compared, and
# the infer wrapper run once. Each check is a sandboxed build like any other.
{
  lib,
  runCommand,
  python3Packages,
  reprolora,
  adapter,
  infer,
  # What the pytest check runs: the fast tests, all of them.
  pytestArgs ? [
    "-m"
    "not slow and not nix and not arm64"
    "tests"
  ],
}:

{
  # The fast tests. Not the slow ones (they fetch the real model) nor the `nix` ones (they drive Nix, git and
  # namespaces from outside, as CI does). The source holds only what the tests read (python/benchmarks, the
  # pyproject and the pip lock, tests/, pytest.ini), not the library's sources, so that what they import is the
  # library as Nix built it; and only a change to those files or to the library reruns this check. The
  # environment holds the library, its extras and what the tests import, nothing else (python.withPackages).
  pytest =
    let
      src = lib.fileset.toSource {
        root = ../.;
        fileset = lib.fileset.unions [
          ../python/benchmarks
          ../python/pyproject.toml
          ../python/requirements.lock
          ../tests
          ../pytest.ini
        ];
      };
      python = python3Packages.python.withPackages (
        ps:
        [
          reprolora
          ps.pytest
          ps.openai # the official client against `serve` (tests/test_chat.py)
        ]
        # gguf: `export-gguf` (tests/test_merge.py); cryptography: attestation signatures (tests/test_publish.py)
        ++ lib.concatLists (lib.attrValues reprolora.optional-dependencies)
      );
    in
    runCommand "reprolora-pytest" { nativeBuildInputs = [ python ]; } ''
      cp -r ${src} source
      chmod -R u+w source
      cd source
      export HOME="$TMPDIR/home" XDG_CACHE_HOME="$TMPDIR/cache" MPLCONFIGDIR="$TMPDIR/cache/matplotlib"
      export PYTHONDONTWRITEBYTECODE=1
      python -c 'import os, reprolora; path = os.path.realpath(reprolora.__file__); assert path.startswith("${reprolora}/"), path'
      # The result is pytest's report.
      python -m pytest -p no:cacheprovider ${lib.escapeShellArgs pytestArgs} > $out 2>&1 || { cat $out; exit 1; }
      cat $out
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
