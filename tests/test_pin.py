"""Pins: snapshot page images locked in RAM within a budget, least recently used out first (real mmap + mlock)."""

import os

from thaw.snapshot.pin import Pins

MiB = 1 << 20


def locked_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    raise AssertionError("no VmLck in /proc/self/status")


def snapshot_dir(tmp_path, name, mib):
    d = tmp_path / name
    d.mkdir()
    (d / "pages-1.img").write_bytes(os.urandom(mib * MiB))
    (d / "core-1.img").write_bytes(b"not pinned")
    return d


def test_pins_lock_pages_and_evict_least_recently_used(tmp_path):
    a, b, c = (snapshot_dir(tmp_path, n, 1) for n in "abc")
    big = snapshot_dir(tmp_path, "big", 3)
    base = locked_kb()
    pins = Pins(int(2.5 * MiB))
    try:
        assert pins.pin("a", a) and pins.pin("b", b)
        assert pins.pinned_bytes == 2 * MiB and locked_kb() - base == 2048
        assert pins.pin("a", a)  # already pinned: now the most recently used
        assert pins.pin("c", c)  # room for c: b, the least recently used, goes
        assert pins.pinned() == ["a", "c"] and locked_kb() - base == 2048
        assert not pins.pin("big", big)  # larger than the whole budget: refused, nothing evicted
        assert pins.pinned() == ["a", "c"]
        pins.unpin("a")
        assert pins.pinned() == ["c"] and locked_kb() - base == 1024 and pins.pinned_bytes == MiB
        with pins._lock:  # a pin reading pages from S3 holds the lock: the agent's metrics and heartbeat
            assert pins.pinned_bytes == MiB and pins.pinned() == ["c"]  # (its release_idle) must not wait
    finally:
        pins.close()
    assert pins.pinned_bytes == 0 and locked_kb() == base


def test_nothing_to_pin_and_a_missing_file_lose_nothing(tmp_path):
    pins = Pins(4 * MiB)
    try:
        empty = tmp_path / "empty"
        empty.mkdir()
        assert pins.pin("empty", empty) and pins.pinned_bytes == 0
        gone = snapshot_dir(tmp_path, "gone", 1)
        (gone / "pages-2.img").symlink_to(tmp_path / "nowhere")
        assert not pins.pin("gone", gone)  # one file cannot be mapped: none of its files stay locked
        assert pins.pinned() == ["empty"] and pins.pinned_bytes == 0
    finally:
        pins.close()
