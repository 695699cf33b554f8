"""Turn an image source into an :class:`ImageManifest` whose file contents are chunks in a staging area.

Layers are applied in order on an in-memory tree (nothing is extracted to disk), with OCI whiteouts
(``.wh.NAME`` deletes, ``.wh..wh..opq`` makes a directory opaque). Every member is checked before it is
accepted: absolute or ``..`` paths, writes through a symlink, relative symlinks that climb out of the root,
hard links to anything but an earlier regular file, device nodes (unless allowed), names and xattrs over
Linux's limits, absurd sizes and entry counts. A rejected image raises :class:`IngestError`; its chunks stay
in staging, which the caller discards, so nothing is stored under a final name.
"""

from __future__ import annotations

import base64
import contextlib
import os
import posixpath
import re
import stat
import struct
import tarfile
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO, Callable

from .manifest import BLK, CHR, CONFIG_KEYS, DIR, FIFO, REG, SYMLINK, Entry, ImageManifest
from .store import Staging

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_DEPTH = 256  # path components; real images nest a few dozen deep, and the tree's walks recurse per level
MAX_HEADER = 1 << 20  # bytes of one GNU long name or pax header (tarfile reads it whole into memory)
MAX_CHAIN = 8  # headers before one member (pax, global pax, long name, long link): each held while the next is read
MAX_METADATA = 256 << 20  # bytes of paths, symlink targets and xattrs in all: a few KiB of zstd can name TiBs
NAME_MAX, PATH_MAX = 255, 4096  # Linux's: bytes of one path component, and of a path with its NUL
MAX_PATH = 3072  # bytes of an image path: materialized under a host dir, it must stay under PATH_MAX
XATTR = "SCHILY.xattr."
XATTR_SIZE_MAX = 65536  # Linux's limit on one xattr value
# the xattr namespaces a Linux file system stores; another (a Mac's com.apple.*) is dropped, as containerd's
# unpacking drops what its file system does not support: kept, it failed every materialize of the image
XATTR_KEPT = ("user.", "trusted.", "security.", "system.posix_acl_access", "system.posix_acl_default")
CAP_SIZES = {2: 20, 3: 24}  # the vfs_cap_data revisions setxattr(2) takes for security.capability, by size
ACL_TAGS = {1: "u", 2: "U", 4: "g", 8: "G", 0x10: "m", 0x20: "o"}  # ACL_USER_OBJ, ACL_USER, ... ACL_OTHER

Progress = Callable[[int], None]  # called with bytes consumed since the last call


class IngestError(ValueError):
    """The image is malformed or hostile; the message names the offending input."""


@dataclass(frozen=True)
class Limits:
    max_file_size: int
    max_image_size: int
    max_entries: int
    allow_devices: bool = False
    allow_whiteouts: bool = False  # 0:0 character devices: overlayfs whiteouts (a snapshot's root-writes/)

    @classmethod
    def from_config(cls, cfg) -> "Limits":
        return cls(cfg.max_file_size, cfg.max_image_size, cfg.max_entries, cfg.allow_devices)


def normalize(name: str, what: str = "path") -> str:
    """Image-relative path with no '.', '' or '..' parts; '' is the root."""
    if name.startswith("/"):
        raise IngestError(f"absolute {what} {name!r} in image")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise IngestError(f"{what} {name!r} escapes the image root")
    if any("\0" in p for p in parts):
        raise IngestError(f"{what} {name!r} contains a NUL byte")
    if len(parts) > MAX_DEPTH:
        raise IngestError(f"{what} {name[:80]!r}... is {len(parts)} levels deep (at most {MAX_DEPTH})")
    for p in parts:
        if len(_bytes(p)) > NAME_MAX:  # no file system takes it: materializing would fail
            raise IngestError(f"{what} {name[:80]!r}... has a component of {len(_bytes(p))} bytes "
                              f"(at most {NAME_MAX})")
    path = "/".join(parts)
    if len(_bytes(path)) > MAX_PATH:
        raise IngestError(f"{what} {name[:80]!r}... is {len(_bytes(path))} bytes long (at most {MAX_PATH})")
    return path


def _bytes(name: str) -> bytes:
    """A name as the OS gets it (tarfile decodes undecodable bytes as surrogates)."""
    return name.encode("utf-8", "surrogateescape")


def _symlink_escapes(path: str, target: str) -> bool:
    if target.startswith("/"):
        return False  # absolute targets resolve inside the image root at run time
    depth = path.count("/")  # depth of the link's parent directory
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


class Tree:
    """The image's file tree while layers are applied."""

    def __init__(self, staging: Staging, limits: Limits, progress: Progress | None = None,
                 chunk_size: int | None = None):
        self.staging = staging
        self.chunk_size = min(chunk_size or staging.store.chunk_size, staging.store.chunk_size)
        self.limits = limits
        self.progress = progress or (lambda n: None)
        self.entries: dict[str, Entry] = {"": Entry(path="", type=DIR, mode=0o755)}
        self.children: dict[str, set[str]] = {"": set()}
        self.inode: dict[str, int] = {}  # regular file path -> inode id (hard links share one)
        self._next_inode = 0
        self.total_size = 0
        self.metadata = 0  # bytes of the paths, targets and xattrs in the tree (MAX_METADATA)
        self.paths_of: dict[int, int] = {}  # inode id -> its paths in the tree (its xattrs go with the last)
        self.layer_added: set[str] = set()    # entries the layer being applied put or updated
        self.layer_touched: set[str] = set()  # directories it put something under (maybe lower-layer ones)

    # -- structure -------------------------------------------------------------------------
    def _check_parent(self, path: str, src: str) -> None:
        parent = posixpath.dirname(path)
        missing = []
        while parent not in self.entries:
            missing.append(parent)
            parent = posixpath.dirname(parent)
        e = self.entries[parent]
        if e.type == SYMLINK:
            raise IngestError(f"{src!r} would be written through the symlink {parent!r}")
        if e.type != DIR:
            raise IngestError(f"{src!r}: parent {parent!r} is not a directory")
        for d in reversed(missing):  # implicit parent directories
            self._put(Entry(path=d, type=DIR, mode=0o755))
        d = posixpath.dirname(path)
        while d and d not in self.layer_touched:
            self.layer_touched.add(d)
            d = posixpath.dirname(d)

    @staticmethod
    def _meta(entry: Entry, xattrs: bool = True) -> int:
        n = len(entry.path) + len(entry.target or "")
        return n + (sum(len(k) + len(v) for k, v in entry.xattrs.items()) if xattrs and entry.xattrs else 0)

    def _put(self, entry: Entry, shared: bool = False) -> None:
        """``shared``: a hard link, whose xattrs are its target's (one dict for both, counted once)."""
        if len(self.entries) >= self.limits.max_entries:
            raise IngestError(f"image has more than {self.limits.max_entries} entries")
        self.metadata += self._meta(entry, xattrs=not shared)
        if self.metadata > MAX_METADATA:
            raise IngestError(f"image has over {MAX_METADATA} bytes of paths, symlink targets and xattrs "
                              f"(at {entry.path!r})")
        self.entries[entry.path] = entry
        if entry.path:
            self.children[posixpath.dirname(entry.path)].add(entry.path)
        if entry.type == DIR:
            self.children.setdefault(entry.path, set())
        self.layer_added.add(entry.path)

    def remove(self, path: str) -> None:
        if path in self.entries:
            self.children[posixpath.dirname(path)].discard(path)
            self._drop(path)

    def _drop(self, path: str) -> None:
        e = self.entries.pop(path)
        ino = self.inode.pop(path, None)
        if ino is not None:
            self.paths_of[ino] -= 1
        self.metadata -= self._meta(e, xattrs=ino is None or not self.paths_of[ino])  # a link may keep them
        self.layer_added.discard(path)
        self.layer_touched.discard(path)
        for child in self.children.pop(path, ()):
            self._drop(child)

    def add(self, entry: Entry, src: str, data: BinaryIO | None = None) -> None:
        path = entry.path
        if path == "":
            if entry.type != DIR:
                raise IngestError(f"{src!r}: the image root must be a directory")
            root = self.entries[""]
            root.mode, root.uid, root.gid, root.mtime_ns, root.xattrs = (
                entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.xattrs)
            return
        self._check_parent(path, src)
        old = self.entries.get(path)
        if old is not None:
            if old.type == DIR and entry.type == DIR:  # a directory entry updates metadata, keeps children
                self.metadata += self._meta(entry) - self._meta(old)  # its xattrs change (_drop takes them off)
                old.mode, old.uid, old.gid, old.mtime_ns, old.xattrs = (
                    entry.mode, entry.uid, entry.gid, entry.mtime_ns, entry.xattrs)
                self.layer_added.add(path)
                return
            self.remove(path)
        if entry.type == SYMLINK:
            target = entry.target or ""
            if not target or "\0" in target or len(_bytes(target)) >= PATH_MAX:  # symlink(2) refuses each
                raise IngestError(f"symlink {src!r} has a target that is empty, holds a NUL byte or is over "
                                  f"{PATH_MAX - 1} bytes ({target[:80]!r}, {len(_bytes(target))} bytes)")
            if _symlink_escapes(path, target):
                raise IngestError(f"symlink {src!r} -> {target!r} escapes the image root")
        whiteout = entry.type == CHR and not entry.rdev and self.limits.allow_whiteouts
        if entry.type in (CHR, BLK) and not (self.limits.allow_devices or whiteout):
            raise IngestError(f"device node {src!r} is not allowed in an image "
                              f"(THAW_ALLOW_DEVICES=1 on the build worker permits it)")
        if entry.type == REG:
            if entry.size > self.limits.max_file_size:
                raise IngestError(f"{src!r} is {entry.size} bytes, over the {self.limits.max_file_size}-byte "
                                  f"file limit")
            self.total_size += entry.size
            if self.total_size > self.limits.max_image_size:
                raise IngestError(f"image is over the {self.limits.max_image_size}-byte size limit at {src!r}")
            entry.chunks = self._store(data, entry.size, src) if entry.size else []
            self.inode[path] = self._next_inode
            self.paths_of[self._next_inode] = 1
            self._next_inode += 1
        self._put(entry)

    def hardlink(self, path: str, target: str, src: str) -> None:
        t = self.entries.get(target)
        if t is None or t.type != REG:
            raise IngestError(f"hard link {src!r} points at {target!r}, which is not an earlier regular file")
        if path == target:
            return
        if not path or target.startswith(path + "/"):
            raise IngestError(f"hard link {src!r} would replace {path or 'the image root'!r}, which holds its "
                              f"target {target!r}")
        self._check_parent(path, src)
        self.remove(path)
        e = Entry(**{**t.to_dict(), "path": path})  # its chunk list and xattrs are the target's own objects
        self._put(e, shared=True)
        self.inode[path] = self.inode[target]
        self.paths_of[self.inode[path]] += 1

    def _hide_lower(self, d: str) -> None:
        """An opaque directory: everything under ``d`` from lower layers goes, at any depth. A subdirectory this
        layer declares again, or puts entries under (tar order is the writer's: they may come before the
        marker), stays, without what lower layers put in it."""
        for child in list(self.children.get(d, ())):
            if child not in self.layer_added and child not in self.layer_touched:
                self.remove(child)
            elif child in self.children:
                self._hide_lower(child)

    def whiteout(self, path: str, src: str) -> None:
        """Apply ``.wh.`` markers: they hide lower-layer entries only."""
        parent, name = posixpath.split(path)
        d = parent
        while d not in self.entries:
            d = posixpath.dirname(d)
        if self.entries[d].type == SYMLINK:  # containerd resolves it in the root; thaw refuses, as it does writes
            raise IngestError(f"{src!r} is a whiteout through the symlink {d!r}")
        if name == OPAQUE:
            self._hide_lower(parent)
        else:
            if not name[len(WHITEOUT):]:
                raise IngestError(f"{src!r} is a whiteout that names nothing (it would hide the directory itself)")
            victim = posixpath.join(parent, name[len(WHITEOUT):])
            if victim in self.layer_added or victim in self.layer_touched:
                # this layer put it, or entries under it, before the marker: those stay, what lower layers put
                # under it goes (as it would with the marker first)
                self._hide_lower(victim)
            else:
                self.remove(victim)

    def _store(self, f: BinaryIO, size: int, src: str) -> list[list]:
        chunk_size = self.chunk_size
        chunks, left = [], size
        buf = bytearray(min(chunk_size, size))
        view = memoryview(buf)
        while left:
            want = min(chunk_size, left)
            n = _readfull(f, view[:want])
            if n < want:
                raise IngestError(f"{src!r} is truncated: expected {size} bytes, got {size - left + n}")
            chunks.append([self.staging.put_chunk(view[:n]), n])
            left -= n
            self.progress(n)
        return chunks

    # -- result ----------------------------------------------------------------------------
    def manifest(self, config: dict | None = None) -> ImageManifest:
        first: dict[int, str] = {}
        for path in sorted(self.inode):
            ino = self.inode[path]
            if ino in first:  # its data and xattrs are the first path's: written once
                e = self.entries[path]
                e.hardlink, e.chunks, e.xattrs = first[ino], [], None
            else:
                first[ino] = path
        cfg = {k: v for k, v in (config or {}).items() if k in CONFIG_KEYS and v not in (None, [], {})}
        return ImageManifest(entries=list(self.entries.values()), config=cfg)


def _readfull(f: BinaryIO, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:]) if hasattr(f, "readinto") else None
        if n is None:
            data = f.read(len(view) - got)
            n = len(data)
            view[got:got + n] = data
        if not n:
            break
        got += n
    return got


# -- tar layers ---------------------------------------------------------------------------------
def _mtime_ns(m: tarfile.TarInfo, src: str) -> int:
    raw = m.pax_headers.get("mtime")
    try:
        d = Decimal(raw) if raw else Decimal(int(m.mtime))
        big = d.is_finite() and d.adjusted() > 18  # "1e999990": no int64 of nanoseconds, and ages to scale
        ns = 1 << 63 if big else int(d * 1_000_000_000)
    except (ArithmeticError, ValueError, TypeError):  # "abc", "nan", "inf"
        raise IngestError(f"{src!r} has an unreadable mtime {raw!r}") from None
    if not -(1 << 63) <= ns < 1 << 63:
        raise IngestError(f"{src!r} has an mtime out of range ({raw or m.mtime})")
    return ns


class _Member(tarfile.TarInfo):
    """tarfile's member header, refusing huge GNU long names and pax headers (read whole into memory), long
    chains of them, and sparse files (no container layer has them; tarfile would read a map of any length into
    memory). Global pax headers are skipped, as Docker and containerd skip them: tarfile would apply their
    ``path``, ``size``, ``uid``, ``mtime``... to every member after them, and so read the layer otherwise than
    the runtimes that run it (a global ``size=0`` turns a file's data into members of their own)."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:  # past the first header,
            if tf.offset:  # tarfile takes either for the end of the archive: the members after it would be lost
                raise IngestError(f"a bad tar header at byte {tf.offset}: {e}") from None
            raise

    def _sparse(self, *args):
        raise IngestError(f"{self.name!r} is a sparse file: not supported in an image layer")

    _proc_sparse = _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _sparse

    def _proc_gnulong(self, tf):
        self._check_header()
        return self._chained(tf, super()._proc_gnulong)

    def _proc_pax(self, tf):
        self._check_header()
        if self.type != tarfile.XGLTYPE:
            return self._chained(tf, super()._proc_pax)
        tf.fileobj.read(self._block(self.size))  # its data, unread
        return self._chained(tf, self._next_member)

    @classmethod
    def _next_member(cls, tf):
        try:
            return cls.fromtarfile(tf)
        except tarfile.HeaderError as e:  # as tarfile's own _proc_pax: no member after the header
            raise tarfile.SubsequentHeaderError(str(e)) from None

    def _check_header(self):
        if self.size > MAX_HEADER:
            raise IngestError(f"a tar header of {self.size} bytes (a long name or pax header; at most {MAX_HEADER})")

    def _chained(self, tf, proc):
        """``proc`` reads the header's data, then the next header by recursion, the data still held."""
        depth = getattr(tf, "thaw_chain", 0)
        if depth >= MAX_CHAIN:
            raise IngestError(f"tar headers chained too deep (more than {MAX_CHAIN} pax or long-name headers "
                              f"before one member)")
        tf.thaw_chain = depth + 1
        try:
            return proc(tf)
        finally:
            tf.thaw_chain = depth


def _xattrs(m: tarfile.TarInfo, src: str) -> dict[str, str] | None:
    out = {}
    for k, v in m.pax_headers.items():
        if k.startswith(XATTR):
            name = k[len(XATTR):]
            if not name or "\0" in name or len(_bytes(name)) > NAME_MAX:  # setxattr(2) refuses each
                raise IngestError(f"{src!r} has an xattr name that is empty, holds a NUL byte or is over "
                                  f"{NAME_MAX} bytes ({name[:80]!r}, {len(_bytes(name))} bytes)")
            if not name.startswith(XATTR_KEPT):
                continue
            raw = _bytes(v) if isinstance(v, str) else v
            if len(raw) > XATTR_SIZE_MAX:
                raise IngestError(f"{src!r} has a {len(raw)}-byte value for xattr {name!r} "
                                  f"(at most {XATTR_SIZE_MAX})")
            if why := _xattr_value_error(name, raw, m.isdir()):
                raise IngestError(f"{src!r} has a value for xattr {name!r} that Linux refuses ({why})")
            out[name] = base64.b64encode(raw).decode()
    return out or None


def _xattr_value_error(name: str, raw: bytes, is_dir: bool) -> str | None:
    """Why setxattr(2) refuses this value of one of the xattrs the kernel reads itself (a file capability, a
    POSIX ACL), or None. Kept, it was served by the lazy mount (an exec of the file failed) and every materialize
    of the image failed."""
    if name == "security.capability":
        revision = int.from_bytes(raw[:4], "little") >> 24 if len(raw) >= 4 else None
        if CAP_SIZES.get(revision) != len(raw):
            return f"{len(raw)} bytes: not a revision 2 or 3 file capability set"
        return "its root id is -1" if raw[20:] == b"\xff" * 4 else None
    if not name.startswith("system.posix_acl_"):
        return None
    if len(raw) < 4 or (len(raw) - 4) % 8 or int.from_bytes(raw[:4], "little") != 2:
        return f"{len(raw)} bytes: not a version 2 POSIX ACL"
    if name.endswith("_default") and not is_dir and len(raw) > 4:
        return "a default ACL on a file that is not a directory"
    entries = [struct.unpack_from("<HHI", raw, at) for at in range(4, len(raw), 8)]
    tags = "".join(ACL_TAGS.get(tag, "?") for tag, _, _ in entries)
    # posix_acl_valid(): owner, users, owning group, groups, a mask (needed with any user or group), other
    order = re.fullmatch(r"u(U*)g(G*)(m?)o", tags) if entries else True
    if not order or (order is not True and not order[3] and (order[1] or order[2])):
        return f"entries out of order or missing ({tags})"
    if any(perm & ~7 or (tag in (2, 8) and ident == 0xFFFFFFFF) for tag, perm, ident in entries):
        return "a permission other than rwx, or the invalid id -1"
    return None


def apply_layer(tree: Tree, stream: BinaryIO, label: str) -> None:
    tree.layer_added, tree.layer_touched = set(), set()
    members = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_Member) as tf:
            for m in tf:
                tf.members.clear()  # tarfile keeps every member it read, each with its pax headers: none is needed
                src = f"{label}:{m.name}"
                members += 1  # whiteouts and repeated entries add no entry, so count members too
                if members > tree.limits.max_entries:
                    raise IngestError(f"{label} has more than {tree.limits.max_entries} members")
                tree.progress(0)  # a heartbeat now and then, for layers of members without data
                path = normalize(m.name)
                base = posixpath.basename(path)
                if base.startswith(WHITEOUT):
                    if m.size:  # its data would be skipped unread and uncounted
                        raise IngestError(f"{src!r} is a whiteout with {m.size} bytes of data")
                    tree.whiteout(path, src)
                    continue
                if m.islnk():
                    tree.hardlink(path, normalize(m.linkname, "hard link target"), src)
                    continue
                if not (0 <= m.uid < 1 << 32 and 0 <= m.gid < 1 << 32):
                    raise IngestError(f"{src!r} has an owner out of range ({m.uid}:{m.gid})")
                common = dict(path=path, mode=m.mode & 0o7777, uid=m.uid, gid=m.gid,
                              mtime_ns=_mtime_ns(m, src), xattrs=_xattrs(m, src))
                if m.isreg():
                    if m.size < 0:
                        raise IngestError(f"{src!r} has a negative size")
                    tree.add(Entry(type=REG, size=m.size, **common), src, tf.extractfile(m))
                elif m.isdir():
                    tree.add(Entry(type=DIR, **common), src)
                elif m.issym():
                    tree.add(Entry(type=SYMLINK, target=m.linkname, **common), src)
                elif m.isfifo():
                    tree.add(Entry(type=FIFO, **common), src)
                elif m.ischr() or m.isblk():
                    if not (0 <= m.devmajor < 1 << 12 and 0 <= m.devminor < 1 << 20):
                        raise IngestError(f"{src!r} has device numbers out of range ({m.devmajor}, {m.devminor})")
                    tree.add(Entry(type=CHR if m.ischr() else BLK, rdev=os.makedev(m.devmajor, m.devminor),
                                   **common), src)
                else:
                    raise IngestError(f"{src!r} has unsupported tar member type {m.type!r}")
    except tarfile.TarError as e:
        raise IngestError(f"{label} is not a valid tar layer: {e}") from None
    except EOFError as e:
        raise IngestError(f"{label} is truncated: {e}") from None
    except RecursionError:  # thousands of chained pax or long-name headers
        raise IngestError(f"{label} is not a valid tar layer: headers chained too deep") from None
    except ValueError as e:  # tarfile's own parsing of a malformed header; ours pass as they are
        from .oci import SourceError

        if isinstance(e, (IngestError, SourceError)):
            raise
        raise IngestError(f"{label} is not a valid tar layer: {e}") from None


# -- plain directories ---------------------------------------------------------------------------
def _dir_xattrs(path: str) -> dict[str, str] | None:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return None
    out = {}
    for n in names:
        try:
            out[n] = base64.b64encode(os.getxattr(path, n, follow_symlinks=False)).decode()
        except OSError:
            continue
    return out or None


def ingest_directory(tree: Tree, root: Path) -> None:
    root = Path(root).resolve()  # a link to the directory (rootfs-current -> rootfs-v42) is that directory
    if not root.is_dir():
        raise IngestError(f"{root} is not a directory")
    seen: dict[tuple[int, int], str] = {}  # (dev, ino) -> first path, for hard links

    def visit(rel: str, full: str, st: os.stat_result) -> None:
        normalize(rel)  # the rules a layer's paths meet (its length, say: materializing it would fail)
        common = dict(path=rel, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                      mtime_ns=st.st_mtime_ns, xattrs=_dir_xattrs(full))
        src = rel or "."
        m = st.st_mode
        if stat.S_ISDIR(m):
            tree.add(Entry(type=DIR, **common), src)
            with os.scandir(full) as it:
                names = sorted(e.name for e in it)
            if names and rel.count("/") + 2 > MAX_DEPTH:
                raise IngestError(f"{full} is more than {MAX_DEPTH} levels below {root}")
            for name in names:
                child = os.path.join(full, name)
                visit(f"{rel}/{name}" if rel else name, child, os.lstat(child))
        elif stat.S_ISREG(m):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in seen:
                tree.hardlink(rel, seen[key], src)
                return
            with open(full, "rb") as f:
                tree.add(Entry(type=REG, size=st.st_size, **common), src, f)
            if st.st_nlink > 1:
                seen[key] = rel
        elif stat.S_ISLNK(m):
            tree.add(Entry(type=SYMLINK, target=os.readlink(full), **common), src)
        elif stat.S_ISFIFO(m):
            tree.add(Entry(type=FIFO, **common), src)
        elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
            tree.add(Entry(type=CHR if stat.S_ISCHR(m) else BLK, rdev=st.st_rdev, **common), src)
        else:
            raise IngestError(f"{full} is a socket or other special file that cannot be part of an image")

    try:
        visit("", str(root), os.lstat(root))
    except OSError as e:  # a file this process may not read, or one removed while it walked
        if not str(e.filename or "").startswith(str(root)):
            raise  # the store's own trouble (a full disk): not the directory's fault
        raise IngestError(f"{e.filename}: {e.strerror}") from None


def ingest(spec, staging: Staging, limits: Limits, progress: Progress | None = None,
           config: dict | None = None, chunk_size: int | None = None) -> ImageManifest:
    """Ingest any source (see :func:`thaw.imagefs.oci.resolve`) into staging; returns the manifest.

    ``config`` (OCI config keys such as Cmd, Env) is a directory's image config, or overrides an image's own.
    Files are cut into chunks of ``chunk_size`` bytes (default and upper bound: the store's ``chunk_size``).
    """
    from . import oci

    tree = Tree(staging, limits, progress, chunk_size)
    if spec.kind == "dir":
        ingest_directory(tree, Path(spec.location))
        return tree.manifest(config)
    # pulls land in the store's scratch directory: on the state dir's disk, and swept by `thaw gc` after a
    # worker killed mid-pull
    with oci.open_image(spec, staging.store.local.tmp, limits.max_image_size) as image:
        for i, layer in enumerate(image.layers):
            with contextlib.closing(layer.open()) as stream:
                apply_layer(tree, stream, f"layer {i} ({layer.digest[:19]})")
                stream.finish()
        return tree.manifest({**(image.config or {}), **(config or {})})


def ingest_and_commit(spec, store, txn_id: str, limits: Limits, progress: Progress | None = None,
                      config: dict | None = None, chunk_size: int | None = None) -> tuple[ImageManifest, int, int]:
    """Ingest ``spec`` and make it durable in one go: chunks, then the manifest naming them.

    Returns (manifest, new_chunks, new_bytes). Nothing stays under a final name if it fails.
    """
    staging = store.staging(txn_id)
    staging.reset()
    try:
        manifest = ingest(spec, staging, limits, progress, config, chunk_size)
        new = (staging.new_chunks, staging.new_bytes)
        staging.commit_chunks()
        store.put_manifest_bytes(manifest.to_bytes())
        store.sync()
    finally:
        staging.abort()
    return (manifest, *new)


def source_size(spec) -> int | None:
    """Best-effort total for progress bars: file bytes of a directory, or the sum of layer sizes."""
    if spec.kind == "dir":
        total = 0
        for dirpath, _, files in os.walk(spec.location):
            for f in files:
                try:
                    st = os.lstat(os.path.join(dirpath, f))
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
        return total
    return None
