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

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import Change

if TYPE_CHECKING:
    from ..host import Host
    from ..render import Resource

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
        return Change(res.identity, changed=True, action=planned.action, msg=planned.msg,
                      data={"started": "start" in planned.data.get("steps", [])})

    def stop_and_disable(self, name: str) -> str:
        """Before a unit file is deleted: stop it and disable it; returns what was done."""
        if self.sandbox:
            self.host.run(self.ctl("disable", name))
            return "disabled"
        self.host.run(["systemctl", "disable", "--now", name])
        return "stopped, disabled"

    def notify(self, name: str, reload: bool) -> Change:
        verb = "reload" if reload else "restart"
        ident = f"service[{name}]"
        if self.sandbox:
            return Change(ident, msg=f"{verb} skipped: sandbox root has no running systemd")
        r = self.host.run(["systemctl", verb, name])
        return Change(ident, changed=r.ok, failed=not r.ok, action=verb,
                      msg=f"{verb}ed (notified)" if r.ok else
                      f"systemctl {verb} {name}: {r.error_text()}")
