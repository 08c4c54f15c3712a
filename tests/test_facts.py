"""The facts a host renders with (agent/facts.py), read from this machine."""

from __future__ import annotations

import os
import platform
import socket

import psutil

from agent import facts


def test_gather_reads_this_host():
    f = facts.gather()
    assert f.hostname == socket.gethostname()
    assert f.cpus == os.cpu_count()
    assert f.arch == platform.machine()
    # read from /proc/meminfo without importing psutil; the same number psutil gives
    assert f.memory_mb == psutil.virtual_memory().total // (1024 * 1024) > 0
    assert f.digest() == facts.gather().digest()
