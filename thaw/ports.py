"""Free TCP ports for the servers thaw starts on loopback (SeaweedFS's parts; tests' and benchmarks' stacks).

A port from ``bind(("127.0.0.1", 0))`` comes out of the kernel's ephemeral range, and once closed it can be handed
out again at once to anyone's ``bind(0)``: the Temporal dev server picks its internal ports that way, so a port chosen
like that for its front end could also become, say, its metrics port, and the server dies after it looked ready.
These ports are taken below the ephemeral range instead, where neither ``bind(0)`` nor ``connect()`` ever lands,
and one process never hands out the same port twice.
"""

from __future__ import annotations

import random
import socket
import threading

_LOW = 10000
_given: set[int] = set()
_lock = threading.Lock()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    for host in ("0.0.0.0", "127.0.0.1"):  # a server may listen on either
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that nothing listens on now and that no ``bind(0)``/``connect()`` will be given."""
    high = _ephemeral_low()
    if high - _LOW < 1000:  # an unusual ip_local_port_range leaves no room below it: fall back to the kernel's pick
        return _kernel_ports(n)
    with _lock:
        ports: list[int] = []
        for _ in range(1000 * n):
            port = random.randrange(_LOW, high)
            if port not in _given and _bindable(port):
                _given.add(port)
                ports.append(port)
                if len(ports) == n:
                    return ports
    raise OSError(f"no {n} free TCP ports between {_LOW} and {high}")


def free_port() -> int:
    return free_ports(1)[0]


def _kernel_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # held open together, so the n ports differ
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
