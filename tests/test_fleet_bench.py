"""Issue 14.3: bench/fleet.py, run small. Correctness only (the figures it prints are the
bench's business): every agent daemon converges the first commit and applies a signed
push through the real `git daemon`, and every host's report in the SFTP drop names it.
The bench exits non-zero, saying which, when any of that fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench/fleet.py"


def test_the_fleet_bench_s_hosts_all_converge_and_report():
    p = subprocess.run([sys.executable, str(BENCH), "--hosts", "3", "--idle", "1",
                        "--probe", "1s", "--interval", "30s", "--reports"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "(3/3 hosts)" in p.stdout
    assert "report drop during the rollout:" in p.stdout
