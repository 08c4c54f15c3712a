"""Bad input: one clear message (what, why, file:line), non-zero exit, no traceback,
and the sandbox root byte-for-byte unchanged."""

from __future__ import annotations

import json
import os

import pytest
from conftest import agent, snapshot, write_config

WEB = "roles/web.yaml"

# (name, files to commit, expected exit, words the message must hold)
FLEET_CASES = [
    ("malformed yaml", {WEB: "files:\n  /etc/a: {content: [unclosed\n"}, 1,
     ["malformed YAML", "roles/web.yaml:"]),
    ("unknown key", {WEB: "vars: {}\nfiels: {}\n"}, 1, ["unknown key 'fiels'", "roles/web.yaml:2"]),
    ("wrong type", {WEB: "files:\n  - /etc/a\n"}, 1,
     ["files must be a mapping", "roles/web.yaml:1"]),
    ("wrong mode type", {WEB: "files:\n  /etc/a: {content: x, mode: 0644}\n"}, 1,
     ["quoted octal", "roles/web.yaml:2"]),
    ("template syntax error", {"files/nginx/nginx.conf.j2": "a\n{% if x %}\nb\n"}, 1,
     ["template syntax error", "files/nginx/nginx.conf.j2:", "roles/web.yaml:"]),
    ("undefined template variable", {"files/nginx/nginx.conf.j2": "a\nb {{ nope }}\n"}, 1,
     ["undefined variable", "files/nginx/nginx.conf.j2:2", "'nope' is undefined",
      "roles/web.yaml:6"]),
    ("source escapes the repo", {WEB: "files:\n  /etc/a: {source: ../fleet.yaml}\n"}, 1,
     ["escapes files/", "roles/web.yaml:2"]),
    ("declared twice differently", {WEB: "files:\n  /etc/motd: {content: other}\n"}, 1,
     ["file[/etc/motd] is declared differently", "roles/base.yaml:4", "roles/web.yaml:2"]),
    ("missing role", {"fleet.yaml": "groups:\n  - roles: [base, nosuch]\n"}, 1,
     ["role 'nosuch' has no file roles/nosuch.yaml", "fleet.yaml:2"]),
    ("target with ..", {WEB: "files:\n  /etc/../../x: {content: x}\n"}, 1,
     ["contains '..'", "roles/web.yaml:2"]),
]


@pytest.fixture
def applied(env):
    agent("apply", "--config", str(env["cfg"]), check=0)
    return env


@pytest.mark.parametrize("name,files,code,words", FLEET_CASES, ids=[c[0] for c in FLEET_CASES])
def test_bad_fleet_repo(applied, name, files, code, words):
    env = applied
    good = env["fleet"].head()
    env["fleet"].commit(name, files=files, push=True)
    before = snapshot(env["root"])
    p = agent("apply", "--config", str(env["cfg"]), check=code)
    out = p.stdout + p.stderr
    for w in words:
        assert w in out, (w, out)
    assert snapshot(env["root"]) == before
    state = json.loads((env["state"] / "state.json").read_text())
    assert state["last_good"] == good


def test_blob_over_the_size_limit(env, tmp_path):
    env["fleet"].commit(files={"files/big.bin": "x" * 5000,
                               "roles/web.yaml": "files:\n  /etc/big: {source: big.bin}\n"},
                        push=True)
    cfg = write_config(tmp_path / "small.yaml", url=env["fleet"].bare, root=env["root"],
                       state_dir=env["state"], limits={"max_blob_size": 4096})
    p = agent("apply", "--config", str(cfg), check=1)
    assert "files/big.bin is 5000 bytes, over the limit of 4096" in p.stdout
    assert "roles/web.yaml:2" in p.stdout
    assert snapshot(env["root"]) == {}


def test_too_many_files(env, tmp_path):
    cfg = write_config(tmp_path / "few.yaml", url=env["fleet"].bare, root=env["root"],
                       state_dir=env["state"], limits={"max_files": 3})
    p = agent("apply", "--config", str(cfg), check=1)
    assert "more than 3 entries (limits.max_files counts files and directories)" in p.stdout
    assert snapshot(env["root"]) == {}


def test_target_escaping_root_through_a_host_symlink(env, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (env["root"] / "etc").symlink_to(outside)
    before = snapshot(env["root"])
    p = agent("apply", "--config", str(env["cfg"]), check=1)
    assert "/etc is a symlink on the host" in p.stdout and "/etc/motd" in p.stdout
    assert "0 changed" in p.stdout
    assert snapshot(env["root"]) == before
    assert list(outside.iterdir()) == []


def test_branch_that_does_not_exist(env, tmp_path):
    cfg = write_config(tmp_path / "b.yaml", url=env["fleet"].bare, root=env["root"],
                       state_dir=env["state"], source={"branch": "nope"})
    p = agent("apply", "--config", str(cfg), check=1)
    assert "branch 'nope' does not exist" in p.stdout
    assert snapshot(env["root"]) == {}


@pytest.mark.parametrize("name,text", [("corrupt", "{not json"), ("wrong shape", "[1, 2]")])
def test_corrupt_state_file_is_loud(applied, name, text):
    env = applied
    (env["state"] / "state.json").write_text(text)
    before = snapshot(env["root"])
    p = agent("apply", "--config", str(env["cfg"]), check=2)
    assert "state.json is corrupt" in p.stderr and "mv state.json state.json.broken" in p.stderr
    assert snapshot(env["root"]) == before
    assert (env["state"] / "state.json").read_text() == text  # never silently reset


def test_unreadable_state_file(applied):
    # root reads any mode, so make it unreadable the other way: a directory in its place
    env = applied
    os.replace(env["state"] / "state.json", env["state"] / "moved")
    os.mkdir(env["state"] / "state.json")
    before = snapshot(env["root"])
    p = agent("apply", "--config", str(env["cfg"]), check=2)
    assert "cannot read" in p.stderr and "state.json" in p.stderr
    assert snapshot(env["root"]) == before


CONFIG_CASES = [
    ("malformed", "source: {url: x\n", ["malformed YAML", "agent.yaml:"]),
    ("unknown key", "source: {url: /x}\nintervall: 5s\n", ["unknown key 'intervall'",
                                                          "agent.yaml:2"]),
    ("wrong type", "source: {url: /x}\ntrust:\n  allow_rewind: maybe\n",
     ["trust.allow_rewind must be true or false", "agent.yaml:3"]),
    ("bad duration", "source: {url: /x}\ninterval: soon\n", ["not a duration", "agent.yaml:2"]),
    ("bad enum", "source: {url: /x}\ndrift: fix\n", ["drift must be one of", "agent.yaml:2"]),
    ("no url", "root: /tmp\n", ["source.url is required"]),
    ("duplicate key", "source: {url: /x}\nroot: /a\nroot: /b\n", ["duplicate key 'root'",
                                                                  "agent.yaml:3"]),
]


@pytest.mark.parametrize("name,text,words", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(tmp_path, name, text, words):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(text)
    p = agent("apply", "--config", str(cfg), check=2)
    for w in words:
        assert w in p.stderr, (w, p.stderr)
    assert os.listdir(tmp_path) == ["agent.yaml"]


def test_bad_usage_exits_2():
    p = agent("render", "--repo", ".", check=2)
    assert "--host" in p.stderr


def test_render_and_verify_bad_repo_or_rev_exit_2(tmp_path, fleet):
    p = agent("render", "--repo", str(tmp_path), "--host", "x", check=2)
    assert "is not a git repository" in p.stderr
    signers = tmp_path / "allowed"
    signers.write_text("")
    p = agent("verify", "--repo", str(fleet.work), "--rev", "nope", "--allowed-signers",
              str(signers), check=2)
    assert "revision 'nope' not found" in p.stderr
    p = agent(check=2)
    assert "required: verb" in p.stderr and p.stderr.count("gitops-agent:") == 1
