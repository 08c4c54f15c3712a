"""Health checks, the trial of a new revision, automatic rollback and quarantine.

Real components: the real CLI in a subprocess, real git repos, real TCP and HTTP
servers on 127.0.0.1, real commands. (A service that fails to start is tested on the
booted systemd testbed in test_packages_systemd_e2e.py.)
"""

from __future__ import annotations

import functools
import http.server
import json
import socket
import threading
from pathlib import Path

import pytest
from conftest import Fleet, agent, free_port, refused_with_fleet_head

# a short trial keeps the tests fast; the window must still be held, once
FAST = "health: {window: 1s, timeout: 4s, interval: 0.2s}\n"


def apply(env: dict, *extra: str, check: int | None = 0) -> dict:
    p = agent("apply", "--config", str(env["cfg"]), "--json", *extra, check=check)
    return json.loads(p.stdout)


def with_checks(fleet: Fleet, checks: str, index: str = "hello", extra: str = "") -> None:
    role = (fleet.work / "roles/web.yaml").read_text().split("\nchecks:")[0]
    role = role.replace(role[role.index("<h1>"):role.index("</h1>") + 5],
                        f"<h1>{index}</h1>")
    fleet.write({"roles/web.yaml": role.rstrip("\n") + "\nchecks:\n" + checks,
                 "fleet.yaml": FAST + (fleet.work / "fleet.yaml").read_text()
                 .replace(FAST, "")})
    fleet.commit(f"checks {index}", push=True, files={"README": extra} if extra else None)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    m = tmp_path / "healthy"
    m.write_text("")
    return m


def listening() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s, s.getsockname()[1]


def test_failing_required_check_rolls_back_quarantines_and_is_not_retried(env, marker):
    fleet: Fleet = env["fleet"]
    good_check = f"  marker: {{command: [/usr/bin/test, -e, {marker}]}}\n"
    with_checks(fleet, good_check, "first")
    out = apply(env)
    assert out["state"] == "converged" and out["trial"]["ok"], out
    first = out["commit"]
    index = env["root"] / "srv/www/index.html"
    assert "first" in index.read_text()

    port = free_port()  # nothing listens there
    with_checks(fleet, good_check + f"  db: {{tcp: \"127.0.0.1:{port}\", timeout: 1s}}\n",
                "second")
    bad = fleet.head()
    out = apply(env, check=1)
    assert out["state"] == "rolled-back", out
    assert out["trial"]["failing"]["name"] == "db"
    assert "refused" in out["trial"]["failing"]["output"].lower()
    assert out["after_rollback"]["ok"]
    assert "first" in index.read_text()  # the old content is back
    assert out["last_good"] == first and out["quarantined"] == bad
    assert not (env["state"] / "journal.json").exists()
    q = json.loads(agent("quarantine", "--config", str(env["cfg"]), "--json", check=0).stdout)
    assert [x["commit"] for x in q] == [bad] and q[0]["check"] == "db"

    # not retried: the host stays on last good and says why, without a trial
    again = apply(env, check=1)
    assert again["state"] == "rolled-back" and again["trial"] is None
    assert again["commit"] == first and "quarantined" in again["rolled_back"]
    assert "first" in index.read_text()
    # a later commit with the same plan for this host is held too
    with_checks(fleet, good_check + f"  db: {{tcp: \"127.0.0.1:{port}\", timeout: 1s}}\n",
                "second", extra="docs only\n")
    same = apply(env, check=1)
    assert same["state"] == "rolled-back" and bad[:12] in same["rolled_back"], same

    # a commit that changes the plan is tried, and becomes last good when healthy
    srv, live = listening()
    try:
        with_checks(fleet, good_check + f"  db: {{tcp: \"127.0.0.1:{live}\"}}\n", "third")
        out = apply(env)
    finally:
        srv.close()
    assert out["state"] == "converged" and out["last_good"] == fleet.head()
    assert "third" in index.read_text()

    human = agent("quarantine", "--config", str(env["cfg"]), check=0).stdout
    assert bad[:12] in human and "db" in human
    agent("quarantine", "--config", str(env["cfg"]), "clear", bad[:10], check=0)
    assert agent("quarantine", "--config", str(env["cfg"]), check=0).stdout == \
        "no quarantined commits\n"
    p = agent("quarantine", "--config", str(env["cfg"]), "clear", "abcdef12", check=2)
    assert "not quarantined" in p.stderr


def test_optional_check_failing_is_reported_and_does_not_roll_back(env):
    with_checks(env["fleet"], "  nice: {command: [/bin/false], required: false}\n")
    out = apply(env)
    assert out["state"] == "converged" and out["trial"]["ok"]
    nice = [c for c in out["trial"]["checks"] if c["name"] == "nice"][0]
    assert not nice["ok"] and not nice["required"] and "exit 1" in nice["output"]


def test_http_check_with_the_wrong_answer_rolls_back(env, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "healthz").write_text("ok\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with_checks(env["fleet"], f"  up: {{http: \"http://127.0.0.1:{port}/healthz\"}}\n",
                    "one")
        assert apply(env)["state"] == "converged"
        with_checks(env["fleet"], f"  up: {{http: \"http://127.0.0.1:{port}/ready\", "
                                  f"status: 200, timeout: 2s}}\n", "two")
        out = apply(env, check=1)
    finally:
        server.shutdown()
    assert out["state"] == "rolled-back"
    assert "wanted 200, got HTTP 404" in out["trial"]["failing"]["output"]
    assert "one" in (env["root"] / "srv/www/index.html").read_text()


def test_checks_failing_after_rollback_leave_the_host_degraded(env, marker):
    fleet: Fleet = env["fleet"]
    good_check = f"  marker: {{command: [/usr/bin/test, -e, {marker}]}}\n"
    with_checks(fleet, good_check, "first")
    apply(env)
    assert agent("check", "--config", str(env["cfg"]), check=0).stdout.endswith("healthy\n")
    marker.unlink()  # the host breaks on its own, outside the agent
    p = agent("check", "--config", str(env["cfg"]), "--json", check=1)
    assert not json.loads(p.stdout)["ok"]
    with_checks(fleet, good_check + "  also: {command: [/bin/false]}\n", "second")
    out = apply(env, check=1)
    assert out["state"] == "degraded", out
    assert not out["after_rollback"]["ok"]
    assert any("manual intervention" in e for e in out["errors"])
    # loud and stable: no flapping back to the bad commit, still degraded
    again = apply(env, check=1)
    assert again["state"] == "degraded" and again["trial"] is None
    marker.write_text("")
    assert agent("check", "--config", str(env["cfg"]), check=0).returncode == 0
    agent("quarantine", "--config", str(env["cfg"]), "clear", fleet.head(), check=0)
    with_checks(fleet, good_check, "third")
    assert apply(env)["state"] == "converged"


def test_a_revision_without_checks_or_services_has_no_trial(env):
    out = apply(env)
    assert out["state"] == "converged" and out["trial"] is None


@pytest.mark.parametrize("check,words", [
    ("{tcp: \"127.0.0.1\"}", "HOST:PORT"),
    ("{tcp: \"127.0.0.1:99999\"}", "HOST:PORT"),
    ("{http: \"ftp://x/\"}", "http:// or https://"),
    ("{http: \"http://x/\", status: 999}", "HTTP status"),
    ("{command: \"/bin/true\"}", "must be a list"),
    ("{command: [true]}", "absolute program path"),
    ("{tcp: \"127.0.0.1:1\", command: [/bin/true]}", "exactly one of"),
    ("{}", "exactly one of"),
    ("{fetch: yes please}", "fetch must be true"),
    ("{tcp: \"127.0.0.1:1\", timeout: soon}", "timeout"),
    ("{tcp: \"127.0.0.1:1\", required: maybe}", "required must be true or false"),
    ("{tcp: \"127.0.0.1:1\", status: 200}", "status is for http"),
    ("{tcp: \"127.0.0.1:1\", retries: 3}", "unknown key 'retries'"),
    ("[/bin/true]", "must be a mapping"),
])
def test_bad_check_declarations_are_errors_with_file_and_line(env, check, words):
    before = sorted(p.name for p in env["root"].rglob("*"))
    fleet: Fleet = env["fleet"]
    fleet.commit(files={"roles/web.yaml": (fleet.work / "roles/web.yaml").read_text()
                        + f"checks:\n  c: {check}\n"}, push=True)
    p = agent("apply", "--config", str(env["cfg"]), check=1)
    assert words in p.stderr + p.stdout, p.stderr
    assert "roles/web.yaml:" in p.stderr + p.stdout
    assert sorted(p.name for p in env["root"].rglob("*")) == before


@pytest.mark.parametrize("health,words", [
    ("health: {window: 10m, timeout: 1m}\n", "longer than health.timeout"),
    ("health: {window: soon}\n", "health.window"),
    ("health: {interval: 0s}\n", "interval must be more than 0s"),
    ("health: {grace: 1m}\n", "unknown key 'grace'"),
])
def test_bad_health_settings_are_errors(env, health, words):
    p = refused_with_fleet_head(env, health)
    assert words in p.stderr + p.stdout, p.stderr
