"""The content-addressed store: addressing, verification, atomicity, staging."""

import os

import pytest

from thaw.imagefs.store import ChunkStore, LocalDirTier, MissingObject, StoreError, digest_of


@pytest.fixture
def store(tmp_path):
    return ChunkStore([LocalDirTier(tmp_path / "store")], chunk_size=1 << 20)


def test_chunks_are_addressed_by_blake3_and_stored_once(store):
    d1, new1 = store.put_chunk(b"hello")
    d2, new2 = store.put_chunk(b"hello")
    assert d1 == d2 == digest_of(b"hello") and len(d1) == 64
    assert (new1, new2) == (True, False)
    assert store.get_chunk(d1) == b"hello"
    assert store.usage() == (1, 5)


def test_the_store_is_for_its_owner_only(tmp_path):
    """It holds image files (keys, setuid programs) and snapshots' process memory: other users could read them."""
    (tmp_path / "old").mkdir(mode=0o755)  # a store made before
    for root in (tmp_path / "new", tmp_path / "old"):
        store = ChunkStore([LocalDirTier(root)])
        d, _ = store.put_chunk(b"secret")
        assert os.stat(root).st_mode & 0o777 == 0o700 and store.get_chunk(d) == b"secret"


def test_oversized_chunk_rejected(store):
    with pytest.raises(StoreError, match="exceeds"):
        store.put_chunk(b"x" * ((1 << 20) + 1))


def test_a_corrupt_chunk_in_the_only_store_is_set_aside_not_deleted(store):
    """Read twice (the fault may be this reader's memory), then moved to quarantine/: it was deleted, and a
    single-host store has no other copy. Readers then see it missing; a build stores it again."""
    d, _ = store.put_chunk(b"payload")
    path = store.local.path(f"chunks/{d[:2]}/{d}")
    path.write_bytes(b"pAyload")
    with pytest.raises(StoreError, match=f"chunk {d} was corrupt in local:.* \\(set aside as quarantine/chunks/"
                                         f"{d[:2]}/{d}\\) and no other tier"):
        store.get_chunk(d)
    with pytest.raises(MissingObject):  # then it is missing
        store.get_chunk(d)
    assert not path.exists()  # out of readers' way
    assert store.local.path(f"quarantine/chunks/{d[:2]}/{d}").read_bytes() == b"pAyload"
    assert store.put_chunk(b"payload") == (d, True) and store.get_chunk(d) == b"payload"
    assert store.usage() == (1, 7)  # quarantine/ is not the store's


def test_corrupt_copy_in_first_tier_is_healed_from_the_next(tmp_path):
    fast, slow = LocalDirTier(tmp_path / "fast"), LocalDirTier(tmp_path / "slow")
    store = ChunkStore([fast, slow])
    d, _ = store.put_chunk(b"data" * 100)
    fast.path(f"chunks/{d[:2]}/{d}").write_bytes(b"garbage")
    assert store.get_chunk(d) == b"data" * 100
    assert fast.get(f"chunks/{d[:2]}/{d}") == b"data" * 100


def test_an_object_a_crash_left_empty_is_not_taken_as_stored(tmp_path):
    """A power loss between the rename and syncfs can leave an object's file empty. It does not count as
    stored (a retried build stores it again), and a read heals it from the next tier."""
    fast, slow = LocalDirTier(tmp_path / "fast"), LocalDirTier(tmp_path / "slow")
    store = ChunkStore([fast, slow])
    d, _ = store.put_chunk(b"data" * 100)
    fast.path(f"chunks/{d[:2]}/{d}").write_bytes(b"")
    assert not fast.has(f"chunks/{d[:2]}/{d}") and slow.has(f"chunks/{d[:2]}/{d}")
    assert store.get_chunk(d) == b"data" * 100 and fast.has(f"chunks/{d[:2]}/{d}")
    # the only tier (no S3): a rebuild's commit replaces the empty file instead of keeping it as "stored"
    alone = ChunkStore([LocalDirTier(tmp_path / "alone")])
    d, _ = alone.put_chunk(b"only copy")
    alone.local.path(f"chunks/{d[:2]}/{d}").write_bytes(b"")
    st = alone.staging("rebuild")
    st.reset()
    st.put_chunk(b"only copy")
    assert st.commit_chunks() == (1, 9) and alone.get_chunk(d) == b"only copy"


def test_without_s3_staged_chunks_reach_the_disk_before_their_names(tmp_path, monkeypatch):
    """A power cut after a rename but before the data was written back can leave a chunk cut short, not
    empty: has() would count it stored and a retried build would skip it. Without S3 the commit syncs the
    staged bytes before it gives them their names (one syncfs for them all)."""
    from thaw.imagefs import store as store_module

    alone = ChunkStore([LocalDirTier(tmp_path / "alone")])
    st = alone.staging("b")
    st.reset()
    st.put_chunk(b"x" * 100)
    st.put_chunk(b"y" * 100)
    events, put_file = [], alone.local.put_file
    monkeypatch.setattr(store_module, "syncfs", lambda path: events.append("sync"))
    monkeypatch.setattr(alone.local, "put_file", lambda key, path: events.append("move") or put_file(key, path))
    assert st.commit_chunks() == (2, 200)
    assert events == ["sync", "move", "move", "sync"]


def test_a_malformed_manifest_is_a_one_line_value_error(store):
    from thaw.imagefs.manifest import FORMAT_VERSION, ImageManifest

    for body in (b"[]", b'{"version": %d}' % FORMAT_VERSION, b'{"version": %d, "entries": [1]}' % FORMAT_VERSION):
        with pytest.raises(ValueError) as err:
            ImageManifest.from_bytes(body)
        assert "\n" not in str(err.value), str(err.value)


def test_manifest_round_trip_and_verification(store):
    d, _ = store.put_manifest_bytes(b'{"x":1}')
    assert store.get_manifest_bytes(d) == b'{"x":1}'
    with pytest.raises(StoreError, match="not a blake3 digest"):
        store.get_manifest_bytes("../../etc/passwd")


def test_staging_is_invisible_until_commit_and_idempotent(store):
    st = store.staging("build-1")
    st.reset()
    d = st.put_chunk(b"a" * 1000)
    st.put_chunk(b"a" * 1000)
    assert (st.new_chunks, st.new_bytes) == (1, 1000)
    assert not store.has_chunk(d)
    assert store.usage() == (0, 0)
    assert st.commit_chunks() == (1, 1000)
    assert st.commit_chunks() == (0, 0)  # a retried commit finds nothing left to move
    assert store.get_chunk(d) == b"a" * 1000
    # a second build of the same content stages nothing
    st2 = store.staging("build-2")
    st2.reset()
    st2.put_chunk(b"a" * 1000)
    assert st2.new_chunks == 0
    st.abort(), st2.abort()
    assert not (store.local.root / "staging" / "build-1").exists()


def test_atomic_write_leaves_no_partial_file(store, monkeypatch):
    real_replace = os.replace

    def crash(*a, **k):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.put_chunk(b"never visible")
    monkeypatch.setattr(os, "replace", real_replace)
    d = digest_of(b"never visible")
    assert not store.has_chunk(d)
    assert not any(store.local.tmp.iterdir())  # the temporary copy went with the failed write
    assert not [p for p in store.local.root.rglob("*") if p.is_file()]  # and nothing else was left
    store.put_chunk(b"never visible")  # a retry stores it
    assert store.get_chunk(d) == b"never visible"


def test_bad_staging_id_rejected(store):
    with pytest.raises(StoreError):
        store.staging("../escape")


def test_gc_removes_old_scratch_only(tmp_path):
    """Half-written objects in tmp/ and the staging areas of builds that never finished go once older than
    min_age; fresh ones (a fetch or a build under way) stay; a dry run only lists."""
    import os
    import time

    from thaw.imagefs.gc import collect

    store = ChunkStore([LocalDirTier(tmp_path / "store")])
    root = store.local.root
    old_tmp, new_tmp = root / "tmp" / "tmpold", root / "tmp" / "tmpnew"
    old_tmp.write_bytes(b"half")
    new_tmp.write_bytes(b"half")
    st = store.staging("build-abandoned")
    st.reset()
    st.put_chunk(b"staged" * 10)
    hours_ago = time.time() - 7200
    for p in (old_tmp, st.dir):
        os.utime(p, (hours_ago, hours_ago))
    assert sorted(collect(store, [], min_age_s=3600, dry_run=True).scratch) == ["staging/build-abandoned",
                                                                                 "tmp/tmpold"]
    assert old_tmp.exists() and st.dir.exists()
    collect(store, [], min_age_s=3600)
    assert not old_tmp.exists() and not st.dir.exists() and new_tmp.exists()


def test_gc_stops_before_a_deletion_when_its_check_fails(tmp_path):
    """thaw gc passes its lease's check: a lease lost mid-sweep (renewals failed until it ran out) stops the
    sweep before the next deletion, since builds no longer wait for it."""
    import os
    import time

    from thaw.imagefs.gc import GcError, collect

    store = ChunkStore([LocalDirTier(tmp_path / "store")])
    digests = [store.put_chunk(bytes([i]) * 100)[0] for i in range(5)]
    old = time.time() - 7200
    for d in digests:
        os.utime(store.local.path(f"chunks/{d[:2]}/{d}"), (old, old))
    calls = []

    def check():
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("the store lease was lost: not renewed for 40 s")

    with pytest.raises(GcError, match=r"^gc stopped after deleting 2 object\(s\): the store lease was lost"):
        collect(store, [], min_age_s=3600, check=check)
    assert sum(store.has_chunk(d) for d in digests) == 3
