"""Table-driven fixtures per resource kind (pyinfra style): spec + observed state in,
expected argv and Change out, each kind with a no-op case proving idempotency; and the
parsers against output captured from real dpkg-query, apt-cache and systemctl."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.host import Result
from agent.model import Resource
from agent.resources import packages as pk
from agent.resources import systemd as sd

FIX = Path(__file__).parent / "fixtures"


class RecordingHost:
    """Stands in for agent.host.Host in fixture tables only: it records argv and answers
    with canned output, so each table row states exactly which commands a spec causes.
    The real commands run in the testbed tests (test_packages_systemd_e2e.py)."""

    def __init__(self, root: str = "/", answers: dict[str, tuple[int, str]] | None = None):
        self.root = root
        self.calls: list[list[str]] = []
        self.answers = answers or {}

    def run(self, argv: list[str], **_: object) -> Result:
        self.calls.append(argv)
        for needle, (code, out) in self.answers.items():  # first match, in table order
            if needle in " ".join(argv):
                return Result(argv, code, out.encode(), out.encode() if code else b"")
        return Result(argv, 0, b"", b"")


# --- parsers against real output ---------------------------------------------------------

def test_parse_dpkg_query_real_output():
    found = pk.AptBackend.parse_query((FIX / "dpkg-query.txt").read_text())
    assert found["bash"].version == "5.2.15-2+b8" and not found["bash"].held
    assert set(found) == {"bash", "coreutils", "libc6"}  # nosuchpkg-xyz is not listed


def test_parse_dpkg_query_held_and_config_only():
    # hand-written lines in the same format for states this machine does not have
    out = "vim\t2:9.0.1378-2\thi \nold\t1.0-1\trc \nnew\t\tun \n"
    found = pk.AptBackend.parse_query(out)
    assert found["vim"].held and found["vim"].version == "2:9.0.1378-2"
    assert "old" not in found and "new" not in found


def test_parse_apt_cache_policy_real_output():
    pol = pk.AptBackend.parse_policy((FIX / "apt-cache-policy.txt").read_text())
    assert pol["bash"] == ["5.2.15-2+b13", "5.2.15-2+b8"]
    assert pol["openssh-server"][0] == "1:9.2p1-2+deb12u10"
    assert "1:9.2p1-2+deb12u7" in pol["openssh-server"]
    assert "nosuchpkg-xyz" not in pol


def test_parse_systemctl_show_real_output():
    st = sd.parse_show((FIX / "systemctl-show.txt").read_text())
    assert st["getty@tty1.service"].enabled and st["getty@tty1.service"].running
    assert st["getty@tty1.service"].main_pid == 54
    assert st["nosuch.service"].load == "not-found" and not st["nosuch.service"].enabled
    masked = sd.parse_show((FIX / "systemctl-show-masked.txt").read_text())
    assert masked["e2scrub_reap.service"].masked


def test_parse_rpm_and_dnf_fixtures():
    rpm = "bash\t5.2.15-3.fc39\tii\npackage nope is not installed\n"
    assert pk.DnfBackend.parse_query(rpm)["bash"].version == "5.2.15-3.fc39"
    assert "nope" not in pk.DnfBackend.parse_query(rpm)
    dnf = "Available Packages\ncurl.x86_64   8.2.1-3.fc39   updates\n" \
          "curl.x86_64   8.2.1-2.fc39   fedora\n"
    assert pk.DnfBackend.parse_policy(dnf)["curl"] == ["8.2.1-2.fc39", "8.2.1-3.fc39"]


# --- packages ---------------------------------------------------------------------------

def pkg(name: str, spec) -> Resource:
    norm = {"state": spec} if isinstance(spec, str) else {"state": "present", **spec}
    return Resource("package", name, norm, "roles/x.yaml:1")


INSTALLED = "nginx\t1.22.1-9\tii \ntelnet\t0.17+2.4-2\tii \nvim\t2:9.0\thi \n"
POLICY = "curl:\n  Installed: (none)\n  Candidate: 7.88.1-10\n  Version table:\n" \
         "     7.88.1-10 500\n        500 http://deb.debian.org/debian bookworm/main\n"
APT = ["-y", "-q", "-o", "Dpkg::Options::=--force-confdef", "-o",
       "Dpkg::Options::=--force-confold", "-o", "APT::Get::Assume-Yes=true"]

# (name, resources, expected changes {id: (changed, action)}, expected argv after the query)
PACKAGE_CASES = [
    ("no-op", [pkg("nginx", "present"), pkg("telnet", {"version": "0.17*"})],
     {"package[nginx]": (False, "none"), "package[telnet]": (False, "none")}, []),
    ("install one, in the index", [pkg("curl", {"version": "7.88.*"}), pkg("nginx", "present")],
     {"package[curl]": (True, "install"), "package[nginx]": (False, "none")},
     [["apt-cache", "policy", "curl"],
      ["apt-get", "install", *APT, "--no-install-recommends", "curl=7.88.*"]]),
    ("install missing from the index refreshes it first", [pkg("htop", "present")],
     {"package[htop]": (True, "install")},
     [["apt-cache", "policy", "htop"], ["apt-get", "update", "-q"],
      ["apt-get", "install", *APT, "--no-install-recommends", "htop"]]),
    ("absent removes in one call", [pkg("telnet", "absent"), pkg("nginx", "absent"),
                                    pkg("gone", "absent")],
     {"package[telnet]": (True, "remove"), "package[nginx]": (True, "remove"),
      "package[gone]": (False, "none")},
     [["apt-get", "remove", *APT, "telnet", "nginx"]]),
    ("held package is left alone", [pkg("vim", "absent")], {"package[vim]": (False, "none")},
     []),
]


@pytest.mark.parametrize("name,resources,expected,argv", PACKAGE_CASES,
                         ids=[c[0] for c in PACKAGE_CASES])
def test_package_table(name, resources, expected, argv):
    host = RecordingHost(answers={"dpkg-query": (0, INSTALLED), "apt-cache policy": (0, POLICY)})
    p = pk.Packages(host, pk.AptBackend())  # type: ignore[arg-type]
    installed = p.query([r.name for r in resources])
    assert host.calls == [["dpkg-query", "-W", "-f=${Package}\t${Version}\t${db:Status-Abbrev}\n",
                           *[r.name for r in resources]]]
    planned = [(r, pk.check(r, installed)) for r in resources]
    assert {c.id: (c.changed, c.action) for _, c in planned} == expected
    host.calls.clear()
    done = p.apply(planned)
    assert host.calls == argv
    assert not any(c.failed for c in done)


def test_package_failure_is_attributed_with_apts_message():
    err = "E: Unable to locate package nosuch"
    host = RecordingHost(answers={"apt-cache policy": (0, POLICY), "nosuch": (100, err)})
    p = pk.Packages(host, pk.AptBackend())  # type: ignore[arg-type]
    items = [(r, pk.check(r, {})) for r in (pkg("curl", "present"), pkg("nosuch", "present"))]
    done = {c.id: c for c in p.apply(items)}
    assert done["package[nosuch]"].failed and err in done["package[nosuch]"].msg
    assert not done["package[curl]"].failed
    installs = [c for c in host.calls if c[:2] == ["apt-get", "install"]]
    assert [c[-1] for c in installs] == ["nosuch", "curl", "nosuch"]  # batch, then one by one


def test_dnf_argv():
    b = pk.DnfBackend()
    assert b.install_argv([b.spec("curl", "8.2.1*")]) == [
        "dnf", "install", "-y", "-q", "--setopt=install_weak_deps=False", "curl-8.2.1*"]
    assert b.remove_argv(["telnet"]) == ["dnf", "remove", "-y", "-q", "telnet"]


def test_backend_from_os_release(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text('ID=rocky\nID_LIKE="rhel centos fedora"\n')
    assert pk.backend_for(str(tmp_path)).name == "dnf"
    (tmp_path / "etc/os-release").write_text("ID=debian\n")
    assert pk.backend_for(str(tmp_path)).name == "apt"
    assert pk.backend_for(str(tmp_path), "dnf").name == "dnf"


def test_packages_refused_under_a_sandbox_root():
    p = pk.Packages(RecordingHost(root="/tmp/sandbox"), pk.AptBackend())  # type: ignore
    assert "root: /" in (p.refuse() or "")


# --- services ---------------------------------------------------------------------------

def svc(name: str, **spec) -> Resource:
    return Resource("service", name, spec, "roles/x.yaml:1")


def state(unit_file: str = "enabled", active: str = "active", load: str = "loaded"):
    return sd.ServiceState("x.service", load, active, unit_file, 1)


SERVICE_CASES = [
    ("no-op", svc("x.service", enabled=True, active=True), state(), []),
    ("enable and start", svc("x.service", enabled=True, active=True),
     state("disabled", "inactive"), [["systemctl", "enable", "x.service"],
                                      ["systemctl", "start", "x.service"]]),
    ("stop and disable", svc("x.service", enabled=False, active=False), state(),
     [["systemctl", "disable", "x.service"], ["systemctl", "stop", "x.service"]]),
    ("mask", svc("x.service", masked=True, active=False), state(),
     [["systemctl", "mask", "x.service"], ["systemctl", "stop", "x.service"]]),
    ("unmask then enable", svc("x.service", masked=False, enabled=True),
     state("masked", "inactive", "masked"),
     [["systemctl", "unmask", "x.service"], ["systemctl", "enable", "x.service"]]),
    ("static unit is not disabled", svc("x.service", enabled=False), state("static"), []),
]


@pytest.mark.parametrize("name,res,observed,argv", SERVICE_CASES,
                         ids=[c[0] for c in SERVICE_CASES])
def test_service_table(name, res, observed, argv):
    host = RecordingHost()
    s = sd.Systemd(host)  # type: ignore[arg-type]
    planned = s.check_service(res, observed)
    assert planned.changed == bool(argv) and not planned.failed
    if argv:
        done = s.apply_service(res, planned)
        assert done.changed and not done.failed
    assert host.calls == argv


def test_sandbox_enables_with_root_and_refuses_runtime_ops():
    host = RecordingHost(root="/srv/image")
    s = sd.Systemd(host)  # type: ignore[arg-type]
    planned = s.check_service(svc("x.service", enabled=True), state("disabled", "inactive"))
    s.apply_service(svc("x.service", enabled=True), planned)
    assert host.calls[-1] == ["systemctl", "--root", "/srv/image", "enable", "x.service"]
    refused = s.check_service(svc("x.service", active=True), state("enabled", "inactive"))
    assert refused.failed and "need a running systemd" in refused.msg


def test_systemctl_failure_message_is_kept():
    host = RecordingHost(answers={"systemctl start": (5, "Unit x.service not found.")})
    s = sd.Systemd(host)  # type: ignore[arg-type]
    res = svc("x.service", active=True)
    done = s.apply_service(res, s.check_service(res, state("enabled", "inactive")))
    assert done.failed and "Unit x.service not found." in done.msg


@pytest.mark.parametrize("reload,verb", [(False, "restart"), (True, "reload")])
def test_notify_restarts_or_reloads(reload, verb):
    host = RecordingHost()
    change = sd.Systemd(host).notify("nginx.service", reload)  # type: ignore[arg-type]
    assert host.calls == [["systemctl", verb, "nginx.service"]]
    assert change.changed and change.action == verb


# --- issue 16: latest, dpkg's own attribution ----------------------------------------------

POLICY_NEWER = ("gitops-up:\n  Installed: 1.0\n  Candidate: 2.0\n  Version table:\n"
                "     2.0 500\n        500 file:/srv/repo ./ Packages\n"
                " *** 1.0 100\n        100 /var/lib/dpkg/status\n")


@pytest.mark.parametrize("installed, candidates, expected", [
    ({"gitops-up": pk.Installed("gitops-up", "1.0")}, {"gitops-up": "2.0"},
     (True, "install", "upgrade 1.0 -> 2.0 (latest)")),
    ({"gitops-up": pk.Installed("gitops-up", "2.0")}, {"gitops-up": "2.0"},
     (False, "none", "installed 2.0")),  # the no-op row
    ({"gitops-up": pk.Installed("gitops-up", "1.0", held=True)}, {"gitops-up": "2.0"},
     (False, "none", "held (apt-mark hold) at 1.0: left as is")),
    ({}, {"gitops-up": "2.0"}, (True, "install", "install")),
])
def test_latest_means_the_candidate(installed, candidates, expected):
    c = pk.check(pkg("gitops-up", "latest"), installed, candidates)
    assert (c.changed, c.action, c.msg) == expected


def test_candidates_from_apt_cache_policy():
    host = RecordingHost(answers={"apt-cache policy": (0, POLICY_NEWER)})
    assert pk.Packages(host, pk.AptBackend()).candidates(["gitops-up"]) == {  # type: ignore
        "gitops-up": "2.0"}


APT_POSTINST_FAILURE = """Setting up gitops-fine (1.0) ...
Setting up gitops-broken (1.0) ...
dpkg: error processing package gitops-broken (--configure):
 installed gitops-broken package post-installation script subprocess returned error exit status 1
Errors were encountered while processing:
 gitops-broken
E: Sub-process /usr/bin/dpkg returned an error code (1)
"""


@pytest.mark.parametrize("newline", ["\n", "\r\n"])  # apt relays dpkg's lines with CRLF
def test_dpkg_reasons_parser(newline):
    assert pk.AptBackend.dpkg_reasons(APT_POSTINST_FAILURE.replace("\n", newline)) == {
        "gitops-broken": "dpkg --configure: installed gitops-broken package post-installation "
                         "script subprocess returned error exit status 1"}


class SequenceHost(RecordingHost):
    """RecordingHost whose dpkg-query answers change from call to call (before and after
    the install), as dpkg's database does."""

    def __init__(self, queries: list[str], **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.queries = queries

    def run(self, argv: list[str], **kw: object) -> Result:
        if argv[0] == "dpkg-query":
            self.calls.append(argv)
            out = self.queries.pop(0)
            return Result(argv, 0, out.encode(), b"")
        return super().run(argv, **kw)


def test_a_failing_postinst_is_blamed_alone_with_dpkgs_reason():
    host = SequenceHost(
        ["", "gitops-fine\t1.0\tii \ngitops-broken\t1.0\tiF \n"],
        answers={"apt-cache policy": (0, "gitops-fine:\n  Candidate: 1.0\n"
                                         "gitops-broken:\n  Candidate: 1.0\n"),
                 "apt-get install": (100, APT_POSTINST_FAILURE)})
    p = pk.Packages(host, pk.AptBackend())  # type: ignore[arg-type]
    res = [pkg("gitops-fine", "present"), pkg("gitops-broken", "present")]
    installed = p.query([r.name for r in res])
    done = {c.id: c for c in p.apply([(r, pk.check(r, installed)) for r in res])}
    assert not done["package[gitops-fine]"].failed and done["package[gitops-fine]"].changed
    assert done["package[gitops-broken]"].failed
    assert "post-installation script subprocess returned error exit status 1" in \
        done["package[gitops-broken]"].msg
    installs = [c for c in host.calls if c[:2] == ["apt-get", "install"]]
    assert len(installs) == 1  # dpkg said who failed: no blind one-by-one retries
