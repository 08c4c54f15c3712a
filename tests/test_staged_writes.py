"""Issue 14, first apply: many new files are written as temp files first, made durable
with one syncfs per filesystem, then renamed in their turn (Host.stage, settle)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import Fleet, agent, snapshot, write_config
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.host import TMP_RE, Host
from agent.model import Change, Resource
from agent.resources.files import stage_writes


def _temps(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, _, names in os.walk(root) for n in names
            if TMP_RE.match(n)]


def _files(n: int, prefix: str = "/srv/app") -> list[tuple[str, bytes, int, int, int]]:
    uid, gid = os.getuid(), os.getgid()
    return [(f"{prefix}/f{i}.conf", f"value = {i}\n".encode(), 0o640, uid, gid)
            for i in range(n)]


def _env(tmp_path: Path, role: dict) -> tuple[Fleet, Path, Path]:
    fleet = Fleet(tmp_path, files={"fleet.yaml": "groups:\n  - roles: [r]\n",
                                   "roles/r.yaml": yaml.safe_dump(role)})
    root = tmp_path / "root"
    root.mkdir()
    return fleet, root, write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                                     state_dir=tmp_path / "state")


def test_a_first_apply_of_many_files_syncs_once_and_leaves_no_temp_file(tmp_path,
                                                                         monkeypatch):
    files = {f"/srv/app/f{i}.conf": {"content": f"v{i}\n", "mode": "0640"}
             for i in range(40)}
    files["/srv/app/sub/t.conf"] = {"content": "in a new parent\n"}
    files["/srv/private"] = {"type": "directory", "mode": "0750"}
    files["/srv/private/key.conf"] = {"content": "k\n", "mode": "0600"}
    _, root, cfg = _env(tmp_path, {"files": files})

    from agent import cycle
    from agent.config import load_file

    fsyncs = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real(fd))[1])
    result, _ = cycle.run_cycle(load_file(str(cfg)))
    assert result.ok, result.errors
    for i in range(40):
        p = root / f"srv/app/f{i}.conf"
        assert p.read_text() == f"v{i}\n" and stat.S_IMODE(p.stat().st_mode) == 0o640
    assert (root / "srv/app/sub/t.conf").read_text() == "in a new parent\n"
    assert stat.S_IMODE((root / "srv/private").stat().st_mode) == 0o750
    assert (root / "srv/private/key.conf").read_text() == "k\n"
    assert _temps(root) == []
    # 41 files were staged: their contents and renames took a few fsyncs (new parents,
    # the file under the directory resource, each directory once, the agent's own
    # state), not two for each file
    assert len(fsyncs) < 41, len(fsyncs)
    # the next cycle sees nothing to do: the signatures were taken after the renames
    p = agent("apply", "--config", str(cfg), check=0)
    assert "0 changed" in p.stdout


def test_files_below_a_directory_that_changes_in_the_stage_are_not_staged(tmp_path):
    """Their temp files would sit in a parent made 0755 root:root before the directory
    resource gives it its own mode: those are written in their turn instead."""
    (tmp_path / "srv").mkdir()
    host = Host(str(tmp_path))
    d = Resource("directory", "/srv/private", {"mode": "0700"}, "roles/r.yaml:1")
    steps = [(d, Change(d.identity, changed=True, action="create"))]
    for where in ("/srv/private", "/srv/open"):
        for i in range(20):
            r = Resource("file", f"{where}/f{i}", {}, "roles/r.yaml:2", b"x\n")
            steps.append((r, Change(r.identity, changed=True, action="create")))
    stage_writes(steps, host)
    assert sorted(host._staged) == sorted(f"/srv/open/f{i}" for i in range(20))
    assert not (tmp_path / "srv/private").exists()
    host.settle()
    assert _temps(tmp_path) == [] and os.listdir(tmp_path / "srv/open") == []


def test_unchanged_content_and_owners_not_made_yet_are_not_staged(tmp_path):
    root = tmp_path
    (root / "etc").mkdir()
    for i in range(20):
        (root / f"etc/same{i}").write_bytes(b"same\n")
    host = Host(str(root))
    steps = []
    for i in range(20):  # a mode change only: set in place, nothing to write
        r = Resource("file", f"/etc/same{i}", {"mode": "0600"}, "r:1", b"same\n")
        steps.append((r, Change(r.identity, changed=True, action="update")))
    for i in range(20):  # the owner is made by this cycle's accounts stage: not yet
        r = Resource("file", f"/etc/new{i}", {"owner": "nobody-yet"}, "r:1", b"n\n")
        steps.append((r, Change(r.identity, changed=True, action="create")))
    stage_writes(steps, host)
    assert host._staged == {}
    assert _temps(root) == []


def test_write_file_renames_a_staged_file_and_writes_changed_data_afresh(tmp_path):
    host = Host(str(tmp_path))
    files = _files(20)
    assert host.stage(files) == 20
    assert len(_temps(tmp_path)) == 20 and not (tmp_path / "srv/app/f0.conf").exists()
    target, data, mode, uid, gid = files[0]
    host.write_file(target, data, mode, uid, gid)
    host.write_file(files[1][0], b"other\n", 0o640, uid, gid)  # not what was staged
    host.write_file(files[2][0], files[2][1], 0o600, uid, gid)  # another mode
    host.settle()
    assert (tmp_path / "srv/app/f0.conf").read_bytes() == data
    assert (tmp_path / "srv/app/f1.conf").read_bytes() == b"other\n"
    assert stat.S_IMODE((tmp_path / "srv/app/f2.conf").stat().st_mode) == 0o600
    # the 17 never written in their turn (a stop, a failure) are gone, not renamed
    assert _temps(tmp_path) == []
    assert sorted(os.listdir(tmp_path / "srv/app")) == ["f0.conf", "f1.conf", "f2.conf"]


def test_few_files_are_not_staged(tmp_path):
    host = Host(str(tmp_path))
    assert host.stage(_files(Host.STAGE_MIN - 1)) == 0
    assert _temps(tmp_path) == []


def test_a_stage_that_meets_a_symlinked_parent_stages_nothing(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "root/srv").mkdir(parents=True)
    (tmp_path / "root/srv/evil").symlink_to(tmp_path / "outside")
    host = Host(str(tmp_path / "root"))
    files = _files(20) + _files(1, "/srv/evil")
    assert host.stage(files) == 0
    assert _temps(tmp_path) == [] and os.listdir(tmp_path / "outside") == []
    host.write_file(*files[0])  # the ordinary path still works for the rest
    assert (tmp_path / "root/srv/app/f0.conf").read_bytes() == files[0][1]


def test_temp_files_of_an_agent_killed_after_staging_are_removed_by_the_next(tmp_path):
    files = {f"/srv/app/f{i}.conf": {"content": f"value = {i}\n", "mode": "0640"}
             for i in range(20)}
    _, root, cfg = _env(tmp_path, {"files": files})
    # an agent killed between the stage and the renames: durable temp files, no target
    code = ("import os, sys; from agent.host import Host\n"
            "h = Host(sys.argv[1]); uid, gid = os.getuid(), os.getgid()\n"
            "n = h.stage([(f'/srv/app/f{i}.conf', f'value = {i}'.encode(), 0o640, uid, gid)"
            " for i in range(20)])\n"
            "assert n == 20\nos._exit(9)\n")
    p = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True)
    assert p.returncode == 9, p.stderr
    before = snapshot(root)
    assert len(_temps(root)) == 20 and not (root / "srv/app/f0.conf").exists(), before
    agent("apply", "--config", str(cfg), check=0)
    assert _temps(root) == []
    assert (root / "srv/app/f3.conf").read_text() == "value = 3\n"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab \n\r\x0b\u2028é", max_size=30))
def test_the_diff_of_a_new_file_is_difflibs(text):
    """A created file's diff is built without difflib's matching: the same text."""
    import difflib

    from agent.resources.files import text_diff

    new = text.encode()
    lines = difflib.unified_diff([], new.decode().splitlines(keepends=True), "a/etc/x",
                                 "b/etc/x")
    want = "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                   for line in lines)
    assert text_diff(b"", new, "/etc/x") == want


def test_a_rollback_of_many_files_stages_the_prior_contents(tmp_path, monkeypatch):
    """A revision that rewrites 30 files fails its check: every file is put back, the
    prior contents staged too (a few fsyncs, not two for each file)."""
    fast = "health: {window: 0s, timeout: 1s, interval: 0.2s}\n"

    def role(version: str, check: str) -> dict[str, str]:
        files = {f"/srv/app/f{i}.conf": {"content": f"{version} {i}\n", "mode": "0640"}
                 for i in range(30)}
        return {"fleet.yaml": fast + "groups:\n  - roles: [r]\n",
                "roles/r.yaml": yaml.safe_dump({"files": files, "checks": {
                    "ok": {"command": [check]}}})}

    fleet = Fleet(tmp_path, files=role("v1", "/bin/true"))
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state")
    agent("apply", "--config", str(cfg), check=0)
    fleet.commit("v2", files=role("v2", "/bin/false"), push=True)

    from agent import cycle
    from agent.config import load_file

    fsyncs = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real(fd))[1])
    result, _ = cycle.run_cycle(load_file(str(cfg)))
    assert result.rolled_back, result
    for i in range(30):
        p = root / f"srv/app/f{i}.conf"
        assert p.read_text() == f"v1 {i}\n" and stat.S_IMODE(p.stat().st_mode) == 0o640
    assert _temps(root) == []
    # 30 files written and 30 put back: with an fsync per file and per rename that
    # would be 120; staged, both are a few (plus the agent's own state and journal)
    assert len(fsyncs) < 30, len(fsyncs)


def _count_opens(monkeypatch, name: str) -> list[str]:
    """Every os.open of `name` (a first path component, opened relative to a dir fd)."""
    opened: list[str] = []
    real = os.open

    def counting(path, *a, **k):
        if path == name:
            opened.append(path)
        return real(path, *a, **k)
    monkeypatch.setattr(os, "open", counting)
    return opened


def test_a_first_apply_looks_for_a_missing_directory_once_per_plan(tmp_path, monkeypatch):
    files = {f"/srv/app/f{i}.conf": {"content": f"v{i}\n"} for i in range(30)}
    _, root, cfg = _env(tmp_path, {"files": files})
    from agent import cycle
    from agent.config import load_file

    opened = _count_opens(monkeypatch, "srv")
    result, _ = cycle.run_cycle(load_file(str(cfg)))
    assert result.ok, result.errors
    assert all((root / f"srv/app/f{i}.conf").read_text() == f"v{i}\n" for i in range(30))
    # /srv is looked for once by each read-only stretch (the plan, the journal's
    # snapshot, the stage's look at what is there), once by the stale-temp clean-up,
    # and opened twice by the stage that makes it: not once per file and stretch (93)
    assert len(opened) <= 6, len(opened)


def test_read_only_forgets_what_it_found_missing_once_the_agent_writes(tmp_path):
    host = Host(str(tmp_path))
    uid, gid = os.getuid(), os.getgid()
    with host.read_only():
        assert host.lstat("/srv/a/f") is None
        host.write_file("/srv/a/f", b"x\n", 0o644, uid, gid)  # makes /srv and /srv/a
        st = host.lstat("/srv/a/f")
        assert st is not None and st.st_size == 2
    with host.read_only():
        assert host.lstat("/opt/b/g") is None
    # made by someone else after the read-only stretch: found
    (tmp_path / "opt/b").mkdir(parents=True)
    (tmp_path / "opt/b/g").write_text("y\n")
    st = host.lstat("/opt/b/g")
    assert st is not None and st.st_size == 2
    host.close()
