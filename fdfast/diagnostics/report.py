"""report.html: one self-contained page (figures embedded as base64 PNG) with every figure and table."""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from fdfast.io import atomic_write_text

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;color:#222;
padding:0 1em}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 3px}"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _num(x, fmt="{:.3g}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _layer_table(dist: dict, div: dict) -> str:
    rows = ["<tr><th>layer</th><th>module</th><th>heads</th><th>mean distance (px)</th><th>min (px)</th>"
            "<th>max (px)</th><th>std across heads (px)</th><th>head similarity</th></tr>"]
    for i, (heads, d, name) in enumerate(zip(dist["layers"], div["layers"], dist["layer_names"]), start=1):
        rows.append(f"<tr><td>{i}</td><td>{html.escape(name)}</td><td>{len(heads)}</td>"
                    f"<td>{_num(sum(heads) / len(heads), '{:.1f}')}</td><td>{_num(d['distance_min'], '{:.1f}')}</td>"
                    f"<td>{_num(d['distance_max'], '{:.1f}')}</td><td>{_num(d['distance_std'], '{:.1f}')}</td>"
                    f"<td>{_num(d['similarity'], '{:.3f}')}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def write_report(path, *, models: list[dict], diversity: list[dict], landscape: dict | None, files: list[str],
                 notes: list[str], timing: dict) -> Path:
    """Write report.html beside the figures in ``files`` (names relative to its folder)."""
    path = Path(path)
    out = path.parent
    pngs = {f for f in files if f.endswith(".png") and (out / f).is_file()}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fdfast diagnose</title>"
             f"<style>{CSS}</style></head><body><h1>fdfast diagnose: why FD works</h1>"]
    parts.append("<table><tr><th>model</th><th>source</th><th>input (px)</th><th>images</th><th>layers</th></tr>")
    for m in models:
        parts.append(f"<tr><td>{html.escape(m['label'])}</td><td><code>{html.escape(m['source'])}</code></td>"
                     f"<td>{m['image_size'][0]}x{m['image_size'][1]}</td><td>{m['images']}</td>"
                     f"<td>{len(m['layers'])}</td></tr>")
    parts.append("</table>")
    parts.append(f"<p class='note'>Attention statistics took {timing['attention_s']:.1f} s; "
                 f"all diagnostics {timing['total_s']:.1f} s. Data files: "
                 + ", ".join(f"<a href='{html.escape(f)}'>{html.escape(f)}</a>" for f in files
                             if f.endswith(".json") and (out / f).is_file()) + ".</p>")
    for n in notes:
        parts.append(f"<p class='note'>Note: {html.escape(n)}</p>")

    parts.append("<h2>Average attention distance</h2><p>Per head: the attention-weighted mean distance (pixels "
                 "of the model's input) between a query patch and the key patches, averaged over queries and "
                 "images (Dosovitskiy et al.). FD students keep heads at many distances in deep layers instead "
                 "of collapsing to one.</p>")
    if "attention_distance.png" in pngs:
        parts.append(_img(out / "attention_distance.png", "attention distance per head and layer"))
    parts.append("<h2>Head diversity</h2><p>Mean pairwise cosine similarity of the heads' attention maps (1: all "
                 "heads identical, 0: disjoint) and the spread of attention distance across heads; FD makes "
                 "heads more diverse.</p>")
    if "head_diversity.png" in pngs:
        parts.append(_img(out / "head_diversity.png", "head similarity per layer"))
    for m, d in zip(models, diversity):
        parts.append(f"<h3>{html.escape(m['label'])}</h3>" + _layer_table(m, d))
    parts.append("<h2>Attention maps</h2><p>Rows: heads; columns: layers; the attention of one query patch. "
                 "Below: full patch-to-patch maps; diagonal bands are relative-position heads, vertical stripes "
                 "are column heads.</p>")
    for f in sorted(f for f in pngs if f.startswith("attention_maps")):
        parts.append(_img(out / f, f))

    parts.append("<h2>Loss landscape</h2>")
    if landscape is None:
        parts.append("<p>Not computed (<code>--landscape-loss none</code>).</p>")
    else:
        parts.append(f"<p>Loss: {html.escape(landscape['loss_name'])}, on {landscape['images']} images; "
                     f"directions: {html.escape(landscape['directions'])}. A flatter basin (smaller curvature) "
                     "is the paper's sign of optimisation friendliness.</p>")
        parts.append("<table><tr><th>model</th><th>loss at the weights</th><th>max on the 1-D slice</th>"
                     "<th>1-D curvature d²L/dα²</th><th>projection</th></tr>")
        for m in landscape["models"]:
            one = m["1d"]
            centre = one["losses"][len(one["losses"]) // 2]
            parts.append(f"<tr><td>{html.escape(m['label'])}</td><td>{_num(centre, '{:.4g}')}</td>"
                         f"<td>{_num(max(one['losses']), '{:.4g}')}</td><td>{_num(one['curvature'], '{:.4g}')}</td>"
                         f"<td>{html.escape(m.get('projection') or '–')}</td></tr>")
        parts.append("</table>")
        for f in ("loss_landscape_1d.png", "loss_landscape_2d.png"):
            if f in pngs:
                parts.append(_img(out / f, f))
    parts.append("</body></html>\n")
    atomic_write_text(path, "\n".join(parts))
    return path
