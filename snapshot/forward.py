"""Publish a replica's loopback-only server on a host port: a small TCP forwarder owned by the agent.

Each replica lives in its own network namespace with only loopback, so replicas of one snapshot all listen
on the same port without clashing. The forwarder listens on ``bind:0`` on the host and, for every
connection, opens a socket inside the replica's namespace (:func:`replica_port`) and copies bytes both ways.
The same forwarder takes a namespaced host of `thaw hosts up` to the embedded S3 server's Unix socket
(:func:`unix_socket`), which no network namespace keeps out.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import struct
import threading
import time
from typing import Callable

from .replica import Replica, ReplicaError

log = logging.getLogger("thaw.forward")
SEND_TIMEOUT_S = 120.0  # a connection whose far end takes nothing for this long is dropped
CONNECT_TIMEOUT_S = 10.0


def replica_port(replica: Replica, port: int) -> Callable[[], socket.socket]:
    """Connections to ``port`` on the loopback of ``replica``'s network namespace."""
    def connect() -> socket.socket:
        upstream = replica.socket()
        upstream.settimeout(CONNECT_TIMEOUT_S)  # a frozen replica's full backlog drops the SYN: no 2 min wait
        return _connected(upstream, ("127.0.0.1", port))
    return connect


def unix_socket(path: str) -> Callable[[], socket.socket]:
    """Connections to the Unix socket at ``path``."""
    def connect() -> socket.socket:
        upstream = socket.socket(socket.AF_UNIX)
        upstream.settimeout(CONNECT_TIMEOUT_S)
        return _connected(upstream, path)
    return connect


def _connected(sock: socket.socket, address) -> socket.socket:
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


class Forwarder:
    def __init__(self, connect: Callable[[], socket.socket], bind: str = "127.0.0.1", port: int = 0):
        """Listen on ``bind:port`` (0: any free port); each connection gets an upstream from ``connect()``."""
        self.connect = connect
        self.listener = socket.create_server((bind, port), family=socket.AF_INET6 if ":" in bind else socket.AF_INET)
        self.host, self.host_port = self.listener.getsockname()[:2]
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"thaw-fwd-{self.host_port}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        """host:port, an IPv6 host in brackets (as a URL has it)."""
        return f"[{self.host}]:{self.host_port}" if ":" in self.host else f"{self.host}:{self.host_port}"

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}"

    def _accept(self) -> None:
        while not self._closing.is_set():
            client = None
            try:
                client, _ = self.listener.accept()
                threading.Thread(target=self._pipe, args=(client,), daemon=True).start()
            except (OSError, RuntimeError) as e:  # closed; or out of fds or threads for a moment: the endpoint
                if client is not None:  # is still advertised, so go on accepting once there is room again
                    _reset(client)
                if self._closing.is_set():
                    return
                log.warning("forwarder :%d: %s; accepting again shortly", self.host_port, e)
                time.sleep(0.1)

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = self.connect()
        except (OSError, ReplicaError, RuntimeError):  # (RuntimeError: no thread to enter its namespace)
            _reset(client)  # the replica (or server) is gone: the caller sees a reset and can retry elsewhere
            return
        with client, upstream, selectors.DefaultSelector() as sel:
            _Link(client, upstream, sel).run(self._closing)

    def close(self) -> None:
        self._closing.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(5)


def _reset(sock: socket.socket) -> None:
    """Make closing ``sock`` send a reset (SO_LINGER 0), and close it: its peer must not take what it got for
    a whole answer."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Link:
    """One forwarded connection: both directions flow at once (a server may stream its answer before it has
    read the whole request), each through a bounded buffer. Non-blocking sockets, one selector."""

    BUFFER = 1 << 20  # per direction: reading from a side stops while the other side has this much to take

    def __init__(self, a: socket.socket, b: socket.socket, sel: selectors.BaseSelector):
        self.sel, self.peer = sel, {a: b, b: a}
        self.out = {a: bytearray(), b: bytearray()}  # what is still to be written to each side
        self.ended: set[socket.socket] = set()  # sides that sent their end of stream
        self.since = {a: 0.0, b: 0.0}  # when a side last took data (while it has some waiting)
        self.events = {a: 0, b: 0}
        for s in (a, b):
            s.setblocking(False)

    def run(self, closing: threading.Event) -> None:
        self._flow(closing)
        if closing.is_set():  # the forwarder closed mid-connection: what was under way must not look whole
            self._reset()

    def _flow(self, closing: threading.Event) -> None:
        while not closing.is_set():
            now = time.monotonic()
            for s, peer in self.peer.items():
                if self.out[s] and now - self.since[s] > SEND_TIMEOUT_S:  # it takes nothing: drop both
                    return self._reset()
                want = ((selectors.EVENT_READ if s not in self.ended and len(self.out[peer]) < self.BUFFER else 0)
                        | (selectors.EVENT_WRITE if self.out[s] else 0))
                if want != self.events[s]:
                    if not self.events[s]:
                        self.sel.register(s, want)
                    elif want:
                        self.sel.modify(s, want)
                    else:
                        self.sel.unregister(s)
                    self.events[s] = want
            if not any(self.events.values()):  # both ends passed on and everything written
                return
            for key, ev in self.sel.select(timeout=1.0):
                s = key.fileobj
                if ev & selectors.EVENT_READ and not self._read(s):
                    return
                if ev & selectors.EVENT_WRITE and not self._write(s):
                    return

    def _read(self, s: socket.socket) -> bool:
        peer = self.peer[s]
        try:
            data = s.recv(65536)
        except BlockingIOError:
            return True
        except OSError:  # a reset: the other end gets one too, not a clean end of stream (which would make an
            _reset(peer)  # answer cut off look whole)
            return False
        if not data:
            self.ended.add(s)
            return self._write(peer)  # passes the end of stream on once what came before it is written
        if self.out[peer]:
            self.out[peer] += data
            return self._write(peer)
        self.since[peer] = time.monotonic()
        try:  # nothing waits before it: most of the time it goes at once, without a copy into the buffer
            n = peer.send(data)
        except BlockingIOError:
            n = 0
        except OSError:  # that side is gone: reset this one (see _write)
            _reset(s)
            return False
        self.out[peer] += memoryview(data)[n:]
        return True

    def _write(self, s: socket.socket) -> bool:
        if self.out[s]:
            try:
                n = s.send(self.out[s])
            except BlockingIOError:
                return True
            except OSError:  # that side is gone: reset the other, which must not take its part for the whole
                _reset(self.peer[s])
                return False
            del self.out[s][:n]
            self.since[s] = time.monotonic()
        if not self.out[s] and self.peer[s] in self.ended:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)
        return True

    def _reset(self) -> None:
        for s in self.peer:
            _reset(s)
