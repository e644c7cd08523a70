# The nixpkgs lib functions that the flake and the shim use, written out plainly.
rec {
  genAttrs =
    names: f:
    builtins.listToAttrs (
      map (name: {
        inherit name;
        value = f name;
      }) names
    );

  # Call a package function with the arguments it names taken from autoArgs, the way nixpkgs does;
  # `.override` calls it again with some of them replaced.
  callPackageWith =
    autoArgs: fn: args:
    let
      f = if builtins.isFunction fn then fn else import fn;
      result = f (builtins.intersectAttrs (builtins.functionArgs f) autoArgs // args);
    in
    result // { override = newArgs: callPackageWith autoArgs fn (args // newArgs); };

  # The same for a function that returns a set of packages (without the per-package `.override`).
  callPackagesWith =
    autoArgs: fn: args:
    let
      f = if builtins.isFunction fn then fn else import fn;
    in
    f (builtins.intersectAttrs (builtins.functionArgs f) autoArgs // args);

  escapeShellArg = arg: "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] (toString arg)}'";
  escapeShellArgs = args: builtins.concatStringsSep " " (map escapeShellArg args);

  makeBinPath = paths: builtins.concatStringsSep ":" (map (path: "${path}/bin") paths);

  optionalString = cond: string: if cond then string else "";
  optionalAttrs = cond: attrs: if cond then attrs else { };
  addMetaAttrs = newAttrs: drv: drv // { meta = (drv.meta or { }) // newAttrs; };
  getExe = drv: "${drv}/bin/${drv.meta.mainProgram}";

  licenses.asl20 = {
    spdxId = "Apache-2.0";
    shortName = "asl20";
    fullName = "Apache License 2.0";
    free = true;
  };
}
