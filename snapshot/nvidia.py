"""The host's NVIDIA GPUs inside image-rooted replicas: what nvidia-container-toolkit does for docker.

A replica's root is its image, but the GPU driver is the host's: its kernel module has to match the
user-space libraries exactly. On a GPU host every image-rooted replica (the one launched for a snapshot, and
each restored one) gets

* the driver's device nodes (``/dev/nvidiactl``, ``/dev/nvidia-uvm``, ``/dev/nvidia-uvm-tools``,
  ``/dev/nvidiaN``, ``/dev/nvidia-caps/*``), made in its ``/dev`` tmpfs with the host's numbers;
* the driver's user-space libraries (libcuda, NVML, the PTX JIT compiler, ...) and ``nvidia-smi`` in one
  more read-only layer of its root, at ``/usr/local/nvidia/lib64`` and ``/usr/local/nvidia/bin``. NVIDIA's
  CUDA images already have that directory on ``LD_LIBRARY_PATH``; for other images thaw puts it there.

Each replica gets one GPU of the host: the host agent picks the GPU that runs the fewest of its replicas. The
replica's ``/dev`` then has that GPU's ``/dev/nvidiaN`` and no other, and a launched process gets
``CUDA_VISIBLE_DEVICES`` set to that GPU's UUID. A restored process keeps the environment of its snapshot, so
its restore maps the snapshot's GPU onto the chosen one instead (``cuda.gpu_remap``).

The layer is built once per host and driver from the host's own files (hard links where the file system
allows) under ``<work_dir>/gpu-driver/driver-<version>-<hash>``. The layer and the nodes are plain files to
CRIU: the libraries a process maps are files of its root, and the nodes are part of its ``/dev`` tmpfs,
which CRIU dumps and restores with their contents. The numbers of ``nvidia-uvm`` and ``nvidia-caps`` are chosen when the
driver loads and can differ between two hosts with the same driver, so after a restore ``refresh`` makes the
nodes again with this host's numbers, before the CUDA restore opens them.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cuda import NVIDIA_DEV, NVIDIA_PROC, nvml_gpus

log = logging.getLogger(__name__)

LIB_DIR = "/usr/local/nvidia/lib64"
BIN_DIR = "/usr/local/nvidia/bin"
# user-space driver libraries a CUDA process may load: nvidia-container-toolkit's "compute" and "utility" sets
DRIVER_LIB = re.compile(r"^(libcuda|libcudadebugger|libnvidia-(ml|cfg|ptxjitcompiler|nvvm|gpucomp|allocator|"
                        r"opencl|pkcs11|pkcs11-openssl3))\.so(\.\d+)*$")
DRIVER_BINS = ("nvidia-smi", "nvidia-debugdump")
_LDCONFIG_ARCH = {"x86_64": "x86-64", "aarch64": "AArch64"}  # the tag `ldconfig -p` gives 64-bit libraries
GPU_NODE = re.compile(r"^nvidia\d+$")  # one GPU's node; the other nvidia* nodes are the driver's, shared by all


class GpuAccessError(RuntimeError):
    """The host has NVIDIA devices but thaw cannot give replicas access to them; the message says why."""


@dataclass(frozen=True)
class Device:
    name: str   # relative to /dev, e.g. "nvidia0" or "nvidia-caps/nvidia-cap1"
    major: int
    minor: int
    mode: int   # permission bits

    def arg(self) -> str:
        """The replica shim's form: ``name:major:minor:mode`` (mode in octal)."""
        return f"{self.name}:{self.major}:{self.minor}:{self.mode:o}"


def host_devices(dev: Path = Path("/dev")) -> list[Device]:
    """The NVIDIA character devices under ``dev`` (the same names ``cuda.nvidia_files`` recognises), sorted."""
    found = []
    for path in [*dev.glob("nvidia*"), *dev.glob("nvidia-caps/*")]:
        name = path.relative_to(dev).as_posix()
        try:
            st = path.stat()
        except OSError:
            continue
        if stat.S_ISCHR(st.st_mode) and NVIDIA_DEV.match(f"/dev/{name}"):
            found.append(Device(name, os.major(st.st_rdev), os.minor(st.st_rdev), stat.S_IMODE(st.st_mode)))
    return sorted(found, key=lambda d: d.name)


def gpu_nodes(proc: Path = NVIDIA_PROC, nvml: dict | None = None) -> dict[str, str]:
    """GPU UUID -> the name of its node under /dev (``nvidia<minor>``): from NVML (``nvml``, as
    ``cuda.nvml_gpus()`` gives it) where it is installed, else from the driver's
    ``/proc/driver/nvidia/gpus/*/information``, which shows the UUID only while the GPU is initialised
    (``GPU-????…`` otherwise: skipped); {} where neither says."""
    if nvml:
        return {u: f"nvidia{m}" for u, m in zip(nvml["uuids"], nvml["minors"])}
    nodes = {}
    for info in sorted((proc / "gpus").glob("*/information")):
        try:
            text = info.read_text()
        except OSError:
            continue
        uuid, minor = re.search(r"^GPU UUID:\s*(\S+)", text, re.M), re.search(r"^Device Minor:\s*(\d+)", text, re.M)
        if uuid and minor and "?" not in uuid[1]:
            nodes[uuid[1]] = f"nvidia{minor[1]}"
    return nodes


def match_gpus(uuids, nodes: dict[str, str], devices) -> tuple[tuple[str, str], ...]:
    """(UUID, node name) of each GPU in ``uuids`` (CUDA order), when ``nodes`` (:func:`gpu_nodes`) names a node of
    ``devices`` for every one of them; () otherwise: then every replica gets every node, as before thaw handed
    out GPUs one by one."""
    names = {d.name for d in devices}
    gpus = tuple((u, nodes[u]) for u in uuids if nodes.get(u) in names)
    if len(gpus) == len(uuids):
        return gpus
    log.warning("GPU access: the driver names no /dev node for %d of %d GPUs: every replica gets all of them",
                len(uuids) - len(gpus), len(uuids))
    return ()


def driver_libraries(ldconfig_p: str, arch: str | None = None) -> dict[str, Path]:
    """name -> path of the driver's libraries in ``ldconfig -p`` output, for this host's architecture only."""
    tag = _LDCONFIG_ARCH.get(arch or platform.machine(), arch or platform.machine())
    libs: dict[str, Path] = {}
    for line in ldconfig_p.splitlines():
        m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)$", line)
        if m and DRIVER_LIB.match(m[1]) and tag in m[2].split(",") and m[1] not in libs:
            libs[m[1]] = Path(m[3])
    return libs


def _ldconfig_p() -> str:
    exe = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        return subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise GpuAccessError(f"cannot list the host's libraries with {exe} -p: {e}") from None


def _place(src: Path, dest: Path) -> None:
    """dest = src's content: a hard link where possible, else a copy (mode and mtime kept)."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def build_layer(parent: Path, name: str, libs: dict[str, Path], bins: list[Path]) -> Path:
    """The layer ``parent/<name>-<hash of the files>``: every library under LIB_DIR by its real file name,
    with a symlink for each other name it is known by (``libcuda.so.1 -> libcuda.so.580.95.05``), and the
    binaries under BIN_DIR. Built once into a temporary directory and renamed into place."""
    real = {n: p.resolve() for n, p in libs.items()}
    files = sorted({*real.values(), *(b.resolve() for b in bins)})
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    for n in sorted(real):
        h.update(f"{n}\0{real[n].name}\0".encode())
    dest = parent / f"{name}-{h.hexdigest()[:12]}"
    if dest.is_dir():
        return dest
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=parent))
    try:
        lib_dir, bin_dir = tmp / LIB_DIR.lstrip("/"), tmp / BIN_DIR.lstrip("/")
        lib_dir.mkdir(parents=True)
        bin_dir.mkdir(parents=True)
        for path in sorted(set(real.values())):
            _place(path, lib_dir / path.name)
        for n, path in sorted(real.items()):
            if n != path.name and not (lib_dir / n).exists():
                os.symlink(path.name, lib_dir / n)
        for b in bins:
            _place(b.resolve(), bin_dir / b.name)
        for d in (tmp, *tmp.rglob("*")):
            if d.is_dir() and not d.is_symlink():
                d.chmod(0o755)
        os.rename(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not dest.is_dir():
            raise
        # another agent of this host built the same layer meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def with_library_path(env: dict[str, str]) -> dict[str, str]:
    """``env`` with LIB_DIR on LD_LIBRARY_PATH (appended, so an image's own choice comes first)."""
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    return env if LIB_DIR in parts else {**env, "LD_LIBRARY_PATH": ":".join([*parts, LIB_DIR])}


def make_node(dev_dir: Path, d: Device) -> None:
    """(Re)make ``dev_dir/d.name`` as character device major:minor, unless it already is one."""
    path = dev_dir / d.name
    try:
        st = path.lstat()
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(d.major, d.minor):
            return
        path.unlink()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | d.mode, os.makedev(d.major, d.minor))
    os.chmod(path, d.mode)  # mknod honours the umask


@dataclass(frozen=True)
class GpuAccess:
    """What an image-rooted replica on this host gets to use the GPUs: a root layer and device nodes.
    ``gpus`` is (UUID, node name) of each GPU in CUDA ordinal order; a replica gets GPU number ``gpu`` of it.
    With ``gpu`` None (or no ``gpus``: the driver did not say which node is which GPU) it gets every node."""
    layer: Path
    devices: tuple[Device, ...]
    gpus: tuple[tuple[str, str], ...] = ()

    def devices_for(self, gpu: int | None) -> tuple[Device, ...]:
        """The driver's shared nodes and GPU ``gpu``'s own node."""
        if gpu is None or not self.gpus:
            return self.devices
        return tuple(d for d in self.devices if not GPU_NODE.match(d.name) or d.name == self.gpus[gpu][1])

    def env(self, env: dict[str, str], gpu: int | None = None) -> dict[str, str]:
        env = with_library_path(env)
        return {**env, "CUDA_VISIBLE_DEVICES": self.gpus[gpu][0]} if gpu is not None and self.gpus else env

    def refresh(self, pid: int, gpu: int | None = None) -> None:
        """Make this host's device nodes for GPU ``gpu`` in the /dev of the replica whose pid 1 is ``pid`` (host
        pid), and remove the node of any other GPU (the one the snapshot was taken on, say)."""
        dev_dir = Path(f"/proc/{pid}/root/dev")
        keep = self.devices_for(gpu)
        if keep is not self.devices:
            names = {d.name for d in keep}
            for path in dev_dir.glob("nvidia*"):
                if GPU_NODE.match(path.name) and path.name not in names:
                    path.unlink()
        for d in keep:
            make_node(dev_dir, d)


def for_host(parent: Path, driver: str, uuids: list[str] | tuple[str, ...] = (), dev: Path = Path("/dev"),
             proc: Path = NVIDIA_PROC) -> GpuAccess | None:
    """GpuAccess for this host (``driver``: its driver version, ``uuids``: its GPUs in CUDA ordinal order, both
    from the GPU facts), building the layer under ``parent`` if needed; None where the host has no NVIDIA
    device. GpuAccessError where it has devices but the driver's libcuda is not in the library cache."""
    if (dev / "nvidiactl").exists() and not (dev / "nvidia-uvm").exists() and shutil.which("nvidia-modprobe"):
        # CUDA needs nvidia-uvm, whose node appears when a first process on the host loads the module
        subprocess.run(["nvidia-modprobe", "-u", "-c=0"], capture_output=True, timeout=30)
    devices = host_devices(dev)
    if not devices:
        return None
    libs = driver_libraries(_ldconfig_p())
    if "libcuda.so.1" not in libs:
        raise GpuAccessError("this host has NVIDIA devices but no libcuda.so.1 in its library cache "
                             "(`ldconfig -p`): replicas with their own root cannot use the GPU")
    bins = [Path(p) for p in map(shutil.which, DRIVER_BINS) if p]
    layer = build_layer(parent, f"driver-{driver}", libs, bins)
    gpus = match_gpus(uuids, gpu_nodes(proc, nvml_gpus() if uuids else None), devices)
    log.info("GPU access for replicas: %d device nodes, %d GPUs (one per replica), driver layer %s (%d libraries)",
             len(devices), len(gpus), layer, len(libs))
    return GpuAccess(layer, tuple(devices), gpus)
