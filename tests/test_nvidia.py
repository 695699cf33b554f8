"""thaw.snapshot.nvidia: the host's GPUs inside image-rooted replicas (device nodes + a driver-library layer).

No NVIDIA driver exists here, so the parts are exercised with stand-ins for the driver's files only: the
library layer is built from a real host library (zlib) the way it is built from libcuda, and the "GPU" device
nodes carry the numbers of /dev/full and /dev/zero. Launch, CRIU dump and restore are real (as in test_criu).
The real driver's devices and libraries run in tests/test_cuda.py's ``gpu`` tests on a GPU machine.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from test_criu import PORT, PYTHON, get, image, needs_criu, work  # noqa: F401 (fixtures)
from thaw.snapshot import CriuError, _linux, checkpoint, launch, prepare_root, restore
from thaw.snapshot.nvidia import (BIN_DIR, LIB_DIR, Device, GpuAccess, build_layer, driver_libraries, gpu_nodes,
                                  host_devices, make_node, match_gpus, with_library_path)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod)")

LDCONFIG_P = """\
1234 libs found in cache `/etc/ld.so.cache'
\tlibz.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libz.so.1
\tlibnvidia-ptxjitcompiler.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-ptxjitcompiler.so.1
\tlibnvidia-ml.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-ml.so.1
\tlibnvidia-ml.so.1 (libc6) => /lib/i386-linux-gnu/libnvidia-ml.so.1
\tlibnvidia-glcore.so.580.95.05 (libc6,x86-64) => /lib/x86_64-linux-gnu/libnvidia-glcore.so.580.95.05
\tlibcudart.so.12 (libc6,x86-64) => /usr/local/cuda/lib64/libcudart.so.12
\tlibcuda.so.1 (libc6,x86-64) => /lib/x86_64-linux-gnu/libcuda.so.1
\tlibcuda.so.1 (libc6) => /lib/i386-linux-gnu/libcuda.so.1
\tlibcuda.so (libc6,x86-64) => /lib/x86_64-linux-gnu/libcuda.so
"""


def test_driver_libraries_from_ldconfig():
    """The driver's own libraries, 64-bit only: not the toolkit's (libcudart), not graphics (glcore), not zlib."""
    libs = driver_libraries(LDCONFIG_P, arch="x86_64")
    assert libs == {n: Path(f"/lib/x86_64-linux-gnu/{n}") for n in
                    ("libnvidia-ptxjitcompiler.so.1", "libnvidia-ml.so.1", "libcuda.so.1", "libcuda.so")}
    assert driver_libraries(LDCONFIG_P.replace("x86-64", "AArch64"), arch="aarch64") == libs
    assert driver_libraries("", arch="x86_64") == {}


@root_only
def test_host_devices_finds_the_nvidia_character_devices(tmp_path):
    for name, major, minor in [("nvidia0", 195, 0), ("nvidiactl", 195, 255), ("nvidia-uvm", 507, 0),
                               ("nvidia-caps/nvidia-cap1", 511, 1), ("nvidiafoo", 1, 3)]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        os.mknod(tmp_path / name, stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(tmp_path / name, 0o400 if "caps" in name else 0o666)
    (tmp_path / "nvidia1").write_text("a regular file, not a device")
    (tmp_path / "null").touch()
    assert host_devices(tmp_path) == [Device("nvidia-caps/nvidia-cap1", 511, 1, 0o400),
                                      Device("nvidia-uvm", 507, 0, 0o666), Device("nvidia0", 195, 0, 0o666),
                                      Device("nvidiactl", 195, 255, 0o666)]
    assert host_devices(tmp_path / "none") == []


def test_build_layer(tmp_path):
    src = tmp_path / "lib"
    src.mkdir()
    real = src / "libcuda.so.580.95.05"
    real.write_bytes(b"\x7fELF driver")
    (src / "libcuda.so.1").symlink_to(real.name)
    (src / "libnvidia-ml.so.1").write_bytes(b"\x7fELF nvml")
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n")
    smi.chmod(0o755)
    libs = {"libcuda.so.1": src / "libcuda.so.1", "libcuda.so": src / "libcuda.so.1",
            "libnvidia-ml.so.1": src / "libnvidia-ml.so.1"}
    layer = build_layer(tmp_path / "layers", "driver-580.95.05", libs, [smi])
    lib = layer / LIB_DIR.lstrip("/")
    assert sorted(p.name for p in lib.iterdir()) == ["libcuda.so", "libcuda.so.1", "libcuda.so.580.95.05",
                                                     "libnvidia-ml.so.1"]
    assert os.readlink(lib / "libcuda.so.1") == os.readlink(lib / "libcuda.so") == "libcuda.so.580.95.05"
    assert (lib / "libcuda.so.1").read_bytes() == b"\x7fELF driver"
    assert (lib / "libcuda.so.580.95.05").stat().st_ino == real.stat().st_ino  # a hard link, not a copy
    assert os.access(layer / BIN_DIR.lstrip("/") / "nvidia-smi", os.X_OK)
    assert stat.S_IMODE(layer.stat().st_mode) == 0o755
    # built once; a new driver file (an upgrade) makes a new layer
    assert build_layer(tmp_path / "layers", "driver-580.95.05", libs, [smi]) == layer
    (src / "libnvidia-ml.so.1").write_bytes(b"\x7fELF nvml, newer")
    assert build_layer(tmp_path / "layers", "driver-580.95.05", libs, [smi]) != layer
    assert not [p for p in (tmp_path / "layers").iterdir() if p.name.startswith(".")]


def test_with_library_path():
    assert with_library_path({"A": "1"}) == {"A": "1", "LD_LIBRARY_PATH": LIB_DIR}
    assert with_library_path({"LD_LIBRARY_PATH": "/opt/x:"}) == {"LD_LIBRARY_PATH": f"/opt/x:{LIB_DIR}"}
    env = {"LD_LIBRARY_PATH": f"/usr/local/nvidia/lib:{LIB_DIR}"}  # NVIDIA's CUDA images
    assert with_library_path(env) is env


@root_only
def test_make_node_replaces_a_node_with_other_numbers(tmp_path):
    make_node(tmp_path, Device("caps/a", 1, 7, 0o640))
    st = (tmp_path / "caps/a").lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 7) and stat.S_IMODE(st.st_mode) == 0o640
    ino = st.st_ino
    make_node(tmp_path, Device("caps/a", 1, 7, 0o640))
    assert (tmp_path / "caps/a").lstat().st_ino == ino  # already right: left alone
    make_node(tmp_path, Device("caps/a", 1, 5, 0o666))
    assert (tmp_path / "caps/a").lstat().st_rdev == os.makedev(1, 5)


U0, U1 = "GPU-0a1b2c3d-0000-1111-2222-333344445555", "GPU-9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff"
GPU_INFO = """Model: \t\t NVIDIA H100 80GB HBM3
IRQ:   \t\t 164
GPU UUID: \t {uuid}
Video BIOS: \t 96.00.99.00.01
Bus Type: \t PCIe
DMA Size: \t 52 bits
Device Minor: \t {minor}
GPU Excluded:\t No
"""


def test_gpu_nodes_from_the_drivers_proc_files(tmp_path):
    """Which /dev/nvidiaN is which GPU: the driver's /proc/driver/nvidia/gpus/<bus id>/information (the minor
    need not follow the bus order); a file without both fields is skipped."""
    for bus, uuid, minor in [("0000:18:00.0", U1, 3), ("0000:2a:00.0", U0, 0)]:
        (tmp_path / "gpus" / bus).mkdir(parents=True)
        (tmp_path / "gpus" / bus / "information").write_text(GPU_INFO.format(uuid=uuid, minor=minor))
    (tmp_path / "gpus" / "0000:3b:00.0").mkdir()
    (tmp_path / "gpus" / "0000:3b:00.0" / "information").write_text("Model: \t\t something else\n")
    assert gpu_nodes(tmp_path) == {U0: "nvidia0", U1: "nvidia3"}
    assert gpu_nodes(tmp_path / "none") == {}
    # an uninitialised GPU shows no UUID there; NVML, where installed, knows both
    (tmp_path / "gpus" / "0000:18:00.0" / "information").write_text(
        GPU_INFO.format(uuid="GPU-????????-????-????-????-????????????", minor=3))
    assert gpu_nodes(tmp_path) == {U0: "nvidia0"}
    assert gpu_nodes(tmp_path, {"uuids": [U1, U0], "minors": [3, 0]}) == {U1: "nvidia3", U0: "nvidia0"}


def test_match_gpus_hands_out_gpus_only_when_every_one_has_its_node():
    devices = [Device("nvidia-uvm", 507, 0, 0o666), Device("nvidia0", 195, 0, 0o666), Device("nvidia3", 195, 3, 0o666),
               Device("nvidiactl", 195, 255, 0o666)]
    nodes = {U0: "nvidia0", U1: "nvidia3"}
    assert match_gpus([U1, U0], nodes, devices) == ((U1, "nvidia3"), (U0, "nvidia0"))  # CUDA order kept
    assert match_gpus([U0, U1], {U0: "nvidia0"}, devices) == ()  # one GPU unnamed: every replica gets every node
    assert match_gpus([U0, U1], nodes, devices[:2]) == ()  # its node is not in /dev
    assert match_gpus([], nodes, devices) == ()


def test_gpu_access_for_one_gpu():
    """Replica number ``gpu``: the shared nodes and its GPU's own, and that GPU's UUID in CUDA_VISIBLE_DEVICES."""
    ctl, g0, g3 = (Device("nvidiactl", 195, 255, 0o666), Device("nvidia0", 195, 0, 0o666),
                   Device("nvidia3", 195, 3, 0o666))
    access = GpuAccess(Path("/layer"), (ctl, g0, g3), ((U0, "nvidia0"), (U1, "nvidia3")))
    assert access.devices_for(1) == (ctl, g3) and access.devices_for(0) == (ctl, g0)
    assert access.devices_for(None) == (ctl, g0, g3)
    assert access.env({"A": "1"}, 1) == {"A": "1", "LD_LIBRARY_PATH": LIB_DIR, "CUDA_VISIBLE_DEVICES": U1}
    assert access.env({"A": "1"}) == {"A": "1", "LD_LIBRARY_PATH": LIB_DIR}
    unassigned = GpuAccess(Path("/layer"), (ctl, g0, g3))  # the driver named no nodes: all of them, no variable
    assert unassigned.devices_for(1) == (ctl, g0, g3) and "CUDA_VISIBLE_DEVICES" not in unassigned.env({}, 1)


# -- real CRIU: a replica that maps a library from the layer and holds a node in its /dev ----------------------
SERVER = r'''
import ctypes, json, os
from http.server import BaseHTTPRequestHandler, HTTPServer
z = ctypes.CDLL("libz.so.1")
z.zlibVersion.restype = ctypes.c_char_p
NODE = "/dev/thaw-test/node"

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        st = os.stat(NODE)
        with open(NODE, "rb") as f:
            head = f.read(4).hex()
        maps = sorted({l.split()[-1] for l in open("/proc/self/maps") if "libz.so" in l})
        body = json.dumps({"zlib": z.zlibVersion().decode(), "libz": maps, "node": [os.major(st.st_rdev),
                           os.minor(st.st_rdev)], "head": head, "ld": os.environ.get("LD_LIBRARY_PATH")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

HTTPServer(("127.0.0.1", 8080), H).serve_forever()
'''


def _host_libz() -> Path:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"\tlibz\.so\.1 \(libc6,x86-64\) => (\S+)", out)
    if not m:
        pytest.skip("no 64-bit libz.so.1 in the library cache")
    return Path(m[1])


@needs_criu
def test_replica_uses_the_layer_and_devices_across_checkpoint_and_restore(image, work, tmp_path):  # noqa: F811
    libz = _host_libz()
    layers = tmp_path / "layers"  # a tmpfs: overlayfs refuses a lower layer inside another one (here "/")
    layers.mkdir()
    _linux.mount("tmpfs", layers, "tmpfs", 0, "size=16m,mode=755")
    roots = []

    def new_root(with_layer=True):
        roots.append(prepare_root([layer, *image] if with_layer else image, work / "nv-roots"))
        return roots[-1].path

    try:
        layer = build_layer(layers, "test", {"libz.so.1": libz}, [])  # copied: a hard link can't leave the tmpfs
        access = GpuAccess(layer, (Device("thaw-test/node", 1, 7, 0o666),))  # /dev/full's numbers
        replica = launch(new_root(), [PYTHON, "-I", "-c", SERVER], access.env({"PATH": "/usr/bin:/bin"}), "/",
                         work / "nv-launch.log", devices=access.devices)
        try:
            replica.wait_ready(PORT, "/", timeout=60)
            before = get(replica, "/")
            assert before["libz"] == [f"{LIB_DIR}/{libz.resolve().name}"], before  # the layer's copy, not /lib's
            assert before["node"] == [1, 7] and before["head"] == "00000000" and before["ld"] == LIB_DIR
            cp = checkpoint(replica, work / "nv-images")
        finally:
            replica.stop()

        # a root without the layer lacks the library the process maps: CRIU refuses, as on a host without GPU access
        with pytest.raises(CriuError) as err:
            restore(cp.images_dir, new_root(with_layer=False), work / "nv-nolayer.log", timeout=60)
        assert "libz.so" in str(err.value) or "libz.so" in Path(str(err.value).rsplit("see log ", 1)[-1]).read_text()

        r2 = restore(cp.images_dir, new_root(), work / "nv-restore.log")
        try:
            assert get(r2, "/") == before  # the node came back with the /dev tmpfs
            # another host gives the device other numbers: refresh makes this host's node in the replica's /dev
            GpuAccess(layer, (Device("thaw-test/node", 1, 5, 0o666),)).refresh(r2.pid)  # /dev/zero's
            assert get(r2, "/") == {**before, "node": [1, 5]}
        finally:
            r2.stop()
    finally:
        for r in roots:
            r.cleanup()
        _linux.umount(layers)


@needs_criu
def test_a_replica_sees_only_its_gpu_and_refresh_moves_it(image, work, tmp_path):  # noqa: F811
    """Launched on GPU 1 of two: its /dev has that GPU's node and the shared one, not GPU 0's, and its
    environment names GPU 1; a refresh for GPU 0 (a restore placed there) swaps the nodes. The nodes carry
    /dev/full's, /dev/zero's and /dev/null's numbers."""
    ctl, g0, g1 = Device("nvidiactl", 1, 3, 0o666), Device("nvidia0", 1, 7, 0o666), Device("nvidia1", 1, 5, 0o666)
    access = GpuAccess(tmp_path, (ctl, g0, g1), ((U0, "nvidia0"), (U1, "nvidia1")))
    root = prepare_root(image, work / "gpu-roots")

    def nodes(pid):
        dev = Path(f"/proc/{pid}/root/dev")
        return {p.name: os.minor(p.lstat().st_rdev) for p in dev.glob("nvidia*") if stat.S_ISCHR(p.lstat().st_mode)}

    try:
        replica = launch(root.path, [PYTHON, "-I", "-m", "http.server", str(PORT)],
                         access.env({"PATH": "/usr/bin:/bin"}, 1), "/", work / "gpu-launch.log",
                         devices=access.devices_for(1))
        try:
            replica.wait_ready(PORT, "/", timeout=60)
            assert nodes(replica.pid) == {"nvidiactl": 3, "nvidia1": 5}
            environ = Path(f"/proc/{replica.pid}/environ").read_bytes().split(b"\0")
            assert f"CUDA_VISIBLE_DEVICES={U1}".encode() in environ
            access.refresh(replica.pid, 0)
            assert nodes(replica.pid) == {"nvidiactl": 3, "nvidia0": 7}
        finally:
            replica.stop()
    finally:
        root.cleanup()
