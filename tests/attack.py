"""A real unprivileged local user racing the agent: a forked child that drops to an
unused uid (no passwd entry needed: the kernel's checks are what matter) and swaps
two names with renameat2(RENAME_EXCHANGE) in a loop, as an attacker who owns a
directory the agent writes into would."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable

ATTACKER_UID = 4242
_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: str, b: str) -> bool:
    return _libc.renameat2(_AT_FDCWD, a.encode(), _AT_FDCWD, b.encode(), _RENAME_EXCHANGE) == 0


class Racer:
    """Run `step` over and over as uid ATTACKER_UID in a child until stopped."""

    def __init__(self, step: Callable[[], None]) -> None:
        self.step = step
        self.pid = 0

    def __enter__(self) -> Racer:
        self.pid = os.fork()
        if self.pid == 0:  # the attacker
            try:
                os.setgroups([])
                os.setresgid(ATTACKER_UID, ATTACKER_UID, ATTACKER_UID)
                os.setresuid(ATTACKER_UID, ATTACKER_UID, ATTACKER_UID)
                deadline = time.monotonic() + 120  # never outlive a broken test
                while time.monotonic() < deadline:
                    try:
                        self.step()
                    except OSError:
                        pass
            finally:
                os._exit(0)
        return self

    def __exit__(self, *exc: object) -> None:
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
