"""The apply journal: no host is ever left between two revisions.

Owns: what is written before the first change of a cycle (the commit, last good, the
plan digest, the phase, and every touched resource's prior state as the kinds snapshot
it), the done marks written right after each of the agent's own changes, and turning
an unfinished journal into a rollback on the next start.
Must not: know any kind (converge.py snapshots and restores through the registry) or
decide about last good (cycle.py does).

Phases: `applying` (resources are being changed) → `trial` (health checks running) →
gone (promoted, or rolled back). A journal found on start, in any phase, is rolled
back: a new commit is never promoted to last good by a restart.
"""

from __future__ import annotations

import time
from typing import Any

from .model import Change
from .state import StateDir


class Journal:
    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.head: dict[str, Any] | None = None

    @property
    def active(self) -> bool:
        return self.head is not None

    def begin(self, commit: str, last_good: str | None, plan: str,
              records: list[dict[str, Any]]) -> None:
        """Persist the prior state (blobs already saved by the snapshots), fsynced, before
        anything on the host changes."""
        self.state.sync_blobs()
        self.state.start_journal_log()
        self.head = {"commit": commit, "last_good": last_good, "plan": plan,
                     "phase": "applying", "started": time.time(), "records": records}
        self.state.save_journal(self.head)

    def mark(self, change: Change, sig: list[int] | None = None) -> None:
        """A change the agent just made, with the stat signature of its own write (and
        what a rollback needs: what was restarted)."""
        if self.head is None:
            return
        entry: dict[str, Any] = {"id": change.id, "action": change.action, "t": time.time()}
        if sig is not None:
            entry["sig"] = sig
        if "notified" in change.data:
            entry["notified"] = change.data["notified"]
        self.state.journal_mark(entry)

    def phase(self, phase: str, **extra: Any) -> None:
        if self.head is None:
            return
        self.state.sync_journal()
        self.head.update(phase=phase, **extra)
        self.state.save_journal(self.head)

    def marks(self) -> list[dict[str, Any]]:
        self.state.sync_journal()
        return self.state.load_journal()[1]

    def close(self) -> None:
        """The cycle is decided (promoted or rolled back): the journal is no longer needed."""
        self.state.clear_journal()
        self.head = None

    @staticmethod
    def unfinished(state: StateDir) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        return state.load_journal()
