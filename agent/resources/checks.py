"""check resources: the health checks of a revision, declared in roles and host files.

    checks:
      nginx-up:     {systemd: nginx.service}
      http-ok:      {http: "http://127.0.0.1/healthz", status: 200, timeout: 2s}
      port:         {tcp: "127.0.0.1:5432"}
      app-selftest: {command: ["/usr/bin/app", "--selftest"], timeout: 10s}
      still-fetches: {fetch: true}
      optional-one: {command: [...], required: false}

A check changes nothing on the host: converge shows it as a no-op and it is never in
the manifest. It is part of the desired state (signed with it, and in the plan digest),
and health.py runs the checks in the trial after an apply.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from ..config import parse_duration
from ..errors import RenderError
from ..model import Change, Resource
from .base import Env, Kind, ParseCtx

TYPES = ("systemd", "http", "tcp", "command", "fetch")
_KEYS = {*TYPES, "status", "timeout", "required"}
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:")


def _fail(what: str, where: str) -> RenderError:
    return RenderError(f"render: {what} ({where})")


class CheckKind(Kind):
    name = "check"
    role_key = "checks"
    stage = 90

    def parse(self, name: Any, spec: Any, where: str, ctx: ParseCtx) -> Resource:
        if not isinstance(name, str) or not name or len(name) > 64 or set(name) - _NAME_CHARS:
            raise _fail(f"check name {name!r} must be 1-64 letters, digits or -_.:", where)
        if not isinstance(spec, dict):
            raise _fail(f"check[{name}] must be a mapping like {{tcp: \"127.0.0.1:22\"}}", where)
        ctx.keys(spec, _KEYS, f"check[{name}]")
        types = [t for t in TYPES if t in spec]
        if len(types) != 1:
            raise _fail(f"check[{name}] needs exactly one of {', '.join(TYPES)}", where)
        kind = types[0]
        at = spec.where(kind) if hasattr(spec, "where") else where
        value = spec[kind]
        norm: dict[str, Any] = {"type": kind}
        if kind == "systemd":
            if not isinstance(value, str) or not value or "/" in value or value.startswith("-"):
                raise _fail(f"check[{name}].systemd must be a unit name", at)
            norm["unit"] = value if "." in value else f"{value}.service"
        elif kind == "http":
            url = urllib.parse.urlsplit(value) if isinstance(value, str) else None
            if url is None or url.scheme not in ("http", "https") or not url.hostname:
                raise _fail(f"check[{name}].http must be an http:// or https:// URL", at)
            norm["url"] = value
            status = spec.get("status", 200)
            if isinstance(status, bool) or not isinstance(status, int) or not \
                    100 <= status <= 599:
                raise _fail(f"check[{name}].status must be an HTTP status like 200",
                            spec.where("status") if "status" in spec else where)
            norm["status"] = status
        elif kind == "tcp":
            host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
            host = host.strip("[]")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise _fail(f"check[{name}].tcp must be HOST:PORT like 127.0.0.1:5432", at)
            norm["host"], norm["port"] = host, int(port)
        elif kind == "command":
            if (not isinstance(value, list) or not value
                    or not all(isinstance(a, str) for a in value) or not value[0].startswith("/")):
                raise _fail(f"check[{name}].command must be a list: an absolute program path "
                            f"and its arguments (no shell)", at)
            norm["argv"] = list(value)
        elif kind == "fetch" and value is not True:
            raise _fail(f"check[{name}].fetch must be true", at)
        if "status" in spec and kind != "http":
            raise _fail(f"check[{name}].status is for http checks", spec.where("status"))
        try:
            norm["timeout"] = parse_duration(spec.get("timeout", "10s"))
        except ValueError as e:
            raise _fail(f"check[{name}].timeout: {e}", spec.where("timeout")) from None
        if not 0 < norm["timeout"] <= 3600:
            raise _fail(f"check[{name}].timeout must be between 1s and 1h",
                        spec.where("timeout"))
        required = spec.get("required", True)
        if not isinstance(required, bool):
            raise _fail(f"check[{name}].required must be true or false",
                        spec.where("required"))
        norm["required"] = required
        return Resource(self.name, name, norm, where)

    def check(self, res: Resource, observed: Any, env: Env) -> Change:
        return Change(res.identity, msg="health check: runs in the trial after a new "
                                        "revision is applied")

    def apply_one(self, res: Resource, planned: Change, env: Env) -> Change:
        return planned

    def record(self, res: Resource, change: Change) -> dict[str, Any] | None:
        return None


KINDS = [CheckKind()]
