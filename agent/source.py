"""The pygit2 mirror: fetch a branch, read a commit's files straight from its tree.

Owns: the bare mirror in state_dir, fetching `source.branch` from the URL and then
each mirror in order (plain path, file://, git://; ssh:// and https:// through
credential callbacks), the refs that pin what was fetched and what was last good,
and TreeReader: blob access by path with the tree-safety rules.
Must not: check out a working tree (ever: no hooks, filters, attributes or
submodules run), or read a blob of a commit that trust has not passed; the cycle
calls `tree()` only after verify.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pygit2

from .config import LimitsConfig, SourceConfig
from .errors import AgentError, Exhausted, SourceError, TreeError, UsageError
from .transport import callbacks_for
from .urls import redact, scheme

log = logging.getLogger("agent.source")

FETCHED_REF = "refs/gitops/fetched"
LAST_GOOD_REF = "refs/gitops/last-good"
_APPROVALS_LOCAL = "refs/gitops/approvals/"
# how approvals are stored (approvals.py decides what they mean): one ref per approver,
# refs/approvals/<commit>/<key>, at a parentless commit whose tree holds only SIG_FILE
APPROVAL_SIG_FILE = "approval.sig"
APPROVAL_MAX_REFS = 64  # approval refs of one commit; more is refused as a whole
APPROVAL_MAX_SIG = 16 * 1024  # bytes of one approval signature

MAX_DEPTH = 64  # directories deep, in a commit's tree

_BLOB_MODES = (pygit2.GIT_FILEMODE_BLOB, pygit2.GIT_FILEMODE_BLOB_EXECUTABLE)


@dataclass
class FetchResult:
    tip: str | None
    url: str | None
    errors: list[str] = field(default_factory=list)

    @property
    def offline(self) -> bool:
        return self.tip is None


class Mirror:
    def __init__(self, path: str, source: SourceConfig) -> None:
        self.path = path
        self.source = source
        self.rebuilt = ""  # why the mirror was moved aside and made anew this cycle
        problem = ""
        if os.path.lexists(path) and not os.path.isdir(path):
            problem = "it is not a directory"
        elif os.path.isdir(path):
            try:
                self.repo = pygit2.Repository(path)
                problem = _bad_head(path)
            except pygit2.GitError as e:
                problem = f"not a readable git repository: {_clean(e)}"
        if problem:
            self.rebuild(problem)
        elif not os.path.isdir(path):
            self.repo = pygit2.init_repository(path, bare=True)

    def rebuild(self, problem: str) -> None:
        """Move an unusable mirror aside (the newest broken copy is kept for a post-mortem)
        and start a new one; the next fetch fills it again."""
        if getattr(self, "repo", None) is not None:
            # libgit2 caches packs process-wide by path: the new mirror's pack (same name,
            # same content) would otherwise be read through the damaged old mapping
            self.repo.free()
        aside = f"{self.path}.broken"
        if os.path.lexists(aside):
            if os.path.isdir(aside) and not os.path.islink(aside):
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.unlink(aside)
        if os.path.lexists(self.path):
            os.rename(self.path, aside)
        self.repo = pygit2.init_repository(self.path, bare=True)
        self.rebuilt = (f"the mirror was unusable ({problem}): moved aside to {aside}, "
                        f"fetching it again")
        log.warning("source: %s", self.rebuilt, extra={"STAGE": "fetch"})

    def problem(self, commits: list[str]) -> str:
        """Read every object of these commits (commit, trees, blobs): "" when all are
        whole, else what is broken. Only run when something already failed."""
        seen: set[pygit2.Oid] = set()  # each object once: shared subtrees are not re-walked
        try:
            for commit in commits:
                self.repo.odb.read(pygit2.Oid(hex=commit))
                stack = [self.repo[commit].peel(pygit2.Commit).tree]
                while stack:
                    tree = stack.pop()
                    for entry in tree:
                        if entry.id in seen or entry.filemode == pygit2.GIT_FILEMODE_COMMIT:
                            continue
                        seen.add(entry.id)
                        if entry.filemode == pygit2.GIT_FILEMODE_TREE:
                            stack.append(self.repo[entry.id])
                        else:
                            self.repo.odb.read(entry.id)
        except (KeyError, ValueError, pygit2.GitError) as e:
            return f"objects cannot be read: {_clean(e)}"
        return ""

    # --- fetch -------------------------------------------------------------------------

    def fetch(self, should_stop: Any = None) -> FetchResult:
        """Try the URL, then each mirror; the first that yields the branch wins. All of
        it within source.fetch_deadline: source.timeout bounds one read, and a server
        that drips one byte at a time would otherwise hold the cycle for ever."""
        _set_timeouts(self.source)
        errors = []
        deadline = time.monotonic() + self.source.fetch_deadline
        for url in (self.source.url, *self.source.mirrors):
            left = deadline - time.monotonic()
            if left <= 0:
                errors.append(f"fetch from {redact(url)} not tried: source.fetch_deadline "
                              f"({self.source.fetch_deadline:g}s) reached")
                break
            try:
                tip = _bounded(url, lambda u=url: self._fetch_one(u), left, should_stop)
                return FetchResult(tip, url, errors)
            except Exhausted as e:
                self._clear_locks()
                err = SourceError(f"fetch from {redact(url)} stopped: it {e} "
                                  f"(source.fetch_deadline)")
                errors.append(str(err))
                log.warning("fetch: %s", err)
            except SourceError as e:
                errors.append(str(e))
                log.warning("fetch: %s", e)
        return FetchResult(None, None, errors)

    def _clear_locks(self) -> None:
        """A fetch killed at its deadline may leave libgit2's lock and temp files; the
        state lock guarantees nobody else is using the mirror."""
        for dirpath, _, names in os.walk(self.path):
            for name in names:
                if name.endswith(".lock") or name.startswith(("tmp_pack", "pack_git2_")):
                    try:
                        os.unlink(os.path.join(dirpath, name))
                    except OSError:
                        pass

    def _fetch_one(self, url: str) -> str:
        branch = self.source.branch
        remote = self.repo.remotes.create_anonymous(url)
        try:
            remote.fetch([f"+refs/heads/{branch}:{FETCHED_REF}"], callbacks=self._callbacks(url))
        except (pygit2.GitError, OSError, ValueError) as e:
            raise SourceError(f"fetch from {redact(url)} failed: {_clean(e)}") from None
        # libgit2 succeeds quietly when the remote has no such branch; FETCH_HEAD then
        # lacks it, and the old fetched ref must not be mistaken for a fresh tip.
        tip = _fetch_head_tip(self.path, branch)
        if tip is None:
            raise SourceError(f"fetch from {redact(url)}: branch {branch!r} does not exist there")
        return tip

    # --- approvals (approvals.py decides what they mean) ----------------------------------

    def fetch_approvals(self, url: str, commit: str, should_stop: Any = None
                        ) -> dict[str, dict[str, Any]]:
        """The approval refs of `commit` from `url`, read and then deleted from the mirror
        (a stale blob ref there would break later fetches in libgit2)."""
        local = f"{_APPROVALS_LOCAL}{commit}/"
        self._drop_refs(_APPROVALS_LOCAL)

        def one() -> bool:
            remote = self.repo.remotes.create_anonymous(url)
            remote.fetch([f"+refs/approvals/{commit}/*:{local}*"],
                         callbacks=self._callbacks(url))
            return True

        try:
            _bounded(url, one, self.source.fetch_deadline, should_stop)
        except Exhausted as e:
            self._clear_locks()
            raise SourceError(f"fetching the approvals of {commit[:12]} stopped: it "
                              f"{e}") from None
        except (pygit2.GitError, OSError, ValueError) as e:
            raise SourceError(f"fetching the approvals of {commit[:12]} from {redact(url)} "
                              f"failed: {_clean(e)}") from None
        try:
            return self.approvals(commit, local)
        finally:
            self._drop_refs(_APPROVALS_LOCAL)

    def approvals(self, commit: str, prefix: str = "") -> dict[str, dict[str, Any]]:
        """{refs/approvals/<commit>/<key>: {"sig": bytes} | {"error": why}}; beyond
        APPROVAL_MAX_REFS refs only the first one more are read (the caller refuses all)."""
        prefix = prefix or f"refs/approvals/{commit}/"
        out: dict[str, dict[str, Any]] = {}
        for name in self.repo.references:
            if not name.startswith(prefix):
                continue
            shown = f"refs/approvals/{commit}/{name[len(prefix):]}"
            if len(out) > APPROVAL_MAX_REFS:
                out[shown] = {"error": "not read: too many approval refs"}
                continue
            out[shown] = self._approval_object(self.repo.references[name].target)
        return out

    def _approval_object(self, oid: Any) -> dict[str, Any]:
        sig_file, max_sig = APPROVAL_SIG_FILE, APPROVAL_MAX_SIG
        try:
            kind, size = self.repo.odb.read_header(oid)
            if kind != pygit2.enums.ObjectType.COMMIT:
                return {"error": "the ref does not point at an approval commit (a bare "
                                 "object): refused"}
            obj = self.repo[oid]
            if obj.parents:
                return {"error": "an approval commit has no parents; this one has"}
            entries = list(obj.tree)
            if [e.name for e in entries] != [sig_file] or \
                    entries[0].filemode not in _BLOB_MODES:
                return {"error": f"an approval commit holds exactly one file, {sig_file}"}
            size = self.repo.odb.read_header(entries[0].id)[1]
            if size > max_sig:
                return {"error": f"approval is {size} bytes, over {max_sig}: refused"}
            return {"sig": self.repo[entries[0].id].data}
        except (KeyError, ValueError, pygit2.GitError) as e:
            return {"error": f"the approval cannot be read: {_clean(e)}"}

    def write_approval(self, commit: str, key_hex: str, sig: bytes) -> str:
        """Store an approval as `refs/approvals/<commit>/<key>`: a parentless commit whose
        tree holds the signature. Returns the ref."""
        blob = self.repo.create_blob(sig)
        tb = self.repo.TreeBuilder()
        tb.insert(APPROVAL_SIG_FILE, blob, pygit2.GIT_FILEMODE_BLOB)
        who = pygit2.Signature("gitops-agent approval", "approval@gitops-agent.invalid")
        oid = self.repo.create_commit(None, who, who, f"approval of {commit}\n", tb.write(),
                                      [])
        ref = f"refs/approvals/{commit}/{key_hex}"
        self.repo.references.create(ref, oid, force=True)
        return ref

    def changed_paths(self, old: str, new: str) -> set[str] | None:
        """The paths whose blobs differ between two commits' trees (both names of a
        rename); None when that cannot be told."""
        try:
            a = self.repo[old].peel(pygit2.Commit).tree
            b = self.repo[new].peel(pygit2.Commit).tree
            out: set[str] = set()
            for delta in self.repo.diff(a, b).deltas:
                out.add(delta.old_file.path)
                out.add(delta.new_file.path)
            return out
        except (KeyError, ValueError, pygit2.GitError):
            return None

    def in_history(self, commit: str, heads: list[str]) -> bool:
        """commit is here and one of `heads` or an ancestor of one."""
        return self.has_commit(commit) and any(self.descends(h, commit) for h in heads)

    def tree_id(self, commit: str) -> str:
        return str(self.repo[commit].peel(pygit2.Commit).tree_id)

    def _drop_refs(self, prefix: str) -> None:
        for name in [n for n in self.repo.references if n.startswith(prefix)]:
            try:
                self.repo.references.delete(name)
            except (KeyError, pygit2.GitError):
                pass

    def _callbacks(self, url: str) -> pygit2.RemoteCallbacks | None:
        if scheme(url) in ("ssh", "https"):
            return callbacks_for(url, self.source)
        return None

    # --- refs --------------------------------------------------------------------------

    def ref(self, name: str) -> str | None:
        ref = self.repo.references.get(name)
        return str(ref.target) if ref is not None else None

    def set_ref(self, name: str, commit: str) -> None:
        self.repo.references.create(name, pygit2.Oid(hex=commit), force=True)

    def has_commit(self, commit: str) -> bool:
        try:
            return isinstance(self.repo[commit], pygit2.Commit)
        except (KeyError, ValueError):
            return False

    # --- narrow reads for trust, cycle and fleet (nobody else touches pygit2) ------------

    def object_kind(self, oid: str) -> str | None:
        """"commit", "tag", "tree", "blob", or None when the mirror lacks it."""
        try:
            otype = self.repo.odb.read_header(pygit2.Oid(hex=oid))[0]
        except (KeyError, ValueError, pygit2.GitError):
            return None
        return {pygit2.enums.ObjectType.COMMIT: "commit", pygit2.enums.ObjectType.TAG: "tag",
                pygit2.enums.ObjectType.TREE: "tree",
                pygit2.enums.ObjectType.BLOB: "blob"}.get(otype, "other")

    def commit_time(self, commit: str) -> int:
        """The committer time; SourceError when libgit2 cannot parse the commit."""
        try:
            return int(self.repo[commit].commit_time)
        except (KeyError, ValueError, AttributeError, pygit2.GitError):
            raise SourceError(f"commit {commit[:12]} is a malformed commit object") from None

    def descends(self, commit: str, ancestor: str) -> bool:
        """commit is ancestor or comes after it; False when either is not here."""
        try:
            return commit == ancestor or bool(self.repo.descendant_of(commit, ancestor))
        except (KeyError, ValueError, pygit2.GitError):
            return False

    def history(self, tip: str, hide: str | None = None, limit: int | None = None
                ) -> list[str]:
        """Commits reachable from tip (not from hide), children before parents, newest
        first among siblings."""
        walker = self.repo.walk(tip, pygit2.enums.SortMode.TOPOLOGICAL
                                | pygit2.enums.SortMode.TIME)
        if hide:
            walker.hide(hide)
        out = []
        for c in walker:
            if limit is not None and len(out) >= limit:
                break
            out.append(str(c.id))
        return out

    def behind(self, tip: str, commit: str) -> int | None:
        """How many commits `commit` is behind `tip` (None: not in this repository)."""
        try:
            return self.repo.ahead_behind(tip, commit)[0]
        except (KeyError, ValueError, pygit2.GitError):
            return None

    def resolve(self, rev: str) -> str:
        try:
            obj = self.repo.revparse_single(rev)
            return str(obj.peel(pygit2.Commit).id)
        except (KeyError, pygit2.GitError, ValueError):
            # a full id of a commit object libgit2 cannot parse is still a commit to judge
            # (trust says "malformed"), not a missing revision
            try:
                if len(rev) == 40 and self.repo.odb.read_header(
                        pygit2.Oid(hex=rev))[0] == pygit2.enums.ObjectType.COMMIT:
                    return rev
            except (KeyError, ValueError, pygit2.GitError):
                pass
            raise UsageError(f"revision {rev!r} not found in {self.path}") from None

    def raw_commit(self, commit: str) -> bytes:
        """The commit object's bytes exactly as signed (for trust, not for render)."""
        otype, data = self.repo.odb.read(pygit2.Oid(hex=commit))[:2]
        if otype != pygit2.enums.ObjectType.COMMIT:
            raise SourceError(f"source: {commit} is not a commit")
        return data

    def tree(self, commit: str, limits: LimitsConfig) -> TreeReader:
        return TreeReader(self.repo, commit, limits)


def probe(mirror_path: str, source: SourceConfig, should_stop: Any = None
          ) -> tuple[str | None, str | None, str, str]:
    """A change probe: the branch's tip as the first URL that answers advertises it (one
    ref advertisement, no pack), and the tip the mirror fetched last. Writes nothing, so
    it may run while a cycle holds the state lock. Returns (remote tip or None, local
    fetched tip or None, why the remote was not read, a digest of the tip's approval
    refs as advertised)."""
    try:
        repo = pygit2.Repository(mirror_path)
    except (pygit2.GitError, OSError) as e:
        return None, None, f"no mirror yet: {_clean(e)}", ""
    ref = repo.references.get(FETCHED_REF)
    local = str(ref.target) if ref is not None else None
    want = f"refs/heads/{source.branch}"
    errors = []

    def one(url: str) -> tuple[str | None, str]:
        remote = repo.remotes.create_anonymous(url)
        cb = callbacks_for(url, source) if scheme(url) in ("ssh", "https") else None
        if hasattr(remote, "list_heads"):
            heads = [(h.name, str(h.oid)) for h in remote.list_heads(callbacks=cb)]
        else:  # pygit2 < 1.15
            heads = [(h["name"], str(h["oid"])) for h in remote.ls_remotes(callbacks=cb)]
        tip = next((oid for name, oid in heads if name == want), None)
        mine = sorted(f"{n} {o}" for n, o in heads if tip and n.startswith(
            f"refs/approvals/{tip}/"))
        return tip, hashlib.sha256("\n".join(mine).encode()).hexdigest()[:16]

    _set_timeouts(source)
    for url in (source.url, *source.mirrors):
        try:
            tip, approvals = _bounded(url, lambda u=url: one(u), source.timeout + 5,
                                      should_stop)
        except (pygit2.GitError, OSError, ValueError, AgentError) as e:
            errors.append(f"{redact(url)}: {_clean(e)}")
            continue
        if tip is not None:
            return tip, local, "", approvals
        errors.append(f"{redact(url)}: no branch {source.branch!r}")
    return None, local, "; ".join(errors), ""


def _set_timeouts(source: SourceConfig) -> None:
    """source.timeout for libgit2's connect and each read."""
    pygit2.settings.server_connect_timeout = int(source.timeout * 1000)
    pygit2.settings.server_timeout = int(source.timeout * 1000)


def _bounded(url: str, fn: Callable[[], Any], timeout: float, should_stop: Any) -> Any:
    """fn() talking to `url`: in a child bounded by `timeout` (so a deadline can stop
    libgit2 mid-transfer), or right here for a local path, which cannot drip."""
    if scheme(url) == "local":
        return fn()
    from . import isolate

    return isolate.run(lambda _progress: fn(), timeout=timeout, memory=None,
                       should_stop=should_stop or (lambda: False))


def open_repo(path: str) -> Mirror:
    """A mirror-like view of an existing repository (for `render` and `verify`)."""
    m = Mirror.__new__(Mirror)
    m.path = path
    m.source = SourceConfig(url=path)
    try:
        m.repo = pygit2.Repository(path)
    except pygit2.GitError:
        raise UsageError(f"{path} is not a git repository") from None
    return m


def _fetch_head_tip(gitdir: str, branch: str) -> str | None:
    """FETCH_HEAD lines look like `8fd90…\t\tbranch 'main' of /srv/fleet`."""
    try:
        with open(os.path.join(gitdir, "FETCH_HEAD")) as f:
            for line in f:
                oid, _, rest = line.partition("\t")
                if f"branch '{branch}' of" in rest and len(oid) == 40:
                    return oid
    except OSError:
        return None
    return None


def _bad_head(gitdir: str) -> str:
    """HEAD must be a symbolic ref or an object id; anything else breaks libgit2 later."""
    try:
        with open(os.path.join(gitdir, "HEAD"), "rb") as f:
            head = f.read(256)
    except OSError as e:
        return f"HEAD cannot be read: {e.strerror}"
    text = head.decode("ascii", errors="replace").strip()
    if text.startswith("ref: refs/") and text.isprintable() and " " not in text[5:]:
        return ""
    if len(text) == 40 and all(c in "0123456789abcdef" for c in text):
        return ""
    return f"HEAD holds {head[:40]!r}"


def _clean(e: BaseException) -> str:
    return str(e).strip().rstrip(".") or type(e).__name__


class TreeReader:
    """Read files of one commit by path, enforcing the tree-safety rules.

    Every path is a repo-relative POSIX path. `..`, absolute paths and empty
    components are refused; a symlink in the tree is never followed (it is an
    error to read one); a submodule is refused; blobs over max_blob_size and trees
    over max_files entries are refused. Nothing here touches the filesystem.
    """

    def __init__(self, repo: pygit2.Repository, commit: str, limits: LimitsConfig) -> None:
        self.repo = repo
        self.commit = commit
        self.limits = limits
        try:
            self.tree = repo[commit].peel(pygit2.Commit).tree
        except (KeyError, ValueError, pygit2.GitError) as e:
            raise TreeError(f"tree: commit {commit[:12]} cannot be read from the mirror: "
                            f"{_clean(e)}") from None
        self._index: dict[str, pygit2.Object] | None = None
        self._sizes: dict[str, int] = {}  # each blob's size, by path (check())

    def check(self) -> None:
        """Walk the whole tree once: names, submodules, counts, sizes; index every path.

        The index makes each later read a dict lookup: pygit2's path lookup scans a
        tree's entries, which is quadratic over a directory of thousands of files.
        """
        if self._index is not None:
            return
        try:
            self._check()
        except pygit2.GitError as e:
            raise TreeError(f"tree: commit {self.commit[:12]} cannot be read from the "
                            f"mirror: {_clean(e)}") from None

    def _check(self) -> None:
        index: dict[str, pygit2.Object] = {}
        sizes: dict[str, int] = {}
        count = 0
        total = 0
        stack = [("", self.tree, 1)]
        while stack:
            prefix, tree, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise TreeError(f"tree: {prefix.rstrip('/')} in commit {self.commit[:12]} is "
                                f"nested more than {MAX_DEPTH} directories deep")
            for entry in tree:
                # every entry counts, directories too: shared tree objects nested a few
                # dozen deep stand for billions of paths and not a single blob
                count += 1
                if count > self.limits.max_files:
                    raise TreeError(f"tree: commit {self.commit[:12]} has more than "
                                    f"{self.limits.max_files} entries (limits.max_files counts "
                                    f"files and directories)")
                name = entry.name
                path = f"{prefix}{name}"
                if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
                    raise TreeError(f"tree: entry {path!r} in commit {self.commit[:12]} is not "
                                    f"a safe file name")
                mode = entry.filemode
                if mode == pygit2.GIT_FILEMODE_COMMIT:
                    raise TreeError(f"tree: {path} is a submodule; submodules are refused "
                                    f"(commit {self.commit[:12]})")
                index[path] = entry
                if mode == pygit2.GIT_FILEMODE_TREE:
                    stack.append((path + "/", entry, depth + 1))
                    continue
                if mode in _BLOB_MODES:
                    sizes[path] = size = self.repo.odb.read_header(entry.id)[1]
                    total += size
                if total > self.limits.max_total_size:
                    raise TreeError(f"tree: commit {self.commit[:12]} holds more than "
                                    f"{self.limits.max_total_size} bytes (limits.max_total_size)")
        self._index, self._sizes = index, sizes

    def _entry(self, path: str) -> pygit2.Object | None:
        parts = path.split("/")
        if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise TreeError(f"{path!r} escapes the repository or is not a clean relative path")
        self.check()
        assert self._index is not None
        node = self._index.get(path)
        if node is not None and node.filemode != pygit2.GIT_FILEMODE_LINK:
            return node  # indexed, so every directory on its way is a tree, not a link
        for i in range(1, len(parts) + 1):
            here = "/".join(parts[:i])
            node = self._index.get(here)
            if node is None:
                return None
            if node.filemode == pygit2.GIT_FILEMODE_LINK:
                raise TreeError(f"{here} is a symlink in the repository; symlinks are never "
                                f"followed")
        return node

    def exists(self, path: str) -> bool:
        return self._entry(path) is not None

    def is_file(self, path: str) -> bool:
        node = self._entry(path)
        return node is not None and node.filemode in _BLOB_MODES

    def read(self, path: str) -> bytes:
        node = self._entry(path)
        if node is None:
            raise TreeError(f"{path} does not exist in commit {self.commit[:12]}")
        if isinstance(node, pygit2.Tree):
            raise TreeError(f"{path} is a directory, not a file")
        try:
            size = self._sizes[path]  # every blob's, read by check() for the total
            if size > self.limits.max_blob_size:
                raise TreeError(f"{path} is {size} bytes, over the limit of "
                                f"{self.limits.max_blob_size} (limits.max_blob_size)")
            return node.data
        except pygit2.GitError as e:
            raise TreeError(f"{path} cannot be read from the mirror: {_clean(e)}") from None

    def listdir(self, path: str) -> list[str]:
        node = self._entry(path) if path else self.tree
        if not isinstance(node, pygit2.Tree):
            return []
        return sorted(e.name for e in node)
