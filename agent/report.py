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
import sys
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


def status_json(cfg: Any, last: Any, **live: Any) -> dict[str, Any]:
    """The one status shape: the socket, the CLI, the metrics and the fleet reports."""
    from . import __version__
    from .cycle import host_identity
    from .errors import AgentError
    from .state import StateDir

    st: dict[str, Any] = {}
    try:
        st = StateDir(cfg.state_dir).load_state()
    except AgentError:
        pass
    out = {
        "host": host_identity(cfg)[0], "version": __version__,
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
    }
    out.update(live)
    return out


def send_now(cfg: Any, status: dict[str, Any], last: Any, timeout: float = 20.0) -> None:
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


def after_cycle(cfg: Any, status: dict[str, Any], last: Any) -> None:
    """Local sinks, synchronous and quick: the metrics textfile and the report queue."""
    if cfg.report.metrics_textfile:
        extra = {"verification_failures": _count_rejections(cfg),
                 "tip_time": getattr(last, "commit_time", 0)}
        try:
            write_metrics(cfg.report.metrics_textfile, metrics_text(status, last, extra))
        except OSError as e:
            log.warning("report: cannot write %s: %s", cfg.report.metrics_textfile, e)
    if cfg.report.sftp is not None:
        ReportQueue(cfg.state_dir).put(status)


def _count_rejections(cfg: Any) -> int:
    try:
        from .state import StateDir

        return sum(1 for e in StateDir(cfg.state_dir).history(0) if e.get("rejected"))
    except Exception:  # noqa: BLE001 - a metric is not worth failing over
        return 0


# --- the report queue and the SFTP drop ---------------------------------------------------


class ReportQueue:
    """Reports waiting to be sent, one file each, numbered, oldest first; bounded to the
    newest `keep` so a host offline for weeks does not fill its disk."""

    def __init__(self, state_dir: str, keep: int = 50) -> None:
        self.dir = os.path.join(state_dir, "report-queue")
        self.keep = keep

    def _names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.dir) if n.endswith(".json"))
        except FileNotFoundError:
            return []

    def put(self, status: dict[str, Any]) -> int:
        from .host import write_atomic

        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        names = self._names()
        seq = int(names[-1].split(".")[0]) + 1 if names else self._next_seq()
        report = {**status, "seq": seq, "reported_at": time.time()}
        write_atomic(os.path.join(self.dir, f"{seq:012d}.json"),
                     json.dumps(report, default=str).encode(), mode=0o600)
        for old in self._names()[:-self.keep]:
            os.unlink(os.path.join(self.dir, old))
        self._save_seq(seq + 1)
        return seq

    def _next_seq(self) -> int:
        try:
            with open(os.path.join(self.dir, "next")) as f:
                return int(f.read().strip() or 1)
        except (OSError, ValueError):
            return 1

    def _save_seq(self, seq: int) -> None:
        from .host import write_atomic

        write_atomic(os.path.join(self.dir, "next"), str(seq).encode(), mode=0o600)

    def pending(self) -> list[tuple[str, bytes]]:
        out = []
        for name in self._names():
            try:
                with open(os.path.join(self.dir, name), "rb") as f:
                    out.append((name, f.read()))
            except OSError:
                continue
        return out

    def done(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.dir, name))
        except FileNotFoundError:
            pass


async def flush_sftp(cfg: Any, host: str, timeout: float = 20.0) -> int:
    """Send every queued report, oldest first, to DIR/<host>.json (uploaded under a
    temporary name and renamed, so a reader never sees half a report) and append it to
    DIR/<host>.history.jsonl. Stops at the first failure; what is left stays queued."""
    import asyncssh

    sftp_cfg = cfg.report.sftp
    queue = ReportQueue(cfg.state_dir)
    pending = queue.pending()
    if not pending:
        return 0
    # no pinned known_hosts means no trusted host key at all: refuse, never trust on use.
    # asyncssh reads ~/.ssh/known_hosts for (), checks nothing for None, and reads the
    # user's ~/.ssh/config unless told not to: none of that, ever.
    options = {"username": sftp_cfg.user, "port": sftp_cfg.port,
               "known_hosts": (sftp_cfg.known_hosts if sftp_cfg.known_hosts
                               else asyncssh.import_known_hosts("")),
               "client_keys": [sftp_cfg.key] if sftp_cfg.key else None,
               "config": None, "agent_path": None, "connect_timeout": timeout}
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


def load_report(path: str) -> tuple[dict[str, Any] | None, str]:
    """A report and "", or None and why it cannot be used. Reports come from hosts (or
    whoever can write to the drop): every field the fleet view reads is checked."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except OSError as e:
        return None, f"cannot read it: {e.strerror}"
    except ValueError as e:
        return None, f"not JSON: {e}"
    if not isinstance(data, dict):
        return None, "not a JSON object"
    return (None, why) if (why := _report_problem(data)) else (data, "")


def _report_problem(rep: dict[str, Any]) -> str:
    from .config import host_name_problem

    host = rep.get("host")
    if not isinstance(host, str) or host_name_problem(host):
        return f"host {host!r} is not a host name"
    for key, types in (("state", str), ("applied_commit", (str, type(None))),
                       ("signer", (str, type(None))), ("rejected", (str, type(None))),
                       ("last_cycle", (dict, type(None))),
                       ("offline_since", (int, float, type(None)))):
        if key in rep and not isinstance(rep[key], types):
            return f"{key} has the wrong type ({type(rep[key]).__name__})"
    at = rep.get("reported_at")
    if isinstance(at, bool) or not isinstance(at, int | float):
        return f"reported_at {at!r} is not a time in seconds"
    lc = rep.get("last_cycle") or {}
    if isinstance(lc.get("failed", 0), bool) or not isinstance(lc.get("failed", 0), int):
        return "last_cycle.failed is not a number"
    if not isinstance(lc.get("errors", []), list):
        return "last_cycle.errors is not a list"
    return ""


def fleet_rows(reports_dir: str, stale_after: float, repo: str | None = None,
               branch: str = "main", now: float | None = None) -> dict[str, Any]:
    """One row per host report in reports_dir, and a rollout summary per commit."""
    now = now or time.time()
    tip = None
    repository = None
    if repo:
        from .source import open_repo

        repository = open_repo(repo)
        tip = repository.resolve(branch)
    rows = []
    try:
        names = sorted(n for n in os.listdir(reports_dir)
                       if n.endswith(".json") and not n.startswith("."))
    except OSError as e:
        from .errors import UsageError

        raise UsageError(f"fleet status: cannot read {reports_dir}: {e.strerror}") from None
    skipped = []
    for name in names:
        rep, why = load_report(os.path.join(reports_dir, name))
        if rep is None:
            # one bad report must not take the fleet view down: skip it, say which
            skipped.append(f"skipped {os.path.join(reports_dir, name)}: {why}")
            continue
        age = now - float(rep["reported_at"])
        lc = rep.get("last_cycle") or {}
        row = {"host": rep.get("host", name[:-5]), "state": rep.get("state"),
               "commit": rep.get("applied_commit"), "signer": rep.get("signer"),
               "age": age, "stale": age > stale_after, "offline": bool(rep.get("offline_since")),
               "failed": lc.get("failed", 0), "errors": lc.get("errors", []),
               "rejected": rep.get("rejected", "")}
        if repository is not None and tip is not None and row["commit"]:
            try:
                ahead, behind = repository.repo.ahead_behind(tip, row["commit"])
                row["behind"] = ahead
            except Exception:  # noqa: BLE001 - a commit the repo does not have
                row["behind"] = None
        rows.append(row)
    summary: dict[str, dict[str, int]] = {}
    for r in rows:
        s = summary.setdefault(r["commit"] or "-", {"hosts": 0, "converged": 0, "failed": 0,
                                                    "stale": 0})
        s["hosts"] += 1
        if r["stale"]:
            s["stale"] += 1
        elif r["state"] in ("failed", "rejected"):
            s["failed"] += 1
        elif r["state"] in ("converged", "offline"):
            s["converged"] += 1
    return {"rows": rows, "rollout": summary, "tip": tip, "skipped": skipped}


def fleet_status_cli(args: Any) -> int:
    from .config import parse_duration

    try:
        stale = parse_duration(args.stale)
    except ValueError as e:
        from .errors import UsageError

        raise UsageError(f"fleet status: --stale: {e}") from None
    data = fleet_rows(args.reports, stale, args.repo, args.branch)
    bad = bool(data["skipped"]) or any(r["stale"] or r["state"] in ("failed", "rejected")
                                       for r in data["rows"])
    for why in data["skipped"]:
        print(f"warning: fleet status: {why}", file=sys.stderr)
    if args.json:
        print(json.dumps(data, indent=1, sort_keys=True, default=str))
        return 1 if bad else 0
    lines = [f"{'HOST':20} {'COMMIT':12} {'STATE':10} {'REPORT AGE':>10}  {'OFFLINE':7} "
             f"{'FAILED':6}" + ("  BEHIND" if data["tip"] else "")]
    for r in data["rows"]:
        age = "-" if r["age"] is None else f"{r['age']:.0f}s" + (" STALE" if r["stale"] else "")
        behind = ""
        if data["tip"]:
            behind = "  ?" if r.get("behind") is None else f"  {r['behind']}"
        lines.append(f"{r['host']:20} {(r['commit'] or '-')[:12]:12} {r['state'] or '-':10} "
                     f"{age:>10}  {'yes' if r['offline'] else 'no':7} {r['failed']:<6}{behind}")
    lines.append("")
    for commit, s in data["rollout"].items():
        lines.append(f"{commit[:7]}: {s['converged']}/{s['hosts']} hosts converged, "
                     f"{s['failed']} failed, {s['stale']} stale")
    print("\n".join(lines))
    return 1 if bad else 0
