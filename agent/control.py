"""The control socket: JSON lines over a Unix socket, server and client.

Owns: the wire protocol (one JSON object per line each way), who may ask what
(SO_PEERCRED: root, the daemon's own uid, or members of the `gitops-agent` group;
anyone else is refused with a message), its limits, and the client's request().
Must not: run cycles itself (it calls the Daemon's methods), or print: the CLI verbs
that talk to a running daemon and all their output live in cli.py.

    request:  {"verb": "sync", "wait": true}
    response: {"ok": true, "result": {...}}  or  {"ok": false, "error": "why"}
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import socket
import struct
from typing import Any

from .errors import AgentError

log = logging.getLogger("agent.control")

GROUP = "gitops-agent"
READ_VERBS = {"status", "plan", "history"}
WRITE_VERBS = {"sync", "pause", "resume"}
MAX_LINE = 64 * 1024
MAX_CLIENTS = 64  # beyond this a new connection is answered "busy" and closed
IDLE_TIMEOUT = 30.0  # a client that sends nothing for this long is dropped
SEND_TIMEOUT = 10.0  # a client that does not read its answers for this long is dropped
WRITE_BUFFER = 256 * 1024  # per connection, before the writer waits for the client
MAX_HISTORY = 1000


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def _group_gid() -> int | None:
    try:
        return grp.getgrnam(GROUP).gr_gid
    except KeyError:
        return None


def _in_group(pid: int, gid: int, group: int | None) -> bool:
    if group is None:
        return False
    if gid == group:
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return str(group) in line.split()[1:]
    except OSError:
        return False
    return False


def authorize(verb: str, pid: int, uid: int, gid: int) -> str | None:
    """None if allowed, else the message the client sees."""
    if uid == 0 or uid == os.geteuid():
        return None
    if _in_group(pid, gid, _group_gid()):
        return None
    kind = "change" if verb in WRITE_VERBS else "read"
    return (f"uid {uid} may not {kind} the agent ({verb}): only root and members of the "
            f"'{GROUP}' group may use this socket")


class ControlServer:
    def __init__(self, path: str, handler: Any) -> None:
        self.path = path
        self.handler = handler  # async (verb, request) -> result
        self.server: asyncio.base_events.Server | None = None
        self.clients = 0

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket from a previous run
        old = os.umask(0o117)  # created 0660: no window with looser permissions
        try:
            self.server = await asyncio.start_unix_server(self._client, path=self.path,
                                                          limit=MAX_LINE)
        finally:
            os.umask(old)
        group = _group_gid()
        if group is not None:
            os.chown(self.path, 0 if os.geteuid() == 0 else -1, group)
        os.chmod(self.path, 0o660)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients += 1
        try:
            if self.clients > MAX_CLIENTS:
                # every connection holds an fd: past the cap, say so and hang up at once
                await _send(writer, {"ok": False, "error": f"busy: more than {MAX_CLIENTS} "
                                                           f"connections; try again"})
                return
            writer.transport.set_write_buffer_limits(high=WRITE_BUFFER)
            await self._serve(reader, writer)
        except (ConnectionError, BrokenPipeError, TimeoutError):
            pass  # gone, idle, or not reading its answers: dropped
        except Exception as e:  # noqa: BLE001 - one client must never take the socket down
            log.error("control: dropped a client after an internal error: %s: %s",
                      type(e).__name__, e, extra={"STAGE": "control"})
        finally:
            self.clients -= 1
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        pid, uid, gid = peer_credentials(sock)
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
            except (asyncio.LimitOverrunError, ValueError):
                await _send(writer, {"ok": False, "error": "request line too long"})
                return
            if not line:
                return
            try:
                req = json.loads(line)
                verb = req["verb"]
                if not isinstance(verb, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                await _send(writer, {"ok": False, "error": "bad request: expected a JSON "
                                                           "object with a 'verb'"})
                continue
            if verb not in READ_VERBS | WRITE_VERBS:
                await _send(writer, {"ok": False, "error": f"unknown verb {verb!r}"})
                continue
            denied = authorize(verb, pid, uid, gid) or _bad_arguments(verb, req)
            if denied:
                await _send(writer, {"ok": False, "error": denied})
                continue
            try:
                result = await self.handler(verb, req, uid)
                await _send(writer, {"ok": True, "result": result})
            except AgentError as e:
                await _send(writer, {"ok": False, "error": str(e)})


def _bad_arguments(verb: str, req: dict) -> str | None:
    """Arguments are checked here, so a handler never sees a wrong type."""
    if not isinstance(req, dict):
        return "bad request: expected a JSON object"
    if verb == "history" and "n" in req:
        n = req["n"]
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_HISTORY:
            return f"bad request: history n must be a whole number 0..{MAX_HISTORY}, got {n!r}"
    if verb == "pause" and not isinstance(req.get("reason", ""), str):
        return "bad request: pause reason must be a string"
    if verb == "pause" and len(req.get("reason", "")) > 1000:
        return "bad request: pause reason is longer than 1000 characters"
    if verb == "sync" and not isinstance(req.get("wait", False), bool):
        return "bad request: sync wait must be true or false"
    return None


async def _send(writer: asyncio.StreamWriter, data: dict) -> None:
    writer.write(json.dumps(data, default=str).encode() + b"\n")
    await asyncio.wait_for(writer.drain(), SEND_TIMEOUT)


# --- client ----------------------------------------------------------------------------


def request(path: str, req: dict, timeout: float = 30) -> Any:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except FileNotFoundError:
        raise AgentError(f"control: no agent is listening on {path} (is gitops-agent.service "
                         f"running?)") from None
    except PermissionError:
        raise AgentError(f"control: permission denied on {path}: only root and members of the "
                         f"'{GROUP}' group may use it") from None
    except OSError as e:
        raise AgentError(f"control: cannot connect to {path}: {e.strerror}") from None
    try:
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise AgentError(f"control: no answer from the agent within {timeout:.0f}s") from None
    finally:
        s.close()
    try:
        resp = json.loads(buf)
    except ValueError:
        raise AgentError("control: the agent closed the connection without an answer") from None
    if not resp.get("ok"):
        raise AgentError(f"control: {resp.get('error')}")
    return resp["result"]
