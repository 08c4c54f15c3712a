"""Issue 10 on a booted systemd testbed with root /: a revision that breaks a real
service is rolled back and quarantined, a wrong HTTP answer rolls back, and the
`fetch` check catches a commit that cuts the host off from its Git server."""

from __future__ import annotations

import json
import urllib.request

import pytest
from conftest import Fleet, GitDaemon, free_port
from test_packages_systemd_e2e import bed, unsigned_config  # noqa: F401 - the fixture
from test_systemd_e2e import deb  # noqa: F401 - the package fixture
from testbed import available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

# the web service reads its port from /etc/web.conf; "PORT=nope" makes it fail to start
WEB_UNIT = ("[Service]\nExecStart=/bin/sh -c '. /etc/web.conf; exec /usr/bin/python3 -m "
            "http.server --bind 127.0.0.1 \"$PORT\" --directory /srv/web'\n")


def fleet_files(port: int, conf: str, healthz: str | None = "ok", checks: str = "",
                hosts: str | None = None) -> dict[str, str]:
    files = f'/etc/web.conf: {{content: "{conf}\\n", notify: [web.service]}}'
    if healthz is not None:
        files += f', /srv/web/healthz: {{content: "{healthz}\\n"}}'
    else:
        files += ", /srv/web: {type: directory}"
    if hosts is not None:
        files += f", /etc/hosts: {{content: {json.dumps(hosts)}}}"
    return {
        "fleet.yaml": "health: {window: 2s, timeout: 20s, interval: 0.5s}\n"
                      "groups:\n  - roles: [web]\n",
        "roles/web.yaml": f"files: {{{files}}}\n"
                          f"units: {{web.service: {{content: {json.dumps(WEB_UNIT)}}}}}\n"
                          "services: {web.service: {enabled: true, active: true}}\n"
                          "checks:\n"
                          f"  http-ok: {{http: \"http://127.0.0.1:{port}/healthz\"}}\n"
                          "  still-fetches: {fetch: true}\n"
                          "  optional: {command: [/bin/false], required: false}\n" + checks,
    }


def test_broken_service_http_and_route_to_git_roll_back(tmp_path, bed):  # noqa: F811
    port = free_port()
    (tmp_path / "git").mkdir()
    good = f"PORT={port}"
    fleet = Fleet(tmp_path / "git", files=fleet_files(port, good, "ok v1"))
    daemon = GitDaemon(tmp_path / "git")
    daemon.start()
    hosts = "127.0.0.1 localhost\n127.0.0.1 gitserver\n"  # the rootfs has no /etc/hosts
    (bed.root / "etc/hosts").write_text(hosts)
    try:
        unsigned_config(bed, daemon.url("fleet.git").replace("127.0.0.1", "gitserver"))

        def apply(code: int = 0) -> dict:
            p = bed.run("gitops-agent", "apply", "--json", check=False, timeout=300)
            assert p.returncode == code, (p.returncode, p.stdout[-3000:], p.stderr[-3000:])
            return json.loads(p.stdout)

        def show(prop: str) -> str:
            return bed.run("systemctl", "show", "-p", prop, "--value",
                           "web.service").stdout.strip()

        def get(path: str) -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                return r.read().decode()

        out = apply()
        assert out["state"] == "converged" and out["trial"]["ok"], out["trial"]
        names = {c["name"]: c for c in out["trial"]["checks"]}
        assert names["service:web.service"]["ok"] and names["still-fetches"]["ok"]
        assert not names["optional"]["ok"]  # reported, never decides
        first = out["commit"]
        assert get("/healthz") == "ok v1\n"

        # 1. a config that makes the service fail to start: rolled back, quarantined
        fleet.commit("broken port", files=fleet_files(port, "PORT=nope", "ok v1"), push=True)
        bad = fleet.head()
        out = apply(1)
        assert out["state"] == "rolled-back", out["errors"]
        assert out["trial"]["failing"]["name"] == "service:web.service"
        assert out["after_rollback"]["ok"], out["after_rollback"]
        assert (bed.root / "etc/web.conf").read_text() == good + "\n"
        assert show("ActiveState") == "active" and get("/healthz") == "ok v1\n"
        assert out["last_good"] == first and out["quarantined"] == bad
        invocation = show("InvocationID")
        out = apply(1)  # not retried: no restart, no trial
        assert out["state"] == "rolled-back" and out["trial"] is None
        assert show("InvocationID") == invocation

        # 2. the fix applies and becomes last good
        fleet.commit("fixed", files=fleet_files(port, good, "ok v2"), push=True)
        out = apply()
        assert out["state"] == "converged" and out["last_good"] == fleet.head()
        assert get("/healthz") == "ok v2\n"
        fixed = fleet.head()

        # 3. service up, wrong answer (healthz gone: 404): rolled back
        fleet.commit("no healthz", files=fleet_files(port, good, None), push=True)
        out = apply(1)
        assert out["state"] == "rolled-back"
        assert "got HTTP 404" in out["trial"]["failing"]["output"]
        assert get("/healthz") == "ok v2\n" and out["last_good"] == fixed

        # 4. a commit that breaks the route to Git (gitserver now points elsewhere)
        fleet.commit("bad hosts", files=fleet_files(
            port, good, "ok v2", hosts=hosts.replace("127.0.0.1 gitserver", "127.0.0.2 gitserver")),
            push=True)
        out = apply(1)
        assert out["state"] == "rolled-back", out["errors"]
        assert out["trial"]["failing"]["name"] == "still-fetches"
        assert "127.0.0.1 gitserver" in (bed.root / "etc/hosts").read_text()
        listed = json.loads(bed.run("gitops-agent", "quarantine", "--json").stdout)
        assert len(listed) == 3
        assert bed.run("gitops-agent", "check").returncode == 0
    finally:
        daemon.stop()


def test_a_notified_reboot_in_the_window_is_confirmed_after_boot(tmp_path, bed):  # noqa: F811
    """A change that notifies `reboot` reboots the host inside its window (the testbed's
    systemd goes down and is booted again: a new PID 1), once; after boot the agent
    runs the revision's checks and confirms it: last good, `rebooted for <commit>`."""
    import datetime as dt
    import time

    (tmp_path / "git").mkdir()
    hour = (dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)).strftime("%H:00")
    fleet = Fleet(tmp_path / "git", files={
        "fleet.yaml": f"windows:\n  - {{start: \"{hour}\", duration: 3h, tz: UTC}}\n"
                      "health: {window: 1s, timeout: 20s, interval: 0.2s}\n"
                      "groups:\n  - roles: [base]\n",
        "roles/base.yaml": "files: {/etc/motd: {content: \"v1\\n\"}}\n"})
    daemon = GitDaemon(tmp_path / "git")
    daemon.start()
    try:
        unsigned_config(bed, daemon.url("fleet.git"))
        first = json.loads(bed.run("gitops-agent", "apply", "--json").stdout)
        assert first["state"] == "converged"
        fleet.commit("needs a reboot", push=True, files={
            "roles/base.yaml": "files: {/etc/motd: {content: \"v1\\n\"}, "
                               "/etc/kernel-args: {content: \"quiet\\n\", notify: [reboot]}}\n"
                               "checks: {args: {command: [/usr/bin/test, -s, "
                               "/etc/kernel-args]}}\n"})
        new = fleet.head()
        p = bed.run("gitops-agent", "apply", "--json", check=False, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        out = json.loads(p.stdout)
        assert out["state"] == "rebooting" and new[:12] in out["waiting"]
        assert out["last_good"] == first["commit"]  # not promoted before the reboot
        assert bed.proc is not None
        bed.proc.wait(120)  # the testbed's systemd went down: `systemctl reboot`
        bed.pid, bed.proc = 0, None
        time.sleep(1)
        bed.boot()
        after = json.loads(bed.run("gitops-agent", "apply", "--json").stdout)
        assert after["rebooted"] == new, after
        assert any(f"rebooted for {new[:12]}: confirmed" in w for w in after["warnings"])
        assert after["last_good"] == new and after["state"] == "converged"
        assert after["trial"]["ok"]
        # once per commit: the next cycles do not reboot again
        again = json.loads(bed.run("gitops-agent", "apply", "--json").stdout)
        assert again["state"] == "converged" and not again["rebooted"]
        assert (bed.root / "etc/kernel-args").read_text() == "quiet\n"
    finally:
        daemon.stop()
