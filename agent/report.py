"""Reporting, the host side: status JSON, the Prometheus textfile, the SFTP drop.

Owns: the status JSON (one shape for the socket, the CLI and reports), the
node_exporter textfile written atomically after each cycle, and the queue of reports
sent to the SFTP drop. The fleet side (reading the drop) is fleet.py.
Must not: delay or fail a cycle; every sink swallows and logs its own errors.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from . import __version__
from .config import Config
from .cycle import CycleResult, host_identity
from .errors import AgentError
from .host import write_atomic
from .state import StateDir
from .transport import sftp_options

log = logging.getLogger("agent.report")

_STATES = ("converged", "failed", "offline", "rejected", "paused", "applying", "starting",
           "verifying", "rolled-back", "degraded", "waiting", "halted",
           "rebooting", "awaiting-approval", "pinned")


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
    metric("gitops_agent_rollbacks_total", "counter",
           "Revisions rolled back after failing their health checks on this host.",
           [("", status.get("rollbacks", 0))])
    metric("gitops_agent_quarantined_commits", "gauge",
           "Commits quarantined on this host (their plan failed its health checks).",
           [("", len(status.get("quarantine") or []))])
    metric("gitops_agent_degraded", "gauge",
           "1 when the checks still fail after a rollback (manual intervention).",
           [("", 1 if status.get("degraded") else 0)])
    checks = status.get("checks") or []
    if checks:
        metric("gitops_agent_check_status", "gauge",
               "1 when a health check passed when it last ran, 0 when it failed.",
               [(f'{{check="{_esc(c["name"])}",required="{str(c["required"]).lower()}"}}',
                 1 if c["ok"] else 0) for c in checks])
    tip_time = (extra or {}).get("tip_time")
    if tip_time:
        metric("gitops_agent_tip_age_seconds", "gauge",
               "Age of the applied commit's committer time.", [("", time.time() - tip_time)])
    return "\n".join(lines) + "\n"


def write_metrics(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(path, text.encode(), mode=0o644)


def status_json(cfg: Config, last: CycleResult | None, **live: Any) -> dict[str, Any]:
    """The one status shape: the socket, the CLI, the metrics and the fleet reports."""
    st: dict[str, Any] = {}
    quarantine: list[dict[str, Any]] = []
    try:
        state = StateDir(cfg.state_dir)
        st = state.load_state()
        quarantine = state.load_quarantine()
    except AgentError:
        pass
    # the last trial on this host: this cycle's, or the one that decided the state now
    trial = (last.trial if last else None) or st.get("last_trial")
    out = {
        "host": host_identity(cfg)[0], "labels": host_identity(cfg)[1],
        "version": __version__,
        "state": last.state if last else "starting",
        "applied_commit": last.commit if last else st.get("last_cycle", {}).get("commit"),
        "signer": last.signer if last else st.get("last_good_signer"),
        "last_good": st.get("last_good"),
        "fetched_tip": last.tip if last else None,
        "last_cycle": last.to_json(with_changes=False) if last else None,
        "offline_since": (last.started if last and last.offline else None),
        "offline_reason": last.offline_reason if last and last.offline else "",
        "rejected": last.rejected if last else "",
        "next_cycle_at": None, "drift_corrections": 0, "drift_detected": 0, "cycles": 0,
        "paused": None, "config_error": "", "warnings": last.warnings if last else [],
        # issue 10: the trial of the last new revision, rollbacks, quarantine, degraded
        "checks": (trial or (last.after_rollback if last else None) or {}).get("checks", []),
        "trial": trial, "rolled_back": last.rolled_back if last else "",
        "recovered": last.recovered if last else "",
        "rollbacks": st.get("rollbacks") or 0, "degraded": st.get("degraded"),
        # issue 11: this host's wave and bucket, and why the tip waits
        "rollout": last.rollout if last else {}, "waiting": last.waiting if last else "",
        # issue 15: why this host converges a pinned commit instead of the tip
        "pinned": last.pinned if last else "",
        "quarantine": [{k: q.get(k) for k in ("commit", "at", "check", "output")}
                       for q in quarantine],
    }
    out.update(live)
    return out


def send_now(cfg: Config, status: dict[str, Any], last: CycleResult | None,
             timeout: float = 20.0) -> None:
    """For one-shot `apply`: local sinks, then one bounded attempt to flush the queue."""
    import asyncio

    after_cycle(cfg, status, last)
    if cfg.report.sftp is None:
        return
    try:
        asyncio.run(asyncio.wait_for(flush_sftp(cfg, status["host"], timeout), timeout + 5))
    except Exception as e:  # noqa: BLE001 - the report waits in the queue for next time
        log.warning("report: sftp to %s failed, report queued: %s", cfg.report.sftp.host,
                    e or type(e).__name__)


# what a report says that a fleet view reads; the rest (timers, counters, timings)
# changes every cycle and is no reason to send one
_MATERIAL = ("host", "labels", "version", "state", "applied_commit", "signer", "last_good",
             "fetched_tip", "offline_since", "rejected", "paused", "config_error",
             "rolled_back", "recovered", "degraded", "quarantine", "waiting", "pinned",
             "rollout", "checks")
_MATERIAL_CYCLE = ("state", "commit", "tip", "failed", "errors", "offline",
                   "rejected", "rolled_back", "quarantined", "waiting", "halted", "pinned")


def material(status: dict[str, Any]) -> str:
    """A digest of what a report says that matters to the fleet (report.py's _MATERIAL)."""
    import hashlib
    import json

    lc = status.get("last_cycle") or {}
    data = [{k: status.get(k) for k in _MATERIAL},
            {k: lc.get(k) for k in _MATERIAL_CYCLE}]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()
                          ).hexdigest()


def after_cycle(cfg: Config, status: dict[str, Any], last: CycleResult | None,
                queue: bool = True) -> None:
    """Local sinks, synchronous and quick: the metrics textfile and (when `queue`) the
    report queue."""
    if cfg.report.metrics_textfile:
        extra = {"verification_failures": _count_rejections(cfg),
                 "tip_time": getattr(last, "commit_time", 0)}
        try:
            write_metrics(cfg.report.metrics_textfile, metrics_text(status, last, extra))
        except OSError as e:
            log.warning("report: cannot write %s: %s", cfg.report.metrics_textfile, e)
    if cfg.report.sftp is not None and queue:
        StateDir(cfg.state_dir).report_queue().put(status)


def _count_rejections(cfg: Config) -> int:
    try:
            return sum(1 for e in StateDir(cfg.state_dir).history(0) if e.get("rejected"))
    except Exception:  # noqa: BLE001 - a metric is not worth failing over
        return 0


# --- the report queue and the SFTP drop ---------------------------------------------------


async def flush_sftp(cfg: Config, host: str, timeout: float = 20.0) -> int:
    """Send every queued report, oldest first, to DIR/<host>.json (uploaded under a
    temporary name and renamed, so a reader never sees half a report) and append it to
    DIR/<host>.history.jsonl. Stops at the first failure; what is left stays queued."""
    import asyncssh

    sftp_cfg = cfg.report.sftp
    queue = StateDir(cfg.state_dir).report_queue()
    pending = queue.pending()
    if not pending:
        return 0
    options = sftp_options(sftp_cfg, timeout)
    sent = 0
    async with asyncssh.connect(sftp_cfg.host, **options) as conn, \
            conn.start_sftp_client() as sftp:
        final = f"{sftp_cfg.dir.rstrip('/')}/{host}.json"
        tmp = f"{sftp_cfg.dir.rstrip('/')}/.{host}.json.tmp"
        history = f"{sftp_cfg.dir.rstrip('/')}/{host}.history.jsonl"
        for name, data in pending:
            async with sftp.open(tmp, "wb") as f:
                await f.write(data)
            await sftp.posix_rename(tmp, final)
            async with sftp.open(history, "ab") as f:
                await f.write(data.strip() + b"\n")
            queue.done(name)
            sent += 1
    return sent


# --- fleet status ----------------------------------------------------------------------
