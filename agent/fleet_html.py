"""`gitops-agent fleet status --html FILE`: the rollout as one self-contained page.

Owns: turning the fleet view (fleet.fleet_rows) into HTML with no external assets and
no script that fetches anything: per wave a progress bar (applied / failed /
waiting), a host table, and a timeline of the last commits with how far each got.
Must not: read the drop or the repository itself (fleet.py does).
Every string from a report is escaped: reports come from hosts, or from whoever can
write to the drop.
"""

from __future__ import annotations

import html
import time
from typing import Any

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:1.6em}
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #ddd;
text-align:left}th{background:#f4f4f4}
.bar{display:flex;width:420px;height:16px;background:#eee;border-radius:3px;overflow:hidden}
.bar span{display:block;height:100%}.applied{background:#2e9e4f}.failed{background:#d33}
.waiting{background:#e6b400}.s-failed,.s-rejected,.s-rolled-back,.s-degraded{color:#c00}
.s-waiting,.s-halted{color:#a07800}.stale{color:#999}.num{text-align:right}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts)) + "Z" if ts else "open"


def _bar(applied: int, failed: int, waiting: int, total: int) -> str:
    if total <= 0:
        return '<div class="bar"></div>'
    parts = "".join(f'<span class="{cls}" style="width:{100.0 * n / total:.2f}%" '
                    f'title="{n} {cls}"></span>'
                    for cls, n in (("applied", applied), ("failed", failed),
                                   ("waiting", waiting)) if n)
    return f'<div class="bar">{parts}</div>'


def page(data: dict[str, Any], now: float | None = None) -> str:
    now = now or time.time()
    rows = data["rows"]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           "<title>gitops-agent fleet</title>", f"<style>{_CSS}</style></head><body>",
           f"<h1>Fleet: {len(rows)} hosts"
           + (f", tip {_e(data['tip'][:12])}" if data.get("tip") else "") + "</h1>",
           f"<p>generated {_when(now)}</p>"]
    waves = data.get("waves") or []
    out.append('<h2>Waves</h2><table id="waves"><tr><th>wave</th><th>progress</th>'
               '<th class="num">hosts</th><th class="num">applied</th>'
               '<th class="num">failed</th><th class="num">waiting</th><th>opens</th></tr>')
    for w in waves:
        out.append(f'<tr data-wave="{_e(w["wave"])}"><td>{_e(w["wave"])}</td>'
                   f'<td>{_bar(w["applied"], w["failed"], w["waiting"], w["hosts"])}</td>'
                   f'<td class="num hosts">{w["hosts"]}</td>'
                   f'<td class="num applied">{w["applied"]}</td>'
                   f'<td class="num failed">{w["failed"]}</td>'
                   f'<td class="num waiting">{w["waiting"]}</td>'
                   f'<td>{_when(w["opens_at"])}</td></tr>')
    out.append("</table>")
    if data.get("timeline"):
        out.append('<h2>Last commits</h2><table id="timeline"><tr><th>commit</th>'
                   '<th>committed</th><th>reached</th><th class="num">hosts</th></tr>')
        for t in data["timeline"]:
            out.append(f'<tr><td><code>{_e(t["commit"][:12])}</code></td>'
                       f'<td>{_when(t["time"])}</td>'
                       f'<td>{_bar(t["reached"], 0, 0, t["hosts"])}</td>'
                       f'<td class="num">{t["reached"]}/{t["hosts"]}</td></tr>')
        out.append("</table>")
    out.append('<h2>Hosts</h2><table id="hosts"><tr><th>host</th><th>state</th>'
               '<th>wave</th><th>commit</th><th>report age</th><th>behind</th>'
               '<th>why</th></tr>')
    for r in rows:
        age = "-" if r.get("age") is None else f"{r['age']:.0f}s"
        why = (r.get("pinned") or r.get("waiting") or r.get("rolled_back")
               or "; ".join(r.get("errors") or []))
        out.append(f'<tr class="host{" stale" if r.get("stale") else ""}" '
                   f'data-host="{_e(r["host"])}"><td>{_e(r["host"])}</td>'
                   f'<td class="s-{_e(r["state"])}">{_e(r["state"])}</td>'
                   f'<td>{_e(r.get("wave") or "-")}</td>'
                   f'<td><code>{_e((r.get("commit") or "-")[:12])}</code></td>'
                   f'<td>{age}{" STALE" if r.get("stale") else ""}</td>'
                   f'<td>{_e(r.get("behind", "-") if r.get("behind") is not None else "-")}'
                   f'</td><td>{_e(why)[:300]}</td></tr>')
    out.append("</table></body></html>")
    return "\n".join(out) + "\n"
