"""file, directory and symlink resources under the root prefix.

check() observes with lstat/read and says what would change, with a unified diff;
apply() re-observes and converges in one step. A file that existed before the agent
first managed it is backed up to state_dir (content, mode, owner) so that pruning
restores it instead of deleting it. Unspecified mode/owner/group keep what an
existing file has; new files get 0644 (directories 0755) and root:root.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import AgentError, ApplyError, RenderError
from ..host import kind_name, parse_id
from ..model import Change, Resource
from .base import Env, Kind, ParseCtx, parse_mode, parse_names

if TYPE_CHECKING:
    from ..host import Host
    from ..state import StateDir

FILE_KINDS = ("file", "directory", "symlink")
_FILE_KEYS = {"content", "template", "source", "secret", "format", "type", "target", "mode",
              "owner", "group", "state", "notify"}
_SOURCES = ("content", "template", "source", "secret")

MAX_DIFF_BYTES = 256 * 1024


@dataclass
class Ctx:
    env: Env
    old: dict[str, Any]  # the previous manifest's entry for this resource, or {}

    @property
    def host(self) -> Host:
        return self.env.host

    @property
    def state(self) -> StateDir:
        return self.env.state


def signature(full: str) -> list[int] | None:
    """A stat signature, like git's index: equal signature ⇒ unchanged since recorded.

    ctime is in it because every content, mode or owner change bumps it and no
    user-space call can set it back, so `touch -d` or a same-size edit is still caught.
    """
    try:
        st = os.lstat(full)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return [st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
            st.st_ino]


def _mode_of(res: Resource, default: int) -> int:
    m = res.spec.get("mode")
    return int(m, 8) if m is not None else default


def _wanted(res: Resource, host: Host, regular: os.stat_result | None, dry: bool
            ) -> tuple[int, int, int, list[str]]:
    """The mode, uid and gid a file is written with (those of the regular file there now,
    `regular`, where the declaration says none), and the owners not made yet. Staging
    and the write itself both ask here, so a staged temp file matches the write."""
    mode = _mode_of(res, stat.S_IMODE(regular.st_mode) if regular is not None else 0o644)
    uid, gid, pending = _ids(res, host, regular, dry)
    return mode, uid, gid, pending


def _ids(res: Resource, host: Host, st: os.stat_result | None, dry: bool
         ) -> tuple[int, int, list[str]]:
    """uid, gid, and the owners that do not exist yet (only when planning)."""
    pending = []
    out = []
    for key, table, lookup, keep in (("owner", "passwd", host.uid, st.st_uid if st else 0),
                                     ("group", "group", host.gid, st.st_gid if st else 0)):
        if key not in res.spec:
            out.append(keep)
        elif dry and not host.has_id(table, res.spec[key]):
            pending.append(f"{key} {res.spec[key]}")
            out.append(-1)
        else:
            out.append(lookup(res.spec[key]))
    return out[0], out[1], pending


def text_diff(old: bytes, new: bytes, name: str) -> str:
    if old == new:
        return ""
    if len(old) > MAX_DIFF_BYTES or len(new) > MAX_DIFF_BYTES or b"\0" in old + new:
        return (f"binary or large content differs: sha256 {hashlib.sha256(old).hexdigest()[:12]}"
                f" -> {hashlib.sha256(new).hexdigest()[:12]}\n")
    try:
        a = old.decode().splitlines(keepends=True)
        b = new.decode().splitlines(keepends=True)
    except UnicodeDecodeError:
        return "non-UTF-8 content differs\n"
    if a:
        lines = list(difflib.unified_diff(a, b, f"a{name}", f"b{name}"))
    else:  # a new file: difflib's text without its matching (the first apply makes many)
        lines = [f"--- a{name}\n", f"+++ b{name}\n",
                 f"@@ -0,0 +1{f',{len(b)}' if len(b) != 1 else ''} @@\n",
                 *("+" + line for line in b)]
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n"
                   for line in lines)


def _meta_diff(st: os.stat_result, mode: int, uid: int, gid: int, host: Host) -> list[str]:
    out = []
    if stat.S_IMODE(st.st_mode) != mode:
        out.append(f"mode {stat.S_IMODE(st.st_mode):04o} -> {mode:04o}")
    if st.st_uid != uid:
        out.append(f"owner {host.user_name(st.st_uid)} -> "
                   f"{host.user_name(uid) if uid >= 0 else 'a user made this cycle'}")
    if st.st_gid != gid:
        out.append(f"group {host.group_name(st.st_gid)} -> "
                   f"{host.group_name(gid) if gid >= 0 else 'a group made this cycle'}")
    return out


def check(res: Resource, ctx: Ctx) -> Change:
    """What apply() would do now; reads only."""
    return _converge(res, ctx, dry=True)


def apply(res: Resource, ctx: Ctx, planned: Change | None = None) -> Change:
    return _converge(res, ctx, dry=False, planned=planned)


def _converge(res: Resource, ctx: Ctx, dry: bool, planned: Change | None = None) -> Change:
    if res.spec.get("state") == "absent":
        return _absent(res, ctx, dry)
    if res.kind == "directory":
        return _directory(res, ctx, dry)
    if res.kind == "symlink":
        return _symlink(res, ctx, dry)
    return _file(res, ctx, dry, planned)


def _takeover(res: Resource, st: os.stat_result | None, ctx: Ctx,
              dry: bool) -> dict[str, Any]:
    """Remember what was there before the agent first managed this path."""
    if ctx.old or dry:
        return {k: ctx.old[k] for k in ("backup", "created") if k in ctx.old}
    if st is None:
        return {"created": True}
    if stat.S_ISREG(st.st_mode):
        data = ctx.host.read(res.name)
        data, sealed = ctx.env.seal(res.identity, data, bool(res.secrets))
        name = ctx.state.save_backup(res.name, data, stat.S_IMODE(st.st_mode), st.st_uid,
                                     st.st_gid, sealed=sealed)
        return {"backup": name, "created": False}
    return {"created": False}


def _file(res: Resource, ctx: Ctx, dry: bool, planned: Change | None = None) -> Change:
    assert res.content is not None
    host = ctx.host
    st = host.lstat(res.name)
    if st is not None and not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        raise ApplyError(f"{res.name} is a {kind_name(st.st_mode)} on the host, not a file; "
                         f"refusing to replace it")
    regular = st is not None and stat.S_ISREG(st.st_mode)
    mode, uid, gid, pending = _wanted(res, host, st if regular else None, dry)
    old = host.read(res.name) if regular else b""
    change = Change(res.identity)
    # a secret's content is never diffed (nor one that replaces a secret): its keyed
    # fingerprint says which one it is
    diff = (lambda a, b, name: "") if res.secret or ctx.old.get("secret") else text_diff
    if not regular:
        what = "replace symlink with file" if st is not None else "create"
        change.changed, change.action = True, "create"
        size = f"secret {res.secret}" if res.secret else f"{len(res.content)} bytes"
        change.msg = f"{what} ({size}, mode {mode:04o})"
        # the plan's diff of a file it also found missing is the same text: not made twice
        change.diff = (planned.diff if planned is not None and planned.action == "create"
                       else diff(b"", res.content, res.name))
    elif old != res.content:
        change.changed, change.action = True, "update"
        meta = _meta_diff(st, mode, uid, gid, host)
        what = f"secret changed ({res.secret})" if res.secret else "content differs"
        change.msg = what + (f"; {', '.join(meta)}" if meta else "")
        change.diff = diff(old, res.content, res.name)
    else:
        meta = _meta_diff(st, mode, uid, gid, host)
        if meta:
            change.changed, change.action = True, "update"
            change.msg = ", ".join(meta)
            change.diff = "".join(f"  {m}\n" for m in meta)
        else:
            change.msg = ("secret unchanged, " if res.secret else "content, ") + \
                "mode and owner as declared"
    if pending:
        change.msg += f" ({', '.join(pending)} not on the host yet: resolved after packages)"
    change.data = _takeover(res, st, ctx, dry)
    if dry or not change.changed:
        return change
    if change.action == "create" or old != res.content or st.st_nlink > 1:
        # a second hard link may be somebody else's file: never chmod it, replace ours
        host.write_file(res.name, res.content, mode, uid, gid)
    else:
        host.set_meta(res.name, mode, uid, gid, want_dir=False)
    return change


def stage_writes(steps: list[tuple[Resource, Change]], host: Host) -> None:
    """Hand the host every new file content this stage will write, so that it can make
    them all durable with one sync instead of an fsync each (Host.stage). Left out: a
    file below a directory resource that changes in this stage (its temp file must not
    sit in a parent made 0755 before the directory's own mode and owner are set),
    owners that do not exist yet, and anything that is not a regular file now."""
    changing = {r.name for r, c in steps
                if r.kind == "directory" and c.changed and not c.failed}
    files = []
    with host.read_only():  # what is there now: nothing is written before host.stage
        for res, change in steps:
            if res.kind != "file" or not change.changed or change.failed \
                    or res.content is None or res.spec.get("state") == "absent":
                continue
            parts = res.name.split("/")  # ["", "srv", "app", "f.conf"]: /srv, /srv/app
            if changing and any("/".join(parts[:i]) in changing
                                for i in range(2, len(parts))):
                continue
            st = host.lstat(res.name)
            if st is not None and not stat.S_ISREG(st.st_mode):
                continue
            if st is not None and st.st_nlink == 1 and host.read(res.name) == res.content:
                continue  # mode or owner only: set in place, nothing to write
            mode, uid, gid, pending = _wanted(res, host, st, dry=True)
            if not pending:
                files.append((res.name, res.content, mode, uid, gid))
    host.stage(files)


def _directory(res: Resource, ctx: Ctx, dry: bool) -> Change:
    host = ctx.host
    st = host.lstat(res.name)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise ApplyError(f"{res.name} is a {kind_name(st.st_mode)} on the host, not a "
                         f"directory; refusing to replace it")
    mode = _mode_of(res, stat.S_IMODE(st.st_mode) if st else 0o755)
    uid, gid, pending = _ids(res, host, st, dry)
    change = Change(res.identity)
    if st is None:
        change.changed, change.action, change.msg = True, "create", f"create, mode {mode:04o}"
    else:
        meta = _meta_diff(st, mode, uid, gid, host)
        if meta:
            change.changed, change.action, change.msg = True, "update", ", ".join(meta)
        else:
            change.msg = "directory exists with mode and owner as declared"
    if pending:
        change.msg += f" ({', '.join(pending)} not on the host yet: resolved after packages)"
    change.data = _takeover(res, st, ctx, dry)
    if dry or not change.changed:
        return change
    if st is None:
        host.mkdir(res.name, mode, uid, gid)
    else:
        host.set_meta(res.name, mode, uid, gid, want_dir=True)
    return change


def _symlink(res: Resource, ctx: Ctx, dry: bool) -> Change:
    target = res.spec["target"]
    host = ctx.host
    st = host.lstat(res.name)
    change = Change(res.identity)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise ApplyError(f"{res.name} is a directory on the host, not a symlink; refusing to "
                         f"replace it")
    current = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        p = host.at(res.name)
        assert p is not None
        current = os.readlink(p[1], dir_fd=p[0])
    if current == target:
        change.msg = f"points to {target}"
    else:
        change.changed = True
        change.action = "create" if st is None else "update"
        change.msg = f"-> {target}" + (f" (was -> {current})" if current else
                                       " (replaces a file)" if st else "")
    change.data = _takeover(res, st, ctx, dry)
    if dry or not change.changed:
        return change
    host.symlink(res.name, target)
    return change


def _absent(res: Resource, ctx: Ctx, dry: bool) -> Change:
    host = ctx.host
    st = host.lstat(res.name)
    change = Change(res.identity)
    if st is None:
        change.msg = "absent as declared"
        return change
    if stat.S_ISDIR(st.st_mode):
        raise ApplyError(f"{res.name} is a directory; state: absent removes files and symlinks "
                         f"only")
    change.changed, change.action = True, "remove"
    change.msg = f"remove {kind_name(st.st_mode)}"
    if stat.S_ISREG(st.st_mode) and not ctx.old.get("secret"):
        change.diff = text_diff(host.read(res.name), b"", res.name)
    if not dry:
        host.remove(res.name)
    return change


def prune(ident: str, name: str, entry: dict[str, Any], ctx: Ctx, dry: bool) -> Change:
    """Undo management of a path the new revision no longer declares."""
    host = ctx.host
    st = host.lstat(name)
    change = Change(ident, action="prune")
    backup = entry.get("backup")
    secret = bool(entry.get("secret"))
    if backup:
        original = ctx.state.load_backup(backup)
        if original.get("sealed"):
            original["data"] = ctx.env.unseal(original["data"])
        current = host.read(name) if st is not None and stat.S_ISREG(st.st_mode) else b""
        change.changed, change.action = True, "restore"
        change.msg = "no longer declared: restore the original from before the agent managed it"
        change.diff = "" if secret else text_diff(current, original["data"], name)
        if not dry:
            # the backup stays: a rollback of this revision brings the entry back
            host.write_file(name, original["data"], original["mode"], original["uid"],
                            original["gid"])
        return change
    if st is None:
        change.msg = "no longer declared and already gone"
        return change
    if not entry.get("created"):
        change.msg = "no longer declared; existed before the agent, left in place"
        return change
    if stat.S_ISDIR(st.st_mode) and host.listdir(name):
        change.msg = "no longer declared; directory not empty, left in place"
        return change
    change.changed, change.msg = True, f"no longer declared: remove {kind_name(st.st_mode)}"
    if stat.S_ISREG(st.st_mode) and not secret:
        change.diff = text_diff(host.read(name), b"", name)
    if not dry:
        host.remove(name)
    return change


# --- the journal: the prior state of a path, and putting it back ---------------------------


def snapshot_path(env: Env, ident: str, path: str) -> dict[str, Any]:
    """What is at `path` now; a regular file's content goes to the blob store (sealed to
    the host's own recipient when `ident` is a secret one)."""
    host = env.host
    st = host.lstat(path)
    if st is None:
        return {"exists": False}
    meta = {"mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
    if stat.S_ISREG(st.st_mode):
        data, sealed = env.seal(ident, host.read(path))
        out = {"type": "file", "blob": env.state.save_blob(data), **meta}
        return {**out, "sealed": True} if sealed else out
    if stat.S_ISDIR(st.st_mode):
        return {"type": "directory", **meta}
    if stat.S_ISLNK(st.st_mode):
        p = host.at(path)
        assert p is not None
        return {"type": "symlink", "target": os.readlink(p[1], dir_fd=p[0])}
    return {"type": kind_name(st.st_mode)}  # never written by the agent: nothing to undo


def restore_path(ident: str, env: Env, path: str, prior: dict[str, Any]) -> Change:
    """Put `path` back as snapshot_path saw it; a no-op when it already is."""
    host = env.host
    change = Change(ident, action="rollback")
    st = host.lstat(path)
    if not prior.get("exists", True):
        if st is None:
            change.msg = "absent, as before"
        elif stat.S_ISDIR(st.st_mode) and host.listdir(path):
            change.msg = "created by the failed apply; not empty, left in place"
        else:
            host.remove(path)
            change.changed, change.msg = True, "removed (it did not exist before)"
        return change
    kind = prior.get("type")
    if kind == "file":
        data = env.state.load_blob(prior["blob"])
        if prior.get("sealed"):
            data = env.unseal(data)
        same = _as_before(host, path, st, prior, data)
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise ApplyError(f"{path} is a directory now; the file that was there cannot be "
                             f"put back")
        if not same:
            host.write_file(path, data, prior["mode"], prior["uid"], prior["gid"])
            change.changed, change.msg = True, "content, mode and owner as before"
    elif kind == "directory":
        if st is None:
            host.mkdir(path, prior["mode"], prior["uid"], prior["gid"])
            change.changed, change.msg = True, "directory made again"
        elif (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) != (
                prior["mode"], prior["uid"], prior["gid"]):
            host.set_meta(path, prior["mode"], prior["uid"], prior["gid"], want_dir=True)
            change.changed, change.msg = True, "directory mode and owner as before"
    elif kind == "symlink":
        current = None
        if st is not None and stat.S_ISLNK(st.st_mode):
            p = host.at(path)
            assert p is not None
            current = os.readlink(p[1], dir_fd=p[0])
        if current != prior["target"]:
            host.symlink(path, prior["target"])
            change.changed, change.msg = True, f"-> {prior['target']} as before"
    if not change.changed:
        change.msg = change.msg or "as before"
    return change


def _as_before(host: Host, path: str, st: os.stat_result | None, prior: dict[str, Any],
               data: bytes) -> bool:
    """The file at `path` (lstat `st`) is the prior one: its own, same mode, owner and
    content."""
    return (st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink == 1
            and (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            == (prior["mode"], prior["uid"], prior["gid"]) and host.read(path) == data)


def restore_paths(records: list[dict[str, Any]], env: Env,
                  path_of: Callable[[str], str]) -> list[Change]:
    out = []
    _stage_restores(records, env, path_of)
    try:
        for rec in reversed(records):
            ident = rec["id"]
            try:
                out.append(restore_path(ident, env, path_of(rec["name"]), rec["prior"]))
            except (ApplyError, AgentError, OSError) as e:
                out.append(Change(ident, failed=True, action="rollback", msg=f"cannot be put "
                                  f"back: {getattr(e, 'strerror', None) or e}"))
    finally:
        env.host.settle()
    return out


def _stage_restores(records: list[dict[str, Any]], env: Env,
                    path_of: Callable[[str], str]) -> None:
    """The prior contents a rollback will write, staged as a converge stages new ones
    (Host.stage): only plain (not sealed) files whose directory is there now and that
    differ from what is on disk. Anything odd is left to restore_path to report."""
    host = env.host
    files = []
    for rec in records:
        prior = rec.get("prior") or {}
        if prior.get("type") != "file" or not prior.get("exists", True) or prior.get("sealed"):
            continue
        path = path_of(rec["name"])
        try:
            if host.at(path) is None:
                continue  # its directory is made again by its own record first
            st = host.lstat(path)
            if st is not None and not stat.S_ISREG(st.st_mode):
                continue
            data = env.state.load_blob(prior["blob"])
            if _as_before(host, path, st, prior, data):
                continue
        except (AgentError, OSError, KeyError):
            continue
        files.append((path, data, prior["mode"], prior["uid"], prior["gid"]))
    host.stage(files)


class FileKind(Kind):
    """file, directory and symlink: one `files:` key, three kinds, one path namespace."""

    stage = 20
    by_path = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.role_key = "files" if name == "file" else ""

    def conflict_key(self, res: Resource) -> str:
        return f"path[{res.name}]"  # a file and a directory at one path conflict too

    def path(self, name: str) -> str | None:
        return name

    def parse(self, target: Any, spec: Any, where: str, ctx: ParseCtx) -> Resource:
        if not isinstance(target, str) or not target.startswith("/"):
            raise RenderError(f"render: file target {target!r} must be an absolute path ({where})")
        if ".." in target.split("/") or "\0" in target:
            raise RenderError(f"render: file target {target} contains '..' ({where})")
        target = "/" + "/".join(p for p in target.split("/") if p and p != ".")
        if not isinstance(spec, dict):
            raise RenderError(f"render: file[{target}] must be a mapping of options ({where})")
        ctx.keys(spec, _FILE_KEYS, f"file[{target}]")
        state = spec.get("state", "present")
        if state not in ("present", "absent"):
            raise RenderError(f"render: file[{target}].state must be present or absent "
                              f"({spec.where('state')})")
        kind = spec.get("type", "file")
        if kind not in FILE_KINDS:
            raise RenderError(f"render: file[{target}].type must be file, directory or "
                              f"symlink, got {kind!r} ({spec.where('type')})")
        norm: dict[str, Any] = {"state": state}
        for key in ("owner", "group"):
            if key in spec:
                v = spec[key]
                if isinstance(v, bool) or not isinstance(v, str | int):
                    raise RenderError(f"render: file[{target}].{key} must be a name or id "
                                      f"({spec.where(key)})")
                norm[key] = str(v)
                try:
                    parse_id(norm[key])
                except ValueError as e:
                    raise RenderError(f"render: file[{target}].{key}: {e} "
                                      f"({spec.where(key)})") from None
                if not norm[key] or any(c in norm[key] for c in ":\n/"):
                    raise RenderError(f"render: file[{target}].{key} {norm[key]!r} is not a "
                                      f"user or group name ({spec.where(key)})")
        if "mode" in spec:
            norm["mode"] = parse_mode(spec["mode"], f"file[{target}].mode", spec.where("mode"))
        if "notify" in spec:
            norm["notify"] = parse_names(spec["notify"], f"file[{target}].notify",
                                         spec.where("notify"))
        content = None
        sources = [k for k in _SOURCES if k in spec]
        if state == "absent":
            extra = sources + [k for k in ("target", "mode", "owner", "group", "format")
                               if k in spec]
            if extra:
                raise RenderError(f"render: file[{target}] is absent but sets {extra[0]} "
                                  f"({spec.where(extra[0])})")
        elif kind == "file":
            if len(sources) != 1 or "target" in spec:
                raise RenderError(f"render: file[{target}] needs exactly one of content, "
                                  f"template, source or secret ({where})")
            if "format" in spec:
                if sources[0] != "secret" or spec["format"] not in ("age", "sops"):
                    raise RenderError(f"render: file[{target}].format is age or sops, and "
                                      f"only with secret: ({spec.where('format')})")
                norm["format"] = spec["format"]
            content = ctx.content(spec, sources[0], f"file[{target}]")
            norm[sources[0]] = spec[sources[0]] if sources[0] != "content" else None
            if ctx.secret(f"file[{target}]") and "mode" not in norm:
                norm["mode"] = "0600"  # a secret is never world-readable by default
        elif "format" in spec:
            raise RenderError(f"render: file[{target}].format is only for secret: files "
                              f"({spec.where('format')})")
        elif kind == "directory":
            if sources or "target" in spec:
                raise RenderError(f"render: directory {target} takes no content or target "
                                  f"({where})")
        elif kind == "symlink":
            if sources or not isinstance(spec.get("target"), str) or not spec["target"]:
                raise RenderError(f"render: symlink {target} needs target: and no content "
                                  f"({where})")
            norm["target"] = spec["target"]
            for key in ("mode", "owner", "group"):
                norm.pop(key, None)
        return Resource(kind if state == "present" else "file", target, norm, where, content)

    def query(self, resources: list[Resource], env: Env) -> Any:
        return None  # each path is read right before it is checked (a batch goes stale)

    def check(self, res: Resource, observed: Any, env: Env) -> Change:
        return check(res, Ctx(env, env.old.get(res.identity, {})))

    def apply_one(self, res: Resource, planned: Change, env: Env) -> Change:
        return apply(res, Ctx(env, env.old.get(res.identity, {})), planned)

    def prepare(self, steps: list[tuple[Resource, Change]], env: Env) -> None:
        if self.name == "file":
            stage_writes(steps, env.host)

    def record(self, res: Resource, change: Change) -> dict[str, Any] | None:
        if res.spec.get("state") == "absent":
            return None  # removed, not managed
        entry = super().record(res, change)
        if entry is not None and res.secret:
            entry["secret"] = True  # its prune and removal show no content either
        return entry

    def prune(self, ident: str, entry: dict[str, Any], env: Env, dry: bool) -> Change | None:
        return prune(ident, entry.get("path", entry["name"]), entry,
                     Ctx(env, env.old.get(ident, {})), dry=dry)

    def snapshot(self, ident: str, name: str, env: Env) -> dict[str, Any] | None:
        return snapshot_path(env, ident, name)

    def restore(self, records: list[dict[str, Any]], marks: list[dict[str, Any]],
                env: Env) -> list[Change]:
        return restore_paths(records, env, lambda name: name)


KINDS = [FileKind("file"), FileKind("directory"), FileKind("symlink")]
