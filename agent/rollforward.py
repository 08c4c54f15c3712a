"""`gitops-agent fleet rollback`: go back to any earlier state of the fleet as a new
commit on the branch, so that hosts take it through normal forward history (signatures,
approvals, waves and windows apply to it like to any commit; the anti-rewind rule that
refuses a force-push back stays intact).

Owns: making that commit (REV's tree, the current tip as parent, a message naming REV
and the reason, signed with the operator's own git signing key when asked), moving the
branch to it, and the dry run: which hosts' plans change, by an offline render of every
host named in fleet.yaml, hosts/ or a report drop.
Must not: push. The operator reviews and pushes it like any change.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from .errors import AgentError, UsageError


def _git(repo: str, *args: str, check: bool = True) -> str:
    p = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                       check=False)
    if check and p.returncode != 0:
        raise UsageError(f"fleet rollback: git {' '.join(args[:2])} failed: "
                         f"{p.stderr.strip() or p.stdout.strip()}")
    return p.stdout.strip()


def rollback(repo: str, to: str, branch: str | None, sign: bool, message: str,
             dry_run: bool, reports: str | None, labels: dict[str, str] | None = None
             ) -> dict[str, Any]:
    if not branch:
        branch = _git(repo, "symbolic-ref", "--short", "HEAD", check=False) or "main"
    tip = _git(repo, "rev-parse", "--verify", f"refs/heads/{branch}^{{commit}}")
    target = _git(repo, "rev-parse", "--verify", f"{to}^{{commit}}")
    if subprocess.run(["git", "-C", repo, "merge-base", "--is-ancestor", target, tip],
                      capture_output=True).returncode != 0:
        raise UsageError(f"fleet rollback: {to} ({target[:12]}) is not in the history of "
                         f"{branch}: only an earlier state of the branch can be gone back to")
    tree = _git(repo, "rev-parse", f"{target}^{{tree}}")
    if tree == _git(repo, "rev-parse", f"{tip}^{{tree}}"):
        raise UsageError(f"fleet rollback: {branch} ({tip[:12]}) already has the tree of "
                         f"{target[:12]}: nothing to go back to")
    subject = _git(repo, "log", "-1", "--format=%s", target)
    text = (f"Roll back to {target[:12]}: {message or 'no reason given'}\n\n"
            f"The tree of {target} (\"{subject}\"), on top of {tip[:12]}.\n\n"
            f"Rollback-To: {target}\n")
    out: dict[str, Any] = {"branch": branch, "tip": tip, "to": target, "tree": tree,
                           "message": text, "commit": None, "hosts": None}
    if dry_run:
        out["hosts"] = changed_hosts(repo, tip, target, reports, labels or {})
        return out
    args = ["commit-tree", tree, "-p", tip, "-m", text]
    if sign:
        args.insert(1, "-S")
    new = _git(repo, *args)
    bare = _git(repo, "rev-parse", "--is-bare-repository") == "true"
    current = _git(repo, "symbolic-ref", "-q", "HEAD", check=False)
    if not bare and current == f"refs/heads/{branch}":
        # the branch is checked out: move it, the index and the work tree together (git
        # refuses when local changes would be overwritten)
        _git(repo, "merge", "--ff-only", "-q", new)
    else:
        _git(repo, "update-ref", f"refs/heads/{branch}", new, tip)
    out["commit"] = new
    out["signed"] = sign
    return out


def host_names(tree: Any, reports: str | None) -> dict[str, dict[str, str] | None]:
    """Every host named in fleet.yaml (plain names in groups' hosts:, recipients:),
    hosts/*.yaml, and the report drop, with the labels its report carries (None: no
    report, so no labels known)."""
    from .fleet import load_report
    from .yamlsrc import load

    names: dict[str, dict[str, str] | None] = {}
    try:
        fleet = load(tree.read("fleet.yaml"), "fleet.yaml") or {}
    except AgentError:
        fleet = {}
    for group in fleet.get("groups") or [] if isinstance(fleet, dict) else []:
        if isinstance(group, dict):
            for h in group.get("hosts") or []:
                if isinstance(h, str) and not any(c in h for c in "*?[]"):
                    names.setdefault(h, None)
    recips = fleet.get("recipients") if isinstance(fleet, dict) else None
    if isinstance(recips, dict):
        for h in recips:
            names.setdefault(str(h), None)
    for name in tree.listdir("hosts"):
        if name.endswith(".yaml"):
            names.setdefault(name[:-5], None)
    if reports and os.path.isdir(reports):
        for name in os.listdir(reports):
            if name.endswith(".json") and not name.startswith("."):
                rep, _ = load_report(os.path.join(reports, name))
                labels = (rep or {}).get("labels")
                ok = isinstance(labels, dict) and all(
                    isinstance(k, str) and isinstance(v, str) for k, v in labels.items())
                names[name[:-5]] = labels if ok else names.get(name[:-5])
    return dict(sorted(names.items()))


def changed_hosts(repo_path: str, tip: str, target: str, reports: str | None,
                  default_labels: dict[str, str]) -> list[dict[str, Any]]:
    """Each host's plan at the tip and at the target (offline, secrets as placeholders,
    labels from the host's report, else `default_labels`): which hosts change, and which
    of their resources."""
    from .config import LimitsConfig
    from .render import offline
    from .source import open_repo

    repo = open_repo(repo_path)
    now, then = repo.tree(tip, LimitsConfig()), repo.tree(target, LimitsConfig())
    out = []
    for host, labels in host_names(now, reports).items():
        labels = labels if labels is not None else default_labels
        row: dict[str, Any] = {"host": host, "labels": labels}
        try:
            a = {r.identity: r.digest() for r in offline(now, host, labels).resources}
            b = {r.identity: r.digest() for r in offline(then, host, labels).resources}
        except AgentError as e:
            row.update(changes=None, error=str(e))
            out.append(row)
            continue
        row["changes"] = sorted(i for i in a.keys() | b.keys() if a.get(i) != b.get(i))
        out.append(row)
    return out


def human(out: dict[str, Any]) -> str:
    if out["commit"] is None:
        lines = [f"dry run: a commit on {out['branch']} ({out['tip'][:12]}) with the tree of "
                 f"{out['to'][:12]} would change these hosts' plans (rendered offline with "
                 f"the labels of their reports, else --label):\n"]
        for row in out["hosts"] or []:
            if row.get("error"):
                lines.append(f"  {row['host']}: does not render: {row['error']}\n")
            elif row["changes"]:
                lines.append(f"  {row['host']}: {len(row['changes'])} resources: "
                             f"{', '.join(row['changes'][:8])}"
                             + (" ..." if len(row["changes"]) > 8 else "") + "\n")
            else:
                lines.append(f"  {row['host']}: unchanged\n")
        return "".join(lines)
    return (f"{out['branch']} is now {out['commit'][:12]}: the tree of {out['to'][:12]} on "
            f"top of {out['tip'][:12]}" + (", signed" if out.get("signed") else "")
            + f"; push it: git push origin {out['branch']}\n")
