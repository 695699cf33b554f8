"""The CRIU driver: dump a replica's whole pid namespace, restore it into new namespaces.

A replica's pid 1 is the workload itself (``launch`` exec()s it), in its own pid, mount, network, UTS and IPC
namespaces, so ``criu dump -t <pid 1>`` takes all of them along and ``criu restore`` creates fresh ones:
any number of replicas of one snapshot run side by side with the same in-namespace pids and ports.

- Root: the dumped mount namespace's "/" is the replica's overlay; restore puts a new overlay (``--root``,
  from ``prepare_root``) in its place; /proc, /sys, /dev and /tmp are recreated by CRIU (tmpfs contents
  are in the images). What the process wrote to its root before the dump is kept next to the images
  (``WRITES``, see ``Root.keep_writes``), the new overlay's topmost lower layer.
- stdout/stderr: the log file lives outside the replica's mount namespace; it is dumped as an external file
  (``--external file[mnt_id:inode]``) and each restore hands in its own log fd (``--inherit-fd``). The ids
  are kept in ``thaw-snapshot.json`` next to the images.
- Network: the namespace holds only loopback, so it is not dumped (``--external net[inode]``); each restore
  hands criu a fresh one with loopback up (``--inherit-fd``). That skips the ip/iptables save and restore
  runs (about 0.1 s of dump and 0.5 s of restore here). Listening sockets are restored into it;
  established connections are not worth restoring (``--tcp-close``).
- Cgroups: left alone (``--manage-cgroups=ignore``): a restored tree stays in criu's cgroup, the host's
  replicas' one (snapshot/cgroup.py), whatever cgroup the dumped replica ran in.
- After restore criu exec()s the reaper (``_reap.py``) that stays the parent of the replica's pid 1.
- thaw's CRIU build (``infra/criu/*.patch``) reads two variables at restore; a stock criu ignores them:
  ``CRIU_RESTORE_THREADS=N`` reads the memory pages with N threads instead of one, and ``CRIU_RESTORE_THP``
  marks large private anonymous memory MADV_HUGEPAGE before its pages are read, whatever the host's THP mode,
  so the restore faults 2 MiB at a time (and a CUDA driver pins large folios).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from thaw.imagefs.mount import mountinfo

from . import _linux, cgroup
from .compat import host_facts
from .replica import (REAP, HookFailed, Replica, ReplicaError, _lines, after_restore, before_snapshot, launch,
                      open_log)
from .rootfs import Root, prepare_root

# The whole life cycle is reachable from this module (thaw.snapshot re-exports the same names).
__all__ = ["CriuError", "CheckpointResult", "checkpoint", "restore", "criu_binary", "criu_check", "HookFailed",
           "Root", "prepare_root", "Replica", "ReplicaError", "launch", "before_snapshot", "after_restore"]

log = logging.getLogger(__name__)
META = "thaw-snapshot.json"
WRITES = "root-writes"  # in the images dir: the dumped process's writes to its root (Root.keep_writes)
NETNS_KEY = "thaw-net"
COMMON = ["-v4", "--file-locks", "--tcp-close", "--manage-cgroups=ignore"]
HUGE_PAGES_ENV = "CRIU_RESTORE_THP"  # read by thaw's CRIU build, see infra/criu/restore-thp.patch
THREADS_ENV = "CRIU_RESTORE_THREADS"  # infra/criu/restore-threads.patch
DEFAULT_READ_THREADS = min(8, len(os.sched_getaffinity(0)))  # the CPUs this process may run on


class CriuError(RuntimeError):
    """criu failed; the message is one line and names the kept criu log."""


@dataclass
class CheckpointResult:
    images_dir: Path
    dump_ms: float
    size_bytes: int
    log_path: Path        # the criu dump log
    leave_running: bool
    facts: dict           # compat.host_facts() of the dumping host


DUMP_TIMEOUT_S = 1800.0  # a dump that takes longer is stuck (a frozen task, a FUSE read that never ends)
KDAT_RUN_DIR = "/dev/shm/thaw-criu-run"  # tmpfs that stands in for /run where /run is not one


def _with_kdat_cache(cmd: list[str]) -> list[str]:
    """CRIU caches its kernel probe in /run/criu.kdat only when /run is a tmpfs (it is on most hosts; not on
    this kind of VM, where every criu run re-probes for ~60 ms). There, run criu in a private mount
    namespace whose /run is a persistent tmpfs directory. Used for restore only: dump keys external files by
    mount ids, which must stay the host's."""
    if _fstype("/run") == "tmpfs" or _fstype("/dev/shm") != "tmpfs":
        return cmd
    try:  # /dev/shm is world-writable: anyone could have made it first (with a forged kdat), or put a file there
        os.makedirs(KDAT_RUN_DIR, mode=0o700, exist_ok=True)
        st = os.lstat(KDAT_RUN_DIR)
    except OSError:
        st = None
    if st is None or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        log.warning("%s is not a private directory of ours: criu re-probes the kernel on every run", KDAT_RUN_DIR)
        return cmd
    if "--exec-cmd" in cmd:  # what criu becomes (the reaper, for the replica's life) goes back to our namespace:
        at = cmd.index("--exec-cmd") + 2  # this one holds a copy of every mount we had, unmounted here or not
        cmd = [*cmd[:at], "nsenter", f"--mount=/proc/{os.getpid()}/ns/mnt", "--", *cmd[at:]]
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount --bind "$0" /run && exec "$@"', KDAT_RUN_DIR, *cmd]


def _fstype(path: str) -> str:
    """The file system type of the deepest mount holding ``path`` (the last mounted, of equal ones)."""
    holding = [m for m in mountinfo() if path == m.mountpoint or path.startswith(m.mountpoint.rstrip("/") + "/")]
    return max(reversed(holding), key=lambda m: len(m.mountpoint)).fstype if holding else ""


def criu_binary() -> str:
    """``$THAW_CRIU``, else criu on PATH or in /usr/local/sbin, /usr/sbin."""
    found = os.environ.get("THAW_CRIU") or shutil.which(
        "criu", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin"]))
    if not found:
        raise CriuError("criu not found: install it (../shared/scripts/install-criu.sh) or set THAW_CRIU")
    return found


def criu_check() -> str | None:
    """None when criu is usable here, else why not (one line)."""
    try:
        r = subprocess.run([criu_binary(), "check"], capture_output=True, text=True, timeout=60)
    except (CriuError, OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if r.returncode:
        out = (r.stderr or r.stdout).strip().splitlines()
        return f"`criu check` failed (exit {r.returncode}): {out[-1] if out else 'no output'}"
    return None


# Error lines that are no cause: a failed rlimit raise (harmless) and the closing summaries.
_NOT_A_CAUSE = ("rlimit:", "FAILED", "exited, status=")


def _error(what: str, rc: int, log: Path, stderr: str = "") -> CriuError:
    first = ""
    try:
        with open(log, errors="replace") as f:
            first = next((line.strip() for line in f
                          if "Error (" in line and not any(s in line for s in _NOT_A_CAUSE)), "")
    except OSError:
        pass
    detail = first or " ".join(stderr.split())[-300:] or "no error line"
    return CriuError(f"criu {what} failed (exit {rc}): {detail} -- see log {log}")


def checkpoint(replica: Replica, images_dir: Path, leave_running: bool = False, *,
               log_path: Path | None = None) -> CheckpointResult:
    """Dump the replica (its whole pid namespace) into images_dir; stops it unless ``leave_running``."""
    if not replica.alive():
        raise ReplicaError(f"replica {replica.pid} is not running: nothing to checkpoint (log {replica.log_path})")
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    if any(images_dir.glob("*.img")):
        raise FileExistsError(f"{images_dir} already holds CRIU images: checkpoint into a new directory")
    log = Path(log_path or images_dir / "dump.log").resolve()
    # --tcp-close drops established connections instead of dumping them, so nothing needs the network locked.
    cmd = [criu_binary(), "dump", "-t", str(replica.pid), "-D", str(images_dir), "-o", str(log), *COMMON,
           "--network-lock", "skip"]
    for ext in replica.external_files:
        cmd += ["--external", ext]
    cmd += ["--external", f"net[{replica.netns_inode()}]:{NETNS_KEY}"]
    if leave_running:
        cmd.append("--leave-running")
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=DUMP_TIMEOUT_S)
    except subprocess.TimeoutExpired:  # run() killed criu; the frozen process is the caller's to stop
        raise CriuError(f"criu dump of pid {replica.pid} took more than {DUMP_TIMEOUT_S:g} s: killed; see log "
                        f"{log}") from None
    dump_ms = (time.monotonic() - t0) * 1000
    if r.returncode:
        raise _error("dump", r.returncode, log, r.stderr)
    if not leave_running:
        replica.stop()
    facts = host_facts()
    files = {p.name: p.stat().st_size for p in sorted(images_dir.glob("*.img"))}
    (images_dir / META).write_text(json.dumps({"external_files": replica.external_files, "files": files,
                                               "dump_ms": round(dump_ms, 1), "facts": facts}, indent=1))
    size = sum(files.values())
    return CheckpointResult(images_dir, dump_ms, size, log, leave_running, facts)


def _kill_with_children(proc: subprocess.Popen) -> None:
    """SIGKILL a criu restore and what it has restored so far (its children: they outlive it otherwise)."""
    if proc.poll() is not None:
        return
    try:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        children = []
    for pid in children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(5)  # criu notices, reaps them and gives up by itself
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _check_files(images_dir: Path, files: dict[str, int]) -> None:
    """Every image file there with its dumped size. (CRIU 4.2.1 spins forever on a truncated pages image.)"""
    for name, size in files.items():
        try:
            have = (images_dir / name).stat().st_size
        except FileNotFoundError:
            raise CriuError(f"checkpoint {images_dir} is incomplete: {name} is missing") from None
        if have != size:
            raise CriuError(f"checkpoint {images_dir} is damaged: {name} has {have} bytes, {size} were dumped")


def restore(images_dir: Path, root: Path | None, log_path: Path, *, criu_log: Path | None = None,
            timeout: float = 120.0, huge_pages: bool = False, read_threads: int | None = None,
            cg: Path | None = None) -> Replica:
    """Restore a checkpoint into new namespaces with ``root`` (a mount point, see prepare_root) as "/"
    (None for a replica launched with ``root=None``: it shares the host's filesystem).

    stdout/stderr of the restored processes append to ``log_path``; criu's own log goes to ``criu_log``
    (default: next to log_path, ``<name>.criu-restore.log``). ``huge_pages``: restore large anonymous memory into
    transparent huge pages; ``read_threads``: threads that read the memory pages (default: one per CPU, at most
    8); see the module docstring; ``cg``: the cgroup to restore into (snapshot/cgroup.py; None: the caller's).
    Raises CriuError naming that log.
    """
    images_dir, root, log_path = Path(images_dir).resolve(), root and Path(root), Path(log_path)
    criu_log = Path(criu_log or log_path.with_name(log_path.stem + ".criu-restore.log")).resolve()
    try:
        meta = json.loads((images_dir / META).read_text())
    except (OSError, ValueError) as e:
        raise CriuError(f"{images_dir} is not a thaw checkpoint ({META}: {e})") from None
    _check_files(images_dir, meta.get("files", {}))
    cmd = [criu_binary(), "restore", "-D", str(images_dir), "-W", str(criu_log.parent), "-o", str(criu_log),
           *(["--root", str(root)] if root else []), *COMMON]  # before any fd is opened: a failure here leaks none
    externals = meta.get("external_files", [])
    t0 = time.monotonic()
    logfd, ext = open_log(log_path)
    try:
        netns = _linux.new_netns()
    except BaseException:
        os.close(logfd)
        raise
    for old in externals:
        cmd += ["--inherit-fd", f"fd[{logfd}]:{old}"]
    cmd += ["--inherit-fd", f"fd[{netns}]:{NETNS_KEY}"]
    cmd += ["--exec-cmd", "--", sys.executable, "-I", "-S", str(REAP)]
    env = {k: v for k, v in os.environ.items() if k not in (HUGE_PAGES_ENV, THREADS_ENV)}
    env[THREADS_ENV] = str(read_threads or DEFAULT_READ_THREADS)
    if huge_pages:
        env[HUGE_PAGES_ENV] = "1"
    try:
        # stdin: the reaper's, closed once the restored pid 1 is held by its pidfd (_reap.py)
        proc = subprocess.Popen(cgroup.join(cg, _with_kdat_cache(cmd)), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                bufsize=0, pass_fds=(logfd, netns), start_new_session=True)
    except BaseException:
        os.close(netns)
        raise
    finally:
        os.close(logfd)
    said = []  # what the reaper printed besides "ready": its own error, when the restored tree failed
    try:
        for line in _lines(proc.stdout, proc, timeout):
            if line.startswith("ready "):
                replica = Replica._attach(int(line.split()[1]), netns=netns, root=root, log_path=log_path,
                                          external_files=[ext], proc=proc)
                netns = None
                replica.timings["restore_ms"] = (time.monotonic() - t0) * 1000
                return replica
            said.append(line)
        stderr = proc.stderr.read().decode(errors="replace")
        raise _error("restore", proc.wait(), criu_log, " ".join([*said, stderr]))
    except BaseException as e:
        _kill_with_children(proc)
        if isinstance(e, TimeoutError):
            raise CriuError(f"criu restore did not finish in {timeout:g}s -- see log {criu_log}") from None
        raise
    finally:
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
        if netns is not None:
            os.close(netns)
