"""Fixture table for the path kinds (file, directory, symlink, unit), like the package
and service tables: declaration + what is on disk under a temp root → the Change that
check() plans, each kind with its no-op row; then apply() reaches the no-op."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.host import Host
from agent.model import Resource
from agent.resources import KINDS
from agent.resources.base import Env
from agent.state import StateDir


def _f(name: str, **spec) -> Resource:
    content = spec.pop("content", None)
    return Resource(spec.pop("kind", "file"), name, {"state": "present", **spec},
                    "roles/x.yaml:1", content)


def _disk(root: Path, what: dict) -> None:
    for path, (kind, value, mode) in what.items():
        p = root / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        if kind == "file":
            p.write_bytes(value)
            p.chmod(mode)
        elif kind == "dir":
            p.mkdir()
            p.chmod(mode)
        else:
            p.symlink_to(value)


CASES = [
    ("file no-op", _f("/etc/motd", content=b"hi\n", mode="0644"),
     {"/etc/motd": ("file", b"hi\n", 0o644)},
     (False, "none", "content, mode and owner as declared")),
    ("file create", _f("/etc/motd", content=b"hi\n"), {},
     (True, "create", "create (3 bytes, mode 0644)")),
    ("file content", _f("/etc/motd", content=b"hi\n"), {"/etc/motd": ("file", b"old\n", 0o644)},
     (True, "update", "content differs")),
    ("file mode only", _f("/etc/motd", content=b"hi\n", mode="0600"),
     {"/etc/motd": ("file", b"hi\n", 0o644)}, (True, "update", "mode 0644 -> 0600")),
    ("file over a symlink", _f("/etc/motd", content=b"hi\n"),
     {"/etc/motd": ("link", "/etc/other", 0)}, (True, "create", "replace symlink with file")),
    ("directory no-op", _f("/srv/www", kind="directory", mode="0755"),
     {"/srv/www": ("dir", None, 0o755)}, (False, "none", "directory exists with mode and owner")),
    ("directory create", _f("/srv/www", kind="directory"), {},
     (True, "create", "create, mode 0755")),
    ("symlink no-op", _f("/etc/l", kind="symlink", target="/etc/t"),
     {"/etc/l": ("link", "/etc/t", 0)}, (False, "none", "points to /etc/t")),
    ("symlink retarget", _f("/etc/l", kind="symlink", target="/etc/t"),
     {"/etc/l": ("link", "/etc/u", 0)}, (True, "update", "-> /etc/t (was -> /etc/u)")),
    ("unit no-op", Resource("unit", "app.service", {}, "x:1", b"[Unit]\n"),
     {"/etc/systemd/system/app.service": ("file", b"[Unit]\n", 0o644)},
     (False, "none", "content, mode and owner as declared")),
    ("unit create", Resource("unit", "app.service", {}, "x:1", b"[Unit]\n"), {},
     (True, "create", "create (7 bytes, mode 0644)")),
]


@pytest.mark.parametrize("name, res, disk, expected", CASES, ids=[c[0] for c in CASES])
def test_path_kind_table(tmp_path, name, res, disk, expected):
    root = tmp_path / "root"
    root.mkdir()
    _disk(root, disk)
    host = Host(str(root))
    env = Env(host, StateDir(str(tmp_path / "state")), {})
    kind = KINDS[res.kind]
    c = kind.check(res, kind.query([res], env), env)
    assert (c.changed, c.action) == expected[:2] and c.msg.startswith(expected[2]), c.msg
    if c.changed:  # apply reaches the declared state: the same check is now a no-op
        kind.apply_one(res, c, env)
        again = kind.check(res, kind.query([res], env), env)
        assert not again.changed, again.msg
    host.close()
    assert os.path.isdir(root)
