#!/usr/bin/env bash
# The demo: the agent converges the examples/ fleet into a sandbox root, signed.
# Usage: examples/demo.sh [GITOPS_AGENT]   (default: gitops-agent on PATH)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
agent=${1:-gitops-agent}
demo=/tmp/gitops-demo
rm -rf "$demo" && mkdir -p "$demo/root"
cfg="$here/agent.yaml"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "1. a signing key and the host's pinned allowed_signers file"
ssh-keygen -q -t ed25519 -N '' -C ops@example.com -f "$demo/signing_key"
echo "ops@example.com namespaces=\"git\" $(cut -d' ' -f1,2 "$demo/signing_key.pub")" \
    > "$demo/allowed_signers"
cat "$demo/allowed_signers"

say "2. the fleet repo from examples/fleet, committed with git commit -S (gpg.format=ssh)"
git init -q -b main "$demo/work"
cp -r "$here/fleet/." "$demo/work/"
g() { git -C "$demo/work" -c user.name=Ops -c user.email=ops@example.com \
        -c gpg.format=ssh -c user.signingkey="$demo/signing_key" "$@"; }
g add -A && g commit -q -S -m "fleet: base and web roles"
git clone -q --bare "$demo/work" "$demo/fleet.git"
g remote add origin "$demo/fleet.git"
g log --show-signature -1 --format='%h %s' \
    -c gpg.ssh.allowedSignersFile="$demo/allowed_signers" 2>/dev/null || true
git -C "$demo/work" -c gpg.ssh.allowedSignersFile="$demo/allowed_signers" verify-commit HEAD

say "3. what web-01 would get (render, offline, no host needed)"
"$agent" render --repo "$demo/work" --host web-01 --label env=prod | head -20

say "4. gitops-agent apply into the sandbox root $demo/root"
"$agent" apply --config "$cfg"
find "$demo/root" -printf '%M %u %p\n' | sort -k3
echo "--- $demo/root/etc/nginx/nginx.conf"; cat "$demo/root/etc/nginx/nginx.conf"

say "5. apply again: nothing to do"
"$agent" apply --config "$cfg"

say "6. a signed change: 16 workers; plan shows the diff, apply converges"
sed -i 's/worker_processes: 8/worker_processes: 16/' "$demo/work/hosts/web-01.yaml"
g commit -q -S -am "web-01: 16 workers" && g push -q origin main
"$agent" plan --config "$cfg"
"$agent" apply --config "$cfg"

say "7. drift: someone edits a managed file; the next cycle puts it back"
echo "hacked" > "$demo/root/etc/motd"
"$agent" apply --config "$cfg"

say "8. a secret: the host's own age key; a file encrypted to it; never shown in clear"
"$agent" keygen --identity "$demo/age.key"
mkdir -p "$demo/work/secrets"
printf 'correct horse battery staple\n' \
    | age -r "$("$agent" recipient --identity "$demo/age.key")" -o "$demo/work/secrets/db.pass.age"
printf 'files:\n  /etc/app/db.pass: {secret: secrets/db.pass.age}\n' \
    >> "$demo/work/hosts/web-01.yaml"
g add -A && g commit -q -S -m "web-01: the database password, age-encrypted" && g push -q origin main
"$agent" plan --config "$cfg"
"$agent" apply --config "$cfg"
ls -l "$demo/root/etc/app/db.pass"
if grep -rqs "correct horse" "$demo/state"; then echo "plaintext in state_dir!"; exit 1; fi
echo "state_dir holds no plaintext"

say "9. an UNSIGNED commit is refused; the host stays on last good"
echo "# sneaky" >> "$demo/work/roles/base.yaml"
git -C "$demo/work" -c user.name=Mallory -c user.email=m@example.com commit -q -am "unsigned"
git -C "$demo/work" push -q origin main
"$agent" apply --config "$cfg" && { echo "unsigned commit was applied!"; exit 1; } || true
"$agent" history --config "$cfg"
say "done: the sandbox root is $demo/root"
