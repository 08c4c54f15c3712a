"""One reconcile cycle: fetch → verify → render → plan → converge → record.

Owns: the order of the stages and what each outcome means for last good (the
mediator; no stage module knows about another). The daemon and `apply` both call
run_cycle(); it is blocking and runs in a worker thread under the daemon.
Must not: parse, verify or write anything itself; each stage's module does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import __version__, trust
from . import facts as facts_mod
from .config import Config, host_name_problem
from .converge import Converger, Plan, clean
from .errors import AgentError, ConfigError, RenderError, SourceError, TrustError
from .host import Host
from .model import DesiredState
from .resources import Change
from .source import LAST_GOOD_REF, Mirror
from .state import StateDir

log = logging.getLogger("agent.cycle")


@dataclass
class CycleResult:
    started: float
    finished: float = 0.0
    state: str = "failed"  # converged | failed | offline | rejected | planned
    commit: str | None = None
    tip: str | None = None
    signer: str | None = None
    offline: bool = False
    offline_reason: str = ""
    rejected: str = ""
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    last_good: str | None = None
    fast_path: bool = False
    processes: int = 0  # subprocesses the cycle ran (dpkg-query, systemctl, apt-get, ...)
    commit_time: int = 0  # committer time of the applied commit (tip age, freshness)

    @property
    def changed(self) -> int:
        return sum(1 for c in self.changes if c.changed and not c.failed)

    @property
    def failed(self) -> int:
        return sum(1 for c in self.changes if c.failed)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.failed

    def to_json(self, with_changes: bool = True) -> dict[str, Any]:
        out = {"started": self.started, "finished": self.finished, "state": self.state,
               "commit": self.commit, "tip": self.tip, "signer": self.signer,
               "offline": self.offline, "offline_reason": self.offline_reason,
               "rejected": self.rejected, "warnings": self.warnings, "errors": self.errors,
               "changed": self.changed, "failed": self.failed, "last_good": self.last_good,
               "fast_path": self.fast_path, "processes": self.processes,
               "commit_time": self.commit_time}
        if with_changes:
            out["changes"] = [c.to_json() for c in self.changes]
        return out


def render_key(commit: str, host: str, labels: dict[str, str], facts_digest: str) -> str:
    blob = json.dumps([commit, host, sorted(labels.items()), facts_digest, __version__])
    return hashlib.sha256(blob.encode()).hexdigest()


def host_identity(cfg: Config) -> tuple[str, dict[str, str]]:
    import socket

    name = cfg.host.name or socket.gethostname()
    if why := host_name_problem(name):
        raise ConfigError(f"config: this machine's hostname {name!r} {why}; set host.name "
                          f"in {cfg.path or 'agent.yaml'}")
    return name, dict(cfg.host.labels)


def run_cycle(cfg: Config, *, dry_run: bool = False, fetch: bool = True,
              lock_wait: float = 0.0, should_stop: Callable[[], bool] = lambda: False
              ) -> tuple[CycleResult, Plan | None]:
    """Run one cycle. Returns the result and, for dry runs, the Plan."""

    state = StateDir(cfg.state_dir)
    state.lock(wait=lock_wait)
    hosts: list[Host] = []
    try:
        return _run(cfg, state, dry_run, fetch, should_stop, hosts)
    finally:
        for h in hosts:
            h.close()  # the directory fds held for the cycle
        state.unlock()


def _run(cfg: Config, state: StateDir, dry_run: bool, fetch: bool,
         should_stop: Callable[[], bool], hosts: list[Host]) -> tuple[CycleResult, Plan | None]:
    cycle = _Cycle(cfg, state, dry_run, fetch, should_stop, hosts)
    try:
        cycle.fetch()
        cycle.verify()
        cycle.prepare()
        cycle.render()
        cycle.converge()
    except _Done:
        pass
    return _finish(cfg, state, cycle.result, cycle.st, dry_run), cycle.plan


class _Done(Exception):
    """A stage decided the outcome of the cycle: record it and stop."""


class _Cycle:
    """One cycle's shared context; one method per stage, in the order _run calls them."""

    def __init__(self, cfg: Config, state: StateDir, dry_run: bool, fetch: bool,
                 should_stop: Callable[[], bool], hosts: list[Host]) -> None:

        self.cfg, self.state, self.dry_run, self.fetching = cfg, state, dry_run, fetch
        self.should_stop, self.hosts = should_stop, hosts
        self.result = CycleResult(started=time.time())
        self.st = state.load_state()
        self.manifest = state.load_manifest()
        self.last_good: str | None = self.st.get("last_good")
        self.result.last_good = self.last_good
        self.mirror = Mirror(state.mirror_path, cfg.source)
        self.host = Host(cfg.root)  # the one gate to the OS, gpgv included
        hosts.append(self.host)
        self.tip: str | None = None
        self.target: str = ""
        self.plan: Plan | None = None
        self.desired: DesiredState | None = None

    def _last_good_here(self) -> bool:
        return bool(self.last_good) and self.mirror.has_commit(self.last_good)

    def _use_last_good(self, why: str) -> None:
        assert self.last_good is not None
        self.target = self.result.commit = self.last_good
        self.result.signer = self.st.get("last_good_signer")
        self.result.commit_time = self.mirror.commit_time(self.last_good)
        log.warning("cycle: converging last good %s (%s)", self.last_good[:12], why,
                    extra={"COMMIT": self.last_good, "STAGE": "fetch"})

    # --- fetch ---------------------------------------------------------------------------

    def fetch(self) -> None:
        result, mirror = self.result, self.mirror
        if not self.fetching:
            self.tip = result.tip = self.last_good
            return
        fetched = mirror.fetch(self.should_stop)
        if (self.last_good and not mirror.rebuilt
                and (fetched.offline or not mirror.has_commit(self.last_good))):
            problem = mirror.problem([self.last_good])
            if problem:  # a damaged mirror never heals by itself: start it anew
                mirror.rebuild(problem)
                fetched = mirror.fetch(self.should_stop)
        if mirror.rebuilt:
            result.warnings.append(mirror.rebuilt)
        if fetched.offline:
            result.offline = True
            result.offline_reason = "; ".join(fetched.errors)
        self.tip = result.tip = fetched.tip

    # --- verify: only a trusted commit's tree is ever read -------------------------------

    def verify(self) -> None:
        """Offline, last good itself is checked against the trust files as they are now
        (a revoked key's commit is no longer enforced, online or not)."""

        result = self.result
        check = self.tip if self.tip is not None else (
            self.last_good if self._last_good_here() else None)
        last_good_bad = False
        if check is not None:
            try:
                verdict = trust.gate(self.cfg.trust, self.mirror, self.state, check, self.st,
                                     self.host)
                self.target = result.commit = check
                result.signer = verdict.signer
                result.warnings.extend(verdict.warnings)
                result.commit_time = verdict.commit_time
                if self.tip is None:
                    log.warning("cycle: converging last good %s (%s)", check[:12],
                                result.offline_reason,
                                extra={"COMMIT": check, "STAGE": "fetch"})
                return
            except TrustError as e:
                result.rejected = str(e)
                last_good_bad = e.last_good_bad or check == self.last_good
                log.error("verify: %s", e, extra={"COMMIT": check, "STAGE": "verify"})
        if self._last_good_here() and not last_good_bad:
            self._use_last_good(result.rejected or result.offline_reason)
            return
        result.errors.append(result.rejected or f"offline with no last good revision to "
                                                f"converge: {result.offline_reason}")
        if last_good_bad:
            result.errors.append(f"last good {(self.last_good or '')[:12]} is no longer "
                                 f"enforced: nothing is converged until a trusted tip arrives")
        result.state = "rejected" if result.rejected else "failed"
        raise _Done

    # --- the host, and the fast path ------------------------------------------------------

    def prepare(self) -> None:
        """Same commit, same host, nothing drifted: done without rendering."""

        try:
            self.host.check_root()
        except AgentError as e:
            self.result.errors.append(str(e))
            raise _Done from None
        self.name, self.labels = host_identity(self.cfg)
        self.facts = facts_mod.gather()
        self.key = render_key(self.target, self.name, self.labels, self.facts.digest())
        self.now = time.time()
        self.full_check = self.now - self.manifest.get("full_check_at", 0) >= self.cfg.full_check
        if (not self.dry_run and not self.full_check
                and self.manifest.get("commit") == self.target
                and self.manifest.get("render_key") == self.key
                and clean(self.manifest, self.host)):
            self.result.fast_path = True
            self.result.state = _final_state(self.result)
            raise _Done

    # --- render ----------------------------------------------------------------------------

    def _render(self, commit: str) -> DesiredState:
        # imported here, not at the top: a no-op cycle never renders, and importing
        # render (isolate, the Jinja2 glue) would add ~20 ms to every no-op process
        from .render import render

        return render(self.mirror.tree(commit, self.cfg.limits), self.name, self.labels,
                      self.facts, self.state.template_cache(), self.should_stop)

    def _render_healing(self, commit: str) -> DesiredState:
        """Render; if the mirror turns out damaged, fetch it anew and render once more."""
        try:
            return self._render(commit)
        except (RenderError, SourceError):
            mirror = self.mirror
            problem = "" if mirror.rebuilt or not self.fetching else mirror.problem([commit])
            if not problem:
                raise
            mirror.rebuild(problem)
            self.result.warnings.append(mirror.rebuilt)
            if mirror.fetch(self.should_stop).tip is None or not mirror.has_commit(commit):
                raise
            return self._render(commit)

    def render(self) -> None:
        """A tip that cannot be rendered leaves the host on last good (the cycle fails)."""
        result = self.result
        try:
            self.desired = self._render_healing(self.target)
            return
        except (RenderError, SourceError) as e:
            result.errors.append(str(e))
            log.error("%s", e, extra={"COMMIT": self.target, "STAGE": "render"})
        if self.target == self.last_good or not self._last_good_here():
            raise _Done
        self._use_last_good("the tip cannot be rendered")
        self.key = render_key(self.target, self.name, self.labels, self.facts.digest())
        try:
            self.desired = self._render(self.target)
        except (RenderError, SourceError) as e2:
            result.errors.append(f"last good {self.target[:12]}: {e2}")
            raise _Done from None

    # --- plan, converge, record ------------------------------------------------------------

    def converge(self) -> None:
        result, cfg = self.result, self.cfg
        conv = Converger(self.host, self.state, self.manifest,
                         full_check=self.full_check or self.dry_run,
                         package_backend=None if cfg.package_backend == "auto"
                         else cfg.package_backend)
        self.plan = plan = conv.plan(self.desired)
        escapes = [c for c in plan.changes if c.data.get("refused")]
        if escapes:
            # a target that leads out of root is an attack or a broken host: change nothing
            for c in plan.changes:
                if c.changed and not c.failed:  # planned, never applied: not "changed"
                    c.changed, c.msg = False, f"not applied (cycle refused): {c.msg}"
            result.changes = plan.changes
            result.errors.extend(f"{c.id}: {c.msg}" for c in escapes)
            raise _Done
        if self.dry_run:
            result.changes = plan.changes
            result.processes = self.host.spawned
            result.state = "planned"
            raise _Done
        changes, new_resources = conv.converge(plan, self.should_stop)
        result.changes = changes
        result.processes = self.host.spawned
        checked_at = self.now if self.full_check else self.manifest.get("full_check_at",
                                                                          self.now)
        try:
            self.state.save_manifest({"commit": self.target, "render_key": self.key,
                                      "full_check_at": checked_at, "host": self.name,
                                      "resources": new_resources})
        except AgentError as e:
            result.errors.append(str(e))  # not recorded: last good must not move either
        if result.ok:
            if self.target != self.last_good:
                self.st["last_good"] = self.target
                self.st["last_good_time"] = time.time()
                self.st["last_good_signer"] = result.signer
                self.st["last_good_committer_time"] = result.commit_time
                self.mirror.set_ref(LAST_GOOD_REF, self.target)
            result.last_good = self.target
        result.state = _final_state(result)


def _final_state(result: CycleResult) -> str:
    if not result.ok:
        return "failed"
    if result.rejected:
        return "rejected"
    if result.offline:
        return "offline"
    return "converged"


def _finish(cfg: Config, state: StateDir, result: CycleResult, st: dict,
            dry_run: bool) -> CycleResult:
    result.finished = time.time()
    if dry_run:
        return result
    st["last_cycle"] = {"commit": result.commit, "state": result.state,
                        "finished": result.finished}
    try:
        state.save_state(st)
        state.append_history({
            "commit": result.commit, "tip": result.tip, "started": result.started,
            "finished": result.finished, "result": result.state, "changed": result.changed,
            "failed": result.failed, "offline": result.offline, "rejected": result.rejected,
            "errors": result.errors, "fast_path": result.fast_path,
        })
    except (AgentError, OSError) as e:
        result.errors.append(f"state: recording the cycle failed: {e}")
        result.state = "failed"
    summary = (f"cycle: {result.state} @{(result.commit or '-')[:7]}: {result.changed} changed, "
               f"{result.failed} failed in {result.finished - result.started:.2f}s")
    (log.info if result.ok else log.error)(summary, extra={"COMMIT": result.commit or "",
                                                          "STAGE": "record"})
    return result
