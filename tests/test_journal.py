"""The apply journal: kill -9 anywhere in an apply and the host is never left half-way.

Real processes killed with SIGKILL at random points of a real 2,000-file apply; the
restart resolves the journal (a rollback to last good) before anything else.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, Fleet, agent, write_config

from agent.config import load_file
from agent.cycle import run_cycle

N = 2000
TMP = re.compile(r"^\..+\.gitops-agent\.\d+\.tmp$")


def bulk(version: str, n: int = N) -> dict[str, str]:
    lines = ["files:\n"]
    for i in range(n):
        lines.append(f"  /srv/bulk/d{i % 20}/f{i}.conf: {{content: \"{version} {i}\\n\"}}\n")
    return {"fleet.yaml": "groups:\n  - roles: [bulk]\n", "roles/bulk.yaml": "".join(lines)}


def start_apply(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "apply", "--config", str(cfg)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def files_of(root: Path) -> tuple[dict[str, str], list[str]]:
    contents, temps = {}, []
    for dirpath, _, names in os.walk(root):
        for name in names:
            if TMP.match(name):
                temps.append(name)
            else:
                contents[name] = Path(dirpath, name).read_text()
    return contents, temps


def recover(cfg: Path):
    """Restart as the agent does, but stop before converging anything: what is on the
    host afterwards is the journal's rollback alone."""
    result, _ = run_cycle(load_file(str(cfg)), fetch=False, should_stop=lambda: True,
                          lock_wait=30)
    return result


@pytest.fixture
def bulk_env(tmp_path: Path) -> dict:
    fleet = Fleet(tmp_path, files=bulk("old"))
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state")
    return {"fleet": fleet, "root": root, "cfg": cfg, "state": tmp_path / "state"}


def test_kill_9_at_random_points_of_a_2000_file_apply_rolls_back_whole(bulk_env):
    fleet, root, cfg = bulk_env["fleet"], bulk_env["root"], bulk_env["cfg"]
    agent("apply", "--config", str(cfg), check=0)
    old, _ = files_of(root)
    assert len(old) == N and all(v.startswith("old ") for v in old.values())
    fleet.commit("new", files=bulk("new"), push=True)
    t0 = time.monotonic()
    agent("apply", "--config", str(cfg), check=0)  # how long a whole apply takes here
    whole = time.monotonic() - t0
    new, _ = files_of(root)
    assert all(v.startswith("new ") for v in new.values())
    # back to old as the base of every run: a signed roll-forward to old's content
    fleet.commit("old again", files=bulk("old"), push=True)
    agent("apply", "--config", str(cfg), check=0)
    rng = random.Random(1234)
    recovered = 0
    for run in range(30):
        fleet.commit(f"new {run}", files=bulk(f"new{run}"), push=True)
        p = start_apply(cfg)
        journal = bulk_env["state"] / "journal.json"
        while not journal.exists() and p.poll() is None:
            time.sleep(0.002)  # the writes start once the journal is down
        time.sleep(rng.uniform(0, whole * 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        result = recover(cfg)
        after, temps = files_of(root)
        assert not temps, (run, temps)
        versions = {v.split()[0] for v in after.values()}
        if result.recovered:
            recovered += 1
            # rolled back: whole-old, every file, never a mix
            assert versions == {"old"}, (run, versions)
            assert len(after) == N
        else:
            # killed before the journal began (nothing written) or after it closed
            # (the new commit is last good): one revision either way
            assert versions in ({"old"}, {f"new{run}"}), (run, versions)
            if versions == {f"new{run}"}:
                # it finished: the next base is this commit; go back to old content
                fleet.commit(f"old {run}", files=bulk("old"), push=True)
                agent("apply", "--config", str(cfg), check=0)
        assert not (bulk_env["state"] / "journal.json").exists()
    assert recovered >= 20, recovered  # most kills land inside the writes
    # and after all that, the next cycle applies the tip whole
    fleet.commit("final", files=bulk("final"), push=True)
    out = json.loads(agent("apply", "--config", str(cfg), "--json", check=0).stdout)
    assert out["state"] == "converged"
    final, _ = files_of(root)
    assert {v.split()[0] for v in final.values()} == {"final"}


def test_a_killed_first_apply_leaves_nothing_behind(bulk_env):
    """Files a killed first apply created are removed by the recovery, so a removal
    from Git that follows leaves no orphan."""
    cfg, root = bulk_env["cfg"], bulk_env["root"]
    p = start_apply(cfg)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # kill it once it has written some files
        if len(files_of(root)[0]) > 50:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert files_of(root)[0], "the apply was killed before writing anything"
    bulk_env["fleet"].commit("empty", files={"roles/bulk.yaml": "files: {}\n"}, push=True)
    out = json.loads(agent("apply", "--config", str(cfg), "--json", check=0).stdout)
    assert out["recovered"] and "recovered from an interrupted apply" in out["warnings"][0]
    assert files_of(root) == ({}, [])
    hist = json.loads(agent("history", "--config", str(cfg), "--json", check=0).stdout)
    assert hist[-1]["recovered"] == out["recovered"]


def test_shutdown_in_the_middle_of_an_apply_rolls_back_and_the_next_cycle_converges(
        bulk_env):
    cfg, root = bulk_env["cfg"], bulk_env["root"]
    agent("apply", "--config", str(cfg), check=0)
    bulk_env["fleet"].commit("new", files=bulk("new"), push=True)
    calls = [0]

    def stop_half_way() -> bool:
        calls[0] += 1
        return calls[0] > N // 2

    result, _ = run_cycle(load_file(str(cfg)), should_stop=stop_half_way)
    assert result.state == "failed" and "shutting down" in result.rolled_back
    assert {v.split()[0] for v in files_of(root)[0].values()} == {"old"}
    out = json.loads(agent("apply", "--config", str(cfg), "--json", check=0).stdout)
    assert out["state"] == "converged" and not out["fast_path"]
    assert {v.split()[0] for v in files_of(root)[0].values()} == {"new"}


def test_kill_9_during_the_trial_rolls_back_on_restart(bulk_env, tmp_path):
    """A killed agent never promotes the commit it was trying: on start the journal (in
    phase trial) is rolled back, and the commit is tried again, not quarantined."""
    cfg, root, fleet = bulk_env["cfg"], bulk_env["root"], bulk_env["fleet"]
    agent("apply", "--config", str(cfg), check=0)
    files = bulk("new", 50)
    files["fleet.yaml"] = ("health: {window: 60s, timeout: 120s, interval: 0.2s}\n"
                           + files["fleet.yaml"])
    files["roles/bulk.yaml"] += "checks:\n  ok: {command: [/bin/true]}\n"
    fleet.commit("new, on trial", files=files, push=True)
    p = start_apply(cfg)
    journal = bulk_env["state"] / "journal.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if journal.exists() and '"phase":"trial"' in journal.read_text():
            break
        time.sleep(0.02)
    else:
        raise AssertionError("the trial never started")
    p.send_signal(signal.SIGKILL)
    p.wait()
    last_good = json.loads((bulk_env["state"] / "state.json").read_text())["last_good"]
    assert last_good != fleet.head()
    result = recover(cfg)
    assert result.recovered == fleet.head()
    assert any("during its health-check trial" in w for w in result.warnings)
    after, temps = files_of(root)
    assert not temps and {v.split()[0] for v in after.values()} == {"old"}
    assert len(after) == N
    state = json.loads((bulk_env["state"] / "state.json").read_text())
    assert state["last_good"] == last_good
    assert not (bulk_env["state"] / "quarantine.json").exists()


def test_a_pending_reboot_is_issued_once_and_confirmed_on_a_new_boot(bulk_env):
    """The journal's reboot phase, as a cycle that asked for a reboot leaves it: on the
    same boot an issued reboot is never issued again (the cycle waits for it); on a new
    boot the revision is confirmed and becomes last good."""
    from agent.host import Host
    from agent.state import StateDir

    cfg, fleet = bulk_env["cfg"], bulk_env["fleet"]
    agent("apply", "--config", str(cfg), check=0)
    state = StateDir(str(bulk_env["state"]))
    before = state.load_state()["last_good"]
    fleet.commit("needs a reboot", files=bulk("new", 10), push=True)
    new = fleet.head()
    agent("apply", "--config", str(cfg), "--dry-run", check=None)  # fetched, as it was
    manifest = state.load_manifest()
    head = {"commit": new, "last_good": before, "plan": "p" * 64, "phase": "reboot",
            "records": [], "boot": Host.boot_id(), "issued": True, "checks": [],
            "health": {}, "manifest": manifest["resources"], "key": None,
            "host": "web-01", "signer": None, "commit_time": 0, "policy": {},
            "why": ["file[/x]"]}
    state.save_journal(head)
    result, _ = run_cycle(load_file(str(cfg)))
    assert result.state == "rebooting" and "requested" in result.waiting
    assert state.load_state()["last_good"] == before  # not promoted, not rolled back
    assert state.load_journal()[0]["issued"] is True
    # the machine came back: a new boot id
    state.save_journal({**head, "boot": "another-boot:1"})
    result, _ = run_cycle(load_file(str(cfg)), fetch=False)
    assert result.rebooted == new and any("rebooted for" in w for w in result.warnings)
    assert state.load_state()["last_good"] == new
    assert state.load_journal()[0] is None
