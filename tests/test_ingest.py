"""Layer application, whiteouts, hostile input and the directory round trip (no Temporal here)."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import struct
import subprocess
import tarfile
from pathlib import Path

import pytest

from tarutil import layer, member
from thaw.imagefs import oci
from thaw.imagefs.ingest import IngestError, Limits, Tree, _xattr_value_error, apply_layer, ingest_directory
from thaw.imagefs.manifest import ImageManifest
from thaw.imagefs.materialize import materialize
from thaw.imagefs.store import ChunkStore, LocalDirTier

LIMITS = Limits(max_file_size=1 << 30, max_image_size=1 << 32, max_entries=10_000)


@pytest.fixture
def store(tmp_path):
    return ChunkStore([LocalDirTier(tmp_path / "store")], chunk_size=1 << 20)


def build(store, *layers, limits=LIMITS) -> ImageManifest:
    st = store.staging("t")
    st.reset()
    tree = Tree(st, limits)
    for i, data in enumerate(layers):
        apply_layer(tree, io.BytesIO(data), f"layer {i}")
    m = tree.manifest()
    st.commit_chunks()
    m.save(store)
    st.abort()
    return m


def paths(m: ImageManifest) -> set[str]:
    return {e.path for e in m.entries}


def test_layers_apply_in_order_with_whiteouts_and_opaque_dirs(store):
    lower = layer(member("a", "dir", mode=0o755), member("a/x", data=b"x"), member("a/y", data=b"y"),
                  member("d", "dir"), member("d/z", data=b"z"), member("d/sub", "dir"), member("d/sub/q", data=b"q"),
                  member("gone", "dir"), member("gone/deep", data=b"deep"))
    upper = layer(member("a/.wh.x"), member("d/.wh..wh..opq"), member("d/new", data=b"new"),
                  member(".wh.gone"), member("a/y", data=b"Y2"))
    m = build(store, lower, upper)
    assert paths(m) == {"", "a", "a/y", "d", "d/new"}
    y = next(e for e in m.entries if e.path == "a/y")
    assert store.get_chunk(y.chunks[0][0]) == b"Y2"


def test_an_opaque_dir_hides_lower_content_under_subdirs_this_layer_declares_again(store):
    """The opaque marker may come after the layer's entry for a subdirectory that lower layers also have
    (tar order is the writer's choice): that subdirectory stays, without its lower-layer content."""
    lower = layer(member("p", "dir"), member("p/sub", "dir"), member("p/sub/old", data=b"o"), member("p/y", data=b"y"))
    upper = layer(member("p/sub", "dir"), member("p/.wh..wh..opq"), member("p/sub/new", data=b"n"))
    assert paths(build(store, lower, upper)) == {"", "p", "p/sub", "p/sub/new"}


@pytest.mark.parametrize("marker", ["a/.wh..wh..opq", ".wh.a"])
def test_a_whiteout_after_this_layers_entries_under_a_lower_dir_hides_only_the_lower_ones(store, marker):
    """Whiteouts hide lower layers only, wherever the tar puts them: entries this layer wrote below a lower-layer
    directory before the marker (a/b/new here) stay; the lower ones go."""
    lower = layer(member("a", "dir"), member("a/b", "dir"), member("a/b/old", data=b"o"), member("a/x", data=b"x"))
    upper = layer(member("a/b/new", data=b"n"), member(marker))
    assert paths(build(store, lower, upper)) == {"", "a", "a/b", "a/b/new"}


@pytest.mark.parametrize("order", ["dir first", "whiteout first"])
def test_a_whiteout_of_a_dir_this_layer_also_declares_hides_only_the_lower_content(store, order):
    """The layer's own foo and foo/new stay, lower's foo/old goes, wherever the tar puts the marker (after the
    layer's foo/ it kept foo/old)."""
    lower = layer(member("foo", "dir"), member("foo/old", data=b"o"))
    own = [member("foo", "dir", mode=0o700), member("foo/new", data=b"n")]
    upper = layer(*own, member(".wh.foo")) if order == "dir first" else layer(member(".wh.foo"), *own)
    m = build(store, lower, upper)
    assert paths(m) == {"", "foo", "foo/new"}
    assert next(e for e in m.entries if e.path == "foo").mode == 0o700


@pytest.mark.parametrize("count", [3000, 20])
def test_chained_pax_headers_are_bounded(store, count):
    """tarfile reads each extended header by recursion, each held (up to 1 MiB) until the member: a layer of
    3,000 in a row was a RecursionError, and hundreds could hold gigabytes."""
    import tarfile

    rec = b"comment=x\n"
    rec = str(len(rec) + 3).encode() + b" " + rec  # "13 comment=x\n": the length counts itself
    head = tarfile.TarInfo("././@PaxHeader")
    head.type, head.size = tarfile.XHDTYPE, len(rec)
    block = head.tobuf(tarfile.USTAR_FORMAT) + rec + b"\0" * (512 - len(rec))
    raw = block * count + layer(member("f", data=b"x"))
    with pytest.raises(IngestError, match="headers chained too deep"):
        apply_layer(Tree(store.staging("deep"), LIMITS), io.BytesIO(raw), "layer 0")


def test_an_unreadable_source_directory_is_one_line(store, tmp_path, monkeypatch):
    """A file of a `dir:` source that this process may not read (or one removed while it walks): one line
    naming it, not a traceback retried five times."""
    from thaw.imagefs import ingest as ingest_mod

    (tmp_path / "src" / "secret").mkdir(parents=True)
    real = os.scandir

    def scandir(path):
        if str(path).endswith("secret"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(ingest_mod.os, "scandir", scandir)
    with pytest.raises(IngestError, match=r"src/secret: Permission denied"):
        ingest_directory(Tree(store.staging("dir"), LIMITS), tmp_path / "src")


def test_a_source_directory_path_longer_than_a_layers_may_be_is_refused(store, tmp_path):
    """A `dir:` source meets a layer's path rules: a path of more than 3,072 bytes was ingested and registered,
    and every materialize of the image then failed (ENAMETOOLONG under the image's own directory)."""
    deep = tmp_path / "src" / "/".join(["d" * 240] * 13)  # 3,132 bytes below src, each name allowed
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"x")
    with pytest.raises(IngestError, match=r"is 3132 bytes long \(at most 3072\)"):
        ingest_directory(Tree(store.staging("dir"), LIMITS), tmp_path / "src")


def test_whiteout_in_same_layer_does_not_hide_that_layers_files(store):
    m = build(store, layer(member("a", "dir"), member("a/keep", data=b"k"), member("a/.wh.keep")))
    assert "a/keep" in paths(m)


def test_file_type_change_replaces_subtree(store):
    m = build(store, layer(member("p", "dir"), member("p/child", data=b"c")), layer(member("p", data=b"now a file")))
    assert paths(m) == {"", "p"}


def test_multi_chunk_files_and_hardlinks(store):
    big = os.urandom(2_500_000)
    m = build(store, layer(member("big", data=big), member("alias", "hard", link="big")))
    big_e = next(e for e in m.entries if e.path == "big")
    alias = next(e for e in m.entries if e.path == "alias")
    assert big_e.hardlink == "alias" and alias.hardlink is None  # the first path in order holds the data
    assert [c[1] for c in alias.chunks] == [1 << 20, 1 << 20, 2_500_000 - 2 * (1 << 20)]
    assert b"".join(store.get_chunk(d) for d, _ in alias.chunks) == big
    assert big_e.chunks == [] and m.size == len(big)  # the data is listed once


def test_hard_links_share_their_targets_data_and_xattrs(store):
    """A link is its target's inode: its chunk list and xattrs were copied into every link, so a small layer of
    links to one big file with a big xattr took gigabytes (and a manifest of as many)."""
    import tracemalloc

    xattr = {"SCHILY.xattr.user.big": "x" * 60_000}
    links = [member(f"l{i:05}", "hard", link="big") for i in range(3000)]
    raw = layer(member("big", data=b"\0" * (40 << 20), pax=xattr), *links)
    tracemalloc.start()
    try:
        m = build(store, raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 << 20, f"{peak >> 20} MiB"  # copied: 3000 x 80 KB of xattrs and 40 chunks, 380+ MiB
    e = {e.path: e for e in m.entries}
    assert e["big"].hardlink is None and len(e["big"].chunks) == 40 and e["big"].xattrs
    assert all(e[f"l{i:05}"].hardlink == "big" and not e[f"l{i:05}"].chunks and e[f"l{i:05}"].xattrs is None
               for i in range(3000))
    assert len(m.to_bytes()) < 2 << 20


def test_xattrs_no_linux_file_system_stores_are_dropped(store, tmp_path):
    """A layer made on a Mac carries com.apple.* xattrs (and a tar may carry any name): kept, the image was
    registered and served by the lazy mount, but every materialize of it failed (EOPNOTSUPP)."""
    pax = {"SCHILY.xattr.com.apple.provenance": "x", "SCHILY.xattr.system.foo": "y", "SCHILY.xattr.user.kept": "z"}
    m = build(store, layer(member("f", data=b"data", pax=pax)))
    (f,) = [e for e in m.entries if e.path == "f"]
    assert f.xattrs == {"user.kept": base64.b64encode(b"z").decode()}
    out = materialize(m, store, tmp_path / "out")
    assert os.getxattr(out / "f", "user.kept") == b"z"


def _acl(*entries) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _cap(revision: int, size: int, root_id: int = 0) -> bytes:
    head = struct.pack("<I", revision << 24) + bytes(16)
    return (head + struct.pack("<I", root_id))[:size] + bytes(max(0, size - 24))


def _xattr_cases() -> list[tuple[str, bytes]]:
    """Capabilities of each revision and size; every ACL of up to 4 entries over the six tags and one unknown
    (rwx, id 5), and the valid shapes with a bad permission or id -1; a short value and a version 1 ACL."""
    caps = [_cap(rev, size, root) for rev in (1, 2, 3, 4) for size in (12, 20, 24) for root in (0, 1000, 2**32 - 1)]
    tags = (1, 2, 4, 8, 0x10, 0x20, 0x40)
    acls = [_acl(*[(t, 7, 5) for t in seq]) for n in range(5) for seq in itertools.product(tags, repeat=n)]
    for seq in ((1, 2, 4, 0x10, 0x20), (1, 4, 8, 0x10, 0x20)):
        acls += [_acl(*[(t, perm, ident) for t in seq]) for perm, ident in ((8, 5), (7, 2**32 - 1), (6, 0))]
    acls += [b"\2\0\0\0\1", struct.pack("<I", 1) + _acl((1, 7, 0), (4, 7, 0), (0x20, 7, 0))[4:]]
    return ([("security.capability", v) for v in caps] + [("system.posix_acl_access", v) for v in acls]
            + [("system.posix_acl_default", v) for v in acls[:60]])


def _skip_without_acls(path: Path) -> None:
    path.write_bytes(b"")
    try:
        os.setxattr(path, "system.posix_acl_access", _acl((1, 7, 0), (4, 7, 0), (0x20, 7, 0)))
    except OSError as e:
        pytest.skip(f"this file system takes no POSIX ACLs ({e.strerror})")


@pytest.mark.skipif(os.geteuid() != 0, reason="setting security.capability needs root")
def test_capability_and_acl_xattrs_are_refused_exactly_when_the_kernel_refuses_them(tmp_path):
    """A malformed file capability or ACL was ingested and served (an exec of the file failed), and every
    materialize of the image failed. The ingest's check is compared with setxattr(2) on this kernel."""
    _skip_without_acls(tmp_path / "probe")
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_bytes(b"")
    cases = _xattr_cases()
    assert len(cases) > 2800
    wrong = []
    for target in (tmp_path / "f", tmp_path / "d"):
        for name, value in cases:
            try:
                os.setxattr(target, name, value)
                kernel = None
                os.removexattr(target, name)
            except OSError as e:
                kernel = e.strerror
            ours = _xattr_value_error(name, value, target.name == "d")
            if (kernel is None) != (ours is None):
                wrong.append((target.name, name, value.hex(), kernel, ours))
    assert not wrong, wrong[:5]


def test_a_malformed_capability_or_acl_xattr_is_refused_and_valid_ones_materialize(store, tmp_path):
    for name, value, message in [
            ("security.capability", _cap(1, 12), "12 bytes: not a revision 2 or 3 file capability set"),
            ("system.posix_acl_access", _acl((1, 7, 0), (2, 7, 5), (4, 7, 0), (0x20, 7, 0)),
             r"entries out of order or missing \(uUgo\)"),
            ("system.posix_acl_default", _acl((1, 7, 0), (4, 7, 0), (0x20, 7, 0)),
             "a default ACL on a file that is not a directory")]:
        pax = {f"SCHILY.xattr.{name}": value.decode("utf-8", "surrogateescape")}
        with pytest.raises(IngestError, match=f":d/f' has a value for xattr '{name}' that Linux refuses "
                                              f"\\({message}") as err:
            build(store, layer(member("d", "dir"), member("d/f", data=b"x", pax=pax)))
        assert "\n" not in str(err.value)
    no_id = 2**32 - 1  # the id Linux stores in the entries that name none
    cap, acl = _cap(2, 20), _acl((1, 7, no_id), (2, 5, 1000), (4, 5, no_id), (0x10, 5, no_id), (0x20, 0, no_id))
    m = build(store, layer(member("f", data=b"x", mode=0o750, pax={"SCHILY.xattr.security.capability": cap.decode(
        "utf-8", "surrogateescape"), "SCHILY.xattr.system.posix_acl_access": acl.decode("utf-8", "surrogateescape")})))
    _skip_without_acls(tmp_path / "probe")
    out = materialize(m, store, tmp_path / "out")
    assert os.getxattr(out / "f", "system.posix_acl_access") == acl
    if os.geteuid() == 0:
        assert os.getxattr(out / "f", "security.capability") == cap


def test_paths_targets_and_xattrs_are_bounded_in_all(store, monkeypatch):
    monkeypatch.setattr("thaw.imagefs.ingest.MAX_METADATA", 500_000)
    raw = layer(*[member(f"f{i}", pax={"SCHILY.xattr.user.k": "v" * 10_000}) for i in range(100)])
    with pytest.raises(IngestError, match=r"over 500000 bytes of paths, symlink targets and xattrs \(at 'f3") as err:
        build(store, raw)
    assert "\n" not in str(err.value)
    # what a later layer replaces or deletes no longer counts (a `chown -R` layer adds every file again), but
    # xattrs a hard link still holds do, though the path that brought them went
    again = [member(f"f{i}", pax={"SCHILY.xattr.user.k": "v" * 10_000}) for i in range(30)]
    m = build(store, *[layer(*again)] * 5)
    assert len(m.entries) == 31
    links = layer(*[member(f"l{i}", "hard", link=f"f{i}") for i in range(30)],
                  *[member(f".wh.f{i}") for i in range(30)])
    with pytest.raises(IngestError, match="over 500000 bytes"):
        build(store, layer(*again), links, layer(*again))  # 30 dicts held by the links + 30 new


def test_pax_metadata_kept(store):
    m = build(store, layer(member("f", data=b"1", mode=0o4755,
                                  pax={"mtime": "1700000000.123456789", "SCHILY.xattr.user.k": "v"})))
    f = next(e for e in m.entries if e.path == "f")
    assert f.mode == 0o4755 and f.mtime_ns == 1_700_000_000_123_456_789
    assert f.xattrs == {"user.k": "dg=="}


HOSTILE = {
    "dotdot": ([member("../evil", data=b"x")], "escapes the image root"),
    "nested dotdot": ([member("a/../../evil", data=b"x")], "escapes the image root"),
    "absolute": ([member("/etc/passwd", data=b"x")], "absolute path"),
    "symlink escape": ([member("a", "dir"), member("a/l", "sym", link="../../etc/shadow")], "escapes the image root"),
    "write through symlink": ([member("etc", "sym", link="/etc"), member("etc/passwd", data=b"x")],
                              "written through the symlink"),
    "hardlink escape": ([member("h", "hard", link="../../etc/passwd")], "escapes the image root"),
    "whiteout through a symlink": ([member("usr/lib", "dir"), member("lib", "sym", link="usr/lib"),
                                   member("lib/.wh.x")], "whiteout through the symlink 'lib'"),
    "opaque through a symlink": ([member("usr/lib", "dir"), member("lib", "sym", link="usr/lib"),
                                 member("lib/.wh..wh..opq")], "whiteout through the symlink 'lib'"),
    "hardlink to nothing": ([member("h", "hard", link="missing")], "not an earlier regular file"),
    "hardlink to dir": ([member("d", "dir"), member("h", "hard", link="d")], "not an earlier regular file"),
    "device node": ([member("dev/sda", "blk", devmajor=8)], "device node"),
    "absurd size": ([member("huge", data=b"", size=1 << 40)], "over the"),
    "whiteout of nothing": ([member("a", "dir"), member(".wh.", data=b""), member("b", data=b"x")],
                            "whiteout that names nothing"),
    "hardlink over its own dir": ([member("d", "dir"), member("d/f", data=b"x"), member("d", "hard", link="d/f")],
                                  "which holds its target"),
    # each of these was a traceback (or a worker's memory blown) before: RecursionError, InvalidOperation, ...
    "deep path": ([member("a/" * 300 + "f", data=b"x")], "301 levels deep"),
    "huge pax header": ([member("n" * (2 << 20), data=b"x")], "a tar header of"),
    "unreadable pax mtime": ([member("f", data=b"x", pax={"mtime": "abc"})], "unreadable mtime"),
    "infinite pax mtime": ([member("f", data=b"x", pax={"mtime": "1e9999"})], "mtime out of range"),
    "owner out of range": ([member("f", data=b"x", pax={"uid": str(1 << 40)})], "owner out of range"),
    "device numbers out of range": ([member("dev/x", "chr", devmajor=5000)], "device numbers out of range"),
    "huge pax mtime exponent": ([member("f", data=b"x", pax={"mtime": "1e999990"})], "mtime out of range"),  # not 23 s
    "sparse file": ([member("f", data=b"2000000\n" + b"0\n" * 100,
                            pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"})], "sparse file"),  # its map: RAM
    "whiteout with data": ([member("a", "dir"), member("a/.wh.x", data=b"hidden bytes")], "whiteout with 12 bytes"),
    # each of these was ingested, then materializing it was a traceback (or a manifest many times the layer)
    "symlink target with NUL": ([member("l", "sym", link="x", pax={"linkpath": "a\0b"})], "holds a NUL byte"),
    "symlink target too long": ([member("l", "sym", link="t" * 4096)], r"over 4095 bytes \('t+', 4096 bytes"),
    "long path component": ([member("d/" + "n" * 256, data=b"x")], "component of 256 bytes"),
    "long path": ([member(("n" * 200 + "/") * 16 + "f", data=b"x")], "is 3217 bytes long"),
    "long hard link target component": ([member("h", "hard", link="n" * 256)], "component of 256 bytes"),
    "xattr name with NUL": ([member("f", data=b"x", pax={"SCHILY.xattr.user.a\0b": "v"})], "xattr name .* NUL"),
    "long xattr name": ([member("f", data=b"x", pax={"SCHILY.xattr.user." + "n" * 251: "v"})],
                        r"xattr name .*\b256 bytes"),
    "huge xattr value": ([member("f", data=b"x", pax={"SCHILY.xattr.user.k": "v" * 65537})],
                         "65537-byte value for xattr 'user.k'"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layers_rejected_and_nothing_stored(store, case):
    members, message = HOSTILE[case]
    raw = layer(*members) if case != "absurd size" else _header_only(members[0][0])
    st = store.staging("hostile")
    st.reset()
    st.put_chunk(b"something staged before the bad member")
    with pytest.raises(IngestError, match=message) as err:
        apply_layer(Tree(st, LIMITS), io.BytesIO(raw), "layer 0")
    assert "\n" not in str(err.value)
    st.abort()
    assert store.usage() == (0, 0)


def test_names_and_xattrs_at_linux_limits_are_kept(store):
    target, name = "t/" * 2047 + "t", "n" * 255  # a 4095-byte symlink target, a 255-byte file name
    xattrs = {"SCHILY.xattr.user." + "k" * 250: "v", "SCHILY.xattr.user.big": "b" * 65536}
    m = build(store, layer(member("l", "sym", link=target), member(name, data=b"x", pax=xattrs)))
    e = {e.path: e for e in m.entries}
    assert e["l"].target == target and base64.b64decode(e[name].xattrs["user.big"]) == b"b" * 65536


def test_global_pax_headers_are_skipped_as_docker_skips_them(store):
    """tarfile applies a global pax header's keys to every member after it; Docker and containerd skip the
    header. A global ``size=0`` made thaw read a file's data as members of their own, which Docker never sees
    (a file hidden from scanners that thaw would run); a global uid, mtime or xattr changed every entry."""
    hidden = tarfile.TarInfo("usr/bin/evil")
    hidden.size = 512
    data = hidden.tobuf(tarfile.PAX_FORMAT) + b"#!/bin/sh\n".ljust(512, b"\0")
    raw = layer(member("readme.txt", data=data, mtime=1_700_000_000), member("b", data=b"x"),
                pax={"size": "0", "uid": "7", "mtime": "5", "SCHILY.xattr.user.k": "v", "comment": "c" * 9000})
    m = build(store, raw)
    e = {e.path: e for e in m.entries}
    assert set(e) == {"", "readme.txt", "b"}
    readme = e["readme.txt"]
    assert readme.size == len(data) and b"".join(store.get_chunk(d) for d, _ in readme.chunks) == data
    assert readme.uid == 0 and readme.mtime_ns == 1_700_000_000 * 10**9 and readme.xattrs is None


def test_a_small_global_pax_header_is_kept(store):
    """`git archive` writes one naming the commit."""
    m = build(store, layer(member("f", data=b"x"), pax={"comment": "0" * 40}))
    assert paths(m) == {"", "f"}


def test_members_are_not_kept_while_a_layer_streams(store):
    """tarfile keeps every member it read, with its pax headers: a layer of members with big ones held them all
    until its end (here 20 MB)."""
    import tracemalloc

    raw = io.BytesIO(layer(*[member(f"f{i}", pax={"comment": "c" * 200_000}) for i in range(100)]))
    tree = Tree(store.staging("members"), LIMITS)
    tracemalloc.start()
    try:
        apply_layer(tree, raw, "layer 0")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(tree.entries) == 101 and peak < 5_000_000, peak


def _header_only(ti) -> bytes:
    # a header that claims 1 TiB of data followed by nothing: must be refused before any read
    return ti.tobuf(format=0 and 0 or 2) + b"\0" * 1024


def test_truncated_layer_rejected(store):
    raw = layer(member("f", data=b"x" * 5000))[:2048]
    st = store.staging("trunc")
    st.reset()
    with pytest.raises(IngestError, match="truncated|not a valid tar"):
        apply_layer(Tree(st, LIMITS), io.BytesIO(raw), "layer 0")


def test_a_bad_header_after_the_first_is_an_error_not_the_end_of_the_layer(store):
    """tarfile takes a header that fails its checksum for the end of the archive: the members after it would
    be dropped without a word, and the image would miss files."""
    raw = bytearray(layer(member("a", data=b"a" * 10), member("b", data=b"b" * 10), member("c", data=b"c" * 10)))
    assert raw[1024:1025] == b"b"  # a's header, a's data block, then b's header
    raw[1024 + 148] ^= 0x01  # a digit of b's header checksum
    st = store.staging("bad-header")
    st.reset()
    with pytest.raises(IngestError, match="bad tar header at byte 1024"):
        apply_layer(Tree(st, LIMITS), io.BytesIO(bytes(raw)), "layer 0")


def test_entry_count_limit(store):
    st = store.staging("many")
    st.reset()
    with pytest.raises(IngestError, match="more than 3 entries"):
        apply_layer(Tree(st, Limits(1 << 30, 1 << 30, 3)),
                     io.BytesIO(layer(*[member(f"f{i}", data=b"") for i in range(5)])), "layer 0")


def test_member_count_limit_counts_whiteouts_and_heartbeats_on_them(store):
    """Whiteouts add no entry and carry no data: a layer of nothing else is bounded by its member count, and
    reports progress as it goes (a 30 s heartbeat timeout would otherwise kill a long one)."""
    st = store.staging("whiteouts")
    st.reset()
    calls = []
    tree = Tree(st, Limits(1 << 30, 1 << 30, 50), progress=calls.append)
    with pytest.raises(IngestError, match="more than 50 members"):
        apply_layer(tree, io.BytesIO(layer(*[member(f".wh.f{i}") for i in range(60)])), "layer 0")
    assert len(calls) == 50 and len(tree.entries) == 1


def test_devices_allowed_when_configured(store):
    m = build(store, layer(member("dev", "dir"), member("dev/null", "chr", devmajor=1, devminor=3, mode=0o666)),
              limits=Limits(1 << 30, 1 << 30, 100, allow_devices=True))
    e = next(e for e in m.entries if e.path == "dev/null")
    assert (os.major(e.rdev), os.minor(e.rdev)) == (1, 3)


def test_whiteouts_alone_are_allowed_for_a_snapshots_writes(store):
    """allow_whiteouts (a snapshot's root-writes/, an overlayfs upper layer) takes 0:0 character devices, not
    other devices."""
    whiteout = layer(member("app", "dir"), member("app/gone", "chr", devmajor=0, devminor=0, mode=0))
    with pytest.raises(IngestError, match="device node 'layer 0:app/gone' is not allowed"):
        build(store, whiteout)
    m = build(store, whiteout, limits=Limits(1 << 30, 1 << 30, 100, allow_whiteouts=True))
    assert [(e.type, e.rdev or 0) for e in m.entries if e.path == "app/gone"] == [("chr", 0)]
    with pytest.raises(IngestError, match="device node 'layer 0:dev/null' is not allowed"):
        build(store, layer(member("dev", "dir"), member("dev/null", "chr", devmajor=1, devminor=3)),
              limits=Limits(1 << 30, 1 << 30, 100, allow_whiteouts=True))


def make_fancy_tree(root: Path) -> Path:
    """A directory exercising everything an image tree carries."""
    (root / "usr/bin").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(root / "usr/bin/tool", 0o4755)
    (root / "big.bin").write_bytes(os.urandom(5 * (1 << 20) + 123))
    (root / "empty").write_bytes(b"")
    (root / "secret").write_bytes(b"s")
    os.chmod(root / "secret", 0o600)
    os.chown(root / "secret", 1234, 5678)
    os.symlink("usr/bin/tool", root / "rel-link")
    os.symlink("/usr/bin/tool", root / "abs-link")
    os.symlink("does-not-exist", root / "dangling")
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-hardlink")
    os.setxattr(root / "big.bin", "user.origin", b"thaw-test")
    (root / "usr/bin/capped").write_bytes(b"#!/bin/sh\n")  # `setcap cap_net_bind_service+ep` (a file owned by
    os.chmod(root / "usr/bin/capped", 0o755)  # root: chown, which a copy does as root, clears the capability)
    os.setxattr(root / "usr/bin/capped", "security.capability",
                (0x02000001).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little") + bytes(12))
    os.utime(root / "empty", ns=(1_600_000_000_987_654_321, 1_600_000_000_987_654_321))
    os.utime(root / "rel-link", ns=(1_500_000_000_000_000_001,) * 2, follow_symlinks=False)
    os.utime(root / "empty-dir", ns=(1_400_000_000_111_111_111,) * 2)
    return root


def snapshot_stats(root: Path) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = os.lstat(p)
            xattrs = {n: os.getxattr(p, n, follow_symlinks=False) for n in os.listxattr(p, follow_symlinks=False)}
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink,
                                             st.st_mtime_ns, xattrs)
    return out


def test_directory_round_trip_is_byte_identical(store, tmp_path):
    src = make_fancy_tree(tmp_path / "src")
    (tmp_path / "current").symlink_to(src)  # `dir:` given a link to the tree: the tree, not a link
    st = store.staging("dir")
    st.reset()
    tree = Tree(st, LIMITS)
    ingest_directory(tree, tmp_path / "current")
    m = tree.manifest()
    st.commit_chunks()
    digest = m.save(store)
    out = materialize(ImageManifest.load(store, digest), store, tmp_path / "out")
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(src), str(out)], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert snapshot_stats(src) == snapshot_stats(out)


# -- OCI layouts read in place ---------------------------------------------------------------------------------
def _image(manifest: dict, diff_ids) -> oci.ImageSource:
    config = json.dumps({"config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = {"config": {"mediaType": oci.CONFIG_TYPES[0], "digest": "sha256:" + "0" * 64}, **manifest}
    return oci._image_from_manifest(manifest, lambda digest: config, lambda digest: None, "oci:x", "oci:x@ref")


LAYER_DESC = {"mediaType": oci.MT_TAR, "digest": "sha256:" + "1" * 64, "size": 10}


@pytest.mark.parametrize("manifest, diff_ids, message", [
    ({}, [], "image manifest has no layers list"),
    ({"layers": {"0": LAYER_DESC}}, ["sha256:" + "2" * 64], "image manifest has no layers list"),
    ({"layers": [LAYER_DESC]}, [], "lists 1 layers but its config has 0 rootfs.diff_ids"),
    ({"layers": []}, ["sha256:" + "2" * 64], "lists 0 layers but its config has 1 rootfs.diff_ids"),
    ({"layers": [LAYER_DESC]}, None, "lists 1 layers but its config has no rootfs.diff_ids list"),
    ({"layers": [LAYER_DESC]}, ["md5:00"], "config rootfs.diff_ids: bad digest 'md5:00'"),
])
def test_an_image_manifest_without_its_layers_is_a_source_error(manifest, diff_ids, message):
    """Each was accepted before (the first two as an image of no layers)."""
    with pytest.raises(oci.SourceError, match=message) as err:
        _image(manifest, diff_ids)
    assert "\n" not in str(err.value)


def test_an_image_of_no_layers_is_kept():
    assert _image({"layers": []}, []).layers == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_a_layout_blob_that_is_not_a_regular_file_is_a_source_error(tmp_path, kind):
    """A FIFO hung the open (and the worker) forever; a directory was a traceback."""
    blob = tmp_path / "blobs" / "sha256" / ("1" * 64)
    blob.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(blob)
    else:
        blob.mkdir()
    with pytest.raises(oci.SourceError, match=r"^oci:x: blobs/sha256/1{64} is not a regular file$"):
        oci._DirFS(tmp_path, "oci:x").open(f"blobs/sha256/{'1' * 64}")
