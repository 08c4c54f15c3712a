"""Logging: journald with structured fields under systemd, stderr otherwise.

Owns: handler setup. Structured fields (COMMIT, RESOURCE, STAGE) are passed with
`extra=` by the stage modules and become journal fields.
"""

from __future__ import annotations

import logging
import os
import sys


class _JournalHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        from systemd import journal  # type: ignore[import-not-found]

        self._send = journal.send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {k: str(getattr(record, k)) for k in ("COMMIT", "RESOURCE", "STAGE")
                      if getattr(record, k, "")}
            prio = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                    logging.ERROR: 3, logging.CRITICAL: 2}.get(record.levelno, 6)
            self._send(self.format(record), PRIORITY=str(prio), LOGGER=record.name,
                       SYSLOG_IDENTIFIER="gitops-agent", **fields)
        except Exception:  # noqa: BLE001 - logging must never break a cycle
            self.handleError(record)


def under_journald() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def setup(level: int = logging.INFO, journal: bool | None = None) -> None:
    root = logging.getLogger("agent")
    root.setLevel(level)
    root.handlers.clear()
    root.propagate = False
    handler: logging.Handler | None = None
    if journal if journal is not None else under_journald():
        try:
            handler = _JournalHandler()
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root.addHandler(handler)
