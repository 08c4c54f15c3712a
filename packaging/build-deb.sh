#!/usr/bin/env bash
# Build dist/gitops-agent_VERSION_ARCH.deb: the agent with its Python dependencies
# vendored under /usr/lib/gitops-agent (installing needs no network), the systemd unit,
# a commented /etc/gitops-agent/agent.yaml (a conffile), the gitops-agent group, and the
# state and runtime directories (made by the unit's StateDirectory=/RuntimeDirectory=).
#
#     packaging/build-deb.sh [PYTHON]      (default: .venv/bin/python, else python3)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-}
if [ -z "$py" ]; then
    if [ -x "$top/.venv/bin/python" ]; then py="$top/.venv/bin/python"; else py=python3; fi
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/pyproject.toml" | head -1)
arch=$(dpkg --print-architecture)
pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
next=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"

lib="$stage/usr/lib/gitops-agent"
mkdir -p "$lib" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/gitops-agent" \
         "$stage/DEBIAN" "$top/dist"
"$py" -m pip install --quiet --no-compile --target "$lib" "$top[systemd]"
rm -rf "$lib/bin"
cat > "$stage/usr/bin/gitops-agent" <<LAUNCH
#!/usr/bin/python3 -I
import sys
sys.path.insert(0, "/usr/lib/gitops-agent")
from agent.cli import main
sys.exit(main())
LAUNCH
chmod 0755 "$stage/usr/bin/gitops-agent"
install -m 0644 "$top/units/gitops-agent.service" "$stage/lib/systemd/system/"
install -m 0644 "$top/packaging/agent.yaml" "$stage/etc/gitops-agent/agent.yaml"
install -D -m 0644 "$top/README.md" "$stage/usr/share/doc/gitops-agent/README.md"
echo /etc/gitops-agent/agent.yaml > "$stage/DEBIAN/conffiles"
size=$(du -sk "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: gitops-agent
Version: $version
Architecture: $arch
Maintainer: gitops-agent developers <dev@gitops-agent.invalid>
Installed-Size: $size
Depends: python3 (>= $pyver), python3 (<< $next), libsystemd0, gpgv, adduser, ca-certificates
Section: admin
Priority: optional
Description: pull-based GitOps agent for bare-metal and VM hosts
 Pulls a signed Git branch, verifies the commit signatures before reading anything,
 converges files, packages, systemd units and services, keeps the last good revision
 for offline operation, refuses rollbacks, and reports status over a local socket,
 to systemd and journald, and as Prometheus metrics.
CONTROL
cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    getent group gitops-agent >/dev/null || addgroup --system --quiet gitops-agent
    # byte-compile once here: every `gitops-agent` start would otherwise compile again
    python3 -m compileall -q /usr/lib/gitops-agent >/dev/null 2>&1 || true
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
    # `apt remove` then `apt install` must not leave the host unmanaged: prerm wrote down
    # whether the administrator had the agent enabled (and running); put that back, as
    # deb-systemd-helper does for packaged units. A fresh install waits for the operator.
    mark=/var/lib/gitops-agent/.removed-while
    if [ -f "$mark.enabled" ]; then
        systemctl enable gitops-agent.service >/dev/null 2>&1 || true
        rm -f "$mark.enabled"
    fi
    if [ -d /run/systemd/system ]; then
        if [ -f "$mark.active" ]; then
            systemctl start gitops-agent.service || true
        else
            # restart a running agent on upgrade
            systemctl try-restart gitops-agent.service || true
        fi
    fi
    rm -f "$mark.active"
fi
exit 0
POSTINST
cat > "$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ]; then
    mark=/var/lib/gitops-agent/.removed-while
    mkdir -p /var/lib/gitops-agent
    if systemctl is-enabled --quiet gitops-agent.service 2>/dev/null; then
        touch "$mark.enabled"
    fi
    if [ -d /run/systemd/system ] && systemctl is-active --quiet gitops-agent.service; then
        touch "$mark.active"
    fi
    if [ -d /run/systemd/system ]; then
        systemctl stop gitops-agent.service || true
    fi
    systemctl disable gitops-agent.service >/dev/null 2>&1 || true
fi
find /usr/lib/gitops-agent -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true
exit 0
PRERM
cat > "$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
    rm -rf /var/lib/gitops-agent
    # the files the README tells operators to put here go with the package; anything
    # else stays, and dpkg says the directory is not empty
    for f in allowed_signers allowed_signers.old trusted.gpg revoked_keys approvers \
             known_hosts id_ed25519 id_ed25519.pub token age.key; do
        rm -f "/etc/gitops-agent/$f"
    done
    rmdir /etc/gitops-agent 2>/dev/null || true
    getent group gitops-agent >/dev/null && delgroup --system --quiet gitops-agent || true
fi
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
exit 0
POSTRM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"
out="$top/dist/gitops-agent_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip -b "$stage" "$out" >/dev/null
echo "$out"
