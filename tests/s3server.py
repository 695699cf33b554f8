"""A real S3 server for tests: SeaweedFS (see thaw.seaweed). Import the fixtures into a test module:

    from s3server import s3server, s3server_own  # noqa: F401  (pytest fixtures)

``s3server`` is shared by the session; ``s3server_own`` is a private one for a test that freezes it
(:meth:`SeaweedS3.paused`: SIGSTOP/SIGCONT of the weed process, so requests hang exactly like against a
frozen host).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit

import pytest

from thaw.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedS3, new_bucket, weed_binary  # noqa: F401


def _need_weed() -> None:
    try:
        weed_binary()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def s3server(tmp_path_factory):
    """One SeaweedFS S3 server for the session."""
    _need_weed()
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3server_own(tmp_path_factory):
    """A private SeaweedFS for one test (for tests that pause or break it)."""
    _need_weed()
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs-own"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class CuttingProxy:
    """A TCP proxy in front of a server that cuts the first ``cuts`` answers part way: once a connection has
    carried ``after`` bytes back, it is closed (a connection dropped on the way, mid-body)."""

    def __init__(self, upstream: str, cuts: int = 1, after: int = 64 << 10):
        u = urlsplit(upstream)
        self.upstream, self.cuts, self.after, self.cut = (u.hostname, u.port), cuts, after, 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.open: list[socket.socket] = []  # the connections it carries
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def __enter__(self) -> "CuttingProxy":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for sock in (self.listener, *self.open):  # shutdown wakes the threads waiting in accept and recv
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.upstream)
            self.open += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        carried = 0
        try:
            while data := src.recv(1 << 16):
                if answers and carried + len(data) > self.after:
                    with self.lock:
                        cut = self.cut < self.cuts
                        self.cut += cut
                    if cut:
                        dst.sendall(data[:self.after - carried])
                        return
                dst.sendall(data)
                carried += len(data)
        except OSError:
            pass
        finally:  # shutdown, not just close: the other direction's thread waits in recv on these
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
