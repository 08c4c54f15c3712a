"""package resources: an apt/dpkg backend and a dnf/rpm backend with one contract.

Facts are gathered with one query for all declared packages; every install is one
`apt-get install` and every removal one `apt-get remove` (non-interactive, existing
config files kept, never a prompt). The package index is refreshed only when a
wanted package or version is not in it. Held packages are left alone. A package is
removed only when declared `absent`, never because it disappeared from Git: the agent
cannot know whether something else on the host (another package, a person) needs it,
and removing packages as a side effect of a deleted line is how fleets lose sshd.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import AgentError, RenderError
from ..model import Change, Resource
from .base import Env, Kind, ParseCtx, parse_names

if TYPE_CHECKING:
    from ..host import Host

_PACKAGE_STATES = ("present", "absent", "latest")


@dataclass
class Installed:
    name: str
    version: str
    held: bool = False
    status: str = "i"  # dpkg's second status letter: i installed, F half-configured, ...


APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "APT_LISTCHANGES_FRONTEND": "none",
           "NEEDRESTART_MODE": "l", "LC_ALL": "C.UTF-8",
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
APT_OPTS = ["-y", "-q", "-o", "Dpkg::Options::=--force-confdef", "-o",
            "Dpkg::Options::=--force-confold", "-o", "APT::Get::Assume-Yes=true"]


# a version line of `apt-cache policy`'s table: ` *** 1:9.2p1-2 500` or `     2.10-3 500`
_POLICY_VERSION = re.compile(r"^ (?:\*\*\*| {3}) (\S+) -?\d+$")


class AptBackend:
    name = "apt"

    def query_argv(self, names: list[str]) -> list[str]:
        return ["dpkg-query", "-W", "-f=${Package}\t${Version}\t${db:Status-Abbrev}\n", *names]

    @staticmethod
    def parse_query(out: str) -> dict[str, Installed]:
        """dpkg-query -W lines: `hello\\t2.10-3\\tii \\n`; `hi ` is held and installed;
        `un ` (known but not installed) and `rc ` (config files only) count as absent."""
        found = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) != 3:
                continue
            name, version, abbrev = parts
            name = name.split(":")[0]
            if len(abbrev) >= 2 and abbrev[1] == "i":
                found[name] = Installed(name, version, held=abbrev[0] == "h")
            elif abbrev[:1] == "h":
                found[name] = Installed(name, "", held=True)
            elif len(abbrev) >= 2 and abbrev[1] in "UFHWt":
                # unpacked, half-configured, half-installed, awaiting triggers: on disk but
                # not "installed as declared"; an install run finishes (or retries) it
                found[name] = Installed(name, "", status=abbrev[1])
        return found

    @staticmethod
    def dpkg_reasons(out: str) -> dict[str, str]:
        """dpkg's own reason per package, from an apt-get run's output:

            dpkg: error processing package gitops-broken (--configure):
             installed gitops-broken package post-installation script subprocess returned
             error exit status 1
        """
        reasons = {}
        out = out.replace("\r\n", "\n").replace("\r", "\n")  # apt relays dpkg with CRLF
        for m in re.finditer(r"^dpkg: error processing (?:package|archive) (\S+?)(?::\S+)? "
                             r"\((--\w+)\):\n((?: .*\n?)+)", out, re.M):
            name = os.path.basename(m.group(1)).split("_")[0]
            detail = " ".join(line.strip() for line in m.group(3).splitlines())
            reasons.setdefault(name, f"dpkg {m.group(2)}: {detail}")
        return reasons

    def policy_argv(self, names: list[str]) -> list[str]:
        return ["apt-cache", "policy", *names]

    @staticmethod
    def parse_policy(out: str) -> dict[str, list[str]]:
        """`apt-cache policy` → {name: [candidate, other versions...]}; a package that the
        index does not know is missing from the result."""
        result: dict[str, list[str]] = {}
        current = None
        in_table = False
        for line in out.splitlines():
            if line and not line.startswith(" ") and line.endswith(":"):
                current = line[:-1].split(":")[0]
                result[current] = []
                in_table = False
            elif current and line.strip().startswith("Candidate:"):
                cand = line.split(":", 1)[1].strip()
                if cand != "(none)":
                    result[current].insert(0, cand)
            elif current and line.strip() == "Version table:":
                in_table = True
            elif (current and in_table and (m := _POLICY_VERSION.match(line))
                  and m.group(1) not in result[current]):
                result[current].append(m.group(1))
        return {k: v for k, v in result.items() if v}

    def install_argv(self, specs: list[str]) -> list[str]:
        return ["apt-get", "install", *APT_OPTS, "--no-install-recommends", *specs]

    def remove_argv(self, names: list[str]) -> list[str]:
        return ["apt-get", "remove", *APT_OPTS, *names]

    def update_argv(self) -> list[str]:
        return ["apt-get", "update", "-q"]

    @staticmethod
    def spec(name: str, version: str | None) -> str:
        return f"{name}={version}" if version else name


class DnfBackend:
    """dnf/rpm, same contract. Tested by fixtures only: no rpm system runs here."""

    name = "dnf"

    def query_argv(self, names: list[str]) -> list[str]:
        return ["rpm", "-q", "--qf", "%{NAME}\t%{VERSION}-%{RELEASE}\tii\n", *names]

    @staticmethod
    def parse_query(out: str) -> dict[str, Installed]:
        """`rpm -q --qf` lines: `bash\\t5.2.15-3.fc39\\tii`; a missing package prints
        `package nope is not installed`, which has no tabs and is skipped."""
        found = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 3:
                found[parts[0]] = Installed(parts[0], parts[1])
        return found

    def policy_argv(self, names: list[str]) -> list[str]:
        return ["dnf", "-q", "list", "--available", "--showduplicates", *names]

    @staticmethod
    def parse_policy(out: str) -> dict[str, list[str]]:
        """`dnf list --available` lines: `curl.x86_64   8.2.1-3.fc39   updates`."""
        result: dict[str, list[str]] = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and "." in parts[0]:
                result.setdefault(parts[0].rsplit(".", 1)[0], []).insert(0, parts[1])
        return result

    def install_argv(self, specs: list[str]) -> list[str]:
        return ["dnf", "install", "-y", "-q", "--setopt=install_weak_deps=False", *specs]

    @staticmethod
    def dpkg_reasons(out: str) -> dict[str, str]:
        return {}

    def remove_argv(self, names: list[str]) -> list[str]:
        return ["dnf", "remove", "-y", "-q", *names]

    def update_argv(self) -> list[str]:
        return ["dnf", "makecache", "-q"]

    @staticmethod
    def spec(name: str, version: str | None) -> str:
        return f"{name}-{version}" if version else name


def backend_for(root: str = "/", forced: str | None = None) -> AptBackend | DnfBackend:
    """From os-release: Debian family → apt; Fedora/RHEL family → dnf."""
    if forced:
        return AptBackend() if forced == "apt" else DnfBackend()
    ids = ""
    try:
        with open(os.path.join(root, "etc/os-release")) as f:
            for line in f:
                if line.startswith(("ID=", "ID_LIKE=")):
                    ids += " " + line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    words = set(ids.split())
    if words & {"fedora", "rhel", "centos", "rocky", "almalinux", "amzn"}:
        return DnfBackend()
    return AptBackend()


def version_matches(installed: str, wanted: str | None) -> bool:
    return wanted is None or fnmatch.fnmatchcase(installed, wanted)


def check(res: Resource, installed: dict[str, Installed],
          candidates: dict[str, str] | None = None) -> Change:
    """What would change for one package, from the batched query.

    present: any installed version (or one matching `version:`, a glob) will do.
    latest: the installed version must be the backend's candidate (what `apt-get install`
    would pick now); an older one is upgraded. absent: removed if installed.
    """
    change = Change(res.identity)
    state = res.spec.get("state", "present")
    wanted = res.spec.get("version")
    have = installed.get(res.name)
    if have is not None and have.held:
        change.msg = f"held (apt-mark hold){' at ' + have.version if have.version else ''}: " \
                     f"left as is"
        return change
    candidate = (candidates or {}).get(res.name)
    if (state == "latest" and have is not None and have.version and candidate
            and candidate != have.version):
        change.changed, change.action = True, "install"
        change.msg = f"upgrade {have.version} -> {candidate} (latest)"
        return change
    if state == "absent":
        if have is None or not have.version:
            change.msg = "not installed, as declared"
        else:
            change.changed, change.action, change.msg = True, "remove", f"remove {have.version}"
        return change
    if have is None or not have.version:
        change.changed, change.action = True, "install"
        change.msg = f"install{' ' + wanted if wanted else ''}"
    elif not version_matches(have.version, wanted):
        change.changed, change.action = True, "install"
        change.msg = f"{have.version} -> {wanted}"
    else:
        change.msg = f"installed {have.version}"
    return change


class Packages:
    """Runs the batched operations for one cycle through host.run."""

    def __init__(self, host: Host, backend: AptBackend | DnfBackend) -> None:
        self.host = host
        self.b = backend

    def refuse(self) -> str | None:
        if self.host.root != "/":
            return (f"packages are converged only with root: / (here root is {self.host.root}); "
                    f"run the agent inside the target system (the tests use a booted systemd "
                    f"testbed)")
        return None

    def query(self, names: list[str]) -> dict[str, Installed]:
        if not names:
            return {}
        r = self.host.run(self.b.query_argv(names), env=APT_ENV)
        return self.b.parse_query(r.stdout.decode(errors="replace"))

    def candidates(self, names: list[str]) -> dict[str, str]:
        """The version an install would pick now, per package (for `latest`)."""
        if not names:
            return {}
        r = self.host.run(self.b.policy_argv(names), env=APT_ENV)
        return {k: v[0] for k, v in self.b.parse_policy(r.stdout.decode(errors="replace"))
                .items() if v}

    def apply(self, items: list[tuple[Resource, Change]]) -> list[Change]:
        """Install all that need installing in one call, remove in one call."""
        results = {res.identity: ch for res, ch in items}
        installs = [(r, c) for r, c in items if c.changed and c.action == "install"]
        removes = [(r, c) for r, c in items if c.changed and c.action == "remove"]
        if installs:
            self._ensure_index([r for r, _ in installs])
            self._run_batch(installs, lambda rs: self.b.install_argv(
                [self.b.spec(r.name, r.spec.get("version")) for r in rs]), results)
        if removes:
            self._run_batch(removes, lambda rs: self.b.remove_argv([r.name for r in rs]),
                            results)
        return [results[res.identity] for res, _ in items]

    def _ensure_index(self, wanted: list[Resource]) -> None:
        r = self.host.run(self.b.policy_argv([x.name for x in wanted]), env=APT_ENV)
        known = self.b.parse_policy(r.stdout.decode(errors="replace"))
        missing = [x for x in wanted if not any(
            version_matches(v, x.spec.get("version")) for v in known.get(x.name, []))]
        if missing:
            self.host.run(self.b.update_argv(), env=APT_ENV, timeout=900)

    def _run_batch(self, items: list[tuple[Resource, Change]], argv: Any,
                   results: dict[str, Change]) -> None:
        r = self.host.run(argv([res for res, _ in items]), env=APT_ENV, timeout=1800)
        if r.ok:
            return
        # apt's exit code speaks for the whole run (and for any package left half-
        # configured before it): ask dpkg what each package really is now
        output = (r.stdout + b"\n" + r.stderr).decode(errors="replace")
        reasons = self.b.dpkg_reasons(output)
        now = self.query([res.name for res, _ in items])
        pending = []
        for res, ch in items:
            if _as_declared(res, ch, now.get(res.name)):
                continue  # installed (or removed) as declared: not to blame
            if res.name in reasons:
                results[res.identity] = Change(res.identity, failed=True, action=ch.action,
                                               msg=reasons[res.name])
            else:
                pending.append((res, ch))
        if not pending:
            return
        if len(pending) == 1 or len(items) == 1:
            for res, ch in pending:
                results[res.identity] = Change(res.identity, failed=True, action=ch.action,
                                               msg=f"{self.b.name}: {_apt_error(r.error_text())}")
            return
        # one bad package must not stop the others: retry one by one to attribute errors
        for item in pending:
            self._run_batch([item], argv, results)


def _as_declared(res: Resource, ch: Change, have: Installed | None) -> bool:
    if ch.action == "remove":
        return have is None or not have.version
    return (have is not None and bool(have.version) and have.status == "i"
            and version_matches(have.version, res.spec.get("version")))


def _apt_error(text: str) -> str:
    errors = [line for line in text.splitlines() if line.startswith(("E:", "Error:"))]
    return "; ".join(errors) if errors else text[-2000:]


class PackageKind(Kind):
    """`packages: {nginx: present, curl: {version: "7.88.*"}, vim: latest}`."""

    name = "package"
    role_key = "packages"
    stage = 0
    batch = True

    def parse(self, name: Any, spec: Any, where: str, ctx: ParseCtx) -> Resource:
        if not isinstance(name, str) or not name or name.startswith("-") or " " in name:
            raise RenderError(f"render: package name {name!r} is not valid ({where})")
        norm: dict[str, Any]
        if isinstance(spec, str):
            if spec not in _PACKAGE_STATES:
                raise RenderError(f"render: package[{name}] must be present, absent or latest, "
                                  f"or a mapping with version ({where})")
            norm = {"state": spec}
        elif isinstance(spec, dict):
            ctx.keys(spec, {"state", "version", "notify"}, f"package[{name}]")
            norm = {"state": spec.get("state", "present")}
            if norm["state"] not in _PACKAGE_STATES:
                raise RenderError(f"render: package[{name}].state must be one of "
                                  f"{', '.join(_PACKAGE_STATES)} ({spec.where('state')})")
            if "version" in spec:
                norm["version"] = str(spec["version"])
            if "notify" in spec:
                norm["notify"] = parse_names(spec["notify"], f"package[{name}].notify",
                                             spec.where("notify"))
        else:
            raise RenderError(f"render: package[{name}] must be a state or a mapping ({where})")
        return Resource("package", name, norm, where)

    def _packages(self, env: Env) -> Packages:
        return env.helper("packages", lambda: Packages(
            env.host, backend_for(env.host.root, env.package_backend)))

    def query(self, resources: list[Resource], env: Env) -> Any:
        """One query for all installed versions; one more for candidates, only when
        something asks for `latest`."""
        pkgs = self._packages(env)
        refused = pkgs.refuse()
        if refused:
            return {"refused": refused}
        out: dict[str, Any] = {"installed": {}, "candidates": {}}
        try:
            out["installed"] = pkgs.query([r.name for r in resources])
            latest = [r.name for r in resources if r.spec.get("state") == "latest"]
            if latest:
                out["candidates"] = pkgs.candidates(latest)
        except (AgentError, OSError) as e:
            out["error"] = f"package query failed: {e}"
        return out

    def check(self, res: Resource, observed: Any, env: Env) -> Change:
        observed = observed or {}
        if observed.get("refused") or observed.get("error"):
            return Change(res.identity, failed=True,
                          msg=observed.get("refused") or observed["error"])
        return check(res, observed.get("installed", {}), observed.get("candidates"))

    def apply(self, items: list[tuple[Resource, Change]], env: Env) -> list[Change]:
        todo = [(r, c) for r, c in items if c.changed and not c.failed]
        done = {c.id: c for c in self._packages(env).apply(todo)} if todo else {}
        if any(c.changed and not c.failed for c in done.values()):
            # packages ship unit files and create users: later stages must look again
            env.flags["units_changed"] = True
        return [done.get(r.identity, c) for r, c in items]

    def snapshot(self, ident: str, name: str, env: Env) -> dict[str, Any] | None:
        if self._packages(env).refuse():
            return {"version": None, "unknown": True}
        have = self._packages(env).query([name]).get(name)
        return {"version": have.version if have is not None and have.status == "i"
                and have.version else None}

    def restore(self, records: list[dict[str, Any]], marks: list[dict[str, Any]],
                env: Env) -> list[Change]:
        """Best effort: the journaled versions installed again (when the archive still
        has them) and packages the failed apply installed removed, in one batch each."""
        if not records:
            return []
        pkgs = self._packages(env)
        wanted = [Resource(self.name, r["name"], {"state": "present",
                                                  "version": r["prior"]["version"]}
                           if r["prior"]["version"] else {"state": "absent"}, "journal")
                  for r in records if not r["prior"].get("unknown")]
        try:
            installed = pkgs.query([r.name for r in wanted])
            items = [(r, check(r, installed, None)) for r in wanted]
            done = pkgs.apply(items)
        except (AgentError, OSError) as e:
            done = [Change(r.identity, failed=True, msg=str(e)) for r in wanted]
        for c in done:
            c.action = "rollback"
            if c.failed:
                c.msg = f"could not be restored: {c.msg}"
            elif c.changed:
                env.flags["units_changed"] = True
        return done



KINDS = [PackageKind()]
