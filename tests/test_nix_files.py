"""The flake's files: every .nix file parses, the lock pins nixos-26.05, the outputs are the promised ones and
every system's evaluate, packages say what they are, the library's dependencies are the same in Nix and in
pyproject.toml, and the hash check CI runs works."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "nix"))
import nixtest  # noqa: E402

pytestmark = pytest.mark.nix

needs_nix = pytest.mark.skipif(shutil.which("nix-instantiate") is None,
                               reason="needs Nix: apt-get install nix-bin busybox-static")

CHECK_HASHES = nixtest.REPO / ".github" / "scripts" / "check-adapter-hashes.sh"


@needs_nix
def test_every_tracked_nix_file_parses():
    files = nixtest.tracked_files("*.nix")
    assert nixtest.REPO / "flake.nix" in files
    for path in files:
        result = subprocess.run(["nix-instantiate", "--parse", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{path}: {result.stderr}"


def test_lock_pins_nixos_26_05_in_the_format_nix_writes():
    """rev, narHash and lastModified as two independent public flake.lock files have them (pr0d1r2/nix-hk, which
    tracks nixos-26.05, and iNViTiON/xdg-desktop-portal-layercapture)."""
    lock = json.loads((nixtest.REPO / "flake.lock").read_text())
    assert lock["version"] == 7 and lock["root"] == "root"
    assert lock["nodes"]["root"] == {"inputs": {"nixpkgs": "nixpkgs"}}
    assert lock["nodes"]["nixpkgs"] == {
        "locked": {
            "lastModified": 1790450978,
            "narHash": "sha256-/eLCD/X9kaWJqPR47+fDozEC87Hjmm3i8gJbYmDAD7g=",
            "owner": "NixOS",
            "repo": "nixpkgs",
            "rev": "5e2305d577ca00acbba631b05cb1094d172b29f3",
            "type": "github",
        },
        "original": {"owner": "NixOS", "ref": "nixos-26.05", "repo": "nixpkgs", "type": "github"},
    }
    assert (nixtest.REPO / "flake.lock").read_text() == json.dumps(lock, indent=2, sort_keys=True) + "\n"
    assert 'inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";' in (nixtest.REPO / "flake.nix").read_text()


@pytest.fixture(scope="module")
def shim_env(tmp_path_factory) -> tuple[list[str], dict[str, str]]:
    """The arguments that point the repository's flake at the shim, and the environment to run `nix` in."""
    tmp_path = tmp_path_factory.mktemp("nix-files")
    env = nixtest.nix_env(tmp_path)
    shim = nixtest.make_shim(tmp_path / "nixpkgs-shim")
    return ["--override-input", "nixpkgs", f"path:{shim}", "--no-write-lock-file"], env


def flake_eval(attribute: str, apply: str, shim_env) -> object:
    override, env = shim_env
    result = nixtest.nix(["eval", "--json", f"git+file://{nixtest.REPO}#{attribute}", "--apply", apply, *override],
                         env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


SYSTEMS = ["aarch64-linux", "x86_64-linux"]
PACKAGES = ["adapter", "base-model", "dataset", "default", "image", "infer", "reprolora"]


@needs_nix
def test_flake_outputs_are_the_promised_ones(shim_env):
    system = nixtest.nix_system()
    expected = {
        "packages": ("builtins.mapAttrs (_: builtins.attrNames)", {s: PACKAGES for s in SYSTEMS}),
        "apps": ("builtins.mapAttrs (_: builtins.attrNames)", {s: ["default", "infer"] for s in SYSTEMS}),
        f"checks.{system}": ("builtins.attrNames", ["adapter-reproducible", "infer-runs", "pytest"]),
        "devShells": ("builtins.mapAttrs (_: builtins.attrNames)", {s: ["default"] for s in SYSTEMS}),
        "formatter": ("builtins.attrNames", SYSTEMS),
    }
    for attribute, (apply, names) in expected.items():
        assert flake_eval(attribute, apply, shim_env) == names, attribute


@needs_nix
def test_every_system_evaluates(shim_env):
    """What `nix flake check --all-systems` does before it builds (Nix 2.8 has no --all-systems; its flake check
    evaluates every system): every output of aarch64-linux and x86_64-linux evaluates to derivations."""
    override, env = shim_env
    result = nixtest.nix(["flake", "check", "--no-build", f"git+file://{nixtest.REPO}", *override], env)
    assert result.returncode == 0, result.stderr
    systems_of = ("builtins.mapAttrs (_: packages: builtins.mapAttrs (_: p: p.system) packages)")
    assert flake_eval("packages", systems_of, shim_env) == {s: {p: s for p in PACKAGES} for s in SYSTEMS}


@needs_nix
def test_every_package_says_what_it_is(shim_env):
    meta = flake_eval(f"packages.{nixtest.nix_system()}",
                      "builtins.mapAttrs (_: p: { inherit (p.meta) description; license = p.meta.license.spdxId; "
                      "mainProgram = p.meta.mainProgram or null; homepage = p.meta.homepage or null; })", shim_env)
    for name, fields in meta.items():
        assert fields["description"] and fields["license"] == "Apache-2.0", name
    # A program where there is one; data (a model, a dataset, an adapter, an image archive) has none to name.
    assert {name: fields["mainProgram"] for name, fields in meta.items() if fields["mainProgram"]} == {
        "infer": "reprolora-infer", "reprolora": "reprolora"}
    assert meta["base-model"]["homepage"] == "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"


def test_nix_package_declares_the_dependencies_and_extras_of_pyproject_and_only_the_base_model_uses_gguf():
    pyproject = tomllib.loads((nixtest.REPO / "python" / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}

    nix = (nixtest.REPO / "pkgs" / "reprolora.nix").read_text()
    block = re.search(r"\n  dependencies = \[(.*?)\];", nix, re.S).group(1)
    assert set(block.split()) == names(pyproject["dependencies"])
    extras = re.search(r"\n  optional-dependencies = \{(.*?)\n  \};", nix, re.S).group(1)
    for extra, packages in re.findall(r"(\S+) = \[(.*?)\];", extras):
        assert set(packages.split()) == names(pyproject["optional-dependencies"][extra]), extra
    assert "with python3Packages" not in nix  # called with python3Packages.callPackage, arguments explicit
    assert "reprolora.optional-dependencies.gguf" in (nixtest.REPO / "pkgs" / "base-model.nix").read_text()
    for other in ("adapter", "infer", "image"):
        assert "gguf" not in (nixtest.REPO / "pkgs" / f"{other}.nix").read_text(), other


# pkgs/image.nix called with stand-ins for nixpkgs (the shim's lib): what it passes to
# dockerTools.buildLayeredImage. The infer stand-in's override returns a wrapper named after the adapter it got.
IMAGE_ARGS = """
let
  lib = import ./lib.nix;
  store = name: "/nix/store/${{builtins.substring 0 32 (builtins.hashString "sha256" name)}}-${{name}}";
  package = name: {{ inherit name; outPath = store name; }};
  defaultAdapter = package "reprolora-adapter";
  args = import ./pkgs/image.nix {{
    inherit lib defaultAdapter;
    stdenv.hostPlatform.system = "x86_64-linux";
    dockerTools.buildLayeredImage = args: args;
    reprolora.version = "0.1.0";
    adapter = {adapter};
    baseModel = package "base-model";
    infer.override = {{ adapter, baseModel }}: {{
      outPath = store "infer-for-${{adapter.name}}-${{baseModel.name}}";
      meta.mainProgram = "reprolora-infer";
    }};
    revision = "0123abc";
  }};
in
{{ inherit (args) tag created extraCommands; inherit (args.config) Entrypoint User Labels; }}
"""


def store_path(name: str) -> str:
    return f"/nix/store/{hashlib.sha256(name.encode()).hexdigest()[:32]}-{name}"


@needs_nix
@pytest.mark.parametrize("case", ["no-hashes-committed", "committed", "other-adapter"])
def test_image_serves_and_labels_its_own_adapter_and_checks_the_committed_sha256(tmp_path, case):
    (tmp_path / "pkgs").mkdir()
    shutil.copyfile(nixtest.REPO / "pkgs" / "image.nix", tmp_path / "pkgs" / "image.nix")
    shutil.copyfile(nixtest.SHIM / "lib.nix", tmp_path / "lib.nix")
    weights = "ab" * 32
    if case != "no-hashes-committed":
        (tmp_path / "expected").mkdir()
        (tmp_path / "expected" / "adapter-x86_64-linux.sha256").write_text(
            f"{'cd' * 32}  adapter_config.json\n{weights}  adapter_model.safetensors\n{'ef' * 32}  manifest.json\n"
        )
    adapter_name = "my-adapter" if case == "other-adapter" else "reprolora-adapter"
    adapter = store_path(adapter_name)
    expr = IMAGE_ARGS.format(adapter=f'package "{adapter_name}"')
    result = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--expr", expr],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    image = json.loads(result.stdout)

    assert image["tag"] == "0.1.0" and image["created"] == "1970-01-01T00:00:01Z"
    # The entrypoint is a wrapper for this image's adapter and base model, which the labels name.
    assert image["Entrypoint"] == [store_path(f"infer-for-{adapter_name}-base-model") + "/bin/reprolora-infer"]
    assert image["User"] == "65534:65534"
    labels = image["Labels"]
    assert labels["org.opencontainers.image.revision"] == "0123abc"
    assert labels["org.reprolora.adapter.store-path"] == adapter
    assert labels["org.reprolora.base-model.store-path"] == store_path("base-model")
    check = f'echo "{weights}  {adapter}/adapter_model.safetensors" | sha256sum -c'
    if case == "committed":
        assert labels["org.reprolora.adapter.sha256"] == weights
        assert check in image["extraCommands"]
    else:  # nothing committed, or committed for the default adapter, not this one
        assert "org.reprolora.adapter.sha256" not in labels
        assert "sha256sum" not in image["extraCommands"]


def write_adapter(folder: Path) -> Path:
    folder.mkdir()
    for name in sorted(nixtest.ADAPTER_FILES):
        (folder / name).write_text(f"bytes of {name}\n")
    return folder


def check_hashes(result: Path, expected: Path, *out_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(CHECK_HASHES), str(result), str(expected), *map(str, out_dir)],
                          capture_output=True, text=True)


def test_hash_check_passes_on_the_committed_hashes_and_fails_on_any_other_byte(tmp_path):
    adapter = write_adapter(tmp_path / "result")
    expected = tmp_path / "adapter-x.sha256"
    expected.write_text(nixtest.sha256_lines(adapter))
    assert check_hashes(adapter, expected).returncode == 0

    (adapter / "manifest.json").write_text("other bytes\n")
    failed = check_hashes(adapter, expected)
    assert failed.returncode == 1 and "::error::" in failed.stdout and "manifest.json" in failed.stdout

    (adapter / "manifest.json").write_text("bytes of manifest.json\n")
    (adapter / "extra.txt").write_text("not part of an adapter\n")
    assert check_hashes(adapter, expected).returncode == 1


def test_hash_check_of_the_weights_alone_ignores_the_records_of_the_machine(tmp_path):
    """Committed: the weights (what the job decides under `reference`, the same on every system). The records of
    where the folder was built (manifest, card, peft's config fields) may differ; nothing else may be there."""
    adapter = write_adapter(tmp_path / "result")
    expected = tmp_path / "adapter-x.sha256"
    expected.write_text(f"{nixtest.sha256_lines(adapter).splitlines()[2]}\n")
    assert expected.read_text().endswith("  adapter_model.safetensors\n")
    assert check_hashes(adapter, expected).returncode == 0, check_hashes(adapter, expected).stdout

    for record in ("manifest.json", "README.md", "adapter_config.json"):
        (adapter / record).write_text("built on another machine\n")
    assert check_hashes(adapter, expected).returncode == 0

    (adapter / "adapter_model.safetensors").write_text("other weights\n")
    failed = check_hashes(adapter, expected)
    assert failed.returncode == 1 and "adapter_model.safetensors" in failed.stdout

    (adapter / "adapter_model.safetensors").unlink()
    assert check_hashes(adapter, expected).returncode == 1
    (adapter / "adapter_model.safetensors").write_text("bytes of adapter_model.safetensors\n")
    (adapter / "extra.txt").write_text("not part of an adapter\n")
    failed = check_hashes(adapter, expected)
    assert failed.returncode == 1 and "extra.txt" in failed.stdout


def test_hash_check_without_a_committed_file_warns_and_writes_the_lines_to_commit(tmp_path):
    """A first run on a new system passes (so CI saves its Nix cache) and hands over the lines to commit."""
    adapter = write_adapter(tmp_path / "result")
    missing = check_hashes(adapter, tmp_path / "adapter-x.sha256", tmp_path / "upload")
    assert missing.returncode == 0, missing.stdout + missing.stderr
    assert "::warning::" in missing.stdout and nixtest.sha256_lines(adapter) in missing.stdout
    assert (tmp_path / "upload" / "adapter-x.sha256").read_text() == nixtest.sha256_lines(adapter)
    assert not (tmp_path / "adapter-x.sha256").exists()


def expected_file_problem(path: Path) -> str | None:
    """What is wrong with a hash file of expected/: the Nix route's names the weights, the file the job alone
    decides under `reference` (the others record the machine and toolchain), the pip route's the adapter's
    weights and config (its manifest records the interpreter's patch version, which a pip lock does not pin);
    each line as sha256sum writes it."""
    lines = path.read_text().splitlines()
    if not all(re.fullmatch(r"[0-9a-f]{64}  \S+", line) for line in lines):
        return f"{path.name}: not sha256sum lines"
    names = [line[66:] for line in lines]
    wanted = ["adapter_model.safetensors"] if path.name.startswith("adapter-") else [
        "adapter_config.json", "adapter_model.safetensors"]
    return None if names == wanted else f"{path.name}: names {names}, not {wanted}"


def test_the_expected_file_check_catches_a_wrong_file(tmp_path):
    good = tmp_path / "pip-x86_64-linux-portable.sha256"
    good.write_text(f"{'a' * 64}  adapter_config.json\n{'b' * 64}  adapter_model.safetensors\n")
    assert expected_file_problem(good) is None
    (tmp_path / "adapter-x86_64-linux.sha256").write_text(good.read_text())
    assert "names" in expected_file_problem(tmp_path / "adapter-x86_64-linux.sha256")
    good.write_text("abc  adapter_config.json\n")
    assert "not sha256sum lines" in expected_file_problem(good)


def test_committed_expected_hashes_are_sha256sum_lines_of_the_adapter_files():
    problems = [expected_file_problem(path) for path in sorted((nixtest.REPO / "expected").glob("*.sha256"))]
    assert not [p for p in problems if p], problems


def test_both_nix_systems_expect_the_same_weights():
    """The flake's adapter is trained under `reference`: its weights do not depend on the architecture."""
    assert "profile = \"reference\"" in (nixtest.REPO / "pkgs" / "adapter.toml").read_text()
    lines = {(nixtest.REPO / "expected" / f"adapter-{s}.sha256").read_text() for s in ("x86_64-linux", "aarch64-linux")}
    assert len(lines) == 1, lines


CHECK_CLOSURE = nixtest.REPO / ".github" / "scripts" / "check-closure.sh"
CHECK_LOWER_BOUNDS = nixtest.REPO / ".github" / "scripts" / "check-lower-bounds.py"


def closure_check(*names: str) -> subprocess.CompletedProcess:
    paths = "".join(f"{store_path(name)}\n" for name in names)
    return subprocess.run(["sh", str(CHECK_CLOSURE)], input=paths, capture_output=True, text=True)


def test_closure_check_passes_a_runtime_closure_with_gcc_runtime_libraries():
    result = closure_check("python3-3.13.5", "python3.13-torch-2.11.0", "gcc-14.3.0-lib", "gcc-14.3.0-libgcc",
                           "openblas-0.3.32", "glibc-2.40-66", "reprolora-runtime-0.1.0")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["gcc-14.3.0", "gcc-wrapper-14.3.0", "binutils-2.44", "binutils-wrapper-2.44",
                                  "python3.13-pyside6-6.9.1", "qtbase-6.9.1", "cuda_cudart-12.8.90",
                                  "libcublas-12.8.4.1-lib"])
def test_closure_check_fails_on_a_build_tool_qt_or_cuda(name):
    result = closure_check("python3-3.13.5", name, "gcc-14.3.0-lib")
    assert result.returncode == 1 and "::error::" in result.stdout
    assert result.stdout.splitlines()[0] == store_path(name)


def test_lower_bounds_check_compares_the_installed_versions_with_pyproject(tmp_path):
    passes = subprocess.run([sys.executable, str(CHECK_LOWER_BOUNDS), str(nixtest.REPO / "python" / "pyproject.toml"),
                             "gguf"], capture_output=True, text=True)
    assert passes.returncode == 0, passes.stdout + passes.stderr
    assert "gguf " in passes.stdout and "torch " in passes.stdout

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["torch>=99", "numpy>=1.26"]\n'
                         '[project.optional-dependencies]\ngguf = ["not-installed-here>=1"]\n')
    fails = subprocess.run([sys.executable, str(CHECK_LOWER_BOUNDS), str(pyproject), "gguf"],
                           capture_output=True, text=True)
    assert fails.returncode == 1
    assert "outside >=99" in fails.stdout and "not-installed-here: not installed" in fails.stdout
    assert "numpy" in fails.stdout and "ok >=1.26" in fails.stdout


@needs_nix
def test_overriding_the_scope_reaches_the_adapter_the_infer_wrapper_and_the_image(shim_env):
    """overlays.default gives nixpkgs the package set; one overrideScope of the base model changes every package
    built from it, exactly as overriding each by hand would."""
    override, env = shim_env
    system = nixtest.nix_system()
    expr = f"""
      let
        flake = builtins.getFlake "git+file://{nixtest.REPO}";
        pkgs = (builtins.getFlake "{{shim}}").legacyPackages.{system};
        final = pkgs // flake.overlays.default final pkgs;
        original = final.reproloraPackages;
        otherModel = pkgs.runCommand "other-model" {{ }} "mkdir $out";
        scoped = original.overrideScope (_: _: {{ baseModel = otherModel; }});
        byHand = rec {{
          adapter = original.adapter.override {{ baseModel = otherModel; }};
          infer = original.infer.override {{ inherit adapter; baseModel = otherModel; }};
          image = original.image.override {{ inherit adapter; baseModel = otherModel; }};
        }};
        drv = p: builtins.unsafeDiscardStringContext p.drvPath;
      in
      {{
        differs = builtins.map (name: drv scoped.${{name}} != drv original.${{name}}) [ "adapter" "infer" "image" ];
        sameAsByHand = builtins.map (name: drv scoped.${{name}} == drv byHand.${{name}}) [ "adapter" "infer" "image" ];
        adapterModel = scoped.adapter.baseModel.name;
      }}
    """
    expr = expr.replace("{shim}", override[2])
    result = nixtest.nix(["eval", "--json", "--impure", "--expr", expr], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == {"differs": [True] * 3, "sameAsByHand": [True] * 3,
                                         "adapterModel": "other-model"}
