"""sysctl resources: `sysctl: {net.ipv4.ip_forward: 1, vm.swappiness: 10}`.

Every declared key is persisted in one file, /etc/sysctl.d/60-gitops-agent.conf under
root (so it holds after a reboot, read by systemd-sysctl), and, when root is `/`, set
live through /proc/sys and checked there. Under a sandbox root only the file is
written: a sandbox has no kernel of its own. A key no longer declared leaves the file;
its running value stays until the next boot (the agent cannot know the value to go
back to, and guessing one is worse).
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import AgentError, RenderError
from ..model import Change, Resource
from .base import Env, Kind, ParseCtx

CONF = "/etc/sysctl.d/60-gitops-agent.conf"
HEADER = "# managed by gitops-agent: edits are overwritten\n"
# kernel.hostname, net.ipv4.conf.eth0/1.rp_filter ('/' stands for a '.' in a name)
_KEY = re.compile(r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_/@:-]+)+$")


def proc_path(key: str) -> str:
    """net.ipv4.ip_forward → /proc/sys/net/ipv4/ip_forward (eth0/1 → eth0.1)."""
    return "/proc/sys/" + "/".join(p.replace("/", ".") for p in key.split("."))


def normalize(value: str) -> str:
    """/proc/sys separates the fields of a multi-value key with tabs: compare words."""
    return " ".join(value.split())


def parse_conf(text: str) -> dict[str, str]:
    """`key = value` lines, as sysctl.d(5) reads them; comments and blanks skipped."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out[key.strip().lstrip("-")] = normalize(value)
    return out


def render_conf(values: list[tuple[str, str]]) -> bytes:
    return (HEADER + "".join(f"{k} = {v}\n" for k, v in values)).encode()


class SysctlKind(Kind):
    name = "sysctl"
    role_key = "sysctl"
    stage = 30

    def parse(self, name: Any, spec: Any, where: str, ctx: ParseCtx) -> Resource:
        if not isinstance(name, str) or not _KEY.match(name) or ".." in name:
            raise RenderError(f"render: sysctl key {name!r} is not a kernel parameter name "
                              f"like net.ipv4.ip_forward ({where})")
        if isinstance(spec, bool):
            spec = int(spec)
        if not isinstance(spec, int | str) or not str(spec).strip() or "\n" in str(spec):
            raise RenderError(f"render: sysctl[{name}] must be a value on one line, like 1 "
                              f"or \"32768 60999\" ({where})")
        return Resource(self.name, name, {"value": normalize(str(spec))}, where)

    def _live(self, env: Env) -> bool:
        return env.host.root == "/"

    def query(self, resources: list[Resource], env: Env) -> Any:
        try:
            conf = parse_conf(env.host.read(CONF).decode(errors="replace"))
        except FileNotFoundError:
            conf = {}
        live = {}
        if self._live(env):
            for r in resources:
                try:
                    live[r.name] = normalize(env.host.read_proc(proc_path(r.name)))
                except OSError:
                    live[r.name] = None
        return {"conf": conf, "live": live}

    def check(self, res: Resource, observed: Any, env: Env) -> Change:
        if observed is None:  # the query failed (logged): nothing to compare with
            return Change(res.identity, failed=True, msg=f"cannot read {CONF} or /proc/sys")
        want = res.spec["value"]
        conf, live = observed["conf"], observed["live"]
        change = Change(res.identity)
        if self._live(env) and res.name in live and live[res.name] is None:
            change.failed = True
            change.msg = f"{proc_path(res.name)} does not exist: no such kernel parameter here"
            return change
        todo = []
        if conf.get(res.name) != want:
            todo.append(f"{CONF}: {conf.get(res.name, 'unset')} -> {want}")
        if self._live(env) and live.get(res.name) != want:
            todo.append(f"live: {live.get(res.name)} -> {want}")
        if todo:
            change.changed, change.action, change.msg = True, "set", "; ".join(todo)
            change.data = {"live": bool(self._live(env) and live.get(res.name) != want)}
        else:
            change.msg = f"{want}, in {CONF}" + (" and live" if self._live(env) else "")
        return change

    batch = True

    def apply(self, items: list[tuple[Resource, Change]], env: Env) -> list[Change]:
        """One write of the file with every declared key, then the live values."""
        out = []
        wanted = [(r.name, r.spec["value"]) for r, c in items if not c.failed]
        data = render_conf(wanted)
        try:
            current = env.host.read(CONF)
        except FileNotFoundError:
            current = b""
        file_error = ""
        if any(c.changed for _, c in items) and current != data:
            try:
                env.host.write_file(CONF, data, 0o644, 0, 0)
            except OSError as e:
                file_error = f"writing {CONF}: {e.strerror}"
        for res, planned in items:
            if planned.failed or not planned.changed:
                out.append(planned)
                continue
            if file_error:
                out.append(Change(res.identity, failed=True, action="set", msg=file_error))
                continue
            if planned.data.get("live"):
                try:
                    env.host.write_proc(proc_path(res.name), res.spec["value"])
                except OSError as e:
                    out.append(Change(res.identity, failed=True, action="set",
                                      msg=f"{proc_path(res.name)}: {e.strerror}"))
                    continue
            out.append(Change(res.identity, changed=True, action="set", msg=planned.msg))
        return out

    def prune(self, ident: str, entry: dict[str, Any], env: Env, dry: bool) -> Change | None:
        key = entry["name"]
        change = Change(ident, action="prune")
        try:
            text = env.host.read(CONF).decode(errors="replace")
        except FileNotFoundError:
            text = ""
        conf = parse_conf(text)
        if key not in conf:
            change.msg = (f"no longer declared and not in {CONF}; the running value stays "
                          f"until reboot")
            return change
        rest = [(k, v) for k, v in conf.items() if k != key]
        change.changed = True
        change.msg = f"no longer declared: removed from {CONF} (running value kept until reboot)"
        if not dry:
            if rest:
                env.host.write_file(CONF, render_conf(rest), 0o644, 0, 0)
            else:
                env.host.remove(CONF)
        return change


    def snapshot(self, ident: str, name: str, env: Env) -> dict[str, Any] | None:
        try:
            conf: str | None = env.state.save_blob(env.host.read(CONF))
        except FileNotFoundError:
            conf = None
        live = None
        if self._live(env):
            try:
                live = normalize(env.host.read_proc(proc_path(name)))
            except OSError:
                pass
        return {"conf": conf, "live": live}

    def restore(self, records: list[dict[str, Any]], marks: list[dict[str, Any]],
                env: Env) -> list[Change]:
        """The file as it was before the apply (every record holds the same one), then
        each key's running value."""
        out = []
        if not records:
            return out
        file_error = ""
        try:
            blob = records[0]["prior"]["conf"]
            current = env.host.read(CONF) if env.host.lstat(CONF) is not None else None
            before = env.state.load_blob(blob) if blob else None
            if before is None and current is not None:
                env.host.remove(CONF)
            elif before is not None and before != current:
                env.host.write_file(CONF, before, 0o644, 0, 0)
        except (AgentError, OSError) as e:
            file_error = f"{CONF} cannot be put back: {getattr(e, 'strerror', None) or e}"
        for rec in reversed(records):
            change = Change(rec["id"], action="rollback", msg=f"{CONF} as before")
            live = rec["prior"].get("live")
            if file_error:
                change.failed, change.msg = True, file_error
            elif live is not None and self._live(env):
                try:
                    if normalize(env.host.read_proc(proc_path(rec["name"]))) != live:
                        env.host.write_proc(proc_path(rec["name"]), live)
                        change.changed, change.msg = True, f"live value {live} as before"
                except OSError as e:
                    change.failed = True
                    change.msg = f"{proc_path(rec['name'])}: {e.strerror}"
            out.append(change)
        return out


KINDS = [SysctlKind()]
