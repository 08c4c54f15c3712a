"""The only gate to the OS: paths under the root prefix, atomic writes, subprocesses.

Owns: confining every target to `root` (refusing `..` and host symlinks that lead
out of it), atomic file writes (temp file in the same directory, final mode and
owner set before the rename, fsync, rename, fsync of the directory), user/group
lookup in the root's own /etc/passwd and /etc/group, and run(argv).
Must not: decide what should change; resources/ decide, this module does.
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass

from .errors import ApplyError, EscapeError


class Host:
    def __init__(self, root: str = "/") -> None:
        self.root = os.path.realpath(root)
        self._ids: dict[str, dict[str, int]] = {}
        self.spawned = 0  # processes run through this host (reported per cycle)

    # --- paths -----------------------------------------------------------------------

    def path(self, target: str) -> str:
        """Map an absolute target (`/etc/motd`) to where it lives under root.

        Refuses `..` components and any path whose parent directory resolves, through a
        symlink on the host, outside root. The last component is never followed: a
        symlink there is replaced, not written through.
        """
        if not target.startswith("/"):
            raise ApplyError(f"{target!r} is not an absolute path")
        parts = [p for p in target.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise EscapeError(f"{target} contains '..': targets must stay under root")
        full = os.path.join(self.root, *parts) if parts else self.root
        parent = os.path.realpath(os.path.dirname(full)) if parts else self.root
        if not _within(parent, self.root):
            raise EscapeError(
                f"{target} resolves outside root {self.root} through a symlink on the host "
                f"({os.path.dirname(full)} -> {parent}); refusing to write there")
        return full

    def join(self, target: str) -> str:
        """Where `target` would be, without the containment checks of path(): only for
        lstat() comparisons, where any redirect shows up as a changed signature."""
        return self.root.rstrip("/") + target if self.root != "/" else target

    def contained(self, full: str) -> bool:
        return _within(os.path.realpath(os.path.dirname(full)), self.root)

    # --- ownership ---------------------------------------------------------------------

    def _table(self, name: str) -> dict[str, int]:
        if name not in self._ids:
            table: dict[str, int] = {}
            try:
                with open(os.path.join(self.root, "etc", name)) as f:
                    for line in f:
                        cols = line.rstrip("\n").split(":")
                        if len(cols) >= 3 and cols[2].isdigit():
                            table.setdefault(cols[0], int(cols[2]))
            except OSError:
                pass
            table.setdefault("root", 0)
            self._ids[name] = table
        return self._ids[name]

    def uid(self, user: str | None) -> int:
        return self._lookup("passwd", "user", user)

    def gid(self, group: str | None) -> int:
        return self._lookup("group", "group", group)

    def _lookup(self, table: str, what: str, name: str | None) -> int:
        if name is None:
            return 0
        if name.isdigit():
            return int(name)
        try:
            return self._table(table)[name]
        except KeyError:
            raise ApplyError(
                f"{what} {name!r} does not exist in {os.path.join(self.root, 'etc', table)}"
            ) from None

    def user_name(self, uid: int) -> str:
        return _reverse(self._table("passwd"), uid)

    def group_name(self, gid: int) -> str:
        return _reverse(self._table("group"), gid)

    # --- mutations ---------------------------------------------------------------------

    def ensure_parents(self, full: str) -> list[str]:
        """Create missing parent directories (0755, root) of `full`; return those made."""
        made = []
        parent = os.path.dirname(full)
        missing = []
        while not os.path.lexists(parent) and parent != self.root:
            missing.append(parent)
            parent = os.path.dirname(parent)
        for d in reversed(missing):
            os.mkdir(d, 0o755)
            made.append(d)
        if made:
            fsync_dir(os.path.dirname(made[0]))
        return made

    def write_file(self, full: str, data: bytes, mode: int, uid: int, gid: int) -> None:
        write_atomic(full, data, mode=mode, uid=uid, gid=gid)

    def symlink(self, full: str, target: str) -> None:
        tmp = _tmpname(full)
        os.symlink(target, tmp)
        try:
            os.rename(tmp, full)
        except BaseException:
            _unlink_quiet(tmp)
            raise
        fsync_dir(os.path.dirname(full))

    def remove(self, full: str) -> None:
        st = os.lstat(full)
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(full)
        else:
            os.unlink(full)
        fsync_dir(os.path.dirname(full))

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


def _within(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


def _reverse(table: dict[str, int], wanted: int) -> str:
    for name, num in table.items():
        if num == wanted:
            return name
    return str(wanted)


def _tmpname(full: str) -> str:
    d, base = os.path.split(full)
    return os.path.join(d, f".{base}.gitops-agent.{os.getpid()}.tmp")


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(full: str, data: bytes, *, mode: int = 0o644, uid: int | None = None,
                 gid: int | None = None) -> None:
    """Write `data` to `full` so that a reader sees the old file or the new, never half.

    The temp file is in the same directory (rename is atomic only within a
    filesystem) and carries the final mode and owner before the rename, so there is
    no window in which the new content is readable with looser permissions.
    """
    tmp = _tmpname(full)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if uid is not None or gid is not None:
                os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, full)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    fsync_dir(os.path.dirname(full) or ".")
