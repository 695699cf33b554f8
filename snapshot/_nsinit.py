"""Process shims that thaw runs with the host's ``python3 -I -S`` (standalone: stdlib only, no thaw imports).

``init``: pid 1 of a fresh replica, started as ``unshare --pid --fork --mount --net --uts --ipc -- python3 -I -S
_nsinit.py init --root ROOT --status-fd N --env-fd M --log-fd L [--cwd DIR] [--hostname NAME]
[--devices NAME:MAJOR:MINOR:MODE,...] [--user USER[:GROUP]] [--shm-bytes N] -- argv...``
(``--root ""``, started without ``--pid --fork --mount``: the host's filesystem and pids, so step 3 and 4 bring
only loopback up and set the hostname).
Before it exec()s the workload it

1. reports its host pid on the status fd (``/proc`` is still the host's procfs here);
2. reads the environment (NUL-separated ``KEY=VALUE``) from the env fd, so no value is on a command line;
3. mounts ROOT/proc (procfs of the new pid namespace), ROOT/sys (ro), ROOT/dev (tmpfs with the usual
   nodes, the ``--devices`` given (the host's GPUs) and /dev/shm, a tmpfs of ``--shm-bytes``, 64 MiB by
   default as in Docker), ROOT/tmp (tmpfs); brings loopback up;
   sets the hostname;
4. pivot_root(ROOT) and detaches the old root, so the mount namespace holds only ROOT and these mounts
   (CRIU dumps exactly these and restores them under a new ``--root``); writes /etc/hosts and /etc/hostname,
   as Docker does;
5. setsid() (session leader, so CRIU needs no --shell-job), stdin = /dev/null inside the root, stdout and
   stderr = the log fd, closes every other fd;
6. with ``--user USER[:GROUP]`` (the image's ``User``: names or ids, as Docker reads them from the root's
   /etc/passwd and /etc/group) takes that user's groups, gid and uid; sets what Docker sets where the env
   has none: HOME (the user's, or root's), PATH and HOSTNAME;
7. chdir(cwd), reports ``exec`` and execs argv with exactly the given environment.

Status fd protocol: ``pid <hostpid>``, then ``exec`` or ``error <message>``, one per line.

The restore side's shim is ``_reap.py``.
"""

import contextlib
import ctypes
import fcntl
import os
import platform
import socket
import stat
import struct
import sys
import warnings  # noqa: F401  (os.execvpe imports it lazily, after pivot_root the host stdlib is gone)

SHM_BYTES = 64 << 20  # /dev/shm's size unless given: Docker's default
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Docker's, where Env has none
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

_PIVOT_ROOT_NR = {"x86_64": 155, "aarch64": 41}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long

# (name, major, minor); all character devices, mode 0666
DEVICES = [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)]
DEV_LINKS = [("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2")]


def _check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(src, target, fstype, flags=0, data=None):
    _check(_libc.mount(src and src.encode(), target.encode(), fstype and fstype.encode(), flags,
                       data and data.encode()), f"mount {fstype or src} on {target}")


def loopback_up():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sh22x", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sh22x", b"lo", 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | IFF_UP))


def parse_devices(arg):
    """``name:major:minor:mode,...`` (mode in octal) -> [(name, major, minor, mode)]; names stay under /dev."""
    out = []
    for item in filter(None, (arg or "").split(",")):
        name, major, minor, mode = item.rsplit(":", 3)
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"device name {name!r} is not a plain path under /dev")
        out.append((name, int(major), int(minor), int(mode, 8)))
    return out


def setup_root(root, hostname, devices=(), shm_bytes=SHM_BYTES):
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    if not os.path.ismount(root):
        mount(root, root, None, MS_BIND | MS_REC)

    def sub(name, mode=0o755):
        path = os.path.join(root, name)
        os.makedirs(path, mode, exist_ok=True)
        return path

    mount("proc", sub("proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    mount("sysfs", sub("sys"), "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    dev = sub("dev")
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k")
    for name, major, minor, mode in [(n, ma, mi, 0o666) for n, ma, mi in DEVICES] + list(devices):
        path = os.path.join(dev, name)
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        os.mknod(path, stat.S_IFCHR | mode, os.makedev(major, minor))
        os.chmod(path, mode)  # mknod honours the umask
    for name, target in DEV_LINKS:
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "shm"))
    mount("shm", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={shm_bytes}")
    mount("tmpfs", sub("tmp", 0o1777), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")

    loopback_up()
    socket.sethostname(hostname)

    # pivot_root(".", ".") stacks the old root on top of the new one; detaching "." then drops it.
    nr = _PIVOT_ROOT_NR.get(platform.machine())
    if nr is None:
        raise OSError(f"pivot_root: unsupported arch {platform.machine()}")
    os.chdir(root)
    _check(_libc.syscall(ctypes.c_long(nr), b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    write_names(hostname)


HOSTS = "127.0.0.1\tlocalhost {0}\n::1\tlocalhost ip6-localhost ip6-loopback\n"


def write_names(hostname):
    """/etc/hosts (localhost, and the hostname on loopback) and /etc/hostname, as Docker gives every container
    (over the image's): images built by Docker carry neither (Docker mounts its own at run time), and without
    them ``localhost`` does not resolve. Written after pivot_root, so that a symlink of the image cannot lead
    out of its root. On the replica's upper layer: a snapshot keeps them with what its server wrote."""
    for name, text in (("hosts", HOSTS.format(hostname)), ("hostname", hostname + "\n")):
        tmp = f"/etc/.thaw-{name}"
        try:
            os.makedirs("/etc", 0o755, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, text.encode())
                os.fchmod(fd, 0o644)
            finally:
                os.close(fd)
            os.rename(tmp, "/etc/" + name)  # over a file, a symlink, a FIFO or a device node alike
        except OSError:  # an /etc that is a file, an /etc/hosts that is a directory: the image's stays
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _table(path):
    """The colon-separated entries of /etc/passwd or /etc/group (none where the file is missing)."""
    try:
        with open(path, errors="surrogateescape") as f:  # a GECOS field in latin-1, say
            return [line.rstrip("\n").split(":") for line in f if line.strip() and not line.startswith("#")]
    except FileNotFoundError:
        return []


def _number(s):
    return s.isascii() and s.isdigit()


def resolve_user(spec):
    """Docker's ``USER`` value -> (uid, gid, supplementary gids, home). ``user`` and ``group`` are names or
    numbers; a name must be in the root's /etc/passwd (/etc/group); a number need not be (then gid 0, home /).
    Without a group: the user's primary group, plus every group that lists the user as a member."""
    user, _, group = spec.partition(":")
    passwd = [e for e in _table("/etc/passwd") if len(e) >= 7]
    entry = next((e for e in passwd if e[0] == user), None)
    if entry is None and _number(user):
        entry = next((e for e in passwd if e[2] == user), None)
    if entry is None and not _number(user):
        raise RuntimeError(f"user {user!r} (the image's User) is not in the image's /etc/passwd")
    uid = int(entry[2]) if entry else int(user)
    gid, home, name = (int(entry[3]), entry[5] or "/", entry[0]) if entry else (0, "/", None)
    groups = [e for e in _table("/etc/group") if len(e) >= 4]
    if group:
        match = next((e for e in groups if e[0] == group), None)
        if match is None and not _number(group):
            raise RuntimeError(f"group {group!r} (the image's User) is not in the image's /etc/group")
        gid = int(match[2]) if match else int(group)
        extra = [gid]
    else:
        extra = [gid] + [int(e[2]) for e in groups if name and name in e[3].split(",") and _number(e[2])]
    return uid, gid, sorted(set(extra)), home


def root_home():
    """Root's home in the image's /etc/passwd; / where that cannot be read (as Docker)."""
    try:
        return resolve_user("0")[3]
    except (OSError, ValueError, RuntimeError):
        return "/"


def become(spec, env):
    """Drop to the image's user (``--user``): groups first, then gid, then uid."""
    uid, gid, extra, home = resolve_user(spec)
    os.setgroups(extra)
    os.setgid(gid)
    os.setuid(uid)
    env.setdefault("HOME", home)


def read_env(fd):
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    env = {}
    for item in data.split(b"\0"):
        if item:
            k, _, v = item.partition(b"=")
            env[os.fsdecode(k)] = os.fsdecode(v)
    return env


def init(args):
    opts = {"--root": None, "--status-fd": "-1", "--env-fd": None, "--log-fd": None, "--cwd": "/",
            "--hostname": "thaw", "--devices": "", "--user": "", "--shm-bytes": str(SHM_BYTES)}
    sep = args.index("--")
    for key, val in zip(args[:sep:2], args[1:sep:2]):
        if key not in opts:
            raise SystemExit(f"_nsinit: unknown option {key}")
        opts[key] = val
    argv = args[sep + 1:]
    status_fd = int(opts["--status-fd"])

    def report(line):
        if status_fd >= 0:
            os.write(status_fd, (line + "\n").encode())

    try:
        if opts["--root"] and os.getpid() != 1:
            raise RuntimeError(f"must run as pid 1 of a new pid namespace (got pid {os.getpid()})")
        if not argv or opts["--root"] is None:
            raise RuntimeError("usage: init --root ROOT ... -- argv...")
        report(f"pid {os.readlink('/proc/self')}")
        env = read_env(int(opts["--env-fd"])) if opts["--env-fd"] else {}
        devices = parse_devices(opts["--devices"])
        if devices and not opts["--root"]:
            raise RuntimeError("--devices needs a root of its own (the host's /dev has them already)")
        if opts["--root"]:
            setup_root(opts["--root"], opts["--hostname"], devices, int(opts["--shm-bytes"]))
        else:  # the host's filesystem: only the network and the hostname are the replica's own
            loopback_up()
            socket.sethostname(opts["--hostname"])
        if os.getsid(0) != os.getpid():  # without a pid namespace it already leads its session
            os.setsid()
        os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
        if opts["--log-fd"]:
            os.dup2(int(opts["--log-fd"]), 1)
            os.dup2(int(opts["--log-fd"]), 2)
        if status_fd >= 0:
            os.closerange(3, status_fd)
        os.closerange(max(3, status_fd + 1), os.sysconf("SC_OPEN_MAX"))
        if opts["--user"]:
            become(opts["--user"], env)
        elif "HOME" not in env:
            env["HOME"] = root_home()
        env.setdefault("PATH", DEFAULT_PATH)  # Docker's, where the image's Env has none
        env.setdefault("HOSTNAME", opts["--hostname"])
        os.chdir(opts["--cwd"])
        report("exec")
        if status_fd >= 0:
            os.close(status_fd)
        os.execvpe(argv[0], argv, env)
    except BaseException as exc:  # noqa: BLE001 - report anything, then die
        msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        try:
            report(f"error {msg}")
        except OSError:
            pass
        print(f"thaw nsinit: {msg}", file=sys.stderr, flush=True)
        os._exit(127)


if __name__ == "__main__":
    init(sys.argv[2:] if sys.argv[1:2] == ["init"] else sys.argv[1:])
