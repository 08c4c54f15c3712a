"""plan() and converge(): desired state vs the host and the last applied manifest.

Owns: the order of a cycle (packages → directories/files/symlinks → unit files →
daemon-reload → services → notified restarts/reloads), pruning of what the previous
revision managed and this one no longer declares, batching (one package query, one
install, one removal, one `systemctl show`), and the new manifest.
Must not: fetch, verify or render; it gets a DesiredState and a manifest.

A failed resource does not stop unrelated ones; the caller sees `failed` and keeps
last good where it was.
"""

from __future__ import annotations

import logging
import os
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
PATH_KINDS = (*FILE_KINDS, "unit")  # kinds that are a path on the host


def order(resources: list[Resource]) -> list[Resource]:
    """Stage order; within the file stage, parents before children (by path parts)."""
    def key(r: Resource) -> tuple:
        stage = _STAGE.get(r.kind, 9)
        return (stage, tuple(r.name.split("/")) if stage in (1, 2) else ())
    return sorted(resources, key=key)


def target_path(kind: str, name: str) -> str:
    if kind == "unit":
        from .resources.systemd import unit_path

        return unit_path(name)
    return name


@dataclass
class Step:
    """One planned change: a declared resource, or a prune of a no-longer-declared one."""

    change: Change
    resource: Resource | None = None
    prune_entry: dict[str, Any] | None = None
    stage: int = 1


@dataclass
class Plan:
    commit: str
    steps: list[Step] = field(default_factory=list)

    @property
    def changes(self) -> list[Change]:
        return [s.change for s in self.steps]


class Converger:
    def __init__(self, host: Host, state: StateDir, manifest: dict[str, Any],
                 full_check: bool = True, package_backend: str | None = None) -> None:
        self.host = host
        self.state = state
        self.old = manifest.get("resources", {})
        self.full_check = full_check
        self.package_backend = package_backend
        self._pkgs: Any = None
        self._systemd: Any = None

    # --- helpers -----------------------------------------------------------------------

    @property
    def pkgs(self) -> Any:
        if self._pkgs is None:
            from .resources.packages import Packages, backend_for

            self._pkgs = Packages(self.host, backend_for(self.host.root, self.package_backend))
        return self._pkgs

    @property
    def systemd(self) -> Any:
        if self._systemd is None:
            from .resources.systemd import Systemd

            self._systemd = Systemd(self.host)
        return self._systemd

    def _ctx(self, ident: str) -> file_res.Ctx:
        return file_res.Ctx(self.host, self.state, self.old.get(ident, {}))

    @staticmethod
    def _as_file(res: Resource) -> Resource:
        """A unit file is converged as a file at /etc/systemd/system/NAME."""
        from .render import Resource as R

        return R("file", target_path("unit", res.name), {"state": "present", "mode": "0644"},
                 res.origin, res.content)

    def _check_path(self, res: Resource) -> Change:
        target = self._as_file(res) if res.kind == "unit" else res
        old = self.old.get(res.identity)
        if (not self.full_check and old and old.get("digest") == res.digest()
                and old.get("sig") is not None
                and file_res.signature(self.host.join(target.name)) == old["sig"]):
            # same desired state as applied, and the path's stat signature is unchanged
            return Change(res.identity, msg="unchanged since last apply (stat signature)",
                          data={k: old[k] for k in ("backup", "created") if k in old})
        change = file_res.check(target, self._ctx(res.identity))
        change.id = res.identity
        return change

    def _apply_path(self, res: Resource) -> Change:
        target = self._as_file(res) if res.kind == "unit" else res
        change = file_res.apply(target, self._ctx(res.identity))
        change.id = res.identity
        return change

    def _prune(self, ident: str, entry: dict[str, Any], dry: bool) -> Change:
        kind = entry.get("kind", "")
        path = entry.get("path", entry["name"])
        done = ""
        if kind == "unit" and not dry and self.host.lstat(path) is not None:
            done = self.systemd.stop_and_disable(entry["name"]) + ", "
        change = file_res.prune(ident, path, entry, self._ctx(ident), dry=dry)
        if done and change.changed:
            change.msg = done + change.msg
        return change

    # --- plan --------------------------------------------------------------------------

    def plan(self, desired: DesiredState) -> Plan:
        """Read-only: what converge would change now, with diffs."""
        plan = Plan(desired.commit)
        declared = desired.by_id()
        ordered = order(desired.resources)
        packages = [r for r in ordered if r.kind == "package"]
        services = [r for r in ordered if r.kind == "service"]
        installed: dict = {}
        refused = self.pkgs.refuse() if packages else None
        candidates: dict = {}
        if packages and refused is None:
            installed = _try(lambda: self.pkgs.query([r.name for r in packages]), {})
            latest = [r.name for r in packages if r.spec.get("state") == "latest"]
            if latest:  # one more process, only when something asks for `latest`
                candidates = _try(lambda: self.pkgs.candidates(latest), {})
        svc_state = _try(lambda: self.systemd.show([r.name for r in services]), {}) \
            if services else {}
        for res in ordered:
            stage = _STAGE.get(res.kind, 9)
            if res.kind == "package":
                from .resources import packages as pk

                change = (Change(res.identity, failed=True, msg=refused) if refused
                          else pk.check(res, installed, candidates))
            elif res.kind == "service":
                change = _guard(res.identity, lambda r=res: self.systemd.check_service(
                    r, svc_state.get(r.name)))
            else:
                change = _guard(res.identity, lambda r=res: self._check_path(r))
            plan.steps.append(Step(change, res, stage=stage))
        gone = [(i, e) for i, e in self.old.items()
                if i not in declared and e.get("kind") in PATH_KINDS]
        # children before parents, so a directory dropped with its children is empty by
        # the time its own prune comes (sorting identities would put `dir[/a]` first)
        gone.sort(key=lambda ie: tuple(str(ie[1].get("path", ie[1].get("name", "")))
                                       .split("/")), reverse=True)
        for ident, entry in gone:
            plan.steps.append(Step(
                _guard(ident, lambda i=ident, e=entry: self._prune(i, e, dry=True)),
                prune_entry=entry, stage=_STAGE[entry["kind"]]))
        plan.steps.sort(key=lambda s: s.stage)  # stable: declared before prunes in a stage
        return plan

    # --- converge ----------------------------------------------------------------------

    def converge(self, plan: Plan, should_stop: Callable[[], bool] = lambda: False
                 ) -> tuple[list[Change], dict[str, Any]]:
        """Apply the planned steps in order; return the Changes and the new manifest."""
        results: list[Change] = []
        manifest: dict[str, Any] = {}
        by_id: dict[str, Change] = {}
        self._clean_tmp(plan)
        pkg_steps = [s for s in plan.steps if s.resource is not None
                     and s.resource.kind == "package"]
        if pkg_steps and not should_stop():
            todo = [(s.resource, s.change) for s in pkg_steps
                    if s.change.changed and not s.change.failed]
            if todo:
                for ch in _try(lambda: self.pkgs.apply(todo), [
                        Change(r.identity, failed=True, msg="package operation crashed")
                        for r, _ in todo]):
                    by_id[ch.id] = ch
        # a package may have created a user or group that a file names as its owner
        self.host.forget_ids()
        # a package may have shipped or removed unit files: systemd must re-read them
        # before the service stage, as a Debian postinst would make it do
        units_changed = any(c.changed and not c.failed for c in by_id.values())
        reloaded = False
        for step in plan.steps:
            ident = step.change.id
            if step.stage >= 3 and units_changed and not reloaded:
                reloaded = True
                rc = self.systemd.daemon_reload()
                if rc.failed or rc.changed:
                    results.append(rc)
                    _log(rc, plan.commit)
            if should_stop():
                results.append(Change(ident, failed=True, msg="not applied: shutting down"))
                if ident in self.old:
                    manifest[ident] = self.old[ident]
                continue
            res = step.resource
            if res is None:
                entry = step.prune_entry or {}
                change = _guard(ident, lambda i=ident, e=entry: self._prune(i, e, dry=False))
                if change.failed:
                    manifest[ident] = entry
                if entry.get("kind") == "unit" and change.changed:
                    units_changed = True
            else:
                change = self._apply_step(step, by_id)
                if res.kind == "unit" and change.changed and not change.failed:
                    units_changed = True
                self._record(res, change, manifest)
            results.append(change)
            _log(change, plan.commit)
        if units_changed and not reloaded:
            rc = self.systemd.daemon_reload()
            results.append(rc)
            _log(rc, plan.commit)
        results.extend(self._handlers(plan, results, should_stop))
        # Signatures last: writing a file bumps its directory's mtime, so a directory's
        # signature taken before its files were written would never match again.
        for entry in manifest.values():
            if entry.get("kind") in PATH_KINDS:
                entry["sig"] = file_res.signature(
                    self.host.join(entry.get("path", entry["name"])))
        return results, manifest

    def _clean_tmp(self, plan: Plan) -> None:
        """Temp files of a killed agent (kill -9 between write and rename) in managed
        directories are removed before anything else is written there."""
        dirs = set()
        for step in plan.steps:
            res = step.resource
            if res is not None and res.kind in PATH_KINDS:
                dirs.add(os.path.dirname(target_path(res.kind, res.name)))
        for d in sorted(dirs):
            for name in self.host.clean_stale_tmp(d):
                log.info("converge: removed %s, left by an interrupted agent", name,
                         extra={"STAGE": "converge"})

    def _apply_step(self, step: Step, by_id: dict[str, Change]) -> Change:
        res = step.resource
        assert res is not None
        if step.change.failed or not step.change.changed:
            return step.change
        if res.kind == "package":
            return by_id.get(res.identity, step.change)
        if res.kind == "service":
            return _guard(res.identity, lambda: self._service_now(res))
        return _guard(res.identity, lambda: self._apply_path(res))

    def _service_now(self, res: Resource) -> Change:
        """Re-check right before acting: daemon-reload or a package may have changed it."""
        planned = self.systemd.check_service(res, self.systemd.show([res.name]).get(res.name))
        if planned.failed or not planned.changed:
            return planned
        return self.systemd.apply_service(res, planned)

    def _record(self, res: Resource, change: Change, manifest: dict[str, Any]) -> None:
        ident = res.identity
        if res.spec.get("state") == "absent" or res.kind == "package":
            return
        if change.failed:
            if ident in self.old:
                manifest[ident] = self.old[ident]
            return
        entry: dict[str, Any] = {"kind": res.kind, "name": res.name, "digest": res.digest()}
        if res.kind in PATH_KINDS:
            entry["path"] = target_path(res.kind, res.name)
            entry.update({k: v for k, v in change.data.items() if k in ("backup", "created")})
        manifest[ident] = entry

    def _handlers(self, plan: Plan, results: list[Change],
                  should_stop: Callable[[], bool]) -> list[Change]:
        """Restart (or reload) each notified service once, after everything else."""
        changed = {c.id for c in results if c.changed and not c.failed}
        started = {c.id for c in results if c.data.get("started")}
        services = {s.resource.name: s.resource for s in plan.steps
                    if s.resource is not None and s.resource.kind == "service"}
        wanted: list[str] = []
        for step in plan.steps:
            res = step.resource
            if res is None or res.identity not in changed:
                continue
            for name in res.notify:
                if name not in wanted:
                    wanted.append(name)
        out = []
        for name in wanted:
            svc = services.get(name)
            if f"service[{name}]" in started:
                continue  # just started with the new configuration
            if svc is not None and (svc.spec.get("active") is False or svc.spec.get("masked")):
                continue
            if should_stop():
                break
            change = self.systemd.notify(name, bool(svc and svc.spec.get("reload")))
            out.append(change)
            _log(change, plan.commit)
        return out


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
    """The fast path: every managed path still has the stat signature recorded after
    the last apply, so nothing drifted and a full check can be skipped. Packages and
    services have no signature: a manifest with them always takes the full path."""
    for entry in manifest.get("resources", {}).values():
        sig = entry.get("sig")
        if entry.get("kind") not in PATH_KINDS or sig is None:
            return False
        if file_res.signature(host.join(entry.get("path", entry["name"]))) != sig:
            return False
    return True
