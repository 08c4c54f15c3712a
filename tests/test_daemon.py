"""The daemon in-process: real event loop, real signals, real socket, real watchfiles."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import Fleet, write_config

from agent.control import request
from agent.daemon import Daemon
from agent.state import StateDir

# the client runs as uid 65534, which cannot reach a venv's interpreter under /root
OTHER_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else shutil.which("python3")


@pytest.fixture
def denv(tmp_path: Path):
    fleet = Fleet(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    # short and outside pytest's 0700 tree: sun_path is 108 bytes, and another uid must reach it
    sockdir = Path(tempfile.mkdtemp(prefix="ga-sock-"))
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state", interval="1h", jitter="0s",
                       socket=str(sockdir / "agent.sock"))
    yield {"fleet": fleet, "root": root, "cfg": cfg, "sock": str(sockdir / "agent.sock"),
           "state": tmp_path / "state", "tmp": tmp_path}
    shutil.rmtree(sockdir, ignore_errors=True)


async def ask(env: dict, verb: str, **kw) -> dict:
    return await asyncio.to_thread(request, env["sock"], {"verb": verb, **kw}, 60)


async def until(pred, timeout: float = 10.0, step: float = 0.05) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step)
    return time.monotonic() - t0


class Running:
    """Start the daemon as a task in this event loop; stop it with a real SIGTERM."""

    def __init__(self, env: dict) -> None:
        self.env = env
        self.d = Daemon(str(env["cfg"]))
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> Daemon:
        self.task = asyncio.ensure_future(self.d.run())
        await until(lambda: os.path.exists(self.env["sock"]))
        return self.d

    async def __aexit__(self, *exc) -> None:
        if not self.d.stopping:
            os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(self.task, 30) == 0


def test_lifecycle_sync_pause_resume_and_reload(denv):
    async def main():
        async with Running(denv) as d:
            await until(lambda: d.cycles >= 1)
            st = await ask(denv, "status")
            assert st["state"] == "converged" and st["applied_commit"] == denv["fleet"].head()
            assert stat.S_IMODE(os.stat(denv["sock"]).st_mode) == 0o660
            new = denv["fleet"].commit("v2", files={"hosts/web-01.yaml":
                                                    "vars: {worker_processes: 3}\n"}, push=True)
            res = await ask(denv, "sync", wait=True)
            assert res["commit"] == new and res["state"] == "converged"
            assert "worker_processes 3;" in (denv["root"] / "etc/nginx/nginx.conf").read_text()
            assert (await ask(denv, "status"))["applied_commit"] == new

            await ask(denv, "pause", reason="maintenance window")
            st = await ask(denv, "status")
            assert st["state"] == "paused" and st["paused"]["reason"] == "maintenance window"
            with pytest.raises(Exception, match="paused"):
                await ask(denv, "sync")
            # persisted: a new daemon on the same state dir is still paused
            assert json.loads((denv["state"] / "pause.json").read_text())["reason"] == \
                "maintenance window"
            n = d.cycles
            await ask(denv, "resume")
            await until(lambda: d.cycles > n)
            assert (await ask(denv, "status"))["state"] == "converged"

            # SIGHUP with a good config: reloaded
            text = denv["cfg"].read_text()
            denv["cfg"].write_text(text.replace("interval: 1h", "interval: 2h"))
            os.kill(os.getpid(), signal.SIGHUP)
            await until(lambda: d.cfg.interval == 7200)
            # SIGHUP with a bad one: the old config stays, the error shows in status
            denv["cfg"].write_text(text + "bogus_key: 1\n")
            os.kill(os.getpid(), signal.SIGHUP)
            await until(lambda: bool(d.config_error))
            st = await ask(denv, "status")
            assert "unknown key 'bogus_key'" in st["config_error"] and d.cfg.interval == 7200
            hist = await ask(denv, "history")
            assert len(hist) == d.cycles

    asyncio.run(main())


def test_paused_state_survives_a_restart(denv):
    StateDir(str(denv["state"])).ensure()
    (denv["state"] / "pause.json").write_text(json.dumps({"reason": "frozen", "since": 1}))

    async def main():
        async with Running(denv) as d:
            await asyncio.sleep(0.5)
            assert d.cycles == 0
            assert (await ask(denv, "status"))["state"] == "paused"

    asyncio.run(main())


def test_five_triggers_during_a_blocked_cycle_yield_one_more(denv):
    held = StateDir(str(denv["state"]))
    held.lock()  # the boot cycle blocks on the state lock until we let go

    async def main():
        async with Running(denv) as d:
            await until(lambda: d.running)
            for _ in range(5):
                await ask(denv, "sync")
            held.unlock()
            await until(lambda: d.cycles >= 2 and not d.running and not d.pending)
            await asyncio.sleep(0.5)
            assert d.cycles == 2
    try:
        asyncio.run(main())
    finally:
        held.unlock()
    assert len(StateDir(str(denv["state"])).history(0)) == 2


def test_sigterm_during_a_cycle_starts_nothing_new_and_exits_0(denv):
    held = StateDir(str(denv["state"]))
    held.lock()

    async def main():
        d = Daemon(str(denv["cfg"]))
        task = asyncio.ensure_future(d.run())
        await until(lambda: d.running)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.2)
        held.unlock()
        assert await asyncio.wait_for(task, 30) == 0
        assert d.last is not None
        assert all(c.msg == "not applied: shutting down" for c in d.last.changes)
    try:
        asyncio.run(main())
    finally:
        held.unlock()
    assert not (denv["root"] / "etc/motd").exists()


def test_drift_is_corrected_within_two_seconds_without_loops(denv):
    async def main():
        async with Running(denv) as d:
            await until(lambda: d.cycles >= 1 and not d.running)
            await asyncio.sleep(0.3)  # let the watcher arm on the new directories
            motd = denv["root"] / "etc/motd"
            good = motd.read_text()
            motd.write_text("hacked\n")
            took = await until(lambda: motd.read_text() == good, timeout=2.0, step=0.01)
            await until(lambda: not d.running)
            assert d.drift_corrections == 1, took
            os.chmod(denv["root"] / "etc/sysctl.d/60-gitops.conf", 0o600)
            await until(lambda: d.drift_corrections == 2, timeout=2.0)
            cycles = d.cycles
            await asyncio.sleep(1.5)  # the corrections' own writes trigger nothing
            assert d.cycles == cycles
            st = await ask(denv, "status")
            assert st["drift_corrections"] == 2

    asyncio.run(main())


def test_another_uid_is_refused(denv):
    async def main():
        async with Running(denv) as d:
            await until(lambda: d.cycles >= 1)
            os.chmod(Path(denv["sock"]).parent, 0o755)
            os.chmod(denv["sock"], 0o666)  # let it connect, so SO_PEERCRED decides
            code = ("import json, socket, sys; s = socket.socket(socket.AF_UNIX); "
                    f"s.connect({denv['sock']!r}); "
                    "s.sendall(json.dumps({'verb': sys.argv[1]}).encode() + b'\\n'); "
                    "print(s.makefile().readline())")
            for verb in ("sync", "pause", "status"):
                p = await asyncio.to_thread(
                    subprocess.run, [OTHER_PYTHON, "-c", code, verb], capture_output=True,
                    text=True, user=65534, group=65534, cwd="/", env={})
                resp = json.loads(p.stdout)
                assert resp["ok"] is False and "uid 65534 may not" in resp["error"], p
            assert not (denv["state"] / "pause.json").exists()

    asyncio.run(main())


def test_drift_report_mode_logs_and_counts_but_does_not_correct(denv):
    denv["cfg"].write_text(denv["cfg"].read_text() + "drift: report\n")

    async def main():
        async with Running(denv) as d:
            await until(lambda: d.cycles >= 1 and not d.running)
            await asyncio.sleep(0.3)
            motd = denv["root"] / "etc/motd"
            motd.write_text("hand edit\n")
            await until(lambda: d.watcher.reported == 1, timeout=2.0)
            await asyncio.sleep(0.5)
            assert motd.read_text() == "hand edit\n" and d.cycles == 1
            st = await ask(denv, "status")
            assert st["drift_detected"] == 1 and st["drift_corrections"] == 0

    asyncio.run(main())


def test_fetch_failures_back_off_and_converge_last_good(denv):
    async def main():
        async with Running(denv) as d:
            await until(lambda: d.cycles >= 1 and not d.running)
            shutil.move(str(denv["fleet"].bare), str(denv["tmp"] / "gone.git"))
            (denv["root"] / "etc/motd").write_text("drift while offline\n")
            await ask(denv, "sync", wait=True)
            assert d.backoff == 5.0 and d.offline_since is not None
            assert d.next_at - time.time() <= 5.5  # retry soon, not after the 1h interval
            await ask(denv, "sync", wait=True)
            assert d.backoff == 10.0
            st = await ask(denv, "status")
            assert st["state"] == "offline" and "fleet.git" in st["offline_reason"]
            assert "managed by gitops-agent" in (denv["root"] / "etc/motd").read_text()
            # a drift correction while offline: still offline, and counted once
            before, corrections = d.cycles, d.drift_corrections
            (denv["root"] / "etc/motd").write_text("drift again while offline\n")
            await until(lambda: d.cycles > before and not d.running, timeout=10)
            assert d.drift_corrections == corrections + 1
            st = await ask(denv, "status")
            assert st["state"] == "offline" and "fleet.git" in st["offline_reason"]
            shutil.move(str(denv["tmp"] / "gone.git"), str(denv["fleet"].bare))
            await ask(denv, "sync", wait=True)
            assert d.backoff == 0 and d.offline_since is None

    asyncio.run(main())


def test_run_with_an_unusable_socket_path_fails_clearly(tmp_path):
    from conftest import agent

    cfg = write_config(tmp_path / "a.yaml", url=tmp_path / "none.git", root=tmp_path,
                       state_dir=tmp_path / "state", socket="/proc/nonexistent/agent.sock")
    p = agent("run", "--config", str(cfg), check=1)
    assert "cannot listen on /proc/nonexistent/agent.sock" in p.stderr


def test_sigterm_stops_a_daemon_stuck_in_a_template_loop(denv):
    """A template that loops for minutes must not keep the daemon from stopping (the
    Running context asserts a clean exit within 30 s of SIGTERM), and the watchdog is
    fed only while the cycle makes progress."""
    denv["fleet"].commit("loop", push=True, files={
        "files/loop.j2": "{% for i in range(100000) %}{% for j in range(100000) %}"
                         "{% endfor %}{% endfor %}\n",
        "hosts/web-01.yaml": "files:\n  /etc/loop: {template: loop.j2}\n"})

    async def main():
        async with Running(denv) as d:
            await until(lambda: d.running, timeout=20)
            await asyncio.sleep(1.5)
            assert d.running  # still rendering: the template really loops
            assert d.watchdog_ok()  # the render child is polled: progress
            d.progress_at -= 10_000  # a cycle that stopped asking for hours
            assert not d.watchdog_ok()

    asyncio.run(main())


HOLDER = r"""
import resource, socket, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"""


def test_control_socket_survives_a_flood_of_idle_connections(denv, caplog):
    """1,100 idle connections (from another process) must not starve the daemon: past
    the cap they are answered "busy", cycles and SIGHUP still work, and once they are
    gone the socket answers again. Bad arguments get an error reply, not a traceback."""
    async def main():
        async with Running(denv) as d:
            await until(lambda: d.cycles >= 1)
            holder = subprocess.Popen([OTHER_PYTHON, "-c", HOLDER, denv["sock"], "1100"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                line = await asyncio.to_thread(holder.stdout.readline)
                assert line.strip() == "1100"
                with pytest.raises(Exception, match="busy"):
                    await ask(denv, "status")
                before = d.cycles
                d.trigger("test")
                await until(lambda: d.cycles > before, timeout=20)
                os.kill(os.getpid(), signal.SIGHUP)
                await asyncio.sleep(0.3)
                assert not d.config_error
            finally:
                holder.stdin.close()
                holder.wait(10)
            await until(lambda: d.control.clients == 0, timeout=10)
            # the reload may have started a cycle: the socket answers while it runs
            assert (await ask(denv, "status"))["host"] == "web-01"
            await until(lambda: not d.running and not d.pending, timeout=20)
            assert (await ask(denv, "status"))["state"] == "converged"
            with pytest.raises(Exception, match="history n must be a whole number"):
                await ask(denv, "history", n="abc")
            assert (await ask(denv, "status"))["host"] == "web-01"  # still serving

    asyncio.run(main())
    assert "Traceback" not in caplog.text


def test_a_client_that_never_reads_is_dropped(denv, monkeypatch):
    from agent import control

    monkeypatch.setattr(control, "SEND_TIMEOUT", 0.5)
    monkeypatch.setattr(control, "WRITE_BUFFER", 1024)

    async def main():
        async with Running(denv) as d:
            await until(lambda: d.cycles >= 1)
            s = socket.socket(socket.AF_UNIX)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(denv["sock"])
            s.setblocking(False)
            try:
                for _ in range(2000):  # ask again and again, never read the answers
                    try:
                        s.send(b'{"verb": "status"}\n')
                    except BlockingIOError:
                        await asyncio.sleep(0.01)
                    except OSError:
                        break
                await until(lambda: d.control.clients == 0, timeout=10)
            finally:
                s.close()

    asyncio.run(main())


def test_one_hand_edit_is_one_drift_correction():
    """A drifted file that notifies a service: the file is the correction, the restart
    it causes (and a daemon-reload) are not counted again."""
    from agent.cycle import CycleResult
    from agent.daemon import drift_fixes
    from agent.resources import Change

    r = CycleResult(started=0.0)
    r.changes = [Change("file[/etc/app.conf]", changed=True, action="update"),
                 Change("service[app.service]", changed=True, action="restart"),
                 Change("systemd[daemon-reload]", changed=True),
                 Change("file[/etc/motd]", msg="as declared")]
    assert [c.id for c in drift_fixes(r)] == ["file[/etc/app.conf]"]


def test_status_says_verifying_during_a_trial_then_rolled_back(denv, tmp_path):
    """Issue 10 through the socket: the daemon shows `verifying` while a new revision is
    on trial, then `rolled-back` with the failing check, and the human status says so."""
    gate = tmp_path / "healthy-until"
    gate.write_text("")

    async def main():
        async with Running(denv) as d:
            await until(lambda: d.cycles >= 1)
            fleet = denv["fleet"]
            fleet.commit("on trial", push=True, files={
                "fleet.yaml": "health: {window: 8s, timeout: 16s, interval: 0.2s}\n"
                              + (fleet.work / "fleet.yaml").read_text(),
                "roles/web.yaml": (fleet.work / "roles/web.yaml").read_text().replace(
                    "hello from", "trial of")
                + f"checks:\n  gate: {{command: [/usr/bin/test, -e, {gate}]}}\n"})
            n = d.cycles
            await ask(denv, "sync")
            await until(lambda: d.phase == "verifying" and d.running, timeout=30)
            assert (await ask(denv, "status"))["state"] == "verifying"
            gate.unlink()  # the check starts failing in the middle of the window
            # (the rollback's own writes may trigger one drift cycle: it stays rolled back)
            await until(lambda: d.cycles > n and not d.running and d.last is not None
                        and d.last.state == "rolled-back", timeout=90)
            st = d.status()
            assert st["state"] == "rolled-back" and st["rollbacks"] == 1
            assert st["trial"]["failing"]["name"] == "gate"
            assert [q["commit"] for q in st["quarantine"]] == [fleet.head()]
            return st

    st = asyncio.run(main())
    from agent.cli import human_status

    text = human_status(st)
    assert "rolled back:" in text and "FAIL gate" in text and "quarantined:" in text
