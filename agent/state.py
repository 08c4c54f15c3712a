"""The state directory: last good, the applied manifest, history, backups, the lock.

Owns: every file under state_dir except the mirror's insides. Every write is atomic
(host.write_atomic). A file that cannot be read or parsed is a loud StateError that
names the file and the way out; it is never silently reset, because resetting
state.json would drop rollback protection (the next tip, of any age, would pass).

Layout:
    state.json       {"version": 1, "last_good": "<sha>", "last_good_time": ..., "paused": ...}
    manifest.json    what the last cycle applied: {"commit", "render_key", "resources": {id: {...}}}
    history.jsonl    one JSON object per cycle
    verdicts.json    trust verdict cache, keyed by commit and trust-config digest
    backup/<sha256 of path>.json   a file's original content and mode, saved when first taken over
    journal.json     the apply in progress: commit, phase, each touched resource's prior state
    journal.log      one line per resource the agent wrote in that apply (done marks)
    journal.blobs    the prior file contents the journal names, appended (0600)
    quarantine.json  commits whose health checks failed on this host, by plan digest
    render.cache     the last render (no secret contents), for an incremental render in
                     the next `apply` process; only a cache, rebuilt when damaged
    lock             flock()ed by the process that runs a cycle
    mirror.git/      the bare pygit2 mirror
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import json
import os
import time
from typing import Any

from .errors import LockError, StateError
from .host import write_atomic
from .model import DesiredState

VERSION = 1

_NUM = (int, float)
_OPT_STR = (str, type(None))
_OPT_NUM = (int, float, type(None))
_STATE_SHAPE = {"last_good": _OPT_STR, "last_good_time": _OPT_NUM,
                "last_good_signer": _OPT_STR, "last_good_committer_time": _OPT_NUM,
                "last_cycle": (dict, type(None)), "checks": (list, type(None)),
                "degraded": (dict, type(None)), "rollbacks": (int, type(None)),
                "last_trial": (dict, type(None)), "last_good_plan": (str, type(None))}
_MANIFEST_SHAPE = {"commit": _OPT_STR, "render_key": _OPT_STR, "full_check_at": _NUM,
                   "host": _OPT_STR}
_ENTRY_SHAPE = {"kind": str, "name": str, "digest": str, "path": str, "backup": str,
                "created": bool, "sig": (list, type(None))}


def _entry_ok(e: Any) -> bool:
    """The shape of a manifest entry (_ENTRY_SHAPE), without building a message."""
    if type(e) is not dict or type(e.get("kind")) is not str or type(e.get("name")) is not str:
        return False
    for key in ("digest", "path", "backup"):
        v = e.get(key)
        if v is not None and type(v) is not str:
            return False
    c, sig = e.get("created"), e.get("sig")
    return (c is None or type(c) is bool) and (sig is None or type(sig) is list)


def _shape(path: str, data: dict, shape: dict, way_out: str, prefix: str = "") -> None:
    """Every known key has its type, and a commit id is 40 hex digits: a state file
    with a wrong shape is as corrupt as one that is not JSON."""
    for key, types in shape.items():
        allowed = types if isinstance(types, tuple) else (types,)
        if key in data and (not isinstance(data[key], allowed)
                            or isinstance(data[key], bool) and bool not in allowed):
            raise StateError(f"state: {path} is corrupt: {prefix}{key} is "
                             f"{type(data[key]).__name__} {data[key]!r:.40}. {way_out}")
    for key in ("last_good", "commit"):
        v = data.get(key)
        if isinstance(v, str) and (len(v) != 40 or any(c not in "0123456789abcdef" for c in v)):
            raise StateError(f"state: {path} is corrupt: {prefix}{key} {v!r:.50} is not a "
                             f"commit id. {way_out}")
    if prefix and ("kind" not in data or "name" not in data):
        raise StateError(f"state: {path} is corrupt: {prefix[:-1]} lacks kind or name. "
                         f"{way_out}")


class StateDir:
    def __init__(self, path: str) -> None:
        self.path = path
        self._lock_fd: int | None = None
        self._journal_fd: int | None = None
        self._blobs_dirty = False
        self._blob_fd: int | None = None
        self._blob_refs: dict[str, str] = {}

    def p(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def mirror_path(self) -> str:
        return self.p("mirror.git")

    def ensure(self) -> None:
        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            os.makedirs(self.p("backup"), mode=0o700, exist_ok=True)
        except OSError as e:
            raise StateError(f"state: cannot create state_dir {self.path}: {e.strerror}") from None

    # --- the lock ----------------------------------------------------------------------

    def lock(self, wait: float = 0.0) -> None:
        """Hold the single-instance lock; wait up to `wait` seconds for another holder."""
        self.ensure()
        try:
            fd = os.open(self.p("lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StateError(f"state: cannot open {self.p('lock')}: {e.strerror} (state_dir "
                             f"must be writable by the agent)") from None
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise LockError(
                        f"state: another gitops-agent cycle holds {self.p('lock')} (pid {holder}); "
                        f"wait for it, or use --wait SECONDS") from None
                time.sleep(0.05)
        try:
            # written over in place, padded: no truncate, which can wait for the
            # filesystem's journal (up to 0.24 s seen on a busy disk)
            os.pwrite(fd, f"{os.getpid():<15}\n".encode(), 0)
        except OSError:
            pass  # the pid is only a hint for the "held by" message
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- JSON files --------------------------------------------------------------------

    def _read_json(self, name: str, default: Any, way_out: str) -> Any:
        path = self.p(name)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return default
        except OSError as e:
            raise StateError(f"state: cannot read {path}: {e.strerror}. {way_out}") from None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            raise StateError(f"state: {path} is corrupt ({e}). {way_out}") from None
        return data

    def _write_json(self, name: str, data: Any, compact: bool = False) -> None:
        self.ensure()
        text = (json.dumps(data, separators=(",", ":")) if compact
                else json.dumps(data, indent=1, sort_keys=True))
        self._write(name, text.encode() + b"\n")

    def _write(self, name: str, data: bytes) -> None:
        try:
            write_atomic(self.p(name), data, mode=0o600)
        except OSError as e:  # ENOSPC, EROFS, EIO: the old file is still whole
            raise StateError(f"state: cannot write {self.p(name)}: {e.strerror}; the previous "
                             f"version is kept") from None

    def load_state(self) -> dict[str, Any]:
        data = self._read_json(
            "state.json", {"version": VERSION},
            "It holds last good, which anti-rollback depends on. Fix it, or move it aside "
            "(mv state.json state.json.broken) to start over: the next fetched tip is then "
            "accepted as the new base, so check it is the commit you expect.")
        if data.get("version") != VERSION:
            raise StateError(f"state: {self.p('state.json')} has version {data.get('version')!r}, "
                             f"this agent reads version {VERSION}")
        _shape(self.p("state.json"), data, _STATE_SHAPE,
               "Fix it, or move it aside (mv state.json state.json.broken) to start over.")
        return data

    def save_state(self, data: dict[str, Any]) -> None:
        self._write_json("state.json", {**data, "version": VERSION})

    def load_manifest(self) -> dict[str, Any]:
        data = self._read_json(
            "manifest.json", {"resources": {}},
            "It lists what the agent manages, for pruning. Move it aside "
            "(mv manifest.json manifest.json.broken) to start over: resources that the repo "
            "no longer declares are then left in place, not pruned.")
        way_out = ("Move it aside (mv manifest.json manifest.json.broken) to start over: "
                   "resources the repo no longer declares are then left in place.")
        if not isinstance(data.get("resources"), dict):
            raise StateError(f"state: {self.p('manifest.json')} has no resources mapping. "
                             f"{way_out}")
        _shape(self.p("manifest.json"), data, _MANIFEST_SHAPE, way_out)
        for ident, entry in data["resources"].items():
            if _entry_ok(entry):
                continue  # the common case, checked fast: this runs on every no-op cycle
            if not isinstance(entry, dict):
                raise StateError(f"state: {self.p('manifest.json')} is corrupt: resource "
                                 f"{ident!r} is not an object. {way_out}")
            _shape(self.p("manifest.json"), entry, _ENTRY_SHAPE, way_out, f"{ident}.")
        return data

    def save_manifest(self, data: dict[str, Any]) -> None:
        self._write_json("manifest.json", data, compact=True)

    def load_verdicts(self) -> dict[str, Any]:
        try:
            return self._read_json("verdicts.json", {}, "")
        except StateError:
            return {}  # only a cache: a corrupt one is rebuilt by verifying again

    def save_verdicts(self, data: dict[str, Any]) -> None:
        self._write_json("verdicts.json", data)

    # --- compiled templates --------------------------------------------------------------

    def template_cache(self) -> Any:
        """A jinja2 bytecode cache in state_dir/jinja-cache (0700), for render."""
        import jinja2

        path = self.p("jinja-cache")
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError:
            return None  # only a cache: templates are then compiled every render
        return jinja2.FileSystemBytecodeCache(path)

    # --- the last render, for the next process (cycle._render) ---------------------------

    RENDER_CACHE_MAX = 64 << 20  # contents; a host with more renders in full every time

    def load_render(self, base: str) -> DesiredState | None:
        """The desired state save_render kept, if rendered with this same base; None when
        there is none, or it was made with another base, or it is damaged."""
        try:
            with open(self.p("render.cache"), "rb") as f:
                data = f.read(self.RENDER_CACHE_MAX + (16 << 20))
        except OSError:
            return None
        return DesiredState.unpack(data, base)

    def save_render(self, base: str, desired: DesiredState) -> None:
        data = desired.pack(base, self.RENDER_CACHE_MAX)
        try:
            if data is None:
                os.unlink(self.p("render.cache"))  # an older one would still be right,
            else:                                  # but no longer worth keeping
                self._write("render.cache", data)
        except (OSError, StateError):
            pass  # only a cache: the next process renders in full

    # --- pause (persisted across restarts, with its reason) --------------------------------

    def load_pause(self) -> dict[str, Any] | None:
        path = self.p("pause.json")
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read())
            return data if isinstance(data, dict) else {"reason": "?"}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            # unreadable pause file: stay paused, loudly; resume rewrites it
            return {"reason": f"{path} is unreadable; `gitops-agent resume` clears it"}

    def save_pause(self, reason: str, uid: int) -> dict[str, Any]:
        data = {"reason": reason, "since": time.time(), "uid": uid}
        self._write_json("pause.json", data)
        return data

    def clear_pause(self) -> None:
        try:
            os.unlink(self.p("pause.json"))
        except FileNotFoundError:
            pass

    # --- the break-glass pin (pin.json: this host converges one commit until unpin) ---------

    def load_pin(self) -> dict[str, Any] | None:
        path = self.p("pin.json")
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            raise StateError(f"state: {path} is unreadable; `gitops-agent unpin` removes "
                             f"it") from None
        if not isinstance(data, dict) or not isinstance(data.get("commit"), str):
            raise StateError(f"state: {path} has no commit; `gitops-agent unpin` removes it")
        return data

    def save_pin(self, commit: str, reason: str, by: str) -> dict[str, Any]:
        data = {"commit": commit, "reason": reason, "by": by, "since": time.time()}
        self._write_json("pin.json", data)
        return data

    def clear_pin(self) -> bool:
        try:
            os.unlink(self.p("pin.json"))
        except FileNotFoundError:
            return False
        return True

    # --- history -----------------------------------------------------------------------

    def append_history(self, entry: dict[str, Any], keep: int = 1000) -> None:
        """Append one line; rewrite atomically (bounded to `keep` lines) so none is torn."""
        lines = self._history_lines()
        lines.append(json.dumps(entry, sort_keys=True).encode())
        lines = lines[-keep:]
        self.ensure()
        self._write("history.jsonl", b"\n".join(lines) + b"\n")

    def _history_lines(self) -> list[bytes]:
        """Raw lines: a damaged line (bad UTF-8, not JSON) is carried along, never decoded
        here, so appending works whatever is in the file."""
        try:
            with open(self.p("history.jsonl"), "rb") as f:
                return [line.rstrip(b"\n") for line in f if line.strip()]
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StateError(
                f"state: cannot read {self.p('history.jsonl')}: {e.strerror}") from None

    def history(self, limit: int = 20) -> list[dict[str, Any]]:
        out = []
        for n, line in enumerate(self._history_lines(), 1):
            try:
                item = json.loads(line)
                if not isinstance(item, dict):
                    raise ValueError
                out.append(item)
            except ValueError:  # UnicodeDecodeError too
                raise StateError(f"state: {self.p('history.jsonl')}:{n} is not a JSON object; "
                                 f"remove that line or move the file aside") from None
        return out[-limit:] if limit else out

    # --- backups of files taken over ---------------------------------------------------

    def _backup_name(self, target: str) -> str:
        return os.path.join("backup", hashlib.sha256(target.encode()).hexdigest() + ".json")

    def save_backup(self, target: str, data: bytes, mode: int, uid: int, gid: int,
                    sealed: bool = False) -> str:
        """`sealed`: data is encrypted to the host's own recipient (a secret file's)."""
        name = self._backup_name(target)
        if not os.path.exists(self.p(name)):  # the first original is the one to restore
            self._write_json(name, {"path": target, "mode": mode, "uid": uid, "gid": gid,
                                    "data": base64.b64encode(data).decode(),
                                    **({"sealed": True} if sealed else {})})
        return name

    def load_backup(self, name: str) -> dict[str, Any]:
        data = self._read_json(name, None, "Move it aside to leave the file in place.")
        if data is None:
            raise StateError(f"state: backup {self.p(name)} is missing")
        data["data"] = base64.b64decode(data["data"])
        return data

    # --- the apply journal (journal.py decides what goes in; this stores it) ----------------

    def save_blob(self, data: bytes) -> str:
        """Append a prior content to the journal's pack (journal.blobs, 0600); returns its
        reference `SHA256@OFFSET+LENGTH`. One file, so saving 2,000 contents is 2,000
        appends and one fsync (sync_blobs, before the journal head), not 2,000 files."""
        digest = hashlib.sha256(data).hexdigest()
        ref = self._blob_refs.get(digest)
        if ref is not None:
            return ref
        try:
            if self._blob_fd is None:
                self.ensure()
                self._blob_fd = os.open(self.p("journal.blobs"), os.O_RDWR | os.O_APPEND
                                        | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            offset = os.lseek(self._blob_fd, 0, os.SEEK_END)
            view = memoryview(data)
            while view:
                view = view[os.write(self._blob_fd, view):]
        except OSError as e:
            raise StateError(f"state: cannot save a prior content in "
                             f"{self.p('journal.blobs')}: {e.strerror}") from None
        ref = f"{digest}@{offset}+{len(data)}"
        self._blob_refs[digest] = ref
        self._blobs_dirty = True
        return ref

    def sync_blobs(self) -> None:
        """Make every saved prior content durable before the journal head names it."""
        if self._blobs_dirty and self._blob_fd is not None:
            os.fsync(self._blob_fd)
        self._blobs_dirty = False

    def load_blob(self, ref: str) -> bytes:
        try:
            digest, _, span = ref.partition("@")
            offset, _, length = span.partition("+")
            start, size = int(offset), int(length)
            if len(digest) != 64 or start < 0 or size < 0:
                raise ValueError(ref)
        except ValueError:
            raise StateError(f"state: the journal names a bad prior content {ref!r}") from None
        try:
            fd = os.open(self.p("journal.blobs"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                data = os.pread(fd, size, start)
            finally:
                os.close(fd)
        except OSError as e:
            raise StateError(f"state: journal prior content {digest[:12]} cannot be read: "
                             f"{e.strerror}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise StateError(f"state: journal prior content {digest[:12]} is corrupt")
        return data

    def drop_blobs(self) -> None:
        if self._blob_fd is not None:
            os.close(self._blob_fd)
            self._blob_fd = None
        self._blob_refs = {}
        self._blobs_dirty = False
        try:
            os.unlink(self.p("journal.blobs"))
        except FileNotFoundError:
            pass

    def save_journal(self, data: dict[str, Any]) -> None:
        """The journal head, fsynced; a new head starts an empty done-log."""
        self._write_json("journal.json", data, compact=True)

    def start_journal_log(self) -> None:
        """No done marks yet: a log left by an older journal goes (the first mark creates
        the new one; the marks are not fsynced one by one, so neither is the empty file)."""
        if self._journal_fd is not None:  # never append to a replaced file
            os.close(self._journal_fd)
            self._journal_fd = None
        try:
            os.unlink(self.p("journal.log"))
        except FileNotFoundError:
            pass

    def journal_mark(self, entry: dict[str, Any]) -> None:
        """Append one done mark. Not fsynced per line: a lost mark only means a resource
        is restored from the journal that did not need it (restores are idempotent)."""
        line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
        if self._journal_fd is None:
            self._journal_fd = os.open(self.p("journal.log"),
                                       os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                       0o600)
        os.write(self._journal_fd, line)

    def sync_journal(self) -> None:
        if self._journal_fd is not None:
            os.fsync(self._journal_fd)

    def load_journal(self) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        head = self._read_json(
            "journal.json", None,
            "It records an apply that did not finish; without it the host cannot be rolled "
            "back. Move it aside (mv journal.json journal.json.broken) and run a full check.")
        marks: list[dict[str, Any]] = []
        if head is None:
            return None, marks
        try:
            with open(self.p("journal.log"), "rb") as f:
                for line in f.read().splitlines():
                    try:
                        mark = json.loads(line)
                    except ValueError:
                        continue  # the torn last line of a killed agent
                    if isinstance(mark, dict):
                        marks.append(mark)
        except FileNotFoundError:
            pass
        return head, marks

    def clear_journal(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        for name in ("journal.json", "journal.log"):
            try:
                os.unlink(self.p(name))
            except FileNotFoundError:
                pass
        self.drop_blobs()

    # --- quarantine ------------------------------------------------------------------------

    def load_quarantine(self) -> list[dict[str, Any]]:
        data = self._read_json("quarantine.json", {"commits": []},
                               "Fix it or move it aside; quarantined commits are then "
                               "tried again.")
        items = data.get("commits")
        if not isinstance(items, list):
            raise StateError(f"state: {self.p('quarantine.json')} has no commits list")
        return [q for q in items if isinstance(q, dict) and isinstance(q.get("commit"), str)
                and isinstance(q.get("plan"), str)]

    def save_quarantine(self, items: list[dict[str, Any]]) -> None:
        self._write_json("quarantine.json", {"commits": items})

    def report_queue(self) -> ReportQueue:
        return ReportQueue(self.path)


class ReportQueue:
    """Reports waiting to be sent, one file each, numbered, oldest first; bounded to the
    newest `keep` so a host offline for weeks does not fill its disk."""

    def __init__(self, state_dir: str, keep: int = 50) -> None:
        self.dir = os.path.join(state_dir, "report-queue")
        self.keep = keep

    def _names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.dir) if n.endswith(".json"))
        except FileNotFoundError:
            return []

    def put(self, status: dict[str, Any]) -> int:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        names = self._names()
        seq = int(names[-1].split(".")[0]) + 1 if names else self._next_seq()
        report = {**status, "seq": seq, "reported_at": time.time()}
        write_atomic(os.path.join(self.dir, f"{seq:012d}.json"),
                     json.dumps(report, default=str).encode(), mode=0o600)
        for old in self._names()[:-self.keep]:
            os.unlink(os.path.join(self.dir, old))
        self._save_seq(seq + 1)
        return seq

    def _next_seq(self) -> int:
        try:
            with open(os.path.join(self.dir, "next")) as f:
                return int(f.read().strip() or 1)
        except (OSError, ValueError):
            return 1

    def _save_seq(self, seq: int) -> None:
        write_atomic(os.path.join(self.dir, "next"), str(seq).encode(), mode=0o600)

    def pending(self) -> list[tuple[str, bytes]]:
        out = []
        for name in self._names():
            try:
                with open(os.path.join(self.dir, name), "rb") as f:
                    out.append((name, f.read()))
            except OSError:
                continue
        return out

    def done(self, name: str) -> None:
        try:
            os.unlink(os.path.join(self.dir, name))
        except FileNotFoundError:
            pass
