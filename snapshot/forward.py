"""Publish a replica's loopback-only server on a host port: a small TCP forwarder owned by the agent.

Each replica lives in its own network namespace with only loopback, so replicas of one snapshot all listen
on the same port without clashing. The forwarder listens on ``bind:0`` on the host and, for every
connection, opens a socket inside the replica's namespace (``Replica.socket``) and copies bytes both ways.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import struct
import threading
import time

from .replica import Replica, ReplicaError

log = logging.getLogger("thaw.forward")
SEND_TIMEOUT_S = 120.0  # a connection whose far end takes nothing for this long is dropped


class Forwarder:
    def __init__(self, replica: Replica, port: int, bind: str = "127.0.0.1"):
        self.replica, self.port = replica, port
        self.listener = socket.create_server((bind, 0))
        self.host, self.host_port = self.listener.getsockname()[:2]
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"thaw-fwd-{self.host_port}", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.host_port}"

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
            upstream = self.replica.socket()
            upstream.connect(("127.0.0.1", self.port))
        except (OSError, ReplicaError):
            client.close()  # the replica is gone: the caller sees a reset and can retry elsewhere
            return
        for s in (client, upstream):  # a peer that stops reading must not hold this thread forever
            s.settimeout(SEND_TIMEOUT_S)
        pair = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as sel, client, upstream:
            for s in pair:
                sel.register(s, selectors.EVENT_READ)
            open_ends = 2
            while open_ends and not self._closing.is_set():
                for key, _ in sel.select(timeout=1.0):
                    src = key.fileobj
                    try:
                        data = src.recv(65536)
                    except OSError:  # a reset: the other end gets one too, not a clean end of stream (which
                        _reset(pair[src])  # would make an answer cut off look whole)
                        return
                    if data:
                        try:
                            pair[src].sendall(data)
                            continue
                        except OSError:  # that end is gone or took nothing for SEND_TIMEOUT_S: reset this one
                            _reset(src)
                            return
                    sel.unregister(src)  # half-close: pass the EOF on
                    with contextlib.suppress(OSError):
                        pair[src].shutdown(socket.SHUT_WR)
                    open_ends -= 1

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
