"""plan() and converge(): desired state vs the host and the last applied manifest.

Owns: the order of a cycle's changes (packages → directories/files/symlinks → unit
files → daemon-reload → services → notified restarts/reloads), pruning of what the
previous revision managed and this one no longer declares, and the new manifest.
Must not: fetch, verify or render; it gets a DesiredState and a manifest.

A failed resource does not stop unrelated ones; the caller sees `failed` and keeps
last good where it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import AgentError, EscapeError
from .host import Host
from .resources import FILE_KINDS, Change
from .resources import files as file_res

if TYPE_CHECKING:  # render is not imported on the no-drift fast path
    from .render import DesiredState, Resource
    from .state import StateDir

log = logging.getLogger("agent.converge")

_STAGE = {"package": 0, "directory": 1, "file": 1, "symlink": 1, "unit": 2, "service": 3}


def order(resources: list[Resource]) -> list[Resource]:
    """Stage order; within the file stage, parents before children (by path parts)."""
    def key(r: Resource) -> tuple:
        stage = _STAGE.get(r.kind, 9)
        return (stage, tuple(r.name.split("/")) if stage == 1 else (), )
    return sorted(resources, key=key)


@dataclass
class Step:
    """One planned change: a declared resource, or a prune of a no-longer-declared one."""

    change: Change
    resource: Resource | None = None
    prune_entry: dict[str, Any] | None = None


@dataclass
class Plan:
    commit: str
    steps: list[Step] = field(default_factory=list)

    @property
    def changes(self) -> list[Change]:
        return [s.change for s in self.steps]

    @property
    def pending(self) -> list[Change]:
        return [s.change for s in self.steps if s.change.changed or s.change.failed]


class Converger:
    def __init__(self, host: Host, state: StateDir, manifest: dict[str, Any],
                 full_check: bool = True) -> None:
        self.host = host
        self.state = state
        self.old = manifest.get("resources", {})
        self.full_check = full_check

    def _ctx(self, ident: str) -> file_res.Ctx:
        return file_res.Ctx(self.host, self.state, self.old.get(ident, {}))

    def _check(self, res: Resource) -> Change:
        if res.kind not in FILE_KINDS:
            return Change(res.identity, failed=True,
                          msg=f"{res.kind} resources are not supported by this agent yet")
        old = self.old.get(res.identity)
        if (not self.full_check and old and old.get("digest") == res.digest()
                and old.get("sig") is not None
                and file_res.signature(self.host.join(res.name)) == old["sig"]):
            # same desired state as applied, and the path's stat signature is unchanged
            return Change(res.identity, msg="unchanged since last apply (stat signature)",
                          data={k: old[k] for k in ("backup", "created") if k in old})
        return file_res.check(res, self._ctx(res.identity))

    def plan(self, desired: DesiredState) -> Plan:
        """Read-only: what converge would change now, with diffs."""
        plan = Plan(desired.commit)
        declared = desired.by_id()
        for res in order(desired.resources):
            plan.steps.append(Step(_guard(res.identity, lambda r=res: self._check(r)), res))
        for ident, entry in sorted(self.old.items(), reverse=True):  # children first
            if ident not in declared and entry.get("kind") in FILE_KINDS:
                plan.steps.append(Step(
                    _guard(ident, lambda i=ident, e=entry: file_res.prune(
                        i, e["name"], e, self._ctx(i), dry=True)), prune_entry=entry))
        return plan

    def converge(self, plan: Plan, should_stop: Callable[[], bool] = lambda: False
                 ) -> tuple[list[Change], dict[str, Any]]:
        """Apply the planned steps in order; return the Changes and the new manifest."""
        results: list[Change] = []
        manifest: dict[str, Any] = {}
        for step in plan.steps:
            ident = step.change.id
            if should_stop():
                results.append(Change(ident, failed=True, msg="not applied: shutting down"))
                if ident in self.old:
                    manifest[ident] = self.old[ident]
                continue
            if step.resource is not None:
                res = step.resource
                if step.change.failed or not step.change.changed:
                    change = step.change
                else:
                    change = _guard(ident, lambda r=res: file_res.apply(r, self._ctx(r.identity)))
                results.append(change)
                if res.spec.get("state") == "absent":
                    continue
                if change.failed and ident in self.old:
                    manifest[ident] = self.old[ident]
                elif not change.failed:
                    manifest[ident] = {"kind": res.kind, "name": res.name,
                                       "digest": res.digest(), **change.data}
            else:
                entry = step.prune_entry or {}
                change = _guard(ident, lambda i=ident, e=entry: file_res.prune(
                    i, e["name"], e, self._ctx(i), dry=False))
                results.append(change)
                if change.failed:
                    manifest[ident] = entry
            _log(change, plan.commit)
        # Signatures last: writing a file bumps its directory's mtime, so a directory's
        # signature taken before its files were written would never match again.
        for entry in manifest.values():
            if entry.get("kind") in FILE_KINDS:
                entry["sig"] = file_res.signature(self.host.join(entry["name"]))
        return results, manifest


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
    """The fast path: every managed path still has the stat signature recorded after
    the last apply, so nothing drifted and a full check can be skipped."""
    for entry in manifest.get("resources", {}).values():
        sig = entry.get("sig")
        if entry.get("kind") not in FILE_KINDS or sig is None:
            return False
        if file_res.signature(host.join(entry["name"])) != sig:
            return False
    return True
