"""Real transports and fleet visibility: ssh:// fetch through a real sshd with pinned
host keys, https:// through `git http-backend` behind a TLS server with a test CA,
reports to an SFTP drop on that sshd, the metrics textfile, and `fleet status`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import Fleet, Sshd, agent, ssh_key, write_config


def ssh_config(tmp_path: Path, fleet: Fleet, sshd: Sshd, known_hosts: Path, name: str = "a"):
    root = tmp_path / f"root-{name}"
    root.mkdir(exist_ok=True)
    url = f"ssh://root@127.0.0.1:{sshd.port}{fleet.bare}"
    return write_config(tmp_path / f"{name}.yaml", url=url, root=root,
                        state_dir=tmp_path / f"state-{name}",
                        source={"ssh_key": str(sshd.client_key),
                                "known_hosts": str(known_hosts), "timeout": "10s"})


def test_ssh_fetch_with_pinned_host_key(tmp_path, fleet, sshd):
    cfg = ssh_config(tmp_path, fleet, sshd, sshd.known_hosts)
    out = json.loads(agent("apply", "--config", str(cfg), "--json", check=0).stdout)
    assert out["commit"] == fleet.head() and not out["offline"]
    assert (tmp_path / "root-a/etc/motd").exists()


def test_ssh_wrong_host_key_is_refused_showing_the_offered_fingerprint(tmp_path, fleet, sshd):
    other = ssh_key(tmp_path / "other_host_key")
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} "
                     + " ".join(other.with_suffix(".pub").read_text().split()[:2]) + "\n")
    cfg = ssh_config(tmp_path, fleet, sshd, wrong, "w")
    p = agent("apply", "--config", str(cfg), "--json", check=1)
    fp = __import__("subprocess").run(["ssh-keygen", "-lf", str(sshd.host_key) + ".pub"],
                                      capture_output=True, text=True).stdout.split()[1]
    assert "host key of" in p.stdout and fp in p.stdout
    assert not (tmp_path / "root-w/etc/motd").exists()
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    cfg = ssh_config(tmp_path, fleet, sshd, empty, "e")
    assert fp in agent("apply", "--config", str(cfg), "--json", check=1).stdout


def report_config(tmp_path: Path, fleet: Fleet, sshd: Sshd, drop: Path, name: str):
    root = tmp_path / f"root-{name}"
    root.mkdir(exist_ok=True)
    return write_config(tmp_path / f"{name}.yaml", url=fleet.bare, root=root,
                        state_dir=tmp_path / f"state-{name}",
                        host={"name": name, "labels": {"env": "prod"}},
                        report={"sftp": {"host": "127.0.0.1", "port": sshd.port,
                                         "user": "root", "key": str(sshd.client_key),
                                         "known_hosts": str(sshd.known_hosts),
                                         "dir": str(drop)},
                                "metrics_textfile": str(tmp_path / f"{name}.prom")})


def test_three_agents_report_to_one_sftp_drop_and_fleet_status(tmp_path, fleet, sshd):
    drop = tmp_path / "drop"
    drop.mkdir()
    for name in ("web-01", "web-02", "db-01"):
        agent("apply", "--config", str(report_config(tmp_path, fleet, sshd, drop, name)),
              check=0)
    reports = sorted(p.name for p in drop.iterdir())
    assert reports == ["db-01.history.jsonl", "db-01.json", "web-01.history.jsonl",
                       "web-01.json", "web-02.history.jsonl", "web-02.json"]
    rep = json.loads((drop / "web-01.json").read_text())
    assert rep["host"] == "web-01" and rep["applied_commit"] == fleet.head()
    assert rep["state"] == "converged"
    p = agent("fleet", "status", "--reports", str(drop), "--repo", str(fleet.work), check=0)
    assert (f"{fleet.head()[:7]}: 3/3 hosts converged, 0 failed, 0 rolled back, "
            f"0 degraded, 0 stale") in p.stdout
    # a new tip: every host is one commit behind, still not failed
    fleet.commit("next", files={"hosts/web-01.yaml": "vars: {worker_processes: 9}\n"})
    data = json.loads(agent("fleet", "status", "--reports", str(drop), "--repo",
                            str(fleet.work), "--json", check=0).stdout)
    assert {r["host"]: r["behind"] for r in data["rows"]} == {"web-01": 1, "web-02": 1,
                                                               "db-01": 1}
    # a stale report makes the exit non-zero (alerts, CI gates)
    old = json.loads((drop / "db-01.json").read_text())
    old["reported_at"] = time.time() - 3600
    (drop / "db-01.json").write_text(json.dumps(old))
    p = agent("fleet", "status", "--reports", str(drop), "--stale", "15m", check=1)
    assert "1 stale" in p.stdout and "STALE" in p.stdout


def test_reports_queue_while_sshd_is_down_and_flush_in_order(tmp_path, fleet, sshd):
    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = report_config(tmp_path, fleet, sshd, drop, "web-01")
    agent("apply", "--config", str(cfg), check=0)
    sshd.stop()
    for _ in range(3):
        p = agent("apply", "--config", str(cfg), check=0)  # reporting never fails a cycle
        assert "report queued" in p.stderr
    queued = sorted((tmp_path / "state-web-01/report-queue").glob("*.json"))
    assert len(queued) == 3
    sshd.start()
    agent("apply", "--config", str(cfg), check=0)
    lines = (drop / "web-01.history.jsonl").read_text().splitlines()
    seqs = [json.loads(line)["seq"] for line in lines]
    assert seqs == [1, 2, 3, 4, 5]  # nothing lost, order kept
    assert json.loads((drop / "web-01.json").read_text())["seq"] == 5
    assert list((tmp_path / "state-web-01/report-queue").glob("*.json")) == []
    assert not any(p.name.startswith(".") for p in drop.iterdir())  # no temp file left


def test_metrics_textfile_parses_with_prometheus_client(tmp_path, fleet, sshd):
    from prometheus_client.parser import text_string_to_metric_families

    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = report_config(tmp_path, fleet, sshd, drop, "web-01")
    agent("apply", "--config", str(cfg), check=0)
    text = (tmp_path / "web-01.prom").read_text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    info = fams["gitops_agent_applied_commit_info"].samples[0]
    assert info.labels["commit"] == fleet.head()
    assert fams["gitops_agent_last_cycle_duration_seconds"].samples[0].value >= 0
    states = {s.labels["state"]: s.value for s in fams["gitops_agent_state"].samples}
    assert states["converged"] == 1
    res = {s.labels["state"]: s.value for s in fams["gitops_agent_resources"].samples}
    assert res["changed"] == 7
    assert "gitops_agent_drift_corrections" in fams  # counters drop the _total suffix
    assert fams["gitops_agent_tip_age_seconds"].samples[0].value >= 0
    assert not any(n.startswith(".") for n in os.listdir(tmp_path) if n.endswith(".prom"))


@pytest.fixture
def https(tmp_path: Path, fleet: Fleet):
    from httpsgit import HttpsGit

    srv = HttpsGit(fleet.bare.parent, tmp_path / "certs", "fleet", "s3cret-token")
    yield srv
    srv.stop()


def https_config(tmp_path: Path, https, name: str, token: str, ca: Path):
    root = tmp_path / f"root-{name}"
    root.mkdir(exist_ok=True)
    tok = tmp_path / f"token-{name}"
    tok.write_text(token + "\n")
    return write_config(tmp_path / f"{name}.yaml", url=https.url("fleet.git"), root=root,
                        state_dir=tmp_path / f"state-{name}",
                        source={"token_file": str(tok), "ca_bundle": str(ca),
                                "timeout": "10s"})


def test_https_fetch_with_token_and_test_ca(tmp_path, fleet, https):
    cfg = https_config(tmp_path, https, "ok", "fleet:s3cret-token", tmp_path / "certs/ca.pem")
    p = agent("apply", "--config", str(cfg), "--json", check=0)
    assert json.loads(p.stdout)["commit"] == fleet.head()
    assert "s3cret-token" not in p.stdout + p.stderr
    state = tmp_path / "state-ok"
    assert not any("s3cret-token" in f.read_text(errors="replace")
                   for f in state.glob("*.json*"))


def test_https_wrong_token_and_unknown_ca_are_refused(tmp_path, fleet, https):
    cfg = https_config(tmp_path, https, "bad", "fleet:wrong", tmp_path / "certs/ca.pem")
    p = agent("apply", "--config", str(cfg), "--json", check=1)
    assert "authentication to 127.0.0.1 failed" in p.stdout
    assert "wrong" not in p.stdout + p.stderr
    from httpsgit import make_ca

    other_ca, _, _ = make_ca(tmp_path / "other-ca", "Other CA")
    cfg = https_config(tmp_path, https, "ca", "fleet:s3cret-token", other_ca)
    p = agent("apply", "--config", str(cfg), "--json", check=1)
    assert "TLS certificate of 127.0.0.1 is not trusted by" in p.stdout
    assert not (tmp_path / "root-ca/etc/motd").exists()


def test_daemon_reports_after_each_cycle_and_as_a_heartbeat(tmp_path, fleet, sshd):
    import asyncio
    import shutil
    import tempfile

    import yaml

    from agent.daemon import Daemon

    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = report_config(tmp_path, fleet, sshd, drop, "web-01")
    sockdir = Path(tempfile.mkdtemp(prefix="ga-sock-"))  # sun_path is 108 bytes
    data = yaml.safe_load(cfg.read_text())
    data.update(interval="1h", socket=str(sockdir / "a.sock"))
    data["report"]["heartbeat"] = "1s"
    cfg.write_text(yaml.safe_dump(data))

    async def main():
        d = Daemon(str(cfg))
        task = asyncio.ensure_future(d.run())
        history = drop / "web-01.history.jsonl"
        deadline = time.time() + 15
        while time.time() < deadline:
            if history.exists() and len(history.read_text().splitlines()) >= 3:
                break
            await asyncio.sleep(0.1)
        d.stop()
        assert await asyncio.wait_for(task, 30) == 0
        return d.cycles

    cycles = asyncio.run(main())
    shutil.rmtree(sockdir, ignore_errors=True)
    lines = [json.loads(x) for x in (drop / "web-01.history.jsonl").read_text().splitlines()]
    assert len(lines) >= 3 and cycles <= 2  # more reports than cycles: the heartbeat
    assert [x["seq"] for x in lines] == list(range(1, len(lines) + 1))
    assert lines[0]["applied_commit"] == fleet.head()


def test_a_rollback_in_metrics_the_report_drop_and_fleet_status(tmp_path, fleet, sshd):
    """Issue 10: rolled-back, the failing check and the quarantine travel to the metrics
    textfile, the SFTP report and `fleet status`."""
    from prometheus_client.parser import text_string_to_metric_families

    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = report_config(tmp_path, fleet, sshd, drop, "web-01")
    agent("apply", "--config", str(cfg), check=0)
    fleet.commit("bad", push=True, files={
        "fleet.yaml": "health: {window: 0s, timeout: 2s, interval: 0.2s}\n"
                      + (fleet.work / "fleet.yaml").read_text(),
        "roles/web.yaml": (fleet.work / "roles/web.yaml").read_text().replace(
            "hello from", "bye from") + "checks:\n  gone: {command: [/bin/false]}\n"
                                         "  fine: {command: [/bin/true]}\n"})
    agent("apply", "--config", str(cfg), check=1)
    fams = {f.name: f for f in text_string_to_metric_families(
        (tmp_path / "web-01.prom").read_text())}
    assert fams["gitops_agent_rollbacks"].samples[0].value == 1
    assert fams["gitops_agent_quarantined_commits"].samples[0].value == 1
    checks = {s.labels["check"]: s.value for s in fams["gitops_agent_check_status"].samples}
    assert checks == {"gone": 0, "fine": 1}
    states = {s.labels["state"]: s.value for s in fams["gitops_agent_state"].samples}
    assert states["rolled-back"] == 1
    report = json.loads((drop / "web-01.json").read_text())
    assert report["state"] == "rolled-back" and report["quarantine"][0]["commit"] == fleet.head()
    assert report["trial"]["failing"]["name"] == "gone"
    p = agent("fleet", "status", "--reports", str(drop), check=1)
    assert "1 rolled back" in p.stdout and "rolled back to" in p.stdout


def test_no_op_cycles_send_no_report_only_changes_and_heartbeats_do(tmp_path, fleet, sshd,
                                                                     monkeypatch):
    """A fleet of hosts polling every 30 s must not open an SSH session to the drop per
    poll: a cycle reports when something a fleet view reads changed."""
    import asyncio
    import shutil
    import tempfile

    import yaml

    from agent.control import request
    from agent.daemon import Daemon

    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = report_config(tmp_path, fleet, sshd, drop, "web-01")
    sockdir = Path(tempfile.mkdtemp(prefix="ga-sock-"))
    data = yaml.safe_load(cfg.read_text())
    data.update(interval="1h", socket=str(sockdir / "a.sock"))
    data["report"]["heartbeat"] = "1h"
    cfg.write_text(yaml.safe_dump(data))
    history = drop / "web-01.history.jsonl"

    def reports() -> int:
        return len(history.read_text().splitlines()) if history.exists() else 0

    async def until(pred) -> None:
        deadline = time.time() + 20
        while not pred() and time.time() < deadline:
            await asyncio.sleep(0.1)
        assert pred()

    async def sync() -> dict:
        return await asyncio.to_thread(request, str(sockdir / "a.sock"),
                                       {"verb": "sync", "wait": True}, 60)

    async def main() -> None:
        d = Daemon(str(cfg))
        task = asyncio.ensure_future(d.run())
        await until(lambda: reports() == 1)
        for _ in range(3):  # no-op cycles: nothing new to say
            await sync()
        await asyncio.sleep(1.0)
        assert reports() == 1
        assert (tmp_path / "web-01.prom").exists()  # the local sink is still written
        fleet.commit("next", files={"hosts/web-01.yaml": "vars: {worker_processes: 3}\n"},
                     push=True)
        await sync()
        await until(lambda: reports() == 2)
        d._report()  # the heartbeat reports regardless
        await until(lambda: reports() == 3)
        # a report queued while a flush is still under way (it has read the queue) is
        # sent by that flush's next round, not left for the next heartbeat
        from agent import report

        gate = asyncio.Event()
        real = report.flush_sftp

        async def held(*args: object) -> int:
            sent = await real(*args)
            await gate.wait()
            return sent

        monkeypatch.setattr(report, "flush_sftp", held)
        d._report()
        await until(lambda: reports() == 4)
        d._report()
        gate.set()
        await until(lambda: reports() == 5)
        d.stop()
        assert await asyncio.wait_for(task, 30) == 0

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
    lines = [json.loads(x) for x in history.read_text().splitlines()]
    assert lines[1]["applied_commit"] == fleet.head() != lines[0]["applied_commit"]
