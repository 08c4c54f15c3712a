"""Issue 11: waves, windows and a fleet-wide pause, decided by each host from the signed
commit. Time is injected (the decision takes `now`); no test sleeps."""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest
from conftest import Fleet, agent, git, refused_with_fleet_head

from agent import rollout
from agent.config import load_file
from agent.cycle import run_cycle
from agent.yamlsrc import load

UTC = dt.UTC


def policy_for(fleet_yaml: str, host: str, labels: dict[str, str] | None = None) -> dict:
    doc = load(fleet_yaml.encode(), "fleet.yaml")
    windowed = [(i, g) for i, g in enumerate(doc.get("groups") or []) if "windows" in g]
    return rollout.parse(doc, windowed, host, labels or {})


WAVES = """rollout:
  seed: 2026-q4
  waves:
    - {name: canary, select: {labels: {canary: "true"}}}
    - {name: early, percent: 5,   after: 30m}
    - {name: half,  percent: 50,  after: 2h}
    - {name: all,   percent: 100, after: 6h}
"""


def test_1000_hosts_move_through_the_waves_as_declared():
    hosts = [(f"host-{i:04d}", {"canary": "true"} if i < 10 else {}) for i in range(1000)]
    policies = {h: policy_for(WAVES, h, labels) for h, labels in hosts}
    waves = [p["wave"] for p in policies.values()]
    assert waves.count("canary") == 10
    n = 990  # the others, spread by bucket: cumulative 5%, 50%, 100%
    for name, share in (("early", 0.05), ("half", 0.45), ("all", 0.50)):
        mean, sd = n * share, math.sqrt(n * share * (1 - share))
        assert abs(waves.count(name) - mean) < 4 * sd, (name, waves.count(name))
    t0 = 1_800_000_000.0  # the commit's committer time

    def going(after: float) -> int:
        return sum(rollout.decide(p, t0, t0 + after).go for p in policies.values())

    assert going(0) == 10
    assert going(29 * 60) == 10
    assert going(30 * 60) == 10 + waves.count("early")
    assert going(2 * 3600) == 10 + waves.count("early") + waves.count("half")
    assert going(6 * 3600 - 1) < 1000
    assert going(6 * 3600) == 1000
    # a waiting host says its wave, bucket and when it opens
    p = next(p for p in policies.values() if p["wave"] == "all")
    d = rollout.decide(p, t0, t0 + 60)
    assert not d.go and d.opens_at == t0 + 6 * 3600 and "wave all (bucket" in d.reason


def test_buckets_are_stable_across_commits_and_the_seed_reshuffles():
    a = policy_for(WAVES, "web-01")
    assert a == policy_for(WAVES, "web-01")  # nothing about the commit is in it
    assert 0 <= a["bucket"] < 10_000
    b = [rollout.bucket("2026-q4", f"h{i}") for i in range(200)]
    c = [rollout.bucket("2027-q1", f"h{i}") for i in range(200)]
    assert b != c and len(set(b)) > 190
    # explicit selection wins over the percentage the bucket falls in
    assert policy_for(WAVES, "web-01", {"canary": "true"})["wave"] == "canary"


def at(year, month, day, hour, minute, tz="UTC") -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=dt.UTC if tz == "UTC"
                       else __import__("zoneinfo").ZoneInfo(tz)).timestamp()


def windows(text: str) -> list:
    return policy_for(f"windows:\n{text}", "h")["windows"]


def test_windows_in_time_zones_across_midnight_and_dst():
    berlin = windows("  - {days: [sat], start: \"23:00\", duration: 2h, tz: Europe/Berlin}\n")
    # 2026-11-28 is a Saturday: 23:00-01:00 Berlin (CET, UTC+1) belongs to Saturday
    assert not rollout.in_window(berlin, at(2026, 11, 28, 22, 59, "Europe/Berlin"))
    assert rollout.in_window(berlin, at(2026, 11, 28, 23, 0, "Europe/Berlin"))
    assert rollout.in_window(berlin, at(2026, 11, 29, 0, 59, "Europe/Berlin"))
    assert not rollout.in_window(berlin, at(2026, 11, 29, 1, 0, "Europe/Berlin"))
    # Sunday 23:30 is not in it (the window belongs to the day it starts)
    assert not rollout.in_window(berlin, at(2026, 11, 29, 23, 30, "Europe/Berlin"))
    assert rollout.next_window(berlin, at(2026, 11, 29, 12, 0, "Europe/Berlin")) == \
        at(2026, 12, 5, 23, 0, "Europe/Berlin")
    ny = windows("  - {days: [mon, tue, wed, thu, fri], start: \"02:00\", duration: 2h, "
                 "tz: America/New_York}\n")
    assert rollout.in_window(ny, at(2026, 11, 30, 7, 30))  # Monday 02:30 EST = 07:30 UTC
    assert not rollout.in_window(ny, at(2026, 11, 29, 7, 30))  # Sunday
    # DST: Europe/Berlin springs forward at 02:00 on 2026-03-29; a 02:30 start does not
    # exist that day and zoneinfo puts it at 03:30 CEST (01:30 UTC); the duration is real
    spring = windows("  - {days: [sun], start: \"02:30\", duration: 1h, tz: Europe/Berlin}\n")
    assert rollout.in_window(spring, dt.datetime(2026, 3, 29, 1, 45, tzinfo=UTC).timestamp())
    assert not rollout.in_window(spring, dt.datetime(2026, 3, 29, 2, 31,
                                                     tzinfo=UTC).timestamp())
    # ... and falls back at 03:00 on 2026-10-25: 02:30 happens twice, the first counts
    fall = windows("  - {days: [sun], start: \"02:30\", duration: 2h, tz: Europe/Berlin}\n")
    start = dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC).timestamp()  # 02:30 CEST
    assert rollout.in_window(fall, start) and not rollout.in_window(fall, start - 60)
    assert rollout.in_window(fall, start + 2 * 3600 - 60)
    assert not rollout.in_window(fall, start + 2 * 3600)


def test_fleet_and_group_windows_must_both_hold_and_the_next_common_start_is_found():
    text = ("windows:\n  - {days: [sat, sun], start: \"00:00\", duration: 24h, tz: UTC}\n"
            "groups:\n  - windows:\n      - {start: \"02:00\", duration: 1h, tz: UTC}\n")
    p = policy_for(text, "h")
    friday_2am = at(2026, 11, 27, 2, 30)
    saturday_2am = at(2026, 11, 28, 2, 30)
    assert not rollout.decide(p, 0, friday_2am).go
    d = rollout.decide(p, 0, at(2026, 11, 27, 12, 0))
    assert not d.go and d.opens_at == at(2026, 11, 28, 2, 0) and "next: 2026-11-28" in d.reason
    assert rollout.decide(p, 0, saturday_2am).go


def test_pause_in_fleet_yaml_holds_everyone():
    p = policy_for("pause: {reason: \"db migration\"}\n", "h")
    d = rollout.decide(p, 0, 1e12)
    assert not d.go and "db migration" in d.reason


@pytest.mark.parametrize("text,words", [
    ("rollout: {waves: [{name: a, percent: 50}]}\n", "must reach 100"),
    ("rollout: {waves: [{name: a, percent: 50}, {name: b, percent: 40}, "
     "{name: c, percent: 100}]}\n", "percentages are cumulative"),
    ("rollout: {waves: [{name: a, percent: 100, select: {labels: {x: y}}}]}\n",
     "exactly one of select or percent"),
    ("rollout: {waves: [{name: a, percent: 100, speed: 3}]}\n", "unknown key 'speed'"),
    ("rollout: {waves: [{name: a, percent: 100}, {name: a, percent: 100}]}\n", "named twice"),
    ("rollout: {waves: [{name: a, percent: 100, after: soon}]}\n", "after"),
    ("rollout: {waves: [{name: a, select: {hosts: [x]}}, {name: b, percent: 100}]}\n",
     "select must be {labels"),
    ("rollout: {waves: []}\n", "list of waves"),
    ("windows: [{start: \"25:00\", duration: 1h}]\n", "quoted time"),
    ("windows: [{start: \"02:00\", duration: 1h, tz: Mars/Olympus}]\n", "tz database"),
    ("windows: [{days: [monday], start: \"02:00\", duration: 1h}]\n", "days must be"),
    ("windows: [{start: \"02:00\"}]\n", "duration"),
    ("pause: yes\n", "pause must be {reason"),
])
def test_bad_rollout_windows_and_pause_are_errors_with_file_and_line(env, text, words):
    p = refused_with_fleet_head(env, text)
    assert words in p.stderr, p.stderr
    assert "fleet.yaml:" in p.stderr


def apply(env: dict, code: int = 0) -> dict:
    return json.loads(agent("apply", "--config", str(env["cfg"]), "--json", check=code).stdout)


def test_a_host_waits_for_its_wave_keeps_last_good_and_corrects_drift(env):
    fleet: Fleet = env["fleet"]
    out = apply(env)
    first = out["commit"]
    index = env["root"] / "srv/www/index.html"
    base = (fleet.work / "fleet.yaml").read_text()
    waves = ("rollout:\n  seed: s\n  waves:\n"
             "    - {name: canary, select: {labels: {canary: \"true\"}}}\n"
             "    - {name: all, percent: 100, after: 1h}\n")
    role = (fleet.work / "roles/web.yaml").read_text()
    fleet.commit("new content", push=True, files={
        "fleet.yaml": waves + base, "roles/web.yaml": role.replace("hello from", "waves of")})
    out = apply(env)  # waiting is not an error
    assert out["state"] == "waiting" and out["commit"] == first
    assert "wave all" in out["waiting"] and out["rollout"]["wave"] == "all"
    assert out["rollout"]["opens_at"] > out["started"] + 3500
    assert "hello from" in index.read_text()
    index.write_text("hand edit\n")  # drift on last good is corrected while waiting
    out = apply(env)
    assert out["state"] == "waiting" and "hello from" in index.read_text()
    # a commit that changes nothing for this host is applied at once
    fleet.commit("docs", push=True, files={"README.md": "about the fleet\n",
                                           "roles/web.yaml": role})
    out = apply(env)
    assert out["state"] == "converged" and out["commit"] == fleet.head()
    # the change again: still waiting an hour later minus a minute, applied after an hour
    # (the clock injected into the cycle; the committer time is the signed one)
    fleet.commit("new content again", push=True, files={
        "roles/web.yaml": role.replace("hello from", "waves of")})
    commit_time = int(git(fleet.work, "log", "-1", "--format=%ct").stdout)
    cfg = load_file(str(env["cfg"]))
    result, _ = run_cycle(cfg, clock=lambda: commit_time + 3600 - 60)
    assert result.state == "waiting" and "hello from" in index.read_text()
    result, _ = run_cycle(cfg, clock=lambda: commit_time + 3600)
    assert result.state == "converged" and "waves of" in index.read_text()


def test_a_paused_fleet_applies_nothing_new(env):
    fleet: Fleet = env["fleet"]
    apply(env)
    role = (fleet.work / "roles/web.yaml").read_text()
    fleet.commit("paused", push=True, files={
        "fleet.yaml": "pause: {reason: \"freeze for the sale\"}\n"
                      + (fleet.work / "fleet.yaml").read_text(),
        "roles/web.yaml": role.replace("hello from", "frozen")})
    out = apply(env)
    assert out["state"] == "waiting" and "freeze for the sale" in out["waiting"]
    assert "hello from" in (env["root"] / "srv/www/index.html").read_text()
    human = agent("apply", "--config", str(env["cfg"]), check=0).stdout
    assert "waiting:" in human and "freeze for the sale" in human
    motd = env["root"] / "etc/motd"
    good = motd.read_text()
    motd.write_text("drifted\n")  # drift of the current revision is corrected, paused or not
    assert apply(env)["state"] == "waiting" and motd.read_text() == good


def write_drop(drop, n: int = 200) -> dict[str, dict[str, int]]:
    """n hosts' reports, as the agents write them, half-way through a rollout."""
    t0 = 1_800_000_000.0
    now = t0 + 3 * 3600  # canary, early and half are open; all is not
    expect: dict[str, dict[str, int]] = {}
    for i in range(n):
        host = f"host-{i:03d}"
        p = policy_for(WAVES, host, {"canary": "true"} if i < 5 else {})
        d = rollout.decide(p, t0, now)
        state = "converged" if d.go else "waiting"
        if d.go and i % 50 == 7:
            state = "rolled-back"
        e = expect.setdefault(p["wave"], {"hosts": 0, "applied": 0, "failed": 0,
                                          "waiting": 0})
        e["hosts"] += 1
        e[{"converged": "applied", "waiting": "waiting", "rolled-back": "failed"}[state]] += 1
        (drop / f"{host}.json").write_text(json.dumps({
            "host": host, "state": state, "applied_commit": "a" * 40, "reported_at": now,
            "rollout": {"wave": p["wave"], "bucket": p["bucket"],
                        **({"opens_at": d.opens_at} if not d.go else {})},
            "waiting": d.reason, "rolled_back": "<script>alert(1)</script>"
            if state == "rolled-back" else ""}))
    return expect


def test_fleet_status_shows_each_wave(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    expect = write_drop(drop)
    p = agent("fleet", "status", "--reports", str(drop), "--json", "--stale", "1000000d",
              check=None)
    data = json.loads(p.stdout)
    got = {w["wave"]: {k: w[k] for k in ("hosts", "applied", "failed", "waiting")}
           for w in data["waves"]}
    assert got == expect
    t0 = 1_800_000_000.0
    assert [w for w in data["waves"] if w["wave"] == "all"][0]["opens_at"] == t0 + 6 * 3600
    human = agent("fleet", "status", "--reports", str(drop), "--stale", "1000000d").stdout
    assert "WAVE" in human and "canary" in human


def test_halt_reads_the_drop_and_only_ever_stops(tmp_path, fleet, sshd):
    """Hosts of earlier waves report the tip failed: a later-wave host holds (halted).
    Reports can stop a rollout but never start one: a closed wave stays closed whatever
    the drop says."""
    from test_transport_reports import report_config

    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = report_config(tmp_path, fleet, sshd, drop, "web-01")
    agent("apply", "--config", str(cfg), check=0)
    waves = ("rollout:\n  seed: s\n  waves:\n"
             "    - {name: canary, select: {labels: {canary: \"true\"}}}\n"
             "    - {name: all, percent: 100}\n"
             "  halt: {failed_percent: 10, min_reports: 3}\n")
    role = (fleet.work / "roles/web.yaml").read_text()
    fleet.commit("new", push=True, files={
        "fleet.yaml": waves + (fleet.work / "fleet.yaml").read_text(),
        "roles/web.yaml": role.replace("hello from", "halted at")})
    tip = fleet.head()

    def canary(name: str, state: str) -> None:
        (drop / f"{name}.json").write_text(json.dumps({
            "host": name, "state": state, "reported_at": 1e9,
            "applied_commit": tip if state == "converged" else "b" * 40,
            "rollout": {"wave": "canary", "wave_index": 0, "bucket": 1, "tip": tip},
            "quarantine": [{"commit": tip}] if state == "rolled-back" else []}))

    canary("c-1", "converged")
    canary("c-2", "rolled-back")  # 1 of 2: too few reports to judge
    out = apply({"cfg": cfg})
    assert out["state"] == "converged", out  # min_reports not reached: no halt
    # back to the old content (a new commit), then the canaries go bad for the next one
    fleet.commit("old again", push=True, files={"roles/web.yaml": role})
    apply({"cfg": cfg})
    fleet.commit("new again", push=True, files={
        "roles/web.yaml": role.replace("hello from", "halted at")})
    tip = fleet.head()
    canary("c-1", "converged")
    canary("c-2", "rolled-back")
    canary("c-3", "degraded")
    out = apply({"cfg": cfg})
    assert out["state"] == "halted" and out["halted"], out
    assert "2 of 3 hosts of earlier waves failed" in out["waiting"]
    assert "hello from" in (tmp_path / "root-web-01/srv/www/index.html").read_text()
    # all canaries fine again: the host goes
    for n in ("c-1", "c-2", "c-3"):
        canary(n, "converged")
    out = apply({"cfg": cfg})
    assert out["state"] == "converged"


def test_halt_never_starts_a_wave():
    """halted() can only add a reason to wait; a wave that has not opened stays shut
    whatever the drop says (the cycle asks halted() only once decide() says go)."""
    text = WAVES + "  halt: {failed_percent: 10, min_reports: 1}\n"
    host = next(f"h{i}" for i in range(1000) if policy_for(text, f"h{i}")["wave"] == "all")
    p = policy_for(text, host)
    tip = "a" * 40
    glowing = [{"host": f"c{i}", "state": "converged", "applied_commit": tip,
                "rollout": {"wave_index": 0}} for i in range(50)]
    assert rollout.halted(p, glowing, tip) == ""
    assert not rollout.decide(p, 1e9, 1e9 + 3600).go  # 'all' opens after 6h
    bad = [{**r, "state": "rolled-back"} for r in glowing]
    assert rollout.halted(p, bad, tip).startswith("halted: 50 of 50")


def test_a_reboot_waits_for_the_window_unless_told_now():
    assert rollout.may_reboot({}, 0).go  # no window declared: at once
    p = policy_for("windows:\n  - {days: [sat], start: \"02:00\", duration: 1h}\n", "h")
    friday = at(2026, 11, 27, 12, 0)
    d = rollout.may_reboot(p, friday)
    assert not d.go and d.opens_at == at(2026, 11, 28, 2, 0) and "reboot waits" in d.reason
    assert rollout.may_reboot(p, at(2026, 11, 28, 2, 30)).go
    now = policy_for("reboot: {when: now}\nwindows:\n  - {days: [sat], start: \"02:00\", "
                     "duration: 1h}\n", "h")
    assert rollout.may_reboot(now, friday).go


def test_notify_reboot_under_a_sandbox_root_is_skipped_and_said(env):
    fleet: Fleet = env["fleet"]
    apply(env)
    role = (fleet.work / "roles/web.yaml").read_text()
    fleet.commit("kernel args", push=True, files={
        "roles/web.yaml": role + "  /etc/default/grub.d/x.cfg: {content: \"X=1\\n\", "
                                 "notify: [reboot]}\n"})
    out = apply(env)
    assert out["state"] == "converged"
    assert any("skipped under a sandbox root" in w for w in out["warnings"])
    p = agent("render", "--repo", str(fleet.work), "--host", "web-01", "--label", "env=prod",
              "--json", check=0)
    res = [r for r in json.loads(p.stdout)["resources"] if r["name"].endswith("x.cfg")][0]
    assert res["spec"]["notify"] == ["reboot"]  # not reboot.service


def test_bad_reboot_policy_is_an_error(env):
    p = refused_with_fleet_head(env, "reboot: {when: later}\n")
    assert "reboot must be {when: window}" in p.stderr and "fleet.yaml:1" in p.stderr
