"""Issue 14.1: an incremental render (a commit that changed only files/) gives exactly
the desired state a full render gives. Property test over random commit sequences on a
real git repository: static sources, templates with includes and imported macros,
secrets (age), and YAML changes that must fall back to a full render."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import git
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import facts
from agent.config import LimitsConfig
from agent.render import render
from agent.source import open_repo

N_STATIC, N_TPL, N_PART = 4, 4, 3

OPS = st.lists(st.one_of(
    st.tuples(st.just("static"), st.integers(0, N_STATIC - 1), st.integers(0, 9)),
    st.tuples(st.just("tpl"), st.integers(0, N_TPL - 1), st.integers(0, 9)),
    st.tuples(st.just("part"), st.integers(0, N_PART - 1), st.integers(0, 9)),
    st.tuples(st.just("macro"), st.just(0), st.integers(0, 9)),
    st.tuples(st.just("unused"), st.just(0), st.integers(0, 9)),
    st.tuples(st.just("secret-in-tpl"), st.integers(0, N_TPL - 1), st.integers(0, 1)),
    st.tuples(st.just("var"), st.just(0), st.integers(0, 9)),
), min_size=1, max_size=4)


def setup(base: Path) -> tuple[Path, Path]:
    work = base / "work"
    (work / "files/parts").mkdir(parents=True)
    (work / "roles").mkdir()
    (work / "secrets").mkdir()
    key = base / "age.key"
    subprocess.run(["age-keygen", "-o", str(key)], capture_output=True, check=True)
    recipient = subprocess.run(["age-keygen", "-y", str(key)], capture_output=True,
                               text=True, check=True).stdout.strip()
    (work / "secrets/s.yaml.age").write_bytes(subprocess.run(
        ["age", "-r", recipient], input=b"pw: hunter2\n", capture_output=True,
        check=True).stdout)
    (work / "fleet.yaml").write_text("groups:\n  - roles: [app]\n")
    lines = ["vars: {level: 0}\nfiles:\n"]
    for i in range(N_STATIC):
        (work / f"files/s{i}.conf").write_text(f"static {i} v0\n")
        lines.append(f"  /etc/s{i}.conf: {{source: s{i}.conf}}\n")
    for i in range(N_PART):
        (work / f"files/parts/p{i}.j2").write_text(f"part {i} v0\n")
    (work / "files/macros.j2").write_text("{% macro m(x) %}m0({{ x }}){% endmacro %}\n")
    for i in range(N_TPL):
        (work / f"files/t{i}.j2").write_text(_tpl(i, 0, False))
        lines.append(f"  /etc/t{i}.conf: {{template: t{i}.j2}}\n")
    lines.append("  /etc/lit.conf: {content: \"literal\\n\"}\n")
    lines.append("units:\n  app.service: {template: t0.j2}\n")
    (work / "roles/app.yaml").write_text("".join(lines))
    git(base, "init", "-q", "-b", "main", str(work))
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "v0")
    return work, key


def _tpl(i: int, v: int, secret: bool) -> str:
    text = (f"tpl {i} v{v} level {{{{ level }}}}\n"
            f"{{% include 'parts/p{i % N_PART}.j2' %}}"
            "{% import 'macros.j2' as mac %}{{ mac.m(" + str(i) + ") }}\n")
    return text + ("{{ secrets.s.pw }}\n" if secret else "")


def apply_op(work: Path, op: tuple) -> None:
    kind, i, v = op
    if kind == "static":
        (work / f"files/s{i}.conf").write_text(f"static {i} v{v}\n")
    elif kind == "tpl":
        (work / f"files/t{i}.j2").write_text(_tpl(i, v, False))
    elif kind == "part":
        (work / f"files/parts/p{i}.j2").write_text(f"part {i} v{v}\n")
    elif kind == "macro":
        (work / "files/macros.j2").write_text(
            f"{{% macro m(x) %}}m{v}({{{{ x }}}}){{% endmacro %}}\n")
    elif kind == "unused":
        (work / "files/unused.txt").write_text(f"unused v{v}\n")
    elif kind == "secret-in-tpl":
        (work / f"files/t{i}.j2").write_text(_tpl(i, 7, bool(v)))
    elif kind == "var":
        role = work / "roles/app.yaml"
        text = role.read_text()
        role.write_text(text.replace(text.split("\n")[0], f"vars: {{level: {v}}}"))


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(OPS, st.booleans()), min_size=1, max_size=5))
def test_incremental_render_equals_a_full_render(tmp_path_factory, steps):
    """Each step may also hand the last desired state to the next through pack and
    unpack, as one `apply` process hands it to the next (state.save_render): secret
    contents are not kept there and must be made again."""
    from agent.model import DesiredState
    from agent.secrets import Keyring

    base = tmp_path_factory.mktemp("inc")
    work, key = setup(base)
    keyring = Keyring(str(key))
    f = facts.static("web-01")
    repo = open_repo(str(work))
    prev = render(repo.tree(repo.resolve("HEAD"), LimitsConfig()), "web-01", {}, f,
                  keyring=keyring)
    for n, (ops, through_disk) in enumerate(steps):
        if through_disk:
            packed = prev.pack("base", 1 << 20)
            assert packed is not None and b"hunter2" not in packed
            assert DesiredState.unpack(packed, "another base") is None
            prev = DesiredState.unpack(packed, "base")
            assert prev is not None
        for op in ops:
            apply_op(work, op)
        git(work, "add", "-A")
        git(work, "commit", "-q", "--allow-empty", "-m", f"step {n}")
        repo = open_repo(str(work))
        commit = repo.resolve("HEAD")
        tree = repo.tree(commit, LimitsConfig())
        full = render(tree, "web-01", {}, f, keyring=keyring)
        changed = repo.changed_paths(prev.commit, commit)
        assert changed is not None
        previous = (prev, changed) if all(p.startswith("files/") for p in changed) else None
        inc = render(tree, "web-01", {}, f, keyring=keyring, previous=previous)
        assert full.remade is None
        was = {r.identity: bool(r.secrets) for r in prev.resources}
        flips = any(was.get(r.identity) != bool(r.secrets) for r in full.resources)
        if previous is not None and not flips:
            # the shortcut was taken, and remade no more than what read a changed path
            assert inc.remade is not None, ops
            assert inc.remade == sum(1 for r in full.resources
                                     if set(full.inputs[r.identity]) & changed
                                     or (through_disk and r.secrets)), ops
        assert inc.to_json() == full.to_json(), (ops, changed)
        assert inc.inputs == full.inputs
        assert [r.digest() for r in inc.resources] == [r.digest() for r in full.resources]
        prev = inc
    # the inputs of a template name its includes and imports
    assert {"files/t1.j2", "files/parts/p1.j2", "files/macros.j2"} <= set(
        prev.inputs["file[/etc/t1.conf]"])


def test_only_a_commit_that_remakes_plain_copies_renders_without_the_bounded_child(
        tmp_path, monkeypatch):
    """A `source:` copy runs no template and reads no secret: remade in the agent's own
    process. A template to remake still goes to the forked, bounded child."""
    from agent import isolate

    work, _key = setup(tmp_path)
    f = facts.static("web-01")
    repo = open_repo(str(work))
    prev = render(repo.tree(repo.resolve("HEAD"), LimitsConfig()), "web-01", {}, f)
    forks = []
    real_run = isolate.run
    monkeypatch.setattr(isolate, "run", lambda *a, **k: forks.append(1) or real_run(*a, **k))

    def step(op: tuple) -> object:
        apply_op(work, op)
        git(work, "commit", "-qam", str(op))
        r = open_repo(str(work))
        commit = r.resolve("HEAD")
        tree = r.tree(commit, LimitsConfig())
        inc = render(tree, "web-01", {}, f, previous=(prev, r.changed_paths(prev.commit,
                                                                             commit)))
        assert inc.to_json() == render(tree, "web-01", {}, f).to_json()
        return inc

    forks.clear()
    prev = step(("static", 1, 5))
    assert prev.remade == 1 and forks == [1]  # the one fork is the full render compared
    forks.clear()
    prev = step(("tpl", 2, 5))
    assert prev.remade == 1 and forks == [1, 1]


def test_the_daemon_renders_a_files_only_commit_incrementally_and_says_so(tmp_path, caplog):
    """In one process (the daemon runs cycles so), a commit that changed one static file
    remakes one content; the host ends exactly as after a full render."""
    import logging

    from conftest import Fleet, write_config

    from agent.config import load_file
    from agent.cycle import _LAST_RENDER, run_cycle

    fleet = Fleet(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    cfg = load_file(str(write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                                     state_dir=tmp_path / "state")))
    _LAST_RENDER.clear()
    assert run_cycle(cfg)[0].state == "converged"
    fleet.commit("motd", files={"files/motd.j2": "changed {{ host.name }}\n"}, push=True)
    with caplog.at_level(logging.INFO, logger="agent.cycle"):
        result, _ = run_cycle(cfg)
    assert result.state == "converged", result.errors
    assert (root / "etc/motd").read_text() == "changed web-01\n"
    assert any("render: incremental, 1 of" in r.getMessage() for r in caplog.records)
    _LAST_RENDER.clear()


def _apply_v(cfg: Path) -> str:
    from conftest import agent

    p = agent("apply", "--config", str(cfg), "-v", check=0)
    return p.stdout + p.stderr


def test_apply_processes_hand_the_render_on_through_the_state_dir(tmp_path):
    """`gitops-agent apply` is one process per cycle: it keeps its render (state_dir
    render.cache, 0600) and the next process renders a files/-only commit from it."""
    import stat

    from conftest import Fleet, snapshot, write_config

    fleet = Fleet(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state")
    assert "incremental" not in _apply_v(cfg)
    cache = tmp_path / "state/render.cache"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    fleet.commit("motd", files={"files/motd.j2": "changed {{ host.name }}\n"}, push=True)
    out = _apply_v(cfg)
    assert "render: incremental, 1 of" in out, out
    assert (root / "etc/motd").read_text() == "changed web-01\n"
    # the host is exactly what a fresh agent (a full render) makes of this commit
    root2 = tmp_path / "root2"
    root2.mkdir()
    cfg2 = write_config(tmp_path / "agent2.yaml", url=fleet.bare, root=root2,
                        state_dir=tmp_path / "state2")
    assert "incremental" not in _apply_v(cfg2)
    def same(r: Path) -> dict:  # mode, owner, content; not mtimes
        return {k: (*v[:3], v[4]) for k, v in snapshot(r).items()}

    assert same(root) == same(root2)
    # a change outside files/ (vars, declarations) renders in full
    role = fleet.work / "roles/base.yaml"
    fleet.commit("vars", files={"roles/base.yaml": role.read_text() + "\n"}, push=True)
    assert "incremental" not in _apply_v(cfg)


def test_a_damaged_or_foreign_render_cache_means_a_full_render(tmp_path):
    from conftest import Fleet, write_config

    fleet = Fleet(tmp_path)
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state")
    _apply_v(cfg)
    cache = tmp_path / "state/render.cache"
    good = cache.read_bytes()
    head, _, body = good.partition(b"\n")
    rows = body.split(b"\n")
    assert b'"n":' in head and len(rows) > 2
    for n, damaged in enumerate([
        b"",  # empty
        good[:len(good) // 2],  # cut short
        head + b"\n" + body[:-1] + bytes([body[-1] ^ 1]),  # a flipped bit in a content
        head + b"\n" + body.replace(rows[0], rows[0].replace(b'"file"', b'"fil"'), 1),
        b"{not json\n",
        head.replace(b'"v":2', b'"v":1') + b"\n" + body,  # another format
        head.replace(b'"n":', b'"n":1') + b"\n" + body,  # another count of resources
    ]):
        cache.write_bytes(damaged)
        fleet.commit(f"motd {n}", files={"files/motd.j2": f"v{n} {{{{ host.name }}}}\n"},
                     push=True)
        out = _apply_v(cfg)
        assert "incremental" not in out and "Traceback" not in out, (n, out)
        assert (root / "etc/motd").read_text() == f"v{n} web-01\n"
        assert cache.read_bytes() != damaged  # kept again, whole
    # another host name (the same state_dir given to another identity) is another base
    cfg2 = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                        state_dir=tmp_path / "state", host={"name": "web-02"})
    fleet.commit("motd again", files={"files/motd.j2": "again {{ host.name }}\n"},
                 push=True)
    out = _apply_v(cfg2)
    assert "incremental" not in out
    assert (root / "etc/motd").read_text() == "again web-02\n"


def test_pack_keeps_only_what_unpack_gives_back_exactly():
    from agent.model import DesiredState, Resource

    def state(spec: dict, content: bytes | None = b"x\n", **kw: object) -> DesiredState:
        s = DesiredState("web-01", "c" * 40, ["app"], {"v": 1})
        s.resources.append(Resource("file", "/etc/x", spec, "roles/app.yaml:3", content,
                                    **kw))
        s.inputs["file[/etc/x]"] = ("files/x",)
        return s

    good = state({"state": "present", "notify": ["a.service"]})
    back = DesiredState.unpack(good.pack("b", 100), "b")
    assert back is not None and back.to_json() == good.to_json()
    assert back.inputs == good.inputs and back.resources[0].digest() == \
        good.resources[0].digest()
    assert back.pack("b", 100) == good.pack("b", 100)  # packed again, the same bytes
    assert state({"notify": ("a.service",)}).pack("b", 100) is None  # a tuple
    assert state({1: "x"}).pack("b", 100) is None  # a key JSON makes a string
    assert state({}, error="not for this host").pack("b", 100) is None  # held
    assert state({}, b"x" * 101).pack("b", 100) is None  # over the bound
    secret = state({}, b"pw\n", secret="hmac-sha256:ab", secrets=("secrets/x.age",))
    packed = secret.pack("b", 100)
    assert packed is not None and b"pw" not in packed
    back = DesiredState.unpack(packed, "b")
    assert back is not None and back.resources[0].content is None
    assert back.resources[0].secrets == ("secrets/x.age",)
