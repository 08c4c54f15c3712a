#!/usr/bin/env python3
"""A fleet on one Git server: N real agent daemons (each its own host name, state_dir,
sandbox root and socket) poll one real `git daemon` on 127.0.0.1 through a byte-counting
TCP relay. Prints the RSS per idle agent, the server's CPU and bytes per poll (and per
probe), and after a signed push the time until 50%, 99% and 100% of hosts converged.

    .venv/bin/python bench/fleet.py [--hosts 100] [--interval 30s] [--probe 5s|off]
                                    [--idle 60] [--batch 20] [--server git|https]
                                    [--reports]

`--server https`: Debian's apache2 serving `git http-backend` over TLS (bench/apache.py)
instead of `git daemon`. `--reports`: every agent also reports to one SFTP drop, a real
OpenSSH sshd on 127.0.0.1 behind its own counting relay; its load is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from benchlib import agent_argv, git

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.control import request  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """127.0.0.1:port -> the git daemon; counts connections and bytes each way."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.connections = 0
        self.down = 0  # server -> agents
        self.up = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, down: bool) -> None:
            try:
                while data := await r.read(65536):
                    if down:
                        self.down += len(data)
                    else:
                        self.up += len(data)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream)
            except OSError:
                w.close()
                return
            await asyncio.gather(pipe(r, uw, False), pipe(ur, w, True))

        async def start() -> None:
            await asyncio.start_server(handle, "127.0.0.1", self.port, backlog=4096)
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def snapshot(self) -> tuple[int, int, int]:
        return self.connections, self.down, self.up


def server_cpu(proc: psutil.Process) -> float:
    """The server's CPU seconds: git daemon (or apache2) and every process under it, the
    reaped ones (upload-pack, the http-backend CGIs) included."""
    t = proc.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in proc.children(recursive=True):
        try:
            ct = child.cpu_times()
            total += ct.user + ct.system
        except psutil.Error:
            pass
    return total


def start_sshd(tmp: Path) -> tuple[subprocess.Popen, int, Path, Path]:
    """A real sshd serving SFTP on 127.0.0.1: (process, port, client key, host key)."""
    d = tmp / "sshd"
    d.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "MaxStartups 1000:30:2000\nSubsystem sftp internal-sftp\nLogLevel ERROR\n")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")],
                            stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc, port, d / "client_key", d / "host_key.pub"


def status(sock: str) -> dict:
    try:
        return request(sock, {"verb": "status"}, 5)
    except Exception:  # noqa: BLE001 - not up yet
        return {}


def _reported(drop: Path, host: str, commit: str) -> bool:
    """The host's report in the drop names `commit` as applied."""
    try:
        report = json.loads((drop / f"{host}.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and report.get("applied_commit") == commit


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(round(q * len(values) + 0.5)) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=100)
    ap.add_argument("--interval", default="30s")
    ap.add_argument("--probe", default="5s", help="source.probe_interval, or off")
    ap.add_argument("--idle", type=float, default=60, help="seconds of idle measurement")
    ap.add_argument("--batch", type=int, default=20, help="agents started at once")
    ap.add_argument("--server", choices=("git", "https"), default="git")
    ap.add_argument("--reports", action="store_true", help="report to an SFTP drop")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gitops-fleet-"))
    procs: list[subprocess.Popen] = []
    gitd = None
    try:
        key = tmp / "signing"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        (tmp / "allowed").write_text("ops@example.com " + " ".join(
            key.with_suffix(".pub").read_text().split()[:2]) + "\n")
        os.chmod(tmp, 0o755)
        work = tmp / "work"
        (work / "roles").mkdir(parents=True)
        (work / "files").mkdir()
        (work / "fleet.yaml").write_text("groups:\n  - roles: [app]\n")
        (work / "files/app.conf.j2").write_text("host={{ host.name }}\nversion={{ version }}\n")
        (work / "roles/app.yaml").write_text(
            "vars: {version: 1}\nfiles:\n  /etc/app/app.conf: {template: app.conf.j2}\n"
            "  /etc/app/motd: {content: \"hello\\n\"}\n")
        sign = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}"]
        git(tmp, "init", "-q", "-b", "main", str(work))
        git(work, "add", "-A")
        git(work, *sign, "commit", "-q", "-S", "-m", "v1")
        (tmp / "srv").mkdir()
        git(tmp, "clone", "-q", "--bare", str(work), str(tmp / "srv/fleet.git"))
        git(work, "remote", "add", "origin", str(tmp / "srv/fleet.git"))
        port = free_port()
        ca = None
        if args.server == "https":
            from apache import ApacheGit

            apache = ApacheGit(tmp, tmp / "srv", port)
            apache.start()
            gitd = apache.proc
            relay = Relay(port)
            url, ca = apache.url("fleet.git", relay.port), str(apache.ca)
        else:
            gitd = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all",
                                     "--listen=127.0.0.1", f"--port={port}",
                                     "--max-connections=0", f"--base-path={tmp / 'srv'}",
                                     str(tmp / "srv")], stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            relay = Relay(port)
            url = f"git://127.0.0.1:{relay.port}/fleet.git"
        sshd = drop_relay = None
        report_cfg: dict = {}
        if args.reports:
            sshd, sport, client_key, host_pub = start_sshd(tmp)
            drop_relay = Relay(sport)
            (tmp / "drop").mkdir()
            known = tmp / "known_hosts"
            known.write_text(f"[127.0.0.1]:{drop_relay.port} "
                             + " ".join(host_pub.read_text().split()[:2]) + "\n")
            report_cfg = {"sftp": {"host": "127.0.0.1", "port": drop_relay.port,
                                   "user": "root", "key": str(client_key),
                                   "known_hosts": str(known), "dir": str(tmp / "drop")}}
        socks = []
        avail0 = psutil.virtual_memory().available
        t_start = time.monotonic()
        for i in range(args.hosts):
            h = tmp / f"h{i}"
            (h / "root").mkdir(parents=True)
            sock = f"/tmp/gf-{os.getpid()}-{i}.sock"
            socks.append(sock)
            cfg = {"source": {"url": url, "branch": "main", "timeout": "20s"},
                   "trust": {"allowed_signers": str(tmp / "allowed")},
                   "host": {"name": f"host-{i:04d}"}, "root": str(h / "root"),
                   "state_dir": str(h / "state"), "socket": sock,
                   "interval": args.interval, "jitter": "5s", "drift": "off"}
            if args.probe != "off":
                cfg["source"]["probe_interval"] = args.probe
            if ca:
                cfg["source"]["ca_bundle"] = ca
            if report_cfg:
                cfg["report"] = report_cfg
            (h / "agent.yaml").write_text(json.dumps(cfg))
            procs.append(subprocess.Popen(agent_argv("run", "--config", str(h / "agent.yaml")),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if (i + 1) % args.batch == 0:  # let a batch start before the next (2 CPUs)
                while sum(1 for s in socks if not os.path.exists(s)) > 0:
                    time.sleep(0.2)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = sum(1 for s in socks if status(s).get("state") == "converged")
            if done == len(socks):
                break
            time.sleep(1)
        started = time.monotonic() - t_start
        if done < len(socks):
            raise SystemExit(f"only {done} of {len(socks)} agents converged the first commit "
                             f"within 600 s")
        rss, uss = [], []
        for p in procs:
            try:
                m = psutil.Process(p.pid).memory_full_info()
            except psutil.Error:
                continue
            rss.append(m.rss)
            uss.append(m.uss)
        # what the machine lost per agent: unlike RSS, this counts the libraries the
        # agents share once, and the kernel's own cost (page tables, sockets) too
        avail1 = psutil.virtual_memory().available
        per_agent = (avail0 - avail1) / max(len(procs), 1)
        gproc = psutil.Process(gitd.pid)
        agents = [psutil.Process(p.pid) for p in procs]

        def agents_cpu() -> float:
            total = 0.0
            for a in agents:
                try:
                    t = a.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
                except psutil.Error:
                    pass
            return total

        c0, d0, u0 = relay.snapshot()
        s0, a0 = server_cpu(gproc), agents_cpu()
        sproc = psutil.Process(sshd.pid) if sshd is not None else None
        r0 = drop_relay.snapshot() if drop_relay else (0, 0, 0)
        q0 = server_cpu(sproc) if sproc else 0.0
        p0 = sum(status(s).get("probes", 0) for s in socks)
        cy0 = sum(status(s).get("cycles", 0) for s in socks)
        time.sleep(args.idle)
        c1, d1, u1 = relay.snapshot()
        s1, a1 = server_cpu(gproc), agents_cpu()
        r1 = drop_relay.snapshot() if drop_relay else (0, 0, 0)
        q1 = server_cpu(sproc) if sproc else 0.0
        p1 = sum(status(s).get("probes", 0) for s in socks)
        cy1 = sum(status(s).get("cycles", 0) for s in socks)
        conns = max(c1 - c0, 1)

        # the push
        (work / "roles/app.yaml").write_text((work / "roles/app.yaml").read_text()
                                             .replace("version: 1", "version: 2"))
        git(work, "add", "-A")
        git(work, *sign, "commit", "-q", "-S", "-m", "v2")
        new = subprocess.run(["git", "-C", str(work), "rev-parse", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        sp0 = server_cpu(gproc)
        cp0, dp0, _ = relay.snapshot()
        rp0 = drop_relay.snapshot() if drop_relay else (0, 0, 0)
        qp0 = server_cpu(sproc) if sproc else 0.0
        t0 = time.monotonic()
        git(work, "push", "-q", "origin", "main")
        at: dict[str, float] = {}
        limit = t0 + 120 + 2 * float(args.interval.rstrip("s"))
        while len(at) < len(socks) and time.monotonic() < limit:
            for s in socks:
                if s not in at and status(s).get("applied_commit") == new:
                    at[s] = time.monotonic() - t0
            time.sleep(0.2)
        time.sleep(5 if drop_relay else 0)  # the last hosts' reports
        sp1 = server_cpu(gproc)
        cp1, dp1, _ = relay.snapshot()
        rp1 = drop_relay.snapshot() if drop_relay else (0, 0, 0)
        qp1 = server_cpu(sproc) if sproc else 0.0
        lat = sorted(at.values())
        server = "apache2 + git http-backend over HTTPS" if ca else "git daemon"
        print(f"{args.hosts} agents (daemons) on one {server}, interval {args.interval} "
              f"(jitter 5s), probe {args.probe}, {psutil.cpu_count()} CPUs, "
              f"{psutil.virtual_memory().total >> 30} GiB")
        print(f"started and converged the first commit in {started:.0f}s")
        print(f"idle agent RSS: median {statistics.median(rss) / 2**20:.1f} MB, max "
              f"{max(rss) / 2**20:.1f} MB, total {sum(rss) / 2**30:.2f} GiB; USS (its own "
              f"pages) median {statistics.median(uss) / 2**20:.1f} MB")
        print(f"memory available fell by {(avail0 - avail1) / 2**30:.2f} GiB: "
              f"{per_agent / 2**20:.1f} MB per agent, so about "
              f"{int(avail0 / per_agent) if per_agent > 0 else 0} agents fit in the "
              f"{avail0 / 2**30:.1f} GiB available before they started")
        print(f"idle {args.idle:.0f}s: {c1 - c0} connections ({(c1 - c0) / args.idle:.1f}/s), "
              f"{p1 - p0} probes, {cy1 - cy0} cycles")
        print(f"  server CPU {s1 - s0:.2f}s ({(s1 - s0) / args.idle * 100:.1f}% of a CPU); "
              f"per connection {(s1 - s0) / conns * 1000:.2f} ms CPU, "
              f"{(d1 - d0) / conns:.0f} B sent, {(u1 - u0) / conns:.0f} B received")
        print(f"  agents' CPU {a1 - a0:.2f}s ({(a1 - a0) / args.idle * 100:.1f}% of a CPU) "
              f"for all {args.hosts}")
        if lat:
            print(f"push to converged: 50% {pct(lat, 0.5):.1f}s, 99% {pct(lat, 0.99):.1f}s, "
                  f"100% {lat[-1]:.1f}s ({len(lat)}/{len(socks)} hosts)")
        else:
            print("push to converged: no host converged in time")
        print(f"  during the rollout: server CPU {sp1 - sp0:.2f}s, {cp1 - cp0} connections, "
              f"{(dp1 - dp0) / 2**20:.2f} MiB sent")
        if sproc is not None:
            n = max(r1[0] - r0[0], 1)
            print(f"report drop (sshd, SFTP) idle {args.idle:.0f}s: {r1[0] - r0[0]} sessions "
                  f"({(r1[0] - r0[0]) / args.idle:.1f}/s), sshd CPU {q1 - q0:.2f}s "
                  f"({(q1 - q0) / args.idle * 100:.1f}% of a CPU); per session "
                  f"{(q1 - q0) / n * 1000:.1f} ms CPU, {(r1[2] - r0[2]) / n:.0f} B received, "
                  f"{(r1[1] - r0[1]) / n:.0f} B sent")
            n = max(rp1[0] - rp0[0], 1)
            print(f"report drop during the rollout: {rp1[0] - rp0[0]} sessions, sshd CPU "
                  f"{qp1 - qp0:.2f}s; per session {(qp1 - qp0) / n * 1000:.1f} ms CPU, "
                  f"{(rp1[2] - rp0[2]) / n:.0f} B received, {(rp1[1] - rp0[1]) / n:.0f} B sent")
        per_s = (c1 - c0) / args.idle
        problems = []
        if len(lat) < len(socks):
            problems.append(f"{len(socks) - len(lat)} of {len(socks)} hosts did not apply "
                            f"the push")
        if drop_relay is not None:
            reported = [h for i in range(args.hosts)
                        if (h := f"host-{i:04d}") and _reported(tmp / "drop", h, new)]
            if len(reported) < args.hosts:
                problems.append(f"{args.hosts - len(reported)} of {args.hosts} hosts' "
                                f"reports in the drop do not name the pushed commit")
        if per_s:
            print(f"extrapolated, same mix: 1,000 hosts = {per_s * 1000 / args.hosts:.0f} "
                  f"connections/s, {(s1 - s0) / args.idle * 1000 / args.hosts:.2f} server "
                  f"CPUs, {(d1 - d0) / args.idle * 1000 / args.hosts / 2**20:.2f} MiB/s")
        if problems:
            raise SystemExit("fleet bench failed: " + "; ".join(problems))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if args.reports and sshd is not None:
            sshd.terminate()
        if gitd is not None:
            gitd.terminate()
            try:
                gitd.wait(20)
            except subprocess.TimeoutExpired:
                gitd.kill()
        for i in range(args.hosts):
            try:
                os.unlink(f"/tmp/gf-{os.getpid()}-{i}.sock")
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
