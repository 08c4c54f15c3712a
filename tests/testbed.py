"""A real systemd booted as PID 1 of its own PID+mount namespace over a Debian rootfs
(../shared/SYSTEMD-TESTBED.md). The rootfs is built with debootstrap once and cached as
a tarball in /var/cache/gitops-agent-testbed, outside the repository; each test run
unpacks a fresh copy, so nothing a test does inside it outlives the test."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("GITOPS_TESTBED_CACHE", "/var/cache/gitops-agent-testbed"))
TARBALL = CACHE / "rootfs-bookworm-v3.tar"
# openssh-server: a user the agent creates logs in with its authorized key (its unit is
# masked in the image, so nothing listens unless a test starts sshd on 127.0.0.1)
PACKAGES = "systemd,systemd-sysv,dbus,python3,gpgv,ca-certificates,openssh-server"


def _mirror() -> str:
    """The Debian mirror this machine's apt sources already use."""
    for path in ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if line.startswith("URIs:") and len(words) > 1 and "security" not in words[1]:
                return words[1]
            if line.startswith("deb ") and len(words) > 2 and "security" not in words[1]:
                return words[1] if not words[1].startswith("[") else words[2]
    return "http://deb.debian.org/debian"


def ensure_rootfs() -> Path:
    """Build the cached rootfs tarball when it is missing (about a minute)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if TARBALL.exists():
            return TARBALL
        build = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
        try:
            os.chmod(build, 0o755)
            subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}",
                            "bookworm", str(build), _mirror()], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            (build / "etc/hostname").write_text("testbed\n")
            for unit in ("ssh.service", "ssh.socket", "sshd.service"):
                link = build / "etc/systemd/system" / unit
                if link.is_symlink() or link.exists():
                    link.unlink()
                link.symlink_to("/dev/null")  # masked: the testbed shares our network
            for wants in build.glob("etc/systemd/system/*.wants/ssh*"):
                wants.unlink()
            subprocess.run(["tar", "-C", str(build), "-cf", str(TARBALL) + ".tmp", "."],
                           check=True)
            os.rename(str(TARBALL) + ".tmp", TARBALL)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return TARBALL


BOOT = """#!/bin/sh
set -e
mount --make-rprivate /
mount --rbind /sys  "$1/sys"
mount --rbind /dev  "$1/dev"
mount -t proc  proc  "$1/proc"
mount -t tmpfs tmpfs "$1/run"
exec chroot "$1" /usr/bin/env container=other /lib/systemd/systemd --system \
    --log-target=console
"""


class Testbed:
    __test__ = False  # not a test class, for pytest
    def __init__(self, base: Path) -> None:
        self.root = base / "rootfs"
        self.root.mkdir(mode=0o755)
        os.chmod(base, 0o755)  # dbus drops root and must reach / (see the testbed notes)
        subprocess.run(["tar", "-C", str(self.root), "-xf", str(ensure_rootfs())], check=True)
        self.log = base / "console.log"
        self.proc: subprocess.Popen | None = None
        self.pid = 0

    def boot(self, timeout: float = 90) -> None:
        script = self.root.parent / "boot.sh"
        script.write_text(BOOT)
        script.chmod(0o755)
        with open(self.log, "wb") as console:
            self.proc = subprocess.Popen(
                # its own PID, mount, UTS and IPC namespaces: systemd sets the hostname
                # and the sysctls of those namespaces, never the test machine's
                ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc", "--propagation",
                 "private", str(script), str(self.root)], stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline and not self.pid:
            kids = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                                  text=True).stdout.split()
            for k in kids:
                try:
                    if Path(f"/proc/{k}/comm").read_text().strip() == "systemd":
                        self.pid = int(k)
                except OSError:
                    pass
            time.sleep(0.1)
        if not self.pid:
            raise RuntimeError(f"systemd did not start: {self.log.read_text()[-2000:]}")
        state = self.run("systemctl", "is-system-running", "--wait", check=False,
                         timeout=timeout).stdout.strip()
        if state not in ("running", "degraded"):
            raise RuntimeError(f"testbed is {state!r}: {self.log.read_text()[-2000:]}")

    def run(self, *argv: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "-u", "-i", "-r", "-w",
                            *argv],
                           capture_output=True, text=True, timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise AssertionError(f"{argv} exited {p.returncode}: {p.stdout}{p.stderr}")
        return p

    def stop(self) -> None:
        if self.pid:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc:
            self.proc.wait(30)
        self.pid = 0


def available() -> str | None:
    """Why the testbed cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("debootstrap", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs it)"
    return None
