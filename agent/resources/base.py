"""The contract every resource kind implements, and the context each stage hands it.

Owns: `Kind` (how a declaration is parsed from a role with file:line errors, the kind's
stage in the cycle order, how observed state is queried for a batch, check as a free
dry run, apply, what goes into the manifest, prune, hooks around the converge), the
converge context `Env`, the render context `ParseCtx`, and the small spec parsers that
several kinds share (modes, notify lists).
Must not: name a particular kind. render, converge, drift and prune drive the kinds
through the registry in resources/__init__.py and name none either.

Adding a kind: one module under resources/ with a Kind subclass, listed in
resources/__init__.py, plus its fixtures and its README section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ApplyError, RenderError
from ..model import Change, Resource

if TYPE_CHECKING:
    from ..host import Host
    from ..state import StateDir
    from ..yamlsrc import LineDict


@dataclass
class Env:
    """What a kind sees while one cycle plans and converges."""

    host: Host
    state: StateDir
    old: dict[str, dict[str, Any]]  # the previous manifest's entries, by identity
    full_check: bool = True
    package_backend: str | None = None
    # facts one kind leaves for another in this cycle ("a unit file changed, so systemd
    # must re-read them"), by a name both agree on; never a kind's name
    flags: dict[str, Any] = field(default_factory=dict)
    # the host's age identity (secrets.Keyring): the agent's own copies of secret
    # contents (prior contents in the journal, takeover backups) are sealed with it
    keyring: Any = None
    # the identities whose content is a secret, declared now or when last applied
    secret_ids: set[str] = field(default_factory=set)
    _helpers: dict[str, Any] = field(default_factory=dict)

    def seal(self, ident: str, data: bytes, secret: bool = False) -> tuple[bytes, bool]:
        """(what to keep, sealed?): a secret's content (`ident` in secret_ids, or
        `secret`) is kept only encrypted to the host's own recipient."""
        if ident not in self.secret_ids and not secret:
            return data, False
        if self.keyring is None:
            raise ApplyError(f"{ident}: no host identity to seal a copy of a secret with")
        return self.keyring.seal(data), True

    def unseal(self, data: bytes) -> bytes:
        """A sealed copy opened with the host's identity."""
        if self.keyring is None:
            raise ApplyError("a sealed copy of a secret needs the host identity to open")
        return self.keyring.unseal(data)

    def helper(self, key: str, make: Callable[[], Any]) -> Any:
        """One helper object per cycle (a package backend, a systemctl runner)."""
        if key not in self._helpers:
            self._helpers[key] = make()
        return self._helpers[key]


class ParseCtx:
    """What a kind sees while render parses one role or host file."""

    def __init__(self, path: str, keys: Callable[..., None],
                 content: Callable[[LineDict, str, str], bytes],
                 secret: Callable[[str], bool] = lambda ident: False) -> None:
        self.path = path  # roles/web.yaml
        self.keys = keys  # keys(mapping, allowed, what): unknown keys are errors
        # content(spec, "content"|"template"|"source"|"secret", ident)
        self.content = content
        self.secret = secret  # secret(ident): the content just made read a secret


class Kind:
    """One resource kind. Subclasses set the class attributes and override what differs."""

    name = ""
    role_key = ""  # the key in roles/hosts files that declares it ("" = through another)
    stage = 0  # cycle order: lower first (see STAGES in resources/__init__.py)
    prune_stage: int | None = None  # when its prunes run (default: its stage)
    by_path = False  # a path on the host: ordered parents first, stat-signed, drift-watched
    batch = False  # apply() gets every planned step of the kind in one call

    # --- render -----------------------------------------------------------------------

    def parse_key(self, mapping: LineDict, ctx: ParseCtx) -> list[Resource]:
        return [self.parse(name, spec, mapping.where(name), ctx)
                for name, spec in mapping.items()]

    def parse(self, name: Any, spec: Any, where: str, ctx: ParseCtx) -> Resource:
        raise NotImplementedError

    def conflict_key(self, res: Resource) -> str:
        """Two declarations with the same key must be identical (else: both places)."""
        return res.identity

    # --- converge ---------------------------------------------------------------------

    def path(self, name: str) -> str | None:
        """Where a resource of this kind lives on the host, for path kinds."""
        return None

    def query(self, resources: list[Resource], env: Env) -> Any:
        """Observed state of all declared resources of the kind, in one go."""
        return None

    def check(self, res: Resource, observed: Any, env: Env) -> Change:
        """What apply would do now; reads only. A no-op says why in `msg`."""
        raise NotImplementedError

    def apply(self, items: list[tuple[Resource, Change]], env: Env) -> list[Change]:
        return [self.apply_one(res, planned, env) for res, planned in items]

    def apply_one(self, res: Resource, planned: Change, env: Env) -> Change:
        raise NotImplementedError

    def record(self, res: Resource, change: Change) -> dict[str, Any] | None:
        """The manifest entry after a successful apply (None: nothing to remember). An
        entry without a path and a stat signature makes every cycle a full check, which
        is right for anything the stat fast path cannot see (packages, services)."""
        entry: dict[str, Any] = {"kind": res.kind, "name": res.name, "digest": res.digest()}
        path = self.path(res.name)
        if path is not None:
            entry["path"] = path
            entry.update({k: v for k, v in change.data.items() if k in ("backup", "created")})
        return entry

    def prune(self, ident: str, entry: dict[str, Any], env: Env, dry: bool) -> Change | None:
        """Undo a resource the last revision declared and this one does not (None: the
        kind never prunes)."""
        return None

    # --- the journal: going back --------------------------------------------------------

    def snapshot(self, ident: str, name: str, env: Env) -> dict[str, Any] | None:
        """The prior state of a resource this cycle is about to touch, as JSON, taken
        before the first write (None: the kind cannot restore it; rollback says so)."""
        return None

    def restore(self, records: list[dict[str, Any]], marks: list[dict[str, Any]],
                env: Env) -> list[Change]:
        """Put the resources of `records` ({id, name, prior}) back as they were, newest
        first; then whatever the kind does once after a rollback (daemon-reload, restarts
        of what the failed apply restarted: `marks` are the journal's done marks). Called
        for every kind, in stage order, also when it has no records."""
        return [Change(r["id"], failed=True, action="rollback",
                       msg=f"{self.name} resources cannot be rolled back; left as applied")
                for r in records]

    def before(self, env: Env) -> list[Change]:
        """Run once before the kind's first step in a converge."""
        return []

    def prepare(self, steps: list[tuple[Resource, Change]], env: Env) -> None:
        """Run once before the kind's first step in a converge, with the planned changes
        of every declared resource in its stage (all kinds of that stage, in order): work
        done ahead for many at once. Changes nothing a reader of the host could see; an
        error here only means each step does its own work."""

    def finish(self, env: Env) -> list[Change]:
        """Run once after every stage, before the handlers."""
        return []

    def handlers(self, steps: list[tuple[Resource, Change]], env: Env,
                 should_stop: Callable[[], bool]) -> list[Change]:
        """At the end: act on what the changed resources notified."""
        return []


# --- spec helpers shared by kinds ------------------------------------------------------------


def parse_mode(value: Any, what: str, where: str) -> str:
    if isinstance(value, str) and value.isdigit() and all(c in "01234567" for c in value) \
            and len(value) <= 4 and int(value, 8) <= 0o7777:
        return f"{int(value, 8):04o}"
    raise RenderError(f"render: {what} must be a quoted octal string like \"0644\", got "
                      f"{value!r} (an unquoted 0644 is read by YAML as a number) ({where})")


def parse_names(value: Any, what: str, where: str) -> list[str]:
    """A notify list: service names, `.service` added where no type is given, and the
    word `reboot` (the change needs the machine restarted: cycle.py schedules it)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RenderError(f"render: {what} must be a list of service names ({where})")
    return [v if "." in v or v == REBOOT else f"{v}.service" for v in value]


REBOOT = "reboot"  # a notify target that is not a service
