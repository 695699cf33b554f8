"""What a host does with snapshots, Temporal-free: take one, verify one, restore replicas, cold-boot as fallback.

Image and snapshot trees come from the chunk store: lazy FUSE mounts shared by the host's replicas (or, with
``lazy_mounts`` off, copies materialized once under ``work_dir/images/<digest>``). Each replica gets its own
overlay upper layer and its own namespaces; on a GPU host also one GPU (the one that runs the fewest of this
host's replicas), its device nodes and the driver's libraries as one more layer (``nvidia.py``).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from thaw.config import Config
from thaw.errors import first_line
from thaw.files import BUILD_ID, BUILD_ID_RULE, write_atomic
from thaw.imagefs import mount as imagefs_mount
from thaw.imagefs.manifest import ImageManifest
from thaw.imagefs.materialize import materialize_cached
from thaw.imagefs.prefetch import parse_profile, start_prefetch
from thaw.imagefs.store import ChunkStore, StoreError, check_digest, digest_of

from . import _linux, cgroup, compat, criu, cuda, nvidia
from .forward import Forwarder, replica_port
from .pin import Pins
from .replica import (DEFAULT_HEALTH, GOLDEN_TIMEOUT_S, answers_differ, golden_answer as replica_golden_answer,
                      parse_signal, signal_name, tail)
from .sdk import HOOK_TOKEN_ENV

log = logging.getLogger("thaw.snapshot")
RECORD = "replica.json"
LOGS = "replica-logs"  # <work>/replica-logs/<replica>/: its output and CRIU's log, outside its dir
BUILD_LOGS = "build-logs"  # <work>/build-logs/<build>/: its launch's output, CRIU's logs, outside its dir
LOGS_KEPT = 20  # the logs of this many replicas that failed to start, died or failed their health checks (and
# of builds that ended) stay on the host
PROFILE = "thaw-access.json"  # the image chunks a restore of the snapshot reads, stored with it
BOOT_PROFILE = "thaw-boot-access.json"  # the image chunks the launch (a cold boot) read, stored with it
PROFILE_ERRORS = (StoreError, ValueError, KeyError, IndexError)  # a manifest or profile that can't be read now
RESULT = "result.json"
CAUSE_SEARCH_S = 10.0  # after a failed CRIU restore: how long to look for a bad chunk to name as the cause
DISCARDED_KEPT_S = 86400.0  # how long an agent refuses checkpoint attempts of a build whose workflow ended
GOLDEN_AGAIN_S = 1.1  # a launch asks the golden request again this long after the first: a time in seconds changes


class SnapshotError(Exception):
    """A snapshot could not be taken or used; the message is one line and names the log to read."""


@dataclass
class Stages:
    """Per-stage wall times in ms, in the order they ran."""

    ms: dict[str, int] = field(default_factory=dict)
    t: float = field(default_factory=time.monotonic)
    t0: float = field(default_factory=time.monotonic)

    def mark(self, stage: str) -> None:
        now = time.monotonic()
        self.ms[stage] = self.ms.get(stage, 0) + int((now - self.t) * 1000)
        self.t = now

    def done(self) -> dict[str, int]:
        return {**self.ms, "total": int((time.monotonic() - self.t0) * 1000)}


COUNTS = ("_chunks", "_kb")  # keys of the breakdown that are counts, not milliseconds


def breakdown(ms: dict[str, int]) -> str:
    """The one-line stage breakdown every restore logs."""
    return " ".join(f"{k}={v}" if k.endswith(COUNTS) else f"{k}={v}ms" for k, v in ms.items())


def _starttime(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_record(path: Path, pid: int) -> None:
    """Name the replica process a directory belongs to, for :func:`clear` (pid + start time: never a reused pid).
    Written whole or not at all (a temporary file renamed)."""
    write_atomic(path, json.dumps({"pid": pid, "start": _starttime(pid)}), durable=False)


def stop_until_gone(replica: criu.Replica, beat: Callable[[str], None]) -> None:
    """Stop a replica of a build (its launch, its profile restore). One that outlives its SIGKILL (a driver
    tearing down much device memory, say) is waited for, heartbeating, before the build gives back what it holds:
    its GPU loan, root and mount, and its dir, which the build's next attempt clears and mounts again."""
    while True:
        try:
            return replica.stop()
        except criu.ReplicaError as e:
            log.warning("%s; waiting for it to go", e)
            beat("stop")


@dataclass
class Running:
    """A serving replica: the process tree and the overlay root it runs on, recorded in ``record``."""

    id: str
    replica: criu.Replica
    root: criu.Root
    port: int
    record: Path | None = None
    logs: Path | None = None  # its log dir: removed by a plain stop, kept (see prune_logs) with ``keep_logs``
    keep_logs: bool = False  # set for a replica that failed to start, died or failed its health checks: its
    # output stays
    forwarders: dict[int, "Forwarder"] = field(default_factory=dict)  # replica port -> its host listener
    health: str = DEFAULT_HEALTH  # its server's health path (the snapshot's spec)
    health_failures: int = 0  # health checks failed in a row while it serves (see check_health)
    stop_signal: int = signal.SIGTERM  # what asks its server to exit (the image's StopSignal; see stop)
    stopped: bool = False
    on_stop: Callable[[], None] | None = None  # gives back what the host lent the replica (its GPU)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _waiting: bool = False  # a thread waits for a replica that outlived its SIGKILL, to finish the stop

    def __post_init__(self):
        if self.record:  # lets a restarted agent stop what a killed one left (see cleanup_stale)
            write_record(self.record, self.replica.pid)

    def publish(self, bind: str = "127.0.0.1", ports: tuple[int, ...] | list[int] = ()) -> str:
        """Make the replica's server, and any other ``ports`` of the replica, reachable from the host; returns the
        server's endpoint URL (the others: :attr:`published`)."""
        for port in (self.port, *ports):
            if port not in self.forwarders:
                self.forwarders[port] = Forwarder(replica_port(self.replica, port), bind)
        return self.forwarders[self.port].endpoint

    def health_error(self, timeout: float) -> str | None:
        """GET the server's health path once, as its start did: None if it answers 200 (or was stopped meanwhile:
        not a failure of its server), else what went wrong."""
        try:
            status, body = self.replica.http_request("GET", self.health, port=self.port, timeout=timeout)
        except (OSError, http.client.HTTPException) as e:
            return None if self.stopped else f"GET {self.health}: {type(e).__name__}: {e}"
        except criu.ReplicaError:  # "replica N is stopped": its network namespace is gone
            return None
        return None if status == 200 else f"GET {self.health}: HTTP {status} {body[:200]!r}"

    @property
    def published(self) -> dict[str, str]:
        """The replica's other published ports: ``{"9090": "host:port"}``."""
        return {str(p): f.address for p, f in self.forwarders.items() if p != self.port}

    def stop(self, grace: float = 0.0, abort: threading.Event | None = None) -> None:
        """Stop the process tree and release its root (once: later calls do nothing). With ``grace``, its server
        first gets ``stop_signal`` and that long (less once ``abort`` is set) to exit on its own, its published
        ports still open: the requests under way finish. A plain stop meanwhile kills it at once. A process that
        outlives its SIGKILL's timeout (a driver tearing down much device memory, say) is a ReplicaError; it keeps
        its record, GPU and root until it is gone, when a thread waiting for it finishes the stop."""
        if grace and not self.stopped:
            t0 = time.monotonic()
            try:
                gone = self.replica.terminate(self.stop_signal, grace, abort)
            except Exception as e:  # noqa: BLE001 - the kill below must still come
                log.warning("replica %s: its stop signal failed: %s: killed", self.id, e)
            else:
                took = f"{time.monotonic() - t0:.1f}s"
                log.info("replica %s: %s", self.id, f"exited {took} after its stop signal" if gone else
                         f"still there {took} after its stop signal (or it does not take "
                         f"{signal_name(self.stop_signal)}): killed")
        with self._lock:
            if self.stopped:
                return
            for f in self.forwarders.values():
                f.close()
            try:
                self.replica.stop()
            except criu.ReplicaError as e:
                if not self._waiting:
                    self._waiting = True
                    log.warning("replica %s: %s; its stop ends once it is gone", self.id, e)
                    threading.Thread(target=self._stop_once_gone, name=f"thaw-stop-{self.id}", daemon=True).start()
                raise
            self.stopped = True
        if self.on_stop:
            self.on_stop()
        self.root.cleanup()
        if self.record:
            shutil.rmtree(self.record.parent, ignore_errors=True)
        if self.logs:
            _end_logs(self.logs, self.keep_logs)

    def _stop_once_gone(self) -> None:
        self.replica.proc.wait()
        try:
            self.stop()
        except (criu.ReplicaError, OSError) as e:
            log.error("replica %s: not stopped: %s", self.id, e)


def _stop_after_failure(running: Running) -> None:
    """Stop a replica whose start failed, keeping its logs (the error names them); what failed the start stays
    the error to report."""
    running.keep_logs = True
    try:
        running.stop()
    except criu.ReplicaError:  # it outlived its SIGKILL: stopped once gone (logged)
        pass
    except OSError as e:  # its root would not unmount: the next agent start clears it (cleanup_stale)
        log.warning("replica %s: clean-up after a failed start: %s", running.id, e)


def _kill_if(pid: int, still: Callable[[int], bool]) -> None:
    """SIGKILL ``pid`` if ``still(pid)`` holds once the process is held by a pidfd: a check on a bare pid, then a
    kill, could hit another process given the number in between."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # gone
        return
    try:
        if still(pid):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:  # exited meanwhile
        pass
    finally:
        os.close(pidfd)


def clear(d: Path) -> None:
    """Stop the replica recorded in ``d`` (by pid, only if that pid still has the recorded start time),
    unmount whatever is mounted under ``d``, remove ``d``: what an agent that died left behind."""
    rec = d / RECORD
    try:
        info = json.loads(rec.read_text() or "{}")
    except (OSError, ValueError):  # none, or cut short by a killed agent: the mount scan below still finds it
        info = {}
    if info.get("pid") and info.get("start"):
        _kill_if(info["pid"], lambda p: _starttime(p) == info["start"])
    mine = os.readlink("/proc/self/ns/mnt")
    for pid in _pids_using(d):  # replicas that no record names: their agent was killed mid-restore
        _kill_if(pid, lambda p: _uses(str(p), d, mine))  # (the scan took a while: it may have exited since)
    for mnt in sorted((m for m in _linux.mountpoints() if m.startswith(f"{d}/")), key=len, reverse=True):
        with contextlib.suppress(OSError):
            _linux.umount(mnt, _linux.MNT_DETACH)
    shutil.rmtree(d, ignore_errors=True)


def _pids_using(d: Path) -> list[int]:
    """Processes in other mount namespaces whose root ("/") is a mount naming a path under ``d`` (a replica on
    its overlay root). Not those that merely hold a copy of such a mount: a criu (and the reaper it becomes)
    restoring another replica copied the agent's mounts of that moment into its namespace."""
    mine = os.readlink("/proc/self/ns/mnt")
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and _uses(name, d, mine)]


def _uses(pid: str, d: Path, mine: str) -> bool:
    """Whether process ``pid``, in a mount namespace other than ``mine``, has a root naming a path under ``d``."""
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt") != mine and any(
            m.mountpoint == "/" and any(f"{d}/" in p for p in _named_paths(m)) for m in imagefs_mount.mountinfo(pid))
    except OSError:
        return False


def _named_paths(m: imagefs_mount.MountInfo) -> list[str]:
    """The paths a mount names, unescaped: its root, its source and its options' values (an overlay's layers)."""
    return [m.root, m.source, *(imagefs_mount.unescape(o) for o in m.super_options.split(","))]


def cleanup_stale(work_dir: Path) -> int:
    """On agent start: clear every replica dir, and every build dir whose checkpoint did not finish."""
    n = 0
    for kind in ("replicas", "builds"):
        parent = work_dir / kind
        for d in sorted(parent.iterdir()) if parent.is_dir() else []:
            if kind == "builds" and (d / RESULT).exists():
                continue
            clear(d)
            n += 1
    prune_logs(work_dir)
    return n


def _end_logs(logs: Path, keep: bool) -> None:
    """A replica's (or build's) log dir (``<work>/LOGS/<id>``) when it ends: removed, or kept, dated now, and the
    oldest kept beyond LOGS_KEPT pruned."""
    if not keep:
        shutil.rmtree(logs, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        os.utime(logs)
    prune_logs(logs.parent.parent)


def prune_logs(work_dir: Path, keep: int = LOGS_KEPT) -> None:
    """Remove the log dirs of ended replicas (no dir under ``<work>/replicas`` any more: they failed to start,
    died, or their agent did) but the ``keep`` that ended last (at each kept end and agent start); the same for
    builds (``<work>/builds``: each build's dir goes when its workflow ends; its logs, which its errors name,
    stay). A replica stopped plainly took its logs with it."""
    for logs, live in ((LOGS, "replicas"), (BUILD_LOGS, "builds")):
        ended = []
        for d in (work_dir / logs).iterdir() if (work_dir / logs).is_dir() else []:
            with contextlib.suppress(FileNotFoundError):  # pruned by another one's end meanwhile
                if not (work_dir / live / d.name).exists():
                    ended.append((d.stat().st_mtime, d))
        for _, d in sorted(ended, reverse=True)[keep:]:
            shutil.rmtree(d, ignore_errors=True)


def dir_id(kind: str, name: str) -> str:
    """``name``, a build's or a replica's id, where it is safe as a directory name; SnapshotError else."""
    if not BUILD_ID.fullmatch(name):
        raise SnapshotError(f"{kind} id {name!r}: {BUILD_ID_RULE}")
    return name


def cold_id(rid: str) -> str:
    """The name of replica ``rid``'s dirs when it cold-boots (a fallback keeps the id of its failed restore)."""
    return f"{rid}.cold"


def ended_logs(work_dir: Path, rid: str, n: int) -> str | None:
    """The end of the logs replica ``rid`` left on this host (``n`` bytes shared among them): those of a failed
    start (its restore's and CRIU's, its fallback cold boot's) or of a replica that died, each headed
    ``==> path <==`` as tail heads them (not CRIU's binary stats file); None when it left none."""
    dir_id("replica", rid)
    files = [p for d in (rid, cold_id(rid)) for p in sorted((work_dir / LOGS / d).glob("*.log")) if p.is_file()]
    return "\n\n".join(f"==> {p} <==\n{tail(p, max(1, n // len(files)))}" for p in files) or None


def release_dead(cfg: Config) -> None:
    """What an agent of ``cfg.host_id`` that died left, for a host no agent will run on again: what a restarted
    agent clears (:func:`cleanup_stale`), and what a restarted one would have reused (the image and snapshot
    mounts, the replicas' cgroup)."""
    cleanup_stale(cfg.work_dir)
    clear(cfg.work_dir / "mnt")
    cgroup.remove(cgroup.path_of(replicas_cgroup(cfg.host_id)), wait_s=5)  # its replicas were just SIGKILLed


def is_root(user: str) -> bool:
    """Whether a Docker ``User`` value (``user[:group]``, names or ids; empty: the default) is root's."""
    return all(part in ("", "root", "0") for part in user.split(":", 1))


def replicas_cgroup(host_id: str) -> str:
    """The name of the cgroup a host's replicas run in (snapshot/cgroup.py)."""
    return f"thaw-replicas-{host_id}"


def golden_answer(replica: criu.Replica, port: int, golden: dict, timeout: float = GOLDEN_TIMEOUT_S) -> bytes:
    try:
        return replica_golden_answer(replica, port, golden, timeout)
    except criu.ReplicaError as e:
        raise SnapshotError(str(e)) from None


def after_restore(replica: criu.Replica, spec: dict, env: dict[str, str], rid: str | None = None,
                  optional_env: dict[str, str] | None = None) -> None:
    """The after-restore hook of a replica of ``spec`` (a snapshot's), delivering ``env`` and ``optional_env``:
    optional for a server without the SDK unless ``env`` (secrets, a deployment's env) has something to deliver;
    a failing callback of the SDK or its refusal (HookFailed) is always an error."""
    try:
        criu.after_restore(replica, spec["port"], {**env, **(optional_env or {})}, rid,
                           token=spec.get("hook_token") or "")
    except criu.ReplicaError as e:
        if env or isinstance(e, criu.HookFailed):
            raise
    except (OSError, http.client.HTTPException) as e:  # a server without the hook that hangs up or stalls on
        if env:  # the POST: optional, and its health check is what says whether it serves
            raise SnapshotError(f"replica {replica.pid}: its after-restore hook failed: "
                                f"{first_line(e, typed=True)}") from None


def use_huge_pages(mode: str, snapshot_facts: dict) -> bool:
    """Config.restore_huge_pages for one snapshot: "gpu" means only snapshots that hold GPU state (on the H100
    their restore was 20-34 % faster; on a small VM whose freed memory goes back to the hypervisor, CPU restores
    into huge pages were sometimes 5x slower: docs/benchmarks.md, P6)."""
    return mode == "always" or (mode == "gpu" and compat.needs_gpu(snapshot_facts))


class HostSnapshots:
    def __init__(self, cfg: Config, store: ChunkStore | None = None):
        self.cfg = cfg
        self.store = store or ChunkStore.open(cfg)
        self.facts = compat.host_facts()
        if self.gpu is None:  # GPUs its replicas cannot use (passthrough off, no driver libraries): not advertised,
            self.facts = compat.snapshot_facts(self.facts, uses_gpu=False)  # so no GPU snapshot is placed here
        self.mounts: dict[Path, imagefs_mount.MountHandle] = {}
        self._used: dict[Path, float] = {}  # mount point -> when a caller last asked for it (monotonic)
        self._image_of: dict[str, str] = {}  # snapshot digest -> its image's, for the snapshots restored here
        self.mount_lock = threading.Lock()  # guards self.mounts, self._used and self._mounting
        self._mounting: dict[Path, threading.Lock] = {}  # one per mount point: trees mount side by side
        self.pins = Pins(cfg.pin_mb << 20)  # restored snapshots' memory pages, kept in RAM
        self._pinner = ThreadPoolExecutor(1, thread_name_prefix="thaw-pin")  # off the restore's critical path
        self._mounter = ThreadPoolExecutor(4, thread_name_prefix="thaw-mount")
        self._gpu_lock = threading.Lock()
        self._builds: dict[str, threading.Lock] = {}  # build id -> held while a checkpoint attempt or discard runs
        # builds whose workflow ended (-> when): a checkpoint attempt that waited for the discard is refused
        self._discarded: dict[str, float] = {}
        self._builds_lock = threading.Lock()  # guards both
        self._gpu_load: dict[int, int] = {}  # GPU number -> replicas (and launches) on it now
        for d in ("images", "snapshots", "builds", "replicas"):
            (cfg.work_dir / d).mkdir(parents=True, exist_ok=True)
        # images are mounted below (setuid files, maybe device nodes: a user here must not run or open them)
        os.chmod(cfg.work_dir, 0o700)

    # -- inputs -------------------------------------------------------------------------------------
    def _tree(self, kind: str, digest: str) -> Path:
        """An image or snapshot tree on this host: a lazy FUSE mount shared by every replica (chunks are
        fetched on first read), or with ``lazy_mounts`` off a copy materialized once."""
        check_digest(digest)  # it names a directory here
        if not self.cfg.lazy_mounts:
            return materialize_cached(self.store, digest, self.cfg.work_dir / kind)
        mp = self.cfg.work_dir / "mnt" / kind / digest
        with self.mount_lock:
            self._used[mp] = time.monotonic()
            h, lock = self.mounts.get(mp), self._mounting.setdefault(mp, threading.Lock())
        if h is not None and h.alive():
            return mp
        with lock:
            h = self.mounts.get(mp)
            if h is None or not h.alive():
                if h is not None:
                    self.pins.unpin(digest)  # its locked pages belong to the dead mount
                # a daemon left by an earlier agent keeps serving (it is idle and correct); else a new one
                h = imagefs_mount.attach(self.cfg, mp) or imagefs_mount.mount(self.cfg, digest, mp)
                with self.mount_lock:
                    self.mounts[mp] = h
        return mp

    def release_idle(self, idle_s: float) -> list[str]:
        """Unmount the image and snapshot trees that nobody asked for in ``idle_s`` seconds and that no overlay
        (a replica's or a build's root) has as a layer, except a pinned snapshot's trees (it is hot: a buffer
        host warmed for it, or restored recently): a long-running host does not keep a daemon per tree it ever
        served. Returns the digests released; the next use mounts again."""
        now, pinned = time.monotonic(), set(self.pins.pinned())
        with self.mount_lock:
            hot = pinned | {self._image_of[s] for s in pinned if s in self._image_of}
            idle = [mp for mp in self.mounts if now - self._used.get(mp, now) > idle_s and mp.name not in hot]
        if not idle:
            return []
        busy = _linux.overlay_lowers()  # a snapshot's tree is a layer through its dir of writes (criu.WRITES)
        released = []
        for mp in idle:
            lock = self._mounting[mp]
            in_use = any(Path(b).is_relative_to(mp) for b in busy)
            if in_use or not lock.acquire(blocking=False):  # in use, or being mounted right now
                continue
            try:
                with self.mount_lock:  # asked for since the look above: keep it (_tree sets _used under this lock)
                    if time.monotonic() - self._used.get(mp, 0) <= idle_s:
                        continue
                    h = self.mounts.pop(mp)
                    self._used.pop(mp, None)
                with contextlib.suppress(imagefs_mount.MountError, OSError):
                    h.unmount()
                released.append(mp.name)
            finally:
                lock.release()
        if released:
            log.info("host %s: unmounted %d tree(s) idle for %.0f s: %s", self.cfg.host_id, len(released), idle_s,
                     ", ".join(d[:12] for d in released))
        return released

    def trees(self, snap: dict) -> tuple[Path, Path]:
        """(snapshot files, image root) of ``snap``; on a host that has mounted neither, both daemons start
        side by side (each takes a few hundred ms: Python, the manifest, the index)."""
        with self.mount_lock:
            self._image_of[snap["digest"]] = snap["image_digest"]
        files = self._mounter.submit(self.snapshot_files, snap["digest"])
        lower = self.image_root(snap["image_digest"])
        return files.result(), lower

    def image_root(self, image_digest: str) -> Path:
        return self._tree("images", image_digest)

    def snapshot_files(self, digest: str) -> Path:
        return self._tree("snapshots", digest)

    @functools.cached_property
    def gpu(self) -> nvidia.GpuAccess | None:
        """This host's GPUs for image-rooted replicas (device nodes + the driver's libraries as a root layer);
        None on a CPU host, with ``gpu_passthrough`` off, or where the driver's libraries can't be found."""
        if not self.cfg.gpu_passthrough or not compat.needs_gpu(self.facts):
            return None
        try:
            return nvidia.for_host(self.cfg.work_dir / "gpu-driver", self.facts.get("nvidia_driver", "unknown"),
                                   self.facts.get("gpu_uuids", []))
        except (nvidia.GpuAccessError, OSError, subprocess.SubprocessError) as e:  # nvidia-modprobe timed out
            log.warning("host %s: replicas get no GPU: %s", self.cfg.host_id, e)
            return None

    @functools.cached_property
    def cgroup(self) -> Path | None:
        """The cgroup every replica of this host runs in, below the agent (snapshot/cgroup.py): made at the first
        launch or restore. None with ``replica_cpu_weight`` 0 or where this host does not allow one."""
        weight = self.cfg.replica_cpu_weight
        return cgroup.create(replicas_cgroup(self.cfg.host_id), weight) if weight else None

    def _root(self, image_root: Path, rw: Path, writes: Path | None = None) -> criu.Root:
        """A replica's root: a fresh overlay of the image (under the GPU driver's layer on a GPU host), and of
        ``writes`` on top where that is a directory: what the snapshot's launched process wrote to its root."""
        layers = [self.gpu.layer, image_root] if self.gpu else [image_root]
        return criu.prepare_root([writes, *layers] if writes and writes.is_dir() else layers, rw)

    def _launch(self, root: criu.Root, spec: dict, env: dict[str, str], log_path: Path, slot: int | None
                ) -> criu.Replica:
        gpu = self.gpu
        if spec.get("hook_token"):  # the SDK's hooks ask for it (and it takes it out of os.environ)
            env = {**env, HOOK_TOKEN_ENV: spec["hook_token"]}
        return criu.launch(root.path, spec["cmd"], gpu.env(env, slot) if gpu else env, spec.get("cwd") or "/",
                           log_path, devices=gpu.devices_for(slot) if gpu else (), cg=self.cgroup,
                           user=spec.get("user") or "", shm_bytes=spec.get("shm_bytes") or 0)

    def take_gpu(self, snapshot_facts: dict | None = None) -> int | None:
        """Lend a new replica the GPU that runs the fewest of this host's replicas (its number in the order of
        the host's ``gpu_uuids``) until :meth:`give_gpu`; None on a host without GPUs to hand out one by one.
        ``snapshot_facts`` None: a launch. For a restore of ``snapshot_facts``: no GPU for a CPU-only snapshot;
        the snapshot's own GPU wins a tie, and is the only choice where the driver cannot move a process to
        another GPU (before 580); otherwise the lowest number wins a tie."""
        gpus = self.gpu.gpus if self.gpu else ()
        snap_gpus = (snapshot_facts or {}).get("gpu_uuids", [])
        if snapshot_facts is not None and not compat.needs_gpu(snapshot_facts):
            return None
        if not gpus or len(snap_gpus) > 1:  # taken before GPUs were lent one by one: every GPU, mapped in
            return None  # order, as then
        own = [i for i, (u, _) in enumerate(gpus) if [u] == snap_gpus]
        with self._gpu_lock:
            if own and not cuda.can_move_gpu(self.facts.get("nvidia_driver")):
                slot = own[0]
            else:
                slot = min(range(len(gpus)), key=lambda i: (self._gpu_load.get(i, 0), i not in own, i))
            self._gpu_load[slot] = self._gpu_load.get(slot, 0) + 1
        return slot

    def give_gpu(self, slot: int | None) -> None:
        if slot is not None:
            with self._gpu_lock:
                self._gpu_load[slot] -= 1

    def gpu_loads(self) -> list[int]:
        """Replicas on each GPU, in the order of ``gpu_uuids`` ([] without GPUs handed out one by one)."""
        with self._gpu_lock:
            return [self._gpu_load.get(i, 0) for i in range(len(self.gpu.gpus if self.gpu else ()))]

    def _own(self, rid: str, start: Callable[[], criu.Replica], root: criu.Root, spec: dict, work: Path,
             logs: Path, slot: int | None) -> tuple[criu.Replica, Running]:
        """Start a replica process on ``root`` (a restore or a launch) and record it as this host's. If either
        fails, nothing stays: not the process (nobody would own it), its GPU loan, its root or its dir; only its
        logs (the error names them)."""
        replica = None
        try:
            replica = start()
            return replica, Running(rid, replica, root, spec["port"], work / RECORD, logs, health=spec["health"],
                                    stop_signal=parse_signal(spec.get("stop_signal") or "SIGTERM"),
                                    on_stop=functools.partial(self.give_gpu, slot))
        except BaseException:
            def release() -> None:
                self.give_gpu(slot)
                root.cleanup()
                shutil.rmtree(work, ignore_errors=True)
                _end_logs(logs, keep=True)  # the error names them

            alive = None
            try:
                if replica is not None:
                    replica.stop()
            except criu.ReplicaError as e:  # it outlived its SIGKILL: its GPU, root and dir stay its own till gone
                alive = replica
                log.error("replica %s: not stopped after its failed start (%s); what it uses goes once it is gone",
                          rid, first_line(e))
                threading.Thread(target=lambda: (alive.proc.wait(), release()), name=f"thaw-release-{rid}",
                                 daemon=True).start()
            finally:
                if alive is None:
                    release()
            raise  # what failed the start

    def close(self) -> None:
        """Unpin and unmount this host's image and snapshot trees, remove its replicas' cgroup (stop the replicas
        first)."""
        pinner, self._pinner = self._pinner, ThreadPoolExecutor(1, thread_name_prefix="thaw-pin")
        pinner.shutdown(wait=True, cancel_futures=True)
        self.pins.close()  # a locked mapping would keep its FUSE mount busy
        with self.mount_lock:
            handles, self.mounts = list(self.mounts.values()), {}
        for h in handles:
            with contextlib.suppress(imagefs_mount.MountError, OSError):
                h.unmount()
        cgroup.remove(self.__dict__.pop("cgroup", None))  # if made and empty; the next replica makes it again

    def warm(self, snap: dict) -> dict[str, int]:
        """Ready this host for ``snap`` before a restore is asked of it (a buffer host just reserved for a
        deployment): mount its image and snapshot trees, fetch what a restore reads where chunks come from a
        remote tier, and pin the snapshot's memory pages in RAM (reading them all). That is what the first
        restore here would otherwise wait for. Stage timings; {} where the snapshot cannot be restored."""
        if compat.check(snap["host_facts"], self.facts):
            return {}
        st = Stages()
        files, _ = self.trees(snap)
        st.mark("mount")
        if self._prefetching:
            fetch = self._prefetch(snap)
            try:
                fetch.wait()
            finally:  # cancelled, say
                fetch.cancel()
            st.mark("fetch")
        self._pinner.submit(self.pins.pin, snap["digest"], files).result()
        st.mark("pin")
        return st.done()

    @property
    def _prefetching(self) -> bool:
        """Prefetch pays off only on lazy mounts whose chunks come from a remote tier (a local store serves
        reads at once)."""
        return bool(self.cfg.lazy_mounts and self.cfg.prefetch and self.store.remote)

    def _prefetch(self, snap: dict):
        """Fetch, in parallel and in the background, what a restore reads: every chunk of the CRIU images and
        the image chunks recorded by the build's profiling restore (in first-read order). Not the files the
        server wrote before its snapshot (weights it downloaded, say): they are read by need, and a file it
        kept open for writing is read whole when the restore copies it up. Returns the handle; None where the
        snapshot's manifest or profile can't be read now (the restore reads by need: its mounts are up)."""
        try:
            manifest = ImageManifest.load(self.store, snap["digest"])
            digests = [c[0] for e in manifest.files() if not e.path.startswith(f"{criu.WRITES}/") for c in e.chunks]
            digests += self._stored_profile(manifest, PROFILE)
        except PROFILE_ERRORS as e:
            log.warning("no prefetch for snapshot %s: %s", snap["digest"][:12], first_line(e))
            return None
        return start_prefetch(self.store, list(dict.fromkeys(digests)), self.cfg.prefetch_concurrency)

    def _stored_profile(self, manifest: ImageManifest, name: str) -> list[str]:
        """The chunk digests of access profile ``name`` among a snapshot's files, read from the store ([] when
        the snapshot has none)."""
        entry = next((e for e in manifest.files() if e.path == name), None)
        return parse_profile(b"".join(self.store.get_chunk(d) for d, _ in entry.chunks)) if entry else []

    def secrets(self, names: list[str]) -> dict[str, str]:
        if not names:
            return {}
        try:
            values = self.cfg.secrets()
        except ValueError as e:
            raise SnapshotError(f"host {self.cfg.host_id}: {e}") from None
        missing = [n for n in names if n not in values]
        if missing:
            raise SnapshotError(f"secret(s) {', '.join(missing)} not set on host {self.cfg.host_id}: "
                                f"`thaw secrets set NAME` first")
        return {n: values[n] for n in names}

    def _replica_root(self, rid: str, image_root: Path, writes: Path | None = None) -> tuple[Path, Path, criu.Root]:
        """A new replica's dir, its log dir (which outlives it if it fails to start or dies: see prune_logs) and
        its root (with a snapshot's ``writes``, see :meth:`_root`); nothing of them stays if the root cannot be
        made."""
        d, logs = self.cfg.work_dir / "replicas" / rid, self.cfg.work_dir / LOGS / rid
        d.mkdir(parents=True, exist_ok=True)
        logs.mkdir(parents=True, exist_ok=True)
        try:
            return d, logs, self._root(image_root, d / "rw", writes)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            shutil.rmtree(logs, ignore_errors=True)
            raise

    # -- build --------------------------------------------------------------------------------------
    def _build_dir(self, build_id: str) -> Path:
        return self.cfg.work_dir / "builds" / dir_id("build", build_id)

    def _build_logs(self, build_id: str) -> Path:
        return self.cfg.work_dir / BUILD_LOGS / dir_id("build", build_id)

    def finished_builds(self) -> list[str]:
        """Ids of the builds whose checkpoint finished on this host and whose dir is still here."""
        builds = self.cfg.work_dir / "builds"
        return sorted(d.name for d in builds.iterdir() if (d / RESULT).exists()) if builds.is_dir() else []

    @contextlib.contextmanager
    def build_lock(self, build_id: str):
        """Held by a checkpoint attempt, a store attempt and a discard of ``build_id``: a retry that arrives while
        an attempt that timed out still runs here (blocked in a dump, say) waits for it instead of clearing its dir
        (or, storing, reading a dump the other drops). Waits in 1 s steps: a cancel that Temporal raises into the
        waiting thread lands between them."""
        with self._builds_lock:
            lock = self._builds.setdefault(build_id, threading.Lock())
        while not lock.acquire(timeout=1):
            pass
        try:
            yield lock
        finally:
            lock.release()

    def discard(self, build_id: str) -> None:
        """Drop build ``build_id``'s dir (its dump, records) once its workflow has ended; its logs stay (see
        prune_logs). What the agent remembers of ended builds is bounded: their locks go now (an attempt already
        waiting on one is refused when it gets it; a later one takes a new lock and is refused too), their ids
        after DISCARDED_KEPT_S, long past any attempt of a closed workflow."""
        with self.build_lock(build_id) as lock:
            now = time.monotonic()
            with self._builds_lock:
                self._discarded = {b: t for b, t in self._discarded.items() if now - t < DISCARDED_KEPT_S}
                self._discarded[build_id] = now
            clear(self._build_dir(build_id))
            _end_logs(self._build_logs(build_id), keep=True)  # (one that failed before its launch has none)
        with self._builds_lock:  # the lock this discard held: not a newer one (another discard's, say)
            if self._builds.get(build_id) is lock:
                del self._builds[build_id]

    def take(self, build_id: str, image_digest: str, spec: dict, golden: dict,
             beat: Callable[[str], None] = lambda stage: None) -> dict:
        """Launch once, wait healthy, answer the golden request, checkpoint. Idempotent per build_id."""
        with self.build_lock(build_id):
            if build_id in self._discarded:  # an attempt that waited out its workflow's end: nobody wants it
                raise SnapshotError(f"build {build_id} has ended (its dir was dropped): not launched again")
            return self._take(build_id, image_digest, spec, golden, beat)

    def _take(self, build_id: str, image_digest: str, spec: dict, golden: dict,
              beat: Callable[[str], None]) -> dict:
        work = self._build_dir(build_id)
        done = work / RESULT
        if done.exists():
            return json.loads(done.read_text())
        if not spec.get("port"):  # 0 means "the image's": plan_snapshot fills it in, an older build worker did not
            raise SnapshotError("the snapshot's spec has no port: the build worker is older than this agent; "
                                "upgrade it, or give --port")
        user = spec.get("user") or ""
        if not is_root(user) and not _linux.has_capability(_linux.CAP_SYS_RESOURCE):
            raise SnapshotError(f"the server runs as user {user!r} (the image's User), and CRIU needs "
                                f"CAP_SYS_RESOURCE to checkpoint another user's process; host {self.cfg.host_id}'s "
                                f"agent lacks it (run it with that capability, or build with --user root)")
        self.secrets(spec.get("secrets") or [])  # the verify delivers them: one missing here fails before the launch
        clear(work)  # an earlier attempt's leftovers
        work.mkdir(parents=True)
        logs = self._build_logs(build_id)  # outside work: the errors below name them, and they outlive it
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        st = Stages()
        beat("root")
        with contextlib.ExitStack() as cleanup:
            rec = None
            if self.cfg.lazy_mounts:  # the launch is a cold boot: on a mount of its own that records what it
                # reads, the prefetch profile of fallback cold boots on hosts whose cache is cold (cold_boot)
                rec = imagefs_mount.mount(self.cfg, image_digest, work / "image-boot", record=work / BOOT_PROFILE)
                cleanup.callback(rec.unmount)  # last: writes the boot profile
            root = self._root(Path(rec.mountpoint) if rec else self.image_root(image_digest), work / "rw")
            cleanup.callback(root.cleanup)
            slot = self.take_gpu()
            cleanup.callback(self.give_gpu, slot)
            st.mark("root")
            beat("launch")
            replica = self._launch(root, spec, spec["env"], logs / "launch.log", slot)
            ready_s = spec.get("ready_timeout_s", 600)
            ready_by = time.monotonic() + ready_s
            try:
                write_record(work / RECORD, replica.pid)
                replica.wait_ready(spec["port"], spec["health"], timeout=ready_s, beat=lambda: beat("launch"))
                st.mark("cold_boot")
                # The first request may load what a server loads on demand: it has what is left of
                # --ready-timeout. A restore's replay is a later request, so an answer that changes (an id, a time
                # in seconds) fails the build here, not after the dump and the store.
                asked = time.monotonic()
                answer = golden_answer(replica, spec["port"], golden, max(GOLDEN_TIMEOUT_S, ready_by - asked))
                time.sleep(max(0.0, asked + GOLDEN_AGAIN_S - time.monotonic()))
                again = golden_answer(replica, spec["port"], golden)
                if again != answer:
                    raise SnapshotError(
                        f"the server answered the golden request {golden.get('method')} {golden.get('path')} "
                        f"differently twice in a row ({answers_differ(answer, again)}), so no restore could match "
                        f"it: give --golden-ignore FIELD for what changes with each request (ids, timestamps), or "
                        f"a request whose answer does not change")
                st.mark("golden")
                beat("checkpoint")
                # e.g. park_weights: weights to host memory
                sdk = criu.before_snapshot(replica, spec["port"], token=spec.get("hook_token") or "")
                if spec.get("secrets") and not sdk:  # before a dump and store of GBs that no restore could use
                    raise SnapshotError(f"--secret {', '.join(spec['secrets'])}: the server does not use thaw_sdk, "
                                        f"and secrets reach a restored server only through its after-restore hook; "
                                        f"use thaw_sdk (snapshot/sdk.py), or build without --secret")
                st.mark("before_snapshot")
                gpu_pids = cuda.tree_uses_nvidia(replica.pid)  # /proc scan, no driver needed on CPU hosts
                dump = functools.partial(criu.checkpoint, replica, work / "dump", log_path=logs / "dump.log")
                if gpu_pids:  # lock -> device memory to host -> CRIU dump; a half-done checkpoint raises
                    ck = cuda.GpuCheckpointer()
                    gpu_pids = [p for p in gpu_pids if ck.uses_gpu(p)]
                    st.ms.update(ck.around_dump(gpu_pids, dump).timings_ms)
                else:
                    dump()
                st.mark("dump")
            finally:
                stop_until_gone(replica, beat)
            kept = root.keep_writes(work / "dump" / criu.WRITES)  # what it wrote is its state too
            if kept:
                log.info("build %s: %d file(s) and dir(s) the server wrote to its root kept with the snapshot",
                         build_id, kept)
        if (work / BOOT_PROFILE).exists():
            shutil.copy2(work / BOOT_PROFILE, work / "dump" / BOOT_PROFILE)
        facts = compat.snapshot_facts(self.facts, uses_gpu=bool(gpu_pids))
        facts["gpu_processes"] = len(gpu_pids)
        if gpu_pids and slot is not None:  # the process saw this one GPU (CUDA_VISIBLE_DEVICES)
            facts.update(gpu_uuids=[self.gpu.gpus[slot][0]], gpu_count=1)
        if self.cfg.lazy_mounts:
            beat("profile")
            try:
                self._record_profile(work, logs, image_digest, spec, golden, facts, beat)
            except (criu.CriuError, criu.ReplicaError, cuda.CudaError, SnapshotError, imagefs_mount.MountError,
                    OSError) as e:  # only an optimisation: verify-by-replay still decides
                log.warning("build %s: no prefetch profile (%s)", build_id, first_line(e))
            st.mark("profile")
        result = {"dump_dir": str(work / "dump"), "golden_digest": digest_of(answer), "golden_size": len(answer),
                  "host_facts": facts, "compat_key": compat.compat_key(facts, image_digest),
                  "timings_ms": st.ms, "sdk": sdk,  # and what the worker checks an older agent did not apply:
                  "applied": {"golden_ignore": list(golden.get("ignore") or []),
                              "shm_bytes": spec.get("shm_bytes") or 0}}
        write_atomic(done, json.dumps(result))
        return result

    def _first_bad_chunk(self, digest: str, deadline: float) -> str:
        """After a failed restore: the first chunk of the snapshot that cannot be read and verified, if any is
        found by ``deadline`` (monotonic; reading a large snapshot whole from S3 must not hold up the fallback)."""
        for e in ImageManifest.load(self.store, digest).files():
            for d, _ in e.chunks:
                if time.monotonic() > deadline:
                    return ""
                try:
                    self.store.get_chunk(d)
                except StoreError as err:
                    return f"chunk {d[:12]} of {e.path}: {first_line(err)}"
        return ""

    def _restore_gpu(self, snap: dict, replica, st: Stages, slot: int | None) -> None:
        """CUDA restore + unlock of every process that was on the GPU, before hooks, health and replay: onto GPU
        ``slot`` (the snapshot's GPUs map onto it and then onto the host's others, in order)."""
        facts = snap["host_facts"]
        if compat.needs_gpu(facts):
            if self.gpu and replica.root is not None:
                self.gpu.refresh(replica.pid, slot)  # this host's device numbers (nvidia-uvm's differ between hosts)
            host = list(self.facts.get("gpu_uuids", []))
            if slot is not None:
                host.insert(0, host.pop(slot))
            cuda.GpuCheckpointer().restore_tree(replica.pid, expected=facts.get("gpu_processes"),
                                                gpu_pairs=cuda.gpu_remap(facts.get("gpu_uuids", []), host))
            st.mark("cuda")

    def _record_profile(self, work: Path, logs: Path, image_digest: str, spec: dict, golden: dict, facts: dict,
                        beat: Callable[[str], None]) -> None:
        """Restore the fresh dump once on a recording mount of the image and replay the golden request: the
        image chunks a *restore* reads, in order, are the prefetch profile stored with the snapshot."""
        with contextlib.ExitStack() as held:
            rec = imagefs_mount.mount(self.cfg, image_digest, work / "image", record=work / PROFILE)
            held.callback(rec.unmount)  # last: writes the profile
            root = self._root(Path(rec.mountpoint), work / "rw-profile", work / "dump" / criu.WRITES)
            held.callback(root.cleanup)
            slot = self.take_gpu(facts)
            held.callback(self.give_gpu, slot)
            replica = criu.restore(work / "dump", root.path, logs / "profile-restore.log",
                                   huge_pages=use_huge_pages(self.cfg.restore_huge_pages, facts),
                                   read_threads=self.cfg.restore_threads, cg=self.cgroup)
            try:
                write_record(work / RECORD, replica.pid)
                self._restore_gpu({"host_facts": facts}, replica, Stages(), slot)
                after_restore(replica, spec, {})  # no secrets here
                replica.wait_healthy(spec["port"], spec["health"], timeout=60)
                golden_answer(replica, spec["port"], golden)
            finally:
                stop_until_gone(replica, beat)
        if (work / PROFILE).exists():
            shutil.copy2(work / PROFILE, work / "dump" / PROFILE)

    # -- restore ------------------------------------------------------------------------------------
    def restore(self, snap: dict, env: dict[str, str], beat: Callable[[str], None] = lambda s: None,
                rid: str | None = None) -> tuple[Running, dict[str, int]]:
        """Restore one replica of ``snap`` (a registry Snapshot as dict), verified by replaying its golden request.
        ``env`` (secrets, a deployment's env) reaches the server through its after-restore hook."""
        spec, rid, st = snap["spec"], dir_id("replica", rid or f"r-{uuid.uuid4().hex[:10]}"), Stages()
        reasons = compat.check(snap["host_facts"], self.facts)
        if reasons:
            raise compat.Incompatible(f"snapshot {snap['digest'][:12]} is incompatible with host "
                                      f"{self.cfg.host_id}: {'; '.join(reasons)}")
        beat("fetch")
        files, lower = self.trees(snap)
        fetch = self._prefetch(snap) if self._prefetching else None
        st.mark("fetch")

        def start() -> criu.Replica:
            beat("criu")
            try:
                huge = use_huge_pages(self.cfg.restore_huge_pages, snap["host_facts"])
                replica = criu.restore(files, root.path, logs / "restore.log", huge_pages=huge,
                                       read_threads=self.cfg.restore_threads, cg=self.cgroup)
            except criu.CriuError as e:
                failed = (fetch.wait(CAUSE_SEARCH_S).first_error if fetch  # the rest is cancelled below
                          else self._first_bad_chunk(snap["digest"], time.monotonic() + CAUSE_SEARCH_S))
                if failed:  # name the real cause: a chunk that could not be fetched or verified
                    raise SnapshotError(f"{failed} (then: {e})") from None
                raise
            st.mark("criu")
            return replica

        try:
            work, logs, root = self._replica_root(rid, lower, files / criu.WRITES)
            slot = self.take_gpu(snap["host_facts"])
            st.mark("root")
            replica, running = self._own(rid, start, root, spec, work, logs, slot)
        except BaseException:  # no root (its image's mount gone?) or no process: the prefetch is for nothing
            if fetch:
                fetch.cancel()
            raise
        try:
            self._restore_gpu(snap, replica, st, slot)
            # a process moved to another GPU starts its children on that one (if it takes the hook)
            after_restore(replica, spec, env, rid,
                          None if slot is None else {"CUDA_VISIBLE_DEVICES": self.gpu.gpus[slot][0]})
            st.mark("hooks")
            replica.wait_healthy(spec["port"], spec["health"], timeout=60)
            st.mark("health")
            answer = golden_answer(replica, spec["port"], snap["golden_request"])
            st.mark("replay")
            if digest_of(answer) != snap["golden_digest"]:
                raise SnapshotError(f"replica {rid} of snapshot {snap['digest'][:12]} answered the golden request "
                                    f"differently ({len(answer)} bytes, digest {digest_of(answer)[:12]}; a field "
                                    f"that changes with time? see `thaw build snapshot --golden-ignore`)")
        except BaseException:
            if fetch:
                fetch.cancel()
            _stop_after_failure(running)
            raise
        ms = st.done()
        self._pinner.submit(self.pins.pin, snap["digest"], files)
        if fetch:  # in the background until now; what it cost is reported, not waited for
            ms.update(fetch.stats.timings())
        return running, ms

    def cold_boot(self, image_digest: str, spec: dict, env: dict[str, str], golden: dict | None = None,
                  golden_digest: str | None = None, snapshot_digest: str | None = None, rid: str | None = None
                  ) -> tuple[Running, dict[str, int], bool | None]:
        """Start the model from scratch, ``env`` (secrets, a deployment's env) over the image's in its environment
        (no snapshot is taken of this process).
        The third value says whether it answered the golden request as the snapshot did (None: not asked).
        With ``snapshot_digest`` (a fallback from that snapshot) and chunks coming from a remote tier, what the
        snapshot's launch read is prefetched in parallel while the model boots."""
        rid, st = dir_id("replica", rid or f"c-{uuid.uuid4().hex[:10]}"), Stages()  # a caller may name "../x"
        fetch = self._prefetch_boot(snapshot_digest) if snapshot_digest and self._prefetching else None
        try:
            lower = self.image_root(image_digest)
            st.mark("fetch")
            # not the dirs of a failed restore of the same id: a restored process that outlived its SIGKILL is
            # stopped once gone, and that stop unmounts its root, removes its dir
            work, logs, root = self._replica_root(cold_id(rid), lower)
            slot = self.take_gpu()
            st.mark("root")
            replica, running = self._own(rid, lambda: self._launch(root, spec, {**spec["env"], **env},
                                                                    logs / "launch.log", slot),
                                         root, spec, work, logs, slot)
            ready_s = spec.get("ready_timeout_s", 600)
            try:
                replica.wait_healthy(spec["port"], spec["health"], timeout=ready_s)
                st.mark("boot")
                same = None
                if golden:  # recorded, not enforced: a fresh process may legitimately differ (randomness, time)
                    # its first request, which may load what the server loads on demand (see _take)
                    answer = golden_answer(replica, spec["port"], golden, max(GOLDEN_TIMEOUT_S, ready_s))
                    st.mark("replay")
                    same = digest_of(answer) == golden_digest
            except BaseException:
                _stop_after_failure(running)
                raise
        except BaseException:
            if fetch:
                fetch.cancel()
            raise
        ms = st.done()
        if fetch:
            ms.update(fetch.stats.timings())
        return running, ms, same

    def _prefetch_boot(self, snapshot_digest: str):
        """Start fetching (in the background) the image chunks the snapshot's launch read, read from the
        snapshot's files without mounting them; None where the snapshot has no such profile or can't be read."""
        try:
            profile = self._stored_profile(ImageManifest.load(self.store, snapshot_digest), BOOT_PROFILE)
        except PROFILE_ERRORS as e:
            log.warning("no boot prefetch from snapshot %s: %s", snapshot_digest[:12], first_line(e))
            return None
        return start_prefetch(self.store, profile, self.cfg.prefetch_concurrency) if profile else None

    def verify(self, snapshot_digest: str, image_digest: str, spec: dict, golden: dict, golden_digest: str,
               secret_names: list[str], snapshot_facts: dict | None = None) -> dict[str, int]:
        """Verify-by-replay before registration: restore from the store, replay, compare, stop.
        ``snapshot_facts``: what the build recorded (the GPU its process saw); this host's facts by default."""
        snap = {"digest": snapshot_digest, "image_digest": image_digest, "spec": spec, "golden_request": golden,
                "golden_digest": golden_digest, "host_facts": snapshot_facts or self.facts}
        running, ms = self.restore(snap, self.secrets(secret_names))
        with contextlib.suppress(criu.ReplicaError):  # verified; one that outlived its SIGKILL is stopped once gone
            running.stop()
        return ms

    def restore_many(self, snap: dict, n: int, env: dict[str, str], ids: list[str] | None = None
                     ) -> list[tuple[Running, dict]]:
        """``n`` replicas side by side; each falls back to a cold boot on its own when its restore fails.
        ``ids``: the replicas' ids (default: new ones)."""

        def one(i):
            rid = ids[i] if ids else None
            try:
                running, ms = self.restore(snap, env, rid=rid)
                return running, {"outcome": "restored", "reason": "", "timings_ms": ms, "golden_ok": True}
            except Exception as e:  # noqa: BLE001 - whatever made the snapshot unusable here (a dead mount, a
                # replica cut off mid-answer, a bad profile...): a cold boot may still serve
                reason = first_line(e, typed=True)
            try:
                running, ms, same = self.cold_boot(snap["image_digest"], snap["spec"], env, snap["golden_request"],
                                                   snap["golden_digest"], snap["digest"], rid=rid)
            except Exception as e:  # noqa: BLE001 - the error names both: the restore's is often the cause
                raise SnapshotError(f"restore: {reason}; cold boot: {first_line(e, typed=True)}") from e
            return running, {"outcome": "cold-boot", "reason": reason, "timings_ms": ms, "golden_ok": bool(same)}

        with ThreadPoolExecutor(min(n, 16)) as pool:
            futures = [pool.submit(one, i) for i in range(n)]
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result())
            except Exception as e:  # noqa: BLE001 - restore and cold boot both failed for this replica
                errors.append(e)
        if errors:
            for running, _ in results:
                try:
                    running.stop()
                except (criu.ReplicaError, OSError) as e:  # the others must still be stopped
                    log.error("replica %s: not stopped: %s", running.id, e)
            raise SnapshotError(f"{len(errors)} of {n} replicas could neither restore nor cold-boot: {errors[0]}")
        return results
