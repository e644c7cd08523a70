{
  description = "reprolora: LoRA fine-tuning on CPU whose adapter is bit-identical wherever it is rebuilt";

  # The whole toolchain (Python, torch, transformers, peft, ...) comes from this one pin: see flake.lock.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # Where this repository is published, for the image's org.opencontainers.image.source label (left out
      # while null).
      sourceUrl = null;

      # One file per package under pkgs/, wired like nixpkgs' callPackage: each argument a file names comes
      # from this set or from nixpkgs, and every result has `.override`, e.g.
      #   adapter.override { dataset = ./my.jsonl; trainConfig = ./my.toml; baseModel = ./my-hf-folder; }
      reproloraPackages =
        pkgs:
        let
          callPackage = pkgs.lib.callPackageWith (pkgs // ours);
          # For a file that returns a set of packages: the set itself gets no `.override`, which
          # `nix flake check` would take for a check.
          callPackages = pkgs.lib.callPackagesWith (pkgs // ours);
          ours = {
            reprolora = callPackage ./pkgs/reprolora.nix { };
            baseModel = callPackage ./pkgs/base-model.nix { };
            dataset = callPackage ./pkgs/dataset.nix { };
            adapter = callPackage ./pkgs/adapter.nix { };
            infer = callPackage ./pkgs/infer.nix { };
            image = callPackage ./pkgs/image.nix {
              inherit sourceUrl;
              revision = self.rev or "dirty";
              defaultAdapter = ours.adapter;
            };
            checks = callPackages ./pkgs/checks.nix { src = self; };
          };
        in
        ours;
    in
    {
      packages = forAllSystems (
        pkgs:
        let
          ours = reproloraPackages pkgs;
        in
        {
          inherit (ours)
            reprolora
            dataset
            adapter
            infer
            image
            ;
          base-model = ours.baseModel;
          default = ours.adapter;
        }
      );

      apps = forAllSystems (
        pkgs:
        let
          infer = {
            type = "app";
            program = "${(reproloraPackages pkgs).infer}/bin/reprolora-infer";
            meta.description = "Answer a prompt with the base model and the adapter baked in";
          };
        in
        {
          inherit infer;
          default = infer;
        }
      );

      checks = forAllSystems (pkgs: (reproloraPackages pkgs).checks);

      # `nix develop`: the pinned Python with the library's dependencies and pytest; the library itself from the
      # source tree (python/ on PYTHONPATH), so that edits need no rebuild:
      #   python -c 'import reprolora'; python -m pytest tests -m "not slow and not nix"
      devShells = forAllSystems (
        pkgs:
        let
          inherit (reproloraPackages pkgs) reprolora;
        in
        {
          default = pkgs.mkShell {
            packages = [
              (pkgs.python3Packages.python.withPackages (
                ps: reprolora.dependencies ++ [ ps.gguf ps.pytest ]
              ))
            ];
            shellHook = ''
              if [ -f python/reprolora/__init__.py ]; then
                export PYTHONPATH="$PWD/python''${PYTHONPATH:+:$PYTHONPATH}"
              else
                echo "nix develop: run it from the repository's root to import reprolora from python/" >&2
              fi
            '';
          };
        }
      );

      formatter = forAllSystems (pkgs: pkgs.nixfmt-tree);
    };
}
