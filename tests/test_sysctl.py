"""The sysctl kind, the one added on the kind contract (issue 13): a fixture table
(spec + observed → Change, with a no-op row), then real cycles under a sandbox root
(only the persisted file: a sandbox has no kernel of its own). The live value is
tested in the systemd testbed (test_packages_systemd_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import Fleet, agent, write_config

from agent.model import Resource
from agent.resources import sysctl as sc

CONF = "/etc/sysctl.d/60-gitops-agent.conf"


class _Host:
    """Stands in for agent.host.Host in this table only: `root` decides live or not."""

    def __init__(self, root: str) -> None:
        self.root = root


class _Env:
    def __init__(self, root: str) -> None:
        self.host = _Host(root)


def res(key: str, value: str) -> Resource:
    return Resource("sysctl", key, {"value": value}, "roles/x.yaml:1")


@pytest.mark.parametrize("root, conf, live, expected", [
    ("/", {"net.ipv4.ip_forward": "1"}, {"net.ipv4.ip_forward": "1"},
     (False, "1, in /etc/sysctl.d/60-gitops-agent.conf and live")),  # the no-op row
    ("/", {}, {"net.ipv4.ip_forward": "0"},
     (True, f"{CONF}: unset -> 1; live: 0 -> 1")),
    ("/", {"net.ipv4.ip_forward": "1"}, {"net.ipv4.ip_forward": "0"},
     (True, "live: 0 -> 1")),
    ("/srv/image", {"net.ipv4.ip_forward": "1"}, {},
     (False, f"1, in {CONF}")),  # sandbox: the file is all there is
    ("/srv/image", {}, {}, (True, f"{CONF}: unset -> 1")),
])
def test_sysctl_table(root, conf, live, expected):
    c = sc.SysctlKind().check(res("net.ipv4.ip_forward", "1"), {"conf": conf, "live": live},
                              _Env(root))  # type: ignore[arg-type]
    assert (c.changed, c.msg) == expected


def test_missing_kernel_parameter_fails_that_resource():
    c = sc.SysctlKind().check(res("net.nope.x", "1"), {"conf": {}, "live": {"net.nope.x": None}},
                              _Env("/"))  # type: ignore[arg-type]
    assert c.failed and "/proc/sys/net/nope/x does not exist" in c.msg


def test_proc_path_and_conf_parser():
    assert sc.proc_path("net.ipv4.conf.eth0/1.rp_filter") == \
        "/proc/sys/net/ipv4/conf/eth0.1/rp_filter"
    assert sc.parse_conf("# c\n; c\nvm.swappiness = 10\n-net.x=1\n\nkernel.a =  1\t2\n") == {
        "vm.swappiness": "10", "net.x": "1", "kernel.a": "1 2"}


def _env(tmp_path: Path, role: dict) -> tuple[Fleet, Path, Path]:
    fleet = Fleet(tmp_path, files={"fleet.yaml": "groups:\n  - name: all\n    roles: [r]\n",
                                   "roles/r.yaml": yaml.safe_dump(role)})
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state")
    return fleet, root, cfg


def test_sysctl_is_persisted_and_pruned_under_a_sandbox_root(tmp_path):
    fleet, root, cfg = _env(tmp_path, {"sysctl": {"net.ipv4.ip_forward": 1,
                                                  "net.ipv4.ip_local_port_range": "32768 60999"}})
    agent("apply", "--config", str(cfg), check=0)
    conf = root / CONF.lstrip("/")
    assert conf.read_text().splitlines()[1:] == ["net.ipv4.ip_forward = 1",
                                                 "net.ipv4.ip_local_port_range = 32768 60999"]
    assert "0 changed" in agent("apply", "--config", str(cfg), check=0).stdout
    fleet.commit("one", push=True, files={"roles/r.yaml": yaml.safe_dump(
        {"sysctl": {"net.ipv4.ip_forward": 1}})})
    agent("apply", "--config", str(cfg), check=0)
    assert conf.read_text().splitlines()[1:] == ["net.ipv4.ip_forward = 1"]
    fleet.commit("none", push=True, files={"roles/r.yaml": yaml.safe_dump({"files": {}})})
    agent("apply", "--config", str(cfg), check=0)
    assert not conf.exists()


@pytest.mark.parametrize("decl, error", [
    ({"../etc/shadow": 1}, "is not a kernel parameter name"),
    ({"ip_forward": 1}, "is not a kernel parameter name"),
    ({"net.ipv4.ip_forward": [1]}, "must be a value on one line"),
    ({"net.ipv4.ip_forward": "1\nkernel.x = 2"}, "must be a value on one line"),
])
def test_bad_sysctl_declarations(tmp_path, decl, error):
    _, root, cfg = _env(tmp_path, {"sysctl": decl})
    p = agent("apply", "--config", str(cfg), check=1)
    assert error in p.stdout and "roles/r.yaml:" in p.stdout
    assert list(root.iterdir()) == []
