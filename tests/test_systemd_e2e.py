"""End to end on a real systemd: the agent installed from the .deb that packaging/ builds,
run by units/gitops-agent.service in a booted Debian rootfs, pulling over git:// from a
`git daemon` on the host's 127.0.0.1 (the testbed shares the host's network namespace)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, Fleet, GitDaemon, allowed_line, ssh_key
from testbed import Testbed, available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


@pytest.fixture(scope="module")
def deb() -> Path:
    out = subprocess.run([str(REPO / "packaging/build-deb.sh"), sys.executable],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def bed(tmp_path: Path):
    tb = Testbed(tmp_path)
    tb.boot()
    yield tb
    tb.stop()


def agent_yaml(url: str) -> str:
    return f"""source: {{url: "{url}", branch: main, timeout: 10s}}
trust: {{allowed_signers: /etc/gitops-agent/allowed_signers, unsigned: refuse}}
host: {{name: web-01, labels: {{env: prod}}}}
interval: 1h
jitter: 0s
"""


def test_agent_under_systemd(tmp_path, deb, bed):
    key = ssh_key(tmp_path / "signing")
    (tmp_path / "git").mkdir()
    fleet = Fleet(tmp_path / "git", key=key)
    daemon = GitDaemon(tmp_path / "git")
    daemon.start()
    try:
        shutil.copy(deb, bed.root / "tmp/agent.deb")
        bed.run("dpkg", "-i", "/tmp/agent.deb")
        assert "gitops-agent" in bed.run("getent", "group", "gitops-agent").stdout
        etc = bed.root / "etc/gitops-agent"
        assert "conffile" not in (etc / "agent.yaml").read_text()  # the commented example
        (etc / "agent.yaml").write_text(agent_yaml(daemon.url("fleet.git")))
        (etc / "allowed_signers").write_text(
            allowed_line("ops@example.com", key.with_suffix(".pub")))

        # Type=notify: `systemctl start` returns once READY=1 is sent, after the socket
        # listens, so status answers at once
        bed.run("systemctl", "start", "gitops-agent.service", timeout=120)
        show = bed.run("systemctl", "show", "gitops-agent.service", "-p", "ActiveState",
                       "-p", "Type", "-p", "StatusText").stdout
        assert "ActiveState=active" in show and "Type=notify" in show
        p = bed.run("gitops-agent", "status", "--json", check=False)
        st = json.loads(p.stdout or "{}")
        assert p.stdout, (p.stderr, bed.run("journalctl", "-u", "gitops-agent", "--no-pager",
                                            check=False).stdout)
        assert st["host"] == "web-01"
        out = bed.run("gitops-agent", "sync", "--wait", "--json", timeout=120)
        res = json.loads(out.stdout)
        assert res["commit"] == fleet.head() and res["state"] == "converged", out.stdout
        assert "managed by gitops-agent" in (bed.root / "etc/motd").read_text()

        new = fleet.commit("16 workers", files={"hosts/web-01.yaml":
                                                "vars: {worker_processes: 16}\n"}, push=True)
        res = json.loads(bed.run("gitops-agent", "sync", "--wait", "--json",
                                 timeout=120).stdout)
        assert res["commit"] == new and res["signer"] == "ops@example.com"
        st = json.loads(bed.run("gitops-agent", "status", "--json").stdout)
        assert st["applied_commit"] == new and st["state"] == "converged"
        assert "worker_processes 16;" in (bed.root / "etc/nginx/nginx.conf").read_text()
        status_text = bed.run("systemctl", "show", "gitops-agent.service", "-p",
                              "StatusText").stdout
        assert f"converged @{new[:7]}" in status_text

        journal = bed.run("journalctl", "-o", "json", "-u", "gitops-agent.service",
                          "--no-pager").stdout
        records = [json.loads(line) for line in journal.splitlines() if line.strip()]
        mine = [r for r in records if r.get("SYSLOG_IDENTIFIER") == "gitops-agent"]
        assert any(r.get("STAGE") == "converge" and r.get("RESOURCE") ==
                   "file[/etc/nginx/nginx.conf]" and r.get("COMMIT") == new for r in mine)
        ready = [r for r in mine if "daemon: ready" in r.get("MESSAGE", "")]
        started = [r for r in records if r.get("JOB_RESULT") == "done"
                   and r.get("JOB_TYPE") == "start"]
        if started:  # the unit became active only after the agent said it was ready
            assert int(ready[0]["__MONOTONIC_TIMESTAMP"]) <= \
                int(started[0]["__MONOTONIC_TIMESTAMP"])

        # reload works on a minimal Debian, which has no /bin/kill (procps): the image
        # has it (openssh-server pulls procps in), so take it away first
        for kill in ("usr/bin/kill", "bin/kill"):
            if (bed.root / kill).exists() and not (bed.root / kill).is_symlink():
                (bed.root / kill).unlink()
        assert bed.run("sh", "-c", "command -v /bin/kill /usr/bin/kill", check=False).stdout == ""
        pid = bed.run("systemctl", "show", "-p", "MainPID", "--value",
                      "gitops-agent.service").stdout.strip()
        bed.run("systemctl", "reload", "gitops-agent.service", timeout=60)
        assert bed.run("systemctl", "show", "-p", "MainPID", "--value",
                       "gitops-agent.service").stdout.strip() == pid
        journal = bed.run("journalctl", "-u", "gitops-agent.service", "--no-pager").stdout
        assert "daemon: reloaded" in journal

        bed.run("systemctl", "stop", "gitops-agent.service", timeout=120)
        show = bed.run("systemctl", "show", "gitops-agent.service", "-p", "Result", "-p",
                       "ExecMainStatus", "-p", "ActiveState").stdout
        assert "Result=success" in show and "ExecMainStatus=0" in show
        assert "ActiveState=inactive" in show

        # apt remove + apt install keeps the administrator's choice: enabled and running
        bed.run("systemctl", "enable", "--now", "gitops-agent.service", timeout=120)
        bed.run("dpkg", "-r", "gitops-agent", timeout=120)
        assert bed.run("systemctl", "is-active", "gitops-agent.service",
                       check=False).stdout.strip() != "active"
        bed.run("dpkg", "-i", "/tmp/agent.deb", timeout=120)
        assert bed.run("systemctl", "is-enabled", "gitops-agent.service",
                       check=False).stdout.strip() == "enabled"
        assert bed.run("systemctl", "is-active", "gitops-agent.service",
                       check=False).stdout.strip() == "active"
        # purge removes what the package and the README put in /etc/gitops-agent
        p = bed.run("dpkg", "--purge", "gitops-agent", timeout=120)
        assert "not empty" not in p.stdout + p.stderr
        assert not (bed.root / "etc/gitops-agent").exists()
        assert not (bed.root / "var/lib/gitops-agent").exists()
    finally:
        daemon.stop()
