"""Rollout policy decided by each host from the signed commit: waves, windows, pause.

Owns: parsing `rollout:`, `windows:` and `pause:` of fleet.yaml (and `windows:` of a
group) into a host's policy at render time, a host's bucket
(`sha256(seed, host name) mod 10000`, stable across commits), which wave a host is in,
when that wave opens (the new commit's committer time + `after`), whether a time is
inside the host's maintenance windows (zoneinfo, DST-safe) and when the next one
starts, and the one decision the cycle asks for: may this host apply a new plan now?
Must not: read the clock itself (the caller passes `now`), touch the host or the state.

Clock assumptions: the committer time is signed with the commit and bounded by
trust.max_future_skew; a host whose clock is ahead opens its wave early by that much,
one whose clock is behind opens late. Windows are read in their own time zone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from .config import parse_duration
from .errors import RenderError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
BUCKETS = 10_000


def bucket(seed: str, host: str) -> int:
    h = hashlib.sha256(f"{seed}\0{host}".encode()).digest()
    return int.from_bytes(h[:8], "big") % BUCKETS


def _fail(what: str, where: str) -> RenderError:
    return RenderError(f"render: {what} ({where})")


def parse_windows(value: Any, what: str, where: Any) -> list[dict[str, Any]]:
    """`[{days: [mon, fri], start: "02:00", duration: 2h, tz: Europe/Berlin}]`."""
    if not isinstance(value, list) or not value:
        raise _fail(f"{what}.windows must be a list of windows", where(None))
    out = []
    for i, w in enumerate(value):
        at = w.where if hasattr(w, "where") else (lambda k: where(None))
        if not isinstance(w, dict):
            raise _fail(f"{what}.windows[{i}] must be a mapping like {{days: [sat], start: "
                        f"\"02:00\", duration: 2h, tz: UTC}}", where(None))
        unknown = set(w) - {"days", "start", "duration", "tz"}
        if unknown:
            raise _fail(f"unknown key {sorted(unknown)[0]!r} in {what}.windows[{i}]; allowed: "
                        f"days, duration, start, tz", at(sorted(unknown)[0]))
        days = w.get("days", list(DAYS))
        if not isinstance(days, list) or not days or not all(d in DAYS for d in days):
            raise _fail(f"{what}.windows[{i}].days must be a list of {', '.join(DAYS)}",
                        at("days"))
        start = w.get("start")
        m = _TIME.match(start) if isinstance(start, str) else None
        if m is None:
            raise _fail(f"{what}.windows[{i}].start must be a quoted time like \"02:00\"",
                        at("start"))
        try:
            duration = parse_duration(w.get("duration"))
        except ValueError as e:
            raise _fail(f"{what}.windows[{i}].duration: {e}", at("duration")) from None
        if not 0 < duration <= 7 * 86400:
            raise _fail(f"{what}.windows[{i}].duration must be between 1s and 7d",
                        at("duration"))
        tz = w.get("tz", "UTC")
        import zoneinfo  # here, not at the top: ~2 ms of every apply process

        try:
            zoneinfo.ZoneInfo(str(tz))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise _fail(f"{what}.windows[{i}].tz {tz!r} is not a time zone of the system's "
                        f"tz database (like Europe/Berlin or UTC)", at("tz")) from None
        out.append({"days": [DAYS.index(d) for d in days], "start": [int(m[1]), int(m[2])],
                    "duration": duration, "tz": str(tz)})
    return out


def _starts(w: dict[str, Any], around: dt.datetime, back: int, ahead: int
            ) -> list[tuple[dt.datetime, dt.datetime]]:
    """(start, end) in UTC of the window's occurrences from `back` days before to
    `ahead` days after `around`, by the local date in the window's zone. A window that
    crosses midnight belongs to the day it starts."""
    import zoneinfo

    tz = zoneinfo.ZoneInfo(w["tz"])
    local = around.astimezone(tz).date()
    out = []
    for delta in range(-back, ahead + 1):
        day = local + dt.timedelta(days=delta)
        if day.weekday() not in w["days"]:
            continue
        # wall-clock start in the zone (a start in a DST gap moves forward, as zoneinfo
        # resolves it); the duration is real time, so convert before adding
        start = dt.datetime(day.year, day.month, day.day, w["start"][0], w["start"][1],
                            tzinfo=tz).astimezone(dt.UTC)
        out.append((start, start + dt.timedelta(seconds=w["duration"])))
    return out


def in_window(windows: list[dict[str, Any]], now: float) -> bool:
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    return any(s <= t < e for w in windows for s, e in _starts(w, t, 8, 0))


def next_window(windows: list[dict[str, Any]], now: float) -> float | None:
    """The start of the next window at or after now (None: there is none in 15 days)."""
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    starts = [s for w in windows for s, _ in _starts(w, t, 1, 15) if s >= t]
    return min(starts).timestamp() if starts else None


def parse(fleet: Any, groups: list[Any], host: str, labels: dict[str, str]) -> dict[str, Any]:
    """This host's policy from fleet.yaml (rollout, pause, windows) and its groups' windows."""
    policy: dict[str, Any] = {}
    r = fleet.get("rollout")
    if r is not None:
        policy.update(_waves(r, fleet.where("rollout"), host, labels))
    if "pause" in fleet:
        p = fleet["pause"]
        reason = p.get("reason") if isinstance(p, dict) else None
        if not isinstance(reason, str) or not reason.strip() or set(p) != {"reason"}:
            raise _fail("fleet.yaml pause must be {reason: \"why\"}", fleet.where("pause"))
        policy["pause"] = reason
    if "windows" in fleet:
        policy["windows"] = parse_windows(fleet["windows"], "fleet.yaml", fleet.where)
    if "reboot" in fleet:
        rb = fleet["reboot"]
        if not isinstance(rb, dict) or set(rb) != {"when"} or rb["when"] not in (
                "window", "now"):
            raise _fail("fleet.yaml reboot must be {when: window} or {when: now}",
                        fleet.where("reboot"))
        policy["reboot"] = rb["when"]
    mine = []
    for i, g in groups:
        mine.extend(parse_windows(g["windows"], f"fleet.yaml groups[{i}]", g.where))
    if mine:
        policy["group_windows"] = mine
    return policy


def _waves(r: Any, where: str, host: str, labels: dict[str, str]) -> dict[str, Any]:
    if not isinstance(r, dict) or set(r) - {"seed", "waves", "halt"}:
        raise _fail("fleet.yaml rollout must be a mapping of seed, waves (and halt)", where)
    at = r.where
    seed = r.get("seed", "")
    if not isinstance(seed, str | int) or isinstance(seed, bool):
        raise _fail("rollout.seed must be a string", at("seed"))
    waves = r.get("waves")
    if not isinstance(waves, list) or not waves:
        raise _fail("rollout.waves must be a list of waves", at("waves") if "waves" in r
                    else where)
    b = bucket(str(seed), host)
    chosen: dict[str, Any] | None = None
    by_percent: dict[str, Any] | None = None
    last_percent = -1.0
    names = set()
    for i, w in enumerate(waves):
        wat = w.where if hasattr(w, "where") else (lambda k: where)
        if not isinstance(w, dict) or not isinstance(w.get("name"), str) or not w["name"]:
            raise _fail(f"rollout.waves[{i}] must be a mapping with a name", wat("name"))
        if set(w) - {"name", "select", "percent", "after"}:
            bad = sorted(set(w) - {"name", "select", "percent", "after"})[0]
            raise _fail(f"unknown key {bad!r} in rollout.waves[{i}]; allowed: after, name, "
                        f"percent, select", wat(bad))
        if w["name"] in names:
            raise _fail(f"rollout.waves[{i}]: wave {w['name']!r} is named twice", wat("name"))
        names.add(w["name"])
        if ("select" in w) == ("percent" in w):
            raise _fail(f"rollout.waves[{i}] ({w['name']}) needs exactly one of select or "
                        f"percent", wat("name"))
        try:
            after = parse_duration(w.get("after", 0))
        except ValueError as e:
            raise _fail(f"rollout.waves[{i}].after: {e}", wat("after")) from None
        wave = {"name": w["name"], "index": i, "after": after}
        if "select" in w:
            sel = w["select"]
            if not isinstance(sel, dict) or set(sel) != {"labels"} or not isinstance(
                    sel["labels"], dict) or not sel["labels"]:
                raise _fail(f"rollout.waves[{i}].select must be {{labels: {{key: value}}}}",
                            wat("select"))
            if chosen is None and all(labels.get(str(k)) == (str(v).lower() if isinstance(
                    v, bool) else str(v)) for k, v in sel["labels"].items()):
                chosen = wave
        else:
            pct = w["percent"]
            if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 < pct <= 100:
                raise _fail(f"rollout.waves[{i}].percent must be a number in (0, 100]",
                            wat("percent"))
            if pct <= last_percent:
                raise _fail(f"rollout.waves[{i}].percent {pct:g} is not above the wave "
                            f"before ({last_percent:g}): percentages are cumulative",
                            wat("percent"))
            last_percent = pct
            if by_percent is None and b < pct * BUCKETS / 100:
                by_percent = wave
    halt = None
    if "halt" in r:
        h = r["halt"]
        if not isinstance(h, dict) or set(h) - {"failed_percent", "min_reports"} or \
                "failed_percent" not in h:
            raise _fail("rollout.halt must be {failed_percent: N, min_reports: M}", at("halt"))
        fp, mr = h["failed_percent"], h.get("min_reports", 1)
        if isinstance(fp, bool) or not isinstance(fp, int | float) or not 0 <= fp < 100:
            raise _fail("rollout.halt.failed_percent must be a number in [0, 100)", at("halt"))
        if isinstance(mr, bool) or not isinstance(mr, int) or mr < 1:
            raise _fail("rollout.halt.min_reports must be a whole number >= 1", at("halt"))
        halt = {"failed_percent": float(fp), "min_reports": mr}
    if last_percent != 100:
        raise _fail("rollout: the last percent wave must reach 100 (a host in no wave would "
                    "never get a new commit)", where)
    wave = chosen or by_percent
    assert wave is not None
    out = {"wave": wave["name"], "wave_index": wave["index"], "after": wave["after"],
           "bucket": b}
    if halt is not None:
        out["halt"] = halt
    return out


_FAILED = ("failed", "rejected", "rolled-back", "degraded")


def halted(policy: dict[str, Any], reports: list[dict[str, Any]], tip: str) -> str:
    """Why this host must not take `tip` ("" = it may), from the report drop: among the
    hosts of earlier waves that report about the tip, too many failed. Reports can only
    stop a rollout: nothing here ever makes a host apply."""
    rule = policy.get("halt")
    mine = policy.get("wave_index", 0)
    if not rule or mine == 0:
        return ""
    about = []
    for rep in reports:
        r = rep.get("rollout") if isinstance(rep.get("rollout"), dict) else {}
        idx = r.get("wave_index")
        if not isinstance(idx, int) or isinstance(idx, bool) or idx >= mine:
            continue
        quarantined = [q.get("commit") for q in rep.get("quarantine") or []
                       if isinstance(q, dict)]
        if rep.get("applied_commit") == tip or r.get("tip") == tip or tip in quarantined:
            about.append(rep)
    failed = sum(1 for rep in about if rep.get("state") in _FAILED)
    if len(about) < rule["min_reports"] or not about:
        return ""
    share = 100.0 * failed / len(about)
    if share <= rule["failed_percent"]:
        return ""
    return (f"halted: {failed} of {len(about)} hosts of earlier waves failed or rolled back "
            f"{tip[:12]} ({share:.0f}% > halt.failed_percent {rule['failed_percent']:g})")


@dataclass
class Decision:
    go: bool
    state: str = ""  # "waiting" when not go
    reason: str = ""
    opens_at: float | None = None  # when to look again


def _utc(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _windows(policy: dict[str, Any], now: float, what: str) -> Decision:
    """Inside the host's windows (fleet-wide and its groups', both when both exist), or
    when the next common one starts."""
    lists = [w for w in (policy.get("windows"), policy.get("group_windows")) if w]
    if not lists or all(in_window(ws, now) for ws in lists):
        return Decision(True)
    nxt = _next_common(lists, now)
    return Decision(False, "waiting", f"{what} the maintenance window; next: "
                    f"{_utc(nxt) if nxt else 'not within 15 days'}", nxt)


def decide(policy: dict[str, Any], commit_time: float, now: float) -> Decision:
    """May a host apply a new plan now? Pause, then its wave, then its windows."""
    if policy.get("pause"):
        return Decision(False, "waiting", f"fleet paused in fleet.yaml: {policy['pause']}")
    opens = commit_time + policy.get("after", 0.0)
    if "wave" in policy and now < opens:
        return Decision(False, "waiting", f"wave {policy['wave']} (bucket {policy['bucket']}) "
                        f"opens at {_utc(opens)}", opens)
    return _windows(policy, now, "outside")


def may_reboot(policy: dict[str, Any], now: float) -> Decision:
    """A reboot a change asked for: at once (`reboot: {when: now}`, or no window
    declared), else inside the host's windows."""
    if policy.get("reboot") == "now":
        return Decision(True)
    return _windows(policy, now, "the reboot waits for")


def _next_common(lists: list[list[dict[str, Any]]], now: float) -> float | None:
    """The first time at or after now inside every list of windows (minute steps from
    each candidate start)."""
    candidates = sorted({s for ws in lists for s in [next_window(ws, now)] if s})
    for c in candidates:
        if all(in_window(ws, c) for ws in lists):
            return c
    return candidates[-1] if candidates else None
