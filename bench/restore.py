"""P1: cold boot vs CRIU restore of the example model (MiniLM on torch CPU), side by side in one run.

Both paths start from the same image tree on this host (its lazy mount, every chunk in the local store: the image
fetch is not part of either) and end at the first correct answer to the golden request (the embeddings of
examples/minilm/golden.json):
  cold boot = overlay root + new namespaces + python + import torch/transformers + load weights + warm-up + answer
  restore   = overlay root + criu restore into new namespaces + after-restore hook + health + answer
Each side runs once unmeasured first (page cache; the restore also pins the snapshot's memory pages in RAM, as
every restore on a host does), then they alternate (cold, restore, cold, restore, ...) and the medians are
compared. Also: dump time, snapshot size, and 4 replicas restored at once.

Usage: python3 bench/restore.py [--runs N] [--state DIR]
The last line is the headline: ``P1 restore speedup: <ratio>x``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from thaw.activities.snapshot import image_defaults
from thaw.config import Config
from thaw.examples.minilm import recipe
from thaw.imagefs.ingest import Limits, ingest_and_commit
from thaw.imagefs.oci import SourceSpec
from thaw.imagefs.store import ChunkStore
from thaw.snapshot.host import HostSnapshots, breakdown
from thaw.workflows.build_snapshot import ModelSpec

from common import machine_line  # bench/common.py


def spec_from_config(config: dict) -> dict:
    """The example model's launch spec: the image config's command, env and workdir (as a snapshot build
    fills them in), port 8080, health /healthz."""
    return dataclasses.asdict(image_defaults(ModelSpec(port=8080, health="/healthz", ready_timeout_s=300), config))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--state", type=Path, help="state dir (default: a temporary directory, removed after)")
    args = ap.parse_args()

    rootfs = recipe.build_rootfs()
    config = json.loads((rootfs.parent / "image-config.json").read_text())
    tmp = None
    if args.state is None:
        tmp = args.state = Path(tempfile.mkdtemp(prefix="thaw-bench-restore-"))
    cfg = Config(state_dir=args.state, host_id="bench")
    store = ChunkStore.open(cfg)
    print(machine_line())
    host = None
    try:
        manifest, _, _ = ingest_and_commit(SourceSpec("dir", str(rootfs)), store, uuid.uuid4().hex,
                                           Limits.from_config(cfg), config=config,
                                           chunk_size=cfg.image_chunk_size)
        image = manifest.digest
        host = HostSnapshots(cfg, store)
        t0 = time.monotonic()
        host.image_root(image)
        print(f"image {image[:16]}: {manifest.stats()['size'] / 1e6:,.0f} MB, materialized in "
              f"{time.monotonic() - t0:.1f} s (not counted below)")
        spec = spec_from_config(config)
        golden = recipe.golden_request()

        # warm the page cache with one unmeasured cold boot, so neither side pays for the disk
        running, _, _ = host.cold_boot(image, spec, {}, golden)
        running.stop()

        taken = host.take("bench", image, spec, golden)
        snap_manifest, _, _ = ingest_and_commit(SourceSpec("dir", taken["dump_dir"]), store, "bench-snap",
                                                Limits.from_config(cfg))
        snap = {"digest": snap_manifest.digest, "image_digest": image, "spec": spec, "golden_request": golden,
                "golden_digest": taken["golden_digest"], "host_facts": taken["host_facts"]}
        size = snap_manifest.stats()["size"]
        print(f"snapshot {snap['digest'][:16]}: {size / 1e6:,.0f} MB of CRIU images, dump {taken['timings_ms']['dump']} ms "
              f"(build: {breakdown(taken['timings_ms'])})")
        # and one unmeasured restore, as the cold side had its unmeasured boot: the snapshot's files are read
        # once, and its memory pages are then pinned in RAM, as after any restore on a host (snapshot/pin.py)
        running, _ = host.restore(snap, {})
        running.stop()
        host.warm(snap)  # returns once the pages are pinned
        print(f"pinned in RAM: {host.pins.pinned_bytes / 1e6:,.0f} MB of snapshot pages (budget {cfg.pin_mb} MiB)")

        cold, warm = [], []
        for i in range(args.runs):
            running, ms, same = host.cold_boot(image, spec, {}, golden, taken["golden_digest"])
            running.stop()
            assert same, "cold boot answered the golden request differently from the snapshot"
            cold.append(ms["total"])
            print(f"cold    #{i + 1}: {breakdown(ms)}")
            running, ms = host.restore(snap, {})  # raises unless the answer is byte-identical
            running.stop()
            warm.append(ms["total"])
            print(f"restore #{i + 1}: {breakdown(ms)}")

        t0 = time.monotonic()
        results = host.restore_many(snap, 4, {})
        four = int((time.monotonic() - t0) * 1000)
        outcomes = [info["outcome"] for _, info in results]
        for running, _ in results:
            running.stop()
        assert outcomes == ["restored"] * 4, outcomes

        c, r = statistics.median(cold), statistics.median(warm)
        print(f"cold boot to first correct answer: median {c:,.0f} ms  {cold}")
        print(f"restore to first correct answer:   median {r:,.0f} ms  {warm}")
        print(f"4 replicas restored at once: {four} ms wall, all answers byte-identical "
              f"(golden digest {taken['golden_digest'][:12]})")
        print(f"P1 restore speedup: {c / r:.1f}x")
    finally:  # the mounts first, also after a failure: their daemons run in sessions of their own
        if host is not None:
            host.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
