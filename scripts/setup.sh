#!/usr/bin/env bash
# Install what gitops-agent needs to run its demo and tests on Debian 12, as root:
# the system tools (git, ssh, gpg, dpkg-dev, debootstrap, libsystemd-dev, age) and a venv
# in .venv with the agent and its Python dependencies. Idempotent and quick when done.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
pkgs=(git openssh-client openssh-server gnupg gpgv dpkg-dev debootstrap libsystemd-dev
      pkg-config gcc python3-dev python3-venv ca-certificates systemd util-linux iproute2
      age)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
py=${PYTHON:-python3}
if [ ! -x "$top/.venv/bin/python" ]; then
    "$py" -m venv "$top/.venv"
fi
stamp="$top/.venv/.installed"
if [ ! -f "$stamp" ] || [ "$top/pyproject.toml" -nt "$stamp" ]; then
    "$top/.venv/bin/pip" install -q --upgrade pip >/dev/null
    "$top/.venv/bin/pip" install -q -e "$top[test,systemd]"
    touch "$stamp"
fi
