"""One cycle end to end through the real CLI: real git repos, a real root directory."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from conftest import Fleet, GitDaemon, agent, git, snapshot, write_config


def apply(env: dict, *extra: str, check: int | None = 0):
    return agent("apply", "--config", str(env["cfg"]), *extra, check=check)


def test_first_apply_writes_the_examples_and_warns_unsigned(env):
    p = apply(env)
    root = env["root"]
    assert "UNSIGNED COMMITS ALLOWED" in p.stderr
    conf = (root / "etc/nginx/nginx.conf").read_text()
    assert "worker_processes 8;" in conf  # hosts/web-01.yaml beats group and role vars
    assert (root / "etc/motd").read_text().startswith("managed by gitops-agent\nhost: web-01")
    assert oct((root / "srv/www").stat().st_mode & 0o7777) == "0o755"
    assert os.readlink(root / "etc/nginx/sites-enabled/default") == \
        "/etc/nginx/sites-available/default"
    assert "converged" in p.stdout


def test_second_apply_changes_nothing_and_keeps_mtimes(env):
    apply(env)
    before = snapshot(env["root"])
    p = apply(env, "--json")
    out = json.loads(p.stdout)
    assert out["changed"] == 0 and out["state"] == "converged"
    assert snapshot(env["root"]) == before


def test_full_check_path_is_also_idempotent(env, tmp_path):
    # full_check: 0 disables the stat fast path: every file is re-read and compared
    cfg = write_config(tmp_path / "full.yaml", url=env["fleet"].bare, root=env["root"],
                       state_dir=env["state"], full_check=0)
    agent("apply", "--config", str(cfg), check=0)
    before = snapshot(env["root"])
    out = json.loads(agent("apply", "--config", str(cfg), "--json", check=0).stdout)
    assert out["changed"] == 0 and not out["fast_path"]
    assert snapshot(env["root"]) == before


def test_drift_is_corrected_including_mode_and_same_size_edits(env):
    apply(env)
    motd = env["root"] / "etc/motd"
    text = motd.read_text()
    st = motd.stat()
    motd.write_text(text.replace("m", "M", 1))  # same size
    os.utime(motd, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime
    out = json.loads(apply(env, "--json").stdout)
    assert [c["id"] for c in out["changes"] if c["changed"]] == ["file[/etc/motd]"]
    assert motd.read_text() == text
    os.chmod(motd, 0o600)
    out = json.loads(apply(env, "--json").stdout)
    assert [c["msg"] for c in out["changes"] if c["changed"]] == ["mode 0600 -> 0644"]


def test_an_edit_during_a_cycle_to_a_file_it_left_alone_is_drift_for_the_next(
        env, monkeypatch):
    """The manifest keeps the signature the stat fast path saw match, not one taken at
    the end of the cycle: a write by anyone else meanwhile (a package's postinst, say)
    is not recorded as the agent's own, and the next cycle puts the file back."""
    from agent.config import load_file
    from agent.cycle import run_cycle
    from agent.journal import Journal

    conf = load_file(str(env["cfg"]))
    assert run_cycle(conf)[0].ok
    nginx = env["root"] / "etc/nginx/nginx.conf"
    text = nginx.read_text()
    edited = "X" + text[1:]
    assert edited != text
    real_mark = Journal.mark

    def mark(self, change, sig=None):
        real_mark(self, change, sig)
        if nginx.read_text() == text:  # once, same size, the old mtime
            st = nginx.stat()
            nginx.write_text(edited)
            os.utime(nginx, ns=(st.st_atime_ns, st.st_mtime_ns))

    monkeypatch.setattr(Journal, "mark", mark)
    env["fleet"].commit("motd", files={"files/motd.j2": "new {{ host.name }}\n"}, push=True)
    result, _ = run_cycle(conf)
    assert [c.id for c in result.changes if c.changed] == ["file[/etc/motd]"]
    assert nginx.read_text() == edited
    monkeypatch.setattr(Journal, "mark", real_mark)
    result, _ = run_cycle(conf)
    assert [c.id for c in result.changes if c.changed] == ["file[/etc/nginx/nginx.conf]"]
    assert nginx.read_text() == text


def test_change_shows_a_diff_in_plan_and_dry_run_changes_nothing(env):
    apply(env)
    fleet: Fleet = env["fleet"]
    fleet.commit(files={"hosts/web-01.yaml": "vars: {worker_processes: 16}\n"}, push=True)
    before = snapshot(env["root"])
    for verb in (["plan"], ["apply", "--dry-run"]):
        p = agent(*verb, "--config", str(env["cfg"]), check=0)
        assert "-worker_processes 8;" in p.stdout and "+worker_processes 16;" in p.stdout
    assert snapshot(env["root"]) == before
    apply(env)
    assert "worker_processes 16;" in (env["root"] / "etc/nginx/nginx.conf").read_text()


def test_prune_removes_created_and_restores_preexisting(env):
    root = env["root"]
    (root / "etc").mkdir()
    (root / "etc/motd").write_text("the original motd\n")
    os.chmod(root / "etc/motd", 0o640)
    apply(env)
    assert "managed by gitops-agent" in (root / "etc/motd").read_text()
    fleet: Fleet = env["fleet"]
    base = (fleet.work / "roles/base.yaml").read_text()
    base = base.replace("  /etc/motd:\n    template: motd.j2\n    mode: \"0644\"\n", "")
    web = "vars: {worker_processes: 2, listen_port: 80}\nfiles: {}\n"
    fleet.commit(files={"roles/base.yaml": base, "roles/web.yaml": web}, push=True)
    out = json.loads(apply(env, "--json").stdout)
    actions = {c["id"]: c["action"] for c in out["changes"] if c["changed"]}
    assert actions["file[/etc/motd]"] == "restore"
    assert (root / "etc/motd").read_text() == "the original motd\n"
    assert oct((root / "etc/motd").stat().st_mode & 0o777) == "0o640"
    assert not (root / "etc/nginx/nginx.conf").exists()
    assert not (root / "srv/www").exists()  # created by the agent, now empty: removed
    assert not (root / "etc/nginx/sites-enabled/default").is_symlink()
    assert json.loads(apply(env, "--json").stdout)["changed"] == 0


def test_failed_resource_rolls_the_revision_back_and_is_retried(env):
    """The others are still applied (one failure does not stop them), then the whole
    revision goes back to last good from the journal; the next cycle tries again."""
    apply(env)
    first = json.loads((env["state"] / "state.json").read_text())["last_good"]
    index = (env["root"] / "srv/www/index.html").read_text()
    fleet: Fleet = env["fleet"]
    role = (fleet.work / "roles/web.yaml").read_text().replace("hello from", "changed by") + \
        "  /etc/app.conf: {content: \"x\\n\", owner: nosuchuser}\n" \
        "  /etc/other.conf: {content: \"y\\n\"}\n"
    fleet.commit(files={"roles/web.yaml": role}, push=True)
    p = apply(env, "--json", check=1)
    out = json.loads(p.stdout)
    failed = [c for c in out["changes"] if c["failed"]]
    assert [c["id"] for c in failed] == ["file[/etc/app.conf]"]
    assert "nosuchuser" in failed[0]["msg"]
    applied = [c["id"] for c in out["changes"] if c["changed"] and c["action"] != "rollback"]
    assert "file[/etc/other.conf]" in applied  # applied, then put back
    assert not (env["root"] / "etc/other.conf").exists()
    assert (env["root"] / "srv/www/index.html").read_text() == index
    assert out["rolled_back"] and "failed to apply" in out["rolled_back"]
    assert json.loads((env["state"] / "state.json").read_text())["last_good"] == first
    assert not (env["state"] / "journal.json").exists()
    hist = agent("history", "--config", str(env["cfg"]), "--json", check=0)
    assert json.loads(hist.stdout)[-1]["result"] == "failed"
    # retried every cycle (no fast path over a failed apply), and applied once fixed
    again = json.loads(apply(env, "--json", check=1).stdout)
    assert not again["fast_path"] and again["failed"] == 1
    fleet.commit(files={"roles/web.yaml": role.replace("owner: nosuchuser", "mode: \"0600\"")},
                 push=True)
    apply(env)
    assert (env["root"] / "etc/other.conf").read_text() == "y\n"
    assert "changed by" in (env["root"] / "srv/www/index.html").read_text()


def test_git_daemon_fetch_then_offline_converges_last_good(tmp_path):
    fleet = Fleet(tmp_path)
    daemon = GitDaemon(tmp_path)
    daemon.start()
    try:
        root = tmp_path / "root"
        root.mkdir()
        cfg = write_config(tmp_path / "a.yaml", url=daemon.url("fleet.git"), root=root,
                           state_dir=tmp_path / "state", source={"timeout": "5s"})
        agent("apply", "--config", str(cfg), check=0)
    finally:
        daemon.stop()
    (root / "etc/motd").write_text("drifted\n")
    p = agent("apply", "--config", str(cfg), "--json", check=0)
    out = json.loads(p.stdout)
    assert out["offline"] and out["state"] == "offline"
    assert "127.0.0.1" in out["offline_reason"]
    assert "managed by gitops-agent" in (root / "etc/motd").read_text()
    assert fleet.head() == out["commit"]


def test_mirror_is_tried_after_a_failing_url(env, tmp_path):
    cfg = write_config(tmp_path / "m.yaml", url=str(tmp_path / "nope.git"), root=env["root"],
                       state_dir=env["state"], source={"mirrors": [str(env["fleet"].bare)]})
    out = json.loads(agent("apply", "--config", str(cfg), "--json", check=0).stdout)
    assert out["state"] == "converged" and not out["offline"]


def test_offline_without_last_good_changes_nothing_and_fails(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "a.yaml", url="git://127.0.0.1:1/none.git", root=root,
                       state_dir=tmp_path / "state")
    p = agent("apply", "--config", str(cfg), check=1)
    assert "offline with no last good" in p.stdout + p.stderr
    assert snapshot(root) == {}


def test_lock_refuses_a_second_apply(env):
    from agent.state import StateDir

    held = StateDir(str(env["state"]))
    held.lock()
    try:
        p = apply(env, check=1)
        assert "another gitops-agent cycle holds" in p.stderr
        assert f"pid {os.getpid()}" in p.stderr
        releaser = threading.Timer(0.5, held.unlock)
        releaser.start()
        t0 = time.time()
        apply(env, "--wait", "10")
        assert time.time() - t0 >= 0.4
    finally:
        held.unlock()


def test_last_good_is_a_ref_in_the_mirror(env):
    apply(env)
    mirror = env["state"] / "mirror.git"
    ref = git(mirror, "rev-parse", "refs/gitops/last-good").stdout.strip()
    assert ref == env["fleet"].head()


def test_history_records_each_cycle(env):
    apply(env)
    apply(env)
    lines = (env["state"] / "history.jsonl").read_text().splitlines()
    assert len(lines) == 2
    entry = json.loads(lines[0])
    assert entry["commit"] == env["fleet"].head() and entry["result"] == "converged"
    assert entry["changed"] > 0 and entry["finished"] >= entry["started"]
    human = agent("history", "--config", str(env["cfg"]), check=0).stdout
    assert env["fleet"].head()[:12] in human


def test_render_previews_a_host_offline(env):
    repo = str(env["fleet"].work)
    p = agent("render", "--repo", repo, "--host", "web-07", "--label", "env=prod", "--json",
              check=0)
    out = json.loads(p.stdout)
    assert out["roles"] == ["base", "web"]
    nginx = next(r for r in out["resources"] if r["id"] == "file[/etc/nginx/nginx.conf]")
    assert "worker_processes 4;" in nginx["content"]  # group vars, no host file
    p = agent("render", "--repo", repo, "--host", "db-01", "--json", check=0)
    assert json.loads(p.stdout)["roles"] == ["base"]


def test_atomic_write_leaves_no_temp_files(env):
    apply(env)
    leftovers = [p for p in Path(env["root"]).rglob("*") if ".gitops-agent." in p.name]
    assert leftovers == []


def test_units_and_drop_ins_under_a_sandbox_root(env):
    """Unit files are files under /etc/systemd/system; with a sandbox root there is no
    running systemd, so daemon-reload is skipped and runtime operations are refused."""
    fleet: Fleet = env["fleet"]
    role = ("units:\n"
            "  app.service: {content: \"[Service]\\nExecStart=/bin/true\\n\"}\n"
            "  nginx.service.d/override.conf: {content: \"[Service]\\nLimitNOFILE=65536\\n\"}\n")
    fleet.commit(files={"roles/web.yaml": role}, push=True)
    apply(env, "--json")
    unit_dir = env["root"] / "etc/systemd/system"
    assert (unit_dir / "app.service").read_text().startswith("[Service]")
    assert "LimitNOFILE" in (unit_dir / "nginx.service.d/override.conf").read_text()
    # starting a service needs a running systemd: that fails, and the revision goes back
    fleet.commit(files={"roles/web.yaml": role + "services:\n  app.service: {active: true}\n"},
                 push=True)
    out = json.loads(apply(env, "--json", check=1).stdout)
    failed = {c["id"]: c["msg"] for c in out["changes"] if c["failed"]}
    assert list(failed) == ["service[app.service]"]
    assert "need a running systemd" in failed["service[app.service]"]
    assert not out["rolled_back"]  # nothing was changed, so nothing to put back
    assert (unit_dir / "app.service").exists()  # last good's unit files stay
    # removed from Git: the drop-in is deleted (there is nothing to stop in a sandbox)
    fleet.commit(files={"roles/web.yaml": role.replace(
        "  nginx.service.d/override.conf: {content: \"[Service]\\nLimitNOFILE=65536\\n\"}\n",
        "")}, push=True)
    apply(env, "--json")
    assert not (unit_dir / "nginx.service.d/override.conf").exists()


def test_a_rolled_back_prune_keeps_the_original_for_the_next_prune(env):
    """A taken-over file dropped from Git gets its original back; when that revision is
    rolled back the managed content returns, and the next prune still finds the original."""
    pre = env["root"] / "etc/pre.conf"
    pre.parent.mkdir(parents=True, exist_ok=True)
    pre.write_text("original\n")
    fleet: Fleet = env["fleet"]
    base = (fleet.work / "roles/web.yaml").read_text()
    fleet.commit(files={"roles/web.yaml": base + "  /etc/pre.conf: {content: \"managed\\n\"}\n"},
                 push=True)
    apply(env)
    assert pre.read_text() == "managed\n"
    fleet.commit(files={"roles/web.yaml": base + "  /etc/x.conf: {content: \"x\\n\", "
                                                 "owner: nosuchuser}\n"}, push=True)
    out = json.loads(apply(env, "--json", check=1).stdout)
    assert out["rolled_back"]
    assert pre.read_text() == "managed\n"  # the prune was undone with the rest
    fleet.commit(files={"roles/web.yaml": base}, push=True)
    apply(env)
    assert pre.read_text() == "original\n"
