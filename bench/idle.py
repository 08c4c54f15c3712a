#!/usr/bin/env python3
"""Benchmark the daemon at rest: RSS and CPU over a window with `interval: 5s` against a
local `git daemon` and 2,000 managed files, then the latency from a file edit to its
correction by the drift watcher.

    .venv/bin/python bench/idle.py [--seconds 60] [--n 2000] [--edits 10]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from benchlib import agent_argv, git


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--edits", type=int, default=10)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gitops-idle-"))
    procs: list[subprocess.Popen] = []
    try:
        work = tmp / "work"
        (work / "roles").mkdir(parents=True)
        (work / "files").mkdir()
        (work / "fleet.yaml").write_text("groups:\n  - roles: [idle]\n")
        lines = ["files:\n"]
        for i in range(args.n):
            sub = f"d{i // 200}"
            (work / "files" / sub).mkdir(exist_ok=True)
            (work / "files" / sub / f"f{i}").write_text(f"value {i}\n")
            lines.append(f"  /srv/idle/{sub}/f{i}: {{source: {sub}/f{i}}}\n")
        (work / "roles/idle.yaml").write_text("".join(lines))
        git(tmp, "init", "-q", "-b", "main", str(work))
        git(work, "add", "-A")
        git(work, "commit", "-qm", "idle")
        git(tmp, "clone", "-q", "--bare", str(work), str(tmp / "fleet.git"))
        port = free_port()
        procs.append(subprocess.Popen(
            ["git", "daemon", "--reuseaddr", "--export-all", "--listen=127.0.0.1",
             f"--port={port}", f"--base-path={tmp}", str(tmp)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        root = tmp / "root"
        root.mkdir()
        cfg = tmp / "agent.yaml"
        cfg.write_text(f"source: {{url: 'git://127.0.0.1:{port}/fleet.git'}}\n"
                       f"host: {{name: idle-01}}\ntrust: {{unsigned: allow}}\n"
                       f"root: {root}\nstate_dir: {tmp / 'state'}\n"
                       f"socket: {tmp / 'agent.sock'}\ninterval: 5s\njitter: 0s\n")
        argv = agent_argv("run")
        log = open(tmp / "agent.log", "wb")  # noqa: SIM115 - lives as long as the daemon
        agent = subprocess.Popen([*argv, "--config", str(cfg)], stdout=log, stderr=log)
        procs.append(agent)
        target = root / "srv/idle/d0/f0"
        deadline = time.time() + 120
        while not target.exists() and time.time() < deadline:
            time.sleep(0.1)
        if not target.exists():
            sys.exit("the first cycle did not finish in 120 s")
        time.sleep(2)
        p = psutil.Process(agent.pid)
        cpu0 = p.cpu_times()
        t0 = time.time()
        rss = []
        while time.time() - t0 < args.seconds:
            rss.append(p.memory_info().rss / 2**20)
            time.sleep(1)
        cpu1 = p.cpu_times()
        busy = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        took = time.time() - t0
        print(f"{args.n} managed files, interval 5s, over {took:.0f}s: RSS median "
              f"{statistics.median(rss):.1f} MB, max {max(rss):.1f} MB; CPU "
              f"{busy / took * 100:.2f}% of one core")
        lat = []
        for i in range(args.edits):
            j = (i * 197) % args.n
            path = root / f"srv/idle/d{j // 200}/f{j}"
            good = path.read_text()
            path.write_text("drift\n")
            t = time.perf_counter()
            while path.read_text() != good:
                if time.perf_counter() - t > 10:
                    sys.exit(f"{path} was not corrected within 10 s")
                time.sleep(0.005)
            lat.append(time.perf_counter() - t)
            time.sleep(0.5)
        print(f"drift: edit → corrected in median {statistics.median(lat) * 1000:.0f} ms, "
              f"max {max(lat) * 1000:.0f} ms over {len(lat)} edits")
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
