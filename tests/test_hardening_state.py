"""Issue 9, no tracebacks, ever: damaged state files, a full or read-only state_dir,
hostile reports in the fleet drop, bad host names, an SFTP drop without pinned host
keys, and the client verbs reaching the daemon while agent.yaml is broken."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, Fleet, agent, write_config


@pytest.fixture
def applied(env: dict):
    """conftest's env after one converged cycle."""
    agent("apply", "--config", str(env["cfg"]), check=0)
    return env


@pytest.mark.parametrize("name, text, says", [
    ("state.json", '{"version": 1, "last_good": 42}', "last_good is int"),
    ("state.json", '{"version": 1, "last_good": "nope"}', "is not a commit id"),
    ("state.json", '{"version": 1, "last_good_committer_time": "x"}',
     "last_good_committer_time is str"),
    ("manifest.json", '{"resources": {"a": 1}}', "resource 'a' is not an object"),
    ("manifest.json", '{"resources": {}, "full_check_at": "x"}', "full_check_at is str"),
    ("manifest.json", '{"resources": {"file[/x]": {"kind": "file"}}}', "lacks kind or name"),
    ("manifest.json", '{"resources": {"file[/x]": {"kind": "file", "name": "/x", "sig": 5}}}',
     "sig is int"),
])
def test_a_state_file_of_the_wrong_shape_is_the_loud_error_with_a_way_out(applied, name, text,
                                                                          says):
    (applied["state"] / name).write_text(text)
    p = agent("apply", "--config", str(applied["cfg"]), check=2)
    assert says in p.stderr and "move it aside" in p.stderr.lower()


def test_history_with_invalid_utf8_does_not_break_cycles(applied):
    hist = applied["state"] / "history.jsonl"
    hist.write_bytes(hist.read_bytes() + b"\xff\xfe not json\n")
    agent("apply", "--config", str(applied["cfg"]), check=0)
    agent("apply", "--config", str(applied["cfg"]), check=0)
    p = agent("history", "--config", str(applied["cfg"]), check=2)
    assert "history.jsonl:2 is not a JSON object" in p.stderr


def _in_mount_ns(script: str, env: dict) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace (the test's own tmpfs and
    read-only binds vanish with it)."""
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, cwd=REPO,
                          env={**env, "PY": sys.executable})


def test_a_full_state_dir_is_a_clean_error(tmp_path):
    fleet = Fleet(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root, state_dir=state)
    script = """set -e
mount -t tmpfs -o size=2m tmpfs "$STATE"
"$PY" -m agent.cli apply --config "$CFG" >/dev/null 2>&1
dd if=/dev/zero of="$STATE/fill" bs=4k 2>/dev/null || true
rm "$ROOT/etc/motd"
"$PY" -m agent.cli apply --config "$CFG" --json || echo "rc=$?"
"""
    p = _in_mount_ns(script, {"STATE": str(state), "CFG": str(cfg), "ROOT": str(root)})
    assert "Traceback" not in p.stderr, p.stderr
    assert "rc=1" in p.stdout
    assert "No space left on device" in p.stdout + p.stderr


def test_a_read_only_state_dir_is_a_clean_error(applied):
    script = """set -e
mount --bind "$STATE" "$STATE"
mount -o remount,bind,ro "$STATE"
"$PY" -m agent.cli apply --config "$CFG" || echo "rc=$?"
"""
    p = _in_mount_ns(script, {"STATE": str(applied["state"]), "CFG": str(applied["cfg"])})
    assert "Traceback" not in p.stderr, p.stderr
    assert "rc=2" in p.stdout and "Read-only file system" in p.stdout + p.stderr


# --- fleet status with hostile reports ------------------------------------------------------


def test_fleet_status_skips_bad_reports_with_a_warning(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    good = {"host": "web-01", "state": "converged", "applied_commit": "a" * 40,
            "reported_at": time.time(), "last_cycle": {"failed": 0, "errors": []}}
    (drop / "web-01.json").write_text(json.dumps(good))
    for name, over in (("soon", {"reported_at": "soon"}), ("five", {"applied_commit": 5}),
                       ("list", {"host": ["x"]}), ("slash", {"host": "../x"})):
        (drop / f"{name}.json").write_text(json.dumps({**good, **over}))
    (drop / "junk.json").write_bytes(b"\xff\xfe")
    p = agent("fleet", "status", "--reports", str(drop), check=1)
    assert "web-01" in p.stdout and "1/1 hosts converged" in p.stdout
    for name in ("soon", "five", "list", "slash", "junk"):
        assert f"skipped {drop / name}.json" in p.stderr
    data = json.loads(agent("fleet", "status", "--reports", str(drop), "--json", check=1).stdout)
    assert [r["host"] for r in data["rows"]] == ["web-01"] and len(data["skipped"]) == 5


# --- host.name ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a/b", "../x", ".", "web\n01", "web;rm -rf", "-web",
                                  "a" * 64, "web..01", ""])
def test_host_name_must_be_hostname_like(tmp_path, name):
    cfg = write_config(tmp_path / "agent.yaml", url=tmp_path, root=tmp_path,
                       state_dir=tmp_path / "state", host={"name": name})
    p = agent("apply", "--config", str(cfg), check=2)
    assert "host.name" in p.stderr and "agent.yaml:" in p.stderr
    assert not (tmp_path / "state").exists()


def test_good_host_names_pass(tmp_path):
    from agent.config import host_name_problem

    for name in ("web-01", "web-01.fra1.example.com", "a", "1x", "x" * 63):
        assert host_name_problem(name) == ""


# --- SFTP drop without pinned host keys ---------------------------------------------------------


def test_sftp_without_known_hosts_refuses_even_a_host_in_the_users_known_hosts(applied,
                                                                               sshd):
    home = applied["tmp"] / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh/known_hosts").write_text(sshd.known_hosts.read_text())
    (home / ".ssh/config").write_text("Host *\n  UserKnownHostsFile none\n"
                                      "  StrictHostKeyChecking no\n")
    drop = applied["tmp"] / "drop"
    drop.mkdir()
    cfg = write_config(applied["tmp"] / "sftp.yaml", url=applied["fleet"].bare,
                       root=applied["root"], state_dir=applied["state"],
                       report={"sftp": {"host": "127.0.0.1", "port": sshd.port,
                                        "user": "root", "key": str(sshd.client_key),
                                        "dir": str(drop)}})
    p = agent("apply", "--config", str(cfg), check=0, env={"HOME": str(home)})
    assert "report queued" in p.stderr
    assert list(drop.iterdir()) == []


# --- client verbs with a broken agent.yaml -----------------------------------------------------


def test_status_reaches_the_daemon_while_agent_yaml_is_invalid(applied):
    import shutil
    import tempfile

    sockdir = Path(tempfile.mkdtemp(prefix="ga-sock-"))
    sock = sockdir / "agent.sock"
    cfg = write_config(applied["tmp"] / "d.yaml", url=applied["fleet"].bare,
                       root=applied["root"], state_dir=applied["state"], socket=str(sock),
                       interval="1h")
    daemon = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 20
        while not sock.exists() and time.time() < deadline:
            time.sleep(0.1)
        cfg.write_text(cfg.read_text() + "bogus_key: [\n")  # now invalid YAML
        p = agent("status", "--config", str(cfg), "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["host"] == "web-01"
    finally:
        daemon.terminate()
        daemon.wait(20)
        shutil.rmtree(sockdir, ignore_errors=True)
