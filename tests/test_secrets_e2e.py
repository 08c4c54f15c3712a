"""Issue 12 on a booted systemd testbed: the agent from its .deb, run by its unit, makes
its identity with `gitops-agent keygen`, converges age-encrypted secrets, corrects drift
of one, rolls a new value back after a failed health check; then the journal (journald),
the state directory, status, history, the plan and the metrics are grepped for the
plaintexts: zero hits."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
from conftest import Fleet, GitDaemon
from test_packages_systemd_e2e import bed, unsigned_config  # noqa: F401 - the fixture
from test_systemd_e2e import deb  # noqa: F401 - the package fixture
from testbed import available

AGE = shutil.which("age")
pytestmark = [pytest.mark.skipif(available() is not None, reason=str(available())),
              pytest.mark.skipif(AGE is None, reason="needs the age CLI")]

FIRST = "first-Pa55word-zebra"
SECOND = "second-Pa55word-yak"
TEMPLATED = "templated-T0ken-otter"


def enc(data: str, recipient: str) -> bytes:
    return subprocess.run([AGE, "-r", recipient], input=data.encode(), capture_output=True,
                          check=True).stdout


def test_secrets_under_systemd_never_reach_journald_or_state(tmp_path, bed):  # noqa: F811
    recipient = bed.run("gitops-agent", "keygen").stdout.strip()
    assert recipient.startswith("age1")
    assert bed.run("stat", "-c", "%a", "/etc/gitops-agent/age.key").stdout.strip() == "600"
    (tmp_path / "git").mkdir()
    marker = "/etc/healthy"
    role = ("files:\n"
            "  /etc/app/db.pass: {secret: secrets/db.pass.age}\n"
            "  /etc/app/app.conf: {template: app.conf.j2}\n")
    fleet = Fleet(tmp_path / "git", files={
        "fleet.yaml": "health: {window: 1s, timeout: 10s, interval: 0.5s}\n"
                      "groups:\n  - roles: [app]\n",
        "roles/app.yaml": role,
        "files/app.conf.j2": "token={{ secrets.app.token }}\n"})
    (fleet.work / "secrets").mkdir()
    (fleet.work / "secrets/db.pass.age").write_bytes(enc(FIRST, recipient))
    (fleet.work / "secrets/app.yaml.age").write_bytes(enc(f"token: {TEMPLATED}\n",
                                                          recipient))
    fleet.commit("secrets", push=True)
    daemon = GitDaemon(tmp_path / "git")
    daemon.start()
    try:
        unsigned_config(bed, daemon.url("fleet.git"))
        cfg = bed.root / "etc/gitops-agent/agent.yaml"
        cfg.write_text(cfg.read_text() + "report: {metrics_textfile: /var/lib/prom/agent.prom}\n")
        bed.run("systemctl", "start", "gitops-agent.service", timeout=120)

        def sync() -> dict:
            return json.loads(bed.run("gitops-agent", "sync", "--wait", "--json",
                                      check=False, timeout=120).stdout)

        out = sync()
        assert out["state"] == "converged", out
        db = bed.root / "etc/app/db.pass"
        assert db.read_text() == FIRST
        assert (bed.root / "etc/app/app.conf").read_text() == f"token={TEMPLATED}\n"

        # drift: the daemon's watcher puts the secret back
        db.write_text("changed by hand")
        deadline = time.monotonic() + 60
        while db.read_text() != FIRST and time.monotonic() < deadline:
            time.sleep(0.5)
        assert db.read_text() == FIRST

        # a new value whose trial fails (a check that the marker exists; it does not):
        # rolled back to the first value
        (fleet.work / "secrets/db.pass.age").write_bytes(enc(SECOND, recipient))
        fleet.commit("rotate", push=True, files={"roles/app.yaml": role + (
            f"checks:\n  marker: {{command: [/usr/bin/test, -e, {marker}]}}\n")})
        plan = bed.run("gitops-agent", "plan", check=False, timeout=120).stdout
        assert "secret changed (hmac-sha256:" in plan
        out = sync()
        assert out["state"] == "rolled-back", out
        assert db.read_text() == FIRST

        outputs = [plan, json.dumps(out),
                   bed.run("gitops-agent", "status", "--json", check=False).stdout,
                   bed.run("gitops-agent", "history", "--json", check=False).stdout,
                   bed.run("journalctl", "-o", "json", "--no-pager", check=False).stdout,
                   bed.run("journalctl", "-o", "verbose", "--no-pager", check=False).stdout]
        assert any("secret changed" in o for o in outputs[4:])  # the journal was read
        for text in outputs:
            for s in (FIRST, SECOND, TEMPLATED):
                assert s not in text
        hits = bed.run("grep", "-rlF", "-e", FIRST, "-e", SECOND, "-e", TEMPLATED,
                       "/var/lib/gitops-agent", "/var/lib/prom", "/run/gitops-agent",
                       "/var/log", check=False)
        assert hits.stdout == "", hits.stdout
    finally:
        daemon.stop()
