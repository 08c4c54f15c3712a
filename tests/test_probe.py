"""Issue 14.4: the change probe. A daemon with a one-hour interval and a 0.5 s probe
applies a push over a real `git daemon` (git://) within seconds, a new approval of an
awaited tip is noticed too, and a server that goes away costs nothing but log lines.
Correctness only: bench/fleet.py measures latency and server cost."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from conftest import Fleet, GitDaemon, agent, allowed_line, ssh_key, write_config
from test_rollforward_pin import Daemon


def until(pred, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_probe_applies_a_push_and_a_new_approval_without_waiting_for_the_timer(tmp_path: Path):
    import shutil
    import tempfile

    ops, alice, bob = (ssh_key(tmp_path / n) for n in ("ops", "alice", "bob"))
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(allowed_line("ops@example.com", ops.with_suffix(".pub")))
    approvers = tmp_path / "approvers"
    approvers.write_text(allowed_line("alice", alice.with_suffix(".pub"))
                         + allowed_line("bob", bob.with_suffix(".pub")))
    (tmp_path / "git").mkdir()
    fleet = Fleet(tmp_path / "git", key=ops)
    server = GitDaemon(tmp_path / "git")
    server.start()
    root = tmp_path / "root"
    root.mkdir()
    sockdir = Path(tempfile.mkdtemp(prefix="ga-probe-"))
    cfg = write_config(tmp_path / "agent.yaml", url=server.url("fleet.git"), root=root,
                       state_dir=tmp_path / "state", interval="1h", jitter="0s",
                       socket=str(sockdir / "agent.sock"),
                       trust={"unsigned": "refuse", "allowed_signers": str(allowed)})
    data = yaml.safe_load(cfg.read_text())
    data["source"]["probe_interval"] = "0.5s"
    cfg.write_text(yaml.safe_dump(data))
    env = {"cfg": cfg, "sock": sockdir / "agent.sock"}
    d = Daemon(env)
    try:
        assert until(lambda: d.status()["state"] == "converged")
        first = d.status()["applied_commit"]
        new = fleet.commit("7 workers", files={"hosts/web-01.yaml":
                                               "vars: {worker_processes: 7}\n"}, push=True)
        t0 = time.monotonic()
        assert until(lambda: d.status()["applied_commit"] == new), d.status()
        took = time.monotonic() - t0
        st = d.status()
        assert st["probe_hits"] >= 1 and st["probes"] >= 1 and st["cycles"] >= 2
        assert took < 15  # the timer alone would take an hour; the figure is bench's job
        assert first != new

        # approvals: the awaited tip gets its second approval; the probe notices
        data["trust"]["approvals"] = {"threshold": 2, "approvers": str(approvers)}
        cfg.write_text(yaml.safe_dump(data))
        d.cli("sync", "--wait", check=None)  # still the old config: converged
        d.proc.send_signal(__import__("signal").SIGHUP)  # reload: approvals on
        assert until(lambda: d.status()["config_error"] == "" and d.status()["cycles"] >= 3)
        newer = fleet.commit("8 workers", files={"hosts/web-01.yaml":
                                                 "vars: {worker_processes: 8}\n"}, push=True)
        agent("approve", "--repo", str(fleet.work), "--key", str(alice), "--push",
              "origin", check=0)
        assert until(lambda: d.status()["state"] == "awaiting-approval"), d.status()
        agent("approve", "--repo", str(fleet.work), "--key", str(bob), "--push", "origin",
              check=0)
        assert until(lambda: d.status()["applied_commit"] == newer), d.status()

        # the server goes away: probes fail quietly, the host stays converged
        server.stop()
        hits = d.status()["probes"]
        assert until(lambda: d.status()["probes"] >= hits + 3)
        assert d.status()["state"] == "converged"
    finally:
        log = d.stop()
        server.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert "Traceback" not in log, log[-3000:]
    assert json.dumps(log).count("probe:") >= 2
