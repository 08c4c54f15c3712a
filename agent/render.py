"""Fleet repo + host → DesiredState. Pure: reads only the commit's tree.

Owns: the fleet repo format (fleet.yaml groups, roles/NAME.yaml, hosts/NAME.yaml,
files/), vars precedence, the Jinja2 sandbox (StrictUndefined, templates loaded only
from the commit's tree), resource identities `kind[name]`, and conflict detection
between two places that declare the same identity differently.
Must not: touch the host, the network or the clock. The same inputs always give
the same DesiredState, so `gitops-agent render` on a laptop previews a host exactly.

Vars precedence, lowest first: role `vars` (in role order), fleet `vars`, group
`vars` (in file order), host file `vars`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from . import isolate, rollout
from .config import parse_duration
from .errors import AgentError, RenderError, TreeError
from .facts import Facts
from .model import DesiredState, Resource
from .resources import KINDS, ROLE_KEYS
from .resources.base import ParseCtx
from .secrets import Keyring, Placeholders, SecretError, Source, check_recipients
from .source import TreeReader
from .yamlsrc import LineDict, YamlError, load

# a role or host file: vars and one key per resource kind (files, packages, ...)
_ROLE_KEYS = {"vars", *ROLE_KEYS}
_HOST_KEYS = _ROLE_KEYS | {"roles", "health"}
_GROUP_KEYS = {"name", "hosts", "labels", "roles", "vars", "health", "windows"}
_FLEET_KEYS = {"vars", "groups", "health", "rollout", "pause", "windows", "reboot",
               "recipients"}
# the trial after a new revision is applied (health.py): all required checks must hold
# for `window`, within `timeout`, looked at every `interval`
HEALTH_DEFAULTS = {"window": 60.0, "timeout": 180.0, "interval": 5.0}


class _TreeLoader:
    """A Jinja2 loader that reads only `files/` of the commit being rendered."""

    def __init__(self, tree: TreeReader) -> None:
        self.tree = tree

    def make(self) -> Any:
        import jinja2

        tree = self.tree

        class Loader(jinja2.BaseLoader):
            def get_source(self, environment: Any, template: str) -> tuple[str, str, Any]:
                path = f"files/{template}"
                try:
                    data = tree.read(path)
                except TreeError as e:
                    raise jinja2.TemplateNotFound(f"{template} ({e})") from None
                try:
                    return data.decode(), path, lambda: True
                except UnicodeDecodeError:
                    raise jinja2.TemplateNotFound(f"{template} is not UTF-8 text") from None

        return Loader()


class Renderer:
    def __init__(self, tree: TreeReader, host: str, labels: dict[str, str], facts: Facts,
                 bytecode_cache: Any = None,
                 progress: Callable[[str], None] | None = None,
                 keyring: Keyring | None = None) -> None:
        self.tree = tree
        self.host = host
        self.labels = labels
        self.facts = facts
        # a jinja2.BytecodeCache from state.py (keyed by template source checksum), or
        # what makes one: the files are the state directory's business, not render's
        self.bytecode_cache = bytecode_cache
        self._env: Any = None
        self.progress = progress or (lambda text: None)
        self._total = 0  # rendered bytes so far (limits.max_total_size)
        # secrets (secrets.py): None as keyring renders placeholders (previews, listings)
        self.secrets = Placeholders(tree) if keyring is None else Source(tree, keyring)
        self._used: list[str] = []  # the secret files the content being made has read
        self._read: list[str] = []  # every files/ and secrets/ path it has read
        self.inputs: dict[str, tuple[str, ...]] = {}  # identity -> those paths
        self._secret_of: dict[str, tuple[str, ...]] = {}  # identity -> secret files used
        self._held: dict[str, str] = {}  # identity -> why its secret cannot be read here

    # --- loading ---------------------------------------------------------------------

    def _yaml(self, path: str, required: bool = True) -> LineDict | None:
        try:
            if not self.tree.is_file(path):
                if required:
                    raise RenderError(f"render: {path} is missing from commit "
                                      f"{self.tree.commit[:12]}")
                return None
            text = self.tree.read(path)
        except TreeError as e:
            raise RenderError(f"render: {e}") from None
        try:
            data = load(text, path)
        except YamlError as e:
            raise RenderError(f"render: {e} ({e.location})") from None
        if data is None:
            return LineDict(path, 1)
        if not isinstance(data, LineDict):
            raise RenderError(f"render: {path} must be a mapping at the top ({path}:1)")
        return data

    @staticmethod
    def _keys(data: LineDict, allowed: set[str], what: str) -> None:
        for key in data:
            if key not in allowed:
                raise RenderError(f"render: unknown key {key!r} in {what}; allowed: "
                                  f"{', '.join(sorted(allowed))} ({data.where(key)})")

    @staticmethod
    def _typed(data: LineDict, key: str, types: type | tuple, what: str) -> Any:
        value = data.get(key)
        if value is not None and not isinstance(value, types):
            names = types.__name__ if isinstance(types, type) else "/".join(
                t.__name__ for t in types)
            names = names.replace("LineDict", "mapping").replace("dict", "mapping")
            raise RenderError(f"render: {what}.{key} must be a {names}, got "
                              f"{type(value).__name__} ({data.where(key)})")
        return value

    # --- the whole render --------------------------------------------------------------

    def render(self) -> DesiredState:
        try:
            self.tree.check()
        except TreeError as e:
            raise RenderError(f"render: {e}") from None
        fleet = self._yaml("fleet.yaml")
        assert fleet is not None
        self._keys(fleet, _FLEET_KEYS, "fleet.yaml")
        try:
            check_recipients(fleet)
        except ValueError as e:
            raise RenderError(f"render: {e}") from None
        fleet_vars = self._typed(fleet, "vars", dict, "fleet.yaml") or {}
        groups = self._typed(fleet, "groups", list, "fleet.yaml") or []

        health = dict(HEALTH_DEFAULTS)
        self._health(fleet, "fleet.yaml", health)
        roles: list[tuple[str, str]] = []  # (role, where it was asked for)
        group_vars: list[dict] = []
        windowed: list[tuple[int, LineDict]] = []  # matching groups with windows
        for i, group in enumerate(groups):
            if not isinstance(group, LineDict):
                raise RenderError(f"render: fleet.yaml groups[{i}] must be a mapping "
                                  f"({fleet.where('groups')})")
            if self._matches(group, i):
                for r in self._typed(group, "roles", list, f"groups[{i}]") or []:
                    roles.append((r, group.where("roles")))
                group_vars.append(self._typed(group, "vars", dict, f"groups[{i}]") or {})
                self._health(group, f"fleet.yaml groups[{i}]", health)
                if "windows" in group:
                    windowed.append((i, group))

        host_file = f"hosts/{self.host}.yaml"
        host_doc = self._yaml(host_file, required=False)
        host_vars: dict = {}
        if host_doc is not None:
            self._keys(host_doc, _HOST_KEYS, host_file)
            for r in self._typed(host_doc, "roles", list, host_file) or []:
                roles.append((r, host_doc.where("roles")))
            host_vars = self._typed(host_doc, "vars", dict, host_file) or {}
            self._health(host_doc, host_file, health)

        role_docs: list[tuple[str, LineDict]] = []
        seen = set()
        for role, asked in roles:
            if not isinstance(role, str) or not role or "/" in role or role.startswith("."):
                raise RenderError(f"render: role name {role!r} is not a plain name ({asked})")
            if role in seen:
                continue
            seen.add(role)
            path = f"roles/{role}.yaml"
            doc = self._yaml(path, required=False)
            if doc is None:
                raise RenderError(f"render: role {role!r} has no file {path} ({asked})")
            self._keys(doc, _ROLE_KEYS, path)
            role_docs.append((path, doc))

        merged: dict[str, Any] = {}
        for path, doc in role_docs:
            merged.update(self._typed(doc, "vars", dict, path) or {})
        merged.update(fleet_vars)
        for gv in group_vars:
            merged.update(gv)
        merged.update(host_vars)
        merged = _plain(merged)

        if health["window"] > health["timeout"]:
            raise RenderError(f"render: health.window ({health['window']:g}s) is longer than "
                              f"health.timeout ({health['timeout']:g}s): no trial could pass")
        state = DesiredState(self.host, self.tree.commit, [r for r, _ in roles if r in seen],
                             merged, health=health,
                             rollout=rollout.parse(fleet, windowed, self.host, self.labels))
        declared: dict[str, tuple[Resource, str]] = {}
        sources = list(role_docs) + ([(host_file, host_doc)] if host_doc is not None else [])
        for path, doc in sources:
            for res in self._resources(path, doc, merged):
                key = KINDS[res.kind].conflict_key(res)
                if key in declared:
                    other, other_where = declared[key]
                    if other.digest() != res.digest():
                        raise RenderError(
                            f"render: {res.identity} is declared differently in two places: "
                            f"{other_where} and {res.origin}; declare it once, or identically")
                    continue
                declared[key] = (res, res.origin)
                state.resources.append(res)
                if len(state.resources) > self.tree.limits.max_files:
                    raise RenderError(f"render: more than {self.tree.limits.max_files} "
                                      f"resources (limits.max_files) at {res.identity} "
                                      f"({res.origin})")
        state.inputs = {r.identity: self.inputs.get(r.identity, ()) for r in state.resources}
        return state

    def rerender(self, previous: DesiredState, changed: set[str],
                 plain_only: bool = False) -> DesiredState:
        """`previous` (another commit's desired state for this same host, labels, facts
        and identity) with the content of every resource whose inputs are in `changed`
        made again. The caller checked that nothing but files/ changed, so the YAML, and
        with it every declaration, vars, health and rollout, is the same. Raises
        _Incomplete where the shortcut could differ from a full render, and with
        `plain_only` where a content to remake is not a plain copy of a blob (a template
        or a secret runs code or a decryption: that is for the bounded child)."""
        try:
            self.tree.check()
        except TreeError as e:
            raise RenderError(f"render: {e}") from None
        state = DesiredState(self.host, self.tree.commit, list(previous.roles),
                             previous.vars, health=dict(previous.health),
                             rollout=dict(previous.rollout), remade=0)
        for res in previous.resources:
            if res.error:
                raise _Incomplete("a held resource is always rendered again")
            inputs = previous.inputs.get(res.identity, ())
            if not res.content_left_out and not any(p in changed for p in inputs):
                state.resources.append(res)
                state.inputs[res.identity] = inputs
                self._bounded(res.content or b"", res.identity, res.origin)  # the total
                continue
            key = next((k for k in ("source", "template", "secret")
                        if isinstance(res.spec.get(k), str)), None)
            if key is None:
                raise _Incomplete(f"{res.identity} has inputs but no source")
            if plain_only and (key != "source" or res.secrets):
                raise _Incomplete(f"{res.identity} is not a plain copy of a blob")
            path, _, line = res.origin.rpartition(":")
            spec = LineDict(path, int(line) if line.isdigit() else 0)
            spec[key] = res.spec[key]
            if "format" in res.spec:
                spec["format"] = res.spec["format"]
            ident = res.identity
            new = Resource(res.kind, res.name, res.spec, res.origin,
                           self._scoped(spec, key, ident, previous.vars))
            self._mark_secret(new)
            if bool(new.secrets) != bool(res.secrets):
                # a file that starts or stops reading secrets changes its default mode,
                # which only the declaration's parse decides
                raise _Incomplete(f"{ident} started or stopped reading secrets")
            state.resources.append(new)
            state.inputs[ident] = self.inputs[ident]
            state.remade = (state.remade or 0) + 1
        return state

    def _health(self, doc: LineDict, what: str, into: dict[str, float]) -> None:
        spec = self._typed(doc, "health", dict, what)
        if spec is None:
            return
        self._keys(spec, set(HEALTH_DEFAULTS), f"{what} health")
        for key in HEALTH_DEFAULTS:
            if key in spec:
                try:
                    into[key] = parse_duration(spec[key])
                except ValueError as e:
                    raise RenderError(f"render: {what} health.{key}: {e} "
                                      f"({spec.where(key)})") from None
                if key == "interval" and into[key] <= 0:
                    raise RenderError(f"render: {what} health.interval must be more than 0s "
                                      f"({spec.where(key)})")

    def _matches(self, group: LineDict, i: int) -> bool:
        self._keys(group, _GROUP_KEYS, f"fleet.yaml groups[{i}]")
        globs = self._typed(group, "hosts", list, f"groups[{i}]")
        labels = self._typed(group, "labels", dict, f"groups[{i}]")
        if globs is not None and not any(fnmatch.fnmatchcase(self.host, str(g)) for g in globs):
            return False
        return not labels or all(
            self.labels.get(str(k)) == _label(v) for k, v in labels.items())

    # --- resources ---------------------------------------------------------------------

    def _resources(self, path: str, doc: LineDict, variables: dict) -> list[Resource]:
        """Each kind parses its own key of a role or host file (files, packages, ...)."""
        out: list[Resource] = []
        ctx = ParseCtx(path, self._keys,
                       lambda spec, key, ident: self._scoped(spec, key, ident, variables),
                       lambda ident: ident in self._secret_of)
        for key, kind in ROLE_KEYS.items():
            mapping = self._typed(doc, key, dict, path)
            if mapping:
                out.extend(kind.parse_key(mapping, ctx))
        for res in out:
            self._mark_secret(res)
        return out

    def _mark_secret(self, res: Resource) -> None:
        """A resource whose content read secrets: which files, and its fingerprint (or
        why it is held)."""
        ident = res.identity
        if ident in self._secret_of:
            res.secrets = self._secret_of[ident]
            if ident in self._held:
                res.error = self._held[ident]
            elif res.content is not None:
                res.secret = self.secrets.fingerprint(res.content)

    def _scoped(self, spec: LineDict, key: str, ident: str, variables: dict) -> bytes:
        """A content; one whose secret cannot be read here holds that resource only (its
        error goes with it, the rest of the revision renders)."""
        self._used = []
        self._read = []
        try:
            data = self._content(spec, key, ident, variables)
        except SecretError as e:
            self._held[ident] = str(e)
            self._secret_of[ident] = tuple(dict.fromkeys(self._used)) or ("?",)
            return b""
        finally:
            self.inputs[ident] = tuple(dict.fromkeys(self._read + self._used))
        if self._used:
            self._secret_of[ident] = tuple(dict.fromkeys(self._used))
        return data

    def _content(self, spec: LineDict, key: str, ident: str, variables: dict) -> bytes:
        value = spec[key]
        where = spec.where(key)
        if not isinstance(value, str):
            raise RenderError(f"render: {ident}.{key} must be a string ({where})")
        if key == "content":
            return self._bounded(value.encode(), ident, where)
        rel = value
        if rel.startswith("/") or ".." in rel.split("/") or "" in rel.split("/"):
            under = "the repository" if key == "secret" else "files/"
            raise RenderError(f"render: {ident}.{key} {value!r} escapes {under}: it must be a "
                              f"relative path under {under} ({where})")
        if key == "secret":  # a path from the top of the repository: secrets/db.pass.age
            self._used.append(rel)
            fmt = spec.get("format")
            return self._bounded(self.secrets.file(rel, fmt, where), ident, where)
        path = f"files/{rel}"
        self._read.append(path)
        try:
            if key == "source":
                return self._bounded(self.tree.read(path), ident, where)
            if not self.tree.is_file(path):
                raise RenderError(f"render: {ident}.template {path} does not exist ({where})")
        except TreeError as e:
            raise RenderError(f"render: {ident}.{key}: {e} ({where})") from None
        self.progress(f"{ident}, template files/{rel}, {where}")
        return self._bounded(self._template(rel, ident, where, variables).encode(), ident, where)

    def _bounded(self, data: bytes, ident: str, where: str) -> bytes:
        """The limits of the commit's tree hold for rendered content too."""
        limits = self.tree.limits
        if len(data) > limits.max_blob_size:
            raise RenderError(f"render: {ident} renders to {len(data)} bytes, over "
                              f"limits.max_blob_size ({limits.max_blob_size}) ({where})")
        self._total += len(data)
        if self._total > limits.max_total_size:
            raise RenderError(f"render: rendered content exceeds limits.max_total_size "
                              f"({limits.max_total_size} bytes) at {ident} ({where})")
        return data

    def _template(self, rel: str, ident: str, where: str, variables: dict) -> str:
        import jinja2

        if self._env is None:
            from jinja2.sandbox import SandboxedEnvironment

            renderer = self

            class Env(SandboxedEnvironment):
                def _load_template(self, name: Any, globals: Any) -> Any:
                    # every template a render loads, includes and imports too, also when
                    # they come from the environment's cache: the inputs of the resource
                    renderer._read.append(f"files/{name}")
                    return super()._load_template(name, globals)

            cache = self.bytecode_cache
            if callable(cache):  # made on first use: a render that remakes no template
                cache = cache()  # never imports Jinja2
            self._env = Env(
                loader=_TreeLoader(self.tree).make(), undefined=jinja2.StrictUndefined,
                keep_trailing_newline=True, autoescape=False, bytecode_cache=cache)
        context = {**variables, "host": {"name": self.host, "labels": dict(self.labels)},
                   "facts": self.facts.as_dict(), "secrets": _Secrets(self, where)}
        try:
            return self._env.get_template(rel).render(context)
        except SecretError:
            raise
        except jinja2.TemplateSyntaxError as e:
            raise RenderError(f"render: template syntax error in {e.filename or 'files/' + rel}:"
                              f"{e.lineno}: {e.message} (used by {ident} at {where})") from None
        except jinja2.TemplateNotFound as e:
            raise RenderError(f"render: template not found: {e.message} (used by {ident} at "
                              f"{where})") from None
        except jinja2.UndefinedError as e:
            line = _template_line(e, f"files/{rel}")
            # `{}[secrets.db.password]` would quote the value as a missing key
            text = self.secrets.scrub(e.message or "") if self._used else e.message
            raise RenderError(f"render: undefined variable in files/{rel}{line}: {text} "
                              f"(used by {ident} at {where})") from None
        except jinja2.exceptions.SecurityError as e:
            raise RenderError(f"render: unsafe template files/{rel}: {e} (used by {ident} at "
                              f"{where})") from None
        except Exception as e:  # a template may raise anything (a filter on bad data)
            line = _template_line(e, f"files/{rel}")
            # a message about a value may quote it: not when the value may be a secret
            text = (f"{e}" if not self._used else
                    "(message withheld: the template reads secrets)")
            raise RenderError(f"render: template files/{rel}{line} failed: "
                              f"{type(e).__name__}: {text} (used by {ident} at {where})"
                              ) from None


class _Incomplete(AgentError):
    """An incremental render cannot stand for a full one here: render in full."""


class _Secrets:
    """`secrets.NAME.key` in a template: secrets/NAME.yaml.age (or NAME.sops.yaml),
    decrypted when first read; the resource being rendered becomes a secret one."""

    def __init__(self, renderer: Renderer, where: str) -> None:
        self._renderer = renderer
        self._where = where

    def __getitem__(self, name: str) -> Any:
        r = self._renderer
        path = r.secrets.values_path(str(name), self._where)
        r._used.append(path)
        return r.secrets.values(path, self._where)

def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _label(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _template_line(e: BaseException, filename: str) -> str:
    """Jinja rewrites tracebacks so template frames carry the template's name and line."""
    tb = e.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f":{line}" if line else ""


def render(tree: TreeReader, host: str, labels: dict[str, str], facts: Facts,
           bytecode_cache: Any = None, should_stop: Any = None,
           keyring: Keyring | None = None,
           previous: tuple[DesiredState, set[str]] | None = None) -> DesiredState:
    """Render in a forked child bounded by limits.render_timeout and render_memory: a
    template that loops or grows for ever is a one-line RenderError, not a hung agent."""
    if previous is None:  # an incremental render may remake no template at all
        import jinja2.sandbox  # noqa: F401 - imported once here, not in every forked child

    limits = tree.limits
    try:
        tree.check()  # the tree index, bounded by the limits: built once, shared by fork
    except TreeError as e:
        raise RenderError(f"render: {e}") from None
    if previous is not None:
        # a change that remakes only `source:` copies runs no template and reads no
        # secret: each content is one blob, bounded by limits.max_blob_size and the
        # total by max_total_size. No child needed (the fork and the pickled state cost
        # more than the copy); anything else, or any error, goes the bounded way below
        try:
            return Renderer(tree, host, labels, facts, bytecode_cache, lambda _: None,
                            keyring).rerender(*previous, plain_only=True)
        except (_Incomplete, RenderError):
            pass

    def work(progress: Any) -> DesiredState:
        if previous is not None:  # (the last desired state, the paths changed since)
            try:
                return Renderer(tree, host, labels, facts, bytecode_cache, progress,
                                keyring).rerender(*previous)
            except (_Incomplete, RenderError):
                pass  # an error is worded as the full render words it (the key's line)
        return Renderer(tree, host, labels, facts, bytecode_cache, progress,
                        keyring).render()

    try:
        return isolate.run(work, timeout=limits.render_timeout, memory=limits.render_memory,
                           should_stop=should_stop or (lambda: False))
    except isolate.Exhausted as e:
        raise RenderError(f"render: refused commit {tree.commit[:12]}: rendering {e} "
                          f"(limits.render_timeout, limits.render_memory)") from None


def offline(tree: TreeReader, host: str, labels: dict[str, str]) -> DesiredState:
    """A host's desired state rendered away from it (`render --repo`, `secrets`, `fleet
    rollback --dry-run`): neutral facts, every secret a placeholder, still bounded."""
    from .facts import static

    return render(tree, host, labels, static(host))
