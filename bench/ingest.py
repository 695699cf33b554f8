"""P4: hashing + store throughput per core, and bytes stored by a rebuild, on the example image.

Side by side in one run, on the same bytes:
  * raw hash speed of one core: blake3 (what thaw uses) vs sha256 (what OCI layers use);
  * a first ingest of the example image (walk + read + chunk + blake3 + write chunks + commit) into an
    empty store, in MB per CPU-second (the ingest is single-threaded, so per core);
  * a second ingest of the same image into the same store: new chunks and new bytes (target 0).

Usage: python3 bench/ingest.py [--source DIR] [--store DIR]
Without --source it builds (or reuses the cached) MiniLM example root filesystem.
The last line is the headline: ``P4 ingest: <MB/s> MB/s/core, rebuild new bytes: <n>``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import blake3

from thaw.config import Config
from thaw.imagefs.ingest import Limits, ingest_and_commit
from thaw.imagefs.oci import SourceSpec
from thaw.imagefs.store import ChunkStore

from common import machine_line  # bench/common.py

MB = 1e6


def hash_speed(fn, data: bytes, rounds: int = 3) -> float:
    """Best-of-N MB per CPU-second of one hash over ``data``."""
    best = 0.0
    for _ in range(rounds):
        t0 = time.process_time()
        fn(data)
        best = max(best, len(data) / MB / max(time.process_time() - t0, 1e-9))
    return best


def timed_ingest(store: ChunkStore, cfg: Config, source: Path) -> dict:
    w0, c0 = time.monotonic(), time.process_time()
    manifest, new_chunks, new_bytes = ingest_and_commit(
        SourceSpec("dir", str(source)), store, uuid.uuid4().hex, Limits.from_config(cfg),
        chunk_size=cfg.image_chunk_size)
    wall, cpu = time.monotonic() - w0, time.process_time() - c0
    stats = manifest.stats()
    return {"digest": manifest.digest, "size": stats["size"], "files": stats["files"], "chunks": stats["chunks"],
            "new_chunks": new_chunks, "new_bytes": new_bytes, "wall": wall, "cpu": cpu}


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, help="directory to ingest (default: the MiniLM example rootfs)")
    ap.add_argument("--store", type=Path, help="state dir for the store (default: a temporary directory)")
    args = ap.parse_args()

    if args.source is None:
        from thaw.examples.minilm.recipe import build_rootfs
        args.source = build_rootfs()
    tmp = None
    if args.store is None:
        tmp = args.store = Path(tempfile.mkdtemp(prefix="thaw-bench-ingest-"))
    cfg = Config(state_dir=args.store)
    store = ChunkStore.open(cfg)

    print(machine_line())
    print(f"source: {args.source}")

    sample = os.urandom(256 << 20)
    b3 = hash_speed(lambda d: blake3.blake3(d, max_threads=1).digest(), sample)
    sha = hash_speed(lambda d: hashlib.sha256(d).digest(), sample)
    del sample
    print(f"hash, one core, 256 MB in memory: blake3 {b3:,.0f} MB/s   sha256 {sha:,.0f} MB/s   "
          f"ratio {b3 / sha:.1f}x")

    try:
        cold_cache = drop_page_cache()
        first = timed_ingest(store, cfg, args.source)
        size_mb = first["size"] / MB
        print(f"first ingest ({'cold' if cold_cache else 'warm'} page cache): {first['files']:,} files, "
              f"{size_mb:,.1f} MB, {first['chunks']:,} chunks, stored {first['new_bytes'] / MB:,.1f} MB new in "
              f"{first['wall']:.2f} s wall / {first['cpu']:.2f} s CPU -> {size_mb / first['wall']:,.0f} MB/s wall, "
              f"{size_mb / first['cpu']:,.0f} MB/s/core")
        second = timed_ingest(store, cfg, args.source)
        assert second["digest"] == first["digest"], "rebuild of the same tree gave another digest"
        print(f"rebuild (warm page cache): {second['new_chunks']} new chunks, {second['new_bytes']} new bytes in "
              f"{second['wall']:.2f} s wall -> {size_mb / second['cpu']:,.0f} MB/s/core")
        print(f"image digest {first['digest']}")
        print(f"P4 ingest: {size_mb / first['cpu']:,.0f} MB/s/core, rebuild new bytes: {second['new_bytes']}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
