# The built-in training set (the library's package data) as a store path of its own, so that the adapter's
# inputs are all visible, and replaceable: adapter.override { dataset = ./my.jsonl; }. Its name is the
# library's own name for it, which the manifest records.
{ lib, runCommand }:

runCommand "default.jsonl"
  {
    meta = {
      description = "Built-in training set of reprolora: 80 instruction/response pairs on reproducible ML engineering";
      license = lib.licenses.asl20;
    };
  }
  ''
    cp ${../python/reprolora/data/default.jsonl} $out
  ''
