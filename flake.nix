{
  description = "LoRA fine-tuning on CPU whose adapter is bit-identical wherever it is rebuilt";

  # The whole toolchain (Python, torch, transformers, peft, ...) comes from this one pin: see flake.lock.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];

      # Where this repository is published, for the image's org.opencontainers.image.source label (left out
      # while null).
      sourceUrl = null;

      # The package set, one lib.makeScope: each file under pkgs/ gets its arguments from the set, then from
      # nixpkgs. Every package has `.override`, and `overrideScope` replaces a member for everything built from
      # it, e.g. another base model for the adapter, the infer wrapper and the image at once:
      #   (reproloraPackages pkgs).overrideScope (final: prev: { baseModel = ./my-hf-folder; })
      reproloraPackages =
        pkgs:
        let
          scope = pkgs.lib.makeScope pkgs.newScope (self': {
            reprolora = pkgs.python3Packages.callPackage ./pkgs/reprolora.nix { };
            baseModel = self'.callPackage ./pkgs/base-model.nix { };
            dataset = self'.callPackage ./pkgs/dataset.nix { };
            adapter = self'.callPackage ./pkgs/adapter.nix { };
            runtime = self'.callPackage ./pkgs/runtime.nix { };
            infer = self'.callPackage ./pkgs/infer.nix { };
            image = self'.callPackage ./pkgs/image.nix {
              inherit sourceUrl;
              revision = self.rev or "dirty";
              # The flake's own adapter, whose bytes expected/ records, whatever a scope override replaces.
              defaultAdapter = scope.adapter;
            };
          });
        in
        scope;

      # Evaluated once per system; every output of a system reads the same set.
      scopes = lib.genAttrs systems (system: reproloraPackages nixpkgs.legacyPackages.${system});
      forAllSystems = f: lib.mapAttrs (system: f nixpkgs.legacyPackages.${system}) scopes;
    in
    {
      # pkgs.reproloraPackages in another nixpkgs: `nixpkgs.overlays = [ reprolora.overlays.default ];`
      overlays.default = final: _prev: { reproloraPackages = reproloraPackages final; };

      packages = forAllSystems (
        _: scope: {
          inherit (scope)
            reprolora
            dataset
            adapter
            infer
            image
            ;
          base-model = scope.baseModel;
          default = scope.adapter;
        }
      );

      apps = forAllSystems (
        _: scope:
        let
          infer = {
            type = "app";
            program = lib.getExe scope.infer;
            meta.description = "Answer a prompt with the base model and the adapter baked in";
          };
        in
        {
          inherit infer;
          default = infer;
        }
      );

      # A set of derivations, not a package: callPackagesWith gives each its own `.override` and the set none,
      # which `nix flake check` would take for a check.
      checks = forAllSystems (pkgs: scope: lib.callPackagesWith (pkgs // scope) ./pkgs/checks.nix { });

      # `nix develop`: the pinned Python with the library's dependencies and everything the tests import; the
      # library itself from the source tree (python/ on PYTHONPATH), so that edits need no rebuild:
      #   python -c 'import reprolora'; python -m pytest tests -m "not slow and not nix"
      devShells = forAllSystems (
        pkgs: scope: {
          default = pkgs.mkShell {
            packages = [
              (pkgs.python3Packages.python.withPackages (
                ps:
                scope.reprolora.dependencies
                ++ lib.concatLists (lib.attrValues scope.reprolora.optional-dependencies)
                ++ [
                  ps.pytest
                  ps.cryptography
                  ps.openai
                ]
              ))
            ];
            shellHook = ''
              if [ -f python/pyproject.toml ]; then
                export PYTHONPATH="$PWD/python''${PYTHONPATH:+:$PYTHONPATH}"
              else
                echo "nix develop: run it from the repository's root to import reprolora from python/" >&2
              fi
            '';
          };
        }
      );

      formatter = forAllSystems (pkgs: _: pkgs.nixfmt-tree);
    };
}
