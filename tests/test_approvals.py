"""Issue 15.1: k-of-n approvals. Real `ssh-keygen -Y sign` approvals (ed25519, ecdsa, a
certificate), a FIDO one made by the fixture in fido.py (no authenticator here),
pushed as refs to a real bare repository the agent fetches from."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import Fleet, agent, allowed_line, git, ssh_key, write_config
from fido import FidoKey

from agent.approvals import NAMESPACE, fingerprint_hex, key_of, payload
from agent.source import open_repo


@pytest.fixture
def kit(tmp_path: Path) -> dict:
    """ops signs commits (not an approver); alice, bob and carol approve, 2 of 3."""
    keys = {n: ssh_key(tmp_path / n, kind) for n, kind in
            (("ops", "ed25519"), ("alice", "ed25519"), ("bob", "ecdsa"), ("carol", "ed25519"))}
    allowed = tmp_path / "allowed_signers"
    allowed.write_text("".join(allowed_line(f"{n}@example.com", k.with_suffix(".pub"))
                               for n, k in keys.items()))
    approvers = tmp_path / "approvers"
    approvers.write_text("".join(allowed_line(n, keys[n].with_suffix(".pub"))
                                 for n in ("alice", "bob", "carol")))
    fleet = Fleet(tmp_path, key=keys["ops"])
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state",
                       trust={"unsigned": "refuse", "allowed_signers": str(allowed),
                              "approvals": {"threshold": 2, "approvers": str(approvers)}})
    return {"keys": keys, "fleet": fleet, "cfg": cfg, "root": root, "tmp": tmp_path,
            "approvers": approvers}


def apply(kit: dict, check: int | None = None) -> dict:
    p = agent("apply", "--config", str(kit["cfg"]), "--json", check=check)
    return json.loads(p.stdout)


def approve(kit: dict, who: str, rev: str = "HEAD", *extra: str) -> subprocess.CompletedProcess:
    return agent("approve", "--repo", str(kit["fleet"].work), "--rev", rev, "--key",
                 str(kit["keys"][who]), "--push", "origin", *extra, check=0)


def first_good(kit: dict) -> str:
    """The first commit, approved by alice and bob, applied: last good exists."""
    approve(kit, "alice")
    approve(kit, "bob")
    out = apply(kit, check=0)
    assert out["state"] == "converged", out
    return out["commit"]


def test_two_of_three_with_one_two_and_three_approvals(kit):
    fleet: Fleet = kit["fleet"]
    out = apply(kit, check=1)  # no approval, no last good: nothing to converge
    assert "awaiting approval, 0 of 2; waiting for any of alice, bob, carol" in \
        " ".join(out["errors"])
    first_good(kit)
    new = fleet.commit("next", files={"hosts/web-01.yaml": "vars: {worker_processes: 7}\n"},
                       push=True)
    out = apply(kit, check=0)
    assert out["state"] == "awaiting-approval" and out["commit"] != new
    assert out["waiting"] == (f"{new[:12]}: awaiting approval, 0 of 2; waiting for any of "
                              f"alice, bob, carol")
    p = approve(kit, "alice")
    assert f"approved {new[:12]}" in p.stdout and "pushed to origin" in p.stdout
    out = apply(kit, check=0)
    assert out["state"] == "awaiting-approval"
    assert "1 of 2: alice; waiting for any of bob, carol" in out["waiting"]
    status = agent("history", "--config", str(kit["cfg"]), check=0).stdout
    assert "awaiting-approval" in status
    approve(kit, "bob")  # ecdsa
    out = apply(kit, check=0)
    assert out["state"] == "converged" and out["commit"] == new
    assert out["approvals"]["approved_by"] == ["alice", "bob"]
    assert "worker_processes 7;" in (kit["root"] / "etc/nginx/nginx.conf").read_text()
    approve(kit, "carol")  # a third is fine, and shown
    data = json.loads(agent("approvals", "--repo", str(fleet.work), "--approvers",
                            str(kit["approvers"]), "--threshold", "2", "--json",
                            check=0).stdout)
    assert data["approved_by"] == ["alice", "bob", "carol"] and data["ok"]


def test_the_signer_counts_when_an_approver_and_one_person_counts_once(kit):
    fleet: Fleet = kit["fleet"]
    first_good(kit)
    # alice signs the commit herself: one more approval (bob) makes two
    fleet.commit("by alice", files={"hosts/web-01.yaml": "vars: {worker_processes: 3}\n"},
                 sign=kit["keys"]["alice"], push=True)
    approve(kit, "alice")  # her own approval does not count twice
    out = apply(kit, check=0)
    assert out["state"] == "awaiting-approval", out
    assert out["approvals"]["signer"] == "alice"
    assert "1 of 2: alice" in out["waiting"]
    # alice's second key: still alice
    alice2 = ssh_key(kit["tmp"] / "alice2")
    kit["keys"]["alice2"] = alice2
    kit["approvers"].write_text(kit["approvers"].read_text()
                                + allowed_line("alice", alice2.with_suffix(".pub")))
    approve(kit, "alice2")
    out = apply(kit, check=0)
    assert out["state"] == "awaiting-approval" and out["approvals"]["approved_by"] == ["alice"]
    approve(kit, "bob")
    assert apply(kit, check=0)["state"] == "converged"


def test_approvals_that_do_not_count(kit):
    fleet: Fleet = kit["fleet"]
    first_good(kit)
    old = fleet.head()
    new = fleet.commit("next", files={"hosts/web-01.yaml": "vars: {worker_processes: 5}\n"},
                       push=True)
    # an approval of another commit, its ref renamed onto this one
    repo = open_repo(str(fleet.work))
    sig = (kit["tmp"] / "old.sig")
    out = json.loads(agent("approve", "--repo", str(fleet.work), "--rev", old, "--key",
                           str(kit["keys"]["alice"]), "--json", check=0).stdout)
    ref = out["ref"]
    git(fleet.work, "update-ref", ref.replace(old, new), ref)
    git(fleet.work, "push", "-q", "origin", f"{ref.replace(old, new)}:{ref.replace(old, new)}")
    # an approval of this commit but for another branch
    approve(kit, "bob", "HEAD", "--branch", "staging")
    # carol, removed from the approvers file after she approved
    approve(kit, "carol")
    kit["approvers"].write_text("".join(
        line for line in kit["approvers"].read_text().splitlines(keepends=True)
        if not line.startswith("carol ")))
    # a key that is not an approver at all (ops), and a ref naming another key
    approve(kit, "ops")
    text = payload("main", new, repo.tree_id(new))
    sig.write_bytes(text)
    subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-n", NAMESPACE, "-f",
                    str(kit["keys"]["alice"]), str(sig)], check=True)
    signed = (kit["tmp"] / "old.sig.sig").read_bytes()
    dave = ssh_key(kit["tmp"] / "dave")
    dave_hex = fingerprint_hex(key_of(subprocess.run(
        ["ssh-keygen", "-q", "-Y", "sign", "-n", NAMESPACE, "-f", str(dave)],
        input=b"x", capture_output=True, check=True).stdout))
    repo.write_approval(new, dave_hex, signed)  # alice's signature under dave's name
    git(fleet.work, "push", "-q", "origin", f"refs/approvals/{new}/{dave_hex}")
    out = apply(kit, check=0)
    assert out["state"] == "awaiting-approval", out
    assert out["approvals"]["approved_by"] == []
    reasons = " | ".join(a["reason"] for a in out["approvals"]["approvals"])
    assert reasons.count("signature") >= 2  # the renamed one and the wrong branch
    assert "not trusted" in reasons  # carol (removed) and ops (never an approver)
    assert "ref names key" in reasons
    assert len(out["approvals"]["approvals"]) == 5


def test_malformed_oversized_blob_refs_and_too_many_refs_never_take_the_host_offline(kit):
    fleet: Fleet = kit["fleet"]
    first_good(kit)
    new = fleet.commit("next", files={"hosts/web-01.yaml": "vars: {worker_processes: 6}\n"},
                       push=True)
    bare = fleet.bare
    for i, text in enumerate(("not a signature\n", "x" * 20000)):
        oid = subprocess.run(["git", "-C", str(bare), "hash-object", "-w", "--stdin"],
                             input=text, capture_output=True, text=True, check=True).stdout
        git(bare, "update-ref", f"refs/approvals/{new}/{'ab' * 31}{i:02d}", oid.strip())
    # a hostile server: bare blobs under the refs; the host keeps fetching
    out = apply(kit, check=0)
    assert out["state"] == "awaiting-approval" and not out["offline"], out
    reasons = [a["reason"] for a in out["approvals"]["approvals"]]
    assert all("not point at an approval commit" in r for r in reasons), reasons
    out = apply(kit, check=0)  # and again: a stale blob ref in the mirror breaks nothing
    assert out["state"] == "awaiting-approval" and not out["offline"], out
    # malformed and oversized approvals stored the proper way
    repo = open_repo(str(bare))
    repo.write_approval(new, "cd" * 32, b"-----BEGIN SSH SIGNATURE-----\ngarbage\n")
    repo.write_approval(new, "ef" * 32, b"A" * 40000)
    out = apply(kit, check=0)
    reasons = " | ".join(a["reason"] for a in out["approvals"]["approvals"])
    assert "over 16384" in reasons and "signature" in reasons.lower()
    # then valid approvals arrive and the host applies at once
    approve(kit, "alice")
    approve(kit, "bob")
    out = apply(kit, check=0)
    assert out["state"] == "converged" and out["commit"] == new
    # more than the bounded number of refs: all refused
    new2 = fleet.commit("again", files={"hosts/web-01.yaml": "vars: {worker_processes: 8}\n"},
                        push=True)
    approve(kit, "alice")
    approve(kit, "bob")
    for i in range(70):
        repo.write_approval(new2, f"{i:064x}", b"x")
    out = apply(kit, check=0)
    assert out["state"] == "awaiting-approval"
    assert "more than 64: all refused" in out["waiting"]


def test_fido_and_certificate_approvals(kit):
    fleet: Fleet = kit["fleet"]
    tmp: Path = kit["tmp"]
    fido = FidoKey("ed25519")
    ca = ssh_key(tmp / "ca")
    dave = ssh_key(tmp / "dave")
    subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", "dave", "-n", "dave",
                    str(dave.with_suffix(".pub"))], check=True)
    ca_key = " ".join(ca.with_suffix(".pub").read_text().split()[:2])
    kit["approvers"].write_text(fido.allowed("frida") + f"dave cert-authority {ca_key}\n")
    first = fleet.head()
    repo = open_repo(str(fleet.bare))
    text = payload("main", first, repo.tree_id(first))
    sig = fido.sign(text, namespace=NAMESPACE).encode()
    repo.write_approval(first, fingerprint_hex(key_of(sig)), sig)
    out = apply(kit, check=1)
    assert "1 of 2: frida; waiting for any of dave" in " ".join(out["errors"])
    # dave signs with his certificate, as git's user.signingkey would name it
    kit["keys"]["dave"] = Path(f"{dave}-cert.pub")
    approve(kit, "dave")
    out = apply(kit, check=0)
    assert out["state"] == "converged" and out["approvals"]["approved_by"] == ["frida", "dave"]
    # a FIDO approval made without user presence does not count
    new = fleet.commit("next", files={"hosts/web-01.yaml": "vars: {worker_processes: 2}\n"},
                       push=True)
    text = payload("main", new, repo.tree_id(new))
    sig = fido.sign(text, namespace=NAMESPACE, flags=0).encode()
    repo.write_approval(new, fingerprint_hex(key_of(sig)), sig)
    approve(kit, "dave")
    out = apply(kit, check=0)
    assert out["state"] == "awaiting-approval"
    assert "user presence" in " ".join(a["reason"] for a in out["approvals"]["approvals"])


def test_bad_approvals_config(tmp_path, fleet):
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "a.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state", trust={"approvals": {"threshold": 2}})
    p = agent("apply", "--config", str(cfg), check=2)
    assert "trust.approvals.approvers" in p.stderr
    cfg = write_config(tmp_path / "b.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state",
                       trust={"approvals": {"threshold": "two", "approvers": "x"}})
    assert "trust.approvals.threshold must be a whole number" in agent(
        "apply", "--config", str(cfg), check=2).stderr
