"""The only gate to the OS: paths under the root prefix, atomic writes, subprocesses.

Owns: confining every target to `root`, atomic file writes, user/group lookup in the
root's own /etc/passwd and /etc/group, and run(argv).
Must not: decide what should change; resources/ decide, this module does.

Every managed path is reached by walking its components from an fd of `root` with
`openat(..., O_NOFOLLOW|O_DIRECTORY)`: a symlink (or anything but a directory) in a
parent position is refused, never followed, also with `root: /` and also when a
local user swaps a parent for a symlink in the middle of a cycle. Parents are made
with mkdirat, files written with openat on the parent's fd and renamed with renameat
inside it, and metadata changed with fchmod/fchown on an fd opened with O_NOFOLLOW,
so no path is ever re-resolved between the check and the write.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .errors import ApplyError, EscapeError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
MAX_ID = 0xFFFFFFFE  # 4294967295 is (uid_t)-1: "leave unchanged" to chown, never an owner
TMP_RE = re.compile(r"^\..+\.gitops-agent\.(\d+)\.tmp$")


def parse_id(value: str) -> int | None:
    """`"1000"` → 1000; None when `value` is a name (`"²"` is a name, not a number).
    Raises ValueError for a number no uid/gid can be (`"4294967295"`, `"99999999999"`)."""
    if not (value.isascii() and value.isdigit()):
        return None
    n = int(value)
    if n > MAX_ID:
        raise ValueError(f"{value} is out of range 0..{MAX_ID} (4294967295 means "
                         f"'unchanged' to chown)")
    return n


class Host:
    MAX_FDS = 256  # directory fds kept open between operations of one cycle

    def __init__(self, root: str = "/") -> None:
        self.root = os.path.realpath(root)
        self._ids: dict[str, dict[str, int]] = {}
        self.spawned = 0  # processes run through this host (reported per cycle)
        # Directories already walked to (without following a symlink), by path under
        # root. An fd keeps naming the directory it was opened on, so a later swap of
        # the path for a symlink cannot redirect a write made through it.
        self._fds: dict[tuple[str, ...], int] = {}
        # stage(): target -> (temp name, data, mode, uid, gid), durable, not yet renamed
        self._staged: dict[str, tuple[str, bytes, int, int, int]] = {}
        self._renamed: set[tuple[str, ...]] = set()  # dirs a staged file was renamed into
        # Directories found missing inside read_only(), not looked for again there
        self._absent: set[tuple[str, ...]] | None = None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    @contextlib.contextmanager
    def read_only(self) -> Iterator[None]:
        """A stretch in which the agent writes nothing (the plan, the journal's snapshot):
        a directory found missing stays missing, so it is not looked for again. A first
        apply's plan asks about 2,200 files under directories that do not exist yet; each
        had cost a failed open() and a walk up the fd cache."""
        self._absent = set()
        try:
            yield
        finally:
            self._absent = None

    def _forget(self, parts: tuple[str, ...]) -> None:
        """A directory was removed: drop its fd and those below it."""
        for key in [k for k in self._fds if k[:len(parts)] == parts]:
            os.close(self._fds.pop(key))

    def _dirfd(self, parts: tuple[str, ...], create: bool) -> int | None:
        if create:  # the agent makes directories only this way: a write after all, so
            self._absent = None  # nothing found missing is trusted any more
        fd = self._fds.get(parts)
        if fd is not None:
            return fd
        absent = self._absent
        if absent is not None and parts in absent:
            return None
        if not parts:
            try:
                fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise ApplyError(f"root {self.root} is not usable: {e.strerror}") from None
            self._fds[parts] = fd
            return fd
        parent = self._dirfd(parts[:-1], create)
        if parent is None:
            if absent is not None:
                absent.add(parts)
            return None
        name = parts[-1]
        walked = "/" + "/".join(parts)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                if absent is not None:
                    absent.add(parts)
                return None
            try:
                os.mkdir(name, 0o755, dir_fd=parent)
            except FileExistsError:
                pass
            os.fsync(parent)
            fd = self._open_dir(name, parent, walked)
        except OSError as e:
            fd = self._refuse(name, parent, walked, e)
        self._fds[parts] = fd
        return fd

    # --- paths -----------------------------------------------------------------------

    @staticmethod
    @functools.lru_cache(maxsize=1 << 16)
    def parts(target: str) -> tuple[str, ...]:
        """`/etc/motd` → ("etc", "motd"); refuses relative paths and `..`. Cached: a
        cycle asks it 6-7 times for each file it writes."""
        if not target.startswith("/"):
            raise ApplyError(f"{target!r} is not an absolute path")
        parts = tuple(p for p in target.split("/") if p not in ("", "."))
        if ".." in parts or any("\0" in p for p in parts):
            raise EscapeError(f"{target} contains '..': targets must stay under root")
        if not parts:
            raise ApplyError("the root directory itself cannot be managed")
        return parts

    def join(self, target: str) -> str:
        """Where `target` would be, by path: only for lstat() comparisons (drift, the stat
        fast path), where any redirect shows up as a changed signature, and messages."""
        return self.root.rstrip("/") + target if self.root != "/" else target

    def check_root(self) -> None:
        if not os.path.isdir(self.root):
            raise ApplyError(f"root {self.root} does not exist or is not a directory")

    def at(self, target: str, create: bool = False) -> tuple[int, str] | None:
        """An fd of target's parent directory, reached without following any symlink,
        and the last component; None when a parent is missing (and not `create`).
        Missing parents are made 0755 root:root with mkdirat when `create`. The fd
        belongs to the cache: use it before the next call, never close it."""
        parts = self.parts(target)
        fd = self._fd_of(parts[:-1], create)
        return None if fd is None else (fd, parts[-1])

    def _dir(self, directory: str) -> int | None:
        """A cached fd of a directory itself (None when it is missing)."""
        return self._fd_of(self.parts(directory))

    def _fd_of(self, parts: tuple[str, ...], create: bool = False) -> int | None:
        """_dirfd, with the cache emptied first when it is full."""
        if len(self._fds) >= self.MAX_FDS:
            self.close()  # between operations: no fd of the cache is in use now
        return self._dirfd(parts, create)

    def _open_dir(self, name: str, dirfd: int, walked: str) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dirfd)
        except OSError as e:
            return self._refuse(name, dirfd, walked, e)

    def _refuse(self, name: str, dirfd: int, walked: str, e: OSError) -> int:
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except OSError:
            raise ApplyError(f"cannot open {self.join(walked)}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise EscapeError(
                f"{walked} is a symlink on the host ({self.join(walked)} -> "
                f"{os.readlink(name, dir_fd=dirfd)}); managed paths never resolve through a "
                f"symlink: refusing to write there")
        raise EscapeError(f"{walked} is a {kind_name(st.st_mode)} on the host, not a "
                          f"directory; refusing to write below it")

    def lstat(self, target: str) -> os.stat_result | None:
        """lstat without following any symlink on the way (EscapeError if one is there)."""
        p = self.at(target)
        if p is None:
            return None
        try:
            return os.stat(p[1], dir_fd=p[0], follow_symlinks=False)
        except FileNotFoundError:
            return None

    def read(self, target: str) -> bytes:
        p = self.at(target)
        if p is None:
            raise FileNotFoundError(self.join(target))
        fd = os.open(p[1], _READ_FLAGS, dir_fd=p[0])
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ApplyError(f"{target} is not a regular file on the host")
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def listdir(self, target: str) -> list[str]:
        fd = self._dir(target)
        return [] if fd is None else os.listdir(fd)

    # --- ownership ---------------------------------------------------------------------

    def _table(self, name: str) -> dict[str, int]:
        if name not in self._ids:
            table: dict[str, int] = {}
            try:
                data = self.read(f"/etc/{name}").decode(errors="replace")
            except (OSError, ApplyError):
                data = ""
            for line in data.splitlines():
                cols = line.split(":")
                if len(cols) >= 3 and cols[2].isascii() and cols[2].isdigit():
                    table.setdefault(cols[0], int(cols[2]))
            table.setdefault("root", 0)
            self._ids[name] = table
        return self._ids[name]

    def forget_ids(self) -> None:
        """Re-read passwd/group on the next lookup: a package or user resource may just
        have created the owner a file names."""
        self._ids.clear()

    def uid(self, user: str | None) -> int:
        return self._lookup("passwd", "user", user)

    def gid(self, group: str | None) -> int:
        return self._lookup("group", "group", group)

    def has_id(self, table: str, name: str) -> bool:
        try:
            return parse_id(name) is not None or name in self._table(table)
        except ValueError:
            return False

    def _lookup(self, table: str, what: str, name: str | None) -> int:
        if name is None:
            return 0
        try:
            n = parse_id(name)
        except ValueError as e:
            raise ApplyError(f"{what} {e}") from None
        if n is not None:
            return n
        try:
            return self._table(table)[name]
        except KeyError:
            raise ApplyError(
                f"{what} {name!r} does not exist in {self.join('/etc/' + table)}") from None

    def user_name(self, uid: int) -> str:
        return _reverse(self._table("passwd"), uid)

    def group_name(self, gid: int) -> str:
        return _reverse(self._table("group"), gid)

    # --- mutations ---------------------------------------------------------------------

    def write_file(self, target: str, data: bytes, mode: int, uid: int, gid: int) -> None:
        """Atomic: temp file in the same directory with final mode and owner, fsync,
        renameat, fsync of the directory. Missing parents are made first. A file staged
        with this same content, mode and owner is only renamed (see stage)."""
        p = self.at(target, create=True)
        assert p is not None
        staged = self._staged.pop(target, None)
        if staged is not None:
            if staged[1:] == (data, mode, uid, gid):
                try:
                    os.rename(staged[0], p[1], src_dir_fd=p[0], dst_dir_fd=p[0])
                    self._renamed.add(self.parts(target)[:-1])
                    return
                except OSError:
                    pass  # the directory changed since: write it the ordinary way
            _unlink_quiet(staged[0], p[0])
        write_at(p[0], p[1], data, mode, uid, gid)

    # --- staged writes: many files, one sync per filesystem ------------------------------

    STAGE_MIN = 16  # below this, an fsync per file costs less than syncing a filesystem

    def stage(self, files: list[tuple[str, bytes, int, int, int]]) -> int:
        """Write the new contents of many files ahead of their turn: every temp file
        (final mode and owner, as write_file makes it) first, then one syncfs(2) per
        filesystem instead of an fsync per file, so that each is durable before
        write_file renames it into place. Their directories are made durable by
        settle(), which the converge calls before anything records them as applied.
        Returns how many were staged: none for fewer than STAGE_MIN files, without
        syncfs, or when any write fails (write_file then reports it, file by file)."""
        global _syncfs
        if len(files) < self.STAGE_MIN:
            return 0
        if _syncfs is None:
            _syncfs = _find_syncfs()
        if not _syncfs:
            return 0
        devices: dict[int, int] = {}  # st_dev -> an fd on that filesystem
        try:
            for target, data, mode, uid, gid in files:
                p = self.at(target, create=True)
                assert p is not None
                tmp = tmp_name(p[1])
                _write_tmp(p[0], tmp, data, mode, uid, gid, sync=False)
                self._staged[target] = (tmp, data, mode, uid, gid)
                dev = os.fstat(p[0]).st_dev
                if dev not in devices:
                    devices[dev] = os.dup(p[0])
            for fd in devices.values():
                _syncfs(fd)
        except (OSError, ApplyError):
            self.settle()  # a refused parent, a full disk: write_file says so, per file
            return 0
        finally:
            for fd in devices.values():
                os.close(fd)
        return len(self._staged)

    def settle(self) -> None:
        """End of staged writes: remove the temp files never renamed, and fsync each
        directory a staged file was renamed into (one journal commit covers them all)."""
        staged, self._staged = self._staged, {}
        for target, (tmp, *_) in staged.items():
            p = self.at(target)
            if p is not None:
                _unlink_quiet(tmp, p[0])
        renamed, self._renamed = self._renamed, set()
        for parts in sorted(renamed):
            try:
                fd = self._fd_of(parts)
            except ApplyError:
                continue  # swapped for a symlink since: not ours to sync any more
            if fd is not None:
                os.fsync(fd)

    def set_meta(self, target: str, mode: int, uid: int, gid: int, want_dir: bool) -> None:
        """fchown+fchmod on an fd opened with O_NOFOLLOW: a symlink swapped in is refused."""
        p = self.at(target)
        if p is None:
            raise ApplyError(f"{target} disappeared while being converged")
        try:
            fd = os.open(p[1], _READ_FLAGS | (os.O_DIRECTORY if want_dir else 0),
                         dir_fd=p[0])
        except OSError as e:
            raise ApplyError(f"{target} changed on the host while being converged "
                             f"({e.strerror}); refusing to follow it") from None
        try:
            st = os.fstat(fd)
            if (stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)) is False:
                raise ApplyError(f"{target} is now a {kind_name(st.st_mode)} on the host; "
                                 f"refusing to change it")
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def mkdir(self, target: str, mode: int, uid: int, gid: int) -> None:
        p = self.at(target, create=True)
        assert p is not None
        os.mkdir(p[1], 0o700, dir_fd=p[0])
        fd = os.open(p[1], _DIR_FLAGS, dir_fd=p[0])
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.fsync(p[0])

    def symlink(self, target: str, points_to: str) -> None:
        p = self.at(target, create=True)
        assert p is not None
        tmp = tmp_name(p[1])
        os.symlink(points_to, tmp, dir_fd=p[0])
        try:
            os.rename(tmp, p[1], src_dir_fd=p[0], dst_dir_fd=p[0])
        except BaseException:
            _unlink_quiet(tmp, p[0])
            raise
        os.fsync(p[0])

    def remove(self, target: str) -> None:
        p = self.at(target)
        if p is None:
            return
        st = os.stat(p[1], dir_fd=p[0], follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            self._forget(self.parts(target))
            os.rmdir(p[1], dir_fd=p[0])
        else:
            os.unlink(p[1], dir_fd=p[0])
        os.fsync(p[0])

    def clean_stale_tmp(self, directory: str) -> list[str]:
        """Remove temp files a killed agent left in a managed directory (not ours, and
        their pid no longer an agent). Returns the names removed."""
        removed: list[str] = []
        try:
            fd = self._dir(directory)
            names = os.listdir(fd) if fd is not None else []
        except (ApplyError, OSError):
            return removed
        for name in names:
            m = TMP_RE.match(name)
            if m is None or _alive(int(m.group(1))):
                continue
            try:
                if not stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    os.unlink(name, dir_fd=fd)
                    removed.append(directory.rstrip("/") + "/" + name)
            except OSError:
                pass
        return removed

    # --- the running kernel (only with root: /) -------------------------------------------

    @staticmethod
    def _proc(path: str) -> str:
        if not path.startswith("/proc/sys/") or ".." in path.split("/"):
            raise ApplyError(f"{path} is not a kernel parameter under /proc/sys")
        return path

    def read_proc(self, path: str) -> str:
        fd = os.open(self._proc(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return os.read(fd, 1 << 16).decode(errors="replace")
        finally:
            os.close(fd)

    def write_proc(self, path: str, value: str) -> None:
        fd = os.open(self._proc(path), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode() + b"\n")
        finally:
            os.close(fd)

    @staticmethod
    def boot_id() -> str:
        """This boot: the kernel's boot id and the start time of PID 1 as this process
        sees it (a container's init restarted is a new boot too)."""
        parts = []
        for path in ("/proc/sys/kernel/random/boot_id", "/proc/1/stat"):
            try:
                with open(path) as f:
                    text = f.read()
            except OSError:
                text = ""
            parts.append(text.strip() if "boot_id" in path
                         else (text.rsplit(")", 1)[-1].split() + [""] * 20)[19])
        return ":".join(parts)

    def run(self, argv: list[str], *, timeout: float = 600, env: dict | None = None,
            input: bytes | None = None) -> Result:
        """Run argv (a list, never a shell string) and capture its output."""
        self.spawned += 1
        try:
            p = subprocess.run(argv, capture_output=True, timeout=timeout, env=env, input=input,
                               check=False)
        except FileNotFoundError:
            return Result(argv, 127, b"", f"{argv[0]}: command not found".encode())
        except subprocess.TimeoutExpired as e:
            return Result(argv, 124, e.stdout or b"", f"timed out after {timeout}s".encode())
        return Result(argv, p.returncode, p.stdout, p.stderr)


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error_text(self) -> str:
        text = (self.stderr or self.stdout).decode(errors="replace").strip()
        return text or f"{self.argv[0]} exited {self.returncode}"


def kind_name(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "special file"


def _alive(pid: int) -> bool:
    """A temp file of a live process (this one included) is never touched."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _reverse(table: dict[str, int], wanted: int) -> str:
    for name, num in table.items():
        if num == wanted:
            return name
    return str(wanted)


def tmp_name(base: str) -> str:
    return f".{base}.gitops-agent.{os.getpid()}.tmp"


def _unlink_quiet(name: str, dir_fd: int | None = None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _write_tmp(dirfd: int, tmp: str, data: bytes, mode: int, uid: int | None,
               gid: int | None, sync: bool) -> None:
    """The temp file of an atomic write, with its final mode and owner; removed again
    if anything fails."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dirfd)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            os.fchmod(fd, mode)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quiet(tmp, dirfd)
        raise


def write_at(dirfd: int, name: str, data: bytes, mode: int, uid: int | None = None,
             gid: int | None = None) -> None:
    """Write `data` to `name` in `dirfd` so that a reader sees the old file or the new.

    The temp file is in the same directory (rename is atomic only within a
    filesystem) and carries the final mode and owner before the rename, so there is
    no window in which the new content is readable with looser permissions.
    """
    tmp = tmp_name(name)
    _write_tmp(dirfd, tmp, data, mode, uid, gid, sync=True)
    try:
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        _unlink_quiet(tmp, dirfd)
        raise
    os.fsync(dirfd)


# syncfs(2) from libc (Python has no os.syncfs): None until first needed, False if absent
_syncfs: Any = None


def _find_syncfs() -> Any:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return False

    def syncfs(fd: int) -> None:
        if fn(fd) != 0:  # since Linux 5.8 this also reports writeback errors
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return syncfs


def write_atomic(full: str, data: bytes, *, mode: int = 0o644, uid: int | None = None,
                 gid: int | None = None) -> None:
    """write_at for the agent's own files (state_dir, reports), by plain path."""
    d, name = os.path.split(full)
    dirfd = os.open(d or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_at(dirfd, name, data, mode, uid, gid)
    finally:
        os.close(dirfd)
