"""Issue 15.2 and 15.3, and 15.1 under the daemon: rollback to any revision as a signed
roll-forward commit, the local break-glass pin, and a daemon that waits for a second
approval and applies within one cycle. Real git, real ssh-keygen signatures, the real
daemon in a subprocess with its real socket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, Fleet, agent, allowed_line, git, ssh_key, write_config


@pytest.fixture
def signed(tmp_path: Path) -> dict:
    ops = ssh_key(tmp_path / "ops")
    alice = ssh_key(tmp_path / "alice")
    bob = ssh_key(tmp_path / "bob")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(allowed_line("ops@example.com", ops.with_suffix(".pub")))
    fleet = Fleet(tmp_path, key=ops)
    # the operator's own git signing configuration, as `git commit -S` would use it
    git(fleet.work, "config", "gpg.format", "ssh")
    git(fleet.work, "config", "user.signingkey", str(ops))
    root = tmp_path / "root"
    root.mkdir()
    sockdir = Path(tempfile.mkdtemp(prefix="ga-pin-"))
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state", interval="1h", jitter="0s",
                       socket=str(sockdir / "agent.sock"),
                       trust={"unsigned": "refuse", "allowed_signers": str(allowed)})
    yield {"fleet": fleet, "root": root, "cfg": cfg, "tmp": tmp_path, "ops": ops,
           "alice": alice, "bob": bob, "sock": sockdir / "agent.sock"}
    shutil.rmtree(sockdir, ignore_errors=True)


def apply(env: dict, check: int | None = 0) -> dict:
    return json.loads(agent("apply", "--config", str(env["cfg"]), "--json",
                            check=check).stdout)


def workers(env: dict) -> str:
    text = (env["root"] / "etc/nginx/nginx.conf").read_text()
    return next(line for line in text.splitlines() if "worker_processes" in line).strip()


# --- 2. rollback as a roll-forward ------------------------------------------------------------


def test_fleet_rollback_makes_a_signed_commit_with_the_old_tree_that_hosts_apply(signed):
    env = signed
    fleet: Fleet = env["fleet"]
    first = fleet.head()
    fleet.commit("3 workers", files={"hosts/web-01.yaml": "vars: {worker_processes: 3}\n"})
    bad = fleet.commit("9 workers", files={"hosts/web-01.yaml": "vars: {worker_processes: 9}\n"},
                       push=True)
    apply(env)
    assert workers(env) == "worker_processes 9;"

    # the dry run: which hosts' plans change, and nothing committed
    p = agent("fleet", "rollback", "--repo", str(fleet.work), "--to", first, "--dry-run",
              "-m", "9 workers overload the box", "--label", "env=prod", check=0)
    assert "web-01: " in p.stdout and "file[/etc/nginx/nginx.conf]" in p.stdout
    assert fleet.head() == bad
    drop = env["tmp"] / "drop"
    drop.mkdir()
    (drop / "web-01.json").write_text(json.dumps({  # a report as the host sends it
        "host": "web-01", "state": "converged", "reported_at": time.time(),
        "labels": {"env": "prod"}}))
    data = json.loads(agent("fleet", "rollback", "--repo", str(fleet.work), "--to", first,
                            "--dry-run", "--json", "--reports", str(drop), check=0).stdout)
    web = next(r for r in data["hosts"] if r["host"] == "web-01")
    assert web["changes"] == ["file[/etc/nginx/nginx.conf]"]

    p = agent("fleet", "rollback", "--repo", str(fleet.work), "--to", first, "--sign",
              "-m", "9 workers overload the box", check=0)
    new = fleet.head()
    assert new != bad and f"{new[:12]}" in p.stdout and "signed" in p.stdout
    assert git(fleet.work, "rev-parse", f"{new}^{{tree}}").stdout == \
        git(fleet.work, "rev-parse", f"{first}^{{tree}}").stdout
    assert git(fleet.work, "rev-parse", f"{new}^").stdout.strip() == bad
    msg = git(fleet.work, "log", "-1", "--format=%B", new).stdout
    assert f"Rollback-To: {first}" in msg and "9 workers overload the box" in msg
    assert git(fleet.work, "status", "--porcelain").stdout == ""  # work tree moved too
    verdict = json.loads(agent("verify", "--repo", str(fleet.work), "--rev", new,
                               "--allowed-signers", str(env["tmp"] / "allowed_signers"),
                               "--json", check=0).stdout)
    assert verdict["verdict"] == "good"
    fleet.push()
    out = apply(env)
    assert out["commit"] == new and out["state"] == "converged"
    assert workers(env) == "worker_processes 8;"  # hosts/web-01.yaml of the first commit

    # refused: a revision outside the branch's history, and the tree it already has
    git(fleet.work, "checkout", "-q", "-b", "side", first)
    side = fleet.commit("side", files={"README": "side\n"})
    git(fleet.work, "checkout", "-q", "main")
    p = agent("fleet", "rollback", "--repo", str(fleet.work), "--to", side, check=2)
    assert "is not in the history of main" in p.stderr
    p = agent("fleet", "rollback", "--repo", str(fleet.work), "--to", first, check=2)
    assert "already has the tree" in p.stderr


# --- 3. the break-glass pin ------------------------------------------------------------------


def test_pin_converges_an_older_trusted_commit_until_unpin(signed):
    env = signed
    fleet: Fleet = env["fleet"]
    first = fleet.head()
    second = fleet.commit("5 workers", files={"hosts/web-01.yaml":
                                              "vars: {worker_processes: 5}\n"}, push=True)
    apply(env)
    assert workers(env) == "worker_processes 5;"
    cfg = str(env["cfg"])
    p = agent("pin", first[:10], "--reason", "incident 42: 5 workers crash", "--config", cfg,
              check=0)
    assert f"pinned to {first[:12]}" in p.stdout
    out = apply(env)
    assert out["state"] == "pinned" and out["commit"] == first
    assert "incident 42: 5 workers crash" in out["pinned"] and "pinned to" in out["pinned"]
    assert workers(env) == "worker_processes 8;"
    assert out["last_good"] == second  # a pin never becomes last good
    # a new tip while pinned: still pinned
    fleet.commit("6 workers", files={"hosts/web-01.yaml": "vars: {worker_processes: 6}\n"},
                 push=True)
    out = apply(env)
    assert out["state"] == "pinned" and workers(env) == "worker_processes 8;"
    assert "pinned" in agent("history", "--config", cfg, check=0).stdout
    p = agent("unpin", "--config", cfg, check=0)
    assert "unpinned" in p.stdout
    out = apply(env)
    assert out["state"] == "converged" and workers(env) == "worker_processes 6;"

    # refused: not in the branch's history; not trusted (an unsigned commit)
    git(fleet.work, "checkout", "-q", "-b", "side", first)
    side = fleet.commit("side", files={"README": "x\n"})
    git(fleet.work, "push", "-q", "origin", "side")
    git(fleet.work, "checkout", "-q", "main")
    git(env["tmp"], "--git-dir", str(env["tmp"] / "state/mirror.git"), "fetch", "-q",
        str(fleet.bare), "side")
    p = agent("pin", side, "--reason", "x", "--config", cfg, check=2)
    assert "is not in the history of branch main" in p.stderr
    unsigned = fleet.commit("unsigned", files={"README": "u\n"}, sign=False, push=True)
    fleet.commit("signed again", files={"README": "s\n"}, push=True)
    apply(env, check=None)
    p = agent("pin", unsigned, "--reason", "x", "--config", cfg, check=1)
    assert "not signed" in p.stderr
    assert not (env["tmp"] / "state/pin.json").exists()


# --- the daemon: approvals and pin --------------------------------------------------------


class Daemon:
    def __init__(self, env: dict) -> None:
        self.env = env
        self.proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config",
                                      str(env["cfg"])], cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(env["sock"]):
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                self.proc.communicate()[0][-3000:]
            time.sleep(0.05)

    def cli(self, *args: str, check: int | None = None) -> subprocess.CompletedProcess:
        return agent(*args, "--config", str(self.env["cfg"]), check=check)

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def stop(self) -> str:
        self.proc.terminate()
        return self.proc.communicate(timeout=30)[0]


def fleet_view(env: dict, status: dict, state: str, why: str) -> None:
    """The status the host reports (a report is the same document), in `fleet status`."""
    drop = env["tmp"] / "drop"
    drop.mkdir(exist_ok=True)
    (drop / "web-01.json").write_text(json.dumps({**status, "reported_at": time.time()}))
    out = agent("fleet", "status", "--reports", str(drop), check=None).stdout
    row = next(line for line in out.splitlines() if line.startswith("web-01"))
    assert state in row and why in out, out


def test_daemon_waits_for_the_second_approval_then_applies_and_shows_a_pin(signed):
    env = signed
    fleet: Fleet = env["fleet"]
    approvers = env["tmp"] / "approvers"
    approvers.write_text(allowed_line("alice", env["alice"].with_suffix(".pub"))
                         + allowed_line("bob", env["bob"].with_suffix(".pub")))
    cfg = json.loads(json.dumps(__import__("yaml").safe_load(env["cfg"].read_text())))
    cfg["trust"]["approvals"] = {"threshold": 2, "approvers": str(approvers)}
    env["cfg"].write_text(__import__("yaml").safe_dump(cfg))
    first = fleet.head()
    for who in ("alice", "bob"):
        agent("approve", "--repo", str(fleet.work), "--key", str(env[who]), "--push",
              "origin", check=0)
    d = Daemon(env)
    try:
        out = json.loads(d.cli("sync", "--wait", "--json", check=0).stdout)
        assert out["state"] == "converged" and out["commit"] == first
        new = fleet.commit("7 workers", files={"hosts/web-01.yaml":
                                               "vars: {worker_processes: 7}\n"}, push=True)
        agent("approve", "--repo", str(fleet.work), "--key", str(env["alice"]), "--push",
              "origin", check=0)
        out = json.loads(d.cli("sync", "--wait", "--json", check=1).stdout)
        assert out["state"] == "awaiting-approval"
        st = d.status()
        assert st["state"] == "awaiting-approval"
        assert "1 of 2: alice; waiting for any of bob" in st["waiting"]
        assert "waiting:     " in d.cli("status", check=None).stdout
        fleet_view(env, st, "awaiting-approval", "1 of 2: alice; waiting for any of bob")
        # the second approval arrives: one cycle applies it
        agent("approve", "--repo", str(fleet.work), "--key", str(env["bob"]), "--push",
              "origin", check=0)
        out = json.loads(d.cli("sync", "--wait", "--json", check=0).stdout)
        assert out["state"] == "converged" and out["commit"] == new
        assert workers(env) == "worker_processes 7;"

        # pin while the daemon runs: it takes the pin at once, status says so loudly
        d.cli("pin", first, "--reason", "rollback drill", check=0)
        deadline = time.monotonic() + 30
        while d.status()["state"] != "pinned" and time.monotonic() < deadline:
            time.sleep(0.2)
        st = d.status()
        assert st["state"] == "pinned" and "rollback drill" in st["pinned"]
        assert "PINNED:" in d.cli("status").stdout
        fleet_view(env, st, "pinned", "rollback drill")
        assert workers(env) == "worker_processes 8;"
        d.cli("unpin", check=0)
        deadline = time.monotonic() + 30
        while d.status()["state"] != "converged" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert d.status()["state"] == "converged" and workers(env) == "worker_processes 7;"
    finally:
        log = d.stop()
    assert "Traceback" not in log, log[-3000:]
