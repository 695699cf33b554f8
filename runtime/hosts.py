"""Several hosts on one machine (test/demo mode): N host agents, each in its own network namespace.

`thaw hosts up N` makes, per host, a network namespace `thaw-<id>` joined to this machine by a veth pair
(10.77.<k>.1 here, 10.77.<k>.2 there, a /30 each) and starts `thaw agent --host-id <id>` inside it with
`nsenter --net` (same filesystem, so the same state dir; each host id gets its own work dir, and the store
too where there is an S3 tier, see below).
Its replicas are published on 10.77.<k>.2, so the gateway and the pool reach them over a real network hop,
and killing one agent (or `ip link set ... down`) is a real host failure. Temporal must listen where the
namespaces can reach it: run the stack with THAW_TEMPORAL_ADDRESS=0.0.0.0:<port>. With an S3 tier each host
gets a chunk cache of its own (``<work dir>/store``, removed by `down`), cold when it starts as on another
machine, so its restores read from S3. `thaw up --s3`'s SeaweedFS listens on loopback only (its gRPC ports
take no credentials): each host's agent relays the S3 endpoint's port in its namespace to the server's Unix
socket (``runtime.agent.s3_relay``). `thaw hosts down` stops the agents by PID and deletes the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from thaw.config import LOOPBACK, Config
from thaw.errors import first_line
from thaw.files import write_atomic
from thaw.seaweed import SOCKET
from thaw.snapshot._linux import socket_in
from thaw.snapshot.forward import unix_socket
from thaw.stack import StackError, _stop_pid, agent_ready_file, embedded_s3_dir, wait_started

log = logging.getLogger("thaw.hosts")

PREFIX = "thaw-"


class HostsError(Exception):
    pass


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise HostsError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def _file(cfg: Config) -> Path:
    return cfg.run_dir / "hosts.json"


def _load(cfg: Config) -> list[dict]:
    return json.loads(_file(cfg).read_text()) if _file(cfg).exists() else []


def up(cfg: Config, n: int, base: int = 1, capacity: int = 4, ready_timeout_s: float = 120) -> list[dict]:
    """Start ``n`` namespaced host agents (subnets 10.77.<base>.. onwards), each registered and polling before
    the next; returns their records."""
    if cfg.on_loopback():
        raise HostsError("namespaced hosts cannot reach Temporal on loopback: run the stack with "
                         "THAW_TEMPORAL_ADDRESS=0.0.0.0:<port>")
    if cfg.db_url:  # a file or a Unix socket is reachable from the namespaces; a loopback TCP address is not
        from sqlalchemy.engine import make_url
        if make_url(cfg.db_url).host in LOOPBACK:
            raise HostsError("namespaced hosts cannot reach the registry database on loopback: give THAW_DB_URL "
                             "an address they can reach (or its Unix socket)")
    s3 = urlsplit(cfg.s3_endpoint) if cfg.s3_endpoint else None
    relay = None  # `thaw up --s3`'s SeaweedFS: reached through its Unix socket (see runtime.agent.s3_relay)
    if s3 and cfg.s3_embedded and s3.hostname == "127.0.0.1" and s3.port == cfg.s3_embedded_port:
        relay = embedded_s3_dir(cfg) / SOCKET
        if not _answers(relay):
            raise HostsError(f"the embedded S3 server does not answer on {relay}: start the stack (`thaw up`)")
    elif s3 and s3.hostname in LOOPBACK:
        raise HostsError(f"namespaced hosts cannot reach S3 on loopback ({cfg.s3_endpoint}): give THAW_S3_ENDPOINT "
                         "an address they can reach")
    port = cfg.temporal_address.rsplit(":", 1)[1]
    hosts = _load(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    used = {int(h["host_id"].removeprefix("nshost")) for h in hosts}  # one a `down` kept, say
    for i in range(n):
        k = min(set(range(base, base + len(used) + 1)) - used)
        used.add(k)
        host_id, ns, veth = f"nshost{k}", f"{PREFIX}nshost{k}-{os.getpid()}", f"thv{k}-{os.getpid() % 10000}"
        if k > 255:
            raise HostsError(f"at most 255 namespaced hosts (10.77.<k>.0/30 each); {len(hosts)} run already")
        here, there = f"10.77.{k}.1", f"10.77.{k}.2"
        host_cfg = cfg.model_copy(update={"host_id": host_id})
        record = {"host_id": host_id, "netns": ns, "veth": veth, "address": there}
        proc = None
        try:
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("addr", "add", f"{here}/30", "dev", veth)
            _ip("link", "set", veth, "up")
            for args in (("addr", "add", f"{there}/30", "dev", "eth0"), ("link", "set", "eth0", "up"),
                         ("link", "set", "lo", "up"), ("route", "add", "default", "via", here)):
                _ip("-n", ns, *args)
            if not _reachable(ns, here, int(port)):
                raise HostsError(f"Temporal does not answer at {here}:{port} from the namespace: was the stack "
                                 f"started with THAW_TEMPORAL_ADDRESS=0.0.0.0:{port}? (`thaw down`, then `thaw up` "
                                 f"with it)")
            env = {**os.environ, **cfg.child_env(), "THAW_TEMPORAL_ADDRESS": f"{here}:{port}",
                   "THAW_REPLICA_BIND": there, "THAW_AGENT_METRICS_PORT": "0", "THAW_HOST_ID": host_id,
                   "THAW_HOST_CAPACITY": str(capacity)}
            if s3:  # a chunk cache of its own, removed by `down`: its restores read from S3, as on another machine
                record["store"] = env["THAW_STORE_PATH"] = str(host_cfg.work_dir / "store")
            if relay:
                env["THAW_S3_SOCKET"] = str(relay)
            ready = agent_ready_file(host_cfg)
            ready.unlink(missing_ok=True)
            with open(cfg.log_dir / f"agent-{host_id}.log", "ab") as log:
                proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-m", "thaw",
                                         "agent"], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            hosts.append({**record, "pid": proc.pid})  # recorded at once: `down` finds an agent that is starting
            write_atomic(_file(cfg), json.dumps(hosts))  # never found half-written: `down` reads it
            # registered and polling before `thaw restore --host` or a deploy may look for it
            wait_started(proc, ready.exists, Path(log.name), ready_timeout_s, "its agent")
        except BaseException as e:  # Ctrl-C too: what this host got so far goes; the hosts before it stay
            if proc is not None:  # in a session of its own: nothing else would stop it
                _stop_agent(proc, host_cfg)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # its end of the veth pair too
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
            if hosts and hosts[-1]["host_id"] == host_id:  # last: a record left by a failure here is harmless
                hosts.pop()  # (`down` finds its agent and namespace gone)
                with contextlib.suppress(Exception):
                    write_atomic(_file(cfg), json.dumps(hosts))
            if isinstance(e, (HostsError, StackError, OSError)):
                raise HostsError(f"host {host_id}: {e}") from None
            raise
    return hosts


def _stop_agent(proc: subprocess.Popen, host_cfg: Config) -> None:
    """Stop an agent that did not start in full: SIGTERM (it marks its host gone), its session SIGKILLed after
    30 s; then clear what it left."""
    from .agent import release_if_dead

    if proc.returncode is None:  # not reaped yet (wait_started polls it): its pid is still its own
        _stop_pid(proc.pid, timeout=30)
    with contextlib.suppress(Exception):  # the registry down, say: the host goes stale on its own
        release_if_dead(host_cfg)


def _reachable(ns: str, host: str, port: int, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host:port works from inside network namespace ``ns``."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        sock = socket_in(fd)
    finally:
        os.close(fd)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except OSError:
            return False
    return True


def _answers(path: Path) -> bool:
    """Whether something accepts connections on the Unix socket at ``path``."""
    try:
        unix_socket(str(path))().close()
    except OSError:
        return False
    return True


def _in_netns(pid: int, ns: str) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return False


def down(cfg: Config) -> list[str]:
    """Stop every namespaced agent (SIGTERM: it stops its replicas and mounts), then delete its namespace. For an
    agent that died, what it left goes: its replicas (by recorded pid and start time), their roots, its mounts.
    A host whose agent would not go, or whose leftovers could not be cleared, keeps its record and its namespace
    (a later `down` tries again; a new `up` takes other subnets) and makes a HostsError once the rest is down."""
    from .agent import release_if_dead

    done, kept, failed = [], [], []
    for h in _load(cfg):
        # SIGTERM, then SIGKILL of its session, if still that agent once its pidfd is held (a pid reused since is
        # in another namespace; a pid gone is nothing to stop)
        _stop_pid(h["pid"], timeout=30, ours=lambda: _in_netns(h["pid"], h["netns"]))
        try:  # it died, or was killed in the end: what it left goes
            cleared = release_if_dead(cfg.model_copy(update={"host_id": h["host_id"]}))
            why = "" if cleared else "its agent still runs (stuck in the kernel?)"
        except Exception as e:  # noqa: BLE001 - the other hosts must still go
            why = f"could not clear what its agent left: {first_line(e)}"
        if why:
            kept.append(h)
            failed.append(f"{h['host_id']}: {why}")
            continue
        subprocess.run(["ip", "netns", "del", h["netns"]], capture_output=True)  # its veth pair goes with it
        if h.get("store"):  # its own chunk cache (with S3): the next `hosts up` starts cold again
            shutil.rmtree(h["store"], ignore_errors=True)
        done.append(h["host_id"])
    if kept:
        write_atomic(_file(cfg), json.dumps(kept))
        raise HostsError(f"stopped {len(done)} host(s); kept {'; '.join(failed)} (`thaw hosts down` tries again)")
    _file(cfg).unlink(missing_ok=True)
    return done
