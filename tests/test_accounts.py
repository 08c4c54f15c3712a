"""The user and group kinds (issue 13): a fixture table (declaration + observed
passwd/group → Change, with no-op rows), then real cycles with the real shadow-utils
(`useradd --prefix ROOT`) under a sandbox root. Logging in with the authorized key is
tested in the systemd testbed (test_packages_systemd_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import Fleet, agent, write_config

from agent.model import Resource
from agent.resources import accounts as ac

PASSWD = "root:x:0:0:root:/root:/bin/bash\ndeploy:x:1500:1500:Deploy:/home/deploy:/bin/bash\n"
GROUP = "root:x:0:\ndeploy:x:1500:\nops:x:1600:deploy\nsudo:x:27:\n"


class _Env:
    """Stands in for base.Env in this table only: the previous manifest entries."""

    def __init__(self, old: dict | None = None) -> None:
        self.old = old or {}


def observed() -> dict:
    return {"passwd": ac.parse_passwd(PASSWD), "group": ac.parse_group(GROUP)}


def user(name: str, **spec) -> Resource:
    return Resource("user", name, {"state": "present", **spec}, "roles/x.yaml:1")


@pytest.mark.parametrize("res, old, expected", [
    (user("deploy", uid=1500, shell="/bin/bash", groups=["ops"]), None,
     (False, False, "exists, uid 1500, as declared")),  # the no-op row
    (user("deploy", shell="/bin/sh", groups=["ops", "sudo"]), None,
     (True, False, "shell /bin/bash -> /bin/sh; groups ops -> ops,sudo")),
    (user("alice"), None, (True, False, "useradd")),
    (Resource("user", "deploy", {"state": "absent"}, "x:1"), None,
     (False, True, "exists and was not created by the agent: it is never deleted "
                   "(remove it by hand if it must go)")),
    (Resource("user", "deploy", {"state": "absent"}, "x:1"),
     {"user[deploy]": {"created": True}}, (True, False, "userdel")),
])
def test_user_table(res, old, expected):
    c = ac.UserKind().check(res, observed(), _Env(old))  # type: ignore[arg-type]
    assert (c.changed, c.failed, c.msg) == expected


@pytest.mark.parametrize("spec, expected", [
    ({"state": "present", "gid": 1600}, (False, "exists, gid 1600")),  # the no-op row
    ({"state": "present", "gid": 1700}, (True, "gid 1600 -> 1700")),
    ({"state": "present"}, (False, "exists, gid 1600")),
])
def test_group_table(spec, expected):
    c = ac.GroupKind().check(Resource("group", "ops", spec, "x:1"), observed(),
                             _Env())  # type: ignore[arg-type]
    assert (c.changed, c.msg) == expected


def _env(tmp_path: Path, role: dict, etc: dict | None = None) -> tuple[Fleet, Path, Path]:
    fleet = Fleet(tmp_path, files={"fleet.yaml": "groups:\n  - name: all\n    roles: [r]\n",
                                   "roles/r.yaml": yaml.safe_dump(role)})
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name, text in (etc or {}).items():
        (root / "etc" / name).write_text(text)
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state")
    return fleet, root, cfg


KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ4dummykeyfortests ops@laptop"


def test_users_groups_and_a_file_they_own_in_one_cycle(tmp_path):
    fleet, root, cfg = _env(tmp_path, {
        "groups": {"ops": {"gid": 1600}},
        "users": {"deploy": {"uid": 1500, "groups": ["ops"], "shell": "/bin/bash",
                             "authorized_keys": [KEY]}},
        "files": {"/etc/app.conf": {"content": "x\n", "owner": "deploy", "group": "ops",
                                    "mode": "0640"}}})
    agent("apply", "--config", str(cfg), check=0)
    passwd = ac.parse_passwd((root / "etc/passwd").read_text())
    assert passwd["deploy"]["uid"] == 1500 and passwd["deploy"]["shell"] == "/bin/bash"
    assert ac.parse_group((root / "etc/group").read_text())["ops"]["members"] == ["deploy"]
    st = (root / "etc/app.conf").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1500, 1600, 0o640)
    keys = root / "home/deploy/.ssh/authorized_keys"
    assert keys.read_text() == KEY + "\n" and keys.stat().st_mode & 0o777 == 0o600
    assert keys.stat().st_uid == 1500
    assert "0 changed" in agent("apply", "--config", str(cfg), check=0).stdout  # idempotent

    # change the shell, drop the supplementary group; then drop the user from Git:
    # the agent created it, so it is removed (its home is kept)
    fleet.commit("shell", push=True, files={"roles/r.yaml": yaml.safe_dump({
        "groups": {"ops": {"gid": 1600}},
        "users": {"deploy": {"shell": "/bin/sh", "groups": []}}})})
    agent("apply", "--config", str(cfg), check=0)
    assert ac.parse_passwd((root / "etc/passwd").read_text())["deploy"]["shell"] == "/bin/sh"
    assert ac.parse_group((root / "etc/group").read_text())["ops"]["members"] == []
    fleet.commit("gone", push=True, files={"roles/r.yaml": yaml.safe_dump({"files": {}})})
    agent("apply", "--config", str(cfg), check=0)
    assert "deploy" not in ac.parse_passwd((root / "etc/passwd").read_text())
    assert "ops" not in ac.parse_group((root / "etc/group").read_text())
    assert (root / "home/deploy").is_dir()


def test_a_user_and_its_primary_group_dropped_together(tmp_path):
    fleet, root, cfg = _env(tmp_path, {"groups": {"svc": {"gid": 1700}},
                                       "users": {"svc": {"group": "svc"}}})
    agent("apply", "--config", str(cfg), check=0)
    assert ac.parse_passwd((root / "etc/passwd").read_text())["svc"]["gid"] == 1700
    fleet.commit("gone", push=True, files={"roles/r.yaml": yaml.safe_dump({"files": {}})})
    agent("apply", "--config", str(cfg), check=0)  # userdel first, then groupdel
    assert "svc" not in ac.parse_group((root / "etc/group").read_text())


def test_a_user_that_was_there_before_is_never_deleted(tmp_path):
    fleet, root, cfg = _env(tmp_path, {"users": {"admin": {"shell": "/bin/sh"}}},
                            etc={"passwd": "admin:x:1000:1000::/home/admin:/bin/bash\n",
                                 "group": "admin:x:1000:\n"})
    agent("apply", "--config", str(cfg), check=0)
    assert ac.parse_passwd((root / "etc/passwd").read_text())["admin"]["shell"] == "/bin/sh"
    fleet.commit("absent", push=True, files={"roles/r.yaml": yaml.safe_dump(
        {"users": {"admin": "absent"}})})
    p = agent("apply", "--config", str(cfg), check=1)
    assert "was not created by the agent" in p.stdout
    fleet.commit("gone", push=True, files={"roles/r.yaml": yaml.safe_dump({"files": {}})})
    agent("apply", "--config", str(cfg), check=0)
    assert "admin" in ac.parse_passwd((root / "etc/passwd").read_text())


@pytest.mark.parametrize("decl, error", [
    ({"users": {"Bad Name": {}}}, "user name 'Bad Name' is not valid"),
    ({"users": {"x": {"uid": -1}}}, "user[x].uid must be a whole number"),
    ({"users": {"x": {"shell": "bash"}}}, "user[x].shell must be an absolute path"),
    ({"users": {"x": {"comment": "a:b"}}}, "comment must be one line without ':'"),
    ({"users": {"x": {"authorized_keys": "ssh-ed25519 AAA"}}}, "authorized_keys must be a list"),
    ({"users": {"x": {"state": "absent", "uid": 5}}}, "is absent but sets other keys"),
    ({"users": {"x": {"nope": 1}}}, "unknown key 'nope' in user[x]"),
    ({"groups": {"g": {"gid": "x"}}}, "group[g].gid must be a whole number"),
])
def test_bad_account_declarations(tmp_path, decl, error):
    _, root, cfg = _env(tmp_path, decl)
    p = agent("apply", "--config", str(cfg), check=1)
    assert error in p.stdout and "roles/r.yaml:" in p.stdout
    assert list((root / "etc").iterdir()) == []
