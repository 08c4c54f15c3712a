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

from . import __version__
from .config import Config
from .errors import AgentError, RenderError, SourceError, TrustError
from .resources import Change

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

    from .config import host_name_problem
    from .errors import ConfigError

    name = cfg.host.name or socket.gethostname()
    if why := host_name_problem(name):
        raise ConfigError(f"config: this machine's hostname {name!r} {why}; set host.name "
                          f"in {cfg.path or 'agent.yaml'}")
    return name, dict(cfg.host.labels)


def run_cycle(cfg: Config, *, dry_run: bool = False, fetch: bool = True,
              lock_wait: float = 0.0, should_stop: Callable[[], bool] = lambda: False
              ) -> tuple[CycleResult, Any]:
    """Run one cycle. Returns the result and, for dry runs, the Plan."""
    from .state import StateDir

    state = StateDir(cfg.state_dir)
    state.lock(wait=lock_wait)
    hosts: list[Any] = []
    try:
        return _run(cfg, state, dry_run, fetch, should_stop, hosts)
    finally:
        for h in hosts:
            h.close()  # the directory fds held for the cycle
        state.unlock()


def _run(cfg: Config, state: Any, dry_run: bool, fetch: bool,
         should_stop: Callable[[], bool], hosts: list[Any]) -> tuple[CycleResult, Any]:
    from .source import LAST_GOOD_REF, Mirror

    result = CycleResult(started=time.time())
    st = state.load_state()
    manifest = state.load_manifest()
    last_good = st.get("last_good")
    result.last_good = last_good
    mirror = Mirror(state.mirror_path, cfg.source)

    # fetch
    tip = None
    if fetch:
        fetched = mirror.fetch(should_stop)
        if (last_good and not mirror.rebuilt
                and (fetched.offline or not mirror.has_commit(last_good))):
            problem = mirror.problem([last_good])
            if problem:  # a damaged mirror never heals by itself: start it anew
                mirror.rebuild(problem)
                fetched = mirror.fetch(should_stop)
        tip = fetched.tip
        if mirror.rebuilt:
            result.warnings.append(mirror.rebuilt)
        if fetched.offline:
            result.offline = True
            result.offline_reason = "; ".join(fetched.errors)
    else:
        tip = last_good
    result.tip = tip

    # verify: only a trusted commit's tree is ever read. Offline, last good itself is
    # checked against the trust files as they are now (a revoked key's commit is no
    # longer enforced, online or not).
    target = None
    last_good_bad = False
    check = tip if tip is not None else (last_good if last_good and mirror.has_commit(last_good)
                                         else None)
    if check is not None:
        from . import trust

        try:
            verdict = trust.gate(cfg.trust, mirror, state, check, st)
            target = check
            result.signer = verdict.signer
            result.warnings.extend(verdict.warnings)
        except TrustError as e:
            result.rejected = str(e)
            last_good_bad = e.last_good_bad or check == last_good
            log.error("verify: %s", e, extra={"COMMIT": check, "STAGE": "verify"})
    if target is not None and tip is None:
        log.warning("cycle: converging last good %s (%s)", last_good[:12],
                    result.offline_reason, extra={"COMMIT": last_good, "STAGE": "fetch"})
    if target is None:
        if last_good and mirror.has_commit(last_good) and not last_good_bad:
            target = last_good
            result.signer = st.get("last_good_signer")
            why = result.rejected or result.offline_reason
            log.warning("cycle: converging last good %s (%s)", last_good[:12], why,
                        extra={"COMMIT": last_good, "STAGE": "fetch"})
        else:
            result.errors.append(result.rejected or
                                 f"offline with no last good revision to converge: "
                                 f"{result.offline_reason}")
            if last_good_bad:
                result.errors.append(f"last good {last_good[:12]} is no longer enforced: "
                                     f"nothing is converged until a trusted tip arrives")
            result.state = "rejected" if result.rejected else "failed"
            return _finish(cfg, state, result, st, dry_run), None
    result.commit = target
    result.commit_time = mirror.commit_time(target)

    # render (skipped on the fast path: same commit, same host, nothing drifted)
    from . import facts as facts_mod
    from .converge import Converger, clean
    from .host import Host

    host = Host(cfg.root)
    hosts.append(host)
    try:
        host.check_root()
    except AgentError as e:
        result.errors.append(str(e))
        return _finish(cfg, state, result, st, dry_run), None
    name, labels = host_identity(cfg)
    facts = facts_mod.gather()
    key = render_key(target, name, labels, facts.digest())
    now = time.time()
    full_check = now - manifest.get("full_check_at", 0) >= cfg.full_check
    if (not dry_run and not full_check and manifest.get("commit") == target
            and manifest.get("render_key") == key and clean(manifest, host)):
        result.fast_path = True
        result.state = _final_state(result)
        return _finish(cfg, state, result, st, dry_run), None

    from .render import render

    def render_commit(commit: str) -> Any:
        return render(mirror.tree(commit, cfg.limits), name, labels, facts,
                      state.p("jinja-cache"), should_stop)

    try:
        try:
            desired = render_commit(target)
        except (RenderError, SourceError):
            problem = "" if mirror.rebuilt or not fetch else mirror.problem([target])
            if not problem:
                raise
            mirror.rebuild(problem)  # damaged objects: fetch them again, render again
            result.warnings.append(mirror.rebuilt)
            if mirror.fetch(should_stop).tip is None or not mirror.has_commit(target):
                raise
            desired = render_commit(target)
    except (RenderError, SourceError) as e:
        result.errors.append(str(e))
        log.error("%s", e, extra={"COMMIT": target, "STAGE": "render"})
        if not last_good or target == last_good or not mirror.has_commit(last_good):
            return _finish(cfg, state, result, st, dry_run), None
        # the host keeps enforcing last good while the tip cannot be rendered
        target = result.commit = last_good
        result.signer = st.get("last_good_signer")
        result.commit_time = mirror.commit_time(target)
        key = render_key(target, name, labels, facts.digest())
        try:
            desired = render_commit(target)
        except (RenderError, SourceError) as e2:
            result.errors.append(f"last good {target[:12]}: {e2}")
            return _finish(cfg, state, result, st, dry_run), None

    conv = Converger(host, state, manifest, full_check=full_check or dry_run,
                     package_backend=None if cfg.package_backend == "auto"
                     else cfg.package_backend)
    plan = conv.plan(desired)
    escapes = [c for c in plan.changes if c.data.get("refused")]
    if escapes:
        # a target that leads out of root is an attack or a broken host: change nothing
        for c in plan.changes:
            if c.changed and not c.failed:  # planned, never applied: not "changed"
                c.changed, c.msg = False, f"not applied (cycle refused): {c.msg}"
        result.changes = plan.changes
        result.errors.extend(f"{c.id}: {c.msg}" for c in escapes)
        return _finish(cfg, state, result, st, dry_run), plan
    if dry_run:
        result.changes = plan.changes
        result.processes = host.spawned
        result.state = "planned"
        return _finish(cfg, state, result, st, dry_run), plan

    changes, new_resources = conv.converge(plan, should_stop)
    result.changes = changes
    result.processes = host.spawned
    checked_at = now if full_check else manifest.get("full_check_at", now)
    try:
        state.save_manifest({"commit": target, "render_key": key, "full_check_at": checked_at,
                             "host": name, "resources": new_resources})
    except AgentError as e:
        result.errors.append(str(e))  # not recorded: last good must not move either
    if result.ok:
        if target != last_good:
            st["last_good"] = target
            st["last_good_time"] = time.time()
            st["last_good_signer"] = result.signer
            st["last_good_committer_time"] = result.commit_time
            mirror.set_ref(LAST_GOOD_REF, target)
        result.last_good = target
    result.state = _final_state(result)
    return _finish(cfg, state, result, st, dry_run), plan


def _final_state(result: CycleResult) -> str:
    if not result.ok:
        return "failed"
    if result.rejected:
        return "rejected"
    if result.offline:
        return "offline"
    return "converged"


def _finish(cfg: Config, state: Any, result: CycleResult, st: dict,
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
