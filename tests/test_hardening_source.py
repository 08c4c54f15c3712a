"""Issue 9, the source: a server that drips one byte at a time, a mirror damaged on
disk (truncated pack, garbage HEAD, a file where the directory should be)."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO, Fleet, GitDaemon, agent, write_config


class DripServer:
    """A TCP server on 127.0.0.1 that accepts git:// connections and answers with one
    byte every `every` seconds, for ever: never silent long enough for a read timeout."""

    def __init__(self, every: float = 1.0) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.every = every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            while not self.stop.wait(self.every):
                try:
                    conn.send(b"0")
                except OSError:
                    return

    def __enter__(self) -> DripServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def test_a_slow_drip_server_is_cut_off_by_the_fetch_deadline(tmp_path, env):
    root, state = env["root"], env["state"]
    agent("apply", "--config", str(env["cfg"]), check=0)
    (root / "etc/motd").unlink()
    with DripServer() as drip:
        cfg = write_config(tmp_path / "drip.yaml", url=f"git://127.0.0.1:{drip.port}/fleet.git",
                           root=root, state_dir=state,
                           source={"timeout": "30s", "fetch_deadline": "3s"})
        p = subprocess.run([sys.executable, "-m", "agent.cli", "apply", "--config", str(cfg),
                            "--json"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["state"] == "offline" and "source.fetch_deadline" in out["offline_reason"]
    assert (root / "etc/motd").exists()  # offline: last good converged again


@pytest.fixture
def served(tmp_path: Path):
    fleet = Fleet(tmp_path)
    daemon = GitDaemon(tmp_path)
    daemon.start()
    root = tmp_path / "root"
    root.mkdir()
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "agent.yaml", url=daemon.url("fleet.git"), root=root,
                       state_dir=state)
    agent("apply", "--config", str(cfg), check=0)
    yield {"fleet": fleet, "root": root, "state": state, "cfg": cfg}
    daemon.stop()


def _heals(env: dict) -> dict:
    (env["root"] / "etc/motd").unlink()
    out = json.loads(agent("apply", "--config", str(env["cfg"]), "--json", check=0).stdout)
    assert out["state"] == "converged"
    assert any("moved aside" in w for w in out["warnings"])
    assert (env["root"] / "etc/motd").exists()
    again = json.loads(agent("apply", "--config", str(env["cfg"]), "--json", check=0).stdout)
    assert not any("moved aside" in w for w in again["warnings"])
    return out


def test_a_truncated_pack_is_healed_by_fetching_again(served):
    for pack in glob.glob(str(served["state"] / "mirror.git/objects/pack/*.pack")):
        os.truncate(pack, os.path.getsize(pack) // 2)
    _heals(served)


def test_a_garbage_head_is_healed(served):
    (served["state"] / "mirror.git/HEAD").write_bytes(b"\x00garbage\xff\n")
    _heals(served)


def test_a_mirror_that_is_a_regular_file_is_healed(served):
    import shutil

    shutil.rmtree(served["state"] / "mirror.git")
    (served["state"] / "mirror.git").write_text("not a repository\n")
    _heals(served)


def test_the_tree_reader_refuses_symlinks_and_big_blobs_on_every_path(tmp_path):
    """TreeReader.read after check(): the sizes and the index check() built answer, and
    a symlink is refused whether it is the file read or a directory on its way."""
    from agent.config import LimitsConfig
    from agent.errors import TreeError
    from agent.source import open_repo

    fleet = Fleet(tmp_path, files={"files/a/ok.conf": "ok\n", "files/big.bin": "x" * 5000,
                                   "files/real/in.conf": "in\n"})
    (fleet.work / "files/link.conf").symlink_to("/etc/shadow")
    (fleet.work / "files/dirlink").symlink_to("real")
    commit = fleet.commit("links")
    tree = open_repo(str(fleet.work)).tree(commit, LimitsConfig(max_blob_size=4096))
    tree.check()
    assert tree.read("files/a/ok.conf") == b"ok\n"
    assert tree.read("files/real/in.conf") == b"in\n"
    for path, said in [
            ("files/big.bin", "files/big.bin is 5000 bytes, over the limit of 4096"),
            ("files/link.conf", "files/link.conf is a symlink in the repository"),
            ("files/dirlink/in.conf", "files/dirlink is a symlink in the repository"),
            ("files/a", "files/a is a directory, not a file"),
            ("files/nope.conf", "files/nope.conf does not exist in commit"),
            ("files/../x", "escapes the repository"),
            ("/files/a/ok.conf", "escapes the repository")]:
        with pytest.raises(TreeError, match=said.replace(".", r"\.")):
            tree.read(path)
    assert tree.is_file("files/a/ok.conf") and not tree.is_file("files/a")
    assert not tree.exists("files/a/nope") and tree.exists("files/a")
