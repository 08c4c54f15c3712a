"""Reporting: the Prometheus textfile, remote report sinks, fleet aggregation.

Owns: turning the status JSON (one shape for the socket, the CLI and reports) into a
node_exporter textfile written atomically after each cycle, and `fleet status` over a
directory of host reports.
Must not: delay or fail a cycle; every sink swallows and logs its own errors.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

log = logging.getLogger("agent.report")

_STATES = ("converged", "failed", "offline", "rejected", "paused", "applying", "starting")


def _esc(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(status: dict[str, Any], last: Any, extra: dict[str, float] | None = None) -> str:
    """Prometheus text exposition format 0.0.4."""
    lc = status.get("last_cycle") or {}
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value}")

    metric("gitops_agent_last_cycle_timestamp_seconds", "gauge",
           "Unix time the last cycle finished.", [("", lc.get("finished") or 0)])
    metric("gitops_agent_last_cycle_duration_seconds", "gauge", "Duration of the last cycle.",
           [("", max(0.0, (lc.get("finished") or 0) - (lc.get("started") or 0)))])
    changed = lc.get("changed", 0)
    failed = lc.get("failed", 0)
    total = len(last.changes) if last is not None else 0
    metric("gitops_agent_resources", "gauge", "Resources in the last cycle, by outcome.",
           [('{state="changed"}', changed), ('{state="failed"}', failed),
            ('{state="unchanged"}', max(0, total - changed - failed))])
    metric("gitops_agent_state", "gauge", "1 for the agent's current state.",
           [(f'{{state="{s}"}}', 1 if status.get("state") == s else 0) for s in _STATES])
    metric("gitops_agent_applied_commit_info", "gauge", "The applied commit and its signer.",
           [(f'{{commit="{_esc(status.get("applied_commit") or "")}",'
             f'signer="{_esc(status.get("signer") or "")}"}}', 1)])
    metric("gitops_agent_offline", "gauge", "1 when every source URL failed.",
           [("", 1 if status.get("offline_since") else 0)])
    for name, help_, value in (
            ("gitops_agent_verification_failures_total", "Tips refused by the trust policy.",
             (extra or {}).get("verification_failures", 0)),
            ("gitops_agent_drift_corrections_total", "Resources put back after drift.",
             status.get("drift_corrections", 0)),
            ("gitops_agent_cycles_total", "Cycles run since start.", status.get("cycles", 0))):
        metric(name, "counter", help_, [("", value)])
    tip_time = (extra or {}).get("tip_time")
    if tip_time:
        metric("gitops_agent_tip_age_seconds", "gauge",
               "Age of the applied commit's committer time.", [("", time.time() - tip_time)])
    return "\n".join(lines) + "\n"


def write_metrics(path: str, text: str) -> None:
    from .host import write_atomic

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, text.encode(), mode=0o644)


def after_cycle(cfg: Any, status: dict[str, Any], last: Any) -> None:
    if cfg.report.metrics_textfile:
        extra = {"verification_failures": _count_rejections(cfg)}
        try:
            write_metrics(cfg.report.metrics_textfile, metrics_text(status, last, extra))
        except OSError as e:
            log.warning("report: cannot write %s: %s", cfg.report.metrics_textfile, e)


def _count_rejections(cfg: Any) -> int:
    try:
        from .state import StateDir

        return sum(1 for e in StateDir(cfg.state_dir).history(0) if e.get("rejected"))
    except Exception:  # noqa: BLE001 - a metric is not worth failing over
        return 0


def fleet_status_cli(args: Any) -> int:
    from .errors import UsageError

    raise UsageError("fleet status: not available in this version")


def load_report(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
