"""The agent's TCP forwarder (snapshot/forward.py), against plain local servers: a replica's namespace is not
needed to see how it copies, ends and survives connections."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from thaw.snapshot.forward import Forwarder, replica_port


class HostSocket:
    """A replica whose server listens on the host's loopback (Replica.socket opens one in its namespace)."""

    def socket(self) -> socket.socket:
        return socket.socket()


def serve(handle) -> socket.socket:
    srv = socket.create_server(("127.0.0.1", 0))

    def loop():
        while srv.fileno() != -1:
            try:
                c, _ = srv.accept()
            except OSError:  # closed, or out of fds for a moment
                time.sleep(0.05)
                continue
            threading.Thread(target=handle, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv


@contextlib.contextmanager
def forwarded(handle):
    """A local server answering with ``handle(conn)``, published by a Forwarder: yields the forwarder."""
    srv = serve(handle)
    fwd = Forwarder(replica_port(HostSocket(), srv.getsockname()[1]))
    try:
        yield fwd
    finally:
        fwd.close()
        srv.close()


def test_a_reset_from_the_replica_reaches_the_client_as_a_reset():
    """A server that dies mid-answer resets its connection: the client must see a reset, not a clean end of
    stream, or an answer without a length that was cut off looks whole."""
    def half_then_reset(c):
        c.recv(100)
        c.sendall(b"HTTP/1.0 200 OK\r\n\r\npart")
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()

    with forwarded(half_then_reset) as fwd, socket.create_connection(("127.0.0.1", fwd.host_port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        got = b""
        with pytest.raises(ConnectionResetError):
            while chunk := s.recv(100):
                got += chunk
    assert got in (b"", b"HTTP/1.0 200 OK\r\n\r\npart")


def test_the_forwarder_accepts_again_after_running_out_of_fds():
    """accept() failing with EMFILE (the agent out of file descriptors for a moment) must not end the
    forwarder: its endpoint is still advertised, and connections would complete in the backlog and hang."""
    script = textwrap.dedent("""
        import os, resource, socket, sys, threading, time
        sys.path[:0] = [sys.argv[1]]
        from test_forward import HostSocket, serve
        from thaw.snapshot.forward import Forwarder, replica_port

        def echo(c):
            c.sendall(c.recv(100))
            c.close()

        roomy = threading.Event()

        class Gated(HostSocket):  # the first connection's upstream waits for fds: it keeps its client's fd
            def socket(self):
                roomy.wait(10)
                return super().socket()

        srv = serve(echo)
        fwd = Forwarder(replica_port(Gated(), srv.getsockname()[1]))
        early = socket.socket()
        spare = os.dup(0)  # the lowest free fd number: from it on, no new fd can be had
        os.close(spare)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (spare, hard))
        early.connect(("127.0.0.1", fwd.host_port))  # in the backlog; the forwarder's accept() gets EMFILE
        time.sleep(0.5)  # its accept() had its fd already; the next one fails
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        roomy.set()
        with socket.create_connection(("127.0.0.1", fwd.host_port), timeout=10) as late:
            late.sendall(b"ping")
            print(late.recv(100).decode())
    """)
    tests = str(__import__("pathlib").Path(__file__).parent)
    r = subprocess.run([sys.executable, "-c", script, tests], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ping", r.stdout + r.stderr[-2000:]


def test_both_directions_flow_at_once():
    """A server that streams a large answer before it reads the request, and a client that sends a large body
    before it reads the answer (a bidirectional stream): neither direction may wait on the other, or both
    block until the send timeout."""
    size = 8 << 20

    def stream_first(c):
        c.sendall(b"a" * size)  # blocks until the client reads: the client reads only after it has sent
        got = 0
        while got < size and (chunk := c.recv(1 << 16)):
            got += len(chunk)
        c.sendall(str(got).encode())
        c.close()

    with forwarded(stream_first) as fwd, socket.create_connection(("127.0.0.1", fwd.host_port), timeout=30) as s:
        s.sendall(b"b" * size)
        got = b""
        while chunk := s.recv(1 << 16):
            got += chunk
    assert got == b"a" * size + str(size).encode()


def test_closing_the_forwarder_resets_the_connections_under_way():
    """The agent closes a replica's forwarder before it stops the replica: an answer still streaming must end
    in a reset, not a clean end of stream that makes it look whole."""
    def slow(c):
        c.recv(100)
        c.sendall(b"HTTP/1.0 200 OK\r\n\r\npart")
        time.sleep(5)
        c.close()

    with forwarded(slow) as fwd, socket.create_connection(("127.0.0.1", fwd.host_port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        got = b""
        while not got.endswith(b"part"):
            got += s.recv(100)
        fwd.close()
        with pytest.raises(ConnectionResetError):
            while s.recv(100):
                pass


def test_a_replica_is_published_on_an_ipv6_address_too():
    """THAW_REPLICA_BIND=::1 (or ::): every replica restored, then failed to publish (an IPv4 socket for an IPv6
    address) and was stopped. Its endpoint names the host in brackets, as a URL must."""
    def echo(c):
        with c:
            c.sendall(c.recv(100))
    srv = serve(echo)
    fwd = Forwarder(replica_port(HostSocket(), srv.getsockname()[1]), "::1")
    try:
        assert fwd.endpoint == f"http://[::1]:{fwd.host_port}" and fwd.address == f"[::1]:{fwd.host_port}"
        with socket.create_connection(("::1", fwd.host_port), timeout=10) as c:
            c.sendall(b"ping")
            assert c.recv(100) == b"ping"
    finally:
        fwd.close()
        srv.close()
