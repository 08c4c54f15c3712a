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
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import __version__, trust
from . import facts as facts_mod
from .config import Config, host_name_problem
from .converge import Converger, Plan, clean, plan_digest
from .errors import AgentError, ConfigError, RenderError, SourceError, TreeError, TrustError
from .host import Host
from .journal import Journal
from .model import DesiredState
from .resources import Change
from .resources.base import REBOOT
from .secrets import Keyring
from .source import FETCHED_REF, LAST_GOOD_REF, Mirror
from .state import StateDir

if TYPE_CHECKING:
    from .health import Runner, Trial

log = logging.getLogger("agent.cycle")

# the daemon's last desired state, by state_dir: (render base, DesiredState). A long-lived
# process renders a commit that changed only files/ incrementally (see _Cycle._render)
_LAST_RENDER: dict[str, tuple[str, DesiredState]] = {}


@dataclass
class CycleResult:
    started: float
    finished: float = 0.0
    # converged | failed | offline | rejected | planned | rolled-back | degraded
    state: str = "failed"
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
    trial: dict[str, Any] | None = None  # the health-check trial of a new revision
    after_rollback: dict[str, Any] | None = None  # the checks again, after a rollback
    recovered: str = ""  # the commit of an interrupted apply rolled back on start
    rolled_back: str = ""  # why this cycle put the host back to last good
    quarantined: str = ""  # the tip, when it is quarantined on this host
    rollback_seconds: float = 0.0  # how long putting the journaled resources back took
    waiting: str = ""  # why the tip waits (its wave, a window, a fleet-wide pause)
    halted: bool = False  # it waits because earlier waves failed it (rollout.halt)
    rebooted: str = ""  # the commit confirmed after the reboot it asked for
    rollout: dict[str, Any] = field(default_factory=dict)  # wave, bucket, opens_at
    awaiting: bool = False  # it waits for approvals (trust.approvals)
    pinned: str = ""  # `gitops-agent pin`: which commit, who, since when, why
    approvals: dict[str, Any] | None = None  # the tally of the tip's approvals

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
               "commit_time": self.commit_time, "trial": self.trial,
               "after_rollback": self.after_rollback, "recovered": self.recovered,
               "rolled_back": self.rolled_back, "quarantined": self.quarantined,
               "rollback_seconds": round(self.rollback_seconds, 3),
               "waiting": self.waiting, "rollout": self.rollout, "halted": self.halted,
               "rebooted": self.rebooted, "approvals": self.approvals,
               "pinned": self.pinned}
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
              lock_wait: float = 0.0, should_stop: Callable[[], bool] = lambda: False,
              on_phase: Callable[[str], None] = lambda phase: None,
              clock: Callable[[], float] = time.time, keep_render: bool = False
              ) -> tuple[CycleResult, Plan | None]:
    """Run one cycle. Returns the result and, for dry runs, the Plan. `on_phase` hears
    "verifying" when a trial starts (the daemon shows it in status). `clock` is the
    time waves and windows are judged at (tests inject it). `keep_render`: save what
    this cycle renders in state_dir, so that the next process renders incrementally
    (one-shot `apply` and `plan` processes; the daemon keeps it in memory)."""

    state = StateDir(cfg.state_dir)
    state.lock(wait=lock_wait)
    hosts: list[Host] = []
    try:
        return _run(cfg, state, dry_run, fetch, should_stop, hosts, on_phase, clock,
                    keep_render)
    finally:
        for h in hosts:
            h.close()  # the directory fds held for the cycle
        state.unlock()


def _run(cfg: Config, state: StateDir, dry_run: bool, fetch: bool,
         should_stop: Callable[[], bool], hosts: list[Host],
         on_phase: Callable[[str], None], clock: Callable[[], float], keep_render: bool
         ) -> tuple[CycleResult, Plan | None]:
    cycle = _Cycle(cfg, state, dry_run, fetch, should_stop, hosts)
    cycle.on_phase, cycle.clock, cycle.keep_render = on_phase, clock, keep_render
    try:
        cycle.recover()
        cycle.fetch()
        cycle.verify()
        cycle.prepare()
        cycle.render()
        cycle.converge()
    except _Done:
        pass
    if cycle.st.get("degraded") and cycle.result.state in ("converged", "rolled-back"):
        cycle.result.state = "degraded"  # loud until a new revision passes its trial
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
        self.fetched_url: str | None = None
        self.target: str = ""
        self.plan: Plan | None = None
        self.desired: DesiredState | None = None
        self.on_phase: Callable[[str], None] = lambda phase: None
        self.clock: Callable[[], float] = time.time
        self.keep_render = False
        # read when a secret is first used
        self.keyring = Keyring(cfg.secrets.identity, cfg.secrets.sops)
        self.pin: dict[str, Any] | None = None if dry_run else state.load_pin()

    def _converger(self, full_check: bool) -> Converger:
        cfg = self.cfg
        return Converger(self.host, self.state, self.manifest, full_check=full_check,
                         package_backend=None if cfg.package_backend == "auto"
                         else cfg.package_backend, keyring=self.keyring)

    # --- an apply that did not finish is undone first --------------------------------------

    def recover(self) -> None:
        """A journal left by a killed agent (or a crash, a power cut) is rolled back
        before anything else: the host goes back to where that apply started."""
        if self.dry_run:
            return
        head, marks = Journal.unfinished(self.state)
        if head is None:
            return
        commit = str(head.get("commit") or "?")
        records = head.get("records")
        if not isinstance(records, list):
            records = []
        try:
            self.host.check_root()
        except AgentError as e:
            self.result.errors.append(f"recovery of {commit[:12]}: {e}")
            raise _Done from None
        if head.get("phase") == "reboot":
            if head.get("boot") == self.host.boot_id():
                journal = Journal(self.state)
                journal.head = head
                self._reboot_if_allowed(journal)  # still before the reboot it needs
                raise _Done
            self._confirm_after_reboot(head, marks)
            return
        changes = self._converger(True).rollback(records, marks, commit)
        failed = [c for c in changes if c.failed]
        during = " during its health-check trial" if head.get("phase") == "trial" else ""
        msg = (f"recovered from an interrupted apply of {commit[:12]}{during}: "
               f"{sum(c.changed for c in changes)} resources put back"
               + (f", {len(failed)} could not be" if failed else ""))
        self.result.recovered = commit
        self.result.warnings.append(msg)
        self.result.warnings.extend(f"{c.id}: {c.msg}" for c in failed)
        self.result.changes.extend(changes)
        log.warning("journal: %s", msg, extra={"COMMIT": commit, "STAGE": "recover"})
        self._invalidate_manifest()
        self.state.clear_journal()

    def _invalidate_manifest(self) -> None:
        """The manifest stays the one of last good but no longer lets a cycle skip work."""
        self.manifest = {**self.manifest, "commit": None, "render_key": None}
        try:
            self.state.save_manifest(self.manifest)
        except AgentError as e:
            self.result.errors.append(str(e))

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
            # a drift cycle between fetches: still say so when the fetched tip is held
            fetched = self.mirror.ref(FETCHED_REF) if self.last_good else None
            if fetched and fetched != self.last_good:
                bad = self._quarantined("commit", fetched)
                if bad is not None:
                    self.target = fetched
                    self._hold(bad)
            return
        fetched = mirror.fetch(self.should_stop)
        self.fetched_url = fetched.url
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
        if self.pin is not None:
            self._pinned(self.pin)
            return
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
                elif check != self.last_good and self.cfg.trust.approvals.threshold:
                    self._approved(check)
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

    def _pinned(self, pin: dict[str, Any]) -> None:
        """`gitops-agent pin`: converge this commit instead of the tip. It must be in the
        branch's history (the fetched tip's or last good's) and pass the trust files."""
        result, mirror = self.result, self.mirror
        commit = str(pin["commit"])
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(pin.get("since") or 0))
        result.pinned = (f"pinned to {commit[:12]} by {pin.get('by') or '?'} since {since}: "
                         f"{pin.get('reason') or 'no reason given'}")
        log.warning("cycle: %s", result.pinned, extra={"COMMIT": commit, "STAGE": "verify"})
        if not mirror.in_history(commit, _pin_heads(mirror, self.tip, self.last_good)):
            result.errors.append(f"{result.pinned}: that commit is not in the history of "
                                 f"branch {self.cfg.source.branch} here; nothing converged "
                                 f"(`gitops-agent unpin`)")
            raise _Done
        try:
            verdict = trust.pin_verdict(self.cfg.trust, mirror, self.state, commit, self.host)
        except TrustError as e:
            result.rejected = str(e)
            result.errors.append(f"{e}; nothing converged (`gitops-agent unpin`)")
            raise _Done from None
        self.target = result.commit = commit
        result.signer = verdict.signer
        result.commit_time = verdict.commit_time
        result.warnings.extend(verdict.warnings)

    def _approved(self, tip: str) -> None:
        """k of n: short of the threshold the host stays on last good, awaiting approval."""
        from . import approvals

        acfg = self.cfg.trust.approvals
        result = self.result
        assert acfg.approvers is not None
        found: dict[str, dict[str, Any]] = {}
        error = ""
        try:
            if self.fetched_url is not None:
                found = self.mirror.fetch_approvals(self.fetched_url, tip, self.should_stop)
        except SourceError as e:
            error = str(e)
            result.warnings.append(error)
        tally = approvals.judge(  # a bad approvers file is a TrustError: not applied
            self.mirror, found, branch=self.cfg.source.branch, commit=tip,
            approvers=acfg.approvers, revoked_keys=self.cfg.trust.revoked_keys,
            threshold=acfg.threshold, error=error)
        result.approvals = tally.to_json()
        for a in tally.approvals:
            if not a.ok:
                log.warning("approvals: %s refused: %s", a.ref, a.reason,
                            extra={"COMMIT": tip, "STAGE": "verify"})
        if tally.ok:
            log.info("approvals: %s approved, %s", tip[:12], tally.summary,
                     extra={"COMMIT": tip, "STAGE": "verify"})
            return
        result.waiting = f"{tip[:12]}: awaiting approval, {tally.summary}"
        result.awaiting = True
        log.warning("approvals: %s", result.waiting, extra={"COMMIT": tip, "STAGE": "verify"})
        if not self._last_good_here():
            result.errors.append(f"{result.waiting}; no last good revision to converge")
            raise _Done
        self._use_last_good(result.waiting)

    # --- the host, and the fast path ------------------------------------------------------

    def prepare(self) -> None:
        """Same commit, same host, nothing drifted: done without rendering."""

        try:
            self.host.check_root()
        except AgentError as e:
            self.result.errors.append(str(e))
            raise _Done from None
        self.name, self.labels = host_identity(self.cfg)
        if self.target != self.last_good and self.pin is None:  # a known bad tip: held
            bad = self._quarantined("commit", self.target)
            if bad is not None:
                self._hold(bad)
        self.facts = facts_mod.gather()
        self.facts_digest = self.facts.digest()
        self.key = render_key(self.target, self.name, self.labels, self.facts_digest)
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

    def _rollout_holds(self, digest: str) -> bool:
        """A new plan waits for this host's wave, its window, or a fleet-wide pause, all
        from the signed commit. A plan equal to last good's, and a host without last good,
        go at once. Returns True when the host stays on last good."""
        from . import rollout  # here: a no-op cycle never decides (datetime, zoneinfo)

        assert self.desired is not None
        policy = self.desired.rollout
        result = self.result
        if "wave" in policy:
            result.rollout = {"wave": policy["wave"], "bucket": policy["bucket"],
                              "wave_index": policy["wave_index"]}
        if not policy or not self._last_good_here() or digest == self.st.get("last_good_plan"):
            return False
        decision = rollout.decide(policy, result.commit_time, self.clock())
        if decision.go and policy.get("halt") and self.cfg.report.sftp is not None:
            from .fleet import drop_reports  # here: only a host about to apply reads it

            try:
                reports = drop_reports(self.cfg.report.sftp)
            except Exception as e:  # noqa: BLE001 - a drop we cannot read never halts
                result.warnings.append(f"rollout: the report drop cannot be read for "
                                       f"halt: ({type(e).__name__}: {e}); going on")
                reports = []
            why = rollout.halted(policy, reports, self.target)
            if why:
                result.halted = True
                decision = rollout.Decision(False, "halted", why)
        if decision.go:
            return False
        result.waiting = f"{self.target[:12]}: {decision.reason}"
        result.rollout.update(waiting=decision.reason, opens_at=decision.opens_at,
                              tip=self.target)
        self._use_last_good(result.waiting)
        return True

    def _hold(self, bad: dict[str, Any]) -> None:
        """The tip is quarantined here: stay on last good, and say why."""
        result, tip = self.result, self.target
        result.quarantined = tip
        why = (f"tip {tip[:12]} is quarantined: " + (
            "it" if bad["commit"] == tip else f"its plan is the one of {bad['commit'][:12]},"
            " which") + f" failed health check {bad.get('check') or '?'}; "
            f"`gitops-agent quarantine clear {bad['commit'][:12]}` to try it again")
        result.rolled_back = why
        if not self._last_good_here():
            result.errors.append(why)
            raise _Done
        self._use_last_good(why)

    def _render(self, commit: str) -> DesiredState:
        # imported here, not at the top: a no-op cycle never renders, and importing
        # render (isolate, the Jinja2 glue) would add ~20 ms to every no-op process
        from .render import render

        base = self._render_base()
        previous = None
        tree = self.mirror.tree(commit, self.cfg.limits)
        last = _LAST_RENDER.get(self.cfg.state_dir)
        if last is None or last[0] != base:  # a new process: what the last one kept
            kept = self.state.load_render(base)
            last = (base, kept) if kept is not None else None
        if last is not None:
            # a content that read a secret is never kept on disk: made again below
            whole = not any(r.error or r.content_left_out for r in last[1].resources)
            if last[1].commit == commit and whole:
                _LAST_RENDER[self.cfg.state_dir] = last
                return last[1]  # rendering is pure: same inputs, same desired state
            changed = None
            if last[1].commit == commit:
                changed = set()
            elif self._bounded_tree(tree):  # the diff walks both trees: bound them first
                changed = self.mirror.changed_paths(last[1].commit, commit)
            if changed is not None and all(p.startswith("files/") for p in changed):
                previous = (last[1], changed)
        desired = render(tree, self.name, self.labels, self.facts, self.state.template_cache,
                         self.should_stop, self.keyring, previous)
        if desired.remade is not None:
            log.info("render: incremental, %d of %d contents made again (the rest did not "
                     "read a changed path)", desired.remade, len(desired.resources),
                     extra={"COMMIT": commit, "STAGE": "render"})
        _LAST_RENDER[self.cfg.state_dir] = (base, desired)
        if self.keep_render:
            self.state.save_render(base, desired)
        return desired

    @staticmethod
    def _bounded_tree(tree: Any) -> bool:
        """The commit's tree is within the limits (render says why not, if it is not)."""
        try:
            tree.check()
        except TreeError:
            return False
        return True

    def _render_base(self) -> str:
        """Everything a render depends on besides the commit: with the same base, a new
        commit that changed only files/ is rendered incrementally (render.rerender)."""
        try:
            st = os.stat(self.cfg.secrets.identity)
            identity = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        except OSError:
            identity = None
        return json.dumps([render_key("", self.name, self.labels, self.facts_digest),
                           repr(self.cfg.limits), self.cfg.secrets.sops,
                           self.cfg.secrets.identity, identity])

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
        """A tip that cannot be rendered leaves the host on last good (the cycle fails);
        so does a quarantined one (its plan for this host failed its health checks)."""
        result = self.result
        try:
            self.desired = self._render_healing(self.target)
            if self.target == self.last_good or self.pin is not None:
                return
            digest = plan_digest(self.desired)
            bad = self._quarantined("plan", digest)
            if bad is None:
                if not self._rollout_holds(digest):
                    return
            else:
                self._hold(bad)  # now on last good (or done, without one)
        except (RenderError, SourceError) as e:
            result.errors.append(str(e))
            log.error("%s", e, extra={"COMMIT": self.target, "STAGE": "render"})
            if self.target == self.last_good or not self._last_good_here():
                raise _Done from None
            self._use_last_good("the tip cannot be rendered")
        self.key = render_key(self.target, self.name, self.labels, self.facts_digest)
        try:
            self.desired = self._render(self.target)
        except (RenderError, SourceError) as e2:
            result.errors.append(f"last good {self.target[:12]}: {e2}")
            raise _Done from None

    # --- plan, converge, record ------------------------------------------------------------

    def converge(self) -> None:
        # imported here, not at the top: a no-op cycle never converges or checks health
        from . import health

        result = self.result
        conv = self._converger(self.full_check or self.dry_run)
        assert self.desired is not None
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
        digest = plan_digest(self.desired)
        new_rev = self.target != self.last_good
        journal = Journal(self.state)
        if any(s.change.changed and not s.change.failed for s in plan.steps):
            try:
                journal.begin(self.target, self.last_good, digest, conv.snapshot(plan))
            except (AgentError, OSError) as e:
                result.errors.append(f"journal: cannot record the prior state, so nothing is "
                                     f"changed: {e}")
                raise _Done from None
        changes, new_resources = conv.converge(plan, self.should_stop, journal.mark)
        result.changes.extend(changes)
        result.processes = self.host.spawned
        # held resources (a secret not encrypted to this host) fail on their own: the
        # rest of the revision converges, is tried, and becomes last good without them
        held = [c for c in changes if c.failed and c.data.get("held")]
        if result.errors or result.failed > len(held):
            if journal.active and new_rev:
                why = ("the agent is shutting down" if self.should_stop()
                       else f"{result.failed} resources failed to apply")
                self._rollback(conv, journal, why)
            else:
                journal.close()
                self._save_manifest(new_resources, complete=False)
            result.state = _final_state(result)
            raise _Done
        reboot_for = self._needs_reboot(changes)
        checks = health.checks_of(self.desired.resources, [
            c.data["health"]["systemd"] for c in changes
            if c.changed and not c.failed and "systemd" in c.data.get("health", {})])
        if reboot_for and new_rev and journal.active:
            if self.host.root != "/":
                result.warnings.append(f"reboot asked for by {', '.join(reboot_for)}: skipped "
                                       f"under a sandbox root")
            else:
                # the trial, and promotion, come after the reboot (recover() confirms)
                journal.phase("reboot", boot=self.host.boot_id(), issued=False,
                              checks=checks, health=self.desired.health,
                              manifest=new_resources, key=self.key, host=self.name,
                              signer=result.signer, commit_time=result.commit_time,
                              plan=digest, policy=self.desired.rollout, why=reboot_for)
                self._reboot_if_allowed(journal)
                raise _Done
        if new_rev and journal.active and checks:
            journal.phase("trial")
            self.on_phase("verifying")
            runner = health.Runner(fetch=self._probe_source)
            trial = health.trial(checks, self.desired.health, runner, self.should_stop)
            result.trial = trial.to_json()
            # kept for status and reports until the next trial
            self.st["last_trial"] = {**result.trial, "commit": self.target, "at": time.time()}
            if not trial.ok:
                self._failed_trial(conv, journal, trial, digest, runner)
                raise _Done
        self._save_manifest(new_resources, complete=not held)
        if not result.errors:
            if new_rev and self.pin is None:  # a pin never becomes last good
                self.st["last_good"] = self.target
                self.st["last_good_time"] = time.time()
                self.st["last_good_signer"] = result.signer
                self.st["last_good_committer_time"] = result.commit_time
                self.mirror.set_ref(LAST_GOOD_REF, self.target)
            if self.pin is None and (new_rev or "checks" not in self.st):
                self.st["checks"] = [c for c in checks if not c.get("no_restart")]
            if self.pin is None:
                self.st["last_good_plan"] = digest  # what a new commit is compared with
            if new_rev and result.trial is not None:
                self.st.pop("degraded", None)
            result.last_good = self.st.get("last_good")
            try:
                self.state.save_state(self.st)  # last good moves before the journal goes
            except AgentError as e:
                result.errors.append(str(e))
        journal.close()
        result.state = _final_state(result)

    def _needs_reboot(self, changes: list) -> list[str]:
        """The changed resources whose declaration notifies `reboot`."""
        assert self.desired is not None
        changed = {c.id for c in changes if c.changed and not c.failed}
        return [r.identity for r in self.desired.resources
                if r.identity in changed and REBOOT in r.notify]

    def _reboot_if_allowed(self, journal: Journal) -> None:
        """Reboot now if the policy allows (once per commit), else wait for the window."""
        head = journal.head
        assert head is not None
        result = self.result
        commit = str(head["commit"])
        result.commit = commit
        if head.get("issued"):
            result.state, result.waiting = "rebooting", (
                f"rebooting for {commit[:12]}: requested, waiting for the system to go down")
            return
        from . import rollout

        decision = rollout.may_reboot(head.get("policy") or {}, self.clock())
        if not decision.go:
            result.state = "waiting"
            result.waiting = f"{commit[:12]} is applied; {decision.reason}"
            result.rollout = {**result.rollout, "opens_at": decision.opens_at, "tip": commit}
            return
        journal.phase("reboot", issued=True, issued_at=time.time())  # never twice
        log.warning("cycle: rebooting for %s (asked for by %s)", commit[:12],
                    ", ".join(head.get("why") or []), extra={"COMMIT": commit,
                                                             "STAGE": "reboot"})
        r = self.host.run(["systemctl", "reboot"])
        if not r.ok:
            result.errors.append(f"reboot for {commit[:12]}: systemctl reboot: "
                                 f"{r.error_text()}")
            return
        result.state, result.waiting = "rebooting", f"rebooting for {commit[:12]}"

    def _confirm_after_reboot(self, head: dict[str, Any], marks: list) -> None:
        """Back from the reboot a revision asked for: its checks decide (as a trial
        would), then it is promoted to last good or rolled back and quarantined."""
        from . import health

        result, commit = self.result, str(head["commit"])
        checks = head.get("checks") or []
        trial = (health.trial(checks, head.get("health") or {}, health.Runner(
            fetch=self._probe_source), self.should_stop) if checks else health.Trial(True))
        result.trial = trial.to_json() if checks else None
        if trial.ok:
            self.manifest = {"commit": commit, "render_key": head.get("key"),
                             "full_check_at": time.time(), "host": head.get("host"),
                             "resources": head.get("manifest") or {}}
            self.state.save_manifest(self.manifest)
            self.st.update(last_good=commit, last_good_time=time.time(),
                           last_good_signer=head.get("signer"),
                           last_good_committer_time=head.get("commit_time"),
                           last_good_plan=head.get("plan"),
                           checks=[c for c in checks if not c.get("no_restart")])
            if self.mirror.has_commit(commit):  # (a mirror rebuilt since fetches it again)
                self.mirror.set_ref(LAST_GOOD_REF, commit)
            self.state.save_state(self.st)
            self.state.clear_journal()
            self.last_good = result.last_good = commit
            result.rebooted = commit
            result.warnings.append(f"rebooted for {commit[:12]}: confirmed"
                                   + (" (health checks passed)" if checks else ""))
            log.info("cycle: rebooted for %s: confirmed", commit[:12],
                     extra={"COMMIT": commit, "STAGE": "reboot"})
            return
        undo = self._converger(True).rollback(head.get("records") or [], marks, commit)
        result.changes.extend(undo)
        failing = trial.failing
        result.rolled_back = (f"{commit[:12]} rolled back after its reboot: health check "
                              f"{failing.name if failing else '?'} failed"
                              f"{': ' + failing.output if failing else ''}; the old "
                              f"configuration may need a reboot to take full effect")
        result.errors.append(result.rolled_back)
        self._quarantine(commit, head.get("plan") or "", failing, head.get("host"),
                         head.get("last_good"))
        self._invalidate_manifest()
        self.state.clear_journal()
        result.state = "rolled-back"
        raise _Done

    def _quarantined(self, key: str, value: str) -> dict[str, Any] | None:
        """The quarantine entry whose `commit` or `plan` is value."""
        return next((q for q in self.state.load_quarantine() if q[key] == value), None)

    def _quarantine(self, commit: str, plan: str, failing: Any, host: Any,
                    back_to: Any) -> None:
        """A rolled-back commit is not tried again here, nor any with the same plan."""
        q = [x for x in self.state.load_quarantine() if x["plan"] != plan]
        q.append({"commit": commit, "plan": plan, "at": time.time(),
                  "check": failing.name if failing else "",
                  "output": failing.output if failing else "", "host": host,
                  "rolled_back_to": back_to})
        try:
            self.state.save_quarantine(q[-100:])
        except AgentError as e:
            self.result.errors.append(str(e))
        self.result.quarantined = commit
        self.st["rollbacks"] = int(self.st.get("rollbacks") or 0) + 1

    def _save_manifest(self, resources: dict[str, Any], complete: bool) -> None:
        checked_at = self.now if self.full_check else self.manifest.get("full_check_at",
                                                                          self.now)
        # an incomplete apply (a failed resource) never lets the next cycle skip work
        try:
            self.state.save_manifest({"commit": self.target if complete else None,
                                      "render_key": self.key if complete else None,
                                      "full_check_at": checked_at, "host": self.name,
                                      "resources": resources})
        except AgentError as e:
            self.result.errors.append(str(e))  # not recorded: last good must not move either

    def _probe_source(self) -> str:
        """The fetch check: can this host still reach its Git source? ("" = yes)"""
        fetched = self.mirror.fetch(self.should_stop)
        return "; ".join(fetched.errors) if fetched.offline else ""

    def _rollback(self, conv: Converger, journal: Journal, why: str) -> list:
        assert journal.head is not None
        t0 = time.monotonic()
        undo = conv.rollback(journal.head["records"], journal.marks(), self.target)
        self.result.rollback_seconds = time.monotonic() - t0
        self.result.changes.extend(undo)
        back = self.last_good[:12] if self.last_good else "the state before the agent"
        self.result.rolled_back = f"{self.target[:12]} rolled back to {back}: {why}"
        self.result.errors.append(self.result.rolled_back)
        self.result.errors.extend(f"rollback: {c.id}: {c.msg}" for c in undo if c.failed)
        log.error("cycle: %s", self.result.rolled_back,
                  extra={"COMMIT": self.target, "STAGE": "rollback"})
        self._invalidate_manifest()
        journal.close()
        return undo

    def _failed_trial(self, conv: Converger, journal: Journal, trial: Trial,
                      digest: str, runner: Runner) -> None:
        """Roll back, look again, quarantine the commit (not when the trial was cut short
        by a shutdown: that commit is tried again)."""
        from . import health

        result = self.result
        failing = trial.failing
        if trial.stopped:
            self._rollback(conv, journal, "the agent stopped during the health-check trial")
            result.state = "failed"
            return
        what = (f"health check {failing.name} failed: {failing.output}" if failing
                else "the health checks did not hold for the whole window")
        undo = self._rollback(conv, journal, what)
        # the checks of the revision now on the host (last good's), and the services the
        # failed revision restarted: they must be up again on the old configuration
        again = list(self.st.get("checks") or []) + [
            {**health.implicit(u), "no_restart": False} for u in dict.fromkeys(
                c.data["health"]["systemd"] for c in result.changes
                if c.changed and "systemd" in c.data.get("health", {}))]
        after = health.trial(again, {**self.desired.health, "window": 0.0}, health.Runner(
            fetch=self._probe_source), self.should_stop) if again else health.Trial(True)
        result.after_rollback = after.to_json()
        self._quarantine(self.target, digest, failing, self.name, self.last_good)
        if after.ok:
            self.st.pop("degraded", None)
            result.state = "rolled-back"
        else:
            bad = after.failing
            self.st["degraded"] = {"commit": self.target, "since": time.time(),
                                   "check": bad.name if bad else "",
                                   "output": bad.output if bad else ""}
            result.errors.append(f"degraded: after the rollback, health check "
                                 f"{bad.name if bad else '?'} still fails: "
                                 f"{bad.output if bad else ''}; manual intervention needed")
            result.state = "degraded"
        log.error("cycle: %s; quarantined for this host (%d resources put back)",
                  result.rolled_back, sum(c.changed for c in undo),
                  extra={"COMMIT": self.target, "STAGE": "trial"})


def _pin_heads(mirror: Mirror, tip: str | None, last_good: str | None) -> list[str]:
    """What a pinned commit must be in the history of: the fetched tip, last good."""
    return [c for c in (tip or mirror.ref(FETCHED_REF), last_good) if c]


def pin(cfg: Config, rev: str, reason: str, by: str) -> str:
    """`gitops-agent pin`: check REV as a cycle will (in the branch's history as this
    host fetched it, trusted on its own) and write the pin. Returns what was done."""
    from .errors import UsageError

    state = StateDir(cfg.state_dir)
    mirror = Mirror(state.mirror_path, cfg.source)
    commit = mirror.resolve(rev)
    if not mirror.in_history(commit, _pin_heads(mirror, None,
                                                 state.load_state().get("last_good"))):
        raise UsageError(f"pin: {commit[:12]} is not in the history of branch "
                         f"{cfg.source.branch} as this host fetched it")
    verdict = trust.pin_verdict(cfg.trust, mirror, None, commit)
    state.save_pin(commit, reason, by)
    return (f"pinned to {commit[:12]} ({verdict.reason}): this host converges it instead "
            f"of the tip until `gitops-agent unpin`")


def unpin(cfg: Config) -> str:
    return ("unpinned: following the branch tip again" if StateDir(cfg.state_dir).clear_pin()
            else "not pinned")


def _final_state(result: CycleResult) -> str:
    if result.quarantined:
        return "rolled-back"
    if result.pinned and result.ok:
        return "pinned"
    if result.waiting and result.ok:
        if result.awaiting:
            return "awaiting-approval"
        return "halted" if result.halted else "waiting"
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
            "recovered": result.recovered, "rolled_back": result.rolled_back,
            "quarantined": result.quarantined,
            "trial": (result.trial or {}).get("failing"),
        })
    except (AgentError, OSError) as e:
        result.errors.append(f"state: recording the cycle failed: {e}")
        result.state = "failed"
    summary = (f"cycle: {result.state} @{(result.commit or '-')[:7]}: {result.changed} changed, "
               f"{result.failed} failed in {result.finished - result.started:.2f}s")
    (log.info if result.ok else log.error)(summary, extra={"COMMIT": result.commit or "",
                                                          "STAGE": "record"})
    return result
