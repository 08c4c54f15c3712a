"""Issue 9, what a hostile signer can put in a commit: alias bombs, tree bombs,
template CPU and memory bombs, unbounded rendered output, bad unit names. Each is a
one-line error naming the file (and line), and the host keeps its last good revision."""

from __future__ import annotations

from pathlib import Path

import pygit2
import pytest
import yaml
from conftest import Fleet, agent, snapshot, write_config

GOOD = {"fleet.yaml": "groups:\n  - name: all\n    roles: [r]\n",
        "roles/r.yaml": yaml.safe_dump({"files": {"/etc/motd": {"content": "good\n"}}})}


def _setup(tmp_path: Path, **over: object) -> tuple[Fleet, Path, Path]:
    fleet = Fleet(tmp_path, files=dict(GOOD))
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state", **over)
    agent("apply", "--config", str(cfg), check=0)
    assert (root / "etc/motd").read_text() == "good\n"
    return fleet, root, cfg


def _bad_cycle(fleet: Fleet, root: Path, cfg: Path, files: dict) -> str:
    """Push `files`, run a cycle: it fails, changes nothing, keeps last good."""
    good = fleet.head()
    fleet.commit("hostile", files=files, push=True)
    before = snapshot(root)
    p = agent("apply", "--config", str(cfg), check=1)
    assert snapshot(root) == before
    assert f"failed @{good[:12]}" in p.stdout  # the cycle enforced last good
    return p.stdout


def _laughs(levels: int = 9) -> str:
    out = "  l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, levels):
        refs = ", ".join([f"*l{i - 1}"] * 10)
        out += f"  l{i}: &l{i} [{refs}]\n"
    return out


def test_alias_bomb_in_vars(tmp_path):
    fleet, root, cfg = _setup(tmp_path)
    out = _bad_cycle(fleet, root, cfg, {
        "fleet.yaml": "vars:\n" + _laughs() + GOOD["fleet.yaml"]})
    assert "alias bomb" in out and "fleet.yaml:2" in out


def test_alias_bomb_as_a_groups_hosts_list(tmp_path):
    fleet, root, cfg = _setup(tmp_path)
    text = ("x:\n" + _laughs() + "groups:\n  - name: nomatch\n    hosts: *l8\n    roles: [r]\n"
            "  - name: all\n    roles: [r]\n")
    out = _bad_cycle(fleet, root, cfg, {"fleet.yaml": text})
    assert "alias bomb" in out and "fleet.yaml:" in out


def test_tree_bomb_of_shared_trees(tmp_path):
    """26 levels of trees whose two entries are the same tree: 2^26 paths, no blobs."""
    fleet, root, cfg = _setup(tmp_path)
    repo = pygit2.Repository(str(fleet.bare))
    tb = repo.TreeBuilder()
    tb.insert("leaf", repo.create_blob(b""), pygit2.GIT_FILEMODE_BLOB)
    tree = tb.write()
    for _ in range(26):
        tb = repo.TreeBuilder()
        tb.insert("a", tree, pygit2.GIT_FILEMODE_TREE)
        tb.insert("b", tree, pygit2.GIT_FILEMODE_TREE)
        tree = tb.write()
    head = repo.references["refs/heads/main"].peel(pygit2.Commit)
    top = repo.TreeBuilder(head.tree)
    top.insert("bomb", tree, pygit2.GIT_FILEMODE_TREE)
    sig = pygit2.Signature("Ops", "ops@example.com")
    repo.create_commit("refs/heads/main", sig, sig, "bomb", top.write(), [head.id])
    before = snapshot(root)
    p = agent("apply", "--config", str(cfg), check=1)
    assert "limits.max_files counts files and directories" in p.stdout
    assert snapshot(root) == before


def test_template_cpu_bomb_is_cut_off_by_the_render_deadline(tmp_path):
    fleet, root, cfg = _setup(tmp_path, limits={"render_timeout": "2s"})
    out = _bad_cycle(fleet, root, cfg, {
        "files/loop.j2": "{% for i in range(100000) %}{% for j in range(100000) %}"
                         "{% endfor %}{% endfor %}\n",
        "roles/r.yaml": yaml.safe_dump({"files": {
            "/etc/motd": {"content": "good\n"}, "/etc/loop": {"template": "loop.j2"}}})})
    assert "took longer than 2s" in out
    assert "file[/etc/loop], template files/loop.j2, roles/r.yaml:" in out


def test_template_memory_bomb_is_cut_off_by_the_memory_limit(tmp_path):
    fleet, root, cfg = _setup(tmp_path, limits={"render_memory": 256 * 1024 * 1024})
    out = _bad_cycle(fleet, root, cfg, {
        "files/big.j2": "{{ 'x' * 2000000000 }}\n",
        "roles/r.yaml": yaml.safe_dump({"files": {
            "/etc/motd": {"content": "good\n"}, "/etc/big": {"template": "big.j2"}}})})
    assert "MemoryError" in out or "ran out of memory" in out
    assert "files/big.j2" in out


def test_rendered_file_over_max_blob_size(tmp_path):
    fleet, root, cfg = _setup(tmp_path, limits={"max_blob_size": 1_000_000})
    out = _bad_cycle(fleet, root, cfg, {
        "files/big.j2": "{{ 'x' * 5000000 }}\n",
        "roles/r.yaml": yaml.safe_dump({"files": {
            "/etc/motd": {"content": "good\n"}, "/etc/big": {"template": "big.j2"}}})})
    assert "file[/etc/big] renders to 5000001 bytes, over limits.max_blob_size" in out


def test_more_resources_than_max_files(tmp_path):
    fleet, root, cfg = _setup(tmp_path, limits={"max_files": 10})
    files = {f"/etc/f{i}": {"content": "x"} for i in range(20)}
    out = _bad_cycle(fleet, root, cfg, {"roles/r.yaml": yaml.safe_dump({"files": files})})
    assert "more than 10 resources (limits.max_files)" in out and "roles/r.yaml:" in out


@pytest.mark.parametrize("name", ["nginx.service.d/", "", "nginx", "a/b.service",
                                  "x.service.d/../../y.conf", "bad name.service"])
def test_unit_names_are_validated_like_systemd(tmp_path, name):
    fleet, root, cfg = _setup(tmp_path)
    out = _bad_cycle(fleet, root, cfg, {"roles/r.yaml": yaml.safe_dump({
        "files": {"/etc/motd": {"content": "good\n"}},
        "units": {name: {"content": "[Unit]\n"}}})})
    assert "is not a unit file or drop-in" in out and "roles/r.yaml:" in out


def test_unit_names_systemd_accepts_render(tmp_path):
    fleet, root, cfg = _setup(tmp_path)
    units = {n: {"content": "[Unit]\n"} for n in
             ("app.service", "getty@tty1.service", "app@.service", "app.service.d/o.conf",
              "backup.timer", "service.d/all.conf", "a-b\\x2dc.mount")}
    fleet.commit("units", files={"roles/r.yaml": yaml.safe_dump({"units": units})}, push=True)
    agent("apply", "--config", str(cfg), check=0)
    assert (root / "etc/systemd/system/app.service.d/o.conf").is_file()
