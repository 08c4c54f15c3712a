"""The trust policy: which commits may reach the host.

Owns: splitting signature and payload out of a raw commit object exactly as git's
commit.c (parse_buffer_signed_by_header) does, but stricter where git is lax;
verdicts for SSH (sshsig.py) and OpenPGP (gpgv) signatures; the policy of agent.yaml
`trust:` (require tip|all, no rewinds, no backdating, freshness); the verdict cache.
Must not: read anything from the commit's tree. The trust files are local paths
from agent.yaml, never from the repository.

Stricter than git, on purpose (the agent may refuse what git accepts, never the
reverse): a commit whose header section has a duplicated `gpgsig` header, any other
`gpgsig*` header (git lifts `gpgsig-sha256` out of the payload unverified), text after the
signature's END line, or a duplicated tree/author/committer header is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import TrustConfig
from .errors import SourceError, TrustError
from .host import Host

if TYPE_CHECKING:
    from .source import Mirror
    from .state import StateDir

log = logging.getLogger("agent.trust")

_SIG_HEADER = b"gpgsig"
_UNIQUE_HEADERS = (b"tree", b"author", b"committer")


@dataclass
class Verdict:
    commit: str
    good: bool
    signer: str | None = None
    key: str | None = None
    reason: str = ""
    rule: str = ""
    warnings: list[str] = field(default_factory=list)
    commit_time: int = 0  # the committer time gate() read, for the cycle's record

    def to_json(self) -> dict[str, Any]:
        return {"verdict": "good" if self.good else "bad", "commit": self.commit,
                "signer": self.signer, "key": self.key, "reason": self.reason, "rule": self.rule}


# --- the commit object -----------------------------------------------------------------


@dataclass
class SignedCommit:
    payload: bytes
    signature: str | None
    committer_time: int
    parents: list[str]


def split_commit(raw: bytes, commit: str = "") -> SignedCommit:
    """Split a raw commit into (payload, signature) the way git does.

    git walks the header lines (up to the first empty line) and lifts out the
    `gpgsig` header with its continuation lines (those that begin with a space);
    everything else, the message included, is the signed payload.
    """
    end = raw.find(b"\n\n")
    header_end = len(raw) if end < 0 else end + 1
    payload = bytearray()
    sig_lines: list[bytes] | None = None
    seen: set[bytes] = set()
    committer_time = 0
    parents: list[str] = []
    in_sig = False
    pos = 0
    while pos < header_end:
        nl = raw.find(b"\n", pos, header_end)
        line_end = header_end if nl < 0 else nl + 1
        line = raw[pos:line_end]
        pos = line_end
        if line.startswith(b" "):
            if in_sig:
                assert sig_lines is not None
                sig_lines.append(line[1:])
            else:
                payload += line
            continue
        in_sig = False
        name = line.split(b" ", 1)[0].rstrip(b"\n")
        if name.startswith(_SIG_HEADER):
            if name != _SIG_HEADER:
                raise TrustError(f"commit {commit[:12]} has a {name.decode(errors='replace')} "
                                 f"header; refused (only gpgsig is accepted)",
                                 commit=commit, rule="commit-format")
            if sig_lines is not None:
                raise TrustError(f"commit {commit[:12]} has two gpgsig headers; refused",
                                 commit=commit, rule="commit-format")
            sig_lines = [line[len(_SIG_HEADER) + 1:]]
            in_sig = True
            continue
        if name in _UNIQUE_HEADERS:
            if name in seen:
                raise TrustError(f"commit {commit[:12]} has two {name.decode()} headers; "
                                 f"refused", commit=commit, rule="commit-format")
            seen.add(name)
        if name == b"committer":
            m = re.search(rb"> (\d+) [+-]\d{4}\n?$", line)
            committer_time = int(m.group(1)) if m else 0
        if name == b"parent":
            parents.append(line[7:].strip().decode())
        payload += line
    payload += raw[header_end:]
    signature = None
    if sig_lines is not None:
        signature = b"".join(sig_lines).decode(errors="replace")
        lines = signature.rstrip("\n").split("\n")
        if not lines[-1].startswith("-----END "):
            raise TrustError(f"commit {commit[:12]}: data after the signature's END line; "
                             f"refused", commit=commit, rule="commit-format")
    return SignedCommit(bytes(payload), signature, committer_time, parents)


# --- verifiers -------------------------------------------------------------------------


class Verifier:
    """Verdicts for single commits, from the local trust files of agent.yaml."""

    def __init__(self, allowed_signers: str | None = None, gpg_keyring: str | None = None,
                 revoked_keys: str | None = None, host: Host | None = None) -> None:
        from . import sshsig

        self.host = host  # gpgv runs through the cycle's host gate (and is counted there)
        self.warnings: list[str] = []
        self.signers = sshsig.AllowedSigners()
        self.revoked: set[str] = set()
        self.gpg_keyring = gpg_keyring
        self.error: TrustError | None = None  # an invalid trust file: every verdict is bad
        try:  # read each file once; a missing one (keyring included) fails every verdict
            text = {p: _read_trust_file(p).decode(errors="replace")
                    for p in (allowed_signers, gpg_keyring, revoked_keys) if p}
        except TrustError as e:
            self.error = e
            return
        try:
            if allowed_signers:
                self.signers = sshsig.parse_allowed_signers(text[allowed_signers],
                                                            allowed_signers)
                self.warnings.extend(self.signers.warnings)
            if revoked_keys:
                self.revoked = sshsig.parse_revoked(text[revoked_keys], revoked_keys)
        except TrustError as e:
            self.error = TrustError(f"trust: {e}", rule="trust-files")
        for w in self.warnings:
            log.warning("verify: %s", w)

    def verify(self, raw: bytes, commit: str) -> Verdict:
        from . import sshsig

        try:
            if self.error is not None:
                raise self.error
            sc = split_commit(raw, commit)
            if sc.signature is None:
                raise TrustError(f"commit {commit[:12]} is not signed", commit=commit,
                                 rule="unsigned")
            if sc.signature.startswith("-----BEGIN SSH SIGNATURE-----"):
                v = sshsig.verify(sc.signature, sc.payload, self.signers, sc.committer_time,
                                  self.revoked)
                return Verdict(commit, True, v.principal, v.fingerprint,
                               f"good SSH signature by {v.principal} ({v.fingerprint})", "ok")
            if sc.signature.startswith("-----BEGIN PGP SIGNATURE-----"):
                return self._gpg(sc, commit)
            raise TrustError(f"commit {commit[:12]} has a signature of an unknown format",
                             commit=commit, rule="signature-format")
        except TrustError as e:
            return Verdict(commit, False, None, e.key or None, str(e), e.rule or "untrusted")

    def _gpg(self, sc: SignedCommit, commit: str) -> Verdict:
        if not self.gpg_keyring:
            raise TrustError(f"commit {commit[:12]} has an OpenPGP signature and no "
                             f"trust.gpg_keyring is configured", commit=commit,
                             rule="untrusted-key")
        status = gpgv(self.gpg_keyring, sc.signature or "", sc.payload, self.host)
        return _gpg_verdict(status, commit)


def trust_digest(*paths: str | None) -> str:
    """What a verdict depends on besides the commit: the contents of the trust files."""
    hasher = hashlib.sha256()
    for path in paths:
        hasher.update(_read_trust_file(path) if path else b"-")
        hasher.update(b"\0")
    return hasher.hexdigest()


def _read_trust_file(path: str) -> bytes:
    check_trust_path(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TrustError(f"trust: cannot read {path}: {e.strerror}", rule="trust-files") from None


def check_trust_path(path: str) -> None:
    """Like OpenSSH's StrictModes: a trust file that someone else can change is no trust
    at all. The file and every directory on the way to it (as written and as resolved
    through symlinks) must be owned by root or the agent's user and not group- or
    world-writable; a root-owned sticky directory (/tmp) is allowed on the way, since
    nobody else can rename what is in it."""
    me = os.geteuid()
    try:
        st = os.stat(path)
    except OSError as e:
        raise TrustError(f"trust: cannot read {path}: {e.strerror}", rule="trust-files") from None
    why = _unsafe(st, me, is_dir=False)
    if why:
        raise TrustError(f"trust: refusing {path}: it is {why}; make it root-owned and not "
                         f"group/world-writable (chmod go-w)", rule="trust-files")
    for start in (os.path.abspath(path), os.path.realpath(path)):
        d = os.path.dirname(start)
        while True:
            try:
                dst = os.stat(d)
            except OSError as e:
                raise TrustError(f"trust: cannot check {d} (on the way to {path}): "
                                 f"{e.strerror}", rule="trust-files") from None
            why = _unsafe(dst, me, is_dir=True)
            if why:
                raise TrustError(f"trust: refusing {path}: directory {d} on the way to it is "
                                 f"{why}", rule="trust-files")
            if d == "/":
                break
            d = os.path.dirname(d)


def _unsafe(st: os.stat_result, me: int, is_dir: bool) -> str:
    if st.st_uid not in (0, me):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        if is_dir and st.st_mode & stat.S_ISVTX and st.st_uid == 0:
            return ""
        return f"writable by {'others' if st.st_mode & 0o002 else 'group'} " \
               f"(mode {stat.S_IMODE(st.st_mode):04o})"
    return ""


def _dearmor_pgp(data: bytes) -> bytes:
    """An armored key export → binary packets (gpgv reads only binary keyrings)."""
    import base64

    text = data.decode(errors="replace")
    if "-----BEGIN PGP PUBLIC KEY BLOCK-----" not in text:
        return data
    out = b""
    for block in re.findall(r"-----BEGIN PGP PUBLIC KEY BLOCK-----(.*?)-----END PGP PUBLIC KEY "
                            r"BLOCK-----", text, re.S):
        body = block.strip().split("\n\n", 1)[-1]
        b64 = "".join(line.strip() for line in body.splitlines()
                      if line.strip() and not line.startswith("="))
        out += base64.b64decode(b64)
    return out


def gpgv(keyring: str, signature: str, payload: bytes,
         host: Host | None = None) -> list[list[str]]:
    """Run gpgv with --status-fd; return its `[GNUPG:] KEYWORD args` lines, split."""
    import tempfile  # here: only an OpenPGP signature needs it

    with tempfile.TemporaryDirectory(prefix="gitops-gpgv-") as tmp:
        ring = os.path.join(tmp, "trusted.gpg")
        with open(ring, "wb") as f:
            f.write(_dearmor_pgp(_read_trust_file(keyring)))
        sig = os.path.join(tmp, "sig.asc")
        with open(sig, "w") as f:
            f.write(signature)
        data = os.path.join(tmp, "payload")
        with open(data, "wb") as f:
            f.write(payload)
        p = (host or Host()).run(["gpgv", "--homedir", tmp, "--status-fd", "1", "--keyring",
                                  ring, sig, data], timeout=60)
        if p.returncode == 127:
            raise TrustError("gpgv is not installed (package gpgv)", rule="gpgv")
    return [line.split()[1:] for line in p.stdout.decode(errors="replace").splitlines()
            if line.startswith("[GNUPG:] ")]


_GPG_VERDICT_WORDS = ("GOODSIG", "BADSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "ERRSIG")


def _gpg_verdict(status: list[list[str]], commit: str) -> Verdict:
    """Status lines look like `[GNUPG:] VALIDSIG <fpr> <date> ... <primary-fpr>`.

    Only GOODSIG together with VALIDSIG (and no EXPKEYSIG/REVKEYSIG/BADSIG/ERRSIG) is
    trusted; the signer is the primary key's full fingerprint, so a signing subkey of a
    trusted primary key is accepted.
    """
    words = {s[0]: s[1:] for s in status if s}
    sigs = sum(1 for s in status if s and s[0] == "NEWSIG")
    verdicts = sum(1 for s in status if s and s[0] in _GPG_VERDICT_WORDS)
    if sigs > 1 or verdicts > 1:
        # git refuses an armor holding several signatures (two exclusive status lines),
        # whoever made them; so does the agent
        raise TrustError(f"commit {commit[:12]}: the OpenPGP armor holds {max(sigs, verdicts)} "
                         f"signatures; exactly one is accepted", commit=commit,
                         rule="signature-format")
    for bad, rule, text in (("BADSIG", "bad-signature", "bad OpenPGP signature"),
                            ("REVKEYSIG", "revoked", "OpenPGP key is revoked"),
                            ("EXPKEYSIG", "expired", "OpenPGP key has expired"),
                            ("EXPSIG", "expired", "OpenPGP signature has expired"),
                            ("NO_PUBKEY", "untrusted-key", "OpenPGP key is not in the keyring"),
                            ("ERRSIG", "untrusted-key", "OpenPGP signature cannot be checked")):
        if bad in words:
            key = words[bad][0] if words[bad] else None
            raise TrustError(f"commit {commit[:12]}: {text} (key {key})", commit=commit,
                             rule=rule, key=key or "")
    if "GOODSIG" in words and "VALIDSIG" in words and "KEYREVOKED" not in words:
        valid = words["VALIDSIG"]
        primary = valid[9] if len(valid) >= 10 else valid[0]
        uid = " ".join(words["GOODSIG"][1:])
        return Verdict(commit, True, uid or primary, primary,
                       f"good OpenPGP signature by {uid} ({primary})", "ok")
    raise TrustError(f"commit {commit[:12]}: OpenPGP signature not verified", commit=commit,
                     rule="bad-signature")


# --- policy ----------------------------------------------------------------------------


def gate(tcfg: TrustConfig, mirror: Mirror, state: StateDir | None, tip: str,
         st: dict[str, Any], host: Host | None = None) -> Verdict:
    """Decide whether `tip` may be applied; raise TrustError (commit, rule, key) if not."""
    tip_time = commit_time(mirror, tip)  # a tip that is not a parseable commit stops here
    verdicts = _Verdicts(tcfg, mirror, state, host)  # the cache read once, saved once
    try:
        v = _gate(tcfg, mirror, tip, tip_time, st, verdicts)
    finally:
        verdicts.save()
    v.commit_time = tip_time
    return v


def _gate(tcfg: TrustConfig, mirror: Mirror, tip: str, tip_time: int, st: dict[str, Any],
          verdicts: _Verdicts) -> Verdict:
    last_good = st.get("last_good")
    warnings: list[str] = []
    anchor = last_good
    last_time = st.get("last_good_committer_time")
    if last_good and tip != last_good and tcfg.unsigned != "allow":
        # last good must still pass the trust files as they are now: a key removed from
        # allowed_signers takes its commits' standing with it
        lg = verdicts.of([last_good])[0]
        if not lg.good:
            anchor = _newest_trusted_ancestor(mirror, last_good, verdicts)
            why = (f"last good {last_good[:12]} no longer passes the trust files ({lg.reason})"
                   f"; it is not enforced any more")
            if anchor is None or not mirror.descends(tip, anchor):
                raise TrustError(
                    f"{why}, and tip {tip[:12]} does not descend from a commit that still "
                    f"passes them; push a fix signed by a trusted key", commit=tip,
                    rule="last-good-untrusted", key=lg.key or "", last_good_bad=True)
            log.warning("verify: %s; tip %s descends from %s, which still passes", why,
                        tip[:12], anchor[:12], extra={"COMMIT": tip, "STAGE": "verify"})
            if last_time is not None and tip_time <= last_time:
                raise TrustError(f"{why}, and tip {tip[:12]} is not newer than it (committer "
                                 f"time): an older commit cannot be replayed", commit=tip,
                                 rule="backdated", last_good_bad=True)

    # anti-rollback: must descend from last good (blocks replay of an older signed commit)
    if anchor == last_good and last_good and tip != last_good and not tcfg.allow_rewind:
        if not mirror.has_commit(last_good):
            raise TrustError(f"last good {last_good[:12]} is missing from the mirror; cannot "
                             f"check ancestry", commit=tip, rule="ancestry")
        if not mirror.descends(tip, last_good):
            raise TrustError(f"tip {tip[:12]} does not descend from last good {last_good[:12]} "
                             f"(a rewind, force-push or other history); refused "
                             f"(trust.allow_rewind is false)", commit=tip, rule="ancestry")
    now = time.time()
    accepted_at = st.get("last_good_time")
    if (tcfg.max_future_skew is not None and last_time is not None and accepted_at
            and last_time > accepted_at + tcfg.max_future_skew):
        # with a trustworthy clock, a last good that was dated in the future when it was
        # accepted (by a host without the bound) must not make every later commit look
        # backdated: compare with when it was accepted instead
        last_time = int(accepted_at)
    if last_good and tip != last_good and last_time is not None and tip_time < last_time:
        raise TrustError(f"tip {tip[:12]} has a committer time older than last good "
                         f"{last_good[:12]}'s; refused (backdated commit)", commit=tip,
                         rule="backdated")
    if tcfg.max_future_skew is not None and tip_time > now + tcfg.max_future_skew:
        raise TrustError(f"tip {tip[:12]} is dated {int(tip_time - now)}s in the future, more "
                         f"than trust.max_future_skew", commit=tip, rule="future")
    if tcfg.max_age is not None and now - tip_time > tcfg.max_age:
        warnings.append(f"tip {tip[:12]} is {int((now - tip_time) / 3600)}h old, more than "
                        f"trust.max_age: the branch may be frozen")
        log.warning("verify: %s", warnings[-1], extra={"COMMIT": tip, "STAGE": "verify"})

    allowed = _unsigned_or_nothing(tcfg, tip)
    if allowed is not None:
        log.warning("verify: %s", allowed.reason, extra={"COMMIT": tip, "STAGE": "verify"})
        allowed.warnings = warnings + allowed.warnings
        return allowed
    commits = [tip]
    if tcfg.require == "all" and anchor and tip != anchor:
        commits = mirror.history(tip, hide=anchor)
    for v in verdicts.of(commits, stop_at_bad=True):
        if not v.good:
            where = "" if v.commit == tip else f" (in the range to tip {tip[:12]}, require: all)"
            raise TrustError(f"{v.reason}{where}", commit=v.commit, rule=v.rule,
                             key=v.key or "")
    tip_verdict = verdicts.of([tip])[0]
    tip_verdict.warnings = warnings + verdicts.warnings
    log.info("verify: %s @%s", tip_verdict.reason, tip[:7],
             extra={"COMMIT": tip, "STAGE": "verify"})
    return tip_verdict


def pin_verdict(tcfg: TrustConfig, mirror: Mirror, state: StateDir | None, commit: str,
                host: Host | None = None) -> Verdict:
    """A pinned commit (gitops-agent pin): its own signature must pass the trust files as
    they are now; ancestry, age and approvals are the pin's business (it goes back on
    purpose, and the caller checks that it is in the branch's history)."""
    t = commit_time(mirror, commit)
    allowed = _unsigned_or_nothing(tcfg, commit)
    if allowed is not None:
        allowed.commit_time = t
        return allowed
    verdicts = _Verdicts(tcfg, mirror, state, host)
    try:
        v = verdicts.of([commit])[0]
    finally:
        verdicts.save()
    if not v.good:
        raise TrustError(f"pinned commit {commit[:12]}: {v.reason}", commit=commit,
                         rule=v.rule, key=v.key or "")
    v.commit_time = t
    return v


def _unsigned_or_nothing(tcfg: TrustConfig, commit: str) -> Verdict | None:
    """The verdict of `unsigned: allow` (good, loudly); else None when there are trust
    files to judge by, and a TrustError when there are none."""
    if tcfg.unsigned == "allow":
        msg = ("UNSIGNED COMMITS ALLOWED (trust.unsigned: allow): anyone who can push to "
               "the branch controls this host. Use this for demos only.")
        return Verdict(commit, True, None, None, msg, "unsigned-allowed", [msg])
    if not tcfg.allowed_signers and not tcfg.gpg_keyring:
        raise TrustError("trust: no trust.allowed_signers or trust.gpg_keyring configured and "
                         "trust.unsigned is refuse: nothing can be trusted", commit=commit,
                         rule="trust-files")
    return None


def commit_time(mirror: Mirror, commit: str) -> int:
    """The committer time of a commit that libgit2 can parse; anything else (a blob or
    tag where the branch should point, a malformed object) is refused as untrusted."""
    kind = mirror.object_kind(commit)
    if kind is None:
        raise TrustError(f"tip {commit[:12]} is missing from the mirror", commit=commit,
                         rule="missing")
    if kind != "commit":
        what = {"tag": "an annotated tag", "blob": "a blob", "tree": "a tree"}.get(
            kind, "not a commit")
        raise TrustError(f"tip is not a commit: the branch points at {what} ({commit[:12]})",
                         commit=commit, rule="not-a-commit")
    try:
        return mirror.commit_time(commit)
    except SourceError as e:
        raise TrustError(str(e), commit=commit, rule="malformed-commit") from None


class _Verdicts:
    """Verdicts under the trust files as they are now, through the cache in state_dir
    (keyed by the digest of the trust files: editing them invalidates every verdict).
    One per gate() call: the trust files are digested and the cache read once, and
    saved once if anything new was verified."""

    def __init__(self, tcfg: TrustConfig, mirror: Mirror, state: StateDir | None,
                 host: Host | None) -> None:
        self.mirror, self.state, self.host = mirror, state, host
        self.paths = (tcfg.allowed_signers, tcfg.gpg_keyring, tcfg.revoked_keys)
        self.cache: dict[str, Any] | None = None
        self.verifier: Verifier | None = None  # parsed (cryptography imported) on a miss
        self.dirty = False

    def _load(self, first: str) -> dict[str, Any]:
        if self.cache is None:
            try:
                key = trust_digest(*self.paths)  # a verdict depends on these and the commit
            except TrustError as e:
                raise TrustError(str(e), commit=first, rule="trust-files") from None
            cache = self.state.load_verdicts() if self.state is not None else {}
            if cache.get("key") != key:
                cache = {"key": key, "verdicts": {}, "warnings": []}
            self.cache = cache
        return self.cache

    @property
    def warnings(self) -> list[str]:
        return list((self.cache or {}).get("warnings") or [])

    def of(self, commits: list[str], stop_at_bad: bool = False) -> list[Verdict]:
        cache = self._load(commits[0] if commits else "")
        out = []
        for commit in commits:
            cached = cache["verdicts"].get(commit)
            if cached is not None:
                v = Verdict(commit, cached["good"], cached.get("signer"), cached.get("key"),
                            cached.get("reason", ""), cached.get("rule", ""))
            else:
                if self.verifier is None:
                    self.verifier = Verifier(*self.paths, host=self.host)
                    cache["warnings"] = self.verifier.warnings
                v = self.verifier.verify(self.mirror.raw_commit(commit), commit)
                cache["verdicts"][commit] = {"good": v.good, "signer": v.signer, "key": v.key,
                                             "reason": v.reason, "rule": v.rule}
                self.dirty = True
            out.append(v)
            if stop_at_bad and not v.good:
                break
        return out

    def save(self) -> None:
        if self.dirty and self.state is not None and self.cache is not None:
            _save_cache(self.state, self.cache)
            self.dirty = False


def _newest_trusted_ancestor(mirror: Mirror, commit: str, verdicts: _Verdicts,
                             limit: int = 1000) -> str | None:
    """The newest ancestor of `commit` that passes the trust files as they are now."""
    for cid in mirror.history(commit, limit=limit):
        if cid != commit and verdicts.of([cid])[0].good:
            return cid
    return None


def _save_cache(state: StateDir, cache: dict[str, Any], keep: int = 5000) -> None:
    verdicts = cache["verdicts"]
    if len(verdicts) > keep:
        cache["verdicts"] = dict(list(verdicts.items())[-keep:])
    try:
        state.save_verdicts(cache)
    except OSError as e:
        log.warning("verify: cannot save the verdict cache: %s", e)
