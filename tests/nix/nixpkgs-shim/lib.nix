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

  # Like nixpkgs' lib.makeScope: a package set whose callPackage sees the set itself (fixed point), with
  # `overrideScope` to replace members so that everything built from them follows.
  makeScope =
    newScope: f:
    let
      self = f self // {
        newScope = scope: newScope (self // scope);
        callPackage = self.newScope { };
        overrideScope = g: makeScope newScope (extends g f);
      };
    in
    self;

  extends =
    overlay: f: final:
    let
      prev = f final;
    in
    prev // overlay final prev;

  inherit (builtins) mapAttrs attrValues concatLists;
  concatMapStringsSep = separator: f: list: builtins.concatStringsSep separator (map f list);
  concatMap = f: list: builtins.concatLists (map f list);
  hasPrefix = prefix: string: builtins.substring 0 (builtins.stringLength prefix) string == prefix;

  # Like nixpkgs' lib.fileset, only what the flake uses: `unions` of paths (files or folders) and `toSource`,
  # which copies just those under `root` to the store (with their folders), so that a change elsewhere changes
  # nothing. Like the real one, a path that does not exist is an error.
  fileset = {
    unions =
      paths:
      map (
        path: if builtins.pathExists path then toString path else throw "lib.fileset.unions: ${toString path} does not exist"
      ) paths;
    toSource =
      { root, fileset }:
      let
        rootString = toString root;
        keep =
          path: _type:
          builtins.any (
            wanted: path == wanted || hasPrefix (wanted + "/") path || hasPrefix (path + "/") wanted
          ) fileset;
      in
      assert builtins.all (wanted: hasPrefix (rootString + "/") wanted) fileset
        || throw "lib.fileset.toSource: a path of the fileset is not under ${rootString}";
      builtins.path {
        path = root;
        name = "source";
        filter = keep;
      };
  };

  licenses.asl20 = {
    spdxId = "Apache-2.0";
    shortName = "asl20";
    fullName = "Apache License 2.0";
    free = true;
  };
}
