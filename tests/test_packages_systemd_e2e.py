"""Packages, units and services converged for real: the agent, installed from its .deb and
run by its unit in a booted systemd testbed, against a local apt repository of tiny
.deb packages built with dpkg-deb (file: source inside the rootfs). The test host itself
is not changed: all of this happens inside the rootfs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Fleet, GitDaemon, free_port, ssh_key
from test_systemd_e2e import agent_yaml, deb  # noqa: F401 - the package fixture
from testbed import Testbed, available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

DAEMON = """#!/bin/sh
# a tiny daemon: logs each start, then idles
echo "started $$ $(cat /etc/demo-daemon.conf 2>/dev/null)" >> /var/log/demo-daemon.log
exec sleep infinity
"""
DAEMON_UNIT = """[Unit]
Description=demo daemon from a tiny package
[Service]
ExecStart=/usr/bin/demo-daemon
[Install]
WantedBy=multi-user.target
"""
APP_UNIT = "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n"


# a short trial: the services these tests restart must stay up for 2s
HEALTH = "health: {window: 2s, timeout: 30s, interval: 1s}\n"


def build_deb(out: Path, name: str, files: dict[str, tuple[str, int]], version: str = "1.0",
              postinst: str | None = None) -> None:
    stage = out / f"stage-{name}-{version}"
    (stage / "DEBIAN").mkdir(parents=True)
    (stage / "DEBIAN/control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@t>\n"
        f"Description: tiny test package {name}\n")
    if postinst is not None:
        (stage / "DEBIAN/postinst").write_text(postinst)
        (stage / "DEBIAN/postinst").chmod(0o755)
    for path, (text, mode) in files.items():
        p = stage / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        p.chmod(mode)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(stage),
                    str(out / f"{name}_{version}_all.deb")], check=True, capture_output=True)
    shutil.rmtree(stage)


def _bed(tmp_path: Path, deb: Path, extra: bool = False):  # noqa: F811
    tb = Testbed(tmp_path)
    repo = tb.root / "srv/repo"
    repo.mkdir(parents=True)
    build_deb(repo, "gitops-demo-daemon", {"/usr/bin/demo-daemon": (DAEMON, 0o755),
                                           "/lib/systemd/system/demo-daemon.service":
                                               (DAEMON_UNIT, 0o644)})
    build_deb(repo, "gitops-extra", {"/usr/share/gitops-extra/README": ("extra\n", 0o644)})
    if extra:  # issue 16: versions, holds, a failing postinst, a package that adds a user
        for name in ("gitops-up", "gitops-held"):
            for version in ("1.0", "2.0"):
                build_deb(repo, name, {f"/usr/share/{name}/VERSION": (version + "\n", 0o644)},
                          version)
        build_deb(repo, "gitops-fine", {"/usr/share/gitops-fine/README": ("fine\n", 0o644)})
        build_deb(repo, "gitops-broken", {"/usr/share/gitops-broken/README": ("b\n", 0o644)},
                  postinst="#!/bin/sh\necho 'postinst: refusing on purpose' >&2\nexit 1\n")
        build_deb(repo, "gitops-svcuser", {"/usr/share/gitops-svcuser/README": ("u\n", 0o644)},
                  postinst="#!/bin/sh\nset -e\nif [ \"$1\" = configure ]; then\n"
                           "  getent passwd svcuser >/dev/null || adduser --system --group "
                           "--no-create-home --quiet svcuser\nfi\n")
    packages = subprocess.run(["dpkg-scanpackages", "-m", ".", "/dev/null"], cwd=repo,
                              capture_output=True, check=True).stdout
    (repo / "Packages").write_bytes(packages)
    (tb.root / "etc/apt/sources.list").write_text("deb [trusted=yes] file:/srv/repo ./\n")
    shutil.copy(deb, tb.root / "root/agent.deb")
    tb.boot()
    tb.run("dpkg", "-i", "/root/agent.deb")
    return tb


@pytest.fixture
def bed(tmp_path: Path, deb):  # noqa: F811
    tb = _bed(tmp_path, deb)
    yield tb
    tb.stop()


@pytest.fixture
def bed16(tmp_path: Path, deb):  # noqa: F811
    tb = _bed(tmp_path, deb, extra=True)
    yield tb
    tb.stop()


def unsigned_config(bed: Testbed, url: str) -> None:
    """agent.yaml for these tests: commits unsigned on purpose (trust has its own tests)."""
    cfg = agent_yaml(url).replace(
        "trust: {allowed_signers: /etc/gitops-agent/allowed_signers, unsigned: refuse}",
        "trust: {unsigned: allow}")
    (bed.root / "etc/gitops-agent/agent.yaml").write_text(cfg)


def role(packages: str, files: str, units: str, services: str) -> str:
    return f"packages: {{{packages}}}\nfiles: {{{files}}}\nunits: {{{units}}}\n" \
           f"services: {{{services}}}\n"


def test_packages_units_services(tmp_path, bed):
    (tmp_path / "git").mkdir()
    fleet = Fleet(tmp_path / "git", files={
        "fleet.yaml": HEALTH + "groups:\n  - roles: [app]\n",
        "roles/app.yaml": role(
            "gitops-demo-daemon: present, gitops-extra: present",
            '/etc/demo-daemon.conf: {content: "v1\\n", notify: [demo-daemon.service]}',
            f"fleet-app.service: {{content: {json.dumps(APP_UNIT)}}}",
            "fleet-app.service: {enabled: true, active: true}, "
            "demo-daemon.service: {enabled: true, active: true}")})
    daemon = GitDaemon(tmp_path / "git")
    daemon.start()
    try:
        unsigned_config(bed, daemon.url("fleet.git"))
        bed.run("systemctl", "start", "gitops-agent.service", timeout=120)

        def sync() -> dict:
            out = bed.run("gitops-agent", "sync", "--wait", "--json", check=False, timeout=300)
            return json.loads(out.stdout)

        def show(unit: str, prop: str) -> str:
            return bed.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

        res = sync()
        assert res["state"] == "converged", res
        assert "install ok installed" in bed.run("dpkg-query", "-W", "-f=${Status}",
                                                 "gitops-demo-daemon").stdout
        assert show("fleet-app.service", "ActiveState") == "active"
        assert show("fleet-app.service", "UnitFileState") == "enabled"
        assert show("demo-daemon.service", "ActiveState") == "active"
        log = bed.root / "var/log/demo-daemon.log"
        assert log.read_text().count("started") == 1  # started, not restarted on top
        pid = show("demo-daemon.service", "MainPID")

        # a config change restarts the service exactly once
        fleet.commit("v2", files={"roles/app.yaml": (fleet.work / "roles/app.yaml").read_text()
                                  .replace('"v1\\n"', '"v2\\n"')}, push=True)
        res = sync()
        assert res["state"] == "converged", res
        assert show("demo-daemon.service", "MainPID") != pid
        assert log.read_text().splitlines()[-1].endswith("v2")
        assert log.read_text().count("started") == 2

        # a package that does not exist fails that resource with apt's message; the rest
        # is applied, then the revision is rolled back and last good does not advance
        good = res["commit"]
        text = (fleet.work / "roles/app.yaml").read_text()
        broken = text.replace("gitops-extra: present", "gitops-extra: present, nosuch-pkg: present")
        broken = broken.replace("files: {", 'files: {/etc/also.conf: {content: "x\\n"}, ')
        fleet.commit("broken", files={"roles/app.yaml": broken}, push=True)
        res = sync()
        assert res["state"] == "failed"
        failed = {c["id"]: c["msg"] for c in res["changes"] if c["failed"]}
        assert list(failed) == ["package[nosuch-pkg]"]
        assert "Unable to locate package nosuch-pkg" in failed["package[nosuch-pkg]"]
        assert not (bed.root / "etc/also.conf").exists()  # applied, then put back
        assert res["rolled_back"]
        st = bed.run("gitops-agent", "status", "--json", check=False)
        assert st.returncode == 1  # status exits 1 while the host is failed
        assert json.loads(st.stdout)["last_good"] == good

        # removing the unit from Git stops, disables and deletes it; absent removes a package
        final = role("gitops-demo-daemon: present, gitops-extra: absent",
                     '/etc/demo-daemon.conf: {content: "v2\\n", notify: [demo-daemon.service]}',
                     "", "demo-daemon.service: {enabled: true, active: true}")
        fleet.commit("remove app unit", files={"roles/app.yaml": final}, push=True)
        res = sync()
        assert res["state"] == "converged", res
        assert not (bed.root / "etc/systemd/system/fleet-app.service").exists()
        assert show("fleet-app.service", "ActiveState") == "inactive"
        assert bed.run("dpkg-query", "-W", "-f=${Status}", "gitops-extra",
                       check=False).stdout.find("install ok installed") < 0
        assert log.read_text().count("started") == 2  # nothing notified it this time
    finally:
        daemon.stop()


def test_latest_failing_postinst_and_a_user_made_by_a_package(tmp_path, bed16):
    """Issue 16 with root /: latest upgrades 1.0 to 2.0 and leaves a held package alone;
    a failing postinst fails that package alone with dpkg's reason while the rest of the
    batch is installed; a package that creates a user and a file owned by that user
    converge in one cycle."""
    bed = bed16
    (tmp_path / "git").mkdir()
    fleet = Fleet(tmp_path / "git", files={
        "fleet.yaml": HEALTH + "groups:\n  - roles: [app]\n",
        "roles/app.yaml": role('gitops-up: {version: "1.0"}, gitops-held: {version: "1.0"}',
                               "", "", "")})
    daemon = GitDaemon(tmp_path / "git")
    daemon.start()
    try:
        unsigned_config(bed, daemon.url("fleet.git"))

        def apply() -> dict:
            out = bed.run("gitops-agent", "apply", "--json", check=False, timeout=300)
            return json.loads(out.stdout)

        def version(name: str) -> str:
            return bed.run("dpkg-query", "-W", "-f=${Version}", name,
                           check=False).stdout.strip()

        res = apply()
        assert res["state"] == "converged", [c["msg"] for c in res["changes"]]
        assert version("gitops-up") == "1.0" and version("gitops-held") == "1.0"
        bed.run("apt-mark", "hold", "gitops-held")

        fleet.commit("latest", push=True, files={"roles/app.yaml": role(
            "gitops-up: latest, gitops-held: latest", "", "", "")})
        res = apply()
        assert res["state"] == "converged", res
        msgs = {c["id"]: c["msg"] for c in res["changes"]}
        assert version("gitops-up") == "2.0"
        assert msgs["package[gitops-up]"] == "upgrade 1.0 -> 2.0 (latest)"
        assert version("gitops-held") == "1.0" and msgs["package[gitops-held]"].startswith(
            "held")
        assert apply()["changed"] == 0  # latest is now a no-op

        fleet.commit("a batch with a broken postinst", push=True, files={
            "roles/app.yaml": role("gitops-up: latest, gitops-fine: present, "
                                   "gitops-broken: present", "", "", "")})
        res = apply()
        assert res["state"] == "failed"
        by_id = {c["id"]: c for c in res["changes"] if c["action"] != "rollback"}
        assert [i for i, c in by_id.items() if c["failed"]] == ["package[gitops-broken]"]
        assert "post-installation script subprocess returned error exit status 1" in \
            by_id["package[gitops-broken]"]["msg"]
        assert by_id["package[gitops-fine]"]["changed"]
        # then the revision is rolled back: the package it installed is removed again
        undo = {c["id"]: c for c in res["changes"] if c["action"] == "rollback"}
        assert undo["package[gitops-fine]"]["changed"], undo
        assert "ii" not in bed.run("dpkg-query", "-W", "-f=${db:Status-Abbrev}",
                                   "gitops-fine", check=False).stdout
        assert version("gitops-up") == "2.0"

        fleet.commit("a user from a package owns a file; a live sysctl", push=True, files={
            "roles/app.yaml": role("gitops-svcuser: present",
                                   '/etc/svc.conf: {content: "x\\n", owner: svcuser, '
                                   'group: svcuser, mode: "0640"}', "", "")
            # UTS-namespaced: the testbed's own, never the test machine's
            + "sysctl: {kernel.domainname: gitops-test}\n"})
        host_domain = Path("/proc/sys/kernel/domainname").read_text()
        res = apply()
        assert res["state"] == "converged", res
        st = (bed.root / "etc/svc.conf").stat()
        uid = bed.run("id", "-u", "svcuser").stdout.strip()
        assert str(st.st_uid) == uid
        assert bed.run("cat", "/proc/sys/kernel/domainname").stdout.strip() == "gitops-test"
        assert "kernel.domainname = gitops-test" in \
            (bed.root / "etc/sysctl.d/60-gitops-agent.conf").read_text()
        assert Path("/proc/sys/kernel/domainname").read_text() == host_domain
        assert apply()["changed"] == 0  # checked live against /proc/sys: a no-op now

        # issue 13: a user the agent creates logs in over sshd with its authorized key
        key = ssh_key(tmp_path / "deploy_key")
        pub = " ".join(key.with_suffix(".pub").read_text().split()[:2])
        fleet.commit("a user", push=True, files={"roles/app.yaml": "users:\n  deploy:\n"
                                                 "    shell: /bin/bash\n    groups: [ops]\n"
                                                 f"    authorized_keys: [\"{pub}\"]\n"
                                                 "groups: {ops: {gid: 1600}}\n"})
        res = apply()
        assert res["state"] == "converged", res
        port = free_port()
        bed.run("mkdir", "-p", "/run/sshd")
        bed.run("/usr/sbin/sshd", "-p", str(port), "-o", "ListenAddress=127.0.0.1")
        login = subprocess.run(
            ["ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes", "-o",
             "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o",
             "UserKnownHostsFile=/dev/null", "-F", "/dev/null", "deploy@127.0.0.1",
             "id -un; id -Gn"], capture_output=True, text=True, timeout=60)
        assert login.returncode == 0, login.stderr
        assert login.stdout.split("\n")[0] == "deploy" and "ops" in login.stdout
    finally:
        daemon.stop()
