"""Typed errors. Each message says what was being done, why it failed, and where.

Owns: the error hierarchy and the CLI exit code each class maps to.
Must not: format tracebacks; a user mistake is reported by its message alone.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent reports to a user without a traceback."""

    exit_code = 1


class ConfigError(AgentError):
    """The local agent.yaml (or a file it names) is wrong: exit 2, bad usage/config."""

    exit_code = 2


class UsageError(AgentError):
    exit_code = 2


class StateError(AgentError):
    """A file in state_dir is unreadable or corrupt. Never silently reset."""

    exit_code = 2


class LockError(AgentError):
    """Another cycle holds the state lock."""

    exit_code = 1


class SourceError(AgentError):
    """Fetching or reading the fleet repository failed."""


class TreeError(SourceError):
    """A commit's tree breaks a safety rule (escaping path, submodule, size limit)."""


class TrustError(AgentError):
    """A commit is not trusted: which commit, which rule, which key."""

    def __init__(self, message: str, *, commit: str = "", rule: str = "", key: str = "",
                 last_good_bad: bool = False) -> None:
        super().__init__(message)
        self.commit = commit
        self.rule = rule
        self.key = key
        self.last_good_bad = last_good_bad  # last good itself is no longer trusted


class RenderError(AgentError):
    """The fleet repository is wrong for this host: names the file and line."""


class ApplyError(AgentError):
    """Changing one resource on the host failed."""


class EscapeError(ApplyError):
    """A target would land outside the root prefix: the whole cycle is refused."""


class Exhausted(AgentError):
    """A bounded child (render, fetch) ran out of time or memory, or was stopped."""


def where(path: str, line: int | None) -> str:
    """`roles/web.yaml:4`, or the bare path when the line is unknown."""
    return f"{path}:{line}" if line else path
