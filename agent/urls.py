"""URLs of fleet repositories: the one table of their kinds, and redaction.

Owns: which transport a `source.url` (or mirror) means, and how a URL is shown in
logs, status and reports (without credentials).
Must not: import anything heavy: config, source and transport all use it.
"""

from __future__ import annotations

import re

_SCP = re.compile(r"^[\w.-]+@[\w.-]+:")  # git@host:fleet.git, scp-like ssh


def scheme(url: str) -> str:
    """The one table of URL kinds: `local` (a path or file://), `git`, `ssh` (ssh:// or
    scp-like user@host:path), `https`, `http`."""
    if url.startswith("file://") or url.startswith("/") or (
            "://" not in url and not _SCP.match(url)):
        return "local"
    if _SCP.match(url) and "://" not in url:
        return "ssh"
    return url.split("://", 1)[0].lower()


def redact(url: str) -> str:
    """Drop any user:password@ part of a URL before it reaches a log or report."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        creds, _, hostpart = rest.partition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}@{hostpart}" if ":" not in creds else f"{scheme}://***@{hostpart}"
    return url
