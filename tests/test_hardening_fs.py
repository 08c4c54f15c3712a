"""Issue 9, filesystem items: a local user racing the agent, symlinked parents (also with
root: /), stale temp files, owners as uid ranges, prune order, a missing root."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml
from attack import ATTACKER_UID, Racer, exchange
from conftest import Fleet, agent, snapshot, write_config

from agent.errors import EscapeError
from agent.host import Host


@pytest.fixture
def open_tmp():
    """A temp dir the attacker uid can reach (pytest's own base is 0700)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="gitops-attack-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _fleet(tmp_path: Path, role: dict) -> Fleet:
    return Fleet(tmp_path, files={
        "fleet.yaml": "groups:\n  - name: all\n    roles: [r]\n",
        "roles/r.yaml": yaml.safe_dump(role),
    })


def _env(tmp_path: Path, role: dict, **over: object) -> tuple[Fleet, Path, Path]:
    fleet = _fleet(tmp_path, role)
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    root.chmod(0o755)
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state", **over)
    return fleet, root, cfg


def test_metadata_fix_never_follows_a_symlink_swapped_in_by_a_local_user(open_tmp):
    """The user owns the directory of a managed file, keeps putting back her own copy with
    the wrong mode, and swaps it with a symlink to a root-only file while the agent fixes
    the mode: the root-only file must keep its mode."""
    shadow = open_tmp / "shadow"
    shadow.write_text("root:secret\n")
    shadow.chmod(0o600)
    _, root, cfg = _env(open_tmp, {"files": {"/srv/u/app.conf": {"content": "x=1\n",
                                                                  "mode": "0644"}}})
    udir = root / "srv" / "u"
    udir.mkdir(parents=True)
    (udir / "app.conf").write_text("x=1\n")
    (udir / "evil").symlink_to(shadow)
    os.chown(udir, ATTACKER_UID, ATTACKER_UID)
    os.lchown(udir / "app.conf", ATTACKER_UID, ATTACKER_UID)
    os.lchown(udir / "evil", ATTACKER_UID, ATTACKER_UID)
    a, b = str(udir / "app.conf"), str(udir / "evil")

    def step() -> None:
        for name in (a, b):  # put the wrong mode back on her own copy
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            os.fchmod(fd, 0o600)
            os.close(fd)
        exchange(a, b)

    with Racer(step):
        for _ in range(25):
            agent("apply", "--config", str(cfg))
    assert stat.S_IMODE(shadow.stat().st_mode) == 0o600
    assert shadow.stat().st_uid == 0


def test_parent_swapped_for_a_symlink_during_apply_writes_nothing_outside_root(open_tmp):
    outside = open_tmp / "outside"
    outside.mkdir()
    files = {f"/srv/bulk/f{i:04d}": {"content": f"{i}\n"} for i in range(2000)}
    _, root, cfg = _env(open_tmp, {"files": files})
    srv = root / "srv"
    (srv / "bulk").mkdir(parents=True)
    (srv / "evil").symlink_to(outside)
    os.chown(srv, ATTACKER_UID, ATTACKER_UID)
    os.lchown(srv / "evil", ATTACKER_UID, ATTACKER_UID)
    a, b = str(srv / "bulk"), str(srv / "evil")
    started = []

    def step() -> None:
        # wait until the plan is done and writing has begun, then flip the parent
        if started or os.path.exists(os.path.join(a, "f0000")):
            started.append(1)
            exchange(a, b)

    with Racer(step):
        agent("apply", "--config", str(cfg))
    assert (srv / "bulk").is_dir() or (srv / "evil").is_dir()
    assert list(outside.iterdir()) == []


def test_root_slash_refuses_a_path_through_a_symlinked_parent(tmp_path):
    """With root: / there is no prefix to escape, yet a symlink that the fleet did not
    declare is never followed (only temp directories are touched here)."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    host = Host("/")
    with pytest.raises(EscapeError, match="is a symlink on the host"):
        host.write_file(f"{tmp_path}/link/x", b"data", 0o644, 0, 0)
    with pytest.raises(EscapeError):
        host.lstat(f"{tmp_path}/link/x")
    assert list(real.iterdir()) == []
    host.write_file(f"{tmp_path}/real/sub/x", b"data", 0o640, 0, 0)  # parents made, no link
    assert (real / "sub" / "x").read_bytes() == b"data"
    assert stat.S_IMODE((real / "sub" / "x").stat().st_mode) == 0o640


def test_a_second_hard_link_is_replaced_not_chmodded(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("x=1\n")
    victim.chmod(0o600)
    _, root, cfg = _env(tmp_path, {"files": {"/etc/app.conf": {"content": "x=1\n",
                                                                "mode": "0644"}}})
    (root / "etc").mkdir()
    os.link(victim, root / "etc" / "app.conf")
    agent("apply", "--config", str(cfg), check=0)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert stat.S_IMODE((root / "etc" / "app.conf").stat().st_mode) == 0o644
    assert (root / "etc" / "app.conf").stat().st_ino != victim.stat().st_ino


def test_stale_temp_files_of_a_killed_agent_are_removed(tmp_path):
    _, root, cfg = _env(tmp_path, {"files": {"/etc/motd": {"content": "hi\n"}}})
    (root / "etc").mkdir()
    stale = root / "etc" / ".motd.gitops-agent.999999999.tmp"  # no such pid
    stale.write_text("half")
    other = root / "etc" / ".unrelated.tmp"
    other.write_text("keep")
    agent("apply", "--config", str(cfg), check=0)
    assert not stale.exists() and other.exists()


def test_a_missing_root_is_one_error(tmp_path):
    fleet = _fleet(tmp_path, {"files": {f"/etc/f{i}": {"content": "x"} for i in range(50)}})
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=tmp_path / "nope",
                       state_dir=tmp_path / "state")
    p = agent("apply", "--config", str(cfg), check=1)
    assert f"root {tmp_path}/nope does not exist" in p.stdout
    assert p.stdout.count("does not exist") == 1


@pytest.mark.parametrize("owner, error", [
    ("4294967295", "out of range"),
    ("99999999999", "out of range"),
    ("a:b", "is not a user or group name"),
])
def test_owner_ids_are_checked_at_render_with_file_and_line(tmp_path, owner, error):
    _, root, cfg = _env(tmp_path, {"files": {"/etc/x": {"content": "x", "owner": owner}}})
    before = snapshot(root)
    p = agent("apply", "--config", str(cfg), check=1)
    assert error in p.stdout and "roles/r.yaml:" in p.stdout
    assert snapshot(root) == before


def test_an_owner_that_only_looks_numeric_is_a_name_that_does_not_exist(tmp_path):
    _, root, cfg = _env(tmp_path, {"files": {"/etc/x": {"content": "x", "owner": "²"}}})
    p = agent("apply", "--config", str(cfg), check=1)
    assert "user '²' does not exist" in p.stdout
    assert not (root / "etc" / "x").exists()


def test_a_directory_dropped_with_its_children_is_pruned_in_one_cycle(tmp_path):
    files = {"/srv/bulk": {"type": "directory"}}
    for d in range(3):
        files[f"/srv/bulk/d{d:02d}"] = {"type": "directory"}
        files[f"/srv/bulk/d{d:02d}/f"] = {"content": "x"}
    fleet, root, cfg = _env(tmp_path, {"files": files})
    agent("apply", "--config", str(cfg), check=0)
    assert (root / "srv/bulk/d02/f").exists()
    fleet.commit("drop", files={"roles/r.yaml": yaml.safe_dump({"files": {}})}, push=True)
    agent("apply", "--config", str(cfg), check=0)
    assert not (root / "srv" / "bulk").exists()
