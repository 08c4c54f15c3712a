"""Shared fixtures: real git repositories, real ssh-keygen keys, real agent runs."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "fleet"
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent", "GIT_AUTHOR_NAME": "Ops",
    "GIT_AUTHOR_EMAIL": "ops@example.com", "GIT_COMMITTER_NAME": "Ops",
    "GIT_COMMITTER_EMAIL": "ops@example.com", "PATH": os.environ["PATH"],
}


def git(cwd: Path | str, *args: str, env: dict | None = None, check: bool = True
        ) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, env={**GIT_ENV, **(env or {})},
                          capture_output=True, text=True, check=check)


def ssh_key(path: Path, kind: str = "ed25519", bits: int | None = None) -> Path:
    args = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"{kind}@test", "-f", str(path)]
    if bits:
        args += ["-b", str(bits)]
    subprocess.run(args, check=True)
    return path


def allowed_line(principal: str, pub: Path, options: str = "") -> str:
    key = " ".join(pub.read_text().split()[:2])
    return f"{principal} {options + ' ' if options else ''}{key}\n"


class Fleet:
    """A fleet repo: a work tree to edit and commit in, and a bare repo the agent pulls."""

    def __init__(self, base: Path, files: dict[str, str] | None = None,
                 key: Path | None = None) -> None:
        self.work = base / "work"
        self.bare = base / "fleet.git"
        self.key = key
        git(base, "init", "-q", "-b", "main", str(self.work))
        if files is None:
            shutil.copytree(EXAMPLES, self.work, dirs_exist_ok=True)
        else:
            self.write(files)
        self.commit("initial")
        git(base, "clone", "-q", "--bare", str(self.work), str(self.bare))
        git(self.work, "remote", "add", "origin", str(self.bare))

    def write(self, files: dict[str, str | None]) -> None:
        for rel, text in files.items():
            p = self.work / rel
            if text is None:
                p.unlink()
                continue
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)

    def commit(self, msg: str = "change", files: dict[str, str | None] | None = None,
               sign: bool | Path = True, push: bool = False, env: dict | None = None) -> str:
        if files:
            self.write(files)
        git(self.work, "add", "-A")
        key = sign if isinstance(sign, Path) else self.key
        args = ["commit", "-q", "--allow-empty", "-m", msg]
        cfg = []
        if sign and key is not None:
            cfg = ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}"]
            args.insert(1, "-S")
        git(self.work, *cfg, *args, env=env)
        if push:
            self.push()
        return self.head()

    def push(self, force: bool = False) -> None:
        git(self.work, "push", "-q", *(["-f"] if force else []), "origin", "HEAD:main")

    def head(self) -> str:
        return git(self.work, "rev-parse", "HEAD").stdout.strip()


def write_config(path: Path, **over: object) -> Path:
    import yaml

    cfg: dict = {"source": {"url": str(over.pop("url")), "branch": "main"},
                 "host": {"name": "web-01", "labels": {"env": "prod"}},
                 "trust": {"unsigned": "allow"},
                 "root": str(over.pop("root")), "state_dir": str(over.pop("state_dir")),
                 "socket": str(path.parent / "agent.sock")}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    path.write_text(yaml.safe_dump(cfg))
    return path


def agent(*args: str, check: int | None = None, env: dict | None = None
          ) -> subprocess.CompletedProcess:
    """Run the real CLI as a user would, in a subprocess."""
    p = subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True,
                       text=True, cwd=REPO, env={**os.environ, **(env or {})})
    assert "Traceback" not in p.stderr, p.stderr
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


def refused_with_fleet_head(env: dict, head: str) -> subprocess.CompletedProcess:
    """Put `head` at the top of fleet.yaml, push it, and apply: the cycle must fail."""
    fleet: Fleet = env["fleet"]
    fleet.commit(files={"fleet.yaml": head + (fleet.work / "fleet.yaml").read_text()},
                 push=True)
    return agent("apply", "--config", str(env["cfg"]), check=1)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, mode, owner, mtime and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = ""
            if os.path.isfile(p) and not os.path.islink(p):
                digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            elif os.path.islink(p):
                digest = os.readlink(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                                             digest)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(proc: subprocess.Popen, port: int, what: str, timeout: float = 10) -> None:
    """Wait until a server we started accepts on 127.0.0.1:port, or say why not."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"{what} exited: {err}") from None
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


def stop_server(server: GitDaemon | Sshd) -> None:
    if server.proc:
        server.proc.terminate()
        server.proc.wait(10)
        server.proc = None


class GitDaemon:
    """A real `git daemon` on 127.0.0.1 serving one base path."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["git", "daemon", "--reuseaddr", "--export-all", "--listen=127.0.0.1",
             f"--port={self.port}", f"--base-path={self.base}", str(self.base)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_listening(self.proc, self.port, "git daemon")

    def stop(self) -> None:
        stop_server(self)

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A plain repository with one unsigned commit, for trust verdicts."""
    r = tmp_path / "repo"
    git(tmp_path, "init", "-q", "-b", "main", str(r))
    (r / "f").write_text("x\n")
    git(r, "add", "-A")
    git(r, "commit", "-q", "-m", "base")
    return r


@pytest.fixture
def ed(tmp_path: Path) -> tuple[Path, Path]:
    """An ed25519 signing key and an allowed_signers file that trusts it."""
    key = ssh_key(tmp_path / "ed")
    allowed = tmp_path / "allowed"
    allowed.write_text(allowed_line("ops@example.com", key.with_suffix(".pub")))
    return key, allowed


@pytest.fixture
def signing_key(tmp_path: Path) -> Path:
    return ssh_key(tmp_path / "signing_key")


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


@pytest.fixture
def env(tmp_path: Path, fleet: Fleet) -> dict:
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state")
    return {"root": root, "cfg": cfg, "state": tmp_path / "state", "fleet": fleet,
            "tmp": tmp_path}


class Sshd:
    """A real OpenSSH sshd on 127.0.0.1 with its own config, host key and authorized keys
    in a temp dir; it serves git-upload-pack (ssh:// fetch) and SFTP (report drop)."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "sshd"
        self.dir.mkdir()
        self.port = free_port()
        self.host_key = ssh_key(self.dir / "host_key")
        self.client_key = ssh_key(self.dir / "client_key")
        (self.dir / "authorized_keys").write_text(
            (self.dir / "client_key.pub").read_text())
        self.known_hosts = self.dir / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} "
                                    + " ".join((self.dir / "host_key.pub").read_text()
                                               .split()[:2]) + "\n")
        (self.dir / "sshd_config").write_text(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.host_key}
PidFile {self.dir}/sshd.pid
AuthorizedKeysFile {self.dir}/authorized_keys
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
Subsystem sftp internal-sftp
LogLevel ERROR
""")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # sshd insists on its privilege-separation directory; the package makes it at boot
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f",
                                      str(self.dir / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_listening(self.proc, self.port, "sshd")

    def stop(self) -> None:
        stop_server(self)


@pytest.fixture
def sshd(tmp_path: Path):
    """A started Sshd, stopped after the test."""
    s = Sshd(tmp_path)
    s.start()
    yield s
    s.stop()


def signed_env_for(tmp_path: Path, signers: dict[str, Path], key: Path) -> dict:
    """A fleet whose commits `key` signs, an allowed_signers trusting `signers`
    (principal → private key), and an agent.yaml that refuses unsigned commits."""
    allowed = tmp_path / "allowed_signers"
    allowed.write_text("".join(allowed_line(p, k.with_suffix(".pub"))
                               for p, k in signers.items()))
    fleet = Fleet(tmp_path, key=key)
    root = tmp_path / "root"
    root.mkdir()
    cfg = write_config(tmp_path / "agent.yaml", url=fleet.bare, root=root,
                       state_dir=tmp_path / "state",
                       trust={"unsigned": "refuse", "allowed_signers": str(allowed)})
    return {"fleet": fleet, "cfg": cfg, "root": root, "tmp": tmp_path, "key": key,
            "state": tmp_path / "state", "allowed": allowed}
