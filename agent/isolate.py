"""Run one pure, untrusted-input computation (rendering) in a forked child, bounded.

Owns: the fork, the child's address-space limit (RLIMIT_AS), the deadline, progress
lines from the child (what it is working on, for the error when it runs out of time),
and handing the pickled result or error back.
Must not: know what is computed. A template that loops for ever or grows without end
costs one killed child and a one-line error; the agent itself stays responsive.
"""

from __future__ import annotations

import os
import resource
import select
import signal
import time
from collections.abc import Callable
from typing import Any

from .errors import AgentError, Exhausted


def _vsize() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def unbounded_exec() -> None:
    """preexec_fn for a program the bounded child runs: its own address space is not
    the template's to bound (its run time is, by its caller's timeout)."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def _die_with_parent() -> None:
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run(fn: Callable[[Callable[[str], None]], Any], *, timeout: float, memory: int | None,
        should_stop: Callable[[], bool] = lambda: False) -> Any:
    """fn(progress) in a child; returns its result or re-raises its AgentError.

    `memory` is what the child may add to the address space it starts with.
    """
    import pickle  # here, not at the top: a no-op cycle never forks and never pays for it
    r, w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller's code
        code = 0
        try:
            os.close(r)
            # dies with the agent: a killed agent's child must not hold the state lock
            # (inherited with the fork) while it renders on for nobody
            _die_with_parent()
            if os.getppid() != parent:
                os._exit(70)
            # the daemon's signal handlers and its event loop's wakeup fd are not this
            # child's: a signal here must not look like one to the agent
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            if memory is not None:
                # the soft limit only: a helper the child runs (sops, a Go program that
                # reserves address space freely) may lift it for itself (unbounded_exec)
                limit = _vsize() + memory
                hard = resource.getrlimit(resource.RLIMIT_AS)[1]
                resource.setrlimit(resource.RLIMIT_AS, (limit, hard))

            def progress(text: str) -> None:
                os.write(w, b"P" + text.encode(errors="replace").replace(b"\n", b" ") + b"\n")

            try:
                out = (b"R", pickle.dumps(fn(progress)))
            except AgentError as e:
                out = (b"E", pickle.dumps(e))
            except MemoryError:
                out = (b"M", b"")
            data = out[0] + len(out[1]).to_bytes(8, "big") + out[1]
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(w)
    buf = bytearray()
    last = ""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Exhausted(f"took longer than {timeout:g}s" + (f" (at {last})" if last
                                                                   else ""))
            if should_stop():
                raise Exhausted("stopped: the agent is shutting down")
            ready, _, _ = select.select([r], [], [], min(left, 0.2))
            if not ready:
                continue
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            buf += chunk
            while buf[:1] == b"P" and b"\n" in buf:
                line, _, rest = bytes(buf).partition(b"\n")
                last = line[1:].decode(errors="replace")
                buf = bytearray(rest)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        raise
    os.close(r)
    _, status = os.waitpid(pid, 0)
    tag = bytes(buf[:1])
    body = bytes(buf[9:9 + int.from_bytes(buf[1:9], "big")]) if len(buf) >= 9 else b""
    if tag == b"R":
        return pickle.loads(body)  # noqa: S301 - our own child's output
    if tag == b"E":
        raise pickle.loads(body)  # noqa: S301
    if tag == b"M":
        raise Exhausted(f"ran out of memory (more than {(memory or 0) >> 20} MiB)"
                        + (f" (at {last})" if last else ""))
    why = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
           else f"exited {os.WEXITSTATUS(status)}")
    raise Exhausted(f"failed ({why})" + (f" (at {last})" if last else ""))
