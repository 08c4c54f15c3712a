#!/usr/bin/env python3
"""Benchmark a rollback: N files changed by a revision whose health check fails.

Generates a fleet repo with N static files, applies it, then times two whole
`gitops-agent apply` processes from that same base, several times each:
  - a revision that changes all N files and passes its check (/bin/true), and
  - one that changes all N files and fails its check (/bin/false): applied, then
    rolled back from the journal (every file put back) and quarantined.
The rollback itself is timed by the agent (`rollback_seconds` in `apply --json`).

    .venv/bin/python bench/rollback.py [--n 2000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import agent_argv, git


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    n = args.n
    tmp = Path(tempfile.mkdtemp(prefix="gitops-bench-rollback-"))
    try:
        work = tmp / "work"
        (work / "roles").mkdir(parents=True)
        (work / "fleet.yaml").write_text(
            "health: {window: 0s, timeout: 0.1s, interval: 0.1s}\ngroups:\n  - roles: [bulk]\n")

        def role(version: str, check: str) -> None:
            lines = ["files:\n"]
            for i in range(n):
                lines.append(f"  /srv/bulk/d{i % 20}/f{i}.conf: "
                             f"{{content: \"{version} {i}\\n\"}}\n")
            lines.append(f"checks:\n  selftest: {{command: [{check}]}}\n")
            (work / "roles/bulk.yaml").write_text("".join(lines))

        role("base", "/bin/true")
        git(tmp, "init", "-q", "-b", "main", str(work))
        git(work, "add", "-A")
        git(work, "commit", "-qm", "base")
        bare = tmp / "fleet.git"
        git(tmp, "clone", "-q", "--bare", str(work), str(bare))
        git(work, "remote", "add", "origin", str(bare))
        root = tmp / "root"
        root.mkdir()
        cfg = tmp / "agent.yaml"
        cfg.write_text(f"source: {{url: {bare}, branch: main}}\nhost: {{name: bench-01}}\n"
                       f"trust: {{unsigned: allow}}\nroot: {root}\n"
                       f"state_dir: {tmp / 'state'}\n")
        agent = agent_argv("apply", "--config", str(cfg))

        def push(version: str, check: str) -> None:
            role(version, check)
            git(work, "commit", "-qam", version)
            git(work, "push", "-q", "origin", "main")

        rollbacks = []

        def timed(expect: int) -> float:
            t0 = time.perf_counter()
            p = subprocess.run([*agent, "--json"], capture_output=True)
            took = time.perf_counter() - t0
            if p.returncode != expect:
                sys.exit(f"apply exited {p.returncode}, wanted {expect}: {p.stderr.decode()}")
            if expect:
                rollbacks.append(json.loads(p.stdout)["rollback_seconds"])
            return took

        timed(0)
        passing, failing = [], []
        for i in range(args.runs):
            push(f"pass{i}", "/bin/true")
            passing.append(timed(0))
            push(f"base{i}", "/bin/true")  # the same base again, applied
            timed(0)
            push(f"fail{i}", "/bin/false")
            failing.append(timed(1))
            for f in (root / "srv/bulk/d0").iterdir():  # every file is back
                assert f.read_text().startswith(f"base{i} "), f
                break
        mp, mf = statistics.median(passing), statistics.median(failing)
        print(f"N={n} files, {os.cpu_count()} CPUs, {args.runs} runs each")
        print(f"{'apply + passing trial':34} median {mp:6.3f}s  min {min(passing):6.3f}s")
        print(f"{'apply + failing trial + rollback':34} median {mf:6.3f}s  "
              f"min {min(failing):6.3f}s")
        print(f"{'the rollback of N files itself':34} median "
              f"{statistics.median(rollbacks):6.3f}s  min {min(rollbacks):6.3f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
