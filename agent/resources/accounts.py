"""group and user resources, converged with shadow-utils.

    groups: {deploy: {gid: 1500}, ops: present}
    users:
      deploy: {uid: 1500, group: deploy, groups: [ops], shell: /bin/bash,
               home: /home/deploy, comment: Deploy, authorized_keys: ["ssh-ed25519 AAA..."]}

Observed state is the root's own /etc/passwd and /etc/group (one read each per cycle);
changes go through groupadd/groupmod/groupdel and useradd/usermod/userdel, with
`--prefix ROOT` under a sandbox root, so shadow-utils does the locking (lckpwdf) and
the atomic rewrite of passwd, shadow, group and gshadow, exactly as on a real host.
They run before files, so `owner: deploy` works in the cycle that creates deploy.
A user or group is removed (`state: absent`, or no longer declared) only when the
agent created it; one that was there before is never deleted. `groups:` is the exact
list of supplementary groups; `authorized_keys:` is the exact content of
HOME/.ssh/authorized_keys (0600, the .ssh directory 0700, both owned by the user).
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import AgentError, ApplyError, RenderError
from ..host import MAX_ID
from ..model import Change, Resource
from .base import Env, Kind, ParseCtx

_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_GROUP_KEYS = {"gid", "system", "state"}
_USER_KEYS = {"uid", "group", "groups", "shell", "home", "comment", "system", "state",
              "authorized_keys"}


def parse_passwd(text: str) -> dict[str, dict[str, Any]]:
    """`deploy:x:1500:1500:Deploy:/home/deploy:/bin/bash` lines, by name."""
    out = {}
    for line in text.splitlines():
        f = line.split(":")
        if len(f) >= 7 and f[2].isdigit() and f[3].isdigit():
            out[f[0]] = {"uid": int(f[2]), "gid": int(f[3]), "comment": f[4], "home": f[5],
                         "shell": f[6]}
    return out


def parse_group(text: str) -> dict[str, dict[str, Any]]:
    """`ops:x:1600:alice,bob` lines, by name."""
    out = {}
    for line in text.splitlines():
        f = line.split(":")
        if len(f) >= 4 and f[2].isdigit():
            out[f[0]] = {"gid": int(f[2]), "members": [m for m in f[3].split(",") if m]}
    return out


def _read(env: Env, path: str) -> str:
    try:
        return env.host.read(path).decode(errors="replace")
    except FileNotFoundError:
        return ""


def _accounts(env: Env) -> dict[str, dict[str, dict[str, Any]]]:
    return {"passwd": parse_passwd(_read(env, "/etc/passwd")),
            "group": parse_group(_read(env, "/etc/group"))}


def _argv(env: Env, tool: str, *args: str) -> list[str]:
    prefix = ["--prefix", env.host.root] if env.host.root != "/" else []
    return [tool, *prefix, *args]


def _run(env: Env, ident: str, argv: list[str]) -> None:
    if env.host.root != "/":
        # shadow-utils locks and rewrites ROOT/etc/*: the directory must exist
        env.host.at("/etc/passwd", create=True)
    r = env.host.run(argv)
    if not r.ok:
        raise ApplyError(f"{ident}: {' '.join(argv[:1] + argv[-1:])}: {r.error_text()}")


def _id(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise RenderError(f"render: {what} must be a whole number 0..{MAX_ID} ({where})")
    return value


def _state(spec: dict, what: str, where: str) -> str:
    state = spec.get("state", "present")
    if state not in ("present", "absent"):
        raise RenderError(f"render: {what}.state must be present or absent ({where})")
    return state


def _created(res_or_ident: str, exists: bool, env: Env) -> bool:
    """Did the agent make it? Remembered in the manifest from the cycle that did."""
    old = env.old.get(res_or_ident, {})
    return bool(old.get("created")) if exists else True


class _AccountKind(Kind):
    """What groups and users share: the removal rule, the manifest's `created` flag,
    and pruning with the kind's *del tool."""

    table = ""  # "group" or "passwd": where the name is looked up
    delete = ""  # groupdel or userdel
    pruned = ""  # what a prune says it did

    def _spec(self, name: Any, spec: Any, where: str, ctx: ParseCtx,
              keys: set[str]) -> dict[str, Any]:
        """A valid name, and `present`/`absent`/nothing/a mapping as a mapping."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise RenderError(f"render: {self.name} name {name!r} is not valid: lower-case "
                              f"letters, digits, '_' and '-', at most 32 ({where})")
        if spec in ("present", "absent"):
            spec = {"state": spec}
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise RenderError(f"render: {self.name}[{name}] must be present, absent or a "
                              f"mapping ({where})")
        if hasattr(spec, "where"):
            ctx.keys(spec, keys, f"{self.name}[{name}]")
        return spec

    def _absent(self, res: Resource, have: Any, change: Change) -> Change:
        """state: absent: removed only if the agent created it."""
        if have is None:
            change.msg = "absent, as declared"
        elif not change.data["created"]:
            change.failed = True
            change.msg = ("exists and was not created by the agent: it is never deleted "
                          "(remove it by hand if it must go)")
        else:
            change.changed, change.action, change.msg = True, "remove", self.delete
        return change

    def record(self, res: Resource, change: Change) -> dict[str, Any] | None:
        if res.spec["state"] == "absent":
            return None
        entry = super().record(res, change) or {}
        return {**entry, "created": bool(change.data.get("created"))}

    def prune(self, ident: str, entry: dict[str, Any], env: Env, dry: bool) -> Change | None:
        change = Change(ident, action="prune")
        if not entry.get("created"):
            change.msg = "no longer declared; existed before the agent, left in place"
            return change
        if entry["name"] not in _accounts(env)[self.table]:
            change.msg = "no longer declared and already gone"
            return change
        change.changed, change.msg = True, f"no longer declared: {self.pruned}"
        if not dry:
            _run(env, ident, _argv(env, self.delete, entry["name"]))
            env.host.forget_ids()
        return change


    def snapshot(self, ident: str, name: str, env: Env) -> dict[str, Any] | None:
        return {"exists": name in _accounts(env)[self.table]}

    def restore(self, records: list[dict[str, Any]], marks: list[dict[str, Any]],
                env: Env) -> list[Change]:
        """An account the failed apply created is deleted; changes to one that existed
        (groups, shell, keys) are not undone, and the rollback says so."""
        out = []
        for rec in reversed(records):
            change = Change(rec["id"], action="rollback")
            exists = rec["name"] in _accounts(env)[self.table]
            if rec["prior"]["exists"]:
                change.msg = ("existed before: changes to it are not rolled back" if exists
                              else "was removed by the failed apply: not made again")
                change.failed = not exists
            elif exists:
                try:
                    _run(env, rec["id"], _argv(env, self.delete, rec["name"]))
                    change.changed, change.msg = True, f"{self.delete}: created by the failed apply"
                except (AgentError, OSError) as e:
                    change.failed, change.msg = True, f"{self.delete} failed: {e}"
                env.host.forget_ids()
            else:
                change.msg = "absent, as before"
            out.append(change)
        return out


class GroupKind(_AccountKind):
    name = "group"
    role_key = "groups"
    stage = 10
    prune_stage = 12  # after users: a group dropped with its user may be its primary group
    table, delete, pruned = "group", "groupdel", "groupdel"

    def parse(self, name: Any, spec: Any, where: str, ctx: ParseCtx) -> Resource:
        spec = self._spec(name, spec, where, ctx, _GROUP_KEYS)
        norm: dict[str, Any] = {"state": _state(spec, f"group[{name}]", where)}
        if "gid" in spec:
            norm["gid"] = _id(spec["gid"], f"group[{name}].gid", where)
        if "system" in spec:
            if not isinstance(spec["system"], bool):
                raise RenderError(f"render: group[{name}].system must be true or false "
                                  f"({where})")
            norm["system"] = spec["system"]
        return Resource(self.name, name, norm, where)

    def query(self, resources: list[Resource], env: Env) -> Any:
        return _accounts(env)

    def check(self, res: Resource, observed: Any, env: Env) -> Change:
        have = (observed or {}).get("group", {}).get(res.name)
        change = Change(res.identity)
        change.data = {"created": _created(res.identity, have is not None, env)}
        if res.spec["state"] == "absent":
            return self._absent(res, have, change)
        if have is None:
            change.changed, change.action = True, "create"
            change.msg = "groupadd" + (f", gid {res.spec['gid']}" if "gid" in res.spec else "")
        elif "gid" in res.spec and have["gid"] != res.spec["gid"]:
            change.changed, change.action = True, "update"
            change.msg = f"gid {have['gid']} -> {res.spec['gid']}"
        else:
            change.msg = f"exists, gid {have['gid']}"
        return change

    def apply_one(self, res: Resource, planned: Change, env: Env) -> Change:
        if planned.action == "remove":
            _run(env, res.identity, _argv(env, "groupdel", res.name))
        elif planned.action == "create":
            args = (["-g", str(res.spec["gid"])] if "gid" in res.spec else []) + \
                   (["-r"] if res.spec.get("system") else [])
            _run(env, res.identity, _argv(env, "groupadd", *args, res.name))
        else:
            _run(env, res.identity, _argv(env, "groupmod", "-g", str(res.spec["gid"]),
                                          res.name))
        env.host.forget_ids()
        return planned


class UserKind(_AccountKind):
    name = "user"
    role_key = "users"
    stage = 11
    table, delete, pruned = "passwd", "userdel", "userdel (home kept)"

    def parse(self, name: Any, spec: Any, where: str, ctx: ParseCtx) -> Resource:
        spec = self._spec(name, spec, where, ctx, _USER_KEYS)
        ident = f"user[{name}]"
        norm: dict[str, Any] = {"state": _state(spec, ident, where)}
        if "uid" in spec:
            norm["uid"] = _id(spec["uid"], f"{ident}.uid", where)
        if "group" in spec:
            g = spec["group"]
            if not (isinstance(g, str) and _NAME.match(g)):
                raise RenderError(f"render: {ident}.group must be a group name ({where})")
            norm["group"] = g
        if "groups" in spec:
            gs = spec["groups"]
            if not isinstance(gs, list) or not all(isinstance(g, str) and _NAME.match(g)
                                                   for g in gs):
                raise RenderError(f"render: {ident}.groups must be a list of group names "
                                  f"({where})")
            norm["groups"] = sorted(set(gs))
        for key in ("shell", "home"):
            if key in spec:
                v = spec[key]
                if not isinstance(v, str) or not v.startswith("/") or ":" in v or "\n" in v \
                        or ".." in v.split("/"):
                    raise RenderError(f"render: {ident}.{key} must be an absolute path "
                                      f"({where})")
                norm[key] = v
        if "comment" in spec:
            c = spec["comment"]
            if not isinstance(c, str) or ":" in c or "\n" in c:
                raise RenderError(f"render: {ident}.comment must be one line without ':' "
                                  f"({where})")
            norm["comment"] = c
        if "system" in spec:
            if not isinstance(spec["system"], bool):
                raise RenderError(f"render: {ident}.system must be true or false ({where})")
            norm["system"] = spec["system"]
        if "authorized_keys" in spec:
            keys = spec["authorized_keys"]
            if not isinstance(keys, list) or not all(
                    isinstance(k, str) and k.strip() and "\n" not in k.strip() for k in keys):
                raise RenderError(f"render: {ident}.authorized_keys must be a list of "
                                  f"one-line public keys ({where})")
            norm["authorized_keys"] = [k.strip() for k in keys]
        if norm["state"] == "absent" and len(norm) > 1:
            raise RenderError(f"render: {ident} is absent but sets other keys ({where})")
        return Resource(self.name, name, norm, where)

    def query(self, resources: list[Resource], env: Env) -> Any:
        return _accounts(env)

    def _keys_file(self, res: Resource, home: str) -> str:
        return home.rstrip("/") + "/.ssh/authorized_keys"

    def check(self, res: Resource, observed: Any, env: Env) -> Change:
        acc = observed or {"passwd": {}, "group": {}}
        have = acc["passwd"].get(res.name)
        spec = res.spec
        change = Change(res.identity)
        change.data = {"created": _created(res.identity, have is not None, env)}
        if spec["state"] == "absent":
            return self._absent(res, have, change)
        if have is None:
            change.changed, change.action, change.msg = True, "create", "useradd"
            return change
        todo = []
        if "uid" in spec and have["uid"] != spec["uid"]:
            todo.append(f"uid {have['uid']} -> {spec['uid']}")
        if "group" in spec:
            gid = acc["group"].get(spec["group"], {}).get("gid")
            if gid is None or gid != have["gid"]:
                todo.append(f"group -> {spec['group']}")
        for key in ("shell", "home", "comment"):
            if key in spec and have[key] != spec[key]:
                todo.append(f"{key} {have[key] or '-'} -> {spec[key]}")
        if "groups" in spec:
            now = sorted(g for g, v in acc["group"].items() if res.name in v["members"])
            if now != spec["groups"]:
                todo.append(f"groups {','.join(now) or '-'} -> {','.join(spec['groups'])}")
        if "authorized_keys" in spec:
            want = ("\n".join(spec["authorized_keys"]) + "\n").encode()
            path = self._keys_file(res, spec.get("home", have["home"]))
            try:
                current = env.host.read(path)
            except (FileNotFoundError, ApplyError):
                current = None
            if current != want:
                todo.append("authorized_keys")
        if todo:
            change.changed, change.action, change.msg = True, "update", "; ".join(todo)
        else:
            change.msg = f"exists, uid {have['uid']}, as declared"
        return change

    def apply_one(self, res: Resource, planned: Change, env: Env) -> Change:
        spec = res.spec
        if planned.action == "remove":
            _run(env, res.identity, _argv(env, "userdel", res.name))
            env.host.forget_ids()
            return planned
        acc = _accounts(env)
        args: list[str] = []
        if "uid" in spec:
            args += ["-u", str(spec["uid"])]
        if "groups" in spec:
            args += ["-G", ",".join(spec["groups"])]
        for key, flag in (("shell", "-s"), ("home", "-d"), ("comment", "-c")):
            if key in spec:
                args += [flag, spec[key]]
        if planned.action == "create":
            if "group" in spec:
                args += ["-g", spec["group"]]
            elif res.name in acc["group"]:
                args += ["-g", res.name]  # a group of the user's name exists: join it
            else:
                args += ["-U"]  # its own group, as Debian's USERGROUPS_ENAB does
            args += ["-r", "-M"] if spec.get("system") else ["-m"]
            _run(env, res.identity, _argv(env, "useradd", *args, res.name))
        elif planned.msg != "authorized_keys":
            if "group" in spec:
                args += ["-g", spec["group"]]
            _run(env, res.identity, _argv(env, "usermod", *args, res.name))
        env.host.forget_ids()
        if "authorized_keys" in spec:
            self._write_keys(res, env)
        return planned

    def _write_keys(self, res: Resource, env: Env) -> None:
        have = _accounts(env)["passwd"].get(res.name)
        if have is None:
            raise ApplyError(f"{res.identity}: not in /etc/passwd after useradd")
        home = res.spec.get("home", have["home"])
        uid, gid = have["uid"], have["gid"]
        ssh = home.rstrip("/") + "/.ssh"
        st = env.host.lstat(ssh)
        if st is None:
            env.host.mkdir(ssh, 0o700, uid, gid)
        else:
            env.host.set_meta(ssh, 0o700, uid, gid, want_dir=True)
        data = ("\n".join(res.spec["authorized_keys"]) + "\n").encode()
        env.host.write_file(self._keys_file(res, home), data, 0o600, uid, gid)



KINDS = [GroupKind(), UserKind()]
