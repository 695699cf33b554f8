"""P2 + P3: the lazy image filesystem with an S3 tier, measured side by side in one run.

Set-up: a real SeaweedFS (S3) on loopback; a "build host" (its own state dir) ingests the example model's image
(uploaded to S3), takes its snapshot (the build restores the fresh dump once through a recording mount: the access profile
is stored with the snapshot) and uploads the CRIU images. Every cold run below is a fresh "host": a new state
dir and host id (empty memory and disk cache tiers) on the same bucket, after ``sync`` + drop_caches.

P2 (bytes fetched to the first correct answer from a cold cache), three cold hosts:
  restore          the product path: ``HostSnapshots.restore`` (lazy image + snapshot mounts, prefetch of the
                   CRIU images and of the profiled image chunks in the background, criu restore, golden replay)
  restore-noprefetch  the same with ``prefetch=False`` (THAW_PREFETCH=0): everything arrives on demand through
                   FUSE
  coldboot-lazy    ``HostSnapshots.cold_boot`` from the lazy image mount (no snapshot), answer checked
  coldboot-prefetch  the same as a fallback from the snapshot: the image chunks the snapshot's launch read
                   (its boot profile) are prefetched in parallel while the model boots
Bytes are counted two ways, both up to the moment the first correct answer came back:
  objects   every object a cold host fetches from S3 is copied into its (initially empty) local disk tier;
            those files, classified by the snapshot's and the image's chunk lists (+ manifests), give the
            split. Distinct objects only: a chunk fetched twice (e.g. by the prefetcher and the FUSE daemon
            at once) counts once.
  wire      all bytes the S3 server sent on loopback (an iptables counter on its port: HTTP headers and
            duplicate fetches included). Skipped where iptables is missing.
Headline P2 = wire bytes (else objects) of the ``restore`` path, i.e. snapshot + image + manifests, ÷ image
size (file bytes in the manifest). Image-only percentages are printed too.

P3 (warm, on the build host whose disk tier holds every chunk; a plain mount of the image vs the same files in
the materialized rootfs on the native disk), one warm-up then median of --runs (5), alternating:
  seq read   the biggest file (libtorch_cpu.so) with a 1 MiB readinto buffer (the headline) and with
             Path.read_bytes(), median of --seq-runs (11); also with the page cache dropped before each read
             (chunks on the local disk, 3 runs), and with the native file cached in 4 KiB pages as the mount's
             are (this kernel caches FUSE files in 4 KiB pages, ext4 files read in order in large folios), for
             context; the folios each copy sits in are counted from /proc/kpageflags
  import     ``python3 -c "import torch"`` in ``unshare -m`` + chroot (with /dev bound and /proc mounted),
             image env
  stat       os.lstat of every entry from a path list made beforehand, and a full walk (scandir + lstat)

Cold hosts run --rounds (2) times in turn (restore, restore-noprefetch, coldboot-lazy, coldboot-prefetch);
medians are summarised.

Usage: python3 bench/imagefs.py [--runs N] [--seq-runs N] [--rounds N] [--keep DIR]   (root; ~5-8 min)
Last line: ``P2 start bytes: <percent>% P3 seq read: <ratio>x import: <ratio>x``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from thaw.config import Config
from thaw.examples.minilm import recipe
from thaw.imagefs import mount as imagefs_mount
from thaw.imagefs.ingest import Limits, ingest_and_commit
from thaw.imagefs.oci import SourceSpec
from thaw.imagefs.prefetch import load_profile
from thaw.imagefs.store import ChunkStore
from thaw.seaweed import SeaweedS3, new_bucket
from thaw.snapshot.host import PROFILE, HostSnapshots, breakdown

from restore import spec_from_config  # bench/restore.py: the example model's launch spec
from common import machine_line  # bench/common.py

MB = 1e6


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError as e:
        print(f"  (page cache NOT dropped: {e})")
        return False


class WireCounter:
    """Bytes the S3 server sends on loopback: an iptables rule without a target (it only counts)."""

    def __init__(self, port: int):
        self.rule = ["OUTPUT", "-o", "lo", "-p", "tcp", "--sport", str(port), "-m", "comment",
                     "--comment", f"thaw-bench-imagefs-{os.getpid()}"]
        self.ok = False
        if shutil.which("iptables"):
            r = subprocess.run(["iptables", "-w", "-I", *self.rule[:1], "1", *self.rule[1:]], capture_output=True)
            self.ok = r.returncode == 0
        self.tag = self.rule[-1]

    def read(self) -> int | None:
        if not self.ok:
            return None
        out = subprocess.run(["iptables", "-w", "-L", "OUTPUT", "-n", "-v", "-x"], capture_output=True,
                             text=True).stdout
        for line in out.splitlines():
            if self.tag in line:
                return int(line.split()[1])
        return None

    def close(self) -> None:
        if self.ok:
            subprocess.run(["iptables", "-w", "-D", *self.rule], capture_output=True)
            self.ok = False


def local_objects(store_dir: Path) -> dict[str, tuple[str, int]]:
    """digest -> (kind, size) of the objects in a local disk tier."""
    out = {}
    for kind in ("chunks", "manifests"):
        base = store_dir / kind
        if not base.is_dir():
            continue
        for sub in os.scandir(base):
            if sub.is_dir():
                for e in os.scandir(sub.path):
                    with contextlib.suppress(FileNotFoundError):
                        out[e.name] = (kind, e.stat().st_size)
    return out


def split(objs: dict, snap_chunks: dict, image_chunks: dict) -> dict[str, int]:
    s = {"snapshot": 0, "image": 0, "manifests": 0, "other": 0}
    for d, (kind, size) in objs.items():
        if kind == "manifests":
            s["manifests"] += size
        elif d in snap_chunks:
            s["snapshot"] += size
        elif d in image_chunks:
            s["image"] += size
        else:
            s["other"] += size
    s["total"] = sum(s.values())
    return s


def top_files(objs: dict, chunk_paths: dict, n: int = 4) -> str:
    """The image files most of the fetched image bytes belong to."""
    per: dict[str, int] = {}
    for d, (kind, size) in objs.items():
        if kind == "chunks" and d in chunk_paths:
            per[chunk_paths[d]] = per.get(chunk_paths[d], 0) + size
    top = sorted(per.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{Path(p).name} {b / MB:,.0f} MB" for p, b in top) + f" ({len(per):,} files in all)"


def stages(ms: dict) -> str:
    return breakdown({k: v for k, v in ms.items() if not k.startswith("prefetch")})


def fmt_split(s: dict, wire: int | None, image_size: int) -> str:
    pct = lambda n: f"{n / image_size * 100:.1f}%"  # noqa: E731
    line = (f"snapshot {s['snapshot'] / MB:,.1f} MB + image {s['image'] / MB:,.1f} MB ({pct(s['image'])}) "
            f"+ manifests {s['manifests'] / MB:,.1f} MB")
    if s["other"]:
        line += f" + other {s['other'] / MB:,.1f} MB"
    line += f" = {s['total'] / MB:,.1f} MB objects ({pct(s['total'])})"
    if wire is not None:
        line += f"; wire {wire / MB:,.1f} MB ({pct(wire)})"
    return line


def cold_run(kind: str, tmp: Path, s3: dict, ctx: dict, wire: WireCounter) -> dict:
    state = tmp / f"cold-{kind}-{uuid.uuid4().hex[:6]}"
    cfg = Config(state_dir=state, host_id=f"bench-cold-{uuid.uuid4().hex[:8]}", **s3,
                 prefetch=kind != "restore-noprefetch")
    dropped = drop_caches()
    store = ChunkStore.open(cfg)
    host = HostSnapshots(cfg, store)
    handles = []
    if kind in ("restore", "coldboot-prefetch"):  # the prefetch goes on after the answer: waited for below
        name = "_prefetch" if kind == "restore" else "_prefetch_boot"
        orig = getattr(host, name)

        def capture(arg):
            h = orig(arg)
            if h is not None:
                handles.append(h)
            return h

        setattr(host, name, capture)
    running = None
    res: dict = {"kind": kind, "dropped": dropped}
    try:
        w0 = wire.read()
        t0 = time.monotonic()
        if kind.startswith("restore"):
            running, ms = host.restore(ctx["snap"], {})  # raises unless the answer is byte-identical
            same = True
        else:
            running, ms, same = host.cold_boot(ctx["image"], ctx["spec"], {}, ctx["golden"], ctx["golden_digest"],
                                               ctx["snap"]["digest"] if kind == "coldboot-prefetch" else None)
        res["wall_ms"] = int((time.monotonic() - t0) * 1000)
        w1 = wire.read()
        objs = local_objects(cfg.store_dir)
        res.update(ms=ms, same=same, at_answer=split(objs, ctx["snap_chunks"], ctx["image_chunks"]),
                   wire=None if w0 is None else w1 - w0, top=top_files(objs, ctx["chunk_paths"]))
        if handles:  # what the prefetch costs in the end; the next run starts with none of it in flight
            t1 = time.monotonic()
            st = handles[0].wait(600)
            res["prefetch_tail_ms"] = int((time.monotonic() - t1) * 1000)
            w2 = wire.read()
            res.update(after=split(local_objects(cfg.store_dir), ctx["snap_chunks"], ctx["image_chunks"]),
                       wire_after=None if w0 is None else w2 - w0, prefetch=st)
    finally:
        for h in handles:  # a run that failed leaves no prefetch running into the next one
            h.cancel()
            h.wait(60)
        if running is not None:
            running.stop()
        host.close()
        shutil.rmtree(state, ignore_errors=True)
    return res


# -- P3 ---------------------------------------------------------------------------------------------
def read_buf(path: Path) -> int:
    buf = memoryview(bytearray(1 << 20))
    n = 0
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            n += k
    return n


def cache_in_small_pages(path: Path) -> None:
    """Put ``path`` in the page cache as 4 KiB pages: fault it in page by page through a MADV_RANDOM mapping
    (no read-around, so no large folios), as this kernel caches every file of a FUSE mount."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            m.madvise(mmap.MADV_RANDOM)
            for off in range(0, len(m), mmap.PAGESIZE):
                m[off]


def folios(path: Path) -> tuple[float, float]:
    """How ``path`` sits in the page cache now (read it first): the mean size of its folios in KiB and the share
    of its pages in 4 KiB folios, from /proc/kpageflags (compound head / tail bits) for each page of a read-only
    mapping of it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.munmap.argtypes = ctypes.c_void_p, (ctypes.c_void_p, ctypes.c_size_t)
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        n = os.fstat(f.fileno()).st_size // page
        addr = libc.mmap(None, n * page, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
    try:
        view = (ctypes.c_char * (n * page)).from_address(addr)
        for off in range(0, n * page, page):
            view[off]  # map the cached page (already cached: no read)
        with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
            pm.seek(addr // page * 8)
            entries = struct.unpack(f"<{n}Q", pm.read(8 * n))
            heads = small = 0
            for e in entries:
                kf.seek((e & ((1 << 55) - 1)) * 8)
                flags = struct.unpack("<Q", kf.read(8))[0]
                heads += flags >> 15 & 1  # KPF_COMPOUND_HEAD
                small += not flags >> 15 & 3  # neither head nor KPF_COMPOUND_TAIL: a 4 KiB folio
    finally:
        libc.munmap(addr, n * page)
    return n * page / 1024 / max(1, heads + small), small / max(1, n)


def read_all(path: Path) -> int:
    return len(path.read_bytes())


def stat_all(root: Path) -> int:
    n, stack = 0, [str(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                os.lstat(e.path)
                n += 1
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return n


def paths_of(root: Path) -> list[str]:
    out, stack = [], [""]
    while stack:
        d = stack.pop()
        with os.scandir(root / d) as it:
            for e in it:
                rel = f"{d}/{e.name}" if d else e.name
                out.append(rel)
                if e.is_dir(follow_symlinks=False):
                    stack.append(rel)
    return out


def lstat_list(root: Path, rel: list[str]) -> int:
    r = str(root)
    for p in rel:
        os.lstat(f"{r}/{p}")
    return len(rel)


def import_torch(root: Path, env: dict) -> int:
    envs = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
    r = shlex.quote(str(root))
    script = (f"mount --bind /dev {r}/dev && mount -t proc proc {r}/proc && "
              f"exec chroot {r} /usr/bin/env -i {envs} python3 -c 'import torch'")
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"import torch in {root} failed: {p.stderr[-500:]}")
    return 0


def timed(fn, *a) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn(*a)
    return time.perf_counter() - t0, n


def side_by_side(fn, mnt_arg, nat_arg, runs: int, warmup: bool = True, before=None):
    """(mount times, native times, mount result, native result), alternating native/mount."""
    if warmup:
        fn(nat_arg)
        fn(mnt_arg)
    tm, tn, rm, rn = [], [], None, None
    for _ in range(runs):
        if before:
            before()
        t, rn = timed(fn, nat_arg)
        tn.append(t)
        if before:
            before()
        t, rm = timed(fn, mnt_arg)
        tm.append(t)
    return tm, tn, rm, rn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="P3 repetitions per side (after one warm-up)")
    ap.add_argument("--seq-runs", type=int, default=11, help="P3 warm sequential reads per side (cheap; the VM's "
                    "memory bandwidth is noisy)")
    ap.add_argument("--rounds", type=int, default=2, help="cold-host rounds (each: restore, no-prefetch, cold boot)")
    ap.add_argument("--keep", type=Path, help="work in this dir and keep it (default: a temporary dir, removed)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (FUSE allow_other, CRIU, namespaces, drop_caches)")

    rootfs = recipe.build_rootfs()
    config = json.loads((rootfs.parent / "image-config.json").read_text())
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="thaw-bench-imagefs-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(machine_line())
    server = wire = p3mount = build_host = None
    t_start = time.monotonic()
    try:
        server = SeaweedS3(tmp / "seaweedfs").start()
        s3 = server.settings(bucket=new_bucket())
        wire = WireCounter(int(server.endpoint.rsplit(":", 1)[1]))
        print(f"S3: SeaweedFS at {server.endpoint} (up in {server.startup_s:.1f} s), bucket {s3['s3_bucket']}; "
              f"wire counter: {'iptables' if wire.ok else 'unavailable'}")

        # -- build host: image + snapshot into S3 -------------------------------------------------------
        bcfg = Config(state_dir=tmp / "build", host_id="bench-build", **s3)
        bstore = ChunkStore.open(bcfg)
        t0 = time.monotonic()
        manifest, _, _ = ingest_and_commit(SourceSpec("dir", str(rootfs)), bstore, uuid.uuid4().hex,
                                           Limits.from_config(bcfg), config=config,
                                           chunk_size=bcfg.image_chunk_size)
        image = manifest.digest
        st = manifest.stats()
        image_size = st["size"]
        image_chunks = {c[0]: c[1] for e in manifest.files() for c in e.chunks}
        s3tier = bstore.remote[-1]
        image_wire = s3tier.stats["wire_put_bytes"]  # the image as S3 stores it (zstd where that pays)
        print(f"image {image[:16]}: {image_size / MB:,.1f} MB in {st['files']:,} files, {st['chunks']:,} chunks; "
              f"ingested + uploaded in {time.monotonic() - t0:.1f} s ({s3tier.stats['puts']:,} PUTs, "
              f"{s3tier.stats['put_bytes'] / MB:,.1f} MB, {image_wire / MB:,.1f} MB as stored in S3)")
        spec = spec_from_config(config)
        golden = recipe.golden_request()
        build_host = HostSnapshots(bcfg, bstore)
        taken = build_host.take("bench", image, spec, golden)
        t0 = time.monotonic()
        snap_manifest, _, _ = ingest_and_commit(SourceSpec("dir", taken["dump_dir"]), bstore, "bench-snap",
                                                Limits.from_config(bcfg))
        snap_chunks = {c[0]: c[1] for e in snap_manifest.files() for c in e.chunks}
        snap = {"digest": snap_manifest.digest, "image_digest": image, "spec": spec, "golden_request": golden,
                "golden_digest": taken["golden_digest"], "host_facts": taken["host_facts"]}
        profile_path = Path(taken["dump_dir"]) / PROFILE
        profile = load_profile(profile_path) if profile_path.exists() else []
        profile_bytes = sum(image_chunks.get(d, 0) for d in profile)
        print(f"snapshot {snap['digest'][:16]}: {snap_manifest.size / MB:,.1f} MB of CRIU images, uploaded in "
              f"{time.monotonic() - t0:.1f} s (build on the lazy mount: {breakdown(taken['timings_ms'])})")
        print(f"access profile (image chunks a restore of the snapshot reads): {len(profile):,} chunks, "
              f"{profile_bytes / MB:,.1f} MB = {profile_bytes / image_size * 100:.1f}% of the image")
        build_host.close()
        build_host = None

        # -- P2: cold hosts ------------------------------------------------------------------------------
        chunk_paths = {}
        for e in manifest.files():
            for c in e.chunks:
                chunk_paths.setdefault(c[0], e.path)
        ctx = {"chunk_paths": chunk_paths, "image": image, "spec": spec, "golden": golden, "golden_digest": taken["golden_digest"],
               "snap": snap, "snap_chunks": snap_chunks, "image_chunks": image_chunks}
        print("\nP2 cold hosts (fresh state dir + host id, same bucket, page cache dropped before each):")
        results: dict[str, list[dict]] = {"restore": [], "restore-noprefetch": [], "coldboot-lazy": [],
                                          "coldboot-prefetch": []}
        for rnd in range(args.rounds):
            for kind in results:
                r = cold_run(kind, tmp, s3, ctx, wire)
                results[kind].append(r)
                print(f"{kind:<18} #{rnd + 1}: first correct answer in {r['ms']['total']:,} ms "
                      f"(byte-identical: {r['same']}) [{stages(r['ms'])}]")
                print(f"{'':<22}S3 to first answer: {fmt_split(r['at_answer'], r['wire'], image_size)}")
                print(f"{'':<22}image bytes by file: {r['top']}")
                if "after" in r:
                    p = r["prefetch"]
                    print(f"{'':<22}prefetch done {r['prefetch_tail_ms']:,} ms after the answer ({p.chunks:,} "
                          f"chunks, {p.bytes / MB:,.1f} MB, {p.errors} errors, {p.ms:,.0f} ms); "
                          f"S3 in all: {fmt_split(r['after'], r['wire_after'], image_size)}")

        def med(kind, f):
            return statistics.median(f(r) for r in results[kind])

        def start_bytes(r):
            return r["wire"] if r["wire"] is not None else r["at_answer"]["total"]

        p2 = med("restore", start_bytes) / image_size * 100
        how = "wire" if wire.ok else "objects"

        # -- P3: warm, build host ------------------------------------------------------------------------
        print(f"\nP3 warm (build host: every chunk in its local disk tier; mount vs {rootfs} on the native disk), "
              f"one warm-up, then alternating, median of {args.runs} (sequential reads: {args.seq_runs}):")
        mp = tmp / "p3-mount"
        p3mount = imagefs_mount.mount(bcfg, image, mp)
        big = max(manifest.files(), key=lambda e: e.size)
        fm, fn = mp / big.path, rootfs / big.path
        tm, tn, nm, nn = side_by_side(read_buf, fm, fn, args.seq_runs)
        assert nm == nn == big.size, (nm, nn, big.size)
        seq = (big.size / statistics.median(tm)) / (big.size / statistics.median(tn))
        print(f"seq read /{big.path} ({big.size / MB:,.0f} MB), 1 MiB buffer: mount "
              f"{big.size / statistics.median(tm) / MB:,.0f} MB/s, native {big.size / statistics.median(tn) / MB:,.0f} "
              f"MB/s -> {seq:.2f}x (median of {args.seq_runs})")
        (kib_m, small_m), (kib_n, small_n) = folios(fm), folios(fn)
        print(f"page cache after those reads: mount's copy in {kib_m:,.0f} KiB folios on average ({small_m:.0%} of "
              f"its pages in 4 KiB ones), native's in {kib_n:,.0f} KiB folios ({small_n:.0%}) (context: the kernel "
              f"gives a FUSE file no large folios)")
        tm2, tn2, _, _ = side_by_side(read_all, fm, fn, args.seq_runs)
        seq2 = statistics.median(tn2) / statistics.median(tm2)
        print(f"seq read, Path.read_bytes(): mount {big.size / statistics.median(tm2) / MB:,.0f} MB/s, native "
              f"{big.size / statistics.median(tn2) / MB:,.0f} MB/s -> {seq2:.2f}x")
        tm3, tn3, _, _ = side_by_side(read_buf, fm, fn, 3, warmup=False, before=drop_caches)
        print(f"seq read, 1 MiB buffer, page cache dropped before each (mount: chunks from the local disk tier): "
              f"mount {big.size / statistics.median(tm3) / MB:,.0f} MB/s, native "
              f"{big.size / statistics.median(tn3) / MB:,.0f} MB/s -> "
              f"{statistics.median(tn3) / statistics.median(tm3):.2f}x (context, not a target)")
        cache_in_small_pages(fn)  # the mount's copy is in 4 KiB pages already (how this kernel caches FUSE files)
        tm4, tn4, _, _ = side_by_side(read_buf, fm, fn, args.seq_runs, warmup=False)
        drop_caches()
        read_buf(fn)  # cached by a sequential read again (large folios), as for the runs above and below
        print(f"seq read, 1 MiB buffer, the native file cached in 4 KiB pages too: mount "
              f"{big.size / statistics.median(tm4) / MB:,.0f} MB/s, native "
              f"{big.size / statistics.median(tn4) / MB:,.0f} MB/s -> "
              f"{statistics.median(tn4) / statistics.median(tm4):.2f}x (context: FUSE's own cost on warm reads, "
              f"without the page-cache folio size)")
        env = spec["env"]
        ti_m, ti_n, _, _ = side_by_side(lambda root: import_torch(root, env), mp, rootfs, args.runs)
        imp = statistics.median(ti_m) / statistics.median(ti_n)
        print(f"import torch (unshare -m + chroot): mount {statistics.median(ti_m) * 1000:,.0f} ms, native "
              f"{statistics.median(ti_n) * 1000:,.0f} ms -> {imp:.2f}x  "
              f"[mount {[round(t * 1000) for t in ti_m]}, native {[round(t * 1000) for t in ti_n]}]")
        rel = paths_of(rootfs)
        ts_m, ts_n, _, _ = side_by_side(lambda root: lstat_list(root, rel), mp, rootfs, args.runs)
        stat_ratio = statistics.median(ts_m) / statistics.median(ts_n)
        print(f"lstat of every entry (path list made beforehand): mount {statistics.median(ts_m) * 1000:,.0f} ms, "
              f"native {statistics.median(ts_n) * 1000:,.0f} ms ({len(rel):,} entries) -> {stat_ratio:.2f}x")
        ts_m, ts_n, cm, cn = side_by_side(stat_all, mp, rootfs, args.runs)
        print(f"walk (scandir of every directory + lstat of every entry): mount {statistics.median(ts_m) * 1000:,.0f} ms ({cm:,} entries), native "
              f"{statistics.median(ts_n) * 1000:,.0f} ms ({cn:,} entries) -> "
              f"{statistics.median(ts_m) / statistics.median(ts_n):.2f}x")
        p3mount.unmount()
        log_tail = [ln for ln in p3mount.log_file.read_text().splitlines() if "unmounted" in ln]
        p3mount = None
        if log_tail:
            print(f"P3 mount daemon at unmount: {log_tail[-1].split('; ', 1)[-1]}")

        # -- summary ---------------------------------------------------------------------------------------
        print("\nsummary (medians over rounds):")
        for kind in results:
            img = med(kind, lambda r: r["at_answer"]["image"])
            tot = med(kind, start_bytes)
            print(f"{kind:<18}: {med(kind, lambda r: r['ms']['total']):,.0f} ms to the first correct answer; "
                  f"S3 image bytes {img / MB:,.1f} MB ({img / image_size * 100:.1f}%), all S3 bytes "
                  f"{tot / MB:,.1f} MB ({tot / image_size * 100:.1f}%)")
        rp = med("restore", lambda r: r["ms"]["total"])
        rn = med("restore-noprefetch", lambda r: r["ms"]["total"])
        cb = med("coldboot-lazy", lambda r: r["ms"]["total"])
        cbp = med("coldboot-prefetch", lambda r: r["ms"]["total"])
        print(f"restore from a cold cache with S3: with prefetch {rp:,.0f} ms, without {rn:,.0f} ms "
              f"(prefetch speed-up {rn / rp:.2f}x), cold boot from the lazy mount {cb:,.0f} ms ({cb / rp:.1f}x the restore)")
        print(f"fallback cold boot on a cold host: with the boot profile prefetched {cbp:,.0f} ms, without "
              f"{cb:,.0f} ms (prefetch speed-up {cb / cbp:.2f}x)")
        print(f"P2 definition: all bytes the restore path (with prefetch) fetched from S3 until its first correct "
              f"answer (CRIU images + image chunks + manifests, counted as {how} bytes) / image size "
              f"({image_size / MB:,.1f} MB); target <= 5%: {'met' if p2 <= 5 else 'NOT met'}")
        if wire.ok:  # both sides compressed, for context: what share of the stored image a start moves
            print(f"P2 context: the same wire bytes / the image as stored in S3 ({image_wire / MB:,.1f} MB, "
                  f"compressed): {med('restore', start_bytes) / image_wire * 100:.1f}%")
        print(f"P3 targets: seq read >= 0.6x: {'met' if seq >= 0.6 else 'NOT met'}; import <= 1.2x: "
              f"{'met' if imp <= 1.2 else 'NOT met'}")
        print(f"bench wall time (before clean-up): {time.monotonic() - t_start:.0f} s")
        print(f"P2 start bytes: {p2:.1f}% P3 seq read: {seq:.2f}x import: {imp:.2f}x")
    finally:
        if p3mount is not None:
            with contextlib.suppress(Exception):
                p3mount.unmount()
        if build_host is not None:
            build_host.close()
        if wire is not None:
            wire.close()
        if server is not None:
            server.stop()
        for m in sorted(imagefs_mount.mountinfo(), key=lambda m: len(m.mountpoint), reverse=True):
            if m.mountpoint.startswith(f"{tmp}/"):  # anything of ours still mounted (should be none)
                print(f"warning: unmounting leftover {m.mountpoint}")
                subprocess.run(["umount", "-l", m.mountpoint], capture_output=True)
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
