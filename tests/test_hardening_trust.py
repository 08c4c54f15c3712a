"""Issue 9, trust: where the agent was looser than git (compared with `git verify-commit`
on each shape), a revoked signer's last good, tips that are not commits, future-dated
commits, and trust files that someone else can change."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Fleet, agent, allowed_line, git, signed_env_for, ssh_key, write_config
from test_trust import agent_good, both, signed_commit
from trustkit import git_good, gpg, gpg_key, raw_commit, ssh_sign, strip_sig, with_sig, write_commit

from agent.errors import TrustError
from agent.trust import check_trust_path

# --- 5: never looser than git -----------------------------------------------------------


@pytest.mark.parametrize("shape", ["crlf", "crlf-last-line", "cr-in-body", "blank-line-inside",
                                   "spaces-after-end", "two-armors"])
def test_ssh_armor_shapes_agree_with_git_or_are_stricter(repo, ed, shape):
    key, allowed = ed
    payload = strip_sig(raw_commit(repo))
    armor = ssh_sign(payload, key).rstrip("\n")
    lines = armor.split("\n")
    if shape == "crlf":
        armor = "\r\n".join(lines)
    elif shape == "crlf-last-line":
        armor = "\n".join(lines[:-1]) + "\r\n" + lines[-1] + "\r"
    elif shape == "cr-in-body":
        armor = "\n".join([lines[0], lines[1] + "\r", *lines[2:]])
    elif shape == "blank-line-inside":
        armor = "\n".join([lines[0], "", *lines[1:]])
    elif shape == "spaces-after-end":
        armor = armor + "   "
    else:
        armor = armor + "\n" + armor
    rev = write_commit(repo, with_sig(payload, armor))
    agent_says, git_says = both(repo, rev, allowed)
    assert not agent_says or git_says  # the agent may refuse what git accepts, never less
    if shape == "crlf":  # the case: git says bad, so must the agent
        assert (agent_says, git_says) == (False, False)


def test_one_openpgp_armor_with_two_trusted_signatures_is_refused(repo, tmp_path):
    home = tmp_path / "gnupg"
    a = gpg_key(home, "Alice <a@example.com>")
    b = gpg_key(home, "Bob <b@example.com>")
    keyring = tmp_path / "trusted.asc"
    keyring.write_bytes(gpg(home, "--armor", "--export", a, b).stdout)
    payload = strip_sig(raw_commit(repo))
    sig = gpg(home, "--armor", "--detach-sign", "-u", a, "-u", b, input=payload).stdout.decode()
    assert sig.count("-----BEGIN PGP SIGNATURE-----") == 1
    rev = write_commit(repo, with_sig(payload, sig))
    assert not agent_good(repo, rev, keyring=keyring)
    assert not git_good(repo, rev, gnupghome=home)
    # each signature alone is good, for both
    single = gpg(home, "--armor", "--detach-sign", "-u", a, input=payload).stdout.decode()
    rev1 = write_commit(repo, with_sig(payload, single))
    assert agent_good(repo, rev1, keyring=keyring) and git_good(repo, rev1, gnupghome=home)


def test_a_commit_libgit2_cannot_parse_is_a_bad_verdict(repo, ed):
    key, allowed = ed
    payload = strip_sig(raw_commit(repo, signed_commit(repo, key)))
    armor = ssh_sign(payload, key).rstrip("\n")
    head, sep, body = payload.partition(b"\n\n")
    tree, rest = head.split(b"\n", 1)
    sig = ("gpgsig " + "\n ".join(armor.split("\n"))).encode()
    raw = tree + b"\n" + sig + b"\n" + rest + sep + body  # gpgsig right after the tree line
    rev = write_commit(repo, raw)
    p = agent("verify", "--repo", str(repo), "--rev", rev, "--allowed-signers", str(allowed),
              "--json", check=1)
    out = json.loads(p.stdout)
    assert out["verdict"] == "bad" and "malformed commit object" in out["reason"]
    assert not (agent_good(repo, rev, allowed) and not git_good(repo, rev, allowed))


# --- 6: a revoked key's last good -----------------------------------------------------------


@pytest.fixture
def two_keys(tmp_path: Path):
    a = ssh_key(tmp_path / "a")
    b = ssh_key(tmp_path / "b")
    return {"a": a, "b": b, **signed_env_for(tmp_path, {"alice": a, "bob": b}, a)}


def _apply(env: dict, code: int) -> dict:
    return json.loads(agent("apply", "--config", str(env["cfg"]), "--json", check=code).stdout)


def _later(seconds: int) -> dict:
    return {"GIT_COMMITTER_DATE": f"{int(time.time()) + seconds} +0000"}


def test_a_removed_keys_commit_is_no_longer_enforced_and_a_trusted_fix_is_taken(two_keys):
    env = two_keys
    fleet: Fleet = env["fleet"]
    good = fleet.head()
    _apply(env, 0)
    fleet.commit("backdoor", sign=env["b"], push=True, env=_later(10), files={
        "hosts/web-01.yaml": "files:\n  /etc/sudoers.d/backdoor: {content: 'mallory ALL=(ALL) "
                             "NOPASSWD: ALL\\n'}\n"})
    assert _apply(env, 0)["signer"] == "bob"
    door = env["root"] / "etc/sudoers.d/backdoor"
    assert door.exists()
    # the operator removes bob, deletes the file by hand, force-pushes a fix signed by alice
    env["allowed"].write_text(allowed_line("alice", env["a"].with_suffix(".pub")))
    door.unlink()
    out = _apply(env, 1)  # nothing new pushed yet: last good is no longer enforced
    assert out["state"] == "rejected" and "no longer" in " ".join(out["errors"])
    assert not door.exists()
    git(fleet.work, "reset", "-q", "--hard", good)
    fleet.commit("fix", push=False, env=_later(20),
                 files={"hosts/web-01.yaml": "vars: {worker_processes: 3}\n"})
    fleet.push(force=True)
    out = _apply(env, 0)
    assert out["state"] == "converged" and out["signer"] == "alice"
    assert not door.exists()


def test_after_a_revocation_an_older_trusted_commit_cannot_be_replayed(two_keys):
    env = two_keys
    fleet: Fleet = env["fleet"]
    good = fleet.head()
    _apply(env, 0)
    fleet.commit("by bob", sign=env["b"], push=True, env=_later(10))
    _apply(env, 0)
    env["allowed"].write_text(allowed_line("alice", env["a"].with_suffix(".pub")))
    git(fleet.work, "reset", "-q", "--hard", good)  # alice's older commit, replayed
    fleet.push(force=True)
    out = _apply(env, 1)
    assert out["state"] == "rejected"
    assert "an older commit cannot be replayed" in out["rejected"]


# --- 9: a tip that is not a commit ---------------------------------------------------------


@pytest.mark.parametrize("what", ["blob", "annotated tag"])
def test_a_tip_that_is_not_a_commit_is_rejected_and_last_good_converged(tmp_path, what):
    fleet = Fleet(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state")
    agent("apply", "--config", str(cfg), check=0)
    (root / "etc/motd").unlink()
    if what == "blob":
        oid = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=fleet.bare,
                             input="x", capture_output=True, text=True).stdout.strip()
    else:
        git(fleet.bare, "tag", "-a", "-m", "t", "v1", "main")
        oid = git(fleet.bare, "rev-parse", "v1").stdout.strip()
    (fleet.bare / "refs/heads/main").write_text(oid + "\n")  # what a hostile server does
    p = agent("apply", "--config", str(cfg), "--json", check=1)
    out = json.loads(p.stdout)
    assert "tip is not a commit" in out["rejected"]
    assert (root / "etc/motd").exists()  # last good converged again


# --- 11: future-dated commits ---------------------------------------------------------------


def test_a_commit_dated_2099_is_refused_by_default_and_blocks_nothing(two_keys):
    env = two_keys
    fleet: Fleet = env["fleet"]
    _apply(env, 0)
    fleet.commit("future", push=True, env={"GIT_COMMITTER_DATE": "2099-01-01T00:00:00Z"})
    out = _apply(env, 1)
    assert "in the future" in out["rejected"]
    fleet.commit("normal", push=True, files={"hosts/web-01.yaml": "vars: {worker_processes: 5}\n"})
    assert _apply(env, 0)["state"] == "converged"


def test_a_future_last_good_from_before_the_bound_does_not_block_later_commits(two_keys):
    env = two_keys
    fleet: Fleet = env["fleet"]
    relaxed = write_config(env["cfg"].parent / "relaxed.yaml", url=fleet.bare, root=env["root"],
                           state_dir=env["cfg"].parent / "state",
                           trust={"unsigned": "refuse", "allowed_signers": str(env["allowed"]),
                                  "max_future_skew": None})
    fleet.commit("future", push=True, env={"GIT_COMMITTER_DATE": "2099-01-01T00:00:00Z"})
    agent("apply", "--config", str(relaxed), check=0)  # an RTC-less host took it
    fleet.commit("normal", push=True, files={"hosts/web-01.yaml": "vars: {worker_processes: 5}\n"})
    out = _apply(env, 0)  # with the default bound the clock is trusted again
    assert out["state"] == "converged"


# --- 15: trust files someone else can change --------------------------------------------------


def test_trust_file_permissions_like_strictmodes(tmp_path):
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    f = d / "allowed_signers"
    f.write_text("x\n")
    f.chmod(0o644)
    check_trust_path(str(f))
    f.chmod(0o666)
    with pytest.raises(TrustError, match="writable by others"):
        check_trust_path(str(f))
    f.chmod(0o644)
    os.chown(f, 4242, 4242)
    with pytest.raises(TrustError, match="owned by uid 4242"):
        check_trust_path(str(f))
    os.chown(f, 0, 0)
    d.chmod(0o775)
    with pytest.raises(TrustError, match=f"directory {d} on the way to it is writable by group"):
        check_trust_path(str(f))
    d.chmod(0o755)
    wide = tmp_path / "wide"
    wide.mkdir()
    wide.chmod(0o777)  # world-writable, not sticky: anyone can swap the symlink
    link = wide / "allowed_signers"
    link.symlink_to(f)
    with pytest.raises(TrustError, match="writable by others"):
        check_trust_path(str(link))


def test_a_world_writable_allowed_signers_refuses_every_tip(two_keys):
    env = two_keys
    env["allowed"].chmod(0o666)
    out = _apply(env, 1)
    assert "writable by others" in out["rejected"]
    assert not (env["root"] / "etc/motd").exists()
