"""Trust verdicts against git's own: every case runs `git verify-commit` with the same
allowed_signers (or GnuPG home) and the agent must agree, or be stricter."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import Fleet, agent, allowed_line, git, signed_env_for, ssh_key, write_config
from fido import FidoKey
from trustkit import (
    git_good,
    gpg,
    gpg_key,
    gpg_sign_commit,
    raw_commit,
    ssh_sign,
    strip_sig,
    with_sig,
    write_commit,
)

from agent.trust import Verifier, split_commit


def signed_commit(repo: Path, key: Path, msg: str = "signed") -> str:
    git(repo, "-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "commit", "-q", "-S",
        "--allow-empty", "-m", msg)
    return git(repo, "rev-parse", "HEAD").stdout.strip()


def agent_good(repo: Path, rev: str, allowed: Path | None = None,
               keyring: Path | None = None) -> bool:
    commit = git(repo, "rev-parse", rev).stdout.strip()
    v = Verifier(str(allowed) if allowed else None, str(keyring) if keyring else None)
    return v.verify(raw_commit(repo, commit), commit).good


def both(repo: Path, rev: str, allowed: Path) -> tuple[bool, bool]:
    return agent_good(repo, rev, allowed), git_good(repo, rev, allowed)


KEY_TYPES = [("ed25519", None), ("ecdsa", 256), ("ecdsa", 384), ("ecdsa", 521), ("rsa", 3072)]


@pytest.mark.parametrize("kind,bits", KEY_TYPES, ids=[f"{k}-{b}" for k, b in KEY_TYPES])
def test_trusted_and_untrusted_key_per_type(repo, tmp_path, kind, bits):
    key = ssh_key(tmp_path / f"k-{kind}", kind, bits)
    other = ssh_key(tmp_path / "other", kind, bits)
    rev = signed_commit(repo, key)
    allowed = tmp_path / "allowed"
    allowed.write_text(allowed_line("ops@example.com", key.with_suffix(".pub")))
    assert both(repo, rev, allowed) == (True, True)
    allowed.write_text(allowed_line("ops@example.com", other.with_suffix(".pub")))
    assert both(repo, rev, allowed) == (False, False)


def test_signer_and_key_are_reported(repo, tmp_path):
    key = ssh_key(tmp_path / "k")
    rev = signed_commit(repo, key)
    allowed = tmp_path / "allowed"
    allowed.write_text(allowed_line("alice@example.com", key.with_suffix(".pub")))
    v = Verifier(str(allowed)).verify(raw_commit(repo, rev), rev)
    fp = __import__("subprocess").run(["ssh-keygen", "-lf", str(key.with_suffix(".pub"))],
                                      capture_output=True, text=True).stdout.split()[1]
    assert (v.good, v.signer, v.key) == (True, "alice@example.com", fp)


def test_wrong_namespace(repo, ed):
    key, allowed = ed
    payload = strip_sig(raw_commit(repo))
    rev = write_commit(repo, with_sig(payload, ssh_sign(payload, key, namespace="file")))
    assert both(repo, rev, allowed) == (False, False)
    good = write_commit(repo, with_sig(payload, ssh_sign(payload, key)))
    assert both(repo, good, allowed) == (True, True)


def test_payload_tampered_after_signing(repo, ed):
    key, allowed = ed
    raw = raw_commit(repo, signed_commit(repo, key, "deploy v1"))
    rev = write_commit(repo, raw.replace(b"deploy v1", b"deploy v2"))
    assert both(repo, rev, allowed) == (False, False)


@pytest.mark.parametrize("how", ["truncated", "garbled", "no end line", "bit flip"])
def test_signature_armor_damaged(repo, ed, how):
    key, allowed = ed
    payload = strip_sig(raw_commit(repo))
    armor = ssh_sign(payload, key)
    lines = armor.rstrip("\n").split("\n")
    if how == "truncated":
        armor = "\n".join(lines[:2] + lines[-1:])
    elif how == "garbled":
        armor = "\n".join([lines[0], lines[1][:10] + "!!!" + lines[1][13:], *lines[2:]])
    elif how == "no end line":
        armor = "\n".join(lines[:-1])
    else:
        body = lines[1]
        c = "A" if body[20] != "A" else "B"
        armor = "\n".join([lines[0], body[:20] + c + body[21:], *lines[2:]])
    rev = write_commit(repo, with_sig(payload, armor))
    assert both(repo, rev, allowed) == (False, False)


@pytest.mark.parametrize("opt,good", [
    ('valid-before="20000101"', False),     # expired before the commit was made
    ('valid-after="29990101"', False),      # not yet valid at the commit time
    ('valid-after="20000101",valid-before="29990101"', True),
    ('namespaces="git"', True),
    ('namespaces="file,email"', False),
])
def test_allowed_signers_options(repo, tmp_path, ed, opt, good):
    key, _ = ed
    allowed = tmp_path / "allowed-opt"
    allowed.write_text(allowed_line("ops@example.com", key.with_suffix(".pub"), opt))
    rev = signed_commit(repo, key)
    assert both(repo, rev, allowed) == (good, good)


def test_validity_is_judged_at_the_committer_time(repo, tmp_path, ed):
    key, _ = ed
    allowed = tmp_path / "allowed-t"
    allowed.write_text(allowed_line("ops@example.com", key.with_suffix(".pub"),
                                    'valid-before="20200101Z"'))
    old = {"GIT_COMMITTER_DATE": "2019-06-01T00:00:00Z", "GIT_AUTHOR_DATE": "2019-06-01T00:00:00Z"}
    git(repo, "-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "commit", "-q", "-S",
        "--allow-empty", "-m", "old", env=old)
    assert both(repo, "HEAD", allowed) == (True, True)


def cert(tmp_path: Path, ca: Path, user: Path, principals: str, validity: str = "") -> Path:
    args = ["ssh-keygen", "-q", "-s", str(ca), "-I", "ops-cert", "-n", principals]
    if validity:
        args += ["-V", validity]
    __import__("subprocess").run([*args, str(user.with_suffix(".pub"))], check=True)
    return Path(str(user) + "-cert.pub")


@pytest.mark.parametrize("case,good", [("right ca", True), ("wrong ca", False),
                                       ("wrong principal", False), ("expired cert", False)])
def test_cert_authority(repo, tmp_path, case, good):
    ca = ssh_key(tmp_path / "ca")
    other_ca = ssh_key(tmp_path / "other_ca")
    user = ssh_key(tmp_path / "user")
    principal = "deploy@example.com" if case == "wrong principal" else "ops@example.com"
    validity = "20000101:20010101" if case == "expired cert" else ""
    cert_path = cert(tmp_path, other_ca if case == "wrong ca" else ca, user, principal, validity)
    allowed = tmp_path / "allowed-ca"
    allowed.write_text(allowed_line("ops@example.com", ca.with_suffix(".pub"), "cert-authority"))
    rev = signed_commit(repo, cert_path)
    assert both(repo, rev, allowed) == (good, good)


def test_plain_key_line_does_not_trust_its_certificate_signatures_wrongly(repo, tmp_path):
    ca = ssh_key(tmp_path / "ca")
    user = ssh_key(tmp_path / "user")
    cert_path = cert(tmp_path, ca, user, "ops@example.com")
    allowed = tmp_path / "allowed-plain-ca"
    allowed.write_text(allowed_line("ops@example.com", ca.with_suffix(".pub")))  # no cert-authority
    rev = signed_commit(repo, cert_path)
    assert both(repo, rev, allowed) == (False, False)


def test_unsigned(repo, ed):
    _, allowed = ed
    assert both(repo, "HEAD", allowed) == (False, False)


def test_signed_merge_commit(repo, ed):
    key, allowed = ed
    git(repo, "checkout", "-q", "-b", "side")
    git(repo, "commit", "-q", "--allow-empty", "-m", "side")
    git(repo, "checkout", "-q", "main")
    git(repo, "commit", "-q", "--allow-empty", "-m", "main")
    git(repo, "-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "merge", "-q", "-S",
        "--no-ff", "-m", "merge", "side")
    assert len(split_commit(raw_commit(repo)).parents) == 2
    assert both(repo, "HEAD", allowed) == (True, True)


def test_signature_moved_into_the_message_is_unsigned(repo, ed):
    """libgit2 would take this signature; git (and the agent) call the commit unsigned."""
    key, allowed = ed
    payload = strip_sig(raw_commit(repo))
    armor = ssh_sign(payload, key)
    head, _, body = payload.partition(b"\n\n")
    moved = head + b"\n\ngpgsig " + armor.replace("\n", "\n ").encode() + b"\n" + body
    rev = write_commit(repo, moved)
    assert both(repo, rev, allowed) == (False, False)


def test_stricter_than_git_on_extra_signature_headers(repo, ed):
    """git lifts the other algorithm's gpgsig-sha256 header out of the payload too, and
    accepts; the agent refuses any signature header but the one it verifies."""
    key, allowed = ed
    payload = strip_sig(raw_commit(repo))
    extra = with_sig(payload, "-----BEGIN SSH SIGNATURE-----\nAAAA\n-----END SSH SIGNATURE-----",
                     header="gpgsig-sha256")
    rev = write_commit(repo, with_sig(extra, ssh_sign(payload, key)))
    assert both(repo, rev, allowed) == (False, True)


def test_duplicated_signature_header_refused(repo, ed):
    key, allowed = ed
    payload = strip_sig(raw_commit(repo))
    armor = ssh_sign(payload, key)
    rev = write_commit(repo, with_sig(with_sig(payload, armor), armor))
    assert agent_good(repo, rev, allowed) is False


def test_duplicated_committer_header_refused(repo, ed):
    key, allowed = ed
    payload = strip_sig(raw_commit(repo))
    head, _, body = payload.partition(b"\n\n")
    committer = next(line for line in head.split(b"\n") if line.startswith(b"committer "))
    doubled = head + b"\n" + committer + b"\n\n" + body
    rev = write_commit(repo, with_sig(doubled, ssh_sign(doubled, key)))
    assert agent_good(repo, rev, allowed) is False


def test_data_after_the_end_line_refused(repo, ed):
    key, allowed = ed
    payload = strip_sig(raw_commit(repo))
    rev = write_commit(repo, with_sig(payload, ssh_sign(payload, key) + "trailing junk\n"))
    assert agent_good(repo, rev, allowed) is False


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa"])
@pytest.mark.parametrize("case,agent_says,git_says", [
    ("trusted", True, True), ("untrusted", False, False),
    ("no user presence", False, True),       # stricter than ssh-keygen: a touch is required
    ("sshd-only option", False, False),      # no-touch-required is not an allowed_signers option
])
def test_fido_signatures(repo, tmp_path, kind, case, agent_says, git_says):
    fk = FidoKey(kind)
    other = FidoKey(kind)
    payload = strip_sig(raw_commit(repo))
    flags = 0 if case in ("no user presence", "sshd-only option") else 1
    rev = write_commit(repo, with_sig(payload, fk.sign(payload, flags=flags)))
    allowed = tmp_path / "allowed-fido"
    opts = "no-touch-required" if case == "sshd-only option" else ""
    allowed.write_text((other if case == "untrusted" else fk).allowed("ops@example.com", opts))
    assert both(repo, rev, allowed) == (agent_says, git_says)


def test_rsa_sha1_signature_refused(repo, tmp_path):
    """ssh-rsa (SHA-1) signatures are refused even from a trusted key."""
    from agent import sshsig

    key = ssh_key(tmp_path / "rsa", "rsa", 3072)
    payload = strip_sig(raw_commit(repo))
    armor = ssh_sign(payload, key)
    sig = sshsig.parse_sshsig(armor)
    assert sig.public_key.type == "ssh-rsa"
    r = sshsig.Reader(sig.signature)
    assert r.text() in ("rsa-sha2-256", "rsa-sha2-512")
    forged = sshsig.sstr(b"ssh-rsa") + sshsig.sstr(r.string())
    with pytest.raises(sshsig.SigError, match="SHA-1"):
        sig.public_key.verify(forged, b"x")


def test_weak_rsa_line_skipped_with_warning_malformed_line_fails_closed(tmp_path):
    from agent import sshsig

    weak = ssh_key(tmp_path / "weak", "rsa", 1024)
    good = ssh_key(tmp_path / "good")
    text = allowed_line("a@x", weak.with_suffix(".pub")) + allowed_line("b@x",
                                                                        good.with_suffix(".pub"))
    parsed = sshsig.parse_allowed_signers(text, "allowed")
    assert [e.principals for e in parsed.entries] == [["b@x"]]
    assert "1024 bits skipped" in parsed.warnings[0] and "allowed:1" in parsed.warnings[0]
    with pytest.raises(sshsig.SigError, match="allowed:3"):
        sshsig.parse_allowed_signers(text + "b@x ssh-ed25519 !!notbase64\n", "allowed")


def test_revoked_key_refused(repo, tmp_path, ed):
    key, allowed = ed
    rev = signed_commit(repo, key)
    revoked = tmp_path / "revoked"
    revoked.write_text(key.with_suffix(".pub").read_text())
    v = Verifier(str(allowed), None, str(revoked)).verify(raw_commit(repo, rev), rev)
    assert not v.good and v.rule == "revoked"


# --- OpenPGP through gpgv ---------------------------------------------------------------


@pytest.fixture
def gpghome(tmp_path: Path) -> tuple[Path, str, Path]:
    home = tmp_path / "gnupg"
    fpr = gpg_key(home, "Ops <ops@example.com>")
    keyring = tmp_path / "trusted.asc"
    keyring.write_bytes(gpg(home, "--armor", "--export", fpr).stdout)
    return home, fpr, keyring


def test_gpg_good(repo, gpghome):
    home, fpr, keyring = gpghome
    rev = gpg_sign_commit(repo, home, fpr)
    assert agent_good(repo, rev, keyring=keyring) and git_good(repo, rev, gnupghome=home)
    v = Verifier(None, str(keyring)).verify(raw_commit(repo, rev), rev)
    assert v.key == fpr


def test_gpg_untrusted_key(repo, tmp_path, gpghome):
    home, _, keyring = gpghome
    other = tmp_path / "other-gnupg"
    ofpr = gpg_key(other, "Mallory <m@example.com>")
    rev = gpg_sign_commit(repo, other, ofpr)
    assert not agent_good(repo, rev, keyring=keyring)
    assert not git_good(repo, rev, gnupghome=home)


def test_gpg_tampered(repo, gpghome):
    home, fpr, keyring = gpghome
    raw = raw_commit(repo, gpg_sign_commit(repo, home, fpr, "release 1"))
    rev = write_commit(repo, raw.replace(b"release 1", b"release 2"))
    assert not agent_good(repo, rev, keyring=keyring)
    assert not git_good(repo, rev, gnupghome=home)


def test_gpg_expired_key(repo, tmp_path):
    home = tmp_path / "exp-gnupg"
    fpr = gpg_key(home, "Old <old@example.com>", expire="seconds=2")
    keyring = tmp_path / "exp.gpg"
    keyring.write_bytes(gpg(home, "--export", fpr).stdout)  # binary export this time
    rev = gpg_sign_commit(repo, home, fpr)
    time.sleep(3)
    v = Verifier(None, str(keyring)).verify(raw_commit(repo, rev), rev)
    assert not v.good and v.rule == "expired"
    assert not git_good(repo, rev, gnupghome=home)


def test_gpg_signing_subkey_of_trusted_primary(repo, tmp_path):
    home = tmp_path / "sub-gnupg"
    fpr = gpg_key(home, "Sub <sub@example.com>", subkey=True)
    keyring = tmp_path / "sub.asc"
    keyring.write_bytes(gpg(home, "--armor", "--export", fpr).stdout)
    rev = gpg_sign_commit(repo, home, fpr)
    v = Verifier(None, str(keyring)).verify(raw_commit(repo, rev), rev)
    assert v.good and v.key == fpr  # the primary's full fingerprint
    assert git_good(repo, rev, gnupghome=home)


# --- the verify CLI contract -------------------------------------------------------------


def test_verify_cli_contract(repo, ed):
    key, allowed = ed
    rev = signed_commit(repo, key)
    p = agent("verify", "--repo", str(repo), "--rev", rev, "--allowed-signers", str(allowed),
              "--json", check=0)
    out = json.loads(p.stdout)
    assert out["verdict"] == "good" and out["signer"] == "ops@example.com"
    assert out["key"].startswith("SHA256:") and "reason" in out
    p = agent("verify", "--repo", str(repo), "--rev", "HEAD~1", "--allowed-signers",
              str(allowed), "--json", check=1)
    assert json.loads(p.stdout)["verdict"] == "bad"
    agent("verify", "--repo", str(repo), "--rev", rev, check=2)
    agent("verify", "--repo", str(repo), "--rev", rev, "--allowed-signers", "/nonexistent",
          check=2)


# --- policy in the cycle -----------------------------------------------------------------


@pytest.fixture
def signed_env(tmp_path: Path):
    key = ssh_key(tmp_path / "signing")
    return signed_env_for(tmp_path, {"ops@example.com": key}, key)


def apply_json(env: dict, code: int, cfg: Path | None = None) -> dict:
    p = agent("apply", "--config", str(cfg or env["cfg"]), "--json", check=code)
    return json.loads(p.stdout)


def test_signed_tip_applies_and_unsigned_tip_is_refused(signed_env):
    env = signed_env
    first = apply_json(env, 0)
    assert first["signer"] == "ops@example.com"
    env["fleet"].commit("unsigned", files={"hosts/web-01.yaml": "vars: {worker_processes: 99}\n"},
                        sign=False, push=True)
    out = apply_json(env, 1)
    assert out["state"] == "rejected" and "is not signed" in out["rejected"]
    assert out["commit"] == first["commit"]
    assert "worker_processes 99" not in (env["root"] / "etc/nginx/nginx.conf").read_text()
    hist = json.loads(agent("history", "--config", str(env["cfg"]), "--json", check=0).stdout)
    assert "is not signed" in hist[-1]["rejected"]


def test_rewind_to_an_older_signed_commit_is_refused(signed_env):
    env = signed_env
    fleet: Fleet = env["fleet"]
    old = fleet.head()
    later = {"GIT_COMMITTER_DATE": f"{int(time.time()) + 60} +0000"}
    fleet.commit("v2", files={"hosts/web-01.yaml": "vars: {worker_processes: 12}\n"}, push=True,
                 env=later)
    assert apply_json(env, 0)["commit"] != old
    git(fleet.work, "reset", "-q", "--hard", old)
    fleet.push(force=True)
    out = apply_json(env, 1)
    assert out["state"] == "rejected" and "does not descend from last good" in out["rejected"]
    assert "worker_processes 12" in (env["root"] / "etc/nginx/nginx.conf").read_text()
    cfg = write_config(env["tmp"] / "rewind.yaml", url=fleet.bare, root=env["root"],
                       state_dir=env["state"], trust={"unsigned": "refuse", "allow_rewind": True,
                                                      "allowed_signers": str(env["allowed"])})
    # with rewinds allowed the older commit passes ancestry, but is still older: backdated
    out = apply_json(env, 1, cfg)
    assert "older than last good" in out["rejected"]


def test_require_all_refuses_an_unsigned_commit_in_the_middle(signed_env):
    env = signed_env
    fleet: Fleet = env["fleet"]
    apply_json(env, 0)
    fleet.commit("unsigned middle", sign=False)
    fleet.commit("signed tip", push=True)
    cfg_all = write_config(env["tmp"] / "all.yaml", url=fleet.bare, root=env["root"],
                           state_dir=env["state"],
                           trust={"unsigned": "refuse", "require": "all",
                                  "allowed_signers": str(env["allowed"])})
    out = apply_json(env, 1, cfg_all)
    assert "is not signed" in out["rejected"] and "require: all" in out["rejected"]
    assert apply_json(env, 0)["state"] == "converged"  # require: tip takes it


def test_backdated_signed_tip_is_refused(signed_env):
    env = signed_env
    apply_json(env, 0)
    past = {"GIT_COMMITTER_DATE": "2001-01-01T00:00:00Z"}
    env["fleet"].commit("backdated", push=True, env=past)
    out = apply_json(env, 1)
    assert "older than last good" in out["rejected"]


def test_max_future_skew_and_max_age(signed_env):
    env = signed_env
    future = {"GIT_COMMITTER_DATE": "2099-01-01T00:00:00Z"}
    env["fleet"].commit("future", push=True, env=future)
    cfg = write_config(env["tmp"] / "skew.yaml", url=env["fleet"].bare, root=env["root"],
                       state_dir=env["state"],
                       trust={"unsigned": "refuse", "max_future_skew": "1h", "max_age": "1d",
                              "allowed_signers": str(env["allowed"])})
    assert "in the future" in apply_json(env, 1, cfg)["rejected"]


def test_max_age_warns_but_applies(signed_env):
    env = signed_env
    env["fleet"].commit("old", push=True, env={"GIT_COMMITTER_DATE": "2020-01-01T00:00:00Z"})
    cfg = write_config(env["tmp"] / "age.yaml", url=env["fleet"].bare, root=env["root"],
                       state_dir=env["state"],
                       trust={"unsigned": "refuse", "max_age": "1d",
                              "allowed_signers": str(env["allowed"])})
    out = apply_json(env, 0, cfg)
    assert any("branch may be frozen" in w for w in out["warnings"])


def test_verdict_is_cached_per_commit(signed_env):
    env = signed_env
    apply_json(env, 0)
    cache = json.loads((env["state"] / "verdicts.json").read_text())
    assert list(cache["verdicts"]) == [env["fleet"].head()]
    cache["verdicts"][env["fleet"].head()]["signer"] = "from-the-cache"
    (env["state"] / "verdicts.json").write_text(json.dumps(cache))
    (env["root"] / "etc/motd").write_text("drift\n")  # force a full cycle
    assert apply_json(env, 0)["signer"] == "from-the-cache"
    # a changed allowed_signers file invalidates the cache
    env["allowed"].write_text(env["allowed"].read_text() + "# touched\n")
    assert apply_json(env, 0)["signer"] == "ops@example.com"


def test_submodule_and_tree_symlink_refused(signed_env):
    env = signed_env
    fleet: Fleet = env["fleet"]
    apply_json(env, 0)
    (fleet.work / "files/link.conf").symlink_to("/etc/shadow")
    role = (fleet.work / "roles/web.yaml").read_text() + "  /etc/x: {source: link.conf}\n"
    fleet.commit("symlink", files={"roles/web.yaml": role}, push=True)
    out = apply_json(env, 1)
    assert any("symlinks are never followed" in e for e in out["errors"])
    (fleet.work / "files/link.conf").unlink()
    sub = env["tmp"] / "sub"
    git(env["tmp"], "init", "-q", str(sub))
    git(sub, "commit", "-q", "--allow-empty", "-m", "s")
    head = git(sub, "rev-parse", "HEAD").stdout.strip()
    fleet.write({"roles/web.yaml": role.replace("  /etc/x: {source: link.conf}\n", "")})
    git(fleet.work, "add", "-A")
    git(fleet.work, "update-index", "--add", "--cacheinfo", f"160000,{head},vendor")
    git(fleet.work, "-c", "gpg.format=ssh", "-c", f"user.signingkey={env['key']}", "commit",
        "-q", "-S", "-m", "submodule")  # not commit -a: that would drop the gitlink again
    fleet.push()
    out = apply_json(env, 1)
    assert any("submodule" in e for e in out["errors"])
