"""The shared vocabulary of the pipeline: Resource, DesiredState, Change, identities.

Owns: what one declared resource is (kind, name, normalized spec, origin file:line,
content), the desired state of one host at one commit, the one result type of every
stage (Change, Ansible-shaped), and the identity `kind[name]` used the same in logs,
plans, manifests, reports and the socket.
Must not: know any particular kind; resources/ does, through the registry.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


def identity(kind: str, name: str) -> str:
    """`file[/etc/motd]`, `package[nginx]`, `service[nginx.service]`."""
    return f"{kind}[{name}]"


@dataclass
class Resource:
    kind: str
    name: str
    spec: dict[str, Any]
    origin: str
    content: bytes | None = None
    # a secret content (secrets.py): its keyed fingerprint, shown instead of a diff, and
    # the encrypted files it came from; the content itself is never shown or stored
    secret: str = ""
    secrets: tuple[str, ...] = ()
    # why this resource cannot be converged here (a secret not encrypted to this host):
    # the cycle leaves it as it is and converges the rest
    error: str = ""
    _digest: str | None = field(default=None, repr=False, compare=False)
    # this resource's line in a kept render (DesiredState.pack), with the inputs it was
    # packed with: a resource an incremental render reuses is not encoded again
    _row: tuple[tuple[str, ...], bytes] | None = field(default=None, repr=False,
                                                        compare=False)

    @cached_property
    def identity(self) -> str:  # asked for thousands of times a cycle; never changes
        return identity(self.kind, self.name)

    @property
    def content_left_out(self) -> bool:
        """Unpacked from a kept render (DesiredState.pack) without its content, which
        read a secret: it must be made again before anything can use it."""
        return bool(self.secrets) and self.content is None

    @property
    def notify(self) -> tuple[str, ...]:
        return tuple(self.spec.get("notify", ()))

    def digest(self) -> str:
        """Changes when anything about the desired state of this resource changes.
        Computed once: a Resource is not changed after render builds it."""
        if self._digest is None:
            h = hashlib.sha256(json.dumps([self.kind, self.name, self.spec], sort_keys=True,
                                          default=str).encode())
            if self.error or self.secret:  # never a plain hash of a secret
                h.update(f"\0{self.error}\0{self.secret}".encode())
            elif self.content is not None:
                h.update(b"\0")
                h.update(self.content)
            self._digest = h.hexdigest()
        return self._digest

    def to_json(self, with_content: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.identity, "kind": self.kind, "name": self.name,
                               "origin": self.origin, "spec": self.spec}
        if self.error:
            out["error"] = self.error
        if self.secret or self.secrets:
            out["secret"] = self.secret or True
            out["secrets"] = list(self.secrets)
        elif self.content is not None:
            out["sha256"] = hashlib.sha256(self.content).hexdigest()
            if with_content:
                try:
                    out["content"] = self.content.decode()
                except UnicodeDecodeError:
                    out["content_base64"] = base64.b64encode(self.content).decode()
        return out


@dataclass
class DesiredState:
    host: str
    commit: str
    roles: list[str]
    vars: dict[str, Any]
    resources: list[Resource] = field(default_factory=list)
    # the trial after an apply: {"window": s, "timeout": s, "interval": s} (health.py)
    health: dict[str, float] = field(default_factory=dict)
    # when this host may take a new plan: wave, bucket, windows, pause (rollout.py)
    rollout: dict[str, Any] = field(default_factory=dict)
    # what each resource's content was made from: the files/ and secrets/ paths it read
    # (its template's includes too). An incremental render remakes only the resources
    # whose inputs a new commit changed (render.py)
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    remade: int | None = None  # incremental: how many contents were made again

    def by_id(self) -> dict[str, Resource]:
        return {r.identity: r for r in self.resources}

    def to_json(self, with_content: bool = True) -> dict[str, Any]:
        return {"host": self.host, "commit": self.commit, "roles": self.roles,
                "vars": self.vars, "health": self.health, "rollout": self.rollout,
                "resources": [r.to_json(with_content) for r in self.resources]}

    # --- kept between processes (state.save_render), for incremental renders -----------

    def pack(self, base: str, max_bytes: int) -> bytes | None:
        """This state as bytes a later process can unpack and render incrementally from:
        a JSON header line, one JSON line per resource, then the contents. A content
        that read a secret is left out (the unpacked resource has none, and is made
        again). None when it cannot be kept exactly: a held resource, contents over
        max_bytes, or anything JSON would not give back as it was (a tuple, a
        non-string key). A resource packed before (kept, or reused by an incremental
        render) is not encoded again."""
        if any(r.error for r in self.resources):
            return None
        blobs: list[bytes] = []
        rows: list[bytes] = []
        size = 0
        for r in self.resources:
            inputs = self.inputs.get(r.identity, ())
            kept = r.content is not None and not r.secrets
            if kept:
                blobs.append(r.content)  # type: ignore[arg-type]
                size += len(r.content)  # type: ignore[arg-type]
            if r._row is None or r._row[0] != inputs:
                line = _exact_json([r.kind, r.name, r.spec, r.origin, r.secret,
                                    list(r.secrets),
                                    len(r.content) if kept else None,  # type: ignore[arg-type]
                                    list(inputs), None if r.secrets else r.digest()])
                if line is None:
                    return None
                r._row = (inputs, line)
            rows.append(r._row[1])
        if size > max_bytes:
            return None
        body = b"\n".join(rows) + b"\n" + b"".join(blobs)
        head = _exact_json({"v": 2, "base": base, "host": self.host, "commit": self.commit,
                            "roles": self.roles, "vars": self.vars, "health": self.health,
                            "rollout": self.rollout, "n": len(rows),
                            "sha256": hashlib.sha256(body).hexdigest()})
        return None if head is None else head + b"\n" + body

    @classmethod
    def unpack(cls, data: bytes, base: str) -> DesiredState | None:
        """What pack() wrote, if it was packed with this same `base` (everything besides
        the commit that a render depends on) and is whole; else None."""
        try:
            line, _, body = data.partition(b"\n")
            head = json.loads(line)
            if head.get("v") != 2 or head.get("base") != base or \
                    hashlib.sha256(body).hexdigest() != head["sha256"]:
                return None
            n = head["n"]
            *rows, contents = body.split(b"\n", n) if n else [body[1:]]
            if len(rows) != n:
                return None
            state = cls(head["host"], head["commit"], head["roles"], head["vars"],
                        health=head["health"], rollout=head["rollout"])
            at = 0
            parsed = json.loads(b"[" + b",".join(rows) + b"]")  # once: half the time
            if len(parsed) != n:
                return None
            for row, (kind, name, spec, origin, secret, secrets, size, inputs, digest) in \
                    zip(rows, parsed, strict=True):
                content = None
                if size is not None:
                    content = contents[at:at + size]
                    at += size
                res = Resource(kind, name, spec, origin, content, secret, tuple(secrets),
                               _digest=digest)
                res._row = (tuple(inputs), row)
                state.resources.append(res)
                state.inputs[res.identity] = res._row[0]
            return state if at == len(contents) else None
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def _exact_json(value: Any) -> bytes | None:
    """One line of JSON that json.loads gives back equal to `value`; None when it would
    not (a tuple, a non-string key, NaN) or cannot be encoded."""
    try:
        text = json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError):
        return None
    return text.encode() if json.loads(text) == value else None


@dataclass
class Change:
    id: str
    changed: bool = False
    failed: bool = False
    msg: str = ""
    diff: str = ""
    action: str = "none"  # none | create | update | remove | restore | prune | ...
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "changed": self.changed, "failed": self.failed, "msg": self.msg,
               "action": self.action}
        if self.diff:
            out["diff"] = self.diff
        return out
