"""Replicas: a workload running with its own root filesystem in new pid, mount, network (loopback only), UTS
and IPC namespaces, whether started fresh (``launch``) or restored by CRIU (``criu.restore``).

The host reaches a replica's server through its network namespace: a short-lived thread ``setns()``-es into
it and creates the socket there (a socket stays in the namespace it was made in), then the caller's thread
uses it. No thread of the caller ever changes namespace, and every replica can listen on the same port.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import _linux, cgroup
from .sdk import AFTER_RESTORE_PATH, BEFORE_SNAPSHOT_PATH, HOOK_TOKEN_HEADER, READY_PATH

NSINIT = Path(__file__).with_name("_nsinit.py")
REAP = Path(__file__).with_name("_reap.py")
UNSHARE = ["unshare", "--net", "--uts", "--ipc"]
UNSHARE_ROOT = ["--pid", "--fork", "--mount", "--propagation", "private"]  # with a root of its own
TCP_LISTEN = "0A"  # the state column of a listening socket in /proc/PID/net/tcp
DEFAULT_HEALTH = "/healthz"  # `thaw build snapshot --health`'s default (workflows.build_snapshot.ModelSpec)
NOT_FOUND_S = 30.0  # the default health path answered 404 this long at a launch: the server has another one
GOLDEN_TIMEOUT_S = 120.0  # a golden request's answer (a launch's first one may take longer: snapshot.host)


class ReplicaError(RuntimeError):
    """A replica failed to start, died, or did not answer in time."""


class HookFailed(ReplicaError):
    """The server's SDK ran a hook's callbacks (/thaw/before-snapshot, /thaw/after-restore) and one failed, or
    refused to run them (not the hook token it was launched with)."""


@dataclass(eq=False)
class Replica:
    pid: int                  # host pid of the replica's pid 1 (of the workload, without a root of its own)
    root: Path | None         # its "/"; None: the host's filesystem (no mount namespace)
    log_path: Path            # the workload's stdout + stderr
    external_files: list[str]  # CRIU ids of its open files outside its mount namespace (the log)
    proc: subprocess.Popen    # parent of pid 1 (unshare after launch, the reaper after restore)
    timings: dict[str, float] = field(default_factory=dict)  # ms
    _pidfd: int | None = None
    _netns: int | None = None
    _fds: threading.Lock = field(default_factory=threading.Lock)  # a closed fd number is reused by the next open

    @classmethod
    def _attach(cls, pid: int, netns: int | None = None, **kw) -> Replica:
        """Hold the replica by a pidfd and an fd of its network namespace (given, or its pid 1's)."""
        pidfd = os.pidfd_open(pid)
        try:
            if netns is None:
                netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(pidfd)
            raise
        return cls(pid=pid, _pidfd=pidfd, _netns=netns, **kw)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, sig: int, grace: float, abort: threading.Event | None = None) -> bool:
        """Ask the replica to exit, as `docker stop` does: send ``sig`` (its image's StopSignal) to its pid 1, then
        wait up to ``grace`` seconds (less once ``abort`` is set) for it to go: a server finishing the requests
        under way. True if it is gone. A pid 1 of its own pid namespace that does not catch ``sig`` never gets it
        (the kernel drops it), so then there is no wait. Nothing is reaped: :meth:`stop` kills what is left."""
        with self._fds:  # our own copy of the pidfd: a stop meanwhile can't hand the number to another process
            if self._pidfd is None:
                return True
            pidfd = os.dup(self._pidfd)
        try:
            if _gone(pidfd):
                return True
            if not _heeds(self.pid, sig, own_pid_ns=self.root is not None):
                return False
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return True
            deadline = time.monotonic() + grace
            while not (abort and abort.is_set()):
                left = deadline - time.monotonic()
                if left <= 0 or _gone(pidfd, min(left, 0.1)):
                    break
            return _gone(pidfd)
        finally:
            os.close(pidfd)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGKILL the replica's pid 1 (the kernel then kills its whole pid namespace; without a root of its own
        there is none, so its process group, which it leads, goes first) and wait; idempotent. A replica still
        there after ``timeout`` is a ReplicaError, and keeps what a later try needs."""
        if self._pidfd is not None:
            if self.root is None:  # its pid stays reserved as a group id while any member lives: never another's
                with contextlib.suppress(OSError):
                    os.killpg(self.pid, signal.SIGKILL)
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ReplicaError(f"replica {self.pid} is still there {timeout:g} s after SIGKILL") from None
        with self._fds:
            fds, self._pidfd, self._netns = (self._pidfd, self._netns), None, None
        for fd in fds:
            if fd is not None:
                os.close(fd)

    def netns_inode(self) -> int:
        if self._netns is None:
            raise ReplicaError(f"replica {self.pid} is stopped")
        return os.fstat(self._netns).st_ino

    def __enter__(self) -> Replica:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 2000) -> str:
        return tail(self.log_path, n)

    # --- the replica's network namespace -------------------------------------------------------------------

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket inside the replica's network namespace."""
        with self._fds:  # our own copy: a stop meanwhile can't hand the number to another replica's namespace
            if self._netns is None:
                raise ReplicaError(f"replica {self.pid} is stopped")
            netns = os.dup(self._netns)
        try:
            return _linux.socket_in(netns, family, type)
        finally:
            os.close(netns)

    def http_request(self, method: str, path: str, body: bytes | None = None, port: int = 8080,
                     timeout: float = 10.0, headers: dict | None = None,
                     content_type: str | None = None) -> tuple[int, bytes]:
        """One HTTP request to 127.0.0.1:port inside the replica: (status, body). ``timeout`` bounds each read of
        the status line and headers, and the reading of the whole body (TimeoutError): a server that streams or
        trickles its answer must not hold a health check or a golden request for ever."""
        headers = {**({"Content-Type": content_type} if content_type else {}), **(headers or {})}
        deadline = time.monotonic() + timeout
        conn = _NetnsHTTPConnection(self, port, timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            sock = conn.sock  # the response reads from it still where it closes the connection (will_close)
            resp = conn.getresponse()
            chunks = []
            while not resp.isclosed():  # (it may close as it reads the end of the body)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{method} {path}: the answer took longer than {timeout:g}s")
                sock.settimeout(left)
                chunk = resp.read1(1 << 20)  # what has come: a trickle cannot hold one read for long
                if not chunk:
                    break
                chunks.append(chunk)
            if resp.length:  # the server closed before the Content-Length it gave (read1 returns b"" then)
                raise http.client.IncompleteRead(b"".join(chunks), resp.length)
            return resp.status, b"".join(chunks)
        finally:
            conn.close()

    def wait_healthy(self, port: int = 8080, path: str = "/health", timeout: float = 60.0,
                     beat: Callable[[], None] | None = None) -> float:
        """Poll GET path until it answers 200; the ms it took. ReplicaError if the replica dies or times out.
        ``beat`` is called on every poll (a Temporal activity heartbeat, say)."""
        return self._poll(port, [path], timeout, beat)

    def wait_ready(self, port: int = 8080, health_path: str = "/health", timeout: float = 60.0,
                   beat: Callable[[], None] | None = None) -> float:
        """Poll the SDK's GET /thaw/ready (the server says it is warm) or, where it is 404, the health path;
        then the health path, which restores are checked on, answers too (a snapshot was stored before a wrong
        one showed). thaw's default health path answering 404 for NOT_FOUND_S is an error, not waited out: the
        server runs and has another (a path the user chose may answer 404 while the server loads: waited for)."""
        t0 = time.monotonic()
        self._poll(port, [READY_PATH, health_path], timeout, beat, health_path == DEFAULT_HEALTH)
        self._poll(port, [health_path], timeout - (time.monotonic() - t0), beat, health_path == DEFAULT_HEALTH)
        return (time.monotonic() - t0) * 1000

    def _poll(self, port: int, paths: list[str], timeout: float, beat: Callable[[], None] | None,
              not_found_fails: bool = False) -> float:
        t0 = time.monotonic()
        deadline = t0 + timeout
        last, not_found_since = "no answer", None
        while True:
            if beat:
                beat()
            if not self.alive():
                raise ReplicaError(f"replica {self.pid} exited with code {self.proc.returncode} before "
                                   f"{paths[0]} answered; log {self.log_path}: {tail(self.log_path)!r}")
            try:
                wait = max(0.1, min(2.0, deadline - time.monotonic()))
                status, body = self.http_request("GET", paths[0], port=port, timeout=wait)
                if status == 200:
                    return (time.monotonic() - t0) * 1000
                if status == 404 and len(paths) > 1:
                    paths = paths[1:]
                    continue
                last = f"HTTP {status} {body[:200]!r}"
                not_found_since = (not_found_since or time.monotonic()) if status == 404 else None
                if not_found_fails and not_found_since and time.monotonic() - not_found_since >= NOT_FOUND_S:
                    raise ReplicaError(f"replica {self.pid}: GET 127.0.0.1:{port}{paths[0]} answered 404 for "
                                       f"{NOT_FOUND_S:g}s: the server has no such path (thaw's default); give its "
                                       f"health path with --health (e.g. /health)")
            except (OSError, http.client.HTTPException) as e:
                last, not_found_since = f"{type(e).__name__}: {e}", None
            if time.monotonic() > deadline:
                raise ReplicaError(f"replica {self.pid}: GET 127.0.0.1:{port}{paths[0]} not 200 after {timeout:g}s "
                                   f"({last}{self._listening_note(port)}); log {self.log_path}: "
                                   f"{tail(self.log_path, 300)!r}")
            time.sleep(0.02)

    def listening_ports(self) -> set[int]:
        """The TCP ports something listens on in the replica's network namespace (its own: only its processes')."""
        ports = set()
        for name in ("tcp", "tcp6"):
            with contextlib.suppress(OSError):  # gone, or no IPv6
                for line in Path(f"/proc/{self.pid}/net/{name}").read_text().splitlines()[1:]:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == TCP_LISTEN:
                        ports.add(int(fields[1].rpartition(":")[2], 16))
        return ports

    def _listening_note(self, port: int) -> str:
        """For a readiness timeout: where the server listens, when that is not ``port``."""
        ports = self.listening_ports()
        if port in ports:
            return ""
        if not ports:
            return "; nothing listens on a TCP port in the replica"
        return f"; the server listens on TCP port {', '.join(map(str, sorted(ports)))}, not {port} (--port)"


class _NetnsHTTPConnection(http.client.HTTPConnection):
    def __init__(self, replica: Replica, port: int, timeout: float):
        super().__init__("127.0.0.1", port, timeout=timeout)
        self._replica = replica

    def connect(self):
        self.sock = self._replica.socket()
        self.sock.settimeout(self.timeout)
        try:
            self.sock.connect((self.host, self.port))
        except BaseException:
            self.sock.close()
            raise
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _json_object(resp: bytes) -> dict | None:
    """A hook's answer as the SDK sends it, a JSON object; None for anything else."""
    try:
        reply = json.loads(resp)
    except ValueError:
        return None
    return reply if isinstance(reply, dict) else None


def _hook_failed(replica: Replica, path: str, status: int, resp: bytes) -> HookFailed | None:
    """The SDK's answer for a failing callback (500, ``{"error": "... in a callback of PATH ..."}``) or for a
    missing or wrong hook token (403, nothing ran) as an error; None for any other answer."""
    error = (_json_object(resp) or {}).get("error") or ""
    if not ((status == 500 and f"in a callback of {path}" in error) or (status == 403 and HOOK_TOKEN_HEADER in error)):
        return None
    return HookFailed(f"replica {replica.pid}: POST {path} answered {status}: {error}; log {replica.log_path}")


def _hook_headers(token: str) -> dict:
    return {HOOK_TOKEN_HEADER: token} if token else {}


def before_snapshot(replica: Replica, port: int = 8080, timeout: float = 300.0, token: str = "") -> bool:
    """POST the server's /thaw/before-snapshot: its SDK's before-snapshot callbacks (e.g. ``park_weights``) run.
    True once they ran (the SDK's answer: 200 with ``{"callbacks": N}``); False for a server without the hook (any
    other answer, such as a server's 200 to every POST); HookFailed when the SDK says a callback failed: nothing
    may be snapshotted then. ``token``: the hook token the server was launched with (sdk.HOOK_TOKEN_ENV)."""
    status, resp = replica.http_request("POST", BEFORE_SNAPSHOT_PATH, b"{}", port, timeout,
                                        _hook_headers(token), "application/json")
    if status == 200:
        return "callbacks" in (_json_object(resp) or {})
    if failed := _hook_failed(replica, BEFORE_SNAPSHOT_PATH, status, resp):
        raise failed
    return False


def after_restore(replica: Replica, port: int = 8080, secrets: dict | None = None, restore_id: str | None = None,
                  timeout: float = 30.0, token: str = "") -> dict:
    """POST the secrets (and a fresh restore id) to the server's /thaw/after-restore; its JSON answer. A server
    without the hook is a ReplicaError, a failing callback HookFailed (the caller may ignore only the former)."""
    body = json.dumps({"env": secrets or {}, "restore_id": restore_id or uuid.uuid4().hex}).encode()
    status, resp = replica.http_request("POST", AFTER_RESTORE_PATH, body, port, timeout,
                                        _hook_headers(token), "application/json")
    if status != 200:
        hint = " (does the server use thaw_sdk?)" if status in (404, 405, 501) else ""
        raise (_hook_failed(replica, AFTER_RESTORE_PATH, status, resp)
               or ReplicaError(f"replica {replica.pid}: POST {AFTER_RESTORE_PATH} answered {status}: "
                               f"{resp[:300]!r}{hint}"))
    reply = _json_object(resp)
    if reply is None or "env" not in reply:  # the SDK says which env it took
        raise ReplicaError(f"replica {replica.pid}: POST {AFTER_RESTORE_PATH} answered 200 with {resp[:80]!r}, not "
                           f"the thaw SDK's JSON (does the server use thaw_sdk?)")
    missing = sorted(set(secrets or {}) - set(reply.get("env") or []))
    if missing:
        raise ReplicaError(f"replica {replica.pid}: POST {AFTER_RESTORE_PATH} did not take {', '.join(missing)} "
                           f"(does the server use thaw_sdk?)")
    return reply


def golden_answer(replica: Replica, port: int, golden: dict, timeout: float = GOLDEN_TIMEOUT_S) -> bytes:
    """Send a recorded golden request (``method``, ``path``, ``body_b64``, ``content_type``); the answer's body,
    as compared: without the JSON fields its ``ignore`` names (``comparable``). Anything but HTTP 200 is a
    ReplicaError."""
    body = base64.b64decode(golden.get("body_b64") or "")
    status, answer = replica.http_request(golden.get("method", "GET"), golden.get("path", "/"), body, port,
                                          timeout=timeout, content_type=golden.get("content_type"))
    if status != 200:
        raise ReplicaError(f"golden request {golden.get('method')} {golden.get('path')} answered HTTP {status}: "
                           f"{answer[:200]!r}")
    return comparable(answer, golden.get("ignore") or [])


def comparable(answer: bytes, ignore: Sequence[str]) -> bytes:
    """``answer`` without the fields ``ignore`` names (dotted paths into a JSON answer: ``id``, ``usage.time``;
    a list on the way applies the rest of the path to each of its items), as sorted compact JSON; unchanged
    when ``ignore`` is empty. A field that is not there is no error: servers leave out optional ones."""
    def drop(node, keys: list[str]) -> None:
        if isinstance(node, list):
            for item in node:
                drop(item, keys)
        elif isinstance(node, dict) and keys[0] in node:
            if len(keys) == 1:
                del node[keys[0]]
            else:
                drop(node[keys[0]], keys[1:])

    if not ignore:
        return answer
    try:
        doc = json.loads(answer)
        for path in ignore:
            drop(doc, path.split("."))
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    except (ValueError, RecursionError):  # (nested deeper than Python recurses: not an answer to compare)
        raise ReplicaError(f"the golden answer is not JSON ({len(answer)} bytes: {answer[:80]!r}), so fields to "
                           f"ignore ({', '.join(ignore)}) cannot be taken out of it") from None


def answers_differ(a: bytes, b: bytes) -> str:
    """Where two answers to the golden request differ, in a few words: the JSON fields (dotted paths, at most
    three named), else the bytes."""
    paths: list[str] = []
    missing = object()

    def walk(p, q, path: str) -> None:
        if isinstance(p, dict) and isinstance(q, dict):
            for k in sorted(p.keys() | q.keys()):
                walk(p.get(k, missing), q.get(k, missing), f"{path}.{k}" if path else k)
        elif isinstance(p, list) and isinstance(q, list) and len(p) == len(q):
            for i, j in zip(p, q):
                walk(i, j, path)
        elif (p is missing or q is missing or json.dumps(p) != json.dumps(q)) and path not in paths:
            paths.append(path)  # (json.dumps: NaN is NaN)

    try:
        walk(json.loads(a), json.loads(b), "")
    except (ValueError, RecursionError):
        at = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
        return f"{len(a)} and {len(b)} bytes, first different at byte {at}"
    if not paths:
        return "the same JSON, written differently (key order or spacing)"
    if paths == [""]:
        return "the whole JSON answer"
    more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
    return f"JSON field{'s' * (len(paths) > 1)} {', '.join(paths[:3])}{more}"


def parse_signal(name: str) -> int:
    """A stop signal as an image's StopSignal or `docker stop --signal` gives it: SIGTERM, TERM, 15 (any case),
    or a real-time one (SIGRTMIN+3, systemd's; RTMAX-1). ValueError with a one-line reason otherwise."""
    text = str(name).strip().upper()
    text = text if text.startswith("SIG") or text.isdigit() else "SIG" + text
    rt = re.fullmatch(r"SIGRT(MIN|MAX)([+-]\d{1,2})?", text)
    try:
        if text.isdigit():
            sig = int(text)
        elif rt:
            sig = (signal.SIGRTMIN if rt[1] == "MIN" else signal.SIGRTMAX) + int(rt[2] or 0)
        else:
            sig = signal.Signals[text]
    except KeyError:
        sig = 0
    if not 1 <= sig <= signal.SIGRTMAX or (signal.SIGSYS < sig < signal.SIGRTMIN):
        raise ValueError(f"stop signal {str(name)[:40]!r} is not a signal: give a name or number, e.g. SIGTERM, "
                         f"SIGQUIT or 15")
    if sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
        raise ValueError(f"stop signal {signal_name(sig)} would pause the server, not stop it: give e.g. SIGTERM")
    return int(sig)


def signal_name(sig: int) -> str:
    """SIGTERM, or SIGRTMIN+N for a real-time signal: what :func:`parse_signal` reads back."""
    return f"SIGRTMIN+{sig - signal.SIGRTMIN}" if sig > signal.SIGRTMIN else signal.Signals(sig).name


def _gone(pidfd: int, timeout: float = 0.0) -> bool:
    """Whether the process of ``pidfd`` has exited (a pidfd polls readable then; not reaped), waiting up to
    ``timeout`` seconds."""
    return _readable(pidfd, timeout)


def _readable(fd: int, timeout: float) -> bool:
    """poll(), not select(): an agent under load has fds past select's 1024."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(max(0, int(timeout * 1000))))


def _heeds(pid: int, sig: int, own_pid_ns: bool) -> bool:
    """Whether ``sig`` would reach process ``pid``: not ignored, and caught where it is pid 1 of its own pid
    namespace (whose init gets only the signals it has a handler for; elsewhere the default action applies)."""
    try:
        masks = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                     if line.startswith(("SigIgn:", "SigCgt:")))
        ignored, caught = (int(masks[k], 16) >> (sig - 1) & 1 for k in ("SigIgn", "SigCgt"))
    except (OSError, KeyError, ValueError):
        return False  # gone, or not readable: the stop's SIGKILL follows
    return not ignored and (caught or not own_pid_ns)


def open_log(log_path: Path) -> tuple[int, str]:
    """Open (append) a replica's log; the fd and its CRIU external-file id ``file[mnt_id:inode]``."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    try:
        return fd, f"file[{_linux.fd_mnt_id(fd):x}:{os.fstat(fd).st_ino:x}]"
    except BaseException:  # out of fds for /proc/self/fdinfo, say: the log's must not leak
        os.close(fd)
        raise


def launch(root: Path | None, argv: list[str], env: dict[str, str], cwd: str, log_path: Path, *,
           hostname: str = "thaw", timeout: float = 30.0, devices: Sequence = (), cg: Path | None = None,
           user: str = "", shm_bytes: int = 0) -> Replica:
    """Start ``argv`` as pid 1 of new namespaces with ``root`` as its "/"; stdout + stderr append to log_path.

    ``root=None`` keeps the host's filesystem: no mount or pid namespace, only network, UTS and IPC ones. That
    is for a workload installed on the host itself (the GPU benchmark: the host's CUDA torch and driver). A pid
    namespace needs its own /proc, hence its own mount namespace: under the host's /proc the CUDA driver fails
    (``cudaGetDeviceCount``: error 304). So such a replica keeps its host pid, and CRIU restores it under that
    pid: one restored replica per snapshot at a time.
    ``env`` is the whole environment; it travels through a pipe, never on a command line. ``devices``
    (``nvidia.Device``: the host's GPUs) are made in the replica's /dev, which needs a ``root``. ``cg``: the
    cgroup to run it in (snapshot/cgroup.py; None: the caller's). ``user``: the image's ``User`` (``user[:group]``,
    names or ids; empty: root), looked up in the root's /etc/passwd and /etc/group as Docker does. ``shm_bytes``:
    the size of its /dev/shm (0: 64 MiB, Docker's default); a restore keeps it (CRIU remakes the tmpfs as dumped).
    Returns once the workload has been exec()ed (use ``wait_healthy``/``wait_ready`` for its server).
    """
    root, log_path = root and Path(root), Path(log_path)
    where = root or "the host's root"
    if not argv:
        raise ValueError("launch() needs a command")
    t0 = time.monotonic()
    logfd, ext = open_log(log_path)
    fds = [logfd]
    try:
        fds += [*os.pipe(), *os.pipe()]
    except BaseException:  # out of fds: none of these may leak
        for fd in fds:
            os.close(fd)
        raise
    status_r, status_w, env_r, env_w = fds[1:]
    cmd = [*UNSHARE, *(UNSHARE_ROOT if root else []), "--", sys.executable, "-I", "-S", str(NSINIT), "init",
           "--root", str(root or ""),
           "--status-fd", str(status_w), "--env-fd", str(env_r), "--log-fd", str(logfd), "--cwd", cwd,
           "--hostname", hostname, "--devices", ",".join(d.arg() for d in devices), "--user", user,
           *(("--shm-bytes", str(shm_bytes)) if shm_bytes else ()), "--", *argv]
    try:  # unshare's own complaints go to a pipe, read only when the launch fails
        proc = subprocess.Popen(cgroup.join(cg, cmd), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, pass_fds=(status_w, env_r, logfd), start_new_session=True)
    except BaseException:
        os.close(status_r)
        os.close(env_w)
        raise
    finally:
        for fd in (logfd, status_w, env_r):
            os.close(fd)
    replica = None
    try:
        with os.fdopen(status_r, "rb", buffering=0) as status, os.fdopen(env_w, "wb") as envf:
            for line in _lines(status, proc, timeout):
                kind, _, arg = line.partition(" ")
                if kind == "pid":
                    replica = Replica._attach(int(arg), root=root, log_path=log_path, external_files=[ext],
                                              proc=proc)
                    try:
                        envf.write(b"".join(os.fsencode(f"{k}={v}") + b"\0" for k, v in env.items()))
                        envf.close()
                    except BrokenPipeError:
                        pass  # it died first: its error follows on the status pipe
                elif kind == "exec" and replica:
                    replica.timings["launch_ms"] = (time.monotonic() - t0) * 1000
                    proc.stderr.close()
                    return replica
                elif kind == "error":
                    raise ReplicaError(f"launch of {argv[0]!r} in {where} failed: {arg}")
        why = " ".join(proc.stderr.read().decode(errors="replace").split()) or tail(log_path)
        raise ReplicaError(f"launch of {argv[0]!r} in {where} failed (exit {proc.wait()}): {why}; log {log_path}")
    except BaseException as e:
        if replica:
            replica.stop()
        else:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        if isinstance(e, TimeoutError):
            raise ReplicaError(f"launch of {argv[0]!r} in {where} failed: {e}; log {log_path}") from None
        raise


def _lines(f, proc: subprocess.Popen, timeout: float):
    """Lines from a pipe until EOF; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        if not _readable(f.fileno(), deadline - time.monotonic()):
            raise TimeoutError(f"no word from pid {proc.pid} ({proc.args[0]}) after {timeout:g}s")
        chunk = f.read(4096)
        if not chunk:
            return
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.decode(errors="replace")


def tail(path: Path, n: int = 500) -> str:
    """The last ``n`` bytes of a log file, stripped ("" when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - n))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""
