"""plan() and converge(): desired state vs the host and the last applied manifest.

Owns: the order of a cycle (by each kind's stage; within a path kind's stage, parents
before children), the stat-signature fast path of path kinds, pruning of what the
previous revision managed and this one no longer declares (children before parents),
batching (a batch kind gets all its planned steps at once), the hooks around the
stages, and the new manifest.
Must not: fetch, verify or render; it gets a DesiredState and a manifest. It names no
kind: every kind is driven through the registry in resources/.

A failed resource does not stop unrelated ones; the caller sees `failed` and keeps
last good where it was.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import AgentError, EscapeError
from .host import Host
from .model import Change
from .resources import KINDS
from .resources.base import Env, Kind
from .resources.files import signature

if TYPE_CHECKING:  # render is not imported on the no-drift fast path
    from .model import DesiredState, Resource
    from .state import StateDir

log = logging.getLogger("agent.converge")

_LAST = 99  # the stage of a manifest entry whose kind this agent does not know


def order(resources: list[Resource]) -> list[Resource]:
    """Stage order; within a path kind's stage, parents before children (by path parts)."""
    def key(r: Resource) -> tuple:
        kind = KINDS.get(r.kind)
        if kind is None:
            return (_LAST, ())
        path = kind.path(r.name) if kind.by_path else None
        return (kind.stage, tuple(path.split("/")) if path else ())
    return sorted(resources, key=key)


@dataclass
class Step:
    """One planned change: a declared resource, or a prune of a no-longer-declared one."""

    change: Change
    resource: Resource | None = None
    prune_entry: dict[str, Any] | None = None
    stage: int = 0


@dataclass
class Plan:
    commit: str
    steps: list[Step] = field(default_factory=list)

    @property
    def changes(self) -> list[Change]:
        return [s.change for s in self.steps]


class Converger:
    def __init__(self, host: Host, state: StateDir, manifest: dict[str, Any],
                 full_check: bool = True, package_backend: str | None = None,
                 keyring: Any = None) -> None:
        self.host = host
        self.old = manifest.get("resources", {})
        self.full_check = full_check
        self.env = Env(host, state, self.old, full_check, package_backend, keyring=keyring)
        self.env.secret_ids = {i for i, e in self.old.items() if e.get("secret")}

    # --- plan --------------------------------------------------------------------------

    def _unchanged(self, res: Resource, kind: Kind) -> Change | None:
        """The fast path of a path kind: same desired state as applied and the same
        stat signature as recorded after the agent's own write."""
        path = kind.path(res.name) if kind.by_path else None
        old = self.old.get(res.identity)
        if (path is None or self.full_check or not old or old.get("digest") != res.digest()
                or old.get("sig") is None or signature(self.host.join(path)) != old["sig"]):
            return None
        data = {k: old[k] for k in ("backup", "created") if k in old}
        if res.kind != "directory":
            # what the manifest records again: the signature just seen to match. (A
            # directory's is taken after the cycle wrote into it, in converge.) A write
            # by anyone later in this cycle, a package's postinst say, is then drift
            # the next cycle sees, not a signature recorded as the agent's own
            data["sig"] = old["sig"]
        return Change(res.identity, msg="unchanged since last apply (stat signature)",
                      data=data)

    def plan(self, desired: DesiredState) -> Plan:
        """Read-only: what converge would change now, with diffs."""
        with self.host.read_only():
            return self._plan(desired)

    def _plan(self, desired: DesiredState) -> Plan:
        plan = Plan(desired.commit)
        declared = desired.by_id()
        self.env.secret_ids |= {r.identity for r in desired.resources if r.secret or r.secrets}
        ordered = order(desired.resources)
        by_kind: dict[str, list[Resource]] = {}
        for res in ordered:
            by_kind.setdefault(res.kind, []).append(res)
        observed = {name: _try(lambda k=KINDS[name], rs=rs: k.query(rs, self.env), None)
                    for name, rs in by_kind.items()}
        for res in ordered:
            kind = KINDS[res.kind]
            if res.error:  # held: its secret cannot be read here; left as it is
                plan.steps.append(Step(Change(res.identity, failed=True, msg=res.error,
                                              data={"held": True}), res, stage=kind.stage))
                continue
            change = self._unchanged(res, kind) or _guard(
                res.identity, lambda k=kind, r=res: k.check(r, observed[r.kind], self.env))
            plan.steps.append(Step(change, res, stage=kind.stage))
        gone = [(i, e) for i, e in self.old.items()
                if i not in declared and e.get("kind") in KINDS]
        # children before parents, so a directory dropped with its children is empty by
        # the time its own prune comes (sorting identities would put `dir[/a]` first)
        gone.sort(key=lambda ie: tuple(str(ie[1].get("path", ie[1].get("name", "")))
                                       .split("/")), reverse=True)
        for ident, entry in gone:
            kind = KINDS[entry["kind"]]
            change = _guard(ident, lambda k=kind, i=ident, e=entry: k.prune(
                i, e, self.env, dry=True) or Change(i, data={"keep": True}))
            if not change.data.get("keep"):  # None: the kind leaves it as it is
                stage = kind.stage if kind.prune_stage is None else kind.prune_stage
                plan.steps.append(Step(change, prune_entry=entry, stage=stage))
        plan.steps.sort(key=lambda s: s.stage)  # stable: declared before prunes in a stage
        return plan

    # --- converge ----------------------------------------------------------------------

    # --- the journal -----------------------------------------------------------------

    def snapshot(self, plan: Plan) -> list[dict[str, Any]]:
        """The prior state of every resource the plan will touch, in plan order: what a
        rollback puts back. Taken before the first write."""
        with self.host.read_only():
            return self._snapshot(plan)

    def _snapshot(self, plan: Plan) -> list[dict[str, Any]]:
        out = []
        for step in plan.steps:
            if not step.change.changed or step.change.failed:
                continue
            if step.resource is not None:
                kind, name = KINDS[step.resource.kind], step.resource.name
            else:
                entry = step.prune_entry or {}
                kind, name = KINDS[entry["kind"]], entry["name"]
            prior = _try(lambda k=kind, i=step.change.id, n=name: k.snapshot(i, n, self.env),
                         None)
            out.append({"id": step.change.id, "kind": kind.name, "name": name,
                        "prior": prior})
        return out

    def rollback(self, records: list[dict[str, Any]], marks: list[dict[str, Any]],
                 commit: str = "") -> list[Change]:
        """Put back what `records` journaled: kinds in stage order (packages before the
        files they own, unit files and daemon-reload before services), each kind's own
        records newest first. Every kind is asked, so restarts are redone too."""
        results: list[Change] = []
        # temp files of a write that was killed half-way go first
        self._clean_dirs((str(r.get("kind")), str(r.get("name"))) for r in records)
        for kind in sorted(KINDS.values(), key=lambda k: k.stage):
            mine = [r for r in records if r.get("kind") == kind.name]
            unsaved = [r for r in mine if r.get("prior") is None]
            for r in unsaved:
                results.append(Change(r["id"], failed=True, action="rollback",
                                      msg="its prior state could not be read: left as applied"))
            saved = [r for r in mine if r.get("prior") is not None]
            self.host.forget_ids()
            fallback = [Change(r["id"], failed=True, action="rollback", msg="rollback crashed")
                        for r in saved]
            for c in _try(lambda k=kind, rs=saved: k.restore(rs, marks, self.env), fallback):
                results.append(c)
                _log(c, commit)
        return results

    def converge(self, plan: Plan, should_stop: Callable[[], bool] = lambda: False,
                 mark: Callable[[Change, list[int] | None], None] = lambda c, sig: None
                 ) -> tuple[list[Change], dict[str, Any]]:
        """Apply the planned steps in order; return the Changes and the new manifest.
        `mark` hears of every change made, right after the agent made it (the journal)."""
        results: list[Change] = []
        manifest: dict[str, Any] = {}
        done: list[tuple[Resource, Change]] = []
        self._clean_tmp(plan)
        try:
            self._steps(plan, should_stop, mark, results, manifest, done)
        finally:
            self.host.settle()  # staged writes: leftovers removed, directories durable
        for kind in KINDS.values():
            for c in kind.finish(self.env):
                results.append(c)
                _log(c, plan.commit)
        for kind in KINDS.values():
            for c in kind.handlers(done, self.env, should_stop):
                results.append(c)
                _log(c, plan.commit)
                if c.changed:
                    mark(c, None)
        # The other signatures last: writing a file bumps its directory's mtime, so a
        # directory's signature taken before its files were written would never match.
        for entry in manifest.values():
            if "path" in entry and "sig" not in entry:
                entry["sig"] = signature(self.host.join(entry["path"]))
        return results, manifest

    def _steps(self, plan: Plan, should_stop: Callable[[], bool],
               mark: Callable[[Change, list[int] | None], None], results: list[Change],
               manifest: dict[str, Any], done: list[tuple[Resource, Change]]) -> None:
        batched: dict[str, Change] = {}
        started: set[str] = set()
        stage = None
        for step in plan.steps:
            ident = step.change.id
            if step.stage != stage:
                stage = step.stage
                self.host.forget_ids()  # the stage before may have made users or groups
            res = step.resource
            kind = KINDS[res.kind if res is not None else (step.prune_entry or {})["kind"]]
            if kind.name not in started:
                started.add(kind.name)
                for c in kind.before(self.env):
                    results.append(c)
                    _log(c, plan.commit)
                _try(lambda k=kind, st=step.stage: k.prepare(
                    [(s.resource, s.change) for s in plan.steps
                     if s.stage == st and s.resource is not None], self.env), None)
            if should_stop():
                results.append(Change(ident, failed=True, msg="not applied: shutting down"))
                if ident in self.old:
                    manifest[ident] = self.old[ident]
                continue
            if res is None:
                entry = step.prune_entry or {}
                change = _guard(ident, lambda k=kind, i=ident, e=entry: k.prune(
                    i, e, self.env, dry=False) or Change(i, msg="no longer declared; left"))
                if change.failed:
                    manifest[ident] = entry
            else:
                if kind.batch and ident not in batched:
                    items = [(s.resource, s.change) for s in plan.steps
                             if s.resource is not None and s.resource.kind == kind.name]
                    fallback = [Change(r.identity, failed=True, msg=f"{kind.name} operation "
                                       f"crashed") for r, _ in items]
                    for c in _try(lambda k=kind, it=items: k.apply(it, self.env), fallback):
                        batched[c.id] = c
                if kind.batch:
                    change = batched.get(ident, step.change)
                elif step.change.failed or not step.change.changed:
                    change = step.change
                else:
                    change = _guard(ident, lambda k=kind, r=res, c=step.change: k.apply_one(
                        r, c, self.env))
                self._record(kind, res, change, manifest)
                done.append((res, change))
            results.append(change)
            _log(change, plan.commit)
            if change.changed and not change.failed:
                entry = manifest.get(ident)
                if entry is not None and "path" in entry and res is not None \
                        and res.kind != "directory":
                    # the signature of the agent's own write, taken now: an edit later
                    # in this cycle is drift, not ours (a directory's own comes last)
                    entry["sig"] = signature(self.host.join(entry["path"]))
                mark(change, (entry or {}).get("sig"))

    def _record(self, kind: Kind, res: Resource, change: Change,
                manifest: dict[str, Any]) -> None:
        ident = res.identity
        if change.failed:
            if ident in self.old:
                manifest[ident] = self.old[ident]
            return
        entry = kind.record(res, change)
        if entry is not None:
            if "path" in entry and "sig" in change.data:
                entry["sig"] = change.data["sig"]
            manifest[ident] = entry

    def _clean_tmp(self, plan: Plan) -> None:
        """Temp files of a killed agent (kill -9 between write and rename) in managed
        directories are removed before anything else is written there."""
        self._clean_dirs((s.resource.kind, s.resource.name) for s in plan.steps
                         if s.resource is not None)

    def _clean_dirs(self, resources: Iterable[tuple[str, str]]) -> None:
        """The stale temp files in the directories of these (kind, name) path resources."""
        dirs = set()
        for kind_name, name in resources:
            kind = KINDS.get(kind_name)
            path = kind.path(name) if kind is not None else None
            if path:
                dirs.add(os.path.dirname(path))
        for d in sorted(dirs):
            for tmp in self.host.clean_stale_tmp(d):
                log.info("converge: removed %s, left by an interrupted agent", tmp,
                         extra={"STAGE": "converge"})


def plan_digest(desired: DesiredState) -> str:
    """What this host would be made into: every declared resource's digest and the
    health settings. Two commits with the same plan digest are the same change here."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps(desired.health, sort_keys=True).encode())
    for ident, digest in sorted((r.identity, r.digest()) for r in desired.resources):
        h.update(f"{ident}\0{digest}\n".encode())
    return h.hexdigest()


def _try(fn: Callable[[], Any], default: Any) -> Any:
    try:
        return fn()
    except (AgentError, OSError) as e:
        log.error("converge: %s", e)
        return default


def _guard(ident: str, fn: Callable[[], Change]) -> Change:
    """A failing resource becomes a failed Change; it never stops the others."""
    try:
        return fn()
    except EscapeError as e:
        return Change(ident, failed=True, msg=str(e), data={"refused": True})
    except AgentError as e:
        return Change(ident, failed=True, msg=str(e))
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        return Change(ident, failed=True, msg=f"{e.strerror or e}{where}")


def _log(change: Change, commit: str) -> None:
    if change.failed:
        log.error("converge: %s failed @%s: %s", change.id, commit[:7], change.msg,
                  extra={"RESOURCE": change.id, "COMMIT": commit, "STAGE": "converge"})
    elif change.changed:
        log.info("converge: %s %s @%s: %s", change.id, change.action, commit[:7], change.msg,
                 extra={"RESOURCE": change.id, "COMMIT": commit, "STAGE": "converge"})


def clean(manifest: dict[str, Any], host: Host) -> bool:
    """The fast path: every managed resource is a path that still has the stat signature
    recorded after the last apply, so nothing drifted and a full check can be skipped. A
    resource without a signature (a service, a sysctl) always takes the full path."""
    for entry in manifest.get("resources", {}).values():
        sig = entry.get("sig")
        if "path" not in entry or sig is None:
            return False
        if signature(host.join(entry["path"])) != sig:
            return False
    return True
