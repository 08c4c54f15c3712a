"""The local agent.yaml → a frozen Config value.

Owns: the schema of agent.yaml, defaults a real host wants, validation with
file:line errors, durations (`90s`, `5m`, `1h`, `14d`), and resolving relative paths
against the config file's directory.
Must not: read anything from the fleet repository; trust files are local paths only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .urls import scheme
from .yamlsrc import LineDict, YamlError, load

DEFAULT_CONFIG = "/etc/gitops-agent/agent.yaml"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> float:
    """`90s` → 90.0; `5m` → 300.0; a bare number is seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("a duration, not a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration like 90s, 5m, 1h or 14d")


@dataclass(frozen=True)
class SourceConfig:
    url: str = ""
    branch: str = "main"
    mirrors: tuple[str, ...] = ()
    ssh_key: str | None = None
    known_hosts: str | None = None
    token_file: str | None = None
    ca_bundle: str | None = None
    timeout: float = 30.0
    fetch_deadline: float = 300.0
    # the daemon's change probe between full cycles: a ref advertisement only, a full
    # cycle when the branch moved (None: off)
    probe_interval: float | None = None


@dataclass(frozen=True)
class TrustConfig:
    allowed_signers: str | None = None
    gpg_keyring: str | None = None
    revoked_keys: str | None = None
    require: str = "tip"
    allow_rewind: bool = False
    max_age: float | None = None
    max_future_skew: float | None = 86400.0  # off (null) only for RTC-less hosts
    unsigned: str = "refuse"
    approvals: ApprovalsConfig = field(default_factory=lambda: ApprovalsConfig())


@dataclass(frozen=True)
class ApprovalsConfig:
    # k of n: a tip is applied once `threshold` distinct principals of `approvers` (an
    # allowed_signers file) approved it (approvals.py); 0 = off
    threshold: int = 0
    approvers: str | None = None


@dataclass(frozen=True)
class HostConfig:
    name: str | None = None
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SftpConfig:
    host: str
    dir: str
    port: int = 22
    user: str = "fleet"
    key: str | None = None
    known_hosts: str | None = None


@dataclass(frozen=True)
class ReportConfig:
    sftp: SftpConfig | None = None
    metrics_textfile: str | None = None
    heartbeat: float = 300.0


@dataclass(frozen=True)
class LimitsConfig:
    max_blob_size: int = 16 * 1024 * 1024
    max_files: int = 50_000
    max_total_size: int = 512 * 1024 * 1024
    render_timeout: float = 60.0
    render_memory: int = 1024 * 1024 * 1024


@dataclass(frozen=True)
class SecretsConfig:
    # the host's age identity: an age key file (gitops-agent keygen) or an unencrypted
    # OpenSSH ed25519/RSA private key such as /etc/ssh/ssh_host_ed25519_key
    identity: str = "/etc/gitops-agent/age.key"
    # the sops binary for SOPS files ("": `sops` on PATH, else next to the agent's Python)
    sops: str = ""


@dataclass(frozen=True)
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    host: HostConfig = field(default_factory=HostConfig)
    root: str = "/"
    state_dir: str = "/var/lib/gitops-agent"
    socket: str = "/run/gitops-agent/agent.sock"
    interval: float = 60.0
    jitter: float = 10.0
    drift: str = "correct"
    full_check: float = 3600.0
    package_backend: str = "auto"
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    path: str = ""


# --- the schema: key -> (kind, extra). Kinds: str, path, bool, int, size, duration,
# enum, strlist, labels, section (nested schema).

_PATH, _STR, _BOOL, _INT, _DUR, _OPTDUR = "path", "str", "bool", "int", "duration", "optdur"

_SCHEMA: dict[str, Any] = {
    "source": ("section", SourceConfig, {
        "url": ("url",), "branch": (_STR,), "mirrors": ("urllist",),
        "ssh_key": (_PATH,), "known_hosts": (_PATH,), "token_file": (_PATH,),
        "ca_bundle": (_PATH,), "timeout": (_DUR,), "fetch_deadline": (_DUR,),
        "probe_interval": (_OPTDUR,),
    }),
    "trust": ("section", TrustConfig, {
        "allowed_signers": (_PATH,), "gpg_keyring": (_PATH,), "revoked_keys": (_PATH,),
        "require": ("enum", ("tip", "all")), "allow_rewind": (_BOOL,),
        "max_age": (_OPTDUR,), "max_future_skew": (_OPTDUR,),
        "unsigned": ("enum", ("refuse", "allow")),
        "approvals": ("section", ApprovalsConfig, {"threshold": (_INT,),
                                                   "approvers": (_PATH,)}),
    }),
    "host": ("section", HostConfig, {"name": (_STR,), "labels": ("labels",)}),
    "root": (_PATH,), "state_dir": (_PATH,), "socket": (_PATH,),
    "interval": (_DUR,), "jitter": (_DUR,), "full_check": (_DUR,),
    "drift": ("enum", ("correct", "report", "off")),
    "package_backend": ("enum", ("auto", "apt", "dnf")),
    "limits": ("section", LimitsConfig, {
        "max_blob_size": (_INT,), "max_files": (_INT,), "max_total_size": (_INT,),
        "render_timeout": (_DUR,), "render_memory": (_INT,),
    }),
    "report": ("section", ReportConfig, {
        "sftp": ("section", SftpConfig, {
            "host": (_STR,), "port": (_INT,), "user": (_STR,), "key": (_PATH,),
            "known_hosts": (_PATH,), "dir": (_STR,),
        }),
        "metrics_textfile": (_PATH,), "heartbeat": (_DUR,),
    }),
    "secrets": ("section", SecretsConfig, {"identity": (_PATH,), "sops": (_PATH,)}),
}


def _convert(kind: tuple, value: Any, where: str, key: str, base: Path) -> Any:
    k = kind[0]
    if k in (_STR, _PATH):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"config: {key} must be a non-empty string, got {value!r} ({where})")
        return str(base / value) if k == _PATH and not os.path.isabs(value) else value
    if k == _BOOL:
        if not isinstance(value, bool):
            raise ConfigError(f"config: {key} must be true or false, got {value!r} ({where})")
        return value
    if k == _INT:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"config: {key} must be a whole number >= 0, got {value!r} ({where})")
        return value
    if k in (_DUR, _OPTDUR):
        if k == _OPTDUR and (value is None or value == "off"):
            return None
        try:
            return parse_duration(value)
        except ValueError as e:
            raise ConfigError(f"config: {key}: {e} ({where})") from None
    if k == "enum":
        if value not in kind[1]:
            choices = " | ".join(kind[1])
            raise ConfigError(f"config: {key} must be one of {choices}, got {value!r} ({where})")
        return value
    if k == "url":
        return _url(_convert((_STR,), value, where, key, base), base)
    if k == "urllist":
        return tuple(_url(u, base) for u in _convert(("strlist",), value, where, key, base))
    if k == "strlist":
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"config: {key} must be a list of strings ({where})")
        return tuple(value)
    if k == "labels":
        if not isinstance(value, dict):
            raise ConfigError(f"config: {key} must be a mapping of label: value ({where})")
        out = []
        for lk, lv in value.items():
            if not isinstance(lk, str) or isinstance(lv, dict | list) or lv is None:
                raise ConfigError(f"config: {key}.{lk} must be a scalar label value ({where})")
            out.append((lk, str(lv).lower() if isinstance(lv, bool) else str(lv)))
        return tuple(sorted(out))
    if k == "section":
        return _section(kind[1], kind[2], value, where, key, base)
    raise AssertionError(k)  # pragma: no cover


def _url(url: str, base: Path) -> str:
    """A plain relative path is taken relative to the config file, like other paths."""
    if scheme(url) != "local" or url.startswith("file://") or os.path.isabs(url):
        return url
    return str(base / url)


def _section(cls: type, schema: dict[str, Any], data: Any, where: str, prefix: str,
             base: Path) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config: {prefix or 'the file'} must be a mapping ({where})")
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        loc = data.where(key) if isinstance(data, LineDict) else where
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"config: unknown key {dotted!r} (known here: {known}) ({loc})")
        kwargs[key] = _convert(schema[key], value, loc, dotted, base)
    try:
        return cls(**kwargs)
    except TypeError:
        names = {f.name for f in fields(cls)}
        missing = [n for n in names if n not in kwargs]
        raise ConfigError(f"config: {prefix} is missing {', '.join(missing)} ({where})") from None


_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def host_name_problem(name: str) -> str:
    """"" for a hostname-like name (RFC 1123 labels joined by dots, at most 253
    characters), else why not. The name becomes file names in the report drop and
    hosts/NAME.yaml, so `/`, `..`, newlines and the like must never get through."""
    if not name or len(name) > 253:
        return "must be 1 to 253 characters"
    if not all(_LABEL.match(label) for label in name.split(".")):
        return ("must be hostname labels (letters, digits, '-' inside, at most 63 each) "
                "joined by dots")
    return ""


def parse(text: str, src: str) -> Config:
    """Parse agent.yaml text. Relative paths are relative to the file's directory."""
    try:
        data = load(text, src)
    except YamlError as e:
        raise ConfigError(f"config: {e} ({e.location})") from None
    if data is None:
        data = LineDict(src, 1)
    base = Path(src).resolve().parent
    cfg = _section(Config, _SCHEMA, data, f"{src}:1", "", base)
    if not cfg.source.url:
        raise ConfigError(f"config: source.url is required: where to fetch the fleet repo ({src})")
    appr = cfg.trust.approvals
    if appr.threshold and not appr.approvers:
        raise ConfigError(f"config: trust.approvals.threshold is {appr.threshold} but "
                          f"trust.approvals.approvers (an allowed_signers file) is not set "
                          f"({src})")
    if cfg.host.name is not None and (why := host_name_problem(cfg.host.name)):
        where = data.get("host").where("name") if isinstance(data.get("host"), LineDict) else src
        raise ConfigError(f"config: host.name {cfg.host.name!r} {why} ({where})")
    return Config(**{**{f.name: getattr(cfg, f.name) for f in fields(Config)}, "path": src})


def load_file(path: str) -> Config:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config: {path} does not exist (pass --config PATH)") from None
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    return parse(text, path)
