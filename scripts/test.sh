#!/usr/bin/env bash
# Install, lint, then run the whole test suite (real git, git daemon, sshd, gpg, dpkg,
# and a systemd testbed whose rootfs is cached in /var/cache/gitops-agent-testbed).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
"$top/scripts/setup.sh"
cd "$top"
.venv/bin/ruff check agent tests bench
exec .venv/bin/python -m pytest -q "$@"
