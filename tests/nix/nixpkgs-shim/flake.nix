# A stand-in for nixpkgs, for tests on machines that can't fetch nixpkgs: it replaces the pinned toolchain
# (Python, torch, transformers, peft, ...) with this machine's own Python, and provides what the flake's outputs
# use, each a small honest stand-in (packages.nix says what each does and does not do). Everything the flake
# itself does (pkgs/*.nix, the build step, the sandbox, `--rebuild`) stays real. Used as:
#   nix build .#adapter --override-input nixpkgs path:<a copy of this folder with host.nix written in>
# tests/nix/nixtest.py writes host.nix (which Python, and local copies of files fetchurl would download).
{
  description = "Test stand-in for nixpkgs: this machine's Python toolchain, nothing else";

  outputs =
    { self }:
    let
      host = import ./host.nix;
      lib = import ./lib.nix;
    in
    {
      inherit lib;
      # Every system the flake declares evaluates; only this machine's can build (the toolchain is its own).
      legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (
        system: import ./packages.nix { inherit lib host system; }
      );
    };
}
