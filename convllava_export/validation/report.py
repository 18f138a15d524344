"""Reports: JSON for pipelines, one self-contained HTML page (inline SVG, no scripts) for people."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2"]
def simulated_note(device: str = "cpu") -> str:
    """What a simulated build is, said wherever one is reported (validate --device: where it ran)."""
    return f"simulated on {device.upper()} with ModelOpt fake quantization; a real engine's kernels may differ"


def simulated_latency(device: str = "cpu") -> str:
    return f"torch on {device.upper()} with fake quantization: not an engine's latency"


SIMULATED_NOTE = simulated_note()


def is_simulated(build: dict[str, Any]) -> bool:
    return bool(build.get("simulated") or build.get("info", {}).get("simulated"))


def _svg(width: int, height: int, body: str, title: str) -> str:
    return (
        f'<svg class="plot" role="img" aria-label="{html.escape(title)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>{body}</svg>'
    )


def accuracy_latency_plot(report: dict[str, Any]) -> str:
    """Scatter: x = time to first token (ms), y = quality (task accuracy, else token agreement).

    Simulated builds are left out: their latency is torch's on CPU, not an engine's."""
    w, h, pad = 520, 320, 50
    pts = []
    for i, b in enumerate(report["builds"]):
        if is_simulated(b):
            continue
        m = b["metrics"]
        y = m["task_accuracy"] if m["task_accuracy"] is not None else m["token_agreement"]
        pts.append((b["name"], m["latency"]["ttft_s"] * 1e3, y, COLOURS[i % len(COLOURS)]))
    ref = report["reference"]
    if ref.get("latency"):
        y = ref["task_accuracy"] if ref["task_accuracy"] is not None else 1.0
        pts.append((f"reference (torch {ref.get('dtype', 'fp32')})", ref["latency"]["ttft_s"] * 1e3, y, "#444"))
    xmax = max(p[1] for p in pts) * 1.15 or 1.0
    body = [f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="#333"/>', f'<line x1="{pad}" y1="10" x2="{pad}" y2="{h - pad}" stroke="#333"/>']
    for k in range(6):
        yv = k / 5
        yy = h - pad - yv * (h - pad - 10)
        body.append(f'<text x="{pad - 6}" y="{yy + 4:.1f}" font-size="10" text-anchor="end">{yv:.1f}</text>')
    for k in range(5):
        xv = xmax * k / 4
        xx = pad + (w - pad - 10) * k / 4
        body.append(f'<text x="{xx:.1f}" y="{h - pad + 14}" font-size="10" text-anchor="middle">{xv:.0f}</text>')
    body.append(f'<text x="{(w + pad) / 2}" y="{h - 8}" font-size="11" text-anchor="middle">time to first token (ms)</text>')
    ylabel = "task accuracy (token agreement when no answers)"
    body.append(f'<text x="12" y="{(h - pad) / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 12 {(h - pad) / 2})">{ylabel}</text>')
    for k, (name, x, y, c) in enumerate(sorted(pts, key=lambda p: p[1])):
        cx = pad + (w - pad - 10) * x / xmax
        cy = h - pad - y * (h - pad - 10)
        dy = -8 - 12 * (k % 3)  # stagger labels so neighbours do not overprint
        body.append(f'<circle class="point" cx="{cx:.1f}" cy="{cy:.1f}" r="6" fill="{c}"><title>{html.escape(name)}: {x:.1f} ms, {y:.3f}</title></circle>')
        body.append(f'<text x="{cx + 8:.1f}" y="{cy + dy:.1f}" font-size="10" fill="{c}">{html.escape(name)}</text>')
    return _svg(w, h, "".join(body), "accuracy against latency per build")


def cosine_histogram(build: dict[str, Any], colour: str) -> str:
    w, h, pad = 360, 200, 30
    values = np.array([r["cosine"] for r in build["items"]])
    lo = min(0.9, float(values.min()))
    counts, edges = np.histogram(values, bins=20, range=(lo, 1.0))
    top = max(int(counts.max()), 1)
    bw = (w - 2 * pad) / len(counts)
    body = [f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#333"/>']
    for i, c in enumerate(counts):
        bh = (h - 2 * pad) * c / top
        body.append(f'<rect class="bar" x="{pad + i * bw:.1f}" y="{h - pad - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" fill="{colour}"><title>{edges[i]:.5f}–{edges[i + 1]:.5f}: {c}</title></rect>')
    body.append(f'<text x="{pad}" y="{h - 10}" font-size="10">{lo:.3f}</text><text x="{w - pad}" y="{h - 10}" font-size="10" text-anchor="end">1.000</text>')
    body.append(f'<text x="{w / 2}" y="14" font-size="11" text-anchor="middle">{html.escape(build["name"])}: image_embeds cosine ({len(values)} images)</text>')
    return _svg(w, h, "".join(body), f"cosine histogram {build['name']}")


def _thumb(image) -> str:
    im = image.copy()
    im.thumbnail((160, 160))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _build_row(b: dict[str, Any], failures: list[dict[str, Any]], note: str, latency_note: str) -> str:
    """One build's row of the summary table; metrics whose gate it missed are marked."""
    e = html.escape
    m = b["metrics"]
    failed = {f["metric"] for f in failures if f["build"] == b["name"]}
    cls = lambda k: ' class="fail"' if k in failed else ""  # noqa: E731
    acc = "–" if m["task_accuracy"] is None else f"{m['task_accuracy']:.3f}"
    sim = is_simulated(b)
    name = e(b["name"]) + (f' <span class="sim-badge" title="{e(note)}">simulated*</span>' if sim else "")
    lat = [f"{m['latency']['vision_s'] * 1e3:.1f}", f"{m['latency']['ttft_s'] * 1e3:.1f}", f"{m['latency']['decode_tokens_per_s']:.1f}"]
    if sim:
        lat = [f'<span class="sim-latency" title="{e(latency_note)}">{v}†</span>' for v in lat]
    row_cls = ' class="simulated"' if sim else ""
    return (
        f"<tr{row_cls}><td>{name}</td><td>{e(str(b['info'].get('vision', '')))}</td><td>{e(str(b['info'].get('llm', '')))}</td>"
        f"<td{cls('vision_cosine_mean')}>{m['vision_cosine']['mean']:.6f} / {m['vision_cosine']['min']:.6f}</td>"
        f"<td{cls('kl_mean')}>{m['kl_mean']:.5f}</td><td{cls('top1_agreement')}>{m['top1_agreement']:.4f}</td>"
        f"<td>{m['greedy_exact_match']:.3f}</td><td>{m['token_agreement']:.3f}</td><td{cls('task_accuracy')}>{acc}</td>"
        f"<td>{lat[0]}</td><td>{lat[1]}</td><td>{lat[2]}</td></tr>"
    )


def _reference_row(ref: dict[str, Any]) -> str:
    """The reference's row: exact against itself, with its own accuracy and latency."""
    e = html.escape
    ref_acc = "–" if ref.get("task_accuracy") is None else f"{ref['task_accuracy']:.3f}"
    ref_lat = ref.get("latency") or {}
    return (
        f"<tr class='ref'><td>reference</td><td>torch {e(ref.get('dtype', 'fp32'))}</td><td>torch {e(ref.get('dtype', 'fp32'))}</td><td>1</td><td>0</td><td>1</td><td>1</td><td>1</td><td>{ref_acc}</td>"
        f"<td>{ref_lat.get('vision_s', 0) * 1e3:.1f}</td><td>{ref_lat.get('ttft_s', 0) * 1e3:.1f}</td><td>{ref_lat.get('decode_tokens_per_s', 0):.1f}</td></tr>"
    )


def _worst_cases(b: dict[str, Any], images: dict[str, Any], worst: int) -> list[str]:
    """A build's `worst` items (lowest token agreement, then cosine): image, question, and the reference's, the build's and the true answers."""
    e = html.escape
    cases = []
    for r in sorted(b["items"], key=lambda r: (r["token_agreement"], r["cosine"]))[:worst]:
        img = images.get(r["id"])
        src = _thumb(img) if img is not None else ""
        cases.append(
            f"<div class='case'><img alt='{e(r['id'])}' src='{src}'/><div><b>{e(b['name'])}</b> · {e(r['id'])} · cosine {r['cosine']:.5f} · "
            f"token agreement {r['token_agreement']:.2f}<br/><i>{e(r['question'])}</i>"
            f"<table><tr><th>reference</th><td>{e(r['reference_answer'])}</td></tr><tr><th>build</th><td>{e(r['answer'])}</td></tr>"
            + (f"<tr><th>truth</th><td>{e(' | '.join(r['answers']))}</td></tr>" if r["answers"] else "")
            + "</table></div></div>"
        )
    return cases


def _simulation_note(report: dict[str, Any], simulated: list[dict[str, Any]], note: str, latency_note: str) -> str:
    """What the simulated builds are and how they were calibrated ("" without any)."""
    if not simulated:
        return ""
    e = html.escape
    cal = (report.get("simulation") or {}).get("calibration") or {}
    cal_text = f" Calibration: {cal.get('images')} images and {cal.get('prompts')} multimodal prompts from {e(str(cal.get('source')))}." if cal else ""
    detail = "; ".join(
        f"<b>{e(b['name'])}</b>: ModelOpt {e(str(b['info'].get('modelopt', '')))} {e(str(b['info'].get('modelopt_config', '')))}"
        + (f", block {b['info']['awq_block_size']}" if b["info"].get("awq_block_size") else "")
        for b in simulated
    )
    return (
        f'<p class="sim-note" id="simulated-note">* {e(note)}. The reference model with its weights (and activations, where the format '
        f"quantizes them) rounded to the format and back, fp32 arithmetic otherwise; same inputs and metrics as the real builds.{cal_text} {detail}.<br/>† {e(latency_note)}; "
        f"simulated builds are not in the latency plot.</p>"
    )


def render_html(report: dict[str, Any], images: dict[str, Any], worst: int = 4) -> str:
    """The whole page: verdict, summary table, plots and worst cases."""
    e = html.escape
    simulated = [b for b in report["builds"] if is_simulated(b)]
    device = report.get("reference", {}).get("device", "cpu")
    note, latency_note = simulated_note(device), simulated_latency(device)
    rows = [_build_row(b, report["failures"], note, latency_note) for b in report["builds"]]
    ref = report["reference"]
    rows.append(_reference_row(ref))
    hists = "".join(cosine_histogram(b, COLOURS[i % len(COLOURS)]) for i, b in enumerate(report["builds"]))
    cases = [case for b in report["builds"] for case in _worst_cases(b, images, worst)]
    sim_note = _simulation_note(report, simulated, note, latency_note)
    verdict = "PASSED" if report["passed"] else "FAILED"
    fails = "".join(
        f"<li><b>{e(f['build'])}</b>: {e(f['metric'])} = {f['value']:.5f}, needs {f['op']} {f['threshold']} (worst item: {e(str(f['worst_item']))})</li>" for f in report["failures"]
    )
    gates = ", ".join(f"{k} {v}" for k, v in report["gates"].items() if v is not None) or "none"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>convllava-export validation</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}
.fail{{background:#fdd;font-weight:bold}} .ref td{{color:#555}} .case{{display:flex;gap:12px;margin:10px 0;border-top:1px solid #eee;padding-top:8px}}
.verdict-PASSED{{color:#080}} .verdict-FAILED{{color:#b00}} .plots{{display:flex;flex-wrap:wrap;gap:16px}}
.simulated td{{background:#f6f3ff}} .sim-badge{{font-size:11px;color:#5a3fb0;border:1px solid #5a3fb0;border-radius:3px;padding:0 3px}} .sim-latency{{color:#888}} .sim-note{{font-size:13px;color:#444}}</style></head><body>
<h1>Accuracy versus quantization</h1>
<p>Reference: <code>{e(str(ref['checkpoint']))}</code> (torch {e(ref.get('dtype', 'fp32'))}). Data: {report['data']['items']} items ({e(', '.join(report['data']['kinds']))}),
greedy decoding, at most {report['data']['max_new_tokens']} new tokens. Generated {e(report['created'])}.</p>
<h2 class="verdict-{verdict}" id="verdict">Gates ({e(gates)}): {verdict}</h2><ul>{fails}</ul>
<h2>Builds</h2>
<table id="summary"><tr><th>build</th><th>vision</th><th>LLM</th><th>cosine mean / min</th><th>KL</th><th>top-1 agreement</th>
<th>greedy exact</th><th>token agreement</th><th>task accuracy</th><th>vision ms</th><th>TTFT ms</th><th>decode tok/s</th></tr>{''.join(rows)}</table>{sim_note}
<h2>Accuracy against latency</h2><div class="plots">{accuracy_latency_plot(report)}</div>
<h2>Cosine of image embeddings</h2><div class="plots">{hists}</div>
<h2>Worst cases</h2>{''.join(cases)}
</body></html>
"""


SUMMARY_COLUMNS = ("build", "cosine mean/min", "KL", "top-1", "greedy exact", "accuracy", "TTFT ms", "tok/s")


def summary_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row of SUMMARY_COLUMNS per build, as the terminal shows them."""
    rows = []
    for b in report["builds"]:
        m = b["metrics"]
        acc = "-" if m["task_accuracy"] is None else f"{m['task_accuracy']:.3f}"
        rows.append((b["name"] + (" (simulated)" if b.get("simulated") else ""), f"{m['vision_cosine']['mean']:.5f}/{m['vision_cosine']['min']:.5f}", f"{m['kl_mean']:.4f}",
                     f"{m['top1_agreement']:.3f}", f"{m['greedy_exact_match']:.2f}", acc, f"{m['latency']['ttft_s'] * 1e3:.1f}", f"{m['latency']['decode_tokens_per_s']:.0f}"))
    return rows


def describe_failure(failure: dict[str, Any]) -> str:
    """A missed gate (run.check_gates) in one line."""
    f = failure
    return f"{f['build']}: {f['metric']} = {f['value']:.5f} (needs {f['op']} {f['threshold']}; worst item {f['worst_item']})"


def write_reports(report: dict[str, Any], images: dict[str, Any], folder: str | Path) -> tuple[Path, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, html_path = folder / "report.json", folder / "report.html"
    json_path.write_text(json.dumps(report, indent=2))
    html_path.write_text(render_html(report, images))
    return json_path, html_path
