#!/usr/bin/env python3
"""Benchmark signature verdicts: per-commit cost for ed25519, ecdsa-p256 and rsa-3072
commits made by real `git commit -S`, and `require: all` over 1,000 signed commits.

    .venv/bin/python bench/verify.py [--commits 1000]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pygit2

from agent.config import TrustConfig
from agent.source import open_repo
from agent.trust import Verifier, gate

ENV = {"GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent", "PATH": "/usr/bin:/bin"}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", *args], cwd=cwd,
                          env=ENV, check=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", type=int, default=1000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gitops-verify-"))
    try:
        allowed = []
        for kind, bits in (("ed25519", None), ("ecdsa", 256), ("rsa", 3072)):
            key = tmp / kind
            cmd = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(key)]
            subprocess.run(cmd + (["-b", str(bits)] if bits else []), check=True)
            allowed.append("ops " + " ".join(key.with_suffix(".pub").read_text().split()[:2]))
        (tmp / "allowed").write_text("\n".join(allowed) + "\n")
        repo = tmp / "repo"
        git(tmp, "init", "-q", "-b", "main", str(repo))
        verifier = Verifier(str(tmp / "allowed"))
        mirror = open_repo(str(repo))
        for kind in ("ed25519", "ecdsa", "rsa"):
            git(repo, "-c", "gpg.format=ssh", "-c", f"user.signingkey={tmp / kind}", "commit",
                "-q", "-S", "--allow-empty", "-m", kind)
            commit = git(repo, "rev-parse", "HEAD")
            raw = mirror.raw_commit(commit)
            assert verifier.verify(raw, commit).good
            n = 300
            t0 = time.perf_counter()
            for _ in range(n):
                verifier.verify(raw, commit)
            per = (time.perf_counter() - t0) / n
            print(f"{kind:8} {per * 1000:7.3f} ms/verdict  {1 / per:8.0f} verdicts/s")

        # require: all over N commits, each signed by a real `git commit -S`
        base = git(repo, "rev-parse", "HEAD")
        t0 = time.perf_counter()
        for i in range(args.commits):
            git(repo, "-c", "gpg.format=ssh", "-c", f"user.signingkey={tmp / 'ed25519'}",
                "commit", "-q", "-S", "--allow-empty", "-m", f"c{i}")
        made = time.perf_counter() - t0
        tip = git(repo, "rev-parse", "HEAD")
        mirror.repo = pygit2.Repository(str(repo))
        st = {"last_good": base, "last_good_committer_time": 0}
        tcfg = TrustConfig(allowed_signers=str(tmp / "allowed"), require="all")
        t0 = time.perf_counter()
        v = gate(tcfg, mirror, None, tip, st)
        took = time.perf_counter() - t0
        assert v.good
        print(f"require: all over {args.commits} ed25519 commits: {took:.3f}s "
              f"({took / args.commits * 1000:.3f} ms/commit, uncached; making them took "
              f"{made:.1f}s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
