"""Check that the Python packages this interpreter sees satisfy python/pyproject.toml's requirements.

    python .github/scripts/check-lower-bounds.py python/pyproject.toml [EXTRA...]

CI runs it in the pinned nixpkgs' Python with the library's dependencies (and the extras named): each version is
the one the installed distribution's metadata states, compared as PEP 440 versions (nixpkgs' own version string,
such as gguf's llama.cpp build number, is not what pip or this compares). Prints one line a requirement; exits 1 if
any is missing or out of range.
"""

from __future__ import annotations

import importlib.metadata
import sys
import tomllib

from packaging.requirements import Requirement


def problems(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    found = []
    for line in requirements:
        requirement = Requirement(line)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            print(f"{requirement.name}: not installed (needs {requirement.specifier})")
            found.append(requirement.name)
            continue
        ok = requirement.specifier.contains(version, prereleases=True)
        print(f"{requirement.name} {version}: {'ok' if ok else 'outside'} {requirement.specifier}")
        if not ok:
            found.append(requirement.name)
    return found


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: check-lower-bounds.py PYPROJECT [EXTRA...]")
    sys.exit(1 if problems(sys.argv[1], sys.argv[2:]) else 0)
