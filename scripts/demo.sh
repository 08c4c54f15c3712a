#!/usr/bin/env bash
# Install, then run the demo: examples/fleet converged, signed, into /tmp/gitops-demo/root.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
"$top/scripts/setup.sh"
exec "$top/examples/demo.sh" "$top/.venv/bin/gitops-agent"
