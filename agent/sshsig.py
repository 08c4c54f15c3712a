"""SSH signatures (OpenSSH PROTOCOL.sshsig) and git's allowed_signers, natively.

Owns: the SSH wire format, public keys and OpenSSH user certificates, the SSHSIG
armor and blob, signature verification with `cryptography`, and allowed_signers
parsing/matching as `ssh-keygen -Y verify` does it for git. No subprocess.
Must not: decide policy (which commits must be signed); trust.py does.

Everything that goes wrong raises SigError (a TrustError): parsers never raise
anything else, and never accept on a path that did not verify a signature.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import fnmatch
import hashlib
import re
import struct
import time
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from .errors import TrustError

MIN_RSA_BITS = 2048
_ARMOR_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_ARMOR_END = "-----END SSH SIGNATURE-----"
_CURVES = {"nistp256": (ec.SECP256R1, hashes.SHA256), "nistp384": (ec.SECP384R1, hashes.SHA384),
           "nistp521": (ec.SECP521R1, hashes.SHA512)}
_SK_UP = 0x01  # user presence
CERT_USER = 1


class SigError(TrustError):
    pass


class Reader:
    """SSH wire format (RFC 4251 §5): uint32, uint64, string, mpint."""

    def __init__(self, data: bytes, what: str = "data") -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise SigError(f"{self.what} is truncated", rule="signature-format")
        out = self.data[self.pos: self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def string(self) -> bytes:
        return self.take(self.u32())

    def text(self) -> str:
        try:
            return self.string().decode()
        except UnicodeDecodeError:
            raise SigError(f"{self.what} has a non-UTF-8 name", rule="signature-format") from None

    def mpint(self) -> int:
        raw = self.string()
        if raw and raw[0] & 0x80:
            raise SigError(f"{self.what} has a negative integer", rule="signature-format")
        return int.from_bytes(raw, "big")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise SigError(f"{self.what} has trailing bytes", rule="signature-format")


def sstr(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


# --- public keys -----------------------------------------------------------------------


@dataclass
class PublicKey:
    type: str            # the base algorithm, e.g. ssh-ed25519 (for a cert: of its key)
    blob: bytes          # the wire blob of the key as signed with (a cert's own blob)
    key: object          # cryptography public key
    bits: int = 0
    application: bytes = b""  # FIDO keys
    cert: Certificate | None = None

    @property
    def fingerprint(self) -> str:
        return "SHA256:" + base64.b64encode(hashlib.sha256(self.blob).digest()).decode().rstrip("=")

    def verify(self, sig_blob: bytes, data: bytes) -> tuple[int, int]:
        """Verify an SSH signature blob over data; returns FIDO (flags, counter) or (0, 0)."""
        r = Reader(sig_blob, "signature")
        sigtype = r.text()
        raw = r.string()
        flags = counter = 0
        if self.type.startswith("sk-"):
            flags = r.u8()
            counter = r.u32()
        r.end()
        try:
            if self.type == "ssh-ed25519":
                _expect(sigtype, "ssh-ed25519")
                self.key.verify(raw, data)  # type: ignore[attr-defined]
            elif self.type == "sk-ssh-ed25519@openssh.com":
                _expect(sigtype, self.type)
                self.key.verify(raw, _sk_message(self.application, flags, counter, data,
                                                 hashes.SHA256))  # type: ignore[attr-defined]
            elif self.type.startswith("ecdsa-sha2-"):
                _expect(sigtype, self.type)
                curve = self.type.removeprefix("ecdsa-sha2-")
                self.key.verify(_ecdsa_der(raw),  # type: ignore[attr-defined]
                                data, ec.ECDSA(_CURVES[curve][1]()))
            elif self.type == "sk-ecdsa-sha2-nistp256@openssh.com":
                _expect(sigtype, self.type)
                self.key.verify(_ecdsa_der(raw),  # type: ignore[attr-defined]
                                _sk_message(self.application, flags, counter, data,
                                            hashes.SHA256), ec.ECDSA(hashes.SHA256()))
            elif self.type == "ssh-rsa":
                if sigtype == "ssh-rsa":
                    raise SigError("RSA signature uses SHA-1 (ssh-rsa); only rsa-sha2-256 and "
                                   "rsa-sha2-512 are accepted", rule="weak-algorithm")
                algo = {"rsa-sha2-256": hashes.SHA256, "rsa-sha2-512": hashes.SHA512}.get(sigtype)
                if algo is None:
                    raise SigError(f"unknown RSA signature type {sigtype}", rule="signature-format")
                if self.bits < MIN_RSA_BITS:
                    raise SigError(f"RSA key of {self.bits} bits is under {MIN_RSA_BITS}",
                                   rule="weak-key", key=self.fingerprint)
                self.key.verify(raw, data, padding.PKCS1v15(), algo())  # type: ignore[attr-defined]
            else:
                raise SigError(f"unsupported key type {self.type}", rule="key-type")
        except InvalidSignature:
            raise SigError("the signature does not verify (payload or signature altered, or "
                           "another key)", rule="bad-signature", key=self.fingerprint) from None
        return flags, counter

    def same_key(self, other: PublicKey) -> bool:
        return self.blob == other.blob


def _expect(sigtype: str, want: str) -> None:
    if sigtype != want:
        raise SigError(f"signature type {sigtype} does not match key type {want}",
                       rule="signature-format")


def _sk_message(application: bytes, flags: int, counter: int, data: bytes, h: type) -> bytes:
    """PROTOCOL.u2f: the authenticator signs H(application) || flags || counter || H(data)."""
    return (hashlib.sha256(application).digest() + bytes([flags]) + struct.pack(">I", counter)
            + hashlib.sha256(data).digest())


def _ecdsa_der(raw: bytes) -> bytes:
    r = Reader(raw, "ECDSA signature")
    rr, ss = r.mpint(), r.mpint()
    r.end()
    return encode_dss_signature(rr, ss)


def _key_fields(r: Reader, ktype: str) -> tuple[str, object, int, bytes]:
    """Read the type-specific fields of a key; returns (base type, key, bits, application)."""
    try:
        if ktype in ("ssh-ed25519", "sk-ssh-ed25519@openssh.com"):
            pk = r.string()
            if len(pk) != 32:
                raise SigError("Ed25519 key is not 32 bytes", rule="key-format")
            app = r.string() if ktype.startswith("sk-") else b""
            return ktype, ed25519.Ed25519PublicKey.from_public_bytes(pk), 256, app
        if ktype.startswith("ecdsa-sha2-") or ktype == "sk-ecdsa-sha2-nistp256@openssh.com":
            curve = r.text()
            want = "nistp256" if ktype.startswith("sk-") else ktype.removeprefix("ecdsa-sha2-")
            if curve != want or curve not in _CURVES:
                raise SigError(f"ECDSA curve {curve} does not match {ktype}", rule="key-format")
            point = r.string()
            key = ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[curve][0](), point)
            app = r.string() if ktype.startswith("sk-") else b""
            return ktype, key, key.curve.key_size, app
        if ktype == "ssh-rsa":
            e = r.mpint()
            n = r.mpint()
            if n.bit_length() < 512 or e < 3 or e % 2 == 0:
                raise SigError("RSA key is malformed", rule="key-format")
            return ktype, rsa.RSAPublicNumbers(e, n).public_key(), n.bit_length(), b""
    except ValueError as e:
        raise SigError(f"{ktype} key is malformed: {e}", rule="key-format") from None
    raise SigError(f"unsupported key type {ktype}", rule="key-type")


def parse_public_key(blob: bytes) -> PublicKey:
    r = Reader(blob, "public key")
    ktype = r.text()
    if ktype.endswith("-cert-v01@openssh.com"):
        cert = _parse_cert(blob)
        return PublicKey(cert.key.type, blob, cert.key.key, cert.key.bits,
                         cert.key.application, cert)
    base, key, bits, app = _key_fields(r, ktype)
    r.end()
    return PublicKey(base, blob, key, bits, app)


# --- certificates ----------------------------------------------------------------------


@dataclass
class Certificate:
    key: PublicKey
    serial: int
    cert_type: int
    key_id: str
    principals: list[str]
    valid_after: int
    valid_before: int
    critical_options: dict[str, bytes]
    extensions: dict[str, bytes]
    ca: PublicKey

    def check(self, when: int) -> None:
        if self.cert_type != CERT_USER:
            raise SigError("certificate is not a user certificate", rule="certificate")
        if when < self.valid_after or when >= self.valid_before:
            raise SigError(f"certificate {self.key_id!r} is not valid at the commit time",
                           rule="certificate-validity", key=self.ca.fingerprint)
        if self.critical_options:
            names = ", ".join(sorted(self.critical_options))
            raise SigError(f"certificate has critical options ({names}); refused",
                           rule="certificate")


def _parse_cert(blob: bytes) -> Certificate:
    r = Reader(blob, "certificate")
    ctype = r.text()
    base = ctype.removesuffix("-cert-v01@openssh.com")
    r.string()  # nonce
    _, key, bits, app = _key_fields(r, base)
    serial = r.u64()
    cert_type = r.u32()
    key_id = r.text()
    principals = _strings(r.string())
    valid_after = r.u64()
    valid_before = r.u64()
    crit = _options(r.string())
    ext = _options(r.string())
    r.string()  # reserved
    ca_blob = r.string()
    signed_len = r.pos
    sig = r.string()
    r.end()
    ca = parse_public_key(ca_blob)
    if ca.cert is not None:
        raise SigError("certificate is signed by another certificate", rule="certificate")
    try:
        ca.verify(sig, blob[:signed_len])
    except SigError as e:
        raise SigError(f"certificate signature by its CA does not verify: {e}",
                       rule="certificate", key=ca.fingerprint) from None
    inner = PublicKey(base, b"", key, bits, app)
    inner.blob = _plain_blob(base, blob)
    return Certificate(inner, serial, cert_type, key_id, principals, valid_after,
                       min(valid_before, 2**63 - 1), crit, ext, ca)


def _plain_blob(base: str, cert_blob: bytes) -> bytes:
    """The plain-key wire blob of a certificate's key (for fingerprints and revocation)."""
    r = Reader(cert_blob, "certificate")
    r.string()
    r.string()
    start = r.pos
    _key_fields(r, base)
    return sstr(base.encode()) + cert_blob[start: r.pos]


def _strings(data: bytes) -> list[str]:
    r = Reader(data, "certificate principals")
    out = []
    while r.pos < len(data):
        out.append(r.text())
    return out


def _options(data: bytes) -> dict[str, bytes]:
    r = Reader(data, "certificate options")
    out: dict[str, bytes] = {}
    last = ""
    while r.pos < len(data):
        name = r.text()
        if name <= last and out:
            raise SigError("certificate options are not sorted or repeat", rule="certificate")
        out[name] = r.string()
        last = name
    return out


# --- the SSHSIG envelope ---------------------------------------------------------------


@dataclass
class SshSig:
    public_key: PublicKey
    namespace: str
    hash_algorithm: str
    signature: bytes

    def signed_data(self, message: bytes) -> bytes:
        h = hashlib.new(self.hash_algorithm, message).digest()
        return (b"SSHSIG" + sstr(self.namespace.encode()) + sstr(b"")
                + sstr(self.hash_algorithm.encode()) + sstr(h))


def dearmor(text: str) -> bytes:
    if "\r" in text:  # git hands CRs to ssh-keygen, which refuses the armor: so do we
        raise SigError("SSH signature armor has carriage returns (CRLF lines)",
                       rule="signature-format")
    lines = text.strip().split("\n")
    if len(lines) < 3 or lines[0] != _ARMOR_BEGIN or lines[-1] != _ARMOR_END:
        raise SigError("SSH signature armor is malformed (BEGIN/END lines)",
                       rule="signature-format")
    body = "".join(lines[1:-1])
    if not re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", body):
        raise SigError("SSH signature armor has characters outside base64",
                       rule="signature-format")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise SigError("SSH signature armor is not valid base64", rule="signature-format") from None


def parse_sshsig(armored: str) -> SshSig:
    blob = dearmor(armored)
    r = Reader(blob, "SSH signature")
    if r.take(6) != b"SSHSIG":
        raise SigError("SSH signature has no SSHSIG magic", rule="signature-format")
    version = r.u32()
    if version != 1:
        raise SigError(f"SSH signature version {version} is not 1", rule="signature-format")
    pk = parse_public_key(r.string())
    namespace = r.text()
    r.string()  # reserved
    halg = r.text()
    sig = r.string()
    r.end()
    if halg not in ("sha256", "sha512"):
        raise SigError(f"SSH signature hash {halg!r} is not sha256 or sha512",
                       rule="signature-format")
    return SshSig(pk, namespace, halg, sig)


# --- allowed_signers -------------------------------------------------------------------


@dataclass
class AllowedSigner:
    principals: list[str]
    key: PublicKey
    cert_authority: bool = False
    namespaces: list[str] | None = None
    valid_after: int | None = None
    valid_before: int | None = None
    line: int = 0

    def principal_matches(self, principal: str) -> bool:
        return match_pattern_list(principal, self.principals)


@dataclass
class AllowedSigners:
    entries: list[AllowedSigner] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _abs_time(value: str, where: str) -> int:
    """YYYYMMDD[HHMM[SS]][Z]: UTC with Z, else local time, as OpenSSH reads it."""
    m = re.fullmatch(r"(\d{8})(\d{4})?(\d{2})?(Z)?", value)
    if not m or (m.group(3) and not m.group(2)):
        raise SigError(f"allowed_signers: bad time {value!r} ({where})", rule="allowed-signers")
    text = m.group(1) + (m.group(2) or "0000") + (m.group(3) or "00")
    try:
        tm = time.strptime(text, "%Y%m%d%H%M%S")
    except ValueError:
        raise SigError(f"allowed_signers: bad time {value!r} ({where})",
                       rule="allowed-signers") from None
    return calendar.timegm(tm) if m.group(4) else int(time.mktime(tm))


def _split_fields(line: str, where: str) -> list[str]:
    """Whitespace-separated fields; double quotes group (principals, option values)."""
    fields_: list[str] = []
    cur = []
    quoted = False
    started = False
    for ch in line:
        if ch == '"':
            quoted = not quoted
            cur.append(ch)
            started = True
        elif ch in " \t" and not quoted:
            if started:
                fields_.append("".join(cur))
                cur, started = [], False
        else:
            cur.append(ch)
            started = True
    if quoted:
        raise SigError(f"allowed_signers: unbalanced quote ({where})", rule="allowed-signers")
    if started:
        fields_.append("".join(cur))
    return fields_


_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
              "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com",
              "sk-ecdsa-sha2-nistp256@openssh.com", "ssh-dss")


def parse_allowed_signers(text: str, src: str) -> AllowedSigners:
    """Parse git's allowed_signers. A malformed line fails the whole file (closed);
    a well-formed line with a too-weak key is skipped with a warning."""
    out = AllowedSigners()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{src}:{n}"
        parts = _split_fields(line, where)
        # principals, then options (optional), then keytype, base64 key, comment
        ki = next((i for i, p in enumerate(parts) if p in _KEY_TYPES), None)
        if ki is None or ki + 1 >= len(parts) or ki < 1 or ki > 2:
            raise SigError(f"allowed_signers: line is not 'principals [options] keytype key' "
                           f"({where})", rule="allowed-signers")
        principals = [p for p in parts[0].strip('"').split(",")]
        if not all(principals):
            raise SigError(f"allowed_signers: empty principal ({where})", rule="allowed-signers")
        entry = AllowedSigner(principals, None, line=n)  # type: ignore[arg-type]
        if ki == 2:
            _parse_options(entry, parts[1], where)
        try:
            blob = base64.b64decode(parts[ki + 1], validate=True)
        except (binascii.Error, ValueError):
            raise SigError(f"allowed_signers: key is not base64 ({where})",
                           rule="allowed-signers") from None
        if parts[ki] == "ssh-dss":
            out.warnings.append(f"allowed_signers: DSA key skipped: too weak ({where})")
            continue
        try:
            key = parse_public_key(blob)
        except SigError as e:
            raise SigError(f"allowed_signers: {e} ({where})", rule="allowed-signers") from None
        if key.cert is not None or Reader(blob).text() != parts[ki]:
            raise SigError(f"allowed_signers: key type {parts[ki]} does not match the key "
                           f"({where})", rule="allowed-signers")
        if key.type == "ssh-rsa" and key.bits < MIN_RSA_BITS:
            out.warnings.append(f"allowed_signers: RSA key of {key.bits} bits skipped: under "
                                f"{MIN_RSA_BITS} ({where})")
            continue
        entry.key = key
        out.entries.append(entry)
    return out


def _parse_options(entry: AllowedSigner, text: str, where: str) -> None:
    for opt in _split_options(text, where):
        name, eq, value = opt.partition("=")
        name = name.lower()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = value[1:-1]
        if name == "cert-authority" and not eq:
            entry.cert_authority = True
        elif name == "namespaces" and eq:
            entry.namespaces = [v for v in value.split(",")]
        elif name == "valid-after" and eq:
            entry.valid_after = _abs_time(value, where)
        elif name == "valid-before" and eq:
            entry.valid_before = _abs_time(value, where)
        else:  # ssh-keygen knows no other option here: fail closed, as it skips the line
            raise SigError(f"allowed_signers: unknown option {opt!r} ({where})",
                           rule="allowed-signers")


def _split_options(text: str, where: str) -> list[str]:
    out, cur, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    if any(not o for o in out):
        raise SigError(f"allowed_signers: empty option ({where})", rule="allowed-signers")
    return out


def match_pattern_list(name: str, patterns: list[str]) -> bool:
    """OpenSSH match_pattern_list: a negated match wins; else any positive match."""
    matched = False
    for pat in patterns:
        neg = pat.startswith("!")
        if fnmatch.fnmatchcase(name, pat[1:] if neg else pat):
            if neg:
                return False
            matched = True
    return matched


# --- verification ----------------------------------------------------------------------


@dataclass
class SshVerdict:
    principal: str
    fingerprint: str
    line: int


def verify(armored: str, payload: bytes, signers: AllowedSigners, when: int,
           revoked: set[str] | None = None, namespace: str = "git") -> SshVerdict:
    """What `ssh-keygen -Y find-principals` + `-Y verify -n git` decide, at time `when`."""
    sig = parse_sshsig(armored)
    if sig.namespace != namespace:
        raise SigError(f"signature namespace is {sig.namespace!r}, not {namespace!r}",
                       rule="namespace", key=sig.public_key.fingerprint)
    pk = sig.public_key
    flags, _counter = pk.verify(sig.signature, sig.signed_data(payload))
    revoked = revoked or set()
    for k in (pk, pk.cert.ca if pk.cert else None, pk.cert.key if pk.cert else None):
        if k is not None and k.fingerprint in revoked:
            raise SigError(f"key {k.fingerprint} is revoked (trust.revoked_keys)",
                           rule="revoked", key=k.fingerprint)
    reasons = []
    for entry in signers.entries:
        if pk.cert is not None:
            if not entry.cert_authority or not entry.key.same_key(pk.cert.ca):
                continue
            try:
                pk.cert.check(when)
            except SigError as e:
                reasons.append(str(e))
                continue
            names = [p for p in pk.cert.principals if entry.principal_matches(p)]
            if not names:
                reasons.append(f"no certificate principal matches line {entry.line}")
                continue
            principal = names[0]
        else:
            if entry.cert_authority or not entry.key.same_key(pk):
                continue
            principal = entry.principals[0]
        if entry.namespaces is not None and not match_pattern_list(namespace, entry.namespaces):
            reasons.append(f"line {entry.line} does not allow namespace {namespace!r}")
            continue
        if entry.valid_after is not None and when < entry.valid_after:
            reasons.append(f"line {entry.line}: key not yet valid at the commit time "
                           f"(valid-after)")
            continue
        if entry.valid_before is not None and when > entry.valid_before:
            reasons.append(f"line {entry.line}: key expired before the commit time "
                           f"(valid-before)")
            continue
        if pk.type.startswith("sk-") and not flags & _SK_UP:
            # stricter than ssh-keygen -Y verify, which accepts it: a FIDO signature made
            # without a touch proves no one was at the key
            reasons.append(f"line {entry.line}: FIDO signature lacks user presence")
            continue
        return SshVerdict(principal, pk.fingerprint, entry.line)
    why = "; ".join(reasons) if reasons else "key is not in allowed_signers"
    raise SigError(f"signature by {pk.fingerprint} is not trusted: {why}", rule="untrusted-key",
                   key=pk.fingerprint)


def parse_revoked(text: str, src: str) -> set[str]:
    """Revoked keys: OpenSSH public key lines (`ssh-ed25519 AAAA… comment`) or fingerprints
    (`SHA256:…`), one a line. Returns fingerprints."""
    out = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("SHA256:"):
            out.add(line.split()[0])
            continue
        parts = line.split()
        try:
            blob = base64.b64decode(parts[1], validate=True) if len(parts) >= 2 else b""
            out.add(parse_public_key(blob).fingerprint)
        except (binascii.Error, ValueError, SigError):
            raise SigError(f"revoked_keys: line is not a public key or SHA256 fingerprint "
                           f"({src}:{n})", rule="revoked-keys") from None
    return out
