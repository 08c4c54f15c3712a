#!/usr/bin/env python3
"""Benchmark a no-op cycle with 50 declared packages and 20 services, on a real systemd.

Boots the test rootfs (tests/testbed.py) with systemd as PID 1, installs the agent from
the .deb that packaging/ builds, declares 50 packages that are installed there and 20
services in their current state, converges once, then times no-op `gitops-agent apply`
runs inside the testbed and counts the processes each cycle spawned (the agent counts
every subprocess it runs; the figure is in `apply --json` as `processes`).

    .venv/bin/python bench/packages.py [--runs 5]        (as root)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP / "tests"))

from testbed import Testbed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    deb = subprocess.run([str(TOP / "packaging/build-deb.sh"), sys.executable], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    tmp = Path(tempfile.mkdtemp(prefix="gitops-pkgbench-"))
    tb = Testbed(tmp)
    try:
        shutil.copy(deb, tb.root / "root/agent.deb")
        tb.boot()
        tb.run("dpkg", "-i", "/root/agent.deb")
        pkgs = tb.run("dpkg-query", "-W", "-f=${Package}\n").stdout.split()[:50]
        units = tb.run("systemctl", "list-units", "--type=service", "--state=running",
                       "--no-legend", "--plain").stdout.split("\n")
        running = [u.split()[0] for u in units if u.strip()]
        static = tb.run("systemctl", "list-unit-files", "--type=service", "--state=static",
                        "--no-legend").stdout.split("\n")
        services = (running + [s.split()[0] for s in static if s.strip()
                               and s.split()[0] not in running and "@" not in s])[:20]
        show = tb.run("systemctl", "show", "-p", "Id,ActiveState", "--", *services).stdout
        active = {}
        for block in show.strip().split("\n\n"):
            kv = dict(line.split("=", 1) for line in block.splitlines())
            active[kv["Id"]] = kv["ActiveState"] == "active"
        role = ["packages:\n"] + [f"  {p}: present\n" for p in pkgs]
        role += ["services:\n"] + [f"  {s}: {{active: {str(active.get(s, False)).lower()}}}\n"
                                   for s in services]
        fleet = tb.root / "srv/fleet"
        (fleet / "roles").mkdir(parents=True)
        (fleet / "fleet.yaml").write_text("groups:\n  - roles: [base]\n")
        (fleet / "roles/base.yaml").write_text("".join(role))
        env = {"GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent", "PATH": "/usr/bin:/bin"}
        for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "bench"]):
            subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", *cmd],
                           cwd=fleet, check=True, env=env)
        (tb.root / "etc/gitops-agent/agent.yaml").write_text(
            "source: {url: /srv/fleet, branch: main}\ntrust: {unsigned: allow}\n"
            "host: {name: bench-01}\n")
        first = json.loads(tb.run("gitops-agent", "apply", "--json", check=False).stdout)
        print(f"{len(pkgs)} packages, {len(services)} services declared; first apply: "
              f"{first['state']}, {first['changed']} changed, {first['processes']} processes")
        walls, procs = [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = tb.run("gitops-agent", "apply", "--json", check=False).stdout
            walls.append(time.perf_counter() - t0)
            res = json.loads(out)
            assert res["changed"] == 0, res
            procs.append(res["processes"])
        print(f"no-op apply: median {statistics.median(walls):.3f}s, max {max(walls):.3f}s "
              f"(whole process, via nsenter); processes spawned per cycle: {sorted(set(procs))}")
    finally:
        tb.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
