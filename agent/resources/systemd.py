"""unit and service resources.

Unit files and drop-ins are files under /etc/systemd/system (below root), written and
pruned by the file resource code; this module adds what systemd needs around them:
one `systemctl daemon-reload` after all unit writes of a cycle (none when nothing
changed), stop+disable before a unit file is deleted, and services: one
`systemctl show` for all declared services, then enable/disable (with `--root` under a
sandbox root), start/stop, mask/unmask, and the notified restarts or reloads at the
end of the cycle. Runtime operations (start, stop, restart, daemon-reload) need a
running systemd, so they are refused unless root is `/`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import RenderError
from ..model import Change, Resource, identity
from .base import REBOOT, Env, Kind, ParseCtx, parse_names
from .files import Ctx as FileCtx
from .files import apply as file_apply
from .files import check as file_check
from .files import prune as file_prune
from .files import restore_paths, snapshot_path

if TYPE_CHECKING:
    from ..host import Host

_UNIT_KEYS = {"content", "template", "source", "notify"}
_SERVICE_KEYS = {"enabled", "active", "masked", "reload"}
# systemd's unit name rules (unit_name_is_valid): a prefix of [A-Za-z0-9:_.\\-], an
# optional @instance, a known type suffix, at most 255 characters; drop-ins live in
# NAME.TYPE.d/ (or TYPE.d/ for every unit of a type) and must end in .conf
UNIT_TYPES = ("service", "socket", "device", "mount", "automount", "swap", "target", "path",
              "timer", "slice", "scope")
_UNIT_CHARS = r"[A-Za-z0-9:_.\\-]"
_UNIT_RE = (_UNIT_CHARS + r"+(?:@" + _UNIT_CHARS + r"*)?\.(?:" + "|".join(UNIT_TYPES) + ")")
_UNIT_NAME = re.compile(r"^(?=.{1,255}$)" + _UNIT_RE + "$")
_DROPIN = re.compile(r"^(?:(?=[^/]{1,255}/)" + _UNIT_RE + "|" + "|".join(UNIT_TYPES)
                     + r")\.d/[A-Za-z0-9:_.@\\-]{1,250}\.conf$")

UNIT_DIR = "/etc/systemd/system"
SHOW_PROPS = ["Id", "LoadState", "ActiveState", "UnitFileState", "MainPID"]


def unit_path(name: str) -> str:
    return f"{UNIT_DIR}/{name}"


@dataclass
class ServiceState:
    id: str
    load: str = ""
    active: str = ""
    unit_file: str = ""
    main_pid: int = 0

    @property
    def enabled(self) -> bool:
        return self.unit_file in ("enabled", "enabled-runtime", "static", "alias",
                                  "indirect", "generated")

    @property
    def masked(self) -> bool:
        return self.load == "masked" or self.unit_file.startswith("masked")

    @property
    def running(self) -> bool:
        return self.active in ("active", "activating", "reloading")


def parse_show(out: str) -> dict[str, ServiceState]:
    """`systemctl show -p Id,LoadState,... a.service b.service` prints one block of
    `Key=value` lines per unit, blocks separated by an empty line:

        Id=nginx.service
        LoadState=loaded
        ActiveState=active
        UnitFileState=enabled
        MainPID=812
    """
    states: dict[str, ServiceState] = {}
    for block in out.strip().split("\n\n"):
        kv = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        if not kv.get("Id"):
            continue
        pid = kv.get("MainPID", "0")
        states[kv["Id"]] = ServiceState(kv["Id"], kv.get("LoadState", ""),
                                        kv.get("ActiveState", ""), kv.get("UnitFileState", ""),
                                        int(pid) if pid.isdigit() else 0)
    return states


class Systemd:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.sandbox = host.root != "/"

    def ctl(self, *args: str) -> list[str]:
        return ["systemctl", *(["--root", self.host.root] if self.sandbox else []), *args]

    def show(self, names: list[str]) -> dict[str, ServiceState]:
        if not names:
            return {}
        if self.sandbox:
            return {n: self._offline_state(n) for n in names}
        r = self.host.run(["systemctl", "show", "-p", ",".join(SHOW_PROPS), "--", *names])
        return parse_show(r.stdout.decode(errors="replace"))

    def _offline_state(self, name: str) -> ServiceState:
        r = self.host.run(self.ctl("is-enabled", name))
        return ServiceState(name, "masked" if r.stdout.strip() == b"masked" else "",
                            "", r.stdout.decode(errors="replace").strip())

    def daemon_reload(self) -> Change:
        if self.sandbox:
            return Change("systemd[daemon-reload]", msg="sandbox root: no running systemd")
        r = self.host.run(["systemctl", "daemon-reload"])
        return Change("systemd[daemon-reload]", changed=r.ok, failed=not r.ok,
                      action="daemon-reload", msg="daemon-reload" if r.ok else r.error_text())

    def check_service(self, res: Resource, st: ServiceState | None) -> Change:
        """Planned steps in order: (un)mask, enable/disable, start/stop."""
        spec = res.spec
        steps: list[str] = []
        st = st or ServiceState(res.name)
        if spec.get("masked") is True and not st.masked:
            steps.append("mask")
        if spec.get("masked") is False and st.masked:
            steps.append("unmask")
        masked = spec.get("masked", st.masked) and "unmask" not in steps
        if not masked:
            if spec.get("enabled") is True and not st.enabled:
                steps.append("enable")
            if spec.get("enabled") is False and st.enabled and st.unit_file != "static":
                steps.append("disable")
            if spec.get("active") is True and not st.running:
                steps.append("start")
        if spec.get("active") is False and st.running:
            steps.append("stop")
        if self.sandbox:
            runtime = [s for s in steps if s in ("start", "stop")]
            steps = [s for s in steps if s not in runtime]
            if runtime:
                return Change(res.identity, failed=True, msg=(
                    f"{' and '.join(runtime)} need a running systemd: refused with root "
                    f"{self.host.root} (enable/disable/mask use systemctl --root)"))
        if not steps:
            return Change(res.identity, msg=f"{st.active or 'unknown'}, "
                                            f"{st.unit_file or 'unknown'}, as declared")
        return Change(res.identity, changed=True, action="+".join(steps),
                      msg=", ".join(steps), data={"steps": steps})

    def apply_service(self, res: Resource, planned: Change) -> Change:
        for step in planned.data.get("steps", []):
            r = self.host.run(self.ctl(step, res.name))
            if not r.ok:
                return Change(res.identity, failed=True, action=planned.action,
                              msg=f"systemctl {step} {res.name}: {r.error_text()}")
        started = "start" in planned.data.get("steps", [])
        return Change(res.identity, changed=True, action=planned.action, msg=planned.msg,
                      data={"started": started, **({"health": {"systemd": res.name}}
                                                   if started and not self.sandbox else {})})

    def stop_and_disable(self, name: str) -> str:
        """Before a unit file is deleted: stop it and disable it; returns what was done."""
        if self.sandbox:
            self.host.run(self.ctl("disable", name))
            return "disabled"
        self.host.run(["systemctl", "disable", "--now", name])
        return "stopped, disabled"

    def notify(self, name: str, reload: bool) -> Change:
        verb = "reload" if reload else "restart"
        ident = identity("service", name)
        if self.sandbox:
            return Change(ident, msg=f"{verb} skipped: sandbox root has no running systemd")
        r = self.host.run(["systemctl", verb, name])
        return Change(ident, changed=r.ok, failed=not r.ok, action=verb,
                      msg=f"{verb}ed (notified)" if r.ok else
                      f"systemctl {verb} {name}: {r.error_text()}",
                      data={"health": {"systemd": name}, "notified": name})


def _systemd(env: Env) -> Systemd:
    return env.helper("systemd", lambda: Systemd(env.host))


def reload_if_needed(env: Env) -> list[Change]:
    """One daemon-reload after unit files (or packages, which ship them) changed, before
    services are acted on, or at the end; none when nothing changed."""
    if not env.flags.get("units_changed") or env.flags.get("reloaded"):
        return []
    env.flags["reloaded"] = True
    rc = _systemd(env).daemon_reload()
    return [rc] if rc.failed or rc.changed else []


class UnitKind(Kind):
    """Unit files and drop-ins under /etc/systemd/system, written as files."""

    name = "unit"
    role_key = "units"
    stage = 40
    by_path = True

    def parse(self, name: Any, spec: Any, where: str, ctx: ParseCtx) -> Resource:
        if not isinstance(name, str) or not (_UNIT_NAME.match(name) or _DROPIN.match(name)):
            raise RenderError(f"render: unit name {name!r} is not a unit file or drop-in: "
                              f"NAME.TYPE (TYPE one of {', '.join(UNIT_TYPES)}; letters, digits "
                              f"and :-_.@\\ only, at most 255 characters) or "
                              f"NAME.TYPE.d/FILE.conf ({where})")
        if not isinstance(spec, dict):
            raise RenderError(f"render: unit[{name}] must be a mapping ({where})")
        ctx.keys(spec, _UNIT_KEYS, f"unit[{name}]")
        sources = [k for k in ("content", "template", "source") if k in spec]
        if len(sources) != 1:
            raise RenderError(f"render: unit[{name}] needs exactly one of content, template "
                              f"or source ({where})")
        norm: dict[str, Any] = {sources[0]: spec[sources[0]] if sources[0] != "content" else None}
        if "notify" in spec:
            norm["notify"] = parse_names(spec["notify"], f"unit[{name}].notify",
                                         spec.where("notify"))
        content = ctx.content(spec, sources[0], f"unit[{name}]")
        return Resource("unit", name, norm, where, content)

    def path(self, name: str) -> str | None:
        return unit_path(name)

    def _as_file(self, res: Resource) -> Resource:
        # a unit rendered from secrets is a secret file: 0600 (systemd reads it as root),
        # never diffed, its prior contents sealed
        mode = "0600" if res.secrets else "0644"
        return Resource("file", unit_path(res.name), {"state": "present", "mode": mode},
                        res.origin, res.content, secret=res.secret, secrets=res.secrets)

    def _ctx(self, ident: str, env: Env) -> FileCtx:
        return FileCtx(env, env.old.get(ident, {}))

    def record(self, res: Resource, change: Change) -> dict[str, Any] | None:
        entry = super().record(res, change)
        if entry is not None and res.secrets:
            entry["secret"] = True  # its prune shows no content either
        return entry

    def check(self, res: Resource, observed: Any, env: Env) -> Change:
        change = file_check(self._as_file(res), self._ctx(res.identity, env))
        change.id = res.identity
        return change

    def apply_one(self, res: Resource, planned: Change, env: Env) -> Change:
        change = file_apply(self._as_file(res), self._ctx(res.identity, env))
        change.id = res.identity
        if change.changed and not change.failed:
            env.flags["units_changed"] = True
        return change

    def prune(self, ident: str, entry: dict[str, Any], env: Env, dry: bool) -> Change | None:
        path = entry.get("path", unit_path(entry["name"]))
        done = ""
        if not dry and env.host.lstat(path) is not None:
            done = _systemd(env).stop_and_disable(entry["name"]) + ", "
        change = file_prune(ident, path, entry, self._ctx(ident, env), dry=dry)
        if change.changed:
            if done:
                change.msg = done + change.msg
            if not dry:
                env.flags["units_changed"] = True
        return change

    def finish(self, env: Env) -> list[Change]:
        return reload_if_needed(env)

    def snapshot(self, ident: str, name: str, env: Env) -> dict[str, Any] | None:
        return snapshot_path(env, ident, unit_path(name))

    def restore(self, records: list[dict[str, Any]], marks: list[dict[str, Any]],
                env: Env) -> list[Change]:
        out = restore_paths(records, env, unit_path)
        if any(c.changed for c in out):
            env.flags["units_changed"] = True
        return out + reload_if_needed(env)


class ServiceKind(Kind):
    """enabled/active/masked services; notified restarts and reloads at the end."""

    name = "service"
    role_key = "services"
    stage = 50

    def parse(self, name: Any, spec: Any, where: str, ctx: ParseCtx) -> Resource:
        if not isinstance(name, str) or not _UNIT_NAME.match(
                name if "." in name else f"{name}.service"):
            raise RenderError(f"render: service name {name!r} is not a unit name like "
                              f"nginx.service ({where})")
        if not isinstance(spec, dict):
            raise RenderError(f"render: service[{name}] must be a mapping ({where})")
        ctx.keys(spec, _SERVICE_KEYS, f"service[{name}]")
        norm = {}
        for key in _SERVICE_KEYS:
            if key in spec:
                if not isinstance(spec[key], bool):
                    raise RenderError(f"render: service[{name}].{key} must be true or false "
                                      f"({spec.where(key)})")
                norm[key] = spec[key]
        if "." not in name:
            name = f"{name}.service"
        return Resource("service", name, norm, where)

    def query(self, resources: list[Resource], env: Env) -> Any:
        return _systemd(env).show([r.name for r in resources])

    def check(self, res: Resource, observed: Any, env: Env) -> Change:
        return _systemd(env).check_service(res, (observed or {}).get(res.name))

    def before(self, env: Env) -> list[Change]:
        return reload_if_needed(env)

    def apply_one(self, res: Resource, planned: Change, env: Env) -> Change:
        """Re-check right before acting: daemon-reload or a package may have changed it."""
        sd = _systemd(env)
        now = sd.check_service(res, sd.show([res.name]).get(res.name))
        if now.failed or not now.changed:
            return now
        return sd.apply_service(res, now)

    def handlers(self, steps: list[tuple[Resource, Change]], env: Env,
                 should_stop: Callable[[], bool]) -> list[Change]:
        """Restart (or reload) each notified service once, after everything else."""
        changed = {c.id for _, c in steps if c.changed and not c.failed}
        started = {c.id for _, c in steps if c.data.get("started")}
        services = {r.name: r for r, _ in steps if r.kind == self.name}
        wanted: list[str] = []
        for res, _ in steps:
            if res.identity not in changed:
                continue
            for name in res.notify:
                if name not in wanted and name != REBOOT:
                    wanted.append(name)
        out = []
        for name in wanted:
            svc = services.get(name)
            if identity(self.name, name) in started:
                continue  # just started with the new configuration
            if svc is not None and (svc.spec.get("active") is False or svc.spec.get("masked")):
                continue
            if should_stop():
                break
            out.append(_systemd(env).notify(name, bool(svc and svc.spec.get("reload"))))
        return out

    def snapshot(self, ident: str, name: str, env: Env) -> dict[str, Any] | None:
        st = _systemd(env).show([name]).get(name) or ServiceState(name)
        return {"enabled": st.enabled, "static": st.unit_file == "static",
                "active": st.running, "masked": st.masked}

    def restore(self, records: list[dict[str, Any]], marks: list[dict[str, Any]],
                env: Env) -> list[Change]:
        """Unit files are back and re-read (the unit kind's restore ran before this one):
        each service's mask, enable and active state as before, then a restart of every
        service the failed apply restarted or reloaded, so it runs the old configuration."""
        sd = _systemd(env)
        out = reload_if_needed(env)
        for rec in reversed(records):
            prior = rec["prior"]
            spec = {"masked": prior["masked"], "active": prior["active"]}
            if not prior.get("static"):
                spec["enabled"] = prior["enabled"]
            res = Resource(self.name, rec["name"], spec, "journal")
            now = sd.check_service(res, sd.show([res.name]).get(res.name))
            if now.failed or not now.changed:
                now.action = "rollback"
                out.append(now)
                continue
            done = sd.apply_service(res, now)
            done.action = "rollback"
            done.data = {}
            out.append(done)
        stopped = {r["name"] for r in records if not r["prior"]["active"]}
        for name in dict.fromkeys(m["notified"] for m in marks if m.get("notified")):
            if name in stopped or sd.sandbox:
                continue  # a service that was not running before stays as it is now
            st = sd.show([name]).get(name)
            # running, or failed on the new configuration: restarted on the old one
            if st is not None and (st.running or st.active == "failed"):
                c = sd.notify(name, reload=False)
                c.action, c.data = "rollback", {}
                c.msg = "restarted on the configuration before" if c.changed else c.msg
                out.append(c)
        return out



KINDS = [UnitKind(), ServiceKind()]
