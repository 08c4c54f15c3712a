"""Host identity and facts, the only host input to render.

Owns: hostname, machine-id, os-release, arch, cpu count and memory (psutil), and
the stable digest of all of them that keys the render cache.
Must not: read anything under the converge `root`: facts describe the machine the
agent runs on, which is what templates are written against.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Facts:
    hostname: str
    machine_id: str
    os_id: str
    os_version: str
    arch: str
    cpus: int
    memory_mb: int

    def as_dict(self) -> dict:
        return asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


def _os_release(path: str = "/etc/os-release") -> dict[str, str]:
    """`ID=debian` / `VERSION_ID="12"` lines → {"ID": "debian", "VERSION_ID": "12"}."""
    out: dict[str, str] = {}
    for candidate in (path, "/usr/lib/os-release"):
        try:
            with open(candidate) as f:
                for line in f:
                    key, sep, value = line.strip().partition("=")
                    if sep and not key.startswith("#"):
                        out[key] = value.strip().strip("'\"")
            return out
        except OSError:
            continue
    return out


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _memory_mb() -> int:
    """MemTotal of /proc/meminfo, what psutil.virtual_memory().total reads (importing
    psutil for this one number cost ~10 ms of every apply process)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


def gather() -> Facts:
    osr = _os_release()
    return Facts(
        hostname=socket.gethostname(),
        machine_id=_read("/etc/machine-id"),
        os_id=osr.get("ID", "linux"),
        os_version=osr.get("VERSION_ID", ""),
        arch=os.uname().machine,  # what platform.machine() returns, without its import
        cpus=os.cpu_count() or 1,
        memory_mb=_memory_mb(),
    )


def static(hostname: str = "preview", **over: object) -> Facts:
    """Facts for an offline `render` preview of another host: neutral values."""
    base = dict(hostname=hostname, machine_id="0" * 32, os_id="debian", os_version="12",
                arch="x86_64", cpus=2, memory_mb=2048)
    base.update(over)
    return Facts(**base)  # type: ignore[arg-type]
