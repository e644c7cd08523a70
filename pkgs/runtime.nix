# What the infer wrapper and the image run: the library's Python environment (python.withPackages of the library
# and its dependencies), copied into this one store path, less the references to build tools that inference never
# runs. nixpkgs' torch writes the C++ compiler's store path into torch/_inductor/config.py (for torch.compile) and
# binutils' addr2line into libtorch (for the profiler's C++ stack traces), and removes such references only under
# torch/include and torch/lib; each would bring a compiler toolchain into the image. Here every copied file has
# them removed (remove-references-to keeps each file's length: the path becomes /nix/store/eeee...), and the
# build fails if any remains, or any reference to the packages it copied (disallowedRequisites).
{
  lib,
  runCommand,
  python3Packages,
  removeReferencesTo,
  stdenv,
  binutils,
  reprolora,
}:

let
  inherit (python3Packages) python;
  environment = python.withPackages (_: [ reprolora ]);
  # The compiler (its wrapper and gcc itself) and binutils (wrapped and not): inference compiles nothing.
  buildTools = [
    stdenv.cc
    stdenv.cc.cc
    binutils
    binutils.bintools
  ];
  # The Python packages copied here, every output (torch keeps its libraries in `lib`): a reference left to one of
  # them would bring it back whole.
  copied = lib.concatMap (package: map (output: package.${output}) (package.outputs or [ "out" ])) (
    python3Packages.requiredPythonModules [ reprolora ]
  );
in
runCommand "reprolora-runtime-${reprolora.version}"
  {
    nativeBuildInputs = [ removeReferencesTo ];
    disallowedRequisites = buildTools ++ copied;
    meta = {
      description = "Python environment of reprolora for inference, without build tools in its closure";
      license = lib.licenses.asl20;
      mainProgram = "reprolora";
    };
  }
  ''
    site=$out/${python.sitePackages}
    mkdir -p $out/bin $site
    # A copy of what the environment's site-packages links to in the store; an entry outside the store (the
    # nixpkgs shim's host Python) stays a link.
    for entry in ${environment}/${python.sitePackages}/*; do
      case $(readlink -f "$entry") in
        "$NIX_STORE"/*) cp -rL "$entry" "$site/" ;;
        *) cp -P "$entry" "$site/" ;;
      esac
    done
    chmod -R u+w $out
    find $site -type f -print0 | xargs -0 -r remove-references-to ${
      lib.concatMapStringsSep " " (path: "-t ${path}") (buildTools ++ copied)
    }
    # Compiled modules name their sources' old paths: compile them again from the copy (hash-checked, so the
    # bytes do not depend on file times).
    find $site -type d -name __pycache__ -prune -exec rm -rf {} +
    find $site -type f -name '*.py' -print0 \
      | PYTHONHASHSEED=0 xargs -0 -r ${python.interpreter} -m compileall -q --invalidation-mode unchecked-hash

    # A virtual environment of the pinned interpreter: its site-packages is this copy, nothing else.
    printf 'home = %s\ninclude-system-site-packages = false\nversion = %s\n' \
      ${python}/bin ${python.version} > $out/pyvenv.cfg
    ln -s ${python.interpreter} $out/bin/python
    # The library's command, found by its entry point (the library names its own module).
    cat > $out/bin/reprolora <<SCRIPT
    #!$out/bin/python
    import sys
    from importlib.metadata import entry_points

    (command,) = entry_points(group="console_scripts", name="reprolora")
    sys.exit(command.load()())
    SCRIPT
    chmod +x $out/bin/reprolora
  ''
