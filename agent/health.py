"""Health checks and the trial of a new revision.

Owns: running one check (systemd, http, tcp, command, fetch: each bounded by its
timeout, commands without a shell), the trial (every required check must hold
continuously for `window`, within `timeout`, looked at every `interval`; a service the
revision started, restarted or reloaded must stay active and must not restart), and
the result of each check with the tail of its output.
Must not: decide what a failed trial means (cycle.py rolls back and quarantines) or
change anything on the host.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

TAIL = 2000  # bytes of output kept per check (reports, status)


@dataclass
class CheckResult:
    name: str
    ok: bool
    required: bool = True
    output: str = ""
    type: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "required": self.required,
                "output": self.output, "type": self.type}


@dataclass
class Trial:
    ok: bool
    results: list[CheckResult] = field(default_factory=list)
    failing: CheckResult | None = None
    seconds: float = 0.0
    stopped: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": round(self.seconds, 3),
                "failing": self.failing.to_json() if self.failing else None,
                "checks": [r.to_json() for r in self.results]}


def _tail(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-TAIL:].strip()


def implicit(unit: str) -> dict[str, Any]:
    """The check every service the revision started, restarted or reloaded gets."""
    return {"name": f"service:{unit}", "type": "systemd", "unit": unit, "timeout": 10.0,
            "required": True, "no_restart": True}


def service_state(unit: str, timeout: float) -> tuple[str, int, str]:
    """ActiveState, NRestarts and SubState of a unit on this machine's systemd."""
    r = subprocess.run(["systemctl", "show", "-p", "ActiveState,SubState,NRestarts,Result",
                        "--", unit], capture_output=True, timeout=timeout, check=False)
    kv = dict(line.split("=", 1) for line in r.stdout.decode(errors="replace").splitlines()
              if "=" in line)
    restarts = kv.get("NRestarts", "0")
    return (kv.get("ActiveState", "unknown"), int(restarts) if restarts.isdigit() else 0,
            f"{kv.get('ActiveState', '?')}/{kv.get('SubState', '?')} "
            f"(result {kv.get('Result', '?')}, restarts {restarts})")


class Runner:
    """Runs checks; remembers each service's restart count when it is first seen."""

    def __init__(self, fetch: Callable[[], str] | None = None) -> None:
        self.fetch = fetch  # returns "" when the source was reached, else why not
        self.restarts: dict[str, int] = {}

    def run(self, spec: dict[str, Any]) -> CheckResult:
        kind = spec["type"]
        res = CheckResult(spec["name"], False, spec.get("required", True), "", kind)
        timeout = float(spec.get("timeout", 10.0))
        try:
            res.ok, res.output = getattr(self, "_" + kind)(spec, timeout)
        except subprocess.TimeoutExpired:
            res.output = f"timed out after {timeout:g}s"
        except FileNotFoundError as e:
            res.output = f"{e.filename or e}: not found"
        except (OSError, ValueError) as e:
            res.output = f"{type(e).__name__}: {e}"
        res.output = _tail(res.output)
        return res

    def _systemd(self, spec: dict[str, Any], timeout: float) -> tuple[bool, str]:
        unit = spec["unit"]
        active, restarts, text = service_state(unit, timeout)
        base = self.restarts.setdefault(unit, restarts)
        if active != "active":
            return False, f"{unit} is {text}"
        if spec.get("no_restart") and restarts != base:
            return False, f"{unit} restarted {restarts - base} time(s) during the trial: {text}"
        return True, f"{unit} is {text}"

    def _http(self, spec: dict[str, Any], timeout: float) -> tuple[bool, str]:
        # here, not at the top: http.client and ssl cost ~20 ms of start-up, and a
        # no-op cycle never runs a check
        import http.client
        import ssl
        import urllib.parse

        url = urllib.parse.urlsplit(spec["url"])
        if url.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                url.hostname or "", url.port, timeout=timeout,
                context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout)
        try:
            conn.request("GET", (url.path or "/") + (f"?{url.query}" if url.query else ""),
                         headers={"User-Agent": "gitops-agent-health"})
            resp = conn.getresponse()
            body = resp.read(TAIL)
        except http.client.HTTPException as e:  # a server that does not speak HTTP
            return False, f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        want = spec.get("status", 200)
        text = f"HTTP {resp.status} {resp.reason}: {_tail(body)}"
        return resp.status == want, text if resp.status == want else f"wanted {want}, got {text}"

    def _tcp(self, spec: dict[str, Any], timeout: float) -> tuple[bool, str]:
        with socket.create_connection((spec["host"], spec["port"]), timeout=timeout):
            return True, f"connected to {spec['host']}:{spec['port']}"

    def _command(self, spec: dict[str, Any], timeout: float) -> tuple[bool, str]:
        p = subprocess.run(spec["argv"], capture_output=True, timeout=timeout, check=False,
                           stdin=subprocess.DEVNULL)
        out = _tail(p.stdout + p.stderr)
        return p.returncode == 0, (f"exit {p.returncode}" + (f": {out}" if out else ""))

    def _fetch(self, spec: dict[str, Any], timeout: float) -> tuple[bool, str]:
        if self.fetch is None:
            return False, "no Git source to reach"
        why = self.fetch()
        return not why, why or "the Git source answered"


def checks_of(resources: list[Any], implicit_units: list[str]) -> list[dict[str, Any]]:
    """The explicit checks of a desired state (check resources) and the implicit ones."""
    explicit = [{"name": r.name, **r.spec} for r in resources if r.kind == "check"]
    names = {c["name"] for c in explicit}
    # the services first: a dead service is the cause, its failing HTTP check the symptom
    services = [implicit(u) for u in dict.fromkeys(implicit_units)]
    return [c for c in services if c["name"] not in names] + explicit


def run_once(checks: list[dict[str, Any]], runner: Runner) -> list[CheckResult]:
    return [runner.run(c) for c in checks]


def trial(checks: list[dict[str, Any]], settings: dict[str, float], runner: Runner,
          should_stop: Callable[[], bool] = lambda: False,
          clock: Callable[[], float] = time.monotonic,
          sleep: Callable[[float], None] = time.sleep) -> Trial:
    """All required checks hold continuously for `window` within `timeout`.

    A failure resets the window. The trial ends early, failed, when there is no longer
    time for a whole window before the timeout. Optional checks are reported, never
    decide.
    """
    window = settings.get("window", 60.0)
    timeout = settings.get("timeout", 180.0)
    interval = max(settings.get("interval", 5.0), 0.05)
    start = clock()
    passing_since: float | None = None
    last: list[CheckResult] = []
    failing: CheckResult | None = None
    while True:
        now = clock()
        last = run_once(checks, runner)
        bad = [r for r in last if r.required and not r.ok]
        if bad:
            failing, passing_since = bad[0], None
        elif passing_since is None:
            passing_since = now
        now = clock()
        if passing_since is not None and now - passing_since >= window:
            return Trial(True, last, None, now - start)
        # a new window would not fit before the timeout: stop with what failed last
        if (passing_since is None and now - start + window > timeout) or now - start >= timeout:
            return Trial(False, last, failing or next(
                (r for r in last if r.required and not r.ok), None), now - start)
        if should_stop():
            return Trial(False, last, failing, now - start, stopped=True)
        sleep(interval)
