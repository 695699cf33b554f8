"""Store tiers: memory LRU, bounded disk cache, S3 against a real SeaweedFS (signatures checked), builds that
upload only what S3 lacks, a fresh host reading an image back, healing from S3, S3 frozen → bounded error."""

from __future__ import annotations

import functools
import json
import logging
import random
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from s3server import CuttingProxy, new_bucket, s3server, s3server_own  # noqa: F401  (pytest fixtures)
from test_ingest import make_fancy_tree, snapshot_stats
from thaw.config import Config
from thaw.imagefs.ingest import Limits, ingest_and_commit
from thaw.imagefs.manifest import DIR, Entry, ImageManifest
from thaw.imagefs.materialize import materialize
from thaw.imagefs.oci import SourceSpec
from thaw.imagefs.store import ChunkStore, CorruptObject, LocalDirTier, StoreError, StoreUnavailable, digest_of
from thaw.imagefs import store as store_module
from thaw.imagefs.tiers import MemoryTier, S3Tier

LIMITS = Limits(max_file_size=1 << 30, max_image_size=1 << 32, max_entries=10_000)
MiB = 1 << 20


def ckey(digest: str) -> str:
    return f"chunks/{digest[:2]}/{digest}"


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


# -- memory ----------------------------------------------------------------------------------------
def test_memory_tier_is_a_bounded_lru():
    m = MemoryTier(1000)
    for k in "abc":
        assert m.put(k, b"x" * 300)
    assert not m.put("a", b"x" * 300)  # already there
    assert m.get("a") == b"x" * 300  # a is now the most recently used
    assert m.put("d", b"y" * 300)  # over 1000 → b (least recently used) goes
    assert not m.has("b") and m.has("a") and m.has("c") and m.has("d")
    assert m.usage() == (3, 900)
    assert not m.put("huge", b"z" * 1001) and m.usage() == (3, 900)  # never fits, evicts nothing
    m.delete("a")
    assert m.get("a") is None and m.usage() == (2, 600)


def test_memory_tier_stays_bounded_under_threads():
    m = MemoryTier(64 * 1024)

    def work(seed):
        rnd = random.Random(seed)
        for _ in range(2000):
            k = f"k{rnd.randrange(200)}"
            if rnd.random() < 0.5:
                m.put(k, bytes(rnd.randrange(1, 2048)))
            else:
                m.get(k)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))  # re-raises a thread's exception here
    count, size = m.usage()
    assert size <= 64 * 1024 and size == sum(len(v) for v in m._objects.values()) and count == len(m._objects)


# -- disk cache -------------------------------------------------------------------------------------
def test_disk_cache_is_bounded_and_evicts_least_recently_used(tmp_path):
    tier = LocalDirTier(tmp_path / "cache", max_bytes=3000)
    data = {i: blob(1000, i) for i in range(6)}
    keys = {i: ckey(digest_of(d)) for i, d in data.items()}
    for i in (0, 1, 2):
        assert tier.put(keys[i], data[i])
    assert tier.get(keys[0]) == data[0]  # 0 recently used: 1 is now the oldest
    tier.put("manifests/aa/" + "a" * 64, b"m" * 5000)  # manifests: never evicted, not counted
    assert tier.put(keys[3], data[3])
    assert not tier.has(keys[1]) and all(tier.has(keys[i]) for i in (0, 2, 3))
    assert tier.cached_bytes() == 3000 and tier.evicted == 1
    assert tier.has("manifests/aa/" + "a" * 64)

    # a restarted process (or another one) rebuilds the order from mtimes: 2 is the oldest now
    again = LocalDirTier(tmp_path / "cache", max_bytes=3000)
    assert again.get(keys[0]) == data[0]
    assert again.put(keys[4], data[4])
    assert not again.has(keys[2]) and all(again.has(keys[i]) for i in (0, 3, 4))
    assert again.cached_bytes() == 3000

    # one object over the bound on its own stays (the newest is never evicted), the rest goes
    big = blob(4000, 99)
    assert again.put(ckey(digest_of(big)), big)
    assert again.has(ckey(digest_of(big))) and again.cached_bytes() == 4000
    assert again.usage() == (2, 4000 + 5000)


def test_disk_cache_stays_bounded_across_processes(tmp_path):
    """Several processes of a host (mount daemons, the agent) share one cache directory, each counting what it
    stored itself: each looks at the directory again (every rescan_s) before deciding it is under the bound."""
    a, b = (LocalDirTier(tmp_path / "cache", max_bytes=4000, rescan_s=0) for _ in range(2))
    assert a.cached_bytes() == b.cached_bytes() == 0  # both started before either stored anything
    for i in range(8):
        (a if i % 2 else b).put(ckey(digest_of(blob(1000, i))), blob(1000, i))
    assert LocalDirTier(tmp_path / "cache").usage() == (4, 4000)


def test_disk_cache_stays_bounded_under_threads(tmp_path):
    tier = LocalDirTier(tmp_path / "cache", max_bytes=50_000)
    blobs = [blob(1000 + i, i) for i in range(150)]

    def work(seed):
        rnd = random.Random(seed)
        hits = 0
        for _ in range(300):
            d = rnd.choice(blobs)
            k = ckey(digest_of(d))
            got = tier.get(k)
            assert got is None or got == d
            if got is None:
                tier.put(k, d)
            hits += got is not None
        return hits

    with ThreadPoolExecutor(6) as pool:
        hits = sum(pool.map(work, range(6)))  # re-raises a thread's failed check here
    assert hits > 0  # the threads did read cached data back
    on_disk = sum(p.stat().st_size for p in (tmp_path / "cache" / "chunks").rglob("*") if p.is_file())
    assert on_disk <= 50_000 + 1200 and tier.cached_bytes() == on_disk
    assert not any((tmp_path / "cache" / "tmp").iterdir())


def test_open_builds_the_tiers_the_config_names(tmp_path):
    local_only = ChunkStore.open(Config(state_dir=tmp_path / "a", disk_cache_bytes=1000))
    assert [type(t) for t in local_only.tiers] == [LocalDirTier]
    assert local_only.local.max_bytes is None  # the source of truth is never evicted
    assert local_only.durable is local_only.local
    s3 = ChunkStore.open(Config(state_dir=tmp_path / "b", s3_endpoint="http://127.0.0.1:9", disk_cache_bytes=1000,
                                memory_cache_bytes=MiB))
    assert [type(t) for t in s3.tiers] == [MemoryTier, LocalDirTier, S3Tier]
    assert s3.local is s3.tiers[1] and s3.local.max_bytes == 1000 and s3.durable is s3.tiers[2]
    assert s3.tiers[0].max_bytes == MiB and s3.local.path("chunks/ab/x") == tmp_path / "b/store/chunks/ab/x"


def test_a_corrupt_staged_chunk_is_never_committed(tmp_path):
    store = ChunkStore([LocalDirTier(tmp_path / "store")])
    st = store.staging("t")
    st.reset()
    d = st.put_chunk(b"good bytes" * 100)
    (st.dir / d).write_bytes(b"bad bytes!" * 100)
    with pytest.raises(CorruptObject, match=d):
        st.commit_chunks()
    assert not store.has_chunk(d)


# -- S3 ---------------------------------------------------------------------------------------------
def s3tier(server, bucket=None, **kw) -> S3Tier:
    return S3Tier(bucket or new_bucket(), server.endpoint, server.access_key, kw.pop("secret_key", server.secret_key),
                  server.region, timeout_s=kw.pop("timeout_s", 3.0), max_attempts=kw.pop("max_attempts", 2), **kw)


def test_a_store_that_ran_without_s3_evicts_nothing_until_pushed(s3server, tmp_path):
    """Configuring S3 for a store that has run without it turns its directory into a bounded cache. Its
    objects may exist nowhere else yet: nothing is evicted until push() has uploaded those S3 lacks (verified:
    a corrupt one is dropped, not spread). Then a host with an empty disk reads them all from S3."""
    bucket = new_bucket()
    before = ChunkStore([LocalDirTier(tmp_path / "store")])
    chunks = [blob(MiB, i) for i in range(3)]
    digests = [before.put_chunk(c)[0] for c in chunks]
    manifest, _ = before.put_manifest_bytes(b'{"version": 0}')
    bad, _ = before.put_chunk(b"will rot")
    before.local.path(ckey(bad)).write_bytes(b"rotten!!")

    store = ChunkStore([LocalDirTier(tmp_path / "store", max_bytes=MiB), s3tier(s3server, bucket)])
    assert store.held_back and store.local.max_bytes is None
    # a mount daemon's store, opened while the agent's push is under way: held back too
    daemon = ChunkStore([LocalDirTier(tmp_path / "store", max_bytes=MiB, rescan_s=0.2), s3tier(s3server, bucket)])
    assert daemon.held_back
    new, _ = store.put_chunk(blob(MiB, 9))  # over the bound: with it, the old chunks would go
    assert all(store.local.has(ckey(d)) for d in digests)
    assert store.push() == (4, 3 * MiB + len(zlib.compress(b'{"version": 0}', 6)))  # + the manifest; not `bad`
    assert not store.held_back and store.local.max_bytes == MiB and not store.local.has(ckey(bad))
    time.sleep(0.3)  # the daemon sees the push's mark at its next store or fetch, and bounds the disk again
    daemon.put_chunk(blob(MiB, 10))
    assert not daemon.held_back and daemon.local.max_bytes == MiB and daemon.local.cached_bytes() <= MiB
    assert store.push() == (0, 0)  # idempotent
    assert not ChunkStore([LocalDirTier(tmp_path / "store", max_bytes=MiB), s3tier(s3server, bucket)]).held_back

    ChunkStore([LocalDirTier(tmp_path / "store")])  # a run without S3 again: what it stores exists only here
    assert ChunkStore([LocalDirTier(tmp_path / "store", max_bytes=MiB), s3tier(s3server, bucket)]).held_back

    fresh = ChunkStore([LocalDirTier(tmp_path / "fresh", max_bytes=MiB), s3tier(s3server, bucket)])
    assert not fresh.held_back  # an empty disk loses nothing to eviction
    assert [fresh.get_chunk(d) for d in digests] == chunks
    assert fresh.get_manifest_bytes(manifest) == b'{"version": 0}' and fresh.get_chunk(new) == blob(MiB, 9)


def test_what_s3_lacks_is_found_by_listing_and_past_the_listing_budget_by_head(s3server, tmp_path, monkeypatch):
    """missing_chunks (what a build's register step checks) lists the bucket rather than sending one HEAD per
    chunk, and stays exact when the bucket is larger than its listing budget: the digests not listed by then are
    asked by HEAD. Listed keys are remembered as present, like those HEAD found."""
    tier = s3tier(s3server, prefix="p")
    store = ChunkStore([LocalDirTier(tmp_path / "store"), tier])
    stored = [store.put_chunk(blob(64, i))[0] for i in range(250)]
    absent = [digest_of(blob(64, 1000 + i)) for i in range(50)]
    tier.forget()
    tier.stats.update(heads=0, lists=0)
    assert store.missing_chunks(stored + absent) == absent  # 300 digests: up to 3 pages; 250 keys fit in one
    assert (tier.stats["lists"], tier.stats["heads"]) == (1, 0) and all(tier.has(ckey(d)) for d in stored)
    assert tier.stats["heads"] == 0
    keys, complete = tier.list_keys("chunks/", max_pages=1, page_size=100)
    assert len(keys) == 100 and not complete and keys <= {ckey(d) for d in stored}
    tier.forget()
    tier.stats.update(heads=0, lists=0)
    monkeypatch.setattr(tier, "list_keys", functools.partial(S3Tier.list_keys, tier, page_size=100))
    monkeypatch.setattr(store_module, "HEADS_PER_LIST", 150)  # 2 pages of 100 for 250 keys: not all of them
    assert store.missing_chunks(stored + absent) == absent
    assert (tier.stats["lists"], tier.stats["heads"]) == (2, 100)  # the 50 stored past the budget + the absent


def test_s3_round_trip_ranged_reads_and_multipart(s3server, tmp_path):
    tier = s3tier(s3server, prefix="some/prefix", multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    data = blob(3 * MiB, 1)
    k = ckey(digest_of(data))
    assert not tier.has(k) and tier.get(k) is None  # the bucket was created on first use
    assert tier.put(k, data) and not tier.put(k, data)
    assert tier.has(k) and tier.get(k) == data
    assert tier.get_range(k, 1000, 1010) == data[1000:1010]
    big = blob(11 * MiB, 2)  # over the threshold: a multipart upload (3 parts)
    path = tmp_path / "big"
    path.write_bytes(big)
    assert tier.put_file("blobs/big", path) and path.exists()  # uploaded a copy
    assert tier.stats["multipart_puts"] == 1 and tier.get("blobs/big") == big
    raw = s3server.client().get_object(Bucket=tier.bucket, Key=f"some/prefix/{k}")["Body"].read()
    assert raw == data  # keys live under the prefix
    assert sorted(tier.keys()) == sorted([k, "blobs/big"]) and tier.usage() == (2, len(data) + len(big))
    tier.delete(k)
    assert not tier.has(k)


def test_an_answer_cut_short_mid_body_is_fetched_again(s3server):
    """botocore retries a request until its answer's headers come, not while its body is read: a connection
    dropped then (a reset on the way) is the tier's to retry. It was StoreUnavailable at once: an EIO in the
    mount, a prefetch given up."""
    data = blob(MiB, 12)  # random: stored as is, a 1 MiB body
    k = ckey(digest_of(data))
    stored = s3tier(s3server)
    stored.put(k, data)
    with CuttingProxy(s3server.endpoint, cuts=1) as proxy:
        tier = s3tier(SimpleNamespace(**{**vars(s3server), "endpoint": proxy.endpoint}), stored.bucket)
        assert tier.get(k) == data
        assert proxy.cut == 1 and tier.stats["gets"] == 2
    with CuttingProxy(s3server.endpoint, cuts=2) as proxy:  # cut on every attempt: the one-line error
        tier = s3tier(SimpleNamespace(**{**vars(s3server), "endpoint": proxy.endpoint}), stored.bucket)
        with pytest.raises(StoreUnavailable, match=f"S3 {proxy.endpoint} .*: GET {k}: no answer after 2 attempts"):
            tier.get(k)
        assert proxy.cut == 2


def test_s3_objects_are_stored_compressed_where_that_pays(s3server, tmp_path, caplog):
    """Compressible objects rest in S3 as zstd (marked by metadata) and read back as put, whole or by range;
    random bytes stay raw; objects uploaded raw (compression off) read as they are; a compressed object that
    no longer decodes is found corrupt by the store, like any damaged object, and set aside."""
    from thaw.imagefs.gc import collect

    bucket = new_bucket()
    tier, raw_tier = s3tier(s3server, bucket), s3tier(s3server, bucket, compress_level=0)
    page = (b"\0" * 3000 + bytes(range(256)) * 4 + b"pointer\x7f\x00\x00") * 300  # like a process's heap
    noise = blob(MiB, 3)
    kp, kn = ckey(digest_of(page)), ckey(digest_of(noise))
    assert tier.put(kp, page) and tier.put(kn, noise)
    client = s3server.client()
    head = client.head_object(Bucket=bucket, Key=kp)
    assert head["Metadata"] == {"thaw-encoding": "zstd"} and head["ContentLength"] < len(page) // 10
    head = client.head_object(Bucket=bucket, Key=kn)
    assert head["Metadata"] == {} and head["ContentLength"] == len(noise)
    assert tier.stats["put_bytes"] == len(page) + len(noise) > tier.stats["wire_put_bytes"]
    for t in (tier, raw_tier):  # the reader's own setting does not matter
        assert t.get(kp) == page and t.get(kn) == noise
        assert t.get_range(kp, 2990, 3010) == page[2990:3010] and t.get_range(kn, 5, 9) == noise[5:9]
    assert tier.stats["wire_get_bytes"] < tier.stats["get_bytes"]

    old = page[::-1]  # uploaded by a tier with compression off: raw, unmarked, readable by everyone
    ko = ckey(digest_of(old))
    assert raw_tier.put(ko, old) and client.head_object(Bucket=bucket, Key=ko)["ContentLength"] == len(old)
    assert tier.get(ko) == old

    # damage: valid metadata, bytes that are not a zstd frame any more
    store = ChunkStore([LocalDirTier(tmp_path / "local", max_bytes=64 * MiB), s3tier(s3server, bucket)])
    client.put_object(Bucket=bucket, Key=kp, Body=b"garbage" * 100, Metadata={"thaw-encoding": "zstd"})
    with caplog.at_level(logging.WARNING):
        with pytest.raises(StoreError, match=rf"was corrupt in s3:.* \(set aside as quarantine/{kp}\) and no other"):
            store.get_chunk(digest_of(page))
    assert "does not decode" in caplog.text and "corrupt" in caplog.text
    assert not store.durable.has(kp) and not store.local.has(kp)
    # S3's is the only durable copy: set aside, not deleted (the fault may be the reader's), out of gc's way
    assert client.get_object(Bucket=bucket, Key=f"quarantine/{kp}")["Body"].read() == b"garbage" * 100
    store.durable._remember(kp)  # another host read it too, and sets it aside a moment late: no error, and
    assert store.durable.quarantine(kp) == f"quarantine/{kp}" and not store.durable.has(kp)  # not "stored"
    assert client.get_object(Bucket=bucket, Key=f"quarantine/{kp}")["Body"].read() == b"garbage" * 100
    assert collect(store, [], min_age_s=0).deleted and store.durable.has(f"quarantine/{kp}")


@pytest.mark.parametrize("which", ["secret", "access"])
def test_wrong_credentials_are_a_one_line_error(s3server, which):
    s3server.client().create_bucket(Bucket=(bucket := new_bucket()))
    if which == "secret":
        tier = s3tier(s3server, bucket, secret_key="not-the-secret")
    else:
        tier = S3Tier(bucket, s3server.endpoint, "nobody", s3server.secret_key, timeout_s=3, max_attempts=2)
    for op in (lambda: tier.has(ckey("0" * 64)), lambda: tier.get(ckey("0" * 64))):
        with pytest.raises(StoreError) as err:
            op()
        msg = str(err.value)
        assert "\n" not in msg and s3server.endpoint in msg and bucket in msg and "access denied" in msg, msg
        assert "s3_secret_key" in msg


def s3cfg(tmp_path, server, host: str, bucket: str, **kw) -> Config:
    return Config(state_dir=tmp_path / host, chunk_size=MiB, **server.settings(bucket, s3_timeout_s=3.0,
                                                                                s3_max_attempts=2), **kw)


def make_source(root):
    src = make_fancy_tree(root)
    (src / "weights").mkdir()
    for i in range(4):
        (src / "weights" / f"shard{i}.bin").write_bytes(blob(2 * MiB + 7 * i, 100 + i))
    return src


def test_build_uploads_what_s3_lacks_and_a_fresh_host_reads_it_back(s3server, tmp_path):
    bucket = new_bucket()
    src = make_source(tmp_path / "src")
    spec = SourceSpec("dir", str(src))

    # host 1 builds: every chunk and the manifest go to S3 (uploaded before the local tier adopts them)
    store = ChunkStore.open(s3cfg(tmp_path, s3server, "host1", bucket))
    manifest, new_chunks, new_bytes = ingest_and_commit(spec, store, "build-1", LIMITS)
    digests = manifest.chunk_digests()
    assert new_chunks == len(digests) > 8
    s3 = store.durable
    in_bucket = set(s3.keys())
    assert in_bucket == {ckey(d) for d in digests} | {f"manifests/{manifest.digest[:2]}/{manifest.digest}"}
    assert s3.stats["puts"] == len(digests) + 1 and s3.stats["put_bytes"] > new_bytes
    raw = s3server.client().get_object(Bucket=bucket, Key=f"manifests/{manifest.digest[:2]}/{manifest.digest}")
    assert digest_of(zlib.decompress(raw["Body"].read())) == manifest.digest

    # a second build (a new process: nothing remembered) uploads nothing and stages nothing
    again = ChunkStore.open(s3cfg(tmp_path, s3server, "host1", bucket))
    m2, new2, bytes2 = ingest_and_commit(spec, again, "build-2", LIMITS)
    assert (m2.digest, new2, bytes2) == (manifest.digest, 0, 0)
    assert again.durable.stats["puts"] == 0 and set(again.durable.keys()) == in_bucket

    # a fresh host with the same S3 and a disk cache smaller than the image reads the image back, verified
    host2 = ChunkStore.open(s3cfg(tmp_path, s3server, "host2", bucket, disk_cache_bytes=3 * MiB,
                                  memory_cache_bytes=2 * MiB))
    out = materialize(ImageManifest.load(host2, manifest.digest), host2, tmp_path / "out")
    diff = subprocess.run(["diff", "-r", "--no-dereference", src, out], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout
    assert snapshot_stats(src) == snapshot_stats(out)
    assert host2.durable.stats["gets"] >= len(digests) and host2.durable.stats["puts"] == 0
    assert host2.local.evicted > 0 and host2.local.cached_bytes() <= 3 * MiB  # the bound held
    assert host2.tiers[0].usage()[1] <= 2 * MiB
    assert host2.local.has(f"manifests/{manifest.digest[:2]}/{manifest.digest}")

    # chunks only in a host's local store (say, built before S3 was configured) are uploaded by the next build
    lost = sorted(digests)[0]
    store.durable.delete(ckey(lost))
    assert store.local.has(ckey(lost))
    third = ChunkStore.open(s3cfg(tmp_path, s3server, "host1", bucket))
    ingest_and_commit(spec, third, "build-3", LIMITS)
    assert third.durable.stats["puts"] == 1 and third.durable.has(ckey(lost))


def test_gc_sweeps_s3_and_the_disk_cache(s3server, tmp_path):
    """gc over [memory, disk cache, S3]: what only image A used goes from S3 and the disk; image B (sharing
    most of A's chunks) still reads back on a fresh host; an unreadable kept manifest stops gc before it
    deletes anything."""
    from thaw.imagefs.gc import GcError, collect

    bucket = new_bucket()
    src = make_source(tmp_path / "src")
    store = ChunkStore.open(s3cfg(tmp_path, s3server, "host1", bucket))
    a, _, _ = ingest_and_commit(SourceSpec("dir", str(src)), store, "build-a", LIMITS)
    (src / "weights" / "shard4.bin").write_bytes(blob(2 * MiB, 200))  # B = A + one more file - one shard
    (src / "weights" / "shard0.bin").unlink()
    b, _, _ = ingest_and_commit(SourceSpec("dir", str(src)), store, "build-b", LIMITS)
    only_a = a.chunk_digests() - b.chunk_digests()
    assert only_a and b.chunk_digests() - a.chunk_digests()

    with pytest.raises(GcError, match="cannot be read"):
        collect(store, [b.digest, "ab" * 32], min_age_s=0)
    assert store.durable.has(ckey(next(iter(only_a))))  # nothing deleted

    res = collect(store, [b.digest], min_age_s=0)
    want = {ckey(d) for d in only_a} | {f"manifests/{a.digest[:2]}/{a.digest}"}
    assert {k for k, _ in res.deleted[store.durable.name]} == want
    assert {k for k, _ in res.deleted[store.local.name]} == want
    assert set(store.durable.keys()) == {ckey(d) for d in b.chunk_digests()} | {f"manifests/{b.digest[:2]}/{b.digest}"}
    fresh = ChunkStore.open(s3cfg(tmp_path, s3server, "host2", bucket))
    out = materialize(ImageManifest.load(fresh, b.digest), fresh, tmp_path / "out")
    assert subprocess.run(["diff", "-r", "--no-dereference", src, out]).returncode == 0
    assert collect(store, [b.digest], min_age_s=0).deleted_bytes() == 0


def test_gc_aborts_the_multipart_uploads_a_killed_writer_left(s3server, tmp_path):
    """A writer killed during a multipart upload (a large manifest) leaves its parts in S3 under no key: gc
    aborts such an upload once it is older than min_age_s; a dry run only lists it. Another tool's upload in a
    shared bucket is left alone, as its objects are."""
    from thaw.imagefs.gc import collect

    store = ChunkStore.open(s3cfg(tmp_path, s3server, "host1", new_bucket()))
    s3, key = store.durable, f"manifests/ab/{'ab' * 32}"
    ids = {}
    for k in (key, "backups/db.tar"):
        ids[k] = s3.client.create_multipart_upload(Bucket=s3.bucket, Key=s3.prefix + k)["UploadId"]
        s3.client.upload_part(Bucket=s3.bucket, Key=s3.prefix + k, UploadId=ids[k], PartNumber=1,
                              Body=blob(100_000, 5))
    assert collect(store, [], min_age_s=3600).scratch == []  # young: its writer may still be at it
    assert collect(store, [], min_age_s=0, dry_run=True, now=time.time() + 5).scratch == [f"{s3.name}: upload of {key}"]
    assert sorted(k for k, _, _ in s3.uploads()) == ["backups/db.tar", key]
    assert collect(store, [], min_age_s=0, now=time.time() + 5).scratch == [f"{s3.name}: upload of {key}"]
    assert [k for k, _, _ in s3.uploads()] == ["backups/db.tar"]
    s3.abort_upload(key, ids[key])  # already gone: no error


def test_bytes_damaged_on_the_way_to_s3_are_refused_not_stored(s3server, tmp_path):
    """Uploads carry Content-MD5 (the CRC trailers are off for S3-compatible servers): a body damaged after it
    was hashed is refused by the server, and nothing is stored under the chunk's name."""
    assert (s3server.root / "s3.json").stat().st_mode & 0o077 == 0  # the server's own copy of the secret key
    tier = s3tier(s3server)
    data = blob(100_000, 21)
    key = ckey(digest_of(data))

    def damage(request, **_):
        b = request.body
        body = bytearray(b.read() if hasattr(b, "read") else b)
        body[len(body) // 2] ^= 0xFF
        request.body = bytes(body)

    tier.client.meta.events.register("before-send.s3.PutObject", damage)
    with pytest.raises(StoreError, match="BadDigest|InvalidDigest|Content-MD5"):
        tier.put(key, data)
    tier.client.meta.events.unregister("before-send.s3.PutObject", damage)
    tier.forget()
    assert not tier.has(key)
    assert tier.put(key, data) and tier.get(key) == data


def test_a_long_lived_builder_uploads_again_what_gc_deleted_meanwhile(s3server, tmp_path):
    """A build worker remembers which objects S3 holds (fewer HEADs); `thaw gc` in another process then
    deletes the image's objects. Rebuilding the same content on that worker must upload them again."""
    from thaw.activities.build_image import stored_whole
    from thaw.imagefs.gc import collect

    bucket = new_bucket()
    src = make_source(tmp_path / "src")
    builder = ChunkStore.open(s3cfg(tmp_path, s3server, "builder", bucket))
    a, _, _ = ingest_and_commit(SourceSpec("dir", str(src)), builder, "build-a", LIMITS)
    admin = ChunkStore.open(s3cfg(tmp_path, s3server, "admin", bucket))
    assert collect(admin, [], min_age_s=0).deleted[admin.durable.name]  # the image was removed, then gc
    again, _, _ = ingest_and_commit(SourceSpec("dir", str(src)), builder, "build-a-again", LIMITS)
    assert again.digest == a.digest
    fresh = ChunkStore.open(s3cfg(tmp_path, s3server, "host2", bucket))
    out = materialize(ImageManifest.load(fresh, a.digest), fresh, tmp_path / "out")
    assert subprocess.run(["diff", "-r", "--no-dereference", src, out]).returncode == 0
    # what a register step asks (missing_chunks) is asked afresh: gc in another process swept the chunks again
    # after this worker saw them, and the image must not be registered without them
    chunks = sorted(again.chunk_digests())
    assert builder.missing_chunks(chunks) == [] and stored_whole(builder, a.digest, "image").digest == a.digest
    assert collect(admin, [], min_age_s=0).deleted[admin.durable.name]
    assert builder.missing_chunks(chunks) == chunks
    with pytest.raises(StoreError, match=f"image {a.digest[:12]}: {len(chunks)} of its chunks and its manifest "
                                         "missing from the store"):  # (the manifest read from this disk)
        stored_whole(builder, a.digest, "image")


def test_bytes_damaged_on_the_way_from_s3_do_not_cost_the_object(s3server, tmp_path, monkeypatch):
    """A chunk that arrives damaged once (the network, not the object) is fetched again and served; the object
    in S3, the only durable copy, is not deleted for it."""
    bucket = new_bucket()
    src = make_source(tmp_path / "src")
    m, _, _ = ingest_and_commit(SourceSpec("dir", str(src)), ChunkStore.open(s3cfg(tmp_path, s3server, "b", bucket)),
                                "build", LIMITS)
    digest = next(iter(m.chunk_digests()))
    fresh = ChunkStore.open(s3cfg(tmp_path, s3server, "fresh", bucket))
    s3 = fresh.durable
    real_get, damaged = s3.get, []

    def get_once_damaged(key):
        raw = real_get(key)
        if key == ckey(digest) and not damaged:
            damaged.append(key)
            return raw[:-1] + bytes([raw[-1] ^ 1])
        return raw

    monkeypatch.setattr(s3, "get", get_once_damaged)
    assert digest_of(fresh.get_chunk(digest)) == digest and damaged == [ckey(digest)]
    s3.forget()
    assert s3.has(ckey(digest))


FETCHER = r"""
import json, sys, time
from pathlib import Path
from thaw.config import Config
from thaw.imagefs.store import ChunkStore, digest_of
cfg, digests, go = Config(**json.loads(sys.argv[1])), json.loads(sys.argv[2]), Path(sys.argv[3])
store = ChunkStore.open(cfg)
Path(sys.argv[4]).touch()  # ready
while not go.exists():
    time.sleep(0.002)
assert all(digest_of(store.get_chunk(d)) == d for d in digests)
print(store.durable.stats["gets"])
"""


def test_processes_of_a_host_fetch_each_chunk_from_s3_once(s3server, tmp_path):
    """Two processes on one host (say the agent's prefetch and a FUSE daemon) read the same chunks at the same
    moment through one disk cache: S3 serves each chunk once; the process that waited reads it from the disk."""
    bucket = new_bucket()
    writer = ChunkStore.open(s3cfg(tmp_path, s3server, "writer", bucket))
    digests = [writer.put_chunk(blob(MiB, 300 + i))[0] for i in range(24)]
    reader = s3cfg(tmp_path, s3server, "reader", bucket)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", FETCHER, reader.model_dump_json(), json.dumps(digests), str(go),
                               str(r)], stdout=subprocess.PIPE, text=True) for r in ready]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready):  # both started, opened the store and are waiting
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a fetcher did not start"
        time.sleep(0.01)
    go.touch()
    gets = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(gets) == len(digests), gets


def test_a_corrupt_disk_cache_chunk_is_dropped_and_fetched_from_s3(s3server, tmp_path, caplog):
    bucket = new_bucket()
    data = blob(MiB, 7)
    writer = ChunkStore.open(s3cfg(tmp_path, s3server, "writer", bucket))
    d, new = writer.put_chunk(data)
    assert new and writer.durable.has(ckey(d)) and writer.local.has(ckey(d))
    assert not writer.tiers[0].has(ckey(d))  # builds do not fill the memory tier

    reader_cfg = s3cfg(tmp_path, s3server, "reader", bucket)
    reader = ChunkStore.open(reader_cfg)
    assert reader.get_chunk(d) == data  # from S3; the disk cache and memory now hold it
    path = reader.local.path(ckey(d))
    assert path.read_bytes() == data and reader.tiers[0].has(ckey(d))
    path.write_bytes(b"\0" * 100 + data[100:])  # bit rot in the disk cache

    restarted = ChunkStore.open(reader_cfg)  # a new process: memory is empty, the disk copy is bad
    with caplog.at_level(logging.WARNING, logger="thaw.imagefs.store"):
        assert restarted.get_chunk(d) == data
    assert "corrupt" in caplog.text and "local:" in caplog.text
    assert path.read_bytes() == data  # healed with the verified copy
    assert restarted.durable.stats["gets"] == 1


def host_with_one_chunk(s3server, tmp_path, seed: int):
    """A host's store holding one chunk (on its disk and in S3), opened anew: (data, digest, store, disk path)."""
    data = blob(MiB, seed)
    cfg = s3cfg(tmp_path, s3server, "host", new_bucket())
    d, _ = ChunkStore.open(cfg).put_chunk(data)
    store = ChunkStore.open(cfg)
    return data, d, store, store.local.path(ckey(d))


def test_a_corrupt_chunk_on_a_cache_disk_gone_read_only_is_read_from_s3(s3server, tmp_path, caplog):
    """The bad copy cannot be dropped (the disk went read-only: ext4's errors=remount-ro): the read still gets
    the verified chunk from S3. The delete's EROFS failed the read."""
    data, d, store, path = host_with_one_chunk(s3server, tmp_path, 17)
    path.write_bytes(b"\0" * 100 + data[100:])
    cache = str(store.local.root)
    subprocess.run(["mount", "--bind", cache, cache], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", cache], check=True)
        with caplog.at_level(logging.WARNING, logger="thaw.imagefs.store"):
            assert store.get_chunk(d) == data
        assert "cannot drop" in caplog.text and "Read-only file system" in caplog.text
    finally:
        subprocess.run(["umount", cache], check=True)
    assert store.durable.stats["gets"] == 1


def test_prefetch_stops_at_the_first_chunk_s3_does_not_answer_for(s3server_own, tmp_path):
    """S3 down during a prefetch (a buffer host warming): each chunk waited out the retries in turn, and the
    threads waiting for the bucket check each checked again, one after another, for minutes."""
    from thaw.imagefs.prefetch import prefetch

    bucket = new_bucket()
    settings = s3server_own.settings(bucket, s3_timeout_s=1.0, s3_max_attempts=2)
    writer = ChunkStore.open(Config(state_dir=tmp_path / "w", chunk_size=MiB, **settings))
    digests = [writer.put_chunk(blob(1000, 700 + i))[0] for i in range(40)]
    reader = ChunkStore.open(Config(state_dir=tmp_path / "r", chunk_size=MiB, **settings))  # bucket not checked yet
    one = ChunkStore.open(Config(state_dir=tmp_path / "one", chunk_size=MiB, **settings))
    with s3server_own.paused():
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            one.get_chunk(digests[0])
        single = time.monotonic() - t0
        t0 = time.monotonic()
        stats = prefetch(reader, digests, concurrency=4)
        took = time.monotonic() - t0
    print(f"one fetch gave up after {single:.1f} s; the prefetch of 40 after {took:.1f} s: {stats}")
    assert stats.chunks == 0 and 1 <= stats.errors <= 4 and "no answer" in stats.first_error, stats
    assert took < 2 * single + 1, (took, single)  # was about 40 / 4 x single
    assert prefetch(reader, digests[:3], concurrency=2).chunks == 3  # S3 back: the same store fetches again


def test_a_failing_disk_cache_falls_back_to_s3(s3server, tmp_path, caplog):
    """The disk cache cannot be read (an unreadable object file here; a disk gone read-only or bad sectors on a
    host) nor take the host's fetch lock: the chunk still comes from S3, verified."""
    data, d, store, path = host_with_one_chunk(s3server, tmp_path, 11)
    path.unlink()
    path.mkdir()                       # reading it raises IsADirectoryError, an OSError like EIO or EROFS
    locks = store.local.root / "locks"
    if locks.exists():
        for f in locks.iterdir():
            f.unlink()
        locks.rmdir()
    locks.write_bytes(b"")             # the lock directory cannot be made
    with caplog.at_level(logging.WARNING, logger="thaw.imagefs.store"):
        assert store.get_chunk(d) == data
    assert "trying the next tier" in caplog.text and "without the host's lock" in caplog.text
    assert store.durable.stats["gets"] == 1


def test_an_object_in_an_encoding_this_version_cannot_read_is_an_error_and_stays(s3server, tmp_path):
    """A newer thaw may store objects in an encoding this one does not know: reading one is an error naming it,
    not damage, so the object is not deleted from the bucket that every host reads."""
    bucket = new_bucket()
    data = blob(4096, 12)
    store = ChunkStore([LocalDirTier(tmp_path / "local", max_bytes=64 * MiB), s3tier(s3server, bucket)])
    k = ckey(digest_of(data))
    s3server.client().put_object(Bucket=bucket, Key=k, Body=data, Metadata={"thaw-encoding": "zstd2"})
    with pytest.raises(StoreError, match="encoding 'zstd2'"):
        store.get_chunk(digest_of(data))
    assert store.durable.has(k)


def test_an_object_compressed_without_its_size_is_read(s3server, tmp_path):
    """A zstd frame that does not say its decoded size (another writer's) is decoded, not taken for damage: that
    would delete it from the bucket, maybe its only copy."""
    import zstandard

    bucket = new_bucket()
    data = blob(4096, 13) * 8
    store = ChunkStore([LocalDirTier(tmp_path / "local", max_bytes=64 * MiB), s3tier(s3server, bucket)])
    packed = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert zstandard.frame_content_size(packed) == -1
    k = ckey(digest_of(data))
    s3server.client().put_object(Bucket=bucket, Key=k, Body=packed, Metadata={"thaw-encoding": "zstd"})
    assert store.get_chunk(digest_of(data)) == data and store.durable.has(k)
    frames = zstandard.ZstdCompressor().compress(data[:10_000]) + zstandard.ZstdCompressor().compress(data[10_000:])
    k = ckey(digest_of(data + b"2"))  # several frames (a streaming writer's): all of them, not the first alone
    s3server.client().put_object(Bucket=bucket, Key=k, Body=frames + zstandard.ZstdCompressor().compress(b"2"),
                                 Metadata={"thaw-encoding": "zstd"})
    assert store.get_chunk(digest_of(data + b"2")) == data + b"2" and store.durable.has(k)


def test_what_s3_did_not_take_is_not_left_on_the_disk(s3server_own, tmp_path):
    """With S3 configured, a write goes to S3 first: a manifest S3 did not take is not on this host's disk either,
    where the host would take it for stored."""
    cfg = Config(state_dir=tmp_path / "w", **s3server_own.settings(new_bucket(), s3_timeout_s=1.5,
                                                                   s3_max_attempts=2))
    store = ChunkStore.open(cfg)
    store.durable.ensure_bucket()
    data = json.dumps({"files": [], "written": "while S3 was down"}).encode()
    with s3server_own.paused():
        with pytest.raises(StoreUnavailable):
            store.put_manifest_bytes(data)
        assert not store.local.has(f"manifests/{digest_of(data)[:2]}/{digest_of(data)}")
    assert store.put_manifest_bytes(data)[1]  # S3 back: stored, and new to S3


def test_s3_down_is_a_bounded_error_and_reads_recover(s3server_own, tmp_path):
    bucket = new_bucket()
    cfg = Config(state_dir=tmp_path / "w", chunk_size=MiB, **s3server_own.settings(
        bucket, s3_timeout_s=1.5, s3_max_attempts=2))
    data = blob(MiB, 8)
    d, _ = ChunkStore.open(cfg).put_chunk(data)
    reader = ChunkStore.open(Config(state_dir=tmp_path / "r", chunk_size=MiB, **s3server_own.settings(
        bucket, s3_timeout_s=1.5, s3_max_attempts=2)))
    reader.durable.ensure_bucket()
    with s3server_own.paused():
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as err:  # a StoreError callers may retry
            reader.get_chunk(d)
        took = time.monotonic() - t0
    print(f"S3 frozen: StoreError after {took:.1f} s: {err.value}")
    assert took < 15, took
    msg = str(err.value)
    assert "\n" not in msg and s3server_own.endpoint in msg and "no answer" in msg, msg
    assert reader.get_chunk(d) == data  # the server is back: the same store works again


def test_chunks_on_disk_are_read_while_s3_fetches_hang(s3server_own, tmp_path):
    """The mount daemon's reads with S3 frozen: fetches of chunks only S3 has give up at the daemon's timeout,
    but their threads stay stuck until S3 answers. Reads of chunks on the host's disk must not wait for those
    threads' slots (they did: every read failed until S3 came back)."""
    import trio

    from thaw.imagefs.fuse import ImageFS, _ReadError

    bucket = new_bucket()
    settings = s3server_own.settings(bucket, s3_timeout_s=5, s3_max_attempts=2)
    writer = ChunkStore.open(Config(state_dir=tmp_path / "w", chunk_size=MiB, **settings))
    remote = [writer.put_chunk(blob(1000, 900 + i))[0] for i in range(2)]
    reader = ChunkStore.open(Config(state_dir=tmp_path / "r", chunk_size=MiB, **settings))
    local_data = blob(1000, 999)
    local, _ = reader.put_chunk(local_data)  # on the reader's disk (and in S3)
    reader.durable.ensure_bucket()
    root = ImageManifest([Entry(path="", type=DIR, mode=0o755)])  # the chunks are asked for by digest
    fs = ImageFS(reader, root, fetch_timeout=1.0, fetch_threads=2, readahead_bytes=0)

    async def reads():
        for d in remote:  # both remote slots now held by threads waiting on the frozen S3
            with pytest.raises(_ReadError, match="no answer from the store within 1 s"):
                await fs._chunk(d, 1000)
        t0 = time.monotonic()
        got = await fs._chunk(local, 1000)
        return got, time.monotonic() - t0

    with s3server_own.paused():
        got, took = trio.run(reads)
    assert got == local_data and took < 0.5, took
