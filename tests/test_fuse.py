"""The lazy image filesystem with real FUSE (root): exact tree, chunked reads, .pyc use, concurrency, clean and
dead unmounts, missing/hung chunks, access recording + prefetch, overlayfs over the FUSE mount.

``python3 tests/test_fuse.py [MB]`` is a by-hand timing check (warm sequential read, mount vs native).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    import pyfuse3  # noqa: F401
except ImportError:  # pragma: no cover
    pyfuse3 = None

sys.path.insert(0, str(Path(__file__).parent))
from test_ingest import make_fancy_tree, snapshot_stats  # noqa: E402

from thaw.config import Config  # noqa: E402
from thaw.imagefs.ingest import Limits, ingest_and_commit  # noqa: E402
from thaw.imagefs.manifest import ImageManifest  # noqa: E402
from thaw.imagefs.oci import SourceSpec  # noqa: E402
from thaw.imagefs.store import ChunkStore  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse") or pyfuse3 is None,
                                reason="needs /dev/fuse and pyfuse3")

MiB = 1 << 20


def _ingest(state_dir: Path, src: Path):
    cfg = Config(state_dir=state_dir)
    store = ChunkStore.open(cfg)
    m, _, _ = ingest_and_commit(SourceSpec("dir", str(src)), store, "fuse-test", Limits.from_config(cfg))
    return cfg, store, m


def _entry(m: ImageManifest, path: str):
    return next(e for e in m.entries if e.path == path)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuse")
    src = make_fancy_tree(base / "src")
    os.mkfifo(src / "fifo")
    os.chmod(src / "fifo", 0o640)
    rng = __import__("random").Random(7)
    (src / "nine.bin").write_bytes(rng.randbytes(9 * MiB))
    data = src / "data"
    data.mkdir()
    for i in range(4):
        (data / f"f{i}.bin").write_bytes(rng.randbytes(3 * MiB + i * 777_777))
    pkg = src / "py"
    pkg.mkdir()
    (pkg / "thawmod.py").write_text("VALUE = 42\n")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(pkg)], check=True)
    cfg, store, m = _ingest(base / "state", src)
    return SimpleNamespace(base=base, src=src, cfg=cfg, store=store, manifest=m, digest=m.digest)


@pytest.fixture(scope="module")
def mounted(image):
    from thaw.imagefs.mount import mount

    h = mount(image.cfg, image.digest, image.base / "mnt")
    try:
        yield h
    finally:
        h.unmount()


def test_tree_matches_source(image, mounted):
    from thaw.imagefs.mount import DEFAULT_READ_AHEAD_KB, fuse_mounts

    mnt = Path(mounted.mountpoint)
    r = subprocess.run(["diff", "-r", "--no-dereference", "--exclude=fifo", str(image.src), str(mnt)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert snapshot_stats(image.src) == snapshot_stats(mnt)  # modes, owners, sizes, nlink, mtime_ns, xattrs
    assert os.readlink(mnt / "rel-link") == "usr/bin/tool"
    a, b = os.stat(mnt / "usr/bin/tool"), os.stat(mnt / "usr/bin/tool-hardlink")
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    entries = sorted(image.manifest.entries, key=lambda e: e.path)
    assert os.stat(mnt / "nine.bin").st_ino == 1 + [e.path for e in entries].index("nine.bin")  # stable
    assert os.stat(mnt).st_ino == 1
    with pytest.raises(OSError) as err:
        open(mnt / "new-file", "w")
    assert err.value.errno == errno.EROFS
    sv = os.statvfs(mnt)
    assert sv.f_files == len([e for e in entries if not e.hardlink]) and sv.f_blocks > 0
    m = fuse_mounts(mnt)[-1]
    assert m.source == "thaw" and m.fstype == "fuse"
    line = next(ln for ln in open("/proc/self/mountinfo") if ln.split()[0] == str(m.mount_id))
    assert "ro" in m.options.split(",")
    assert {"allow_other", "default_permissions"} <= set(line.split()[-1].split(","))
    ra = Path(f"/sys/class/bdi/{m.dev}/read_ahead_kb")
    assert int(ra.read_text()) == DEFAULT_READ_AHEAD_KB


def test_reads_across_chunk_boundaries(image, mounted):
    mnt = Path(mounted.mountpoint)
    want = (image.src / "nine.bin").read_bytes()
    assert (mnt / "nine.bin").read_bytes() == want
    fd = os.open(mnt / "nine.bin", os.O_RDONLY)
    try:
        for off in (0, 4 * MiB - 1, 4 * MiB - 100_000, 4 * MiB, 8 * MiB - 7, 9 * MiB - 10, 9 * MiB, 9 * MiB + 5):
            for size in (1, 4096, 200_000, 5 * MiB):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # make the read reach the filesystem
                assert os.pread(fd, size, off) == want[off:off + size], (off, size)
    finally:
        os.close(fd)
    # O_DIRECT sends the exact ranges (not page-cache windows) to the filesystem
    fd = os.open(mnt / "nine.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        for off in (4 * MiB - 4096, 8 * MiB - 8192):
            assert os.pread(fd, 3 * 4096, off) == want[off:off + 3 * 4096]
    finally:
        os.close(fd)


def test_read_assembles_chunks_in_process(image):
    """ImageFS.read straight (no kernel in between): exact spans over 4 MiB chunk boundaries, EOF, LRU bound."""
    import trio

    from thaw.imagefs.fuse import ImageFS

    fs = ImageFS(image.store, image.manifest, image.digest, cache_bytes=5 * MiB, readahead_bytes=0)
    ino = next(i for i, e in enumerate(fs.entries) if e is not None and e.path == "nine.bin")
    want = (image.src / "nine.bin").read_bytes()

    async def reads():
        for off, size in ((4 * MiB - 10, 20), (0, 9 * MiB), (4 * MiB - 1, 4 * MiB + 2), (9 * MiB - 1, 100),
                          (9 * MiB, 10), (123, 0)):
            got = bytes(await fs.read(ino, off, size))
            assert got == want[off:off + size], (off, size)

    trio.run(reads)
    assert fs._cached <= 5 * MiB and fs.stats["errors"] == 0


def _library_image(tmp_path, mib: int):
    """(store, manifest, bytes) of an image holding one random ``mib`` MiB file, lib.so, cut into 1 MiB chunks
    (as builds cut container images)."""
    import random

    src = tmp_path / "src"
    src.mkdir()
    want = random.Random(mib).randbytes(mib * MiB)
    (src / "lib.so").write_bytes(want)
    cfg = Config(state_dir=tmp_path / "state")
    store = ChunkStore.open(cfg)
    m, _, _ = ingest_and_commit(SourceSpec("dir", str(src)), store, "lib", Limits.from_config(cfg), chunk_size=MiB)
    return store, m, want


def test_readahead_follows_sequential_readers_only(tmp_path):
    """An image cut into 1 MiB chunks (as builds cut container images). A read that starts where the file's last
    read ended fetches the chunks of the next readahead_bytes in the background; any other read (a page fault's
    window in a mmapped library) fetches only the chunks it covers, even past the middle of its chunk."""
    import trio

    from thaw.imagefs.fuse import ImageFS

    store, m, want = _library_image(tmp_path, 16)
    assert [size for _, size in _entry(m, "lib.so").chunks] == [MiB] * 16
    fs = ImageFS(store, m, m.digest, readahead_bytes=3 * MiB)
    ino = next(i for i, e in enumerate(fs.entries) if e is not None and e.path == "lib.so")

    async def reads(spans):
        async with trio.open_nursery() as nursery:  # exits once the background fetches are done
            fs._nursery = nursery
            for off, size in spans:
                assert bytes(await fs.read(ino, off, size)) == want[off:off + size], (off, size)
        fs._nursery = None
        return fs.stats["fetches"]

    KiB = 1 << 10
    # two scattered windows, the first ending past the middle of chunk 9: chunks 9 and 5 only
    assert trio.run(reads, [(9 * MiB + 600 * KiB, 256 * KiB), (5 * MiB, 128 * KiB)]) == 2
    # a sequential reader from 0: its first read is not known to be sequential (chunk 0); its second is, and
    # fetches ahead the chunks that start within 3 MiB of where it ended (1, 2, 3)
    assert trio.run(reads, [(0, 512 * KiB), (512 * KiB, 512 * KiB)]) == 2 + 1 + 3
    # it goes on: chunk 4 comes into the window; 5 was fetched by the scattered read above
    assert trio.run(reads, [(MiB, MiB), (2 * MiB, MiB)]) == 2 + 1 + 3 + 1
    assert fs.stats["errors"] == 0


def test_a_failed_readahead_does_not_fail_the_read_of_that_chunk(tmp_path):
    """A read-ahead fetch can fail where a read would not (it timed out waiting for a fetch slot behind slow S3
    fetches): the application's own read of that chunk a moment later fetches it again instead of failing."""
    import trio

    from thaw.imagefs.fuse import ImageFS
    from thaw.imagefs.store import StoreError

    store, m, want = _library_image(tmp_path, 4)
    second = _entry(m, "lib.so").chunks[1][0]

    class OnceSlow:
        """The store, whose first fetch of the second chunk fails."""
        failed = False

        def get_chunk_local(self, digest):
            if digest == second and not self.failed:
                self.failed = True
                raise StoreError("no fetch slot in time")
            return store.get_chunk_local(digest)

        def __getattr__(self, name):
            return getattr(store, name)

    flaky = OnceSlow()
    fs = ImageFS(flaky, m, m.digest, readahead_bytes=2 * MiB)
    ino = next(i for i, e in enumerate(fs.entries) if e is not None and e.path == "lib.so")

    async def reads():
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            for off in (0, 256 * 1024):   # the second read is sequential: chunks 1 and 2 are read ahead
                assert bytes(await fs.read(ino, off, 256 * 1024)) == want[off:off + 256 * 1024]
        fs._nursery = None
        assert flaky.failed
        assert bytes(await fs.read(ino, MiB, 4096)) == want[MiB:MiB + 4096]

    trio.run(reads)

    # the application's read comes while that read-ahead is still under way (it joins it): when the read-ahead
    # fails, the read fetches the chunk itself instead of failing with it
    gate = threading.Event()

    class SlowThenFails(OnceSlow):
        def get_chunk_local(self, digest):
            if digest == second and not self.failed:
                gate.wait(10)
            return super().get_chunk_local(digest)

    flaky = SlowThenFails()
    fs = ImageFS(flaky, m, m.digest, readahead_bytes=2 * MiB)

    async def joined():
        got = []
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            for off in (0, 256 * 1024):
                await fs.read(ino, off, 256 * 1024)
            await trio.sleep(0.05)
            assert second in fs._inflight  # the read-ahead, stuck in the store

            async def app_read():
                got.append(bytes(await fs.read(ino, MiB, 4096)))

            nursery.start_soon(app_read)
            await trio.sleep(0.05)
            gate.set()
        fs._nursery = None
        assert flaky.failed and got == [want[MiB:MiB + 4096]]

    trio.run(joined)


def test_a_file_its_chunks_do_not_cover_reads_as_eio(tmp_path):
    """A manifest whose file is longer than its chunks (a corrupt or hand-made one): reads past what the chunks
    cover fail with EIO, and the filesystem goes on answering (an uncaught error would end the daemon)."""
    import errno

    import pyfuse3
    import trio

    from thaw.imagefs.fuse import ImageFS

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 100)
    (src / "g").write_bytes(b"y" * 10)
    cfg = Config(state_dir=tmp_path / "state")
    store = ChunkStore.open(cfg)
    m, _, _ = ingest_and_commit(SourceSpec("dir", str(src)), store, "short", Limits.from_config(cfg))
    _entry(m, "f").chunks = []  # a 100-byte file without chunks
    _entry(m, "g").size = 20  # one 10-byte chunk for a 20-byte file
    fs = ImageFS(store, m, m.digest)
    ino = {e.path: i for i, e in enumerate(fs.entries) if e is not None}

    async def read(path, off, size):
        try:
            return bytes(await fs.read(ino[path], off, size))
        except pyfuse3.FUSEError as e:
            return e.errno

    assert trio.run(read, "f", 0, 10) == errno.EIO
    assert trio.run(read, "g", 0, 10) == b"y" * 10 and trio.run(read, "g", 5, 10) == errno.EIO
    assert fs.stats["errors"] == 2


def test_python_imports_use_the_images_pyc(image, mounted):
    mnt = Path(mounted.mountpoint)
    env = {**os.environ, "PYTHONPATH": str(mnt / "py"), "PYTHONDONTWRITEBYTECODE": "1"}
    r = subprocess.run([sys.executable, "-v", "-c", "import thawmod; print(thawmod.VALUE, thawmod.__cached__)"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    pyc = mnt / "py" / "__pycache__" / f"thawmod.{sys.implementation.cache_tag}.pyc"
    assert f"42 {pyc}" in r.stdout
    assert f"code object from '{pyc}'" in r.stderr, [ln for ln in r.stderr.splitlines() if "thawmod" in ln]


def test_concurrent_readers(image, mounted):
    mnt = Path(mounted.mountpoint)
    names = ["nine.bin", "big.bin"] + [f"data/f{i}.bin" for i in range(4)]
    want = {n: _sha((image.src / n).read_bytes()) for n in names}
    for n in names:
        _drop_cache(mnt / n)
    jobs = names + ["nine.bin", "data/f2.bin"]  # 8 readers, two files read by two readers each
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def reader(i: int, name: str):
        try:
            h = hashlib.sha256()
            with open(mnt / name, "rb", buffering=0) as f:
                while block := f.read(64 * 1024 + i * 4096):
                    h.update(block)
            got[i] = h.hexdigest()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=reader, args=(i, n)) for i, n in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert all(got[i] == want[n] for i, n in enumerate(jobs))


def test_overlay_over_the_fuse_mount(image, mounted, tmp_path):
    mnt = Path(mounted.mountpoint)
    upper, work, merged = tmp_path / "upper", tmp_path / "work", tmp_path / "merged"
    for d in (upper, work, merged):
        d.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={mnt},upperdir={upper},workdir={work}", str(merged)],
                   check=True, capture_output=True, text=True)
    try:
        assert (merged / "nine.bin").read_bytes() == (image.src / "nine.bin").read_bytes()
        assert os.readlink(merged / "abs-link") == "/usr/bin/tool"
        assert sorted(os.listdir(merged / "usr/bin")) == ["capped", "tool", "tool-hardlink"]
        assert os.stat(merged / "usr/bin/tool").st_mode == os.stat(image.src / "usr/bin/tool").st_mode
        (merged / "new.txt").write_text("written in the overlay")
        with open(merged / "data/f1.bin", "r+b") as f:  # copy-up of a lower file
            f.write(b"XYZ")
        assert (upper / "new.txt").read_text() == "written in the overlay"
        assert (merged / "data/f1.bin").read_bytes()[:3] == b"XYZ"
        assert (merged / "data/f1.bin").read_bytes()[3:] == (image.src / "data/f1.bin").read_bytes()[3:]
        assert os.getxattr(merged / "big.bin", "user.origin") == b"thaw-test"
        (merged / "secret").unlink()  # whiteout in the upper layer
        assert not (merged / "secret").exists() and (mnt / "secret").exists()
        r = subprocess.run([sys.executable, "-c", "import thawmod; print(thawmod.VALUE)"],
                           env={**os.environ, "PYTHONPATH": str(merged / "py")}, capture_output=True, text=True)
        assert r.stdout.strip() == "42", r.stderr
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    assert (mnt / "data/f1.bin").read_bytes() == (image.src / "data/f1.bin").read_bytes()  # lower untouched


def test_recording_prefetch_and_clean_unmount(image, tmp_path):
    from thaw.imagefs.mount import MountHandle, attach, is_mounted, mount
    from thaw.imagefs.prefetch import load_profile, prefetch, start_prefetch

    rec = tmp_path / "rec.json"
    mp = tmp_path / "mnt"
    h = mount(image.cfg, image.digest, mp, record=rec)
    try:
        assert attach(image.cfg, mp).pid == h.pid and attach(image.cfg, mp).alive()
        # a handle whose daemon died and whose pid went to another tree's daemon: not alive (not stopped)
        assert not MountHandle(h.pid, str(tmp_path / "elsewhere"), image.digest).alive()
        (mp / "secret").read_bytes()
        with open(mp / "nine.bin", "rb") as f:
            f.seek(5 * MiB)
            f.read(10)
        with open(mp / "big.bin", "rb") as f:
            f.read(10)
        assert h.flush_record()
        flushed = json.loads(rec.read_text())
    finally:
        code = h.unmount()
    assert code == 0
    assert not is_mounted(mp) and not h.ready_file.exists()
    final = json.loads(rec.read_text())
    assert final["image"] == image.digest and final["reads"][:len(flushed["reads"])] == flushed["reads"]
    reads = final["reads"]
    keys = [(p, i) for p, i, _, _ in reads]
    assert len(set(keys)) == len(keys)
    assert keys.index(("secret", 0)) < keys.index(("nine.bin", 1)) < keys.index(("big.bin", 0))
    assert ("nine.bin", 0) not in keys  # only what was read is recorded
    for p, i, d, _ in reads:
        assert _entry(image.manifest, p).chunks[i][0] == d
    assert [r[3] for r in reads] == sorted(r[3] for r in reads)

    digests = load_profile(rec)
    assert digests == list(dict.fromkeys(r[2] for r in reads))
    st = prefetch(image.store, digests, concurrency=4)
    assert (st.chunks, st.errors) == (len(digests), 0)
    assert st.bytes == sum(len(image.store.get_chunk(d)) for d in digests)
    assert start_prefetch(image.store, digests + ["0" * 64]).wait(30).errors == 1

    h = mount(image.cfg, image.digest, mp, prefetch=rec)  # the daemon prefetches the profile into its store
    try:
        deadline = time.monotonic() + 10
        while f"prefetched {len(digests)} chunks" not in h.log_file.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert f"prefetched {len(digests)} chunks" in h.log_file.read_text()
        assert (mp / "secret").read_bytes() == b"s"
    finally:
        h.unmount()


def test_a_second_sigterm_during_unmount_is_ignored(tmp_path):
    """A stop that signals twice (the agent's unmount after a signal to the whole session, say): the second
    SIGTERM lands while the daemon unmounts and writes its recording, often in one of its worker threads. It
    used to kill the daemon there, leaving a dead mount and no recording."""
    from thaw.imagefs.mount import clear_stale, is_mounted, mount

    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(os.urandom(300_000))
    cfg, _, m = _ingest(tmp_path / "state", src)
    for attempt in range(5):
        mp, rec = tmp_path / f"mnt{attempt}", tmp_path / f"rec{attempt}.json"
        h = mount(cfg, m.digest, mp, record=rec)
        try:
            for i in range(20):  # reads start the daemon's worker threads
                (mp / f"f{i}").read_bytes()
            os.kill(h.pid, signal.SIGTERM)
            with contextlib.suppress(ProcessLookupError):
                for _ in range(40):
                    time.sleep(0.0005)
                    os.kill(h.pid, signal.SIGTERM)
            assert h._proc.wait(20) == 0 and not is_mounted(mp) and rec.exists(), attempt
        finally:
            clear_stale(mp)


def test_killed_daemon_leaves_a_dead_mount_that_is_cleared(image, tmp_path):
    from thaw.imagefs.mount import clear_stale, is_mounted, mount

    mp = tmp_path / "mnt"
    h = mount(image.cfg, image.digest, mp)
    try:
        os.kill(h.pid, signal.SIGKILL)
        h._proc.wait(10)
        assert is_mounted(mp)
        with pytest.raises(OSError) as err:
            os.statvfs(mp)
        assert err.value.errno == errno.ENOTCONN
        h2 = mount(image.cfg, image.digest, mp)  # clears the dead mount first
        try:
            assert (mp / "secret").read_bytes() == b"s"
            os.kill(h2.pid, signal.SIGKILL)
            h2._proc.wait(10)
            assert clear_stale(mp) is True
            assert not is_mounted(mp)
            assert clear_stale(mp) is False
        finally:
            h2.unmount()
    finally:
        clear_stale(mp)  # whatever failed above, no dead mount stays behind
    assert not is_mounted(mp)


def test_missing_or_hung_chunk_fails_that_read_with_eio(tmp_path):
    from thaw.imagefs.mount import mount

    src = tmp_path / "src"
    src.mkdir()
    (src / "nine.bin").write_bytes(os.urandom(9 * MiB))
    (src / "hung.bin").write_bytes(os.urandom(MiB))
    (src / "ok.txt").write_text("fine")
    cfg, store, m = _ingest(tmp_path / "state", src)
    missing = _entry(m, "nine.bin").chunks[1][0]
    hung = _entry(m, "hung.bin").chunks[0][0]
    for d in (missing, hung):
        key = f"chunks/{d[:2]}/{d}"
        for tier in store.tiers:
            tier.delete(key)
        (cfg.store_dir / key).unlink(missing_ok=True)
    os.mkfifo(cfg.store_dir / f"chunks/{hung[:2]}/{hung}")  # opening it blocks forever: a store that hangs

    h = mount(cfg, m.digest, tmp_path / "mnt", fetch_timeout=2)
    mnt = Path(h.mountpoint)
    try:
        fd = os.open(mnt / "nine.bin", os.O_RDONLY)
        try:
            assert os.pread(fd, 100, 10) == (src / "nine.bin").read_bytes()[10:110]  # chunk 0 is there
            t0 = time.monotonic()
            with pytest.raises(OSError) as err:
                os.pread(fd, 100, 4 * MiB + 10)
            assert err.value.errno == errno.EIO and time.monotonic() - t0 < 10
        finally:
            os.close(fd)
        t0 = time.monotonic()
        with pytest.raises(OSError) as err:
            (mnt / "hung.bin").read_bytes()
        assert err.value.errno == errno.EIO and time.monotonic() - t0 < 10
        assert (mnt / "ok.txt").read_text() == "fine"  # the daemon still serves everything else
        assert h.alive()
        t0 = time.monotonic()
    finally:
        assert h.unmount(timeout=10) == 0
    assert time.monotonic() - t0 < 10
    assert "no answer from the store within 2 s" in h.log_file.read_text()


# -- by hand: warm sequential read, mount vs native ---------------------------------------------------------------
def bench(mb: int = 200, rounds: int = 8) -> None:
    """Warm sequential read of an ``mb`` MiB file through the mount vs the same file on the local disk."""
    from thaw.imagefs.mount import mount

    base = Path(tempfile.mkdtemp(prefix="thaw-fuse-bench-", dir="/var/tmp"))
    try:
        src = base / "src"
        src.mkdir()
        with open(src / "big.bin", "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(MiB))
        cfg, store, m = _ingest(base / "state", src)
        h = mount(cfg, m.digest, base / "mnt")
        buf = bytearray(MiB)

        def readinto(path: Path) -> None:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass

        def timed(fn, path: Path) -> float:
            t0 = time.perf_counter()
            fn(path)
            return time.perf_counter() - t0

        try:
            mounted, native = Path(h.mountpoint) / "big.bin", src / "big.bin"
            cold = timed(readinto, mounted)  # the chunk files are in the host page cache (just written)
            readinto(native)
            for name, fn in (("readinto 1 MiB", readinto), ("read_bytes()", Path.read_bytes)):
                best = {"fuse": 1e9, "native": 1e9}
                for _ in range(rounds):  # interleaved, best of: the machine may be shared
                    best["fuse"] = min(best["fuse"], timed(fn, mounted))
                    best["native"] = min(best["native"], timed(fn, native))
                print(f"{mb} MiB warm {name}: FUSE {mb / best['fuse']:.0f} MiB/s, native {mb / best['native']:.0f} "
                      f"MiB/s, ratio {best['native'] / best['fuse']:.2f}x native")
            print(f"{mb} MiB cold through FUSE (chunks from the local store): {mb / cold:.0f} MiB/s")
        finally:
            h.unmount()
            stats = [ln for ln in h.log_file.read_text().splitlines() if "unmounted" in ln]
            print("daemon:", stats[-1].split("; ", 1)[-1] if stats else "?")  # read_bytes > size: pages were evicted
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    bench(int(sys.argv[1]) if len(sys.argv) > 1 else 200)


def test_a_mountpoint_whose_name_is_not_utf8_breaks_no_mount_handling(tmp_path):
    """Mount points are bytes: one that is not UTF-8 anywhere on the host must not break reading the mount
    table (mounting, unmounting, clearing a dead agent's scratch all read it)."""
    from thaw.imagefs.mount import fuse_mounts, mountinfo
    from thaw.snapshot import _linux
    from thaw.snapshot.host import clear

    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    os.mkdir(odd)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", odd], check=True)
    try:
        assert os.fsdecode(odd) in _linux.mountpoints() and os.fsdecode(odd) in [m.mountpoint for m in mountinfo()]
        assert fuse_mounts(odd) == [] and isinstance(_linux.overlay_lowers(), set)
        (tmp_path / "scratch").mkdir()
        clear(tmp_path / "scratch")  # reads every process's mount table
        assert not (tmp_path / "scratch").exists()
    finally:
        subprocess.run(["umount", odd], check=True)
