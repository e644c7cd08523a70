"""`reprolora fingerprint`: the environment that decides the bits, its warnings, and --against an adapter."""

import json
import os
import shutil

from conftest import run_cli


def test_reports_a_pin_it_replaced_and_warns_about_native():
    result = run_cli("fingerprint", env={"MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "7"})
    text = result.stdout
    assert "replaced:  MKL_CBWR='COMPATIBLE' from the environment (the pins set 'AUTO,STRICT')" in text
    assert "replaced:  OMP_NUM_THREADS='7' from the environment (the pins set '2')" in text
    assert "warning:   profile native:" in text
    report = json.loads(run_cli("fingerprint", "--json", env={"MKL_CBWR": "COMPATIBLE"}).stdout)
    # What the pins replaced: the test's MKL_CBWR, and whatever this machine's own environment sets (some of this
    # project's machines set OPENBLAS_CORETYPE for every process).
    inherited = {name: value for name, value in report["overridden_by_pins"].items() if name != "MKL_CBWR"}
    assert report["overridden_by_pins"]["MKL_CBWR"] == "COMPATIBLE"
    assert inherited == {name: os.environ[name] for name in inherited}
    assert report["isa"]["pinned"] == report["pins"]["cpu_capability"]
    assert report["libraries"]["blas"] == report["pins"]["blas"]
    assert report["threads"]["intra_op"] == 2 and report["threads"]["environment"]["OMP_NUM_THREADS"] == "2"


def test_portable_profile_names_the_isa_torch_would_pick(tmp_path):
    config = tmp_path / "portable.toml"
    config.write_text('profile = "portable"\n')
    report = json.loads(run_cli("fingerprint", "--json", "-c", str(config)).stdout)
    if report["cpu"]["machine"] == "x86_64":
        assert report["isa"]["pinned"] == "AVX2"
        # torch's own pick comes from a fresh interpreter without the pin
        assert report["isa"]["torch_own"] in ("AVX2", "AVX512", "DEFAULT")
    assert not any(w.startswith("profile native") for w in report["warnings"])


def test_against_the_adapter_built_here_and_one_built_elsewhere(tiny_adapter, tmp_path):
    result = run_cli("fingerprint", "--against", str(tiny_adapter))
    assert "verdict:   a rebuild here should give the adapter's bytes" in result.stdout
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_adapter, elsewhere)
    manifest = json.loads((elsewhere / "manifest.json").read_text())
    manifest["toolchain"]["torch"] = "2.10.0"
    manifest["pins"]["cpu_capability"] = "DEFAULT"
    (elsewhere / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("fingerprint", "--json", "--against", str(elsewhere), check=False)
    assert result.returncode == 1
    against = json.loads(result.stdout)["against"]
    assert not against["same"]
    assert "pins: cpu_capability is" in against["reasons"][0] and "'DEFAULT' in the adapter" in against["reasons"][0]
    assert any(r.startswith("toolchain: torch is ") and r.endswith("2.10.0 in the adapter") for r in against["reasons"])


def test_against_a_missing_folder_is_exit_2(tmp_path):
    result = run_cli("fingerprint", "--against", str(tmp_path / "nope"), check=False)
    assert result.returncode == 2 and "adapter folder not found" in result.stderr


def test_against_a_reference_adapter_does_not_count_the_machine(tiny_adapter, tmp_path):
    """A `reference` adapter built on another machine, BLAS, thread count and torch: a rebuild here should give its
    bytes; another transformers is named, since it could tokenize otherwise."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_adapter, elsewhere)
    manifest = json.loads((elsewhere / "manifest.json").read_text())
    manifest["pins"].update(profile="reference", machine="aarch64", blas="openblas", threads=7)
    manifest["toolchain"].update(torch="2.10.0", transformers="4.56.0")
    (elsewhere / "manifest.json").write_text(json.dumps(manifest))
    report = json.loads(run_cli("fingerprint", "--json", "--against", str(elsewhere)).stdout)
    assert report["pins"]["profile"] == "reference"  # the adapter's pins
    assert report["against"]["same"] and report["against"]["reasons"] == []
    verdict = report["against"]["verdict"]
    assert "profile reference depends on the job alone" in verdict and "transformers" in verdict
    assert "4.56.0 there" in verdict
    assert not any(w.startswith("BLAS is") for w in report["warnings"])
