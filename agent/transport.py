"""Credentials and host-key pinning for ssh:// and https:// fetches.

Owns: the pygit2 RemoteCallbacks of a remote fetch. ssh://: the deploy key from
`source.ssh_key`; host keys pinned by `source.known_hosts` only (libgit2 checks the
offered key against a private copy of that file, never ~/.ssh): an unknown or changed
host key is refused, and the message shows the key the server offered. https://: a
token or `user:password` from `source.token_file`, and `source.ca_bundle`. Also the
asyncssh options of the SFTP report drop (written by report.py, read by fleet.py).
Must not: log or return a credential; error messages carry URLs through redact().
"""

from __future__ import annotations

import os
import shutil
from typing import Any
from urllib.parse import urlsplit

import pygit2

from .config import SourceConfig
from .errors import SourceError
from .urls import scheme

_pinned_home: str | None = None


def _pin_known_hosts(path: str | None) -> None:
    """libgit2 reads known_hosts from its home directory: point that at a private
    directory holding only the configured file (an empty one when none is set)."""
    global _pinned_home
    if _pinned_home is None:
        import tempfile  # here: only an SSH source needs it

        _pinned_home = tempfile.mkdtemp(prefix="gitops-agent-ssh-")
        os.makedirs(os.path.join(_pinned_home, ".ssh"), mode=0o700)
    target = os.path.join(_pinned_home, ".ssh", "known_hosts")
    if path:
        try:
            shutil.copyfile(path, target)
        except OSError as e:
            raise SourceError(f"source: cannot read known_hosts {path}: {e.strerror}") from None
    else:
        open(target, "w").close()
    pygit2.settings.homedir = _pinned_home


def sftp_options(sftp_cfg: Any, timeout: float) -> dict[str, Any]:
    """asyncssh.connect() options for the report drop. No pinned known_hosts means no
    trusted host key at all: refuse, never trust on use. asyncssh reads
    ~/.ssh/known_hosts for (), checks nothing for None, and reads the user's
    ~/.ssh/config unless told not to: none of that, ever."""
    import asyncssh

    return {"username": sftp_cfg.user, "port": sftp_cfg.port,
            "known_hosts": (sftp_cfg.known_hosts if sftp_cfg.known_hosts
                            else asyncssh.import_known_hosts("")),
            "client_keys": [sftp_cfg.key] if sftp_cfg.key else None,
            "config": None, "agent_path": None, "connect_timeout": timeout}


def offered_fingerprint(host: str, port: int) -> str:
    """The SHA256 fingerprint of the host key the server offers (for the refusal
    message only; trust is decided by libgit2 against the pinned file)."""
    try:
        import asyncio

        import asyncssh

        async def get() -> str:
            key = await asyncio.wait_for(asyncssh.get_server_host_key(host, port), 10)
            return key.get_fingerprint("sha256") if key else "unknown"

        return asyncio.run(get())
    except Exception:  # noqa: BLE001 - only used to enrich an error message
        return "unknown (could not ask the server again)"


class _Callbacks(pygit2.RemoteCallbacks):
    def __init__(self, url: str, source: SourceConfig) -> None:
        super().__init__()
        self.url = url
        self.source = source
        self.kind = scheme(url)
        # scp-like git@host:path has no scheme for urlsplit: read it as ssh://
        self.parts = urlsplit(url if "://" in url else "ssh://" + url.replace(":", "/", 1))
        self.refused: str | None = None
        self.tries = 0

    def credentials(self, url: str, username_from_url: str | None, allowed_types: Any) -> Any:
        self.tries += 1
        if self.tries > 3:
            raise SourceError(f"source: authentication to {self.parts.hostname} failed")
        if self.kind == "ssh":
            key = self.source.ssh_key
            if not key:
                raise SourceError("source: ssh:// needs source.ssh_key (a deploy key)")
            pub = key + ".pub" if os.path.exists(key + ".pub") else None
            return pygit2.Keypair(username_from_url or "git", pub, key, "")
        if self.source.token_file:
            try:
                with open(self.source.token_file) as f:
                    secret = f.read().strip()
            except OSError as e:
                raise SourceError(f"source: cannot read token_file {self.source.token_file}: "
                                  f"{e.strerror}") from None
            user, sep, password = secret.partition(":")
            if not sep:  # a bare token: the username is conventional, the token is the secret
                user, password = username_from_url or "oauth2", secret
            return pygit2.UserPass(user, password)
        raise SourceError(f"source: {self.parts.hostname} asks for credentials and no "
                          f"source.token_file is set")

    def certificate_check(self, certificate: Any, valid: bool, host: bytes) -> bool:
        if valid:
            return True
        name = host.decode(errors="replace")
        if self.kind == "ssh":
            fp = offered_fingerprint(self.parts.hostname or name, self.parts.port or 22)
            self.refused = (f"host key of {name} is unknown or changed: the server offered "
                            f"{fp}, which is not in {self.source.known_hosts or '(no known_hosts)'}"
                            f"; refused")
        else:
            self.refused = (f"TLS certificate of {name} is not trusted by "
                            f"{self.source.ca_bundle or 'the system CA store'}; refused")
        raise SourceError(self.refused)


def callbacks_for(url: str, source: SourceConfig) -> pygit2.RemoteCallbacks:
    if scheme(url) == "https":
        # a process-wide libgit2 setting: set it on every https fetch, so a reload that
        # drops ca_bundle goes back to the system store
        if source.ca_bundle:
            pygit2.settings.set_ssl_cert_locations(source.ca_bundle, None)
        else:
            import ssl

            paths = ssl.get_default_verify_paths()
            pygit2.settings.set_ssl_cert_locations(paths.cafile, paths.capath)
    else:
        _pin_known_hosts(source.known_hosts)
    return _Callbacks(url, source)
