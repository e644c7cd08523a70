"""Mutation check: plant each bug below in a temporary copy of the repository, one at a time, run the tests that
should catch it, and fail if any bug survives (its tests pass with the bug in place).

    .venv/bin/python tests/mutate.py            # every mutant; exit 1 if one survives
    .venv/bin/python tests/mutate.py NAME ...   # only these
    .venv/bin/python tests/mutate.py --list     # names, edits and tests

Each edit finds its place by an exact snippet of code, not a line number. A snippet that is not found exactly
once fails the whole run before any test runs: when the code moves, update the entry, never delete it to make
the run pass. First the named tests run once on the unchanged copy (they must pass, or a "caught" mutant
would mean nothing; --skip-baseline leaves that out right after the whole suite has passed).

Adding an entry: when you add a behaviour and its test, add the bug that test exists to catch, e.g.
    Mutant("resume-forgets-the-optimizer-moments",
           [Edit("python/reprolora/training/train.py", "exact line(s) as they are", "the bug")],
           ["tests/test_train.py::test_resume_gives_the_same_bytes"]),
Name the fewest tests that catch it (they run once per mutant), and check it with `tests/mutate.py NAME`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Edit:
    file: str  # relative to the repository root
    find: str  # exact code, found exactly once in the file
    replace: str


@dataclass(frozen=True)
class Mutant:
    name: str
    edits: list[Edit]
    tests: list[str]  # pytest node ids; at least one must fail with the bug in place


PINS = "python/reprolora/core/pins.py"
TRAIN_TESTS = "tests/test_train.py"
FINGERPRINT_NATIVE = f"{TRAIN_TESTS}::test_fingerprint_reports_the_pinned_process_whatever_the_user_set[native]"
FINGERPRINT_PORTABLE = f"{TRAIN_TESTS}::test_fingerprint_reports_the_pinned_process_whatever_the_user_set[portable]"
FINGERPRINT_PORTABLE_FAST = (
    f"{TRAIN_TESTS}::test_fingerprint_reports_the_pinned_process_whatever_the_user_set[portable-fast]"
)
DIFF = "python/reprolora/audit/diff.py"
TENSOR_DIFF = "python/reprolora/audit/tensor_diff.py"
DIFF_TESTS = "tests/test_diff.py"
THREAD_PINS = "    env.update({name: str(threads) for name in _THREAD_VARS})\n"
MATMUL = "python/reprolora/numerics/matmul.py"
MATMUL_TESTS = "tests/test_numerics_matmul.py"
REFERENCE_LAYERS = "python/reprolora/models/reference_layers.py"
REFERENCE_TRAINING = "python/reprolora/training/reference.py"
REFERENCE_TESTS = "tests/test_reference.py"

MUTANTS = [
    # Issue 12, gap 1: the pins must reach the process that trains and infers.
    Mutant(
        "pins-never-reach-os.environ",
        [Edit(PINS, "            os.environ[name] = value\n", "            pass\n")],
        [f"{TRAIN_TESTS}::test_training_process_ran_with_the_pins", FINGERPRINT_NATIVE],
    ),
    Mutant("thread-variables-not-pinned", [Edit(PINS, THREAD_PINS, "")], [FINGERPRINT_NATIVE]),
    Mutant(
        "threads-not-pinned-at-all",
        [Edit(PINS, THREAD_PINS, ""), Edit(PINS, "    torch.set_num_threads(threads)\n", "")],
        [f"{TRAIN_TESTS}::test_thread_pins_beat_the_users_thread_count"],
    ),
    Mutant(
        "interop-threads-not-pinned", [Edit(PINS, "    torch.set_num_interop_threads(1)\n", "")], [FINGERPRINT_NATIVE]
    ),
    Mutant(
        "deterministic-algorithms-off",
        [Edit(PINS, "    torch.use_deterministic_algorithms(True)\n", "")],
        [FINGERPRINT_NATIVE],
    ),
    Mutant(
        "users-cpu-capability-kept-under-native",
        [Edit(PINS, "            os.environ.pop(name, None)\n", "            pass\n")],
        [f"{TRAIN_TESTS}::test_user_environment_does_not_change_the_bytes[aten-default]"],
    ),
    Mutant(
        "portable-runs-the-native-isa",
        [
            Edit(
                PINS,
                '    ("portable", "x86_64"): {\n        "ATEN_CPU_CAPABILITY": "avx2",\n',
                '    ("portable", "x86_64"): {\n        "ATEN_CPU_CAPABILITY": None,\n',
            )
        ],
        [FINGERPRINT_PORTABLE],
    ),
    Mutant(
        "portable-mkl-vendor-specific",
        [Edit(PINS, '"MKL_CBWR": "COMPATIBLE",', '"MKL_CBWR": "AVX2",')],
        [FINGERPRINT_PORTABLE],
    ),
    # Issue 7, part 4: native's matrix products must not depend on the thread count (MKL's strict CNR mode).
    # On an Intel Xeon the products test catches it (MKL's AUTO branch splits some products by thread there); on an
    # AMD EPYC MKL's AUTO products did not change with the thread count, so the process report must name STRICT.
    Mutant(
        "native-mkl-not-strict",
        [Edit(PINS, '"MKL_CBWR": "AUTO,STRICT",', '"MKL_CBWR": "AUTO",')],
        ["tests/test_threads.py::test_matrix_products_do_not_change_with_the_thread_count[native]", FINGERPRINT_NATIVE],
    ),
    Mutant(
        "portable-fast-mkl-not-strict",
        [Edit(PINS, '"MKL_CBWR": "AVX2,STRICT",', '"MKL_CBWR": "AVX2",')],
        [
            "tests/test_threads.py::test_matrix_products_do_not_change_with_the_thread_count[portable-fast]",
            FINGERPRINT_PORTABLE_FAST,
        ],
    ),
    Mutant(
        "mkl-strict-mode-not-reported",
        [Edit(PINS, "    strict = get(-1) & 0x10000  # MKL_CBWR_ALL, MKL_CBWR_STRICT\n", "    strict = 0\n")],
        [FINGERPRINT_NATIVE],
    ),
    Mutant(
        "broken-pipe-traceback",
        [Edit("python/reprolora/cli/main.py", "    except BrokenPipeError:", "    except NotImplementedError:")],
        ["tests/test_diff.py::test_a_reader_that_goes_away_gets_no_traceback"],
    ),
    # Gap 2: the golden probes' logits.
    Mutant(
        "logits-digest-constant",
        [
            Edit(
                "python/reprolora/decoding/generate.py", "digest.update(logits.numpy().tobytes())", 'digest.update(b"")'
            )
        ],
        ["tests/test_infer.py::test_logits_that_change_under_the_same_tokens_fail_the_check"],
    ),
    Mutant(
        "check-ignores-the-logits",
        [
            Edit(
                "python/reprolora/decoding/infer.py",
                "        elif got.logits_sha256 != probe.logits_sha256:",
                "        elif False:",
            )
        ],
        ["tests/test_infer.py::test_logits_that_change_under_the_same_tokens_fail_the_check"],
    ),
    Mutant(
        "training-records-another-logits-hash",
        [
            Edit(
                "python/reprolora/training/train.py",
                "completion.finish_reason, completion.logits_sha256\n",
                "completion.finish_reason, completion.logits_sha256[::-1]\n",
            )
        ],
        ["tests/test_infer.py::test_answer_json_and_check"],
    ),
    # Issue 10, part 4: an answer must not depend on what else is decoded with it.
    Mutant(
        "decode-rows-follow-the-load",
        [
            Edit(
                "python/reprolora/decoding/generate.py",
                "        padding = SLOTS - len(rows)  # whatever the load",
                "        padding = 0  # whatever the load",
            )
        ],
        ["tests/test_decode.py::test_an_answer_does_not_depend_on_the_others[3-llama]"],
    ),
    # Decoding steps multiply by packed copies of the weights: a weight changed in place must be packed again.
    Mutant(
        "decode-packed-weights-never-repacked",
        [
            Edit(
                "python/reprolora/decoding/kernels.py",
                "        if cached is None or cached[0] is not module.weight or cached[1] != module.weight._version:",
                "        if cached is None:",
            )
        ],
        ["tests/test_decode.py::test_a_weight_changed_in_place_after_decoding_is_used"],
    ),
    Mutant(
        "decode-packs-under-portable",
        [Edit("python/reprolora/decoding/kernels.py", 'and profile != "portable"', "")],
        ["tests/test_decode.py::test_packed_products_under_every_profile_but_portable"],
    ),
    # Guesses in idle rows: only the rows no request needs carry them (a step never grows past SLOTS rows).
    Mutant(
        "decode-guesses-take-busy-rows",
        [Edit("python/reprolora/decoding/guesses.py", "    idle = rows - len(found)", "    idle = rows - 1")],
        ["tests/test_decode.py::test_idle_rows_are_shared_first_guesses_first"],
    ),
    # A guess is kept only where it is the token the previous row chose.
    Mutant(
        "decode-keeps-every-guess",
        [Edit("python/reprolora/decoding/generate.py", "or sequence.generated[-1] != guessed[offset]:", "or False:")],
        ["tests/test_decode.py::test_guesses_in_idle_rows_change_nothing_but_the_number_of_steps[llama]"],
    ),
    Mutant(
        "decode-cache-advances-one-position-a-step",
        [
            Edit(
                "python/reprolora/decoding/generate.py",
                "                sequence.length += 1\n                if sequence.done",
                "                if sequence.done",
            ),
            Edit(
                "python/reprolora/decoding/generate.py",
                "            row += len(guessed) + 1",
                "            sequence.length += 1\n            row += len(guessed) + 1",
            ),
        ],
        ["tests/test_decode.py::test_guesses_in_idle_rows_change_nothing_but_the_number_of_steps[llama]"],
    ),
    # At a few rows MKL's products with few outputs (a LoRA A, r = 16; a 16-wide projection) give other bits at 1
    # and 2 threads (AMD EPYC): the decoder sums them with ATen.
    Mutant(
        "decoder-narrow-products-by-blas",
        [Edit("python/reprolora/decoding/kernels.py", "    if weight.shape[0] > NARROW:", "    if True:")],
        ["tests/test_threads.py::test_the_decoders_linear_layers_do_not_change_with_the_thread_count[native]"],
    ),
    Mutant(
        "decoder-narrow-product-drops-bias",
        [
            Edit(
                "python/reprolora/decoding/kernels.py",
                "    return out if module.bias is None else out + module.bias",
                "    return out",
            )
        ],
        ["tests/test_decode.py::test_logits_and_tokens_are_hfs[qwen2]"],
    ),
    # Stop strings are looked for in the answer's last few tokens only: one that spans two tokens must be found.
    Mutant(
        "stop-check-misses-a-stop-across-tokens",
        [
            Edit(
                "python/reprolora/decoding/stops.py",
                "        self.stop_settled = self.stop_settled or self._stop_in(near)",
                "        self.stop_settled = self.stop_settled or self._stop_in(new)",
            )
        ],
        ["tests/test_stops.py::test_byte_level_characters_and_stops_across_tokens"],
    ),
    Mutant(
        "stream-sends-text-a-longer-stop-may-cut",
        [Edit("python/reprolora/serving/scheduler.py", "        if len(self.unsent) > hold:", "        if True:")],
        ["tests/test_stops.py::test_the_stream_holds_back_text_shorter_than_a_stop"],
    ),
    # Gap 3: infer under the adapter's own profile.
    Mutant(
        "infer-applies-native-whatever-the-adapter",
        [
            Edit(
                "python/reprolora/decoding/infer.py",
                "    pins.apply(recorded.pins.profile, recorded.pins.threads)",
                '    pins.apply("native", recorded.pins.threads)',
            )
        ],
        [f"{TRAIN_TESTS}::test_portable_profile_gives_its_own_reproducible_bytes"],
    ),
    # Gap 4: the base model folder, file by file.
    Mutant(
        "extra-base-model-file-accepted",
        [
            Edit(
                "python/reprolora/models/base_model.py",
                '    problems += [f"{name} is unexpected" for name in sorted(actual) if name not in expected]\n',
                "",
            )
        ],
        ["tests/test_infer.py::test_changed_base_model_is_refused[unexpected]"],
    ),
    Mutant(
        "missing-base-model-file-accepted",
        [
            Edit(
                "python/reprolora/models/base_model.py",
                '    problems += [f"{name} is missing" for name in sorted(expected) if name not in actual]\n',
                "",
            )
        ],
        ["tests/test_infer.py::test_changed_base_model_is_refused[missing]"],
    ),
    # Gap 5: every hash the manifest states is recomputed from what it covers.
    Mutant(
        "loss-trace-hash-over-something-else",
        [
            Edit(
                "python/reprolora/training/train.py",
                "sha256_bytes(canonical_json(state.loss_trace))",
                'sha256_bytes(b" " + canonical_json(state.loss_trace))',
            )
        ],
        [f"{TRAIN_TESTS}::test_every_hash_in_the_manifest_is_what_it_covers"],
    ),
    Mutant(
        "verify-skips-the-loss-trace",
        [Edit("python/reprolora/core/adapter.py", "    if actual != recorded.loss_trace_sha256:", "    if False:")],
        [f"{TRAIN_TESTS}::test_verify_recomputes_the_hashes_the_manifest_states[loss_trace]"],
    ),
    Mutant(
        "verify-skips-the-base-model-name",
        [Edit("python/reprolora/core/adapter.py", "and name != base_model.local_name(files):", "and False:")],
        [f"{TRAIN_TESTS}::test_verify_recomputes_the_hashes_the_manifest_states[base_model_name]"],
    ),
    Mutant(
        "dataset-hash-over-something-else",
        [Edit("python/reprolora/data/dataset.py", "sha256=sha256_bytes(data)", 'sha256=sha256_bytes(data + b"\\n")')],
        [f"{TRAIN_TESTS}::test_every_hash_in_the_manifest_is_what_it_covers"],
    ),
    # Issue 7: checkpoints restore the whole state; data parallelism adds in micro-batch order.
    Mutant(
        "resume-forgets-adams-second-moment",
        [
            Edit(
                "python/reprolora/training/checkpoint.py",
                '            exp_avg_sq.copy_(tensors[f"exp_avg_sq/{name}"])\n',
                "",
            )
        ],
        ["tests/test_resume.py::test_sigkill_at_a_random_step_then_resume_gives_the_uninterrupted_bytes"],
    ),
    Mutant(
        "ranks-gradients-added-in-rank-order",
        [
            Edit(
                "python/reprolora/training/distributed.py",
                "        return [received[i % self.size][i // self.size] for i in range(count)]",
                "        return [received[r][k] for r in range(self.size) for k in range(rows) "
                "if k * self.size + r < count]",
            )
        ],
        ["tests/test_distributed.py::test_world_size_gives_the_single_process_bytes[2]"],
    ),
    # Issue 9: diff's statistics and verdict.
    Mutant(
        "diff-ulp-ignores-sign",
        [Edit(TENSOR_DIFF, "    return np.where(sign == 1, -magnitude, magnitude)", "    return magnitude")],
        [f"{DIFF_TESTS}::test_tensor_statistics_count_ulps"],
    ),
    Mutant(
        "diff-skips-config",
        [Edit(DIFF, '    if keys.get("config"):', "    if False:")],
        [f"{DIFF_TESTS}::test_another_learning_rate"],
    ),
    Mutant(
        "diff-loss-step-off-by-one",
        [Edit(DIFF, 'return {"step": step, "a": x, "b": y}', 'return {"step": step + 1, "a": x, "b": y}')],
        [f"{DIFF_TESTS}::test_another_learning_rate"],
    ),
    Mutant(
        "diff-ignores-manifest-only-changes",
        [
            Edit(
                DIFF,
                '    identical = all(f.status == "identical" for f in files)\n',
                '    identical = all(f.status == "identical" for f in files if f.name != manifest.FILENAME)\n',
            )
        ],
        [f"{DIFF_TESTS}::test_only_the_manifest_differs"],
    ),
    # Issue 22: the torch-import boundary (docs/architecture.md): torch must not load before the pins are applied.
    Mutant(
        "core-imports-torch",
        [
            Edit(
                "python/reprolora/core/errors.py",
                "class ReproloraError(Exception):\n",
                "import torch  # noqa: F401\n\n\nclass ReproloraError(Exception):\n",
            )
        ],
        ["tests/test_layout.py::test_torch_free_package_does_not_import_torch"],
    ),
    # Gap 6: checks that could not fail.
    Mutant(
        "canonical-json-unsorted",
        [Edit("python/reprolora/core/canonical.py", "sort_keys=True, indent=2", "sort_keys=False, indent=2")],
        [f"{TRAIN_TESTS}::test_output_is_canonical"],
    ),
    Mutant(
        "default-model-hashes-wrong-and-unchecked",  # slow test: needs the default model (cached after one run)
        [
            Edit(
                "python/reprolora/models/base_model.py",
                '    "config.json": "31781b18f63a7ee24d2756e2a59048566b47c518b6b956d883eff0dd4850c870",',
                '    "config.json": "0000000000000000000000000000000000000000000000000000000000000000",',
            ),
            Edit(
                "python/reprolora/models/base_model.py",
                "        check_folder(target, CONVERTED_SHA256)\n        return target",
                "        return target",
            ),
        ],
        ["tests/test_real_model.py::test_default_model_converts_to_the_pinned_bytes"],
    ),
    # Issue 23, item 5: the `reference` profile's mechanisms, each defined by mathematics.
    Mutant(
        "reference-matmul-skips-the-fallback",  # the undecided elements keep the float64 product's rounding
        [
            Edit(
                MATMUL,
                "    if not bool(decided.all()):\n        _exact_where_undecided(rounded, decided, a64, b64)\n",
                "",
            )
        ],
        [f"{MATMUL_TESTS}::test_near_midpoints_take_the_fallback_and_come_out_exact"],
    ),
    Mutant(
        "reference-matmul-bound-halved",
        [Edit(MATMUL, ".sqrt().mul_(factor) * b_norms", ".sqrt().mul_(factor / 2) * b_norms")],
        [f"{MATMUL_TESTS}::test_the_bound_covers_the_worst_summation_order"],
    ),
    Mutant(
        "reference-torch-matmul-in-one-layer",  # LoRA's A product by torch's float32 BLAS, not correctly rounded
        [
            Edit(
                REFERENCE_LAYERS,
                "    u = matmul(xd, lora.A.detach().t())\n",
                "    u = torch.matmul(xd, lora.A.detach().t())\n",
            )
        ],
        [f"{REFERENCE_TESTS}::test_a_passes_lora_rows_are_the_exact_products_rounded"],
    ),
    Mutant(
        "reference-torch-dropout",  # the masks from torch's generator, seeded from the key: they follow the pass
        [
            Edit(
                REFERENCE_TRAINING,
                "        return counter_random.dropout_mask(\n"
                "            lora.dropout, (seed, step, lora.name), example_of_row, position_of_row, x.shape[1]\n"
                "        )\n",
                "        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)\n"
                "        return (torch.rand(x.shape, generator=generator) >= lora.dropout) / (1 - lora.dropout)\n",
            )
        ],
        [f"{REFERENCE_TESTS}::test_a_passes_dropout_masks_are_keyed_by_seed_step_layer_example_and_position"],
    ),
    Mutant(
        "reference-fused-adamw",  # torch.optim.AdamW's m.lerp_(g, 1 - beta1) for the two ops m * b1 + g * c1
        [
            Edit(
                "python/reprolora/numerics/optim.py",
                '            exp_avg.mul_(s["beta1"])\n            exp_avg.add_(grad * s["one_minus_beta1"])\n',
                '            exp_avg.lerp_(grad, s["one_minus_beta1"])\n',
            )
        ],
        ["tests/test_numerics_optim.py::test_adamw_matches_numpy_bit_for_bit[0.0]"],
    ),
    Mutant(
        "reference-sum-skips-the-fallback",
        [
            Edit(
                "python/reprolora/numerics/reductions.py",
                "    if not bool(decided.all()):\n        terms = x64.movedim(dim, -1)\n",
                "    if False:\n        terms = x64.movedim(dim, -1)\n",
            )
        ],
        [f"{MATMUL_TESTS}::test_sum_near_midpoints_and_empty"],
    ),
    Mutant(
        "reference-exact-sums-skip-the-exact-step",  # what the compensated sum leaves keeps its float64 rounding
        [
            Edit(
                "python/reprolora/numerics/exact.py",
                '    if len(undecided):\n        FALLBACKS["exact"] += len(undecided)\n',
                '    if False:\n        FALLBACKS["exact"] += len(undecided)\n',
            )
        ],
        [f"{MATMUL_TESTS}::test_near_midpoints_take_the_fallback_and_come_out_exact"],
    ),
    Mutant(
        "reference-merge-by-torch-matmul",  # B A by the float32 BLAS, not correctly rounded
        [
            Edit(
                "python/reprolora/models/reference.py",
                "weight.copy_(weight + matmul(lora.B.detach(), lora.A.detach()) * lora.scaling)",
                "weight.copy_(weight + (lora.B.detach() @ lora.A.detach()) * lora.scaling)",
            )
        ],
        ["tests/test_merge.py::test_reference_merge_folds_each_delta_by_its_definition"],
    ),
    Mutant(
        "reference-merge-probes-by-torch",  # the merge's probe logits from torch's forward, not the reference decoder
        [
            Edit(
                "python/reprolora/export/merge.py",
                "decoder = Decoder(causal_lm) if reference else None",
                "decoder = None",
            )
        ],
        ["tests/test_merge.py::test_reference_merge_folds_each_delta_by_its_definition"],
    ),
    Mutant(
        "reference-fingerprint-counts-the-machine",  # a reference adapter judged by the machine it was built on
        [Edit("python/reprolora/audit/fingerprint.py", 'if recorded.pins.profile == "reference":\n', "if False:\n")],
        ["tests/test_fingerprint.py::test_against_a_reference_adapter_does_not_count_the_machine"],
    ),
    Mutant(
        "reference-exp-skips-the-fallback",
        [
            Edit(
                "python/reprolora/numerics/pointwise.py",
                '    return _fill_undecided(x, rounded, ~decided & ~nan, "exp")\n',
                "    return rounded\n",
            )
        ],
        ["tests/test_numerics_pointwise.py::test_hard_cases_take_the_fallback_and_are_right[exp-hard0]"],
    ),
]


def copy_repository(target: Path) -> None:
    """The files git would commit (tracked, and untracked but not ignored): no venv, no build outputs."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def check_snippets(copy: Path, mutants: list[Mutant]) -> list[str]:
    problems = []
    for mutant in mutants:
        for edit in mutant.edits:
            count = (copy / edit.file).read_text().count(edit.find)
            if count != 1:
                problems.append(
                    f"{mutant.name}: {edit.file}: snippet found {count} times, expected once: {edit.find!r}"
                )
    return problems


def run_tests(copy: Path, tests: list[str], env: dict[str, str]) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    return result.returncode, result.stdout + result.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument(
        "--skip-baseline",
        action="store_true",
        help="don't first run the named tests on the unchanged code (only when the suite has just passed)",
    )
    args = parser.parse_args()
    known = {m.name: m for m in MUTANTS}
    unknown = [name for name in args.names if name not in known]
    if unknown:
        parser.error(f"unknown mutant(s): {', '.join(unknown)}")
    mutants = [known[name] for name in args.names] if args.names else MUTANTS
    if args.list:
        for m in mutants:
            print(
                f"{m.name}\n"
                + "".join(f"  {e.file}: {e.find.strip()!r} -> {e.replace.strip()!r}\n" for e in m.edits)
                + "".join(f"  test {t}\n" for t in m.tests)
            )
        return 0

    with tempfile.TemporaryDirectory(prefix="reprolora-mutants-") as scratch:
        copy = Path(scratch)
        copy_repository(copy)
        problems = check_snippets(copy, mutants)
        if problems:
            print("mutate: the code moved; update these entries in tests/mutate.py:\n  " + "\n  ".join(problems))
            return 2
        # The copy's library, not the installed (editable) one, must be what the tests and their subprocesses import.
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(copy / "python"), os.environ.get("PYTHONPATH")])),
        }
        where = subprocess.run(
            [sys.executable, "-c", "import reprolora; print(reprolora.__file__)"],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not Path(where).is_relative_to(copy):
            print(f"mutate: the tests would import reprolora from {where}, not from the copy {copy}")
            return 2

        all_tests = sorted({t for m in mutants for t in m.tests})
        started = time.perf_counter()
        if not args.skip_baseline:
            code, output = run_tests(copy, all_tests, env)
            if code != 0:
                print(
                    f"mutate: the named tests fail without any mutant (exit {code}); fix them first:\n{output[-4000:]}"
                )
                return 2
            print(
                f"mutate: {len(all_tests)} tests pass on the unchanged code ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )

        survived, broken = [], []
        for mutant in mutants:
            originals = {e.file: (copy / e.file).read_text() for e in mutant.edits}
            for edit in mutant.edits:
                path = copy / edit.file
                path.write_text(path.read_text().replace(edit.find, edit.replace, 1))
            tick = time.perf_counter()
            try:
                code, output = run_tests(copy, mutant.tests, env)
            finally:
                for name, text in originals.items():
                    (copy / name).write_text(text)
            seconds = time.perf_counter() - tick
            if code == 1:  # pytest: some test failed
                print(f"caught    {mutant.name} ({seconds:.0f} s)", flush=True)
            elif code == 0:
                survived.append(mutant.name)
                print(
                    f"SURVIVED  {mutant.name} ({seconds:.0f} s): {', '.join(mutant.tests)} pass with the bug",
                    flush=True,
                )
            else:  # collection error, usage error, no tests: not a test that caught the bug
                broken.append(mutant.name)
                print(f"ERROR     {mutant.name} (pytest exit {code}):\n{output[-3000:]}", flush=True)
        print(
            f"mutate: {len(mutants) - len(survived) - len(broken)} of {len(mutants)} mutants caught in "
            f"{time.perf_counter() - started:.0f} s"
        )
        if survived or broken:
            print(f"mutate: survived: {', '.join(survived) or 'none'}; errors: {', '.join(broken) or 'none'}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
