# The package set: what the flake's outputs use, each a stand-in that builds and says what it does not do. Its
# python3Packages are this machine's Python and its installed modules. Host paths reach the sandbox through
# nix.conf's sandbox-paths: /bin/sh and /bin/busybox (busybox-static), the Python prefixes (which hold /usr, and
# so bash) and the system libraries.
{
  lib,
  host,
  system,
}:

let
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
          "meta"
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
      meta = env.meta or { };
      overrideAttrs = attrs: runCommand (attrs.name or name) (env // builtins.removeAttrs attrs [ "name" ]) buildCommand;
    };

  interpreter = host.python;

  buildTool = name: runCommand name { } "mkdir -p $out/bin";

  # A distribution installed in the host Python, by its normalized name: what host.nix read of its metadata (its
  # top-level files and the dependencies it declares) decides what an environment of it holds.
  hostPackage =
    name:
    let
      distribution =
        host.distributions.${name}
          or (throw "nixpkgs-shim: ${name} is not installed in the Python running the tests (${interpreter})");
    in
    {
      pname = name;
      inherit (distribution) version;
      hostDistribution = name;
    };

  # The host distributions an environment of these packages holds: theirs and their dependencies', transitively,
  # as their metadata declares them (what nixpkgs' dependencies propagate), and nothing else.
  hostClosure =
    packages:
    let
      direct = lib.concatMap (
        p: if p ? hostDistribution then [ p.hostDistribution ] else hostClosure p.dependencies
      ) packages;
    in
    map (item: item.key) (
      builtins.genericClosure {
        startSet = map (key: { inherit key; }) direct;
        operator = item: map (key: { inherit key; }) host.distributions.${item.key}.dependencies;
      }
    );

  builtPackages = packages: builtins.filter (p: p ? outPath) packages;

  # Shell lines that make "$1" (a folder) a Python environment of just these packages, as nixpkgs'
  # python.withPackages makes one: a virtual environment of the host's base interpreter (no system site-packages)
  # whose site-packages links the top-level files of each distribution of hostClosure, and the site-packages of
  # each package built here. A module of any other distribution does not import.
  makeEnvironment =
    packages:
    let
      files = lib.concatMap (name: host.distributions.${name}.files) (hostClosure packages);
    in
    ''
      make_environment() {
        site="$1/${host.sitePackages}"
        mkdir -p "$1/bin" "$site"
        printf 'home = %s\ninclude-system-site-packages = false\nversion = %s\n' \
          ${dirOf host.basePython} ${host.pythonVersion} > "$1/pyvenv.cfg"
        ln -s ${host.basePython} "$1/bin/python"
        ln -s python "$1/bin/python3"
        for file in ${toString files}; do
          [ -e "$site/''${file##*/}" ] || ln -s "$file" "$site/"
        done
        for package in ${toString (builtPackages packages)}; do
          for entry in "$package/${host.sitePackages}"/*; do
            [ -e "$site/''${entry##*/}" ] || ln -s "$entry" "$site/"
          done
        done
      }
    '';

  # Like nixpkgs' buildPythonPackage: builds and installs the package from its source, offline, into $out, and
  # wraps its scripts so that they run in an environment of the package and its dependencies only (in
  # $out/.environment); pythonImportsCheck's modules must import there, from $out. As in nixpkgs, the result
  # exposes dependencies, optional-dependencies and build-system.
  buildPythonPackage =
    {
      pname,
      version,
      src,
      build-system ? [ ],
      dependencies ? [ ],
      optional-dependencies ? { },
      pythonImportsCheck ? [ ],
      passthru ? { },
      meta ? { },
      ...
    }:
    runCommand "python-${pname}-${version}"
      {
        # The host toolchain is not in the store: its fingerprint stands for it, so that another toolchain
        # gives another derivation.
        hostToolchain = host.fingerprint;
        passthru = passthru // {
          inherit
            pname
            version
            dependencies
            optional-dependencies
            build-system
            ;
        };
        inherit meta;
      }
      ''
        export HOME=$TMPDIR PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
        cp -r ${src} source
        chmod -R u+w source
        ${interpreter} -m pip install --no-deps --no-build-isolation --no-index --no-cache-dir \
          --no-compile --ignore-installed --prefix $out ./source
        ${makeEnvironment dependencies}
        make_environment $out/.environment
        for entry in $out/${host.sitePackages}/*; do ln -s "$entry" "$out/.environment/${host.sitePackages}/"; done
        for script in $out/bin/*; do
          wrapped=$out/bin/.$(basename $script)-wrapped
          mv $script $wrapped
          cat > $script <<WRAPPER
        #!/bin/sh
        exec $out/.environment/bin/python $wrapped "\$@"
        WRAPPER
          chmod +x $script
        done
        for module in ${toString pythonImportsCheck}; do
          $out/.environment/bin/python -c "import os, $module
        assert $module.__file__.startswith(os.environ['out'] + '/'), $module.__file__"
        done
      '';

  # Like nixpkgs' python.withPackages: bin/python sees the chosen packages and their dependencies, nothing else
  # (makeEnvironment), and bin/ holds the built packages' programs, run by that bin/python. (The host
  # distributions' own programs, such as bin/pytest, are not linked: use python -m.)
  withPackages =
    choose:
    let
      chosen = choose python3Packages;
    in
    runCommand "python3-env"
      {
        hostToolchain = host.fingerprint;
        meta.mainProgram = "python";
      }
      ''
        ${makeEnvironment chosen}
        make_environment $out
        for package in ${toString (builtPackages chosen)}; do
          for program in $package/bin/*; do
            [ -e "$program" ] || continue
            name=$(basename $program)
            printf '#!/bin/sh\nexec %s %s "$@"\n' "$out/bin/python" "$package/bin/.$name-wrapped" > $out/bin/$name
            chmod +x $out/bin/$name
          done
        done
      '';

  python3Packages = {
    inherit buildPythonPackage;
    # Like nixpkgs' python3Packages.callPackage: a package file's arguments come from the Python package set,
    # then from the whole package set.
    callPackage = lib.callPackageWith (packageSet // python3Packages);
    python = {
      inherit interpreter withPackages;
      inherit (host) sitePackages;
      version = host.pythonVersion;
      # The base interpreter's prefix, outside the store: `${python}/bin` names its bin/.
      outPath = dirOf (dirOf host.basePython);
    };
    # Like nixpkgs': the Python packages these need, themselves included; here the ones built in the store.
    requiredPythonModules = packages: builtPackages (packages ++ lib.concatMap (p: p.dependencies or [ ]) packages);
  }
  // lib.genAttrs [
    "cryptography"
    "gguf"
    "numpy"
    "openai"
    "peft"
    "pytest"
    "safetensors"
    "setuptools"
    "torch"
    "tqdm"
    "transformers"
  ] hostPackage;

  # Like nixpkgs' writeShellApplication, without its shellcheck pass, and with busybox sh for bash.
  writeShellApplication =
    {
      name,
      text,
      runtimeInputs ? [ ],
      meta ? { },
      ...
    }:
    runCommand name { meta = { mainProgram = name; } // meta; } ''
      mkdir -p $out/bin
      cat > $out/bin/${name} <<'SCRIPT'
      #!${busybox} sh
      set -o errexit -o nounset -o pipefail
      export PATH="${lib.makeBinPath runtimeInputs}:$PATH"
      ${text}
      SCRIPT
      chmod +x $out/bin/${name}
    '';
  packageSet = {
    inherit lib runCommand writeShellApplication python3Packages;
    runtimeShell = shell;
    # Like nixpkgs' removeReferencesTo: `remove-references-to -t PATH... FILE...` overwrites each store path's
    # hash in the files with e's (the files keep their length).
    removeReferencesTo = runCommand "remove-references-to" { } ''
      mkdir -p $out/bin
      cat > $out/bin/remove-references-to <<'SCRIPT'
      #!/bin/sh
      set -eu
      expressions=""
      while [ "''${1:-}" = -t ]; do
        hash=$(basename "$2" | cut -c1-32)
        expressions="$expressions -e s|$NIX_STORE/$hash|$NIX_STORE/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee|g"
        shift 2
      done
      for file in "$@"; do sed -i $expressions "$file"; done
      SCRIPT
      chmod +x $out/bin/remove-references-to
    '';

    # Stand-ins for the build tools pkgs/runtime.nix keeps out of the infer closure: empty, but store paths, so
    # that a reference to one fails the build as in nixpkgs.
    binutils = buildTool "binutils-wrapper-2.44" // {
      bintools = buildTool "binutils-2.44";
    };

    # Like nixpkgs' newScope, for lib.makeScope: callPackage with these extra arguments.
    newScope = extra: lib.callPackageWith (packageSet // extra);

    # Only local copies of known files: the sandbox has no network, and neither has this machine for nixpkgs.
    # Another file evaluates (as nixpkgs' fetchurl does) and fails to build, naming what is missing.
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
        derivation {
          name = baseNameOf url;
          inherit system;
          builder = shell;
          args = [
            "-c"
            "echo 'nixpkgs-shim: no local copy of ${url} (${hash}) in host.nix' >&2; exit 1"
          ];
          outputHashMode = "flat";
          outputHash = hash;
        };

    # What pkgs/image.nix and pkgs/runtime.nix read of it: the platform, and the compiler as a stand-in.
    stdenv = {
      hostPlatform = { inherit system; };
      cc = buildTool "gcc-wrapper-14.3.0" // {
        cc = buildTool "gcc-14.3.0";
      };
    };

    # Like nixpkgs' mkShell, for `nix develop`: its environment is `packages`' bin/ on PATH (no stdenv, so no
    # compilers and no setup hooks), and `shellHook`. `nix develop` wants a builder named bash: the host's.
    mkShell =
      {
        name ? "nix-shell",
        packages ? [ ],
        shellHook ? "",
        ...
      }:
      derivation {
        inherit name system shellHook;
        # `nix develop` writes the environment to each of $outputs, which a plain derivation does not set.
        outputs = [ "out" ];
        builder = host.bash;
        args = [
          "-c"
          ''echo "a development environment: enter it with nix develop" > $out''
        ];
        PATH = lib.makeBinPath (packages ++ [ busyboxApplets ]);
      };

    # nixpkgs' nixfmt-tree runs treefmt with nixfmt. No Nix formatter installs on this machine, so this stand-in
    # formats nothing: `nix fmt` runs it, and it checks that every .nix file git tracks parses, saying so.
    nixfmt-tree = runCommand "nixfmt-tree-stand-in" { meta.mainProgram = "treefmt"; } ''
      mkdir -p $out/bin
      cat > $out/bin/treefmt <<'SCRIPT'
      #!/bin/sh
      echo "nixpkgs-shim: formats nothing (no Nix formatter here); checking that every tracked .nix file parses" >&2
      status=0
      for file in $(git ls-files '*.nix'); do nix-instantiate --parse "$file" > /dev/null || status=1; done
      exit $status
      SCRIPT
      chmod +x $out/bin/treefmt
    '';

    # Like nixpkgs' dockerTools.buildLayeredImage: a docker-archive of the closure of what `config` names, plus
    # what `extraCommands` writes at the image's root, with the config's entrypoint, user, environment and labels,
    # fixed file times (`created`) and owners, so it is bit-reproducible and `podman load`/`docker load` take it.
    # What it does not do: several layers (it writes one), `contents` (not linked into /), gzip (the tarball is
    # plain: podman loads no gzipped docker-archive). The host toolchain lives outside the store, so a container
    # from this image runs only with the host paths the shim's sandbox uses mounted in (tests/test_nix_image.py).
    dockerTools.buildLayeredImage =
      {
        name,
        tag ? "latest",
        created ? "1970-01-01T00:00:01Z",
        config ? { },
        contents ? [ ],
        extraCommands ? "",
        meta ? { },
        ...
      }:
      assert contents == [ ] || throw "nixpkgs-shim: its buildLayeredImage stand-in does not take contents";
      let
        # The store paths `config` names are this file's references, so its closure is the image's.
        configFile = runCommand "${name}-config.json" { json = builtins.toJSON config; } ''
          printf '%s' "$json" > $out
        '';
      in
      runCommand "${name}.tar"
        {
          exportReferencesGraph = [
            "closure"
            configFile
          ];
          passthru = {
            imageName = name;
            imageTag = tag;
          };
          inherit meta;
        }
        ''
          mkdir root
          (cd root && ${extraCommands})
          ${interpreter} ${./docker-archive.py} --name ${name} --tag ${tag} --created ${created} \
            --system ${system} --config ${configFile} --closure closure --root root --out $out
        '';
  };
in
packageSet
