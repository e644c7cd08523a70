# The package set: runCommand, writeShellApplication, fetchurl and a python3Packages whose packages are this machine's Python and
# its installed modules. Host paths reach the sandbox through nix.conf's sandbox-paths: /bin/sh and
# /bin/busybox (busybox-static), the Python prefixes and the system libraries.
{ lib, host }:

let
  inherit (host) system;
  busybox = "/bin/busybox";
  shell = "/bin/sh";

  # coreutils and friends, as busybox applets.
  busyboxApplets = derivation {
    name = "busybox-applets";
    inherit system;
    builder = busybox;
    args = [
      "sh"
      "-c"
      ''
        ${busybox} mkdir -p $out/bin
        for applet in $(${busybox} --list); do ${busybox} ln -s ${busybox} $out/bin/$applet; done
      ''
    ];
  };

  # Like nixpkgs' runCommand: the command runs in the sandbox with its inputs' bin/ on PATH. Its
  # overrideAttrs takes an attribute set (the form pkgs/checks.nix uses): the same command, those attributes
  # (name included) replaced.
  runCommand =
    name: env: buildCommand:
    let
      drv = derivation (
        builtins.removeAttrs env [
          "nativeBuildInputs"
          "passthru"
        ]
        // {
          inherit name system buildCommand;
          builder = shell;
          args = [
            "-c"
            ''set -e; eval "$buildCommand"''
          ];
          PATH = lib.makeBinPath ([ busyboxApplets ] ++ (env.nativeBuildInputs or [ ]));
        }
      );
    in
    drv
    // (env.passthru or { })
    // {
      overrideAttrs = attrs: runCommand (attrs.name or name) (env // builtins.removeAttrs attrs [ "name" ]) buildCommand;
    };

  python = {
    interpreter = host.python;
    inherit (host) sitePackages;
  };

  # A module installed in the host Python. Packages that depend on it check that it imports.
  hostModule = module: { inherit module; };

  # Like nixpkgs' buildPythonPackage: builds and installs the package from its source, offline, into $out,
  # wraps its scripts so they find it, and checks that pythonImportsCheck's modules import from $out.
  buildPythonPackage =
    {
      pname,
      version,
      src,
      build-system ? [ ],
      dependencies ? [ ],
      pythonImportsCheck ? [ ],
      meta ? { },
      ...
    }:
    runCommand "python-${pname}-${version}"
      {
        # The host toolchain is not in the store: its fingerprint stands for it, so that another toolchain
        # gives another derivation.
        hostToolchain = host.fingerprint;
        passthru = { inherit pname version meta; };
      }
      ''
        export HOME=$TMPDIR PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
        ${python.interpreter} -c 'import ${
          builtins.concatStringsSep ", " (map (dep: dep.module) (build-system ++ dependencies))
        }'
        cp -r ${src} source
        chmod -R u+w source
        ${python.interpreter} -m pip install --no-deps --no-build-isolation --no-index --no-cache-dir \
          --no-compile --ignore-installed --prefix $out ./source
        site=$out/${python.sitePackages}
        for script in $out/bin/*; do
          wrapped=$out/bin/.$(basename $script)-wrapped
          mv $script $wrapped
          cat > $script <<WRAPPER
        #!/bin/sh
        export PYTHONPATH="$site\''${PYTHONPATH:+:\$PYTHONPATH}"
        exec ${python.interpreter} $wrapped "\$@"
        WRAPPER
          chmod +x $script
        done
        for module in ${toString pythonImportsCheck}; do
          PYTHONPATH=$site ${python.interpreter} -c "import os, $module
        assert $module.__file__.startswith(os.environ['out'] + '/'), $module.__file__"
        done
      '';
in
{
  inherit lib runCommand;
  runtimeShell = shell;

  # Like nixpkgs' writeShellApplication, without its shellcheck pass, and with busybox sh for bash.
  writeShellApplication =
    {
      name,
      text,
      runtimeInputs ? [ ],
      ...
    }:
    runCommand name { passthru.meta.mainProgram = name; } ''
      mkdir -p $out/bin
      cat > $out/bin/${name} <<'SCRIPT'
      #!${busybox} sh
      set -o errexit -o nounset -o pipefail
      export PATH="${lib.makeBinPath runtimeInputs}:$PATH"
      ${text}
      SCRIPT
      chmod +x $out/bin/${name}
    '';

  # Only local copies of known files: the sandbox has no network, and neither has this machine for nixpkgs.
  fetchurl =
    { url, hash }:
    if host.files ? ${hash} then
      builtins.path {
        path = host.files.${hash};
        name = baseNameOf url;
        sha256 = hash;
        recursive = false;
      }
    else
      throw "nixpkgs-shim: no local copy of ${url} (${hash}) in host.nix";

  python3Packages = {
    inherit python buildPythonPackage;
    setuptools = hostModule "setuptools";
    gguf = hostModule "gguf";
    numpy = hostModule "numpy";
    peft = hostModule "peft";
    safetensors = hostModule "safetensors";
    torch = hostModule "torch";
    tqdm = hostModule "tqdm";
    transformers = hostModule "transformers";
  };
}
