"""What the benchmark scripts share: git with a fixed identity, and the agent's argv
(the installed `gitops-agent` next to this Python, as a user runs it, else the module)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=b", "-c", "user.email=b@b", *args], cwd=cwd,
                   check=True, capture_output=True)


def agent_argv(*args: str) -> list[str]:
    exe = shutil.which("gitops-agent", path=os.path.dirname(sys.executable))
    return [exe, *args] if exe else [sys.executable, "-m", "agent.cli", *args]
