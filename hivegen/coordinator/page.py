"""The coordinator's status page for people: `/` renders what `/status` and `/leaderboard` say as one HTML page.

Every string on it comes from strangers (DHT records, reports), so every one goes through `html.escape`; the page
runs no script (its Content-Security-Policy forbids any) and refreshes itself with a meta refresh."""

from __future__ import annotations

import html
import time
from typing import Any

from hivegen.credits.units import format_credits
from hivegen.errors import format_blocks

REFRESH_SECONDS = 10
PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f", "#bab0ac"]

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #1d2433; background: #f7f8fa; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 6px; }
.muted { color: #667085; } .ok { color: #1a7f37; font-weight: 600; } .gap { color: #c62828; font-weight: 600; }
section.model { background: #fff; border: 1px solid #dfe3ea; border-radius: 8px; padding: 14px 18px; margin: 14px 0; }
section.model h2 { margin-top: 0; }
.bar { display: grid; gap: 1px; margin: 10px 0 4px; }
.cell { height: 18px; background: #eef0f4; }
.lane { font-size: 12px; color: #667085; white-space: nowrap; overflow: hidden; padding-right: 8px; }
.missing { background: #e53935; } .covered { background: #43a047; }
table { border-collapse: collapse; width: 100%; margin-top: 8px; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eceef2; }
th { color: #475467; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 12px; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
"""


def e(value: object) -> str:
    """Escape anything for HTML text or an attribute value."""
    return html.escape(str(value), quote=True)


def render_page(status: dict[str, Any], leaders: dict[str, Any], now: float | None = None) -> str:
    """The whole page: each model with its block bar and nodes, then the leaderboard and the reported nodes."""
    now = time.time() if now is None else now
    models = status.get("models", [])
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>hivegen swarm status</title><style>{STYLE}</style></head><body>",
        "<h1>hivegen swarm</h1>",
        f'<div class="muted">{len(models)} model(s) · refreshed {e(time.strftime("%H:%M:%S", time.localtime(now)))}'
        f" · this page reloads every {REFRESH_SECONDS} s · JSON at <code>/status</code>, metrics at "
        "<code>/metrics</code></div>",
    ]
    if status.get("error"):
        parts.append(f'<p class="gap">{e(status["error"])}</p>')
    if not models:
        parts.append('<p class="muted">No model is registered in the swarm yet: start a node with '
                     "<code>hivegen node serve</code>.</p>")  # fmt: skip
    parts += [_model(m, now) for m in models]
    parts += [_leaderboard(leaders), _reported(status.get("reported_nodes", [])), "</body></html>"]
    return "".join(parts)


def _model(model: dict[str, Any], now: float) -> str:
    blocks = int(model.get("num_blocks", 0))
    nodes = model.get("nodes", [])
    missing = set(model.get("missing_blocks", []))
    if model.get("error"):
        state = f'<span class="gap">{e(model["error"])}</span>'
    elif missing:
        gap = e(format_blocks(sorted(missing)))
        state = f'<span class="gap">coverage gap: blocks {gap} are served by no node</span>'
    else:
        bound = float(model.get("steps_per_second_bound", 0.0))
        state = f'<span class="ok">every block is served</span> · at most {bound:.1f} steps/s through the slowest block'
    out = [
        '<section class="model">',
        f"<h2>{e(model.get('name', ''))}</h2>",
        f'<div class="muted"><code>{e(model.get("model_key", ""))}</code> · {blocks} blocks · '
        f"{int(model.get('nodes_total', len(nodes)))} node(s)</div>",
        f"<div>{state}</div>",
        _bar(blocks, nodes, missing),
        _nodes(nodes, now),
        "</section>",
    ]
    return "".join(out)


def _bar(blocks: int, nodes: list[dict[str, Any]], missing: set[int]) -> str:
    """A grid: one column per block; a coverage row (green served, red unserved), then a row per node."""
    if blocks <= 0:
        return ""
    columns = f"minmax(120px, 16%) repeat({blocks}, 1fr)"
    rows = ['<div class="lane">coverage</div>']
    rows += [f'<div class="cell {"missing" if b in missing else "covered"}" title="block {b}"></div>'
             for b in range(blocks)]  # fmt: skip
    for i, node in enumerate(nodes):
        start, end = (int(x) for x in node.get("blocks", [0, 0]))
        color = COLORS[i % len(COLORS)]
        rows.append(f'<div class="lane" title="{e(node.get("node_id", ""))}">{e(node.get("address", ""))}</div>')
        rows += [
            f'<div class="cell" style="background:{color}" title="{e(node.get("address", ""))}: blocks {start}:{end}">'
            "</div>"
            if start <= b < end
            else '<div class="cell"></div>'
            for b in range(blocks)
        ]
    return f'<div class="bar" style="grid-template-columns: {columns}">{"".join(rows)}</div>'


def _nodes(nodes: list[dict[str, Any]], now: float) -> str:
    if not nodes:
        return '<p class="muted">No node serves this model now.</p>'
    head = ("<tr><th>node</th><th>address</th><th>account</th><th>blocks</th><th>steps/s</th><th>sessions</th>"
            "<th>free cache</th><th>dtype</th><th>version</th><th>refreshed</th></tr>")  # fmt: skip
    rows = []
    for i, n in enumerate(nodes):
        start, end = (int(x) for x in n.get("blocks", [0, 0]))
        total = int(n.get("cache_tokens_total", 0))
        free = f"{int(n.get('cache_tokens_free', 0)):,}" + (f" / {total:,}" if total else "")
        updated = float(n.get("updated_at", 0.0))
        age = f"{max(0.0, now - updated):.0f} s ago" if updated else "—"
        peer = str(n.get("node_id", "")).partition("@")[0]
        rows.append(
            f'<tr><td><span class="swatch" style="background:{COLORS[i % len(COLORS)]}"></span>'
            f'<code title="{e(n.get("node_id", ""))}">{e(peer[:16])}…</code></td>'
            f"<td><code>{e(n.get('address', ''))}</code></td><td><code>{e(n.get('account', ''))}</code></td>"
            f"<td>{start}:{end}</td><td class=num>{float(n.get('throughput', 0.0)):.1f}</td>"
            f"<td class=num>{int(n.get('active_sessions', 0))}</td><td class=num>{free}</td>"
            f"<td>{e(n.get('dtype', ''))}</td><td>{e(n.get('version', ''))}</td><td>{e(age)}</td></tr>"
        )
    return f"<table>{head}{''.join(rows)}</table>"


def _leaderboard(leaders: dict[str, Any]) -> str:
    top = leaders.get("top", [])
    if not top:
        return '<h2>Leaderboard</h2><p class="muted">No node has earned credits yet.</p>'
    rows = "".join(
        f"<tr><td class=num>{i}</td><td><code>{e(t.get('account', ''))}</code></td>"
        f"<td class=num>{e(format_credits(int(t.get('earned_units', 0))))}</td></tr>"
        for i, t in enumerate(top, 1)
    )
    return f"<h2>Leaderboard</h2><table><tr><th>#</th><th>account</th><th>credits earned</th></tr>{rows}</table>"


def _reported(reported: list[dict[str, Any]]) -> str:
    if not reported:
        return '<h2>Reported nodes</h2><p class="muted">No node has been reported for wrong answers.</p>'
    rows = "".join(
        f"<tr><td><code>{e(r.get('account', ''))}</code></td><td>{e(', '.join(r.get('addresses', [])))}</td>"
        f"<td class=num>{int(r.get('reporters', 0))}</td><td class=num>{int(r.get('reports', 0))}</td>"
        f"<td>{e(', '.join(r.get('models', [])))}</td></tr>"
        for r in reported
    )
    return ("<h2>Reported nodes</h2><table><tr><th>account</th><th>addresses</th><th>reporters</th><th>reports</th>"
            f"<th>models</th></tr>{rows}</table>")  # fmt: skip
