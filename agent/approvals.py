"""k-of-n approvals: a tip is applied only when enough distinct people signed off on it.

Owns: the approval format (an SSH signature, namespace `gitops-agent-approval`, over a
canonical text binding the branch, the commit and its tree), where approvals live in the
fleet repo (`refs/approvals/<commit>/<key fingerprint, hex>`, one ref per approver, each
a tiny parentless commit whose tree holds `approval.sig`), checking them against the
local approvers file, and counting distinct principals against the threshold.
Must not: read approvers or thresholds from the repository (local config only), or
trust a ref's name: the signed text says which commit, tree and branch it approves.

Why a commit and not a bare blob under the ref: once libgit2's mirror holds one ref
that points at a blob, a later fetch of another one fails ("object is not a
committish"). The agent also deletes the approval refs it fetched right after reading
them, so a hostile server that pushes blob refs anyway cannot break later fetches.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any

from . import sshsig
from .errors import TrustError
from .source import APPROVAL_MAX_REFS as MAX_REFS
from .source import APPROVAL_MAX_SIG as MAX_SIG

NAMESPACE = "gitops-agent-approval"


def payload(branch: str, commit: str, tree: str) -> bytes:
    """The text an approver signs."""
    return (f"gitops-agent approval v1\nbranch {branch}\ncommit {commit}\n"
            f"tree {tree}\n").encode()


def fingerprint_hex(fingerprint: str) -> str:
    """`SHA256:base64` (ssh-keygen's form) as 64 hex digits (a ref name component)."""
    b64 = fingerprint.removeprefix("SHA256:")
    return base64.b64decode(b64 + "=" * (-len(b64) % 4)).hex()


@dataclass
class Approval:
    ref: str
    ok: bool
    principal: str = ""
    key: str = ""
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "ok": self.ok, "principal": self.principal,
                "key": self.key, "reason": self.reason}


@dataclass
class Tally:
    threshold: int
    approved_by: list[str] = field(default_factory=list)  # distinct principals
    waiting_for: list[str] = field(default_factory=list)
    approvals: list[Approval] = field(default_factory=list)
    signer: str = ""  # the commit's signer, when it is an approver
    error: str = ""  # the approvals could not be read at all

    @property
    def ok(self) -> bool:
        return len(self.approved_by) >= self.threshold

    @property
    def summary(self) -> str:
        """`1 of 2: alice; waiting for any of bob, carol`"""
        got = f"{len(self.approved_by)} of {self.threshold}"
        who = f": {', '.join(self.approved_by)}" if self.approved_by else ""
        if self.ok:
            return f"{got}{who}"
        wait = (f"; waiting for any of {', '.join(self.waiting_for)}" if self.waiting_for
                else "; no other approver is listed")
        return got + who + wait + (f" ({self.error})" if self.error else "")

    def to_json(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "ok": self.ok, "approved_by": self.approved_by,
                "waiting_for": self.waiting_for, "signer": self.signer,
                "summary": self.summary, "error": self.error,
                "approvals": [a.to_json() for a in self.approvals]}


def principals(approvers: sshsig.AllowedSigners) -> list[str]:
    """Every principal the approvers file names (patterns included, as written)."""
    out: list[str] = []
    for entry in approvers.entries:
        for p in entry.principals:
            if p not in out:
                out.append(p)
    return out


def check_one(ref: str, found: dict[str, Any], text: bytes,
              approvers: sshsig.AllowedSigners, revoked: set[str], now: int) -> Approval:
    """One approval ref, as Mirror.approvals read it: {"error"} or {"sig": bytes}."""
    if "error" in found:
        return Approval(ref, False, reason=found["error"])
    sig = found["sig"]
    if len(sig) > MAX_SIG:
        return Approval(ref, False, reason=f"approval is {len(sig)} bytes, over {MAX_SIG}")
    try:
        armored = sig.decode("ascii")
        verdict = sshsig.verify(armored, text, approvers, now, revoked, NAMESPACE)
    except UnicodeDecodeError:
        return Approval(ref, False, reason="approval is not an armored SSH signature")
    except (TrustError, ValueError) as e:
        return Approval(ref, False, reason=f"{e}")
    named = ref.rsplit("/", 1)[-1]
    if named != fingerprint_hex(verdict.fingerprint):
        return Approval(ref, False, verdict.principal, verdict.fingerprint,
                        f"ref names key {named[:16]}… but is signed by {verdict.fingerprint}")
    return Approval(ref, True, verdict.principal, verdict.fingerprint, "valid")


def tally(found: dict[str, dict[str, Any]], *, branch: str, commit: str, tree: str,
          approvers: sshsig.AllowedSigners, threshold: int, revoked: set[str], now: int,
          signer: str = "", error: str = "") -> Tally:
    """Count the distinct principals among valid approvals (and the commit's signer, when
    the approvers file lists its key): the same person with two keys counts once."""
    t = Tally(threshold, signer=signer, error=error)
    text = payload(branch, commit, tree)
    if len(found) > MAX_REFS:
        t.error = (f"{len(found)} approval refs for {commit[:12]}, more than {MAX_REFS}: "
                   f"all refused")
        found = {}
    for ref in sorted(found):
        t.approvals.append(check_one(ref, found[ref], text, approvers, revoked, now))
    names = set(([signer] if signer else []) + [a.principal for a in t.approvals if a.ok])
    listed = principals(approvers)  # shown in the approvers file's order
    t.approved_by = [p for p in listed if p in names] + sorted(names - set(listed))
    t.waiting_for = [p for p in listed if p not in names]
    return t


def judge(mirror: Any, found: dict[str, dict[str, Any]], *, branch: str, commit: str,
          approvers: str, revoked_keys: str | None, threshold: int,
          error: str = "") -> Tally:
    """The tally of `commit`'s approval refs `found`, checked against the approvers file
    (allowed_signers format, the trust files' permission rules; a bad file is a
    TrustError), with the commit's own signature verified against it too."""
    import time

    from .trust import Verifier

    v = Verifier(allowed_signers=approvers, revoked_keys=revoked_keys)
    if v.error is not None:
        raise v.error
    signer = v.verify(mirror.raw_commit(commit), commit)
    return tally(found, branch=branch, commit=commit, tree=mirror.tree_id(commit),
                 approvers=v.signers, threshold=threshold, revoked=v.revoked,
                 now=int(time.time()), signer=(signer.signer or "") if signer.good else "",
                 error=error)


def sign(key: str, text: bytes) -> bytes:
    """`ssh-keygen -Y sign -n gitops-agent-approval` (so FIDO keys and agents work)."""
    import subprocess
    import tempfile

    from .errors import UsageError

    with tempfile.TemporaryDirectory(prefix="gitops-agent-approve-") as tmp:
        path = f"{tmp}/approval.txt"
        with open(path, "wb") as f:
            f.write(text)
        p = subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-n", NAMESPACE, "-f", key,
                            path], capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise UsageError(f"approve: ssh-keygen -Y sign with {key} failed: "
                             f"{p.stderr.strip() or p.stdout.strip()}")
        with open(f"{path}.sig", "rb") as f:
            return f.read()


def key_of(sig: bytes) -> str:
    """The signing key's fingerprint (SHA256:...) of an armored signature."""
    return sshsig.parse_sshsig(sig.decode("ascii")).public_key.fingerprint


def digest(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()


# --- the operators' side -----------------------------------------------------------------


def default_branch(repo: Any) -> str:
    """The branch HEAD names in the repository (what `--branch` defaults to)."""
    head = repo.repo.references.get("HEAD")
    target = getattr(head, "target", "") if head is not None else ""
    name = str(target) if isinstance(target, str) else ""
    return name.removeprefix("refs/heads/") or "main"


def approve(repo_path: str, rev: str, key: str, branch: str | None,
            push: str | None) -> dict[str, Any]:
    """Sign the approval of `rev` with `key`, store it as its ref, push it if asked."""
    import subprocess

    from .errors import UsageError
    from .source import open_repo

    repo = open_repo(repo_path)
    commit = repo.resolve(rev)
    branch = branch or default_branch(repo)
    tree = repo.tree_id(commit)
    sig = sign(key, payload(branch, commit, tree))
    fingerprint = key_of(sig)
    ref = repo.write_approval(commit, fingerprint_hex(fingerprint), sig)
    out = {"commit": commit, "tree": tree, "branch": branch, "key": fingerprint, "ref": ref,
           "pushed": None}
    if push:
        # forced: the ref is this key's own; approving again replaces it
        p = subprocess.run(["git", "-C", repo_path, "push", "-q", push, f"+{ref}:{ref}"],
                           capture_output=True, text=True, check=False)
        if p.returncode != 0:
            raise UsageError(f"approve: stored {ref}, but pushing it to {push} failed: "
                             f"{p.stderr.strip()}")
        out["pushed"] = push
    return out


def show(repo_path: str, rev: str, approvers_path: str, branch: str | None,
         threshold: int) -> dict[str, Any]:
    """Who approved `rev` in this repository, checked as a host would."""
    from .source import open_repo

    repo = open_repo(repo_path)
    commit = repo.resolve(rev)
    branch = branch or default_branch(repo)
    t = judge(repo, repo.approvals(commit), branch=branch, commit=commit,
              approvers=approvers_path, revoked_keys=None, threshold=threshold)
    return {"commit": commit, "branch": branch, **t.to_json()}


def human(data: dict[str, Any]) -> str:
    lines = [f"{data['commit'][:12]} on {data['branch']}: {data['summary']}\n"]
    if data["signer"]:
        lines.append(f"  signer   {data['signer']} (the commit's own signature counts)\n")
    for a in data["approvals"]:
        mark = "ok      " if a["ok"] else "REFUSED "
        who = a["principal"] or "-"
        lines.append(f"  {mark} {who}: {a['reason']} ({a['ref'].rsplit('/', 1)[-1][:16]}…)\n")
    if data["error"]:
        lines.append(f"  error: {data['error']}\n")
    return "".join(lines)
