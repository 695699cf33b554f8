"""The replicas' CPU cgroup: every replica of a host (launched or restored) runs in one cgroup below the host
agent's own, at a low CPU weight: by default all the replicas together weigh a tenth of one of the host's
own processes.

Why: a burst of restores is many busy threads (CRIU's page readers, then the restored servers warming up), and
the scheduler shares the CPUs per thread. Without a cgroup, eight restores on a small host starve what starts
the next replica: the agent's Temporal worker, and a Temporal server or pool worker on the same machine. The
weight only matters while the CPUs are contended; an idle control plane leaves the replicas every cycle.

cgroup v1 (a ``cpu`` hierarchy): a child of the agent's cpu cgroup, ``cpu.shares``. cgroup v2: a child of the
agent's cgroup with the cpu controller on, ``cpu.weight``; v2 allows that only for an agent in the host's root
cgroup (elsewhere, as in a systemd service or a container, a cgroup that holds processes may not pass the cpu
controller to children; only cgroup v1 hosts ran this code so far). Where it does not work (that, no cpu
controller, a read-only cgroupfs), the replicas stay in the agent's cgroup as they would without thaw, and the
agent says why once.

CRIU leaves cgroups alone (``--manage-cgroups=ignore``, snapshot/criu.py): a restored tree stays where criu runs,
so a snapshot does not depend on the cgroup layout of the host that built it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from pathlib import Path

from thaw.imagefs.mount import mountinfo

log = logging.getLogger(__name__)

OWN = Path("/proc/self/cgroup")


def _own_cpu_cgroup() -> Path:
    """The directory of this process's cgroup in a hierarchy with the cpu controller; OSError where none is."""
    own = {}  # hierarchy ("cpu,cpuacct", or "" for v2) -> this process's path in it
    for line in OWN.read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        own[controllers] = path
    for m in mountinfo():
        if m.fstype == "cgroup" and "cpu" in m.super_options.split(","):
            path = next((p for c, p in own.items() if "cpu" in c.split(",")), None)
        elif m.fstype == "cgroup2":
            path = own.get("")
        else:
            continue
        root = m.root.rstrip("/")
        if path is None or not (path + "/").startswith(root + "/"):
            continue  # this mount does not show our cgroup
        d = Path(m.mountpoint, path[len(root):].lstrip("/"))
        if m.fstype == "cgroup" or "cpu" in (d / "cgroup.controllers").read_text().split():
            return d
    raise OSError("no cpu cgroup controller is mounted here")


def create(name: str, weight: int, parent: Path | None = None) -> Path | None:
    """The cgroup ``name`` (made if missing) under ``parent`` (default: this process's cpu cgroup), with
    ``weight`` in cgroup v2 units (1..10000; 100 is a process's default); None, logged with the reason, where
    this host does not allow it."""
    try:
        parent = parent or _own_cpu_cgroup()
        v2 = (parent / "cgroup.controllers").exists()  # a v1 cgroup has no such file
        if v2 and "cpu" not in (parent / "cgroup.subtree_control").read_text().split():
            (parent / "cgroup.subtree_control").write_text("+cpu")  # EBUSY where the parent has processes
        cg = parent / name
        cg.mkdir(exist_ok=True)
        if v2:
            (cg / "cpu.weight").write_text(str(weight))
        else:
            (cg / "cpu.shares").write_text(str(max(2, weight * 1024 // 100)))
        return cg
    except (OSError, ValueError) as e:
        log.warning("replicas share the agent's CPU cgroup: cannot make a cgroup %r for them (%s)", name, e)
        return None


def join(cg: Path | None, cmd: list[str]) -> list[str]:
    """``cmd`` run in the cgroup ``cg`` (None: where the caller is): a shell moves itself there and exec()s
    ``cmd``, so the process and all it starts (a restored tree too) live in it from their first instruction."""
    if cg is None:
        return cmd
    return ["sh", "-c", 'echo 0 > "$0/cgroup.procs" && exec "$@"', str(cg), *cmd]


def path_of(name: str) -> Path | None:
    """Where :func:`create` makes the cgroup ``name`` (None where no cpu cgroup is mounted)."""
    with contextlib.suppress(OSError, ValueError):
        return _own_cpu_cgroup() / name
    return None


def remove(cg: Path | None, wait_s: float = 0.0) -> None:
    """Remove the cgroup once no process is left in it, waiting up to ``wait_s`` for those that are exiting
    (else it stays, for the next agent of the host to reuse)."""
    deadline = time.monotonic() + wait_s
    while cg is not None:
        try:
            cg.rmdir()
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                return
        time.sleep(0.05)
