"""`reprolora report`: one self-contained page, same bytes for the same folders, rendered in headless Chromium."""

import hashlib
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

import tiny
from conftest import run_cli, train_args


@pytest.fixture(scope="module")
def other_seed(tiny_base_model, tiny_dataset, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("seed7")
    (folder / "job.toml").write_text(tiny.CONFIG.replace("seed = 42", "seed = 7"))
    run_cli(*train_args(folder / "job.toml", tiny_base_model, tiny_dataset, folder / "adapter"))
    return folder / "adapter"


def test_page_is_self_contained_and_deterministic(tiny_adapter, other_seed, tmp_path):
    a, b = tmp_path / "a.html", tmp_path / "b.html"
    run_cli("report", str(tiny_adapter), str(other_seed), "-o", str(a))
    run_cli("report", str(tiny_adapter), str(other_seed), "-o", str(b))
    assert a.read_bytes() == b.read_bytes()
    page = a.read_text()
    # Nothing the browser would fetch: no scripts, no external references of any kind.
    assert "<script" not in page and not re.search(r'(src|href)="(?!#)', page) and "url(" not in page
    assert page.count("<polyline") == 2 and "<svg" in page
    assert "different: another seed (config: seed)" in page
    manifest_sha = hashlib.sha256((tiny_adapter / "manifest.json").read_bytes()).hexdigest()
    assert manifest_sha in page
    assert "Why pin seeds?" in page and "lora_A.weight" in page


def test_bad_folder_writes_nothing(tiny_adapter, tmp_path):
    out = tmp_path / "r.html"
    result = run_cli("report", str(tiny_adapter), str(tmp_path / "missing"), "-o", str(out), check=False)
    assert result.returncode == 2 and "adapter folder not found" in result.stderr and not out.exists()


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and unfiltered rows of an 8-bit, non-interlaced PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and interlace == 0
    channels = {2: 3, 6: 4, 0: 1, 4: 2}[colour]
    raw, stride = zlib.decompress(idat), width * channels
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        rows.append(bytes(line))
        previous = line
    return width, height, rows


def chromium_screenshot(page: Path, png: Path, profile: Path) -> str:
    """Render `page` headless into `png`; returns Chromium's log, where console messages appear."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed here (.ci/run installs it)")
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--hide-scrollbars",
            "--window-size=1200,1600",
            f"--screenshot={png}",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert png.is_file(), result.stderr[-2000:]
    return result.stderr


def console_errors(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def test_renders_in_headless_chromium(tiny_adapter, other_seed, tmp_path):
    page = tmp_path / "report.html"
    run_cli("report", str(tiny_adapter), str(other_seed), "-o", str(page))
    # The console check can fail: a page that logs an error is caught.
    broken = tmp_path / "broken.html"
    broken.write_text(
        "<!DOCTYPE html><html><body><p>x</p><script>console.error('planted'); undefined_call();</script></body></html>"
    )
    assert console_errors(chromium_screenshot(broken, tmp_path / "broken.png", tmp_path / "profile-broken"))

    log = chromium_screenshot(page, tmp_path / "report.png", tmp_path / "profile")
    assert not console_errors(log), console_errors(log)
    width, height, rows = png_pixels(tmp_path / "report.png")
    assert (width, height) == (1200, 1600)
    distinct = {row[i : i + 3] for row in rows[::8] for i in range(0, len(row), 24)}
    dark = sum(1 for row in rows for v in row[::4] if v < 100)
    assert len(distinct) > 20, "the screenshot is blank or nearly so"
    assert dark > 2000, "no text or lines rendered"
