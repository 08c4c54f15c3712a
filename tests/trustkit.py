"""Helpers to make real signed commits, odd commit objects, and git's own verdicts."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from conftest import GIT_ENV, git


def raw_commit(repo: Path, rev: str = "HEAD") -> bytes:
    return subprocess.run(["git", "cat-file", "commit", rev], cwd=repo, capture_output=True,
                          check=True, env=GIT_ENV).stdout


def write_commit(repo: Path, raw: bytes) -> str:
    """Store any bytes as a commit object (--literally: odd headers are the point)."""
    return subprocess.run(["git", "hash-object", "-t", "commit", "-w", "--literally", "--stdin"],
                          cwd=repo, input=raw, capture_output=True, check=True,
                          env=GIT_ENV).stdout.decode().strip()


def strip_sig(raw: bytes) -> bytes:
    """The payload git signs: the commit without its gpgsig header."""
    head, sep, body = raw.partition(b"\n\n")
    out, skipping = [], False
    for line in head.split(b"\n"):
        if line.startswith(b"gpgsig "):
            skipping = True
            continue
        if skipping and line.startswith(b" "):
            continue
        skipping = False
        out.append(line)
    return b"\n".join(out) + sep + body


def ssh_sign(payload: bytes, key: Path, namespace: str = "git") -> str:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "payload"
        f.write_bytes(payload)
        subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-n", namespace, "-f", str(key),
                        str(f)], check=True, capture_output=True)
        return (Path(d) / "payload.sig").read_text()


def with_sig(payload: bytes, armored: str, header: str = "gpgsig") -> bytes:
    head, sep, body = payload.partition(b"\n\n")
    lines = armored.rstrip("\n").split("\n")
    sig = f"{header} " + "\n ".join(lines)
    return head + b"\n" + sig.encode() + sep + body


def git_good(repo: Path, rev: str, allowed: Path | None = None,
             gnupghome: Path | None = None) -> bool:
    """git's own verdict: `git verify-commit` exits 0 only for a `G` signature."""
    cfg = []
    if allowed is not None:
        cfg = ["-c", f"gpg.ssh.allowedSignersFile={allowed}"]
    env = {"GNUPGHOME": str(gnupghome)} if gnupghome else None
    return git(repo, *cfg, "verify-commit", rev, env=env, check=False).returncode == 0


def gpg(home: Path, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--yes", "--pinentry-mode",
                           "loopback", "--passphrase", "", *args], input=input,
                          capture_output=True, check=True)


def gpg_key(home: Path, uid: str, expire: str = "never", subkey: bool = False) -> str:
    """Make a key in `home`; returns its primary fingerprint."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if subkey:
        gpg(home, "--quick-gen-key", uid, "ed25519", "cert", "never")
    else:
        gpg(home, "--quick-gen-key", uid, "ed25519", "sign", expire)
    out = gpg(home, "--with-colons", "--fingerprint", uid).stdout.decode()
    fpr = next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))
    if subkey:
        gpg(home, "--quick-add-key", fpr, "ed25519", "sign", "never")
    return fpr


def gpg_sign_commit(repo: Path, home: Path, fpr: str, msg: str = "gpg signed") -> str:
    git(repo, "-c", "gpg.format=openpgp", "-c", f"user.signingkey={fpr}", "commit", "-q",
        "--allow-empty", "-S", "-m", msg, env={"GNUPGHOME": str(home)})
    return git(repo, "rev-parse", "HEAD").stdout.strip()
