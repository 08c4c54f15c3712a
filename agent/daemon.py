"""The asyncio supervisor: `gitops-agent run`.

Owns: startup → main loop → shutdown; the triggers (timer with per-host splay and
jitter, socket sync, drift events, SIGHUP, boot) and their coalescing into at most one
pending cycle; exponential back-off of fetch failures; the drift watcher; pause and
resume (persisted); sd_notify (READY, STATUS, WATCHDOG, STOPPING); signals.
Must not: block the event loop. A cycle runs in a worker thread (run_cycle), so the
control socket keeps answering during a long cycle.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import signal
import socket
import time
from typing import Any

from . import report
from .config import Config, load_file
from .control import ControlServer
from .cycle import CycleResult, host_identity, run_cycle
from .drift import DriftWatcher
from .errors import AgentError, UsageError
from .state import StateDir

log = logging.getLogger("agent.daemon")

BACKOFF_START = 5.0
# A cycle that has not asked should_stop() for this long is wedged: the longest single
# step that cannot ask is one apt-get run (its own timeout is 30 min).
STALLED_AFTER = 1900.0


def notify(message: str) -> None:
    """sd_notify through systemd-python when it is there, else the raw datagram."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from systemd import daemon as sd  # type: ignore[import-not-found]

        sd.notify(message)
        return
    except ImportError:
        pass
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), addr)
        except OSError:
            pass


def splay(host: str, interval: float) -> float:
    """A stable per-host phase within the interval, so a fleet does not poll in lockstep."""
    h = int.from_bytes(hashlib.sha256(host.encode()).digest()[:8], "big")
    return (h % 10_000) / 10_000 * interval


def drift_fixes(result: CycleResult) -> list:
    """The changes of a drift cycle that count as corrections: one per drifted resource,
    not the restart or reload it notified, nor a daemon-reload after a unit file."""
    return [c for c in result.changes if c.changed and not c.failed
            and c.action not in ("restart", "reload") and not c.id.startswith("systemd[")]


class Daemon:
    def __init__(self, config_path: str, cfg: Config | None = None) -> None:
        self.config_path = config_path
        self.cfg = cfg or load_file(config_path)
        self.host = host_identity(self.cfg)[0]
        self.wake = asyncio.Event()
        self.pending: set[str] = set()
        self.running = False
        self.phase = "applying"  # or "verifying" while a new revision is on trial
        self.progress_at = 0.0
        self.stopping = False
        self.stopped = asyncio.Event()
        self.cycles = 0
        self.drift_corrections = 0
        self.config_error = ""
        self.last: CycleResult | None = None
        self.offline_since: float | None = None
        self.backoff = 0.0
        self.next_at: float = 0.0
        self.waiters: list[asyncio.Future] = []
        self.control: ControlServer | None = None
        self.watcher: Any = None
        self.tasks: set[asyncio.Task] = set()
        self._sigint = 0
        self._flushing = False
        self._flush_again = False  # a report was queued while a flush was under way
        self._reported = ""  # report.material() of the last report queued for the drop
        self.probes = 0  # change probes sent (source.probe_interval)
        self._probe_approvals: str | None = None  # the tip's approval refs, last probe
        self.probe_hits = 0  # probes that found the branch moved

    # --- triggers ----------------------------------------------------------------------

    def trigger(self, reason: str) -> None:
        """Ask for a cycle. Any number of triggers while one runs yields one more cycle."""
        self.pending.add(reason)
        self.wake.set()

    def _next_timer(self, now: float) -> float:
        interval = max(self.cfg.interval, 1.0)
        if self.backoff:
            return now + self.backoff
        phase = splay(self.host, interval)
        slot = ((now - phase) // interval + 1) * interval + phase
        slot += random.uniform(0, self.cfg.jitter)
        # a tip waiting for this host's wave or window: look again when it opens
        opens = (self.last.rollout or {}).get("opens_at") if self.last is not None else None
        if opens and now < opens < slot:
            return opens + 1.0
        return slot

    # --- pause -------------------------------------------------------------------------

    def paused(self) -> dict | None:
        return StateDir(self.cfg.state_dir).load_pause()

    def pause(self, reason: str, uid: int) -> dict:
        data = StateDir(self.cfg.state_dir).save_pause(reason or "paused by operator", uid)
        log.warning("daemon: paused by uid %d: %s", uid, data["reason"],
                    extra={"STAGE": "pause"})
        return data

    def resume(self) -> None:
        StateDir(self.cfg.state_dir).clear_pause()
        log.info("daemon: resumed", extra={"STAGE": "pause"})
        self.trigger("resume")

    # --- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        last = self.last
        paused = self.paused()
        live: dict[str, Any] = {
            "offline_since": self.offline_since, "next_cycle_at": self.next_at or None,
            "drift_corrections": self.drift_corrections, "cycles": self.cycles,
            "probes": self.probes, "probe_hits": self.probe_hits,
            "drift_detected": self.watcher.reported if self.watcher is not None else 0,
            "paused": paused, "config_error": self.config_error}
        if paused:
            live["state"] = "paused"
        elif self.running:
            live["state"] = self.phase
        return report.status_json(self.cfg, last, **live)

    # --- control socket verbs -----------------------------------------------------------

    async def handle(self, verb: str, req: dict, uid: int) -> Any:
        if verb == "status":
            return self.status()
        if verb == "history":
            return StateDir(self.cfg.state_dir).history(int(req.get("n", 20)))
        if verb == "pause":
            data = self.pause(str(req.get("reason", "")), uid)
            return {"message": f"paused: {data['reason']}"}
        if verb == "resume":
            self.resume()
            return {"message": "resumed; a cycle is starting"}
        if verb == "plan":
            result, _ = await asyncio.to_thread(run_cycle, self.cfg, dry_run=True,
                                                lock_wait=600)
            return result.to_json()
        if verb == "sync":
            paused = self.paused()
            if paused:
                raise AgentError(f"paused ({paused.get('reason')}); `gitops-agent resume` first")
            if self.stopping:
                raise AgentError("the agent is shutting down")
            fut: asyncio.Future = asyncio.get_running_loop().create_future()
            if req.get("wait"):
                self.waiters.append(fut)
            self.trigger("sync")
            if req.get("wait"):
                return await fut
            return {"message": "sync requested"}
        raise AgentError(f"unknown verb {verb}")

    # --- the loop ----------------------------------------------------------------------

    def _on_phase(self, phase: str) -> None:
        """From the cycle's worker thread: the new revision is on trial."""
        self.phase = phase
        notify(f"STATUS={phase}: health checks of a new revision")

    async def _cycle(self, reasons: set[str]) -> None:
        fetch = reasons != {"drift"}
        waiters, self.waiters = self.waiters, []
        self.running = True
        self.phase = "applying"
        notify("STATUS=applying")
        try:
            self.progress_at = time.monotonic()
            result, _ = await asyncio.to_thread(
                run_cycle, self.cfg, fetch=fetch, lock_wait=3600,
                should_stop=self._should_stop, on_phase=self._on_phase)
        except AgentError as e:
            result = CycleResult(started=time.time(), finished=time.time())
            result.errors.append(str(e))
            log.error("daemon: cycle failed: %s", e, extra={"STAGE": "cycle"})
        except Exception as e:  # a bug must fail this cycle, not kill the host's agent
            result = CycleResult(started=time.time(), finished=time.time())
            result.errors.append(f"internal error: {type(e).__name__}: {e}")
            log.exception("daemon: cycle crashed", extra={"STAGE": "cycle"})
        finally:
            self.running = False
        self.cycles += 1
        if not fetch and self.offline_since and self.last is not None and result.ok:
            # a no-fetch (drift) cycle knows nothing new about the source: still offline
            result.offline = True
            result.offline_reason = self.last.offline_reason
            if result.state == "converged":
                result.state = "offline"
        if not fetch and self.last is not None and self.last.waiting and result.ok \
                and result.state == "converged":
            # nor about the tip that waits for its wave or window
            result.waiting, result.rollout = self.last.waiting, self.last.rollout
            result.awaiting, result.approvals = self.last.awaiting, self.last.approvals
            result.state = "awaiting-approval" if result.awaiting else "waiting"
        self.last = result
        if "drift" in reasons:
            fixed = drift_fixes(result)
            self.drift_corrections += len(fixed)
            for c in fixed:
                log.warning("drift: %s corrected: %s", c.id, c.msg,
                            extra={"RESOURCE": c.id, "COMMIT": result.commit or "",
                                   "STAGE": "drift"})
        if fetch:
            if result.offline:
                self.offline_since = self.offline_since or result.started
                self.backoff = min(self.cfg.interval, max(BACKOFF_START, self.backoff * 2))
            else:
                self.offline_since = None
                self.backoff = 0.0
        notify(f"STATUS={self._summary()}")
        for fut in waiters:
            if not fut.done():
                fut.set_result(result.to_json())
        if self.watcher is not None:
            self.watcher.refresh()
        self._report(heartbeat=False)

    def _report(self, heartbeat: bool = True) -> None:
        """Hand the status to the report sinks; never delays or fails a cycle. After a
        cycle the drop gets a report only when something in it that a fleet view reads
        changed (a no-op poll every 30 s from every host would be an SSH session each);
        the heartbeat sends one regardless, so a silent host still shows up as stale."""
        try:
            status = self.status()
            material = report.material(status)
            queue = heartbeat or material != self._reported
            report.after_cycle(self.cfg, status, self.last, queue=queue)
        except Exception as e:  # noqa: BLE001 - reporting must never break the daemon
            log.warning("report: %s", e, extra={"STAGE": "report"})
            return
        if queue:
            self._reported = material
        if queue and self.cfg.report.sftp is not None:
            if self._flushing:
                self._flush_again = True  # the flush under way may have read the queue
            else:
                self._flushing = True  # set before the task runs: one flush at a time
                self._spawn(self._flush())

    async def _flush(self) -> None:
        try:
            again = True
            while again:  # once more for a report queued while this one was sending
                self._flush_again = False
                sent = await asyncio.wait_for(report.flush_sftp(self.cfg, self.host), 60)
                if sent:
                    log.info("report: sent %d report(s) to %s", sent,
                             self.cfg.report.sftp.host, extra={"STAGE": "report"})
                again = self._flush_again
        except Exception as e:  # noqa: BLE001 - unreachable: the queue keeps them
            log.warning("report: sftp to %s failed, reports stay queued: %s",
                        self.cfg.report.sftp.host, e or type(e).__name__,
                        extra={"STAGE": "report"})
        finally:
            self._flushing = False

    async def _heartbeat(self) -> None:
        """Report even when nothing happens, so a silent host shows up as stale."""
        while not self.stopping:
            await asyncio.sleep(self.cfg.report.heartbeat)
            if self.cfg.report.sftp is not None or self.cfg.report.metrics_textfile:
                self._report()

    async def _prober(self) -> None:
        """source.probe_interval: between full cycles, ask the server for the branch's
        tip only (one ref advertisement, no pack, no state lock) and run a full cycle
        when it moved. Jittered by ±20% so a fleet does not probe in lockstep."""
        from .source import probe

        while not self.stopping:
            every = self.cfg.source.probe_interval
            if not every:
                await asyncio.sleep(5.0)  # off; a reload may turn it on
                continue
            await asyncio.sleep(max(every, 0.5) * random.uniform(0.8, 1.2))
            if self.stopping or self.running or self.pending or self.backoff or self.paused():
                continue
            cfg = self.cfg
            self.probes += 1
            tip, local, why, approvals = await asyncio.to_thread(
                probe, os.path.join(cfg.state_dir, "mirror.git"), cfg.source,
                lambda: self.stopping)
            if tip is None:
                log.debug("probe: %s", why, extra={"STAGE": "probe"})
                continue
            seen, self._probe_approvals = self._probe_approvals, approvals
            awaiting = self.last is not None and self.last.awaiting
            if tip != local or (awaiting and seen is not None and approvals != seen):
                self.probe_hits += 1
                what = "moved to" if tip != local else "has new approvals for"
                log.info("probe: %s %s %s: running a cycle", cfg.source.branch, what,
                         tip[:12], extra={"STAGE": "probe", "COMMIT": tip})
                self.trigger("probe")

    def _summary(self) -> str:
        r = self.last
        if r is None:
            return "starting"
        text = (f"{r.state} @{(r.commit or '-')[:7]}: {r.changed} changed, {r.failed} failed, "
                f"drift fixed {self.drift_corrections}")
        return text + (f"; {self.config_error}" if self.config_error else "")

    async def main_loop(self) -> None:
        self.trigger("boot")
        while not self.stopping:
            now = time.time()
            if not self.pending:
                self.next_at = self._next_timer(now)
            timeout = max(0.0, self.next_at - now) if not self.pending else 0
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=timeout)
            except TimeoutError:
                self.pending.add("timer")
            if self.stopping:
                break
            self.wake.clear()
            reasons, self.pending = self.pending, set()
            if self.paused() and reasons - {"resume"}:
                continue
            await self._cycle(reasons)

    def _should_stop(self) -> bool:
        """Asked by the cycle between resources and while it waits for a fetch or a
        render child: each call is also proof that the cycle makes progress."""
        self.progress_at = time.monotonic()
        return self.stopping

    def watchdog_ok(self) -> bool:
        return not self.running or time.monotonic() - self.progress_at < STALLED_AFTER

    async def _watchdog(self) -> None:
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if not usec:
            return
        while not self.stopping:
            # from the event loop (a blocked loop stops the pings), and only while a
            # running cycle makes progress: a wedged cycle gets the agent restarted
            if self.watchdog_ok():
                notify("WATCHDOG=1")
            await asyncio.sleep(usec / 2e6)

    def reload(self) -> None:
        try:
            cfg = load_file(self.config_path)
        except AgentError as e:
            self.config_error = f"reload failed, kept the running config: {e}"
            log.error("daemon: %s", self.config_error, extra={"STAGE": "reload"})
            notify(f"STATUS={self._summary()}")
            return
        self.cfg = cfg
        self.host = host_identity(cfg)[0]
        self.config_error = ""
        log.info("daemon: reloaded %s", self.config_path, extra={"STAGE": "reload"})
        if self.watcher is not None:
            self.watcher.configure(cfg)
        self.trigger("sighup")

    def stop(self) -> None:
        if not self.stopping:
            log.info("daemon: stopping: finishing the resource in progress",
                     extra={"STAGE": "shutdown"})
            notify("STOPPING=1")
        self.stopping = True
        self.wake.set()

    def _on_sigint(self) -> None:
        self._sigint += 1
        if self._sigint > 1:
            log.error("daemon: second SIGINT: exiting now", extra={"STAGE": "shutdown"})
            os._exit(130)
        self.stop()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            # startup: state readable, socket listening, watcher armed, then READY
            sd = StateDir(self.cfg.state_dir)
            sd.ensure()
            sd.load_state()
            self.control = ControlServer(self.cfg.socket, self.handle)
            try:
                await self.control.start()
            except OSError as e:
                raise AgentError(f"daemon: cannot listen on {self.cfg.socket}: "
                                 f"{e.strerror or e}") from None
            if self.cfg.drift != "off":
                self.watcher = DriftWatcher(self)
                self.watcher.configure(self.cfg)
                self._spawn(self.watcher.run())
            self._spawn(self._watchdog())
            self._spawn(self._heartbeat())
            self._spawn(self._prober())
            notify("READY=1")
            notify("STATUS=started")
            log.info("daemon: ready on %s (host %s, interval %ss)", self.cfg.socket, self.host,
                     self.cfg.interval, extra={"STAGE": "startup"})
            await self.main_loop()
            return 0
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self.watcher is not None:
                self.watcher.close()
            for t in self.tasks:
                t.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for fut in self.waiters:
                if not fut.done():
                    fut.set_exception(AgentError("the agent stopped before the cycle ran"))
            if self.control is not None:
                await self.control.close()
            self.stopped.set()
            log.info("daemon: stopped", extra={"STAGE": "shutdown"})

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def main(config_path: str) -> int:
    try:
        daemon_cfg = load_file(config_path)
    except AgentError as e:
        raise UsageError(str(e)) from None
    return asyncio.run(Daemon(config_path, daemon_cfg).run())
