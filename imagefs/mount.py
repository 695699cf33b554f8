"""The image mount daemon and the library the host agent uses to run it.

Daemon: ``python3 -m thaw.imagefs.mount [--state-dir D] DIGEST MOUNTPOINT [--record FILE] [--ready-file F]``
mounts the image read-only (``fsname=thaw,ro,allow_other,default_permissions,suid,dev``), raises the mount's
read-ahead, writes the ready file (JSON: pid, mountpoint, digest) and serves until SIGTERM/SIGINT (clean
unmount) or until someone unmounts it. SIGUSR1 writes the access recording; it is also written on exit.

Library: :func:`mount` starts the daemon in its own session and waits until the mount is up;
:class:`MountHandle` stops it (:meth:`MountHandle.unmount`) and flushes the recording; :func:`clear_stale`
removes what a killed daemon left behind (a FUSE mount answering ``ENOTCONN``); :func:`attach` finds a
running daemon again from its ready file (e.g. after the host agent restarted).
"""

from __future__ import annotations

import argparse
import enum
import errno
import functools
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from thaw.files import write_atomic

log = logging.getLogger(__name__)

DAEMON_MODULE = "thaw.imagefs.mount"
# the bdi's read-ahead: for sequential reads, and the window the kernel reads around a page fault in a mmapped
# file (a cold replica faulting in its libraries fetches about this much per fault; the daemon reads further
# ahead itself for sequential readers)
DEFAULT_READ_AHEAD_KB = 512


class MountError(Exception):
    """A mount that could not be made or cleared (one line, names the mountpoint)."""


# -- /proc/<pid>/mountinfo ------------------------------------------------------------------------
@dataclass(frozen=True)
class MountInfo:
    mount_id: int
    dev: str  # "major:minor"
    mountpoint: str
    fstype: str
    source: str
    options: str
    super_options: str = ""  # as mountinfo writes them (escaped): split first, then unescape the parts
    root: str = "/"  # the directory of its filesystem mounted there (a bind mount's, a cgroup hierarchy's)

    @property
    def is_fuse(self) -> bool:
        return self.fstype in ("fuse", "fuseblk") or self.fstype.startswith(("fuse.", "fuseblk."))


def unescape(s: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes (\\ooo)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), s)


def mountinfo(pid: int | str = "self") -> list[MountInfo]:
    """The mounts ``pid`` sees (its mount namespace's)."""
    out = []
    with open(f"/proc/{pid}/mountinfo", errors="surrogateescape") as f:  # paths are bytes (os.fsdecode's way)
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            a, b = left.split(), right.split()
            if len(a) < 6 or len(b) < 2:
                continue
            out.append(MountInfo(int(a[0]), a[2], unescape(a[4]), b[0], unescape(b[1]), a[5],
                                 b[2] if len(b) > 2 else "", unescape(a[3])))
    return out


def _norm(mountpoint: str | os.PathLike) -> str:
    """Absolute path with the parent resolved, without touching the mountpoint itself (it may be dead)."""
    p = os.path.abspath(os.fspath(mountpoint))
    parent, name = os.path.split(p)
    return os.path.join(os.path.realpath(parent), name) if name else p


def fuse_mounts(mountpoint: str | os.PathLike) -> list[MountInfo]:
    mp = _norm(mountpoint)
    return [m for m in mountinfo() if m.mountpoint == mp and m.is_fuse]


def is_mounted(mountpoint: str | os.PathLike) -> bool:
    """True while a FUSE filesystem (live or dead) is mounted at ``mountpoint``."""
    return bool(fuse_mounts(mountpoint))


def mount_options() -> set[str]:
    from .fuse import MOUNT_OPTIONS

    return set(MOUNT_OPTIONS)


def set_read_ahead(mountpoint: str | os.PathLike, kb: int) -> int | None:
    """Set the read-ahead of the FUSE mount's bdi; returns the value now in effect (None if unknown)."""
    ms = fuse_mounts(mountpoint)
    if not ms:
        return None
    path = Path("/sys/class/bdi") / ms[-1].dev / "read_ahead_kb"
    try:
        path.write_text(f"{int(kb)}\n")
    except OSError as err:
        log.warning("cannot set %s to %d: %s", path, kb, err)
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


# -- processes -------------------------------------------------------------------------------------
def _alive(pid: int | None, mountpoint: str | None = None) -> bool:
    """A live (not zombie) thaw mount daemon with this pid (serving ``mountpoint``, if given: a pid reused by
    another tree's daemon is not this one)."""
    if not pid:
        return False
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    state = st.rpartition(")")[2].split()[0]
    return (state not in ("Z", "X") and DAEMON_MODULE.encode() in argv
            and (mountpoint is None or os.fsencode(mountpoint) in argv))


def _probe_errno(path: str, timeout: float = 2.0) -> int | None:
    """errno of statfs(path) (0 if fine); None if it did not answer in time (a hung daemon).

    statfs always reaches the daemon; stat may be answered from the kernel's attribute cache."""
    box: list[int] = []

    def probe():
        try:
            os.statvfs(path)
            box.append(0)
        except OSError as err:
            box.append(err.errno or -1)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else None


def _fusermount(mountpoint: str, lazy: bool) -> bool:
    args = ["fusermount3", "-uz" if lazy else "-u", mountpoint]
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        r = None
        log.warning("%s: %s", " ".join(args), err)
    if r is not None and r.returncode == 0:
        return True
    if r is not None:
        log.warning("%s failed: %s", " ".join(args), r.stderr.strip())
    if os.geteuid() == 0:  # fusermount3 may refuse (e.g. mtab quirks); umount2 is the same as root
        r2 = subprocess.run(["umount", "-l", mountpoint] if lazy else ["umount", mountpoint],
                            capture_output=True, text=True)
        return r2.returncode == 0
    return False


def clear_stale(mountpoint: str | os.PathLike, pid: int | None = None) -> bool:
    """Detach dead FUSE mounts at ``mountpoint``: statfs answers ENOTCONN (the daemon is gone), or ``pid`` (its
    daemon, if known) is no longer running. A live mount is left alone. Returns True if something was cleared."""
    mp = _norm(mountpoint)
    cleared = False
    for _ in range(16):  # mounts may be stacked
        if not fuse_mounts(mp):
            break
        dead = pid is not None and not _alive(pid)
        pid = None  # it names the top mount only; mounts under it are judged by statfs
        if not dead:
            err = _probe_errno(mp)
            dead = err in (errno.ENOTCONN, errno.ECONNABORTED)
        if not dead:
            break
        log.warning("clearing a dead FUSE mount at %s", mp)
        if not _fusermount(mp, lazy=True):
            raise MountError(f"{mp}: cannot detach the dead FUSE mount there (fusermount3 -uz failed)")
        cleared = True
    return cleared


# -- library ---------------------------------------------------------------------------------------
def ready_file_for(cfg, mountpoint: str | os.PathLike) -> Path:
    key = hashlib.sha256(_norm(mountpoint).encode()).hexdigest()[:16]
    return Path(cfg.run_dir) / "imagefs" / f"{key}.json"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class MountHandle:
    """A running mount daemon: ``pid``, ``mountpoint``, ``digest``, ``record``, ``log_file``."""

    def __init__(self, pid: int, mountpoint: str, digest: str, *, record: Path | None = None,
                 ready_file: Path | None = None, log_file: Path | None = None,
                 proc: subprocess.Popen | None = None):
        self.pid = pid
        self.mountpoint = mountpoint
        self.digest = digest
        self.record = Path(record) if record else None
        self.ready_file = ready_file
        self.log_file = log_file
        self._proc = proc
        self.returncode: int | None = None

    def __repr__(self) -> str:
        return f"MountHandle(pid={self.pid}, mountpoint={self.mountpoint!r}, digest={self.digest[:12]!r})"

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return _alive(self.pid, self.mountpoint)  # a handle from attach(): its pid may now be another daemon's

    def _wait(self, timeout: float) -> bool:
        if self._proc is not None:
            try:
                self.returncode = self._proc.wait(timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout
        while _alive(self.pid, self.mountpoint):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def flush_record(self, timeout: float = 5.0) -> bool:
        """Ask the daemon to write its access recording now (SIGUSR1); True once the file was rewritten."""
        if not self.alive():
            return False
        before = _file_id(self.record)
        os.kill(self.pid, signal.SIGUSR1)
        if self.record is None:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _file_id(self.record) != before:
                return True
            time.sleep(0.01)
        return False

    def unmount(self, timeout: float = 10.0) -> int | None:
        """SIGTERM: the daemon unmounts cleanly and exits (the recording is written). SIGKILL and a lazy
        ``fusermount3 -uz`` by path only if it does not. Returns the daemon's exit status when known."""
        if self.alive():
            os.kill(self.pid, signal.SIGTERM)
            if not self._wait(timeout):
                log.warning("mount daemon %d ignored SIGTERM for %.0f s: killing it", self.pid, timeout)
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._wait(10)
        elif self._proc is not None:
            self.returncode = self._proc.wait()
        if is_mounted(self.mountpoint):
            if not _fusermount(self.mountpoint, lazy=False):
                _fusermount(self.mountpoint, lazy=True)
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        if is_mounted(self.mountpoint):
            raise MountError(f"{self.mountpoint}: still mounted after stopping daemon {self.pid}")
        return self.returncode

    def __enter__(self) -> "MountHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.unmount()


def _file_id(path: Path | None):
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return st and (st.st_ino, st.st_mtime_ns, st.st_size)


def _config_env(cfg) -> dict[str, str]:
    """The caller's Config as THAW_* variables, so the daemon's ``load()`` sees exactly the same settings."""
    env = {}
    for name in type(cfg).model_fields:
        v = getattr(cfg, name)
        if v is None:
            continue
        if hasattr(v, "get_secret_value"):
            v = v.get_secret_value()
        if isinstance(v, enum.Enum):
            v = v.value
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, (dict, list, tuple)):
            v = json.dumps(v)
        env[f"THAW_{name.upper()}"] = str(v)
    return env


def mount(cfg, digest: str, mountpoint: str | os.PathLike, record: str | os.PathLike | None = None,
          timeout: float = 30.0, *, fetch_timeout: float | None = None, cache_mb: int | None = None,
          prefetch: str | os.PathLike | None = None, read_ahead_kb: int | None = None) -> MountHandle:
    """Mount image ``digest`` at ``mountpoint`` (created if missing) via a daemon in its own session.

    Clears a dead mount left there first; refuses a live one. Returns once the FUSE mount is up."""
    mp = _norm(mountpoint)
    if not is_mounted(mp):
        os.makedirs(mp, exist_ok=True)
    ready = ready_file_for(cfg, mp)
    old = _read_json(ready)
    clear_stale(mp, pid=old.get("pid") if old and old.get("mountpoint") == mp else None)
    if is_mounted(mp):
        raise MountError(f"{mp}: a live FUSE mount is already there (pid {old.get('pid') if old else '?'})")
    ready.parent.mkdir(parents=True, exist_ok=True)
    ready.unlink(missing_ok=True)
    log_dir = Path(cfg.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / f"imagefs-{ready.stem}.log"
    argv = [sys.executable, "-m", DAEMON_MODULE, "--state-dir", str(cfg.state_dir), digest, mp,
            "--ready-file", str(ready)]
    if record:
        argv += ["--record", str(Path(record).absolute())]
    if fetch_timeout is not None:
        argv += ["--fetch-timeout", str(fetch_timeout)]
    if cache_mb is not None:
        argv += ["--cache-mb", str(cache_mb)]
    if prefetch:
        argv += ["--prefetch", str(Path(prefetch).absolute())]
    if read_ahead_kb is not None:
        argv += ["--read-ahead-kb", str(read_ahead_kb)]
    env = {**os.environ, **_config_env(cfg)}
    with open(log_file, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                                start_new_session=True, close_fds=True)
    handle = MountHandle(proc.pid, mp, digest, record=Path(record).absolute() if record else None,
                         ready_file=ready, log_file=log_file, proc=proc)
    deadline = time.monotonic() + timeout
    while True:
        info = _read_json(ready)
        if info and info.get("pid") == proc.pid and is_mounted(mp):
            return handle
        if proc.poll() is not None:
            raise MountError(f"{mp}: mount daemon for {digest[:16]} exited ({proc.returncode}): {_tail(log_file)}")
        if time.monotonic() > deadline:
            try:
                handle.unmount(timeout=5)
            except MountError:
                pass
            raise MountError(f"{mp}: image {digest[:16]} not mounted within {timeout:g} s: {_tail(log_file)}")
        time.sleep(0.01)


def attach(cfg, mountpoint: str | os.PathLike) -> MountHandle | None:
    """The handle of a live daemon serving ``mountpoint`` (from its ready file), or None."""
    mp = _norm(mountpoint)
    ready = ready_file_for(cfg, mp)
    info = _read_json(ready)
    if not info or info.get("mountpoint") != mp or not _alive(info.get("pid"), mp) or not is_mounted(mp):
        return None
    return MountHandle(info["pid"], mp, info.get("digest", ""), record=info.get("record"), ready_file=ready)


def _tail(path: Path, n: int = 600) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return " | ".join(text[-n:].splitlines()[-5:]) or "(empty log)"


# -- daemon ----------------------------------------------------------------------------------------
def _write_ready(path: Path, info: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(info), durable=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python3 -m {DAEMON_MODULE}", description="Mount a thaw image (read-only FUSE).")
    p.add_argument("--state-dir", help="thaw state directory (default: from THAW_STATE_DIR / config)")
    p.add_argument("digest", help="image manifest digest")
    p.add_argument("mountpoint")
    p.add_argument("--record", help="write the access recording (JSON) here on unmount and on SIGUSR1")
    p.add_argument("--ready-file", help="written (JSON: pid, mountpoint, digest) once the mount is up")
    p.add_argument("--fetch-timeout", type=float, help="seconds before a chunk read fails with EIO (default: "
                   "30, or longer when the S3 timeouts and attempts configured add up to more)")
    p.add_argument("--cache-mb", type=int, default=64, help="in-process cache of decoded chunks")
    p.add_argument("--read-ahead-kb", type=int, default=DEFAULT_READ_AHEAD_KB)
    p.add_argument("--prefetch", help="access recording whose chunks are fetched in the background after mounting")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format=f"%(asctime)s imagefs[{os.getpid()}] %(levelname)s %(name)s: %(message)s")

    import pyfuse3
    import trio

    from ..config import load
    from .fuse import AccessRecorder, ImageFS, serve
    from .manifest import ImageManifest
    from .store import ChunkStore, StoreError

    sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)  # held until serve() listens: no window for a dead mount

    cfg = load(state_dir=args.state_dir)
    mp = _norm(args.mountpoint)
    try:  # with its memory tier (THAW_MEMORY_CACHE_BYTES, per mounted tree): what the daemon prefetches is read
        # from there, unverified; without it a cold restore from S3 took 2.9 s instead of 2.5 s (bench/imagefs.py)
        store = ChunkStore.open(cfg)
        manifest = ImageManifest.load(store, args.digest)
    except (StoreError, ValueError) as err:
        log.error("image %s: %s", args.digest, err)
        return 2
    recorder = AccessRecorder(args.record, args.digest) if args.record else None
    fs = ImageFS(store, manifest, args.digest, recorder=recorder, cache_bytes=args.cache_mb << 20,
                 fetch_timeout=args.fetch_timeout or cfg.fetch_timeout_s)
    del manifest
    try:
        clear_stale(mp)
    except MountError as err:
        log.error("%s", err)
        return 2
    if not os.path.isdir(mp):
        log.error("%s is not a directory", mp)
        return 2
    t0 = time.monotonic()
    try:
        pyfuse3.init(fs, mp, mount_options())
    except RuntimeError as err:
        log.error("cannot mount %s: %s", mp, err)
        return 1
    ready = Path(args.ready_file) if args.ready_file else None

    def on_ready():  # after FUSE_INIT: the kernel resets the bdi's read-ahead while answering it
        ra = set_read_ahead(mp, args.read_ahead_kb)
        log.info("mounted image %s at %s (%d inodes, %d bytes) in %.1f ms, read_ahead_kb=%s", args.digest, mp,
                 fs.inodes, fs.total_size, (time.monotonic() - t0) * 1000, ra)
        if args.prefetch:
            from .prefetch import load_profile, start_prefetch

            try:
                start_prefetch(store, load_profile(args.prefetch))
            except (OSError, ValueError) as err:
                log.warning("prefetch profile %s unusable: %s", args.prefetch, err)
        if ready is not None:
            _write_ready(ready, {"pid": os.getpid(), "mountpoint": mp, "digest": args.digest,
                                 "record": str(Path(args.record).absolute()) if args.record else None})

    code = 0
    try:
        trio.run(functools.partial(serve, fs, on_ready=on_ready))
    except BaseException:
        log.exception("mount daemon failed")
        code = 1
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s; %s", mp, fs.stats)
        if recorder is not None:
            try:
                recorder.write()
            except OSError as err:
                log.error("cannot write the access recording: %s", err)
        if ready is not None:
            ready.unlink(missing_ok=True)
    logging.shutdown()
    return code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # threads stuck in a hung store fetch (abandoned after their timeout) must not keep the daemon alive
    os._exit(code)
