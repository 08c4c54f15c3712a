"""The resource kinds and their registry.

One module per kind (or family of kinds) implements the contract of base.Kind; this
registry is the only place that lists them. render, converge, drift and prune look
kinds up here and name none. The stages, lower first:

    0 packages → 10 groups → 11 users → 20 directories/files/symlinks → 30 sysctl
    → 40 unit files (then one daemon-reload) → 50 services → 90 health checks (no-ops
    here: health.py runs them) → notified restarts/reloads
"""

from __future__ import annotations

from ..model import Change
from .base import Kind

__all__ = ["Change", "Kind", "KINDS", "ROLE_KEYS", "kind"]


def _load() -> dict[str, Kind]:
    from . import accounts, checks, files, packages, sysctl, systemd

    kinds: dict[str, Kind] = {}
    # role-key order of a rendered state
    for module in (files, packages, systemd, sysctl, accounts, checks):
        for k in module.KINDS:
            kinds[k.name] = k
    return kinds


KINDS: dict[str, Kind] = _load()
# role/host file key → the kind that parses it, in the order render emits resources
ROLE_KEYS: dict[str, Kind] = {k.role_key: k for k in KINDS.values() if k.role_key}


def kind(name: str) -> Kind:
    """The kind of a resource or manifest entry; KeyError for a kind this agent lacks."""
    return KINDS[name]
