"""The drift watcher: watchfiles on the directories of managed paths under root.

Owns: which directories to watch (the parents of every path in the applied
manifest), telling the agent's own writes from someone else's (a path whose stat
signature still equals the one recorded after the agent wrote it is the agent's own
write), and triggering a no-fetch cycle (`drift: correct`) or only logging and counting
(`drift: report`).
Must not: change anything itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from .errors import AgentError
from .host import Host
from .resources.files import signature
from .state import StateDir

log = logging.getLogger("agent.drift")


class DriftWatcher:
    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.mode = "correct"
        self.host: Any = None
        self.state_dir = ""
        self.managed: dict[str, tuple[str, list | None]] = {}  # full path -> (id, sig)
        self.dirs: set[str] = set()
        self._restart = asyncio.Event()
        self._stop = asyncio.Event()
        self.reported = 0

    def configure(self, cfg: Any) -> None:
        self.mode = cfg.drift
        self.host = Host(cfg.root)
        self.state_dir = cfg.state_dir
        self.refresh()

    def refresh(self) -> None:
        """Re-read the manifest: the managed set and their signatures after the last cycle."""
        try:
            manifest = StateDir(self.state_dir).load_manifest()
        except AgentError:
            return
        managed = {}
        for ident, entry in manifest.get("resources", {}).items():
            name = entry.get("path")
            if not name:
                continue  # not a path: nothing on disk to watch
            full = self.host.join(name)
            managed[full] = (ident, entry.get("sig"))
        self.managed = managed
        dirs = {os.path.dirname(p) for p in managed} | {
            p for p, (i, _) in managed.items() if i.startswith("directory[")}
        dirs = {d for d in dirs if os.path.isdir(d)}
        if dirs != self.dirs:
            self.dirs = dirs
            self._restart.set()

    def drifted(self, path: str) -> str | None:
        """The identity of a managed path that no longer has its recorded signature."""
        hit = self.managed.get(path)
        if hit is None:
            return None
        ident, sig = hit
        if signature(path) == sig:
            return None  # our own write (or a no-op touch that changed nothing)
        return ident

    async def run(self) -> None:
        import watchfiles

        while not self._stop.is_set():
            if not self.dirs:
                self._restart.clear()
                await self._wait_restart()
                continue
            self._restart.clear()
            stop = asyncio.Event()
            watch = asyncio.ensure_future(self._watch(watchfiles, sorted(self.dirs), stop))
            await self._wait_restart()
            stop.set()
            await asyncio.gather(watch, return_exceptions=True)

    async def _wait_restart(self) -> None:
        done, pending = await asyncio.wait(
            [asyncio.ensure_future(self._restart.wait()), asyncio.ensure_future(self._stop.wait())],
            return_when=asyncio.FIRST_COMPLETED)
        for p in pending:
            p.cancel()

    async def _watch(self, watchfiles: Any, dirs: list[str], stop: asyncio.Event) -> None:
        async for changes in watchfiles.awatch(*dirs, stop_event=stop, debounce=50, step=20,
                                               recursive=False, yield_on_timeout=False):
            if self.daemon.running:
                continue  # the cycle in progress re-checks everything it manages anyway
            hits = sorted({i for _, p in changes if (i := self.drifted(p))})
            if not hits:
                continue
            self.reported += len(hits)
            if self.mode == "report":
                for ident in hits:
                    log.warning("drift: %s changed on the host (drift: report, not corrected)",
                                ident, extra={"RESOURCE": ident, "STAGE": "drift"})
                continue
            log.info("drift: %s changed on the host; re-converging", ", ".join(hits),
                     extra={"STAGE": "drift"})
            self.daemon.trigger("drift")

    def close(self) -> None:
        self._stop.set()
