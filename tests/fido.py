"""FIDO (sk-*) SSH signatures made with `cryptography`, since no authenticator is
attached here. The format is OpenSSH's PROTOCOL.u2f; ssh-keygen verifies these
signatures like any other, so git's own verdict is still the oracle."""

from __future__ import annotations

import base64
import hashlib
import struct

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def s(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def mpint(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "big") if n else b""
    return s(raw)


class FidoKey:
    def __init__(self, kind: str = "ed25519", application: bytes = b"ssh:") -> None:
        self.kind = kind
        self.app = application
        if kind == "ed25519":
            self.type = "sk-ssh-ed25519@openssh.com"
            self.priv = ed25519.Ed25519PrivateKey.generate()
            pk = self.priv.public_key().public_bytes(serialization.Encoding.Raw,
                                                     serialization.PublicFormat.Raw)
            self.blob = s(self.type.encode()) + s(pk) + s(application)
        else:
            self.type = "sk-ecdsa-sha2-nistp256@openssh.com"
            self.priv = ec.generate_private_key(ec.SECP256R1())
            q = self.priv.public_key().public_bytes(serialization.Encoding.X962,
                                                    serialization.PublicFormat.UncompressedPoint)
            self.blob = s(self.type.encode()) + s(b"nistp256") + s(q) + s(application)

    def allowed(self, principal: str, options: str = "") -> str:
        opts = f"{options} " if options else ""
        return f"{principal} {opts}{self.type} {base64.b64encode(self.blob).decode()}\n"

    def sign(self, payload: bytes, namespace: str = "git", flags: int = 0x01,
             counter: int = 7) -> str:
        halg = "sha512"
        signed = (b"SSHSIG" + s(namespace.encode()) + s(b"") + s(halg.encode())
                  + s(hashlib.sha512(payload).digest()))
        msg = (hashlib.sha256(self.app).digest() + bytes([flags]) + struct.pack(">I", counter)
               + hashlib.sha256(signed).digest())
        if self.kind == "ed25519":
            raw = self.priv.sign(msg)
        else:
            r, ss = decode_dss_signature(self.priv.sign(msg, ec.ECDSA(hashes.SHA256())))
            raw = mpint(r) + mpint(ss)
        sig = s(self.type.encode()) + s(raw) + bytes([flags]) + struct.pack(">I", counter)
        blob = (b"SSHSIG" + struct.pack(">I", 1) + s(self.blob) + s(namespace.encode()) + s(b"")
                + s(halg.encode()) + s(sig))
        b64 = base64.b64encode(blob).decode()
        body = "\n".join(b64[i:i + 70] for i in range(0, len(b64), 70))
        return f"-----BEGIN SSH SIGNATURE-----\n{body}\n-----END SSH SIGNATURE-----\n"
