import os
import stat

import pytest

from reprolora.core.canonical import canonical_json, publish_dir
from reprolora.core.errors import ReproloraError


def test_canonical_json_is_sorted_and_stable():
    assert canonical_json({"b": 1, "a": [2, 1]}) == b'{\n  "a": [\n    2,\n    1\n  ],\n  "b": 1\n}\n'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_publish_renames_into_place_with_fixed_modes(tmp_path):
    target = tmp_path / "sub" / "out"
    with publish_dir(target) as staging:
        (staging / "f").write_bytes(b"x")
        os.chmod(staging / "f", 0o600)
    assert (target / "f").read_bytes() == b"x"
    assert stat.S_IMODE((target / "f").stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["out"]


def test_failure_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with publish_dir(target) as staging:
            (staging / "f").write_bytes(b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_existing_target_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(ReproloraError, match="output folder already exists"):
        with publish_dir(tmp_path / "out"):
            pass
