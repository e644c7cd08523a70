"""`reprolora report A [B ...] -o report.html`: one self-contained page about one or more adapters.

Each run's hashes, inputs, toolchain, pins, metrics and probe answers; the loss curves of all runs overlaid in an
inline SVG; with two or more runs, the diff of each against the first. No script, no font, no image is fetched
when the page is opened, and the bytes depend only on the folders and the names given: no clock, no host name.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from reprolora.audit import diff
from reprolora.core import manifest
from reprolora.core.canonical import sha256_file, write_file
from reprolora.core.errors import ReproloraError

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .5em 0 1em; max-width: 100%; } th { background: #f3f3f3; }
td, th { border: 1px solid #ddd; padding: .2em .6em; text-align: left; vertical-align: top; overflow-wrap: anywhere; }
code, .hash { font-family: ui-monospace, monospace; font-size: .92em; } .hash { word-break: break-all; }
table.wide { width: 100%; table-layout: fixed; } td:first-child { overflow-wrap: normal; }
.same { color: #2a7a2a; font-weight: bold; } .differs { color: #b02020; font-weight: bold; }
.verdict { font-size: 1.15em; padding: .6em .8em; background: #f6f6f6; border-left: 4px solid #888; }
.swatch { display: inline-block; width: 1em; height: .6em; margin-right: .4em; }
pre { white-space: pre-wrap; background: #f8f8f8; padding: .5em; margin: 0; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(rows: list[tuple[Any, ...]], head: tuple[str, ...] | None = None, widths: tuple[int, ...] = ()) -> str:
    """An HTML table; `widths` (percent per column) fixes the layout of a table whose cells hold long values."""
    out = ['<table class="wide">' + "".join(f'<col style="width:{w}%">' for w in widths)] if widths else ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _number(x: float) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def loss_svg(traces: list[tuple[str, list[float]]], width: int = 760, height: int = 320) -> str:
    """The loss traces as polylines on shared axes, one colour per run, with tick labels and a legend."""
    left, right, top, bottom = 64, 16, 16, 40
    values = [v for _, trace in traces for v in trace]
    steps = max((len(trace) for _, trace in traces), default=0)
    if not values:
        return "<p>No loss trace recorded.</p>"
    low, high = min(values), max(values)
    if high == low:
        low, high = low - 0.5, high + 0.5
    span_x = max(steps - 1, 1)

    def x(step: int) -> float:
        return left + (width - left - right) * step / span_x

    def y(value: float) -> float:
        return top + (height - top - bottom) * (high - value) / (high - low)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="training loss per step">',
        f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
        'fill="#fff" stroke="#999"/>',
    ]
    for i in range(5):
        value = low + (high - low) * i / 4
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(value):.1f}" y2="{y(value):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y(value) + 4:.1f}" font-size="11" text-anchor="end">{value:.3f}</text>')
    tick_every = max(1, round(span_x / 8))
    for step in range(0, steps, tick_every):
        parts.append(
            f'<text x="{x(step):.1f}" y="{height - bottom + 16}" font-size="11" text-anchor="middle">{step}</text>'
        )
    parts.append(
        f'<text x="{(left + width - right) / 2:.1f}" y="{height - 6}" font-size="12" text-anchor="middle">'
        "optimizer step</text>"
    )
    parts.append(
        f'<text x="14" y="{(top + height - bottom) / 2:.1f}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {(top + height - bottom) / 2:.1f})">training loss</text>'
    )
    for number, (label, trace) in enumerate(traces):
        colour = PALETTE[number % len(PALETTE)]
        points = " ".join(f"{x(step):.1f},{y(value):.1f}" for step, value in enumerate(trace))
        dash = ' stroke-dasharray="6 4"' if number % 2 else ""  # overlaid identical curves stay visible
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{points}">'
            f"<title>{_e(label)}</title></polyline>"
        )
    parts.append("</svg>")
    legend = " ".join(
        f'<span><span class="swatch" style="background:{PALETTE[n % len(PALETTE)]}"></span>{_e(label)}</span>'
        for n, (label, _) in enumerate(traces)
    )
    return "\n".join(parts) + f"\n<p>{legend}</p>"


def _run_section(label: str, folder: Path, m: manifest.Manifest) -> str:
    files = [
        (f"<code>{_e(name)}</code>", f'<span class="hash">{_e(entry.sha256)}</span>', entry.size)
        for name, entry in sorted(m.files.items())
    ]
    files.insert(
        0,
        (
            "<code>manifest.json</code>",
            f'<span class="hash">{_e(sha256_file(folder / manifest.FILENAME))}</span>',
            (folder / manifest.FILENAME).stat().st_size,
        ),
    )
    data = m.inputs.dataset
    inputs = [
        ("base model", _e(m.inputs.base_model.name)),
        (
            "base model files",
            "<br>".join(
                f'<code>{_e(n)}</code> <span class="hash">{_e(h)}</span>'
                for n, h in sorted(m.inputs.base_model.files.items())
            ),
        ),
        (
            "dataset",
            f"{_e(data.name)}, {data.examples} examples ({len(data.train_indices)} train, "
            f"{len(data.eval_indices)} eval)",
        ),
        ("dataset sha256", f'<span class="hash">{_e(data.sha256)}</span>'),
    ]
    config = [
        (f"<code>{_e(k)}</code>", _e(diff.shorten(v, 120))) for k, v in sorted(diff.flatten(m.inputs.config).items())
    ]
    tools = [(_e(k), _e(v)) for k, v in sorted(m.toolchain.items())]
    pinned = [(f"<code>{_e(k)}</code>", _e(v)) for k, v in sorted(diff.flatten(m.pins.to_dict()).items())]
    metrics = [(_e(k), _e(_number(v))) for k, v in sorted(m.metrics.to_dict().items())]
    probes = [
        (_e(p.prompt), f"<pre>{_e(p.text)}</pre>", f"{len(p.token_ids)} tokens, {_e(p.finish_reason)}")
        for p in m.probes.results
    ]
    return "\n".join(
        [
            f"<h2>{_e(label)}</h2>",
            "<h3>Files</h3>",
            _table(files, ("file", "sha256", "bytes")),
            "<h3>Inputs</h3>",
            _table(inputs),
            "<h3>Config</h3>",
            _table(config),
            "<h3>Toolchain</h3>",
            _table(tools),
            "<h3>Pins</h3>",
            _table(pinned),
            "<h3>Metrics</h3>",
            _table(metrics),
            f"<h3>Probes (greedy, up to {m.probes.max_new_tokens} tokens)</h3>",
            _table(probes, ("prompt", "answer", "")),
        ]
    )


def _diff_section(label_a: str, label_b: str, d: diff.Diff) -> str:
    status = lambda s: f'<span class="{"same" if s == "identical" else "differs"}">{_e(s)}</span>'  # noqa: E731
    parts = [
        f"<h2>Diff: {_e(label_a)} vs {_e(label_b)}</h2>",
        f'<p class="verdict">{_e(d.verdict)}</p>',
        _table([(f"<code>{_e(f.name)}</code>", status(f.status)) for f in d.files], ("file", "")),
    ]
    changed = [t for t in d.tensors if t.status != "identical"]
    if d.tensors:
        parts.append(f"<h3>Tensors: {len(changed)} of {len(d.tensors)} differ</h3>")
    if changed:
        fmt = lambda v: "" if v is None else _e(_number(v))  # noqa: E731
        parts.append(
            _table(
                [
                    (
                        f"<code>{_e(t.name)}</code>",
                        status(t.status),
                        f"{t.differing}/{t.elements}",
                        fmt(t.max_abs),
                        fmt(t.max_rel),
                        fmt(t.max_ulp),
                        _e(t.detail),
                    )
                    for t in changed
                ],
                ("tensor", "", "differing", "max |a-b|", "max rel", "max ULP", ""),
            )
        )
    if d.changes:
        parts.append("<h3>Manifest differences</h3>")
        parts.append(
            _table(
                [
                    (_e(c.group), f"<code>{_e(c.key)}</code>", _e(diff.shorten(c.a, 80)), _e(diff.shorten(c.b, 80)))
                    for c in d.changes
                ],
                ("group", "key", label_a, label_b),
                widths=(9, 23, 34, 34),
            )
        )
    if d.loss_divergence:
        ld = d.loss_divergence
        parts.append(f"<p>The loss traces first differ at step {ld['step']}: {_e(ld['a'])} vs {_e(ld['b'])}.</p>")
    for p in d.probes:
        tokens = f" ({_e(p['a'])} vs {_e(p['b'])})" if p.get("index") is not None else ""
        parts.append(f"<p>Probe {_e(repr(p['prompt']))}: {_e(p['detail'])}{tokens}.</p>")
    return "\n".join(parts)


def render(folders: list[Path], labels: list[str] | None = None) -> str:
    """The page for `folders` (labels default to the paths as given). Raises ReproloraError on a bad folder."""
    labels = labels or [str(f) for f in folders]
    manifests = [manifest.read(f) for f in folders]
    body = [f"<h1>reprolora report: {len(folders)} run{'s' if len(folders) > 1 else ''}</h1>"]
    summary = [
        (
            _e(label),
            f'<span class="hash">{_e(sha256_file(folder / manifest.FILENAME))}</span>',
            _e(_number(m.metrics.eval_loss_before)) + " &rarr; " + _e(_number(m.metrics.eval_loss_after)),
            _e(m.metrics.steps),
        )
        for label, folder, m in zip(labels, folders, manifests, strict=True)
    ]
    body.append(_table(summary, ("run", "manifest.json sha256", "eval loss", "steps")))
    diffs = [diff.diff(folders[0], folder) for folder in folders[1:]]
    body += [
        f'<p class="verdict">{_e(labels[0])} vs {_e(label)}: {_e(d.verdict)}</p>'
        for label, d in zip(labels[1:], diffs, strict=True)
    ]
    body.append("<h2>Training loss</h2>")
    body.append(loss_svg([(label, m.loss_trace) for label, m in zip(labels, manifests, strict=True)]))
    body += [_diff_section(labels[0], label, d) for label, d in zip(labels[1:], diffs, strict=True)]
    for label, folder, m in zip(labels, folders, manifests, strict=True):
        body.append(_run_section(label, folder, m))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\n"
        f"<title>reprolora report</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write(folders: list[Path], out: Path) -> None:
    """Render first, then write: a bad folder leaves no file behind."""
    if not out.parent.is_dir():
        raise ReproloraError(f"{out.parent}: output folder not found")
    page = render(folders)
    write_file(out, page.encode("utf-8"))
