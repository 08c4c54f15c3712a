"""The fleet side: reading the report drop that hosts write over SFTP.

Owns: loading and validating each host's report (they come from hosts, or from
whoever can write to the drop, so every field the fleet view reads is checked), one
row per host, and the rollout summary per commit.
Must not: print (cli.py formats the rows), or change anything in the drop.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .config import host_name_problem
from .errors import UsageError
from .source import open_repo
from .transport import sftp_options


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


def drop_reports(sftp: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Every host report in the SFTP drop, read with the host's own report account
    (read-only use). Bad reports are skipped, as `fleet status` does."""
    import asyncio

    return asyncio.run(asyncio.wait_for(_drop_reports(sftp, timeout), timeout + 5))


async def _drop_reports(sftp_cfg: Any, timeout: float) -> list[dict[str, Any]]:
    import asyncssh

    options = sftp_options(sftp_cfg, timeout)
    out = []
    d = sftp_cfg.dir.rstrip("/")
    async with asyncssh.connect(sftp_cfg.host, **options) as conn, \
            conn.start_sftp_client() as sftp:
        for name in await sftp.listdir(d):
            if not name.endswith(".json") or name.startswith("."):
                continue
            async with sftp.open(f"{d}/{name}", "rb") as f:
                data = await f.read(1 << 20)
            try:
                rep = json.loads(data)
            except ValueError:
                continue
            if isinstance(rep, dict) and not _report_problem(rep):
                out.append(rep)
    return out


def fleet_rows(reports_dir: str, stale_after: float, repo: str | None = None,
               branch: str = "main", now: float | None = None) -> dict[str, Any]:
    """One row per host report in reports_dir, and a rollout summary per commit."""
    now = now or time.time()
    tip = None
    repository = None
    if repo:
        repository = open_repo(repo)
        tip = repository.resolve(branch)
    rows = []
    try:
        names = sorted(n for n in os.listdir(reports_dir)
                       if n.endswith(".json") and not n.startswith("."))
    except OSError as e:
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
               "rejected": rep.get("rejected", ""),
               # issue 10: the host's own verdict on a new revision
               "rolled_back": rep.get("rolled_back", ""),
               "quarantined": [q.get("commit") for q in rep.get("quarantine") or []
                               if isinstance(q, dict)],
               "degraded": bool(rep.get("degraded")),
               # issue 11: the host's wave (from its own policy) and why it waits
               **_wave_of(rep),
               # issue 15: a break-glass pin on the host
               "pinned": rep.get("pinned") if isinstance(rep.get("pinned"), str) else ""}
        if repository is not None and tip is not None and row["commit"]:
            row["behind"] = repository.behind(tip, row["commit"])
        rows.append(row)
    summary: dict[str, dict[str, int]] = {}
    for r in rows:
        s = summary.setdefault(r["commit"] or "-", {"hosts": 0, "converged": 0, "failed": 0,
                                                    "stale": 0, "rolled_back": 0,
                                                    "degraded": 0})
        s["hosts"] += 1
        if r["stale"]:
            s["stale"] += 1
        elif r["state"] in ("failed", "rejected"):
            s["failed"] += 1
        elif r["state"] == "rolled-back":
            s["rolled_back"] += 1
        elif r["state"] == "degraded":
            s["degraded"] += 1
        elif r["state"] in ("converged", "offline"):
            s["converged"] += 1
    timeline = []
    if repository is not None and tip is not None:
        # how far each of the last commits got: hosts on it or on a commit after it
        for commit in repository.history(tip, limit=10):
            reached = 0
            for r in rows:
                reached += bool(r["commit"]) and repository.descends(r["commit"], commit)
            timeline.append({"commit": commit, "time": repository.commit_time(commit),
                             "reached": reached, "hosts": len(rows)})
    return {"rows": rows, "rollout": summary, "tip": tip, "skipped": skipped,
            "waves": waves_summary(rows, tip), "timeline": timeline}


def _wave_of(rep: dict[str, Any]) -> dict[str, Any]:
    r = rep.get("rollout")
    r = r if isinstance(r, dict) else {}
    wave = r.get("wave")
    bucket = r.get("bucket")
    opens = r.get("opens_at")
    waiting = rep.get("waiting")
    return {"wave": wave if isinstance(wave, str) else None,
            "bucket": bucket if isinstance(bucket, int) and not isinstance(bucket, bool)
            else None,
            "opens_at": opens if isinstance(opens, int | float) and not isinstance(opens, bool)
            else None,
            "waiting": waiting if isinstance(waiting, str) else ""}


def waves_summary(rows: list[dict[str, Any]], tip: str | None) -> list[dict[str, Any]]:
    """Per wave, for the tip (or, without --repo, for the newest commit any host reports
    waiting for or applied): hosts, applied, failed, waiting, and when it opens."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        name = r.get("wave") or "-"
        w = out.setdefault(name, {"wave": name, "hosts": 0, "applied": 0, "failed": 0,
                                  "waiting": 0, "opens_at": None})
        w["hosts"] += 1
        if r["state"] in ("failed", "rejected", "rolled-back", "degraded"):
            w["failed"] += 1
        elif r["state"] == "waiting":
            w["waiting"] += 1
            if r.get("opens_at"):
                w["opens_at"] = min(w["opens_at"] or r["opens_at"], r["opens_at"])
        elif tip is None or r["commit"] == tip:
            w["applied"] += 1
    return sorted(out.values(), key=lambda w: (w["opens_at"] or 0, w["wave"]))
