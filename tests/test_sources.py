"""Image sources for real: resolve(), then builds through the real Temporal workflow and CLI from a docker-archive,
an OCI layout (skopeo), a registry (anonymous and bearer-token auth), the docker daemon and a Dockerfile. Every
image is materialized and compared with docker's or umoci's own view of the same image."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import activity_attempts
from services import (  # noqa: F401  (fixtures)
    APP_IMAGE, CONTAINER_PATHS, app_archive, app_context, app_export, app_image, base_image, docker_env, dockerd,
    free_port, hardlink_groups, registry, skopeo_copy, token_registry, tree_snapshot, umoci_unpack,
    write_app_context)
from tarutil import docker_archive, layer, member
from thaw.config import Config
from thaw.imagefs import oci
from thaw.imagefs.ingest import Limits, ingest
from thaw.imagefs.manifest import ImageManifest
from thaw.imagefs.materialize import materialize
from thaw.imagefs.oci import SourceError, SourceSpec, resolve
from thaw.imagefs.store import ChunkStore, LocalDirTier, StoreError
from thaw.registry import images

LIMITS = Limits(max_file_size=1 << 30, max_image_size=1 << 34, max_entries=100_000)
APP_CONFIG = {"Cmd": ["/bin/sh", "-c", "cat /app/cfg.txt"], "WorkingDir": "/app"}


# -- helpers -----------------------------------------------------------------------------------------------
def oci_layout(root: Path, layers: list[bytes], config: dict | None = None, ref: str = "v1",
               compress: str = "gzip", layer_type: str | None = None, config_type: str | None = None,
               annotations=None, diff_ids: list[str] | None = None) -> Path:
    """Write an OCI image layout by hand (no tools): gzip or plain layers, one image named ``ref``
    (``compress="gzipped"``: ``layers`` are gzip blobs already, stored as they are)."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media_type: str) -> dict:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    gz = {"gzip": lambda l: gzip.compress(l, mtime=0), "gzipped": lambda l: l}.get(compress)
    descs = [put(gz(l), layer_type or oci.MT_TAR + "+gzip") if gz else put(l, layer_type or oci.MT_TAR)
             for l in layers]
    arch = oci._host_platform()[0]
    cfg = {"architecture": arch, "os": "linux", "config": config or {}, "rootfs": {"type": "layers", "diff_ids": (
        diff_ids or [f"sha256:{hashlib.sha256(l).hexdigest()}" for l in layers])}}
    manifest = {"schemaVersion": 2, "mediaType": oci.MT_OCI_MANIFEST,
                "config": put(json.dumps(cfg).encode(), config_type or "application/vnd.oci.image.config.v1+json"),
                "layers": descs}
    mdesc = put(json.dumps(manifest).encode(), oci.MT_OCI_MANIFEST)
    mdesc["annotations"] = {oci.REF_NAME: ref} if annotations is None else annotations
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root


def layer_blobs(layout: Path) -> list[Path]:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
    return [layout / "blobs" / "sha256" / l["digest"][7:] for l in manifest["layers"]]


def library_ingest(source: str, store_dir: Path) -> tuple[ImageManifest, ChunkStore]:
    """Ingest without Temporal (resolve → ingest → commit), the way the activities do it."""
    store = ChunkStore([LocalDirTier(store_dir)])
    st = store.staging("t")
    st.reset()
    try:  # cut as builds cut images: same digests
        m = ingest(resolve(source), st, LIMITS, chunk_size=Config().image_chunk_size)
        st.commit_chunks()
        m.save(store)
    finally:
        st.abort()
    return m, store


def build(thaw_cli, source: str) -> dict:
    return json.loads(thaw_cli("build", "image", source, "--json").output)


def one_line_error(thaw_cli, source: str) -> str:
    """The build fails with exit code 1 and exactly one `error:` line, which is returned."""
    res = thaw_cli("build", "image", source, ok=False)
    errors = [l for l in res.output.splitlines() if l.startswith("error:")]
    assert res.exit_code == 1 and len(errors) == 1, res.output
    return errors[0]


def build_fails(cfg, thaw_cli, source: str) -> str:
    """One-line failure, and nothing is stored or registered."""
    err = one_line_error(thaw_cli, source)
    assert ChunkStore.open(cfg).usage() == (0, 0)
    assert not any((cfg.store_dir / "staging").iterdir())
    assert images.list_all(cfg.registry_url) == []
    return err


def materialized(cfg, digest: str, dest: Path) -> Path:
    store = ChunkStore.open(cfg)
    return materialize(ImageManifest.load(store, digest), store, dest)


def assert_same_tree(actual: Path, expected: Path, skip=frozenset(), mtimes=False) -> None:
    a, e = tree_snapshot(actual, skip, mtimes), tree_snapshot(expected, skip, mtimes)
    diff = {p: (a.get(p), e.get(p)) for p in set(a) | set(e) if a.get(p) != e.get(p)}
    assert not diff, f"{len(diff)} paths differ (thaw, expected): {dict(sorted(diff.items())[:10])}"
    assert hardlink_groups(actual) == {g for g in hardlink_groups(expected) if not any(p in skip for p in g)}


def assert_app_tree(root: Path) -> None:
    """The Dockerfile's effects, whiteouts included."""
    assert not (root / "etc/motd").exists() and not (root / "usr/share").exists()  # deleted base file and dir
    assert sorted(os.listdir(root / "opt/data")) == ["c"]  # dir removed and recreated: opaque
    assert not (root / "app/bin/tool").exists() and (root / "app/second").read_text() == "two\n"
    assert os.readlink(root / "app/link") == "cfg.txt" and os.readlink(root / "app/abs-link") == "/bin/busybox"
    st = os.lstat(root / "app/cfg.txt")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o640, 123, 456)
    assert os.lstat(root / "app/bin").st_mode & 0o7777 == 0o750
    assert (root / "bin/busybox").stat().st_size > 100_000 and os.readlink(root / "bin/sh") == "busybox"


@pytest.fixture(scope="session")
def reference(app_archive, tmp_path_factory) -> ImageManifest:
    """APP_IMAGE ingested from its `docker save` tar by the library: every other source must give this digest."""
    m, _ = library_ingest(f"docker-archive:{app_archive}", tmp_path_factory.mktemp("ref-store"))
    return m


# -- resolve -----------------------------------------------------------------------------------------------
def test_resolve_prefixes_and_autodetection(tmp_path):
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    archive = docker_archive(tmp_path / "img.tar", [layer(member("f", data=b"x"))])
    layout = oci_layout(tmp_path / "layout", [layer(member("f", data=b"x"))], ref="v1")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text("FROM scratch\n")

    assert resolve(str(rootfs)) == SourceSpec("dir", str(rootfs))
    assert resolve(f"dir:{rootfs}") == SourceSpec("dir", str(rootfs))
    assert resolve(str(ctx)) == SourceSpec("dir", str(ctx))  # a Dockerfile alone does not make it a build
    assert resolve(f"dockerfile:{ctx}") == SourceSpec("dockerfile", str(ctx))
    assert resolve(f"dockerfile:{ctx / 'Dockerfile'}") == SourceSpec("dockerfile", str(ctx / "Dockerfile"))
    assert resolve(str(archive)) == SourceSpec("docker-archive", str(archive))
    assert resolve(f"docker-archive:{archive}:test:latest") == SourceSpec("docker-archive", f"{archive}:test:latest")
    assert resolve(str(layout)) == SourceSpec("oci", str(layout))
    assert resolve(f"oci:{layout}:v1") == SourceSpec("oci", f"{layout}:v1")
    assert resolve("127.0.0.1:5000/app:v1") == SourceSpec("registry", "127.0.0.1:5000/app:v1")
    assert resolve("docker://localhost:5000/team/app") == SourceSpec("registry", "localhost:5000/team/app:latest")
    assert resolve("docker://busybox") == SourceSpec("registry", "docker.io/library/busybox:latest")
    assert resolve("ghcr.io/org/img@sha256:" + "a" * 64) == SourceSpec("registry", "ghcr.io/org/img@sha256:" + "a" * 64)
    assert resolve("ghcr.io/org/img:1.0@sha256:" + "a" * 64) == \
        SourceSpec("registry", "ghcr.io/org/img@sha256:" + "a" * 64)  # a tag beside a digest: ignored, as by Docker
    assert resolve("docker-daemon:app:v1") == SourceSpec("docker-daemon", "app:v1")
    assert str(resolve("docker://busybox")) == "docker://docker.io/library/busybox:latest"

    with oci.open_image(resolve(f"oci:{layout}:v1")) as img:
        assert [l.digest for l in img.layers] and img.ref.startswith(f"oci:{layout}:v1@sha256:")
    with oci.open_image(resolve(f"docker-archive:{archive}:test:latest")) as img:
        assert len(img.layers) == 1


@pytest.mark.parametrize("source, message", [
    ("{tmp}/missing", "no such file or directory"),
    ("dir:{tmp}/missing", "no such directory"),
    ("docker-archive:{tmp}/missing.tar", "no such file"),
    ("docker-archive:{tmp}/plain.tar", "not a docker-archive (no manifest.json)"),
    ("{tmp}/plain.tar", "neither a docker-archive"),
    ("{tmp}/notatar", "not a directory or a tar file"),
    ("oci:{tmp}", "not an OCI image layout (no index.json)"),
    ("dockerfile:{tmp}", "no Dockerfile"),
    ("docker://Bad_Host/UPPER:case", "not a valid image reference"),
    ("docker://127.0.0.1:5000/app:bad!tag", "not a valid tag"),
    ("docker://127.0.0.1:5000/app@sha256:xyz", "not a valid digest"),
    ("docker-daemon:", "give an image name"),
    ("   ", "empty image source"),
])
def test_resolve_errors_are_one_line(tmp_path, source, message):
    with tarfile.open(tmp_path / "plain.tar", "w") as tf:
        tf.addfile(tarfile.TarInfo("hello"))
    (tmp_path / "notatar").write_text("hello")
    with pytest.raises(SourceError) as e:
        resolve(source.format(tmp=tmp_path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_only_loopback_registries_skip_tls(monkeypatch):
    from thaw.imagefs.oci import _insecure

    monkeypatch.delenv("THAW_INSECURE_REGISTRIES", raising=False)
    for host in ("localhost:5000", "127.0.0.1:5000", "127.0.0.2", "[::1]:5000"):
        assert _insecure(host), host
    for host in ("127.example.com", "127.example.com:443", "registry.example.com", "10.0.0.5:5000"):
        assert not _insecure(host), host
    monkeypatch.setenv("THAW_INSECURE_REGISTRIES", "10.0.0.5:5000")
    assert _insecure("10.0.0.5:5000")


def test_open_errors_name_the_input(tmp_path, monkeypatch):
    archive = docker_archive(tmp_path / "img.tar", [layer(member("f", data=b"x"))])
    with pytest.raises(SourceError, match=r"img.tar:other:1: no image tagged 'other:1' in the archive$"):
        with oci.open_image(resolve(f"docker-archive:{archive}:other:1")):
            pass
    layout = oci_layout(tmp_path / "layout", [layer(member("f", data=b"x"))], ref="v1")
    with pytest.raises(SourceError, match=r"no image named 'v2' in the layout \(has: v1\)"):
        with oci.open_image(resolve(f"oci:{layout}:v2")):
            pass
    with tarfile.open(tmp_path / "oci.tar", "w") as tf:
        tf.add(layout, arcname=".")
    with pytest.raises(SourceError, match=r"oci.tar:v2: no image named 'v2' in the archive$"):
        with oci.open_image(resolve(f"oci:{tmp_path / 'oci.tar'}:v2")):
            pass
    (tmp_path / "a:b").mkdir()
    os.link(archive, tmp_path / "a:b" / "img.tar")
    with pytest.raises(SourceError, match=r"an archive path with ':' in it can't be named to skopeo"):
        with oci.open_image(resolve(f"docker-archive:{tmp_path / 'a:b' / 'img.tar'}")):
            pass
    with pytest.raises(SourceError, match=r"registry 127.0.0.1:\d+ unreachable: .*refused"):
        with oci.open_image(resolve(f"docker://127.0.0.1:{free_port()}/app:v1")):
            pass
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(SourceError, match=r"cannot reach the Docker daemon at unix://.*no-docker.sock: start dockerd"):
        with oci.open_image(resolve("docker-daemon:app:v1")):
            pass


# -- layer streams (no docker) --------------------------------------------------------------------------------
@pytest.mark.parametrize("case, layout, message", [
    ("Cmd a string", dict(config={"Cmd": "python app.py"}), "bad image config: Cmd: want a list of strings"),
    ("Env a number", dict(config={"Env": 5}), "Env: want a list of strings, got 5"),
    ("Labels a list", dict(config={"Labels": ["a"]}), "Labels: want a JSON object"),
    ("NUL in Env", dict(config={"Env": ["URL=a", "A=1\0URL=b"]}), 'Env: a NUL character in ["URL=a", "A=1\\u0000'),
    ("NUL in User", dict(config={"User": "root\0"}), "User: a NUL character"),
    ("Helm chart", dict(config_type="application/vnd.cncf.helm.config.v1+json"), "an artifact"),
    ("artifact layer", dict(layer_type="application/vnd.cncf.helm.chart.content.v1.tar+gzip"),
     "not a tar layer of a container image"),
    ("annotations a list", dict(annotations=["x"]), "no image named 'v1' in the layout (has: none)"),
])
def test_a_layout_that_is_not_a_runnable_image_is_a_source_error(tmp_path, case, layout, message):
    """Each was registered (and failed at snapshot time, or ran "p" with arguments "y", "t", ...) or was a
    traceback before."""
    path = oci_layout(tmp_path / "layout", [layer(member("f", data=b"x"))], **layout)
    with pytest.raises(SourceError) as e:
        library_ingest(f"oci:{path}:v1", tmp_path / "store")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_hostile_values_in_an_index_or_a_tar_are_source_errors(tmp_path):
    """Values of the wrong JSON type where names are listed, a pax header with a bad number, and a digest with
    a trailing newline: one-line SourceErrors (a TypeError or ValueError was retried as a transient failure)."""
    path = oci_layout(tmp_path / "layout", [layer(member("f", data=b"x"))], ref="v1")
    index = json.loads((path / "index.json").read_text())
    desc = index["manifests"][0]
    index["manifests"].append({**desc, "annotations": {oci.REF_NAME: 5}})
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match=r"holds 2 images; pick one with oci:PATH:REF \(refs: v1\)$"):
        library_ingest(f"oci:{path}", tmp_path / "store")
    index["manifests"] = [{**desc, "platform": {"os": 1, "architecture": "amd64"}},
                          {**desc, "platform": {"os": "linux", "architecture": ["s390x"]}}]
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(SourceError, match=r"no linux/\w+ image in the index \(has: amd64, linux\)$"):
        library_ingest(f"oci:{path}", tmp_path / "store")

    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("manifest.json")
        info.pax_headers = {"GNU.sparse.map": "a,b", "GNU.sparse.size": "x"}
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(SourceError, match=r"bad.tar: not a readable tar file"):
        resolve(str(bad))
    with pytest.raises(SourceError, match="bad digest"):
        oci._check_digest(f"sha256:{'0' * 64}\n", "layer")


def test_json_nested_too_deep_is_a_source_error(tmp_path):
    path = oci_layout(tmp_path / "layout", [layer(member("f", data=b"x"))])
    (path / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SourceError, match="index.json: JSON nested too deep"):
        library_ingest(str(path), tmp_path / "store")


@pytest.mark.parametrize("compress", ["gzip", "plain"])
def test_oci_layout_layers_are_verified_and_applied(tmp_path, compress):
    payload = os.urandom(1_500_000)
    lower = layer(member("d", "dir"), member("d/gone", data=b"old"), member("d/keep", data=payload),
                  member("old", "dir"), member("old/x", data=b"x"))
    upper = layer(member("d/.wh.gone"), member(".wh.old"), member("d/link", "sym", link="keep"))
    layout = oci_layout(tmp_path / "layout", [lower, upper], {"Cmd": ["run"], "Env": ["A=1"]}, compress=compress)
    m, store = library_ingest(str(layout), tmp_path / "store")
    out = materialize(m, store, tmp_path / "out")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["d", "d/keep", "d/link"]
    assert (out / "d/keep").read_bytes() == payload and m.config == {"Cmd": ["run"], "Env": ["A=1"]}


def test_oci_archive_tar(tmp_path):
    layout = oci_layout(tmp_path / "layout", [layer(member("f", data=b"in a tar"))], ref="v1")
    with tarfile.open(tmp_path / "oci.tar", "w") as tf:
        tf.add(layout, arcname=".")
    assert resolve(str(tmp_path / "oci.tar")) == SourceSpec("oci", str(tmp_path / "oci.tar"))
    m, store = library_ingest(f"oci:{tmp_path / 'oci.tar'}:v1", tmp_path / "store")
    assert (materialize(m, store, tmp_path / "out") / "f").read_bytes() == b"in a tar"


@pytest.mark.parametrize("compress, damage, message", [
    ("gzip", "flip", "does not match its digest"),
    ("plain", "flip", "does not match its digest"),
    ("plain", "truncate", "truncated"),
    ("gzip", "append", "larger than the"),
])
def test_damaged_layer_blob_is_a_source_error(tmp_path, compress, damage, message):
    layout = oci_layout(tmp_path / "layout", [layer(member("f", data=os.urandom(200_000)))], compress=compress)
    blob = layer_blobs(layout)[0]
    data = bytearray(blob.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF  # inside the file's contents: the tar still parses
    elif damage == "truncate":
        del data[-2048:]
    else:
        data += b"\0" * 512
    blob.write_bytes(bytes(data))
    with pytest.raises(SourceError) as e:
        library_ingest(str(layout), tmp_path / "store")
    assert message in str(e.value) and str(layout) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["crc", "length", "body"])
def test_a_gzip_layer_published_damaged_is_a_source_error(tmp_path, damage):
    """The blob's digest matches (it was computed over the damaged bytes), so only gzip's own checks can tell:
    its CRC and length trail the data, after the tar's end, where a tar reader never looks."""
    payload = os.urandom(300_000)
    blob = bytearray(gzip.compress(layer(member("f", data=payload)), mtime=0))
    if damage == "crc":
        blob[-8:-4] = bytes(4)
    elif damage == "length":
        blob[-4:] = bytes(4)
    else:
        blob[len(blob) // 2] ^= 0x01  # in the deflate data: the tar may still parse, the file's bytes differ
    layout = oci_layout(tmp_path / "layout", [bytes(blob)], compress="gzipped")
    with pytest.raises(SourceError, match="corrupt gzip data") as e:
        library_ingest(str(layout), tmp_path / "store")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["block", "checksum"])
def test_a_zstd_layer_published_cut_short_is_a_source_error(tmp_path, damage):
    """The blob's digest matches (it was computed over the cut bytes): a zstd frame cut at the end of a block
    whose data ends on a tar member's end (the tar reader then sees a clean end, one file short), or without
    its checksum, is a one-line error, as a gzip layer cut short is."""
    import zstandard

    first = os.urandom(128 * 1024 - 512)  # with its 512-byte tar header: one whole 128 KiB zstd block
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(
        layer(member("first", data=first), member("second", data=os.urandom(50_000))))
    if damage == "block":
        fhd = frame[4]  # frame header descriptor: the header's length, then the first block's 3-byte header
        at = 5 + (fhd >> 5 & 1 ^ 1) + (0, 1, 2, 4)[fhd & 3] + ((fhd >> 5 & 1), 2, 4, 8)[fhd >> 6]
        head = int.from_bytes(frame[at:at + 3], "little")
        blob = frame[:at + 3 + (1 if head >> 1 & 3 == 1 else head >> 3)]
    else:
        blob = frame[:-4]
    layout = oci_layout(tmp_path / "layout", [blob], compress="plain", layer_type=oci.MT_TAR + "+zstd")
    with pytest.raises(SourceError, match="corrupt zstd data") as e:
        library_ingest(str(layout), tmp_path / "store")
    assert "\n" not in str(e.value)


def test_a_layer_with_megabytes_after_its_tar_is_a_source_error(tmp_path):
    """A tar ends at its end blocks; gzip's checks come after all the data, so the rest is read too. A small
    compressed tail that expands past a tar's padding is refused, not decompressed however big it gets."""
    blob = gzip.compress(layer(member("f", data=b"x")) + bytes(2 << 20), mtime=0)
    layout = oci_layout(tmp_path / "layout", [blob], compress="gzipped")
    with pytest.raises(SourceError, match="more than 1 MiB of data after the end of its tar"):
        library_ingest(str(layout), tmp_path / "store")


@pytest.mark.parametrize("fatal, kind, message", [
    ('received unexpected HTTP status: 503 Service Unavailable', RuntimeError, "registry r.example:5000 failed"),
    ('pinging container registry r.example:5000: Get \\"https://r.example:5000/v2/\\": x509: certificate signed by '
     'unknown authority', SourceError, "TLS with registry r.example:5000 failed (certificate signed by unknown "
     "authority); for a plain-HTTP registry add it to THAW_INSECURE_REGISTRIES"),
    ('reading blob sha256:aa: Get \\"http://r.example:5000/v2/app/blobs/sha256:aa\\": read tcp 127.0.0.1:4->'
     '127.0.0.1:5000: read: connection reset by peer', RuntimeError, "registry r.example:5000 failed"),
    ('pinging container registry r.example:5000: Get \\"http://r.example:5000/v2/\\": dial tcp: i/o timeout',
     RuntimeError, "registry r.example:5000 failed"),
    ('pinging container registry r.example:5000: Get \\"https://r.example:5000/v2/\\": net/http: TLS handshake '
     'timeout', RuntimeError, "registry r.example:5000 failed"),
    ('reading manifest 1 in r.example:5000/app: Get \\"https://r.example:5000/v2/app/manifests/1\\": '
     'net/http: request canceled (Client.Timeout exceeded while awaiting headers)', RuntimeError,
     "registry r.example:5000 failed"),
    ('pinging container registry r.example:5000: Get \\"https://r.example:5000/v2/\\": dial tcp: lookup r.example '
     'on 10.0.0.2:53: server misbehaving', RuntimeError, "registry r.example:5000 failed"),
    ('pinging container registry r.example:5000: Get \\"https://r.example:5000/v2/\\": dial tcp: lookup r.example '
     'on 10.0.0.2:53: no such host', SourceError, "registry r.example:5000 unreachable"),  # a typo: no retries
    ('writing blob: happened during read: Digest did not match, expected sha256:aa, got sha256:bb', SourceError,
     "a blob does not match its digest (Digest did not match, expected sha256:aa, got sha256:bb); the image is "
     "corrupt or was tampered with"),
])
def test_skopeo_failures_read_as_one_line(fatal, kind, message):
    """The messages no local server here produces on demand (a registry's 5xx, a TLS failure, a corrupt blob)."""
    stderr = f'Getting image source signatures\ntime="2026-11-27T10:00:00Z" level=fatal msg="{fatal}"\n'
    e = oci._copy_error(stderr, "docker://r.example:5000/app:1", oci._Registry("r.example:5000", None), None)
    assert type(e) is kind and message in str(e) and "\n" not in str(e)


def test_tampered_oci_blob_fails_the_build_and_stores_nothing(cfg, worker, thaw_cli, tmp_path):
    layout = oci_layout(tmp_path / "layout", [layer(member("ok", data=os.urandom(300_000))),
                                              layer(member("model.bin", data=os.urandom(300_000)))], compress="plain")
    blob = layer_blobs(layout)[1]
    data = bytearray(blob.read_bytes())
    data[1024 + 5000] ^= 1  # one bit of model.bin's contents
    blob.write_bytes(bytes(data))
    err = build_fails(cfg, thaw_cli, f"oci:{layout}:v1")
    assert "does not match its digest" in err and "tampered" in err


@pytest.mark.parametrize("compress", ["gzip", "plain"])
def test_a_layer_whose_tar_is_not_its_configs_diff_id_is_refused(tmp_path, compress):
    """The blob matches its digest, but the config's diff_id names other uncompressed bytes (a tool that rewrote
    the layer and not the config, or a tampered one): the layer was ingested as it came."""
    ours, other = layer(member("a", data=b"A" * 5000)), layer(member("a", data=b"B" * 5000))
    want = f"sha256:{hashlib.sha256(other).hexdigest()}"
    layout = oci_layout(tmp_path / "layout", [ours], compress=compress, diff_ids=[want])
    with pytest.raises(SourceError, match=f"uncompressed tar does not match the config's diff_id {want} "
                                          f"\\(got sha256:{hashlib.sha256(ours).hexdigest()}\\)") as err:
        library_ingest(f"oci:{layout}:v1", tmp_path / "store")
    assert "\n" not in str(err.value) and "tampered" in str(err.value)
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]


def test_a_build_that_fails_storing_its_chunks_leaves_no_staging(cfg, worker, thaw_cli, tmp_path, monkeypatch):
    """S3 refusing the upload (a key that may read but not write; a full disk likewise) fails the build at once,
    and its staging area (a copy of the image's new chunks) stayed for a retry that never came."""
    from thaw.imagefs.store import Staging

    def denied(self):
        raise StoreError("s3:http://127.0.0.1:1/thaw/: access denied on PutObject (AccessDenied)")
    monkeypatch.setattr(Staging, "commit_chunks", denied)  # the worker runs in this process
    layout = oci_layout(tmp_path / "layout", [layer(member("model.bin", data=os.urandom(300_000)))])
    assert "access denied on PutObject" in build_fails(cfg, thaw_cli, f"oci:{layout}:v1")


def multi_platform_layout(root: Path) -> tuple[Path, dict, dict]:
    """An OCI layout whose image "multi" is an index of a host-platform image (one layer: file "arch"), an empty
    linux/s390x one and an attestation, as registries serve them. Returns (layout, host desc, s390x desc)."""
    layout = oci_layout(root, [layer(member("arch", data=b"host"))])
    blobs = layout / "blobs" / "sha256"
    host = json.loads((layout / "index.json").read_text())["manifests"][0]
    host = {**host, "annotations": {}, "platform": {"os": "linux", "architecture": oci._host_platform()[0]}}
    other_manifest = json.loads((blobs / host["digest"][7:]).read_bytes())
    other_manifest["layers"] = []  # an empty image stands for the other architecture
    data = json.dumps(other_manifest).encode()
    (blobs / hashlib.sha256(data).hexdigest()).write_bytes(data)
    other = {"mediaType": oci.MT_OCI_MANIFEST, "digest": f"sha256:{hashlib.sha256(data).hexdigest()}",
             "size": len(data), "platform": {"os": "linux", "architecture": "s390x"}}
    attestation = {**other, "platform": {"os": "unknown", "architecture": "unknown"}}
    index = json.dumps({"schemaVersion": 2, "mediaType": oci.MT_OCI_INDEX,
                        "manifests": [attestation, other, host]}).encode()
    (blobs / hashlib.sha256(index).hexdigest()).write_bytes(index)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": oci.MT_OCI_INDEX, "digest": f"sha256:{hashlib.sha256(index).hexdigest()}",
         "size": len(index), "annotations": {oci.REF_NAME: "multi"}}]}))
    return layout, host, other


def test_index_picks_the_host_platform(tmp_path):
    """index.json → image index → per-platform manifests (and an attestation), as registries serve them."""
    layout, _, other = multi_platform_layout(tmp_path / "layout")
    blobs = layout / "blobs" / "sha256"
    m, store = library_ingest(f"oci:{layout}:multi", tmp_path / "store")
    assert (materialize(m, store, tmp_path / "out") / "arch").read_bytes() == b"host"

    index = json.dumps({"schemaVersion": 2, "mediaType": oci.MT_OCI_INDEX, "manifests": [other]}).encode()
    (blobs / hashlib.sha256(index).hexdigest()).write_bytes(index)
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": oci.MT_OCI_INDEX, "digest": f"sha256:{hashlib.sha256(index).hexdigest()}", "size": len(index)}]}))
    arch = oci._host_platform()[0]
    with pytest.raises(SourceError, match=rf"no linux/{arch} image in the index \(has: linux/s390x\)"):
        library_ingest(str(layout), tmp_path / "store2")


@pytest.mark.parametrize("legacy_path", [False, True])
def test_docker_archive_in_the_blobs_layout_of_newer_docker(tmp_path, legacy_path):
    """Docker >= 25 saves an OCI layout plus manifest.json naming blobs/sha256/...; <id>/layer.tar are symlinks."""
    layers = [layer(member("a", data=b"A" * 10_000)), layer(member("b", "sym", link="a"))]
    blobs = [gzip.compress(layers[0], mtime=0), layers[1]]  # docker load accepts compressed layers too
    config = json.dumps({"os": "linux", "config": {"Cmd": ["x"]}, "rootfs": {
        "type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(l).hexdigest()}" for l in layers]}}).encode()
    files, names = {}, []
    for i, blob in enumerate([config, *blobs]):
        files[f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}"] = blob
        names.append(f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}")
    layer_names = [f"legacy{i}/layer.tar" for i in (1, 2)] if legacy_path else names[1:]
    manifest = json.dumps([{"Config": names[0], "RepoTags": ["new:1"], "Layers": layer_names}]).encode()
    with tarfile.open(tmp_path / "new.tar", "w") as tf:
        for name, data in [*files.items(), ("manifest.json", manifest)]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for i in (1, 2):
            ti = tarfile.TarInfo(f"legacy{i}/layer.tar")
            ti.type, ti.linkname = tarfile.SYMTYPE, f"../{names[i]}"
            tf.addfile(ti)
    m, store = library_ingest(str(tmp_path / "new.tar"), tmp_path / "store")
    out = materialize(m, store, tmp_path / "out")
    assert (out / "a").read_bytes() == b"A" * 10_000 and os.readlink(out / "b") == "a" and m.config == {"Cmd": ["x"]}


# -- docker-archive, OCI layout, docker daemon, Dockerfile ---------------------------------------------------
@pytest.mark.docker
def test_docker_archive_from_docker_save(cfg, worker, thaw_cli, tmp_path, app_archive, app_export, reference):
    res = build(thaw_cli, f"docker-archive:{app_archive}")
    assert res["digest"] == reference.digest
    out = materialized(cfg, res["digest"], tmp_path / "out")
    assert_same_tree(out, app_export, skip=CONTAINER_PATHS)
    assert_app_tree(out)
    config = json.loads(thaw_cli("images", "show", res["digest"], "--json").output)["config"]
    assert {k: config[k] for k in APP_CONFIG} == APP_CONFIG and "GREETING=hi" in config["Env"]
    tagged = build(thaw_cli, f"docker-archive:{app_archive}:{APP_IMAGE}")
    assert (tagged["digest"], tagged["created"], tagged["new_bytes"]) == (reference.digest, False, 0)


@pytest.mark.docker
def test_oci_layout_from_skopeo_matches_umoci(cfg, worker, thaw_cli, tmp_path, app_archive, reference):
    layout = tmp_path / "layout"
    skopeo_copy(f"docker-archive:{app_archive}", f"oci:{layout}:app", "--dest-compress")
    res = build(thaw_cli, f"oci:{layout}:app")
    assert res["digest"] == reference.digest
    assert build(thaw_cli, str(layout))["digest"] == reference.digest  # autodetected, the only image
    out = materialized(cfg, res["digest"], tmp_path / "out")
    expected = umoci_unpack(layout, "app", tmp_path / "bundle")
    assert_same_tree(out, expected, mtimes=True)
    assert_app_tree(out)


@pytest.mark.docker
def test_tampered_skopeo_layout_stores_nothing(cfg, worker, thaw_cli, tmp_path, app_archive):
    layout = tmp_path / "layout"
    skopeo_copy(f"docker-archive:{app_archive}", f"oci:{layout}:app")
    blob = max(layer_blobs(layout), key=lambda p: p.stat().st_size)  # the base layer with busybox
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x55
    blob.write_bytes(bytes(data))
    assert "does not match its digest" in build_fails(cfg, thaw_cli, f"oci:{layout}:app")


@pytest.mark.docker
def test_zstd_layers(tmp_path, app_archive, reference):
    layout = tmp_path / "layout"
    skopeo_copy(f"docker-archive:{app_archive}", f"oci:{layout}:app", "--dest-compress",
                "--dest-compress-format", "zstd")
    with open(layer_blobs(layout)[0], "rb") as f:
        assert f.read(4) == oci.ZSTD_MAGIC
    assert library_ingest(f"oci:{layout}:app", tmp_path / "store")[0].digest == reference.digest


@pytest.mark.docker
def test_docker_daemon_image(cfg, docker_env, worker, thaw_cli, app_image, reference):
    assert build(thaw_cli, f"docker-daemon:{APP_IMAGE}")["digest"] == reference.digest
    assert "no such image in the Docker daemon" in one_line_error(thaw_cli, "docker-daemon:thaw-test/nope:1")


@pytest.mark.docker
def test_dockerfile_build_applies_whiteouts(cfg, docker_env, worker, thaw_cli, tmp_path, app_export, reference):
    ctx = write_app_context(tmp_path / "ctx")  # a fresh copy of the context: docker's build cache gives the same image
    res = build(thaw_cli, f"dockerfile:{ctx}")
    out = materialized(cfg, res["digest"], tmp_path / "out")
    assert_same_tree(out, app_export, skip=CONTAINER_PATHS)
    assert_app_tree(out)
    assert res["digest"] == reference.digest


@pytest.mark.docker
def test_failing_dockerfile_is_one_line(cfg, docker_env, worker, thaw_cli, tmp_path, base_image):
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo building && false\n")
    err = build_fails(cfg, thaw_cli, f"dockerfile:{tmp_path / 'ctx'}")
    assert "docker build failed" in err and "non-zero code: 1" in err


@pytest.mark.docker
def test_silent_build_step_longer_than_the_heartbeat_timeout(cfg, docker_env, worker, thaw_cli, tmp_path, base_image):
    assert cfg.heartbeat_timeout <= 5
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "Dockerfile").write_text(
        f"FROM {base_image}\nRUN sleep 7 && echo {os.urandom(4).hex()} > /slow\n")  # silent for > 5 s
    res = build(thaw_cli, f"dockerfile:{tmp_path / 'ctx'}")
    assert (materialized(cfg, res["digest"], tmp_path / "out") / "slow").exists()
    assert set(activity_attempts(cfg, res["workflow_id"])) == {1}  # ingest was not timed out and retried


# -- registries ------------------------------------------------------------------------------------------------
@pytest.mark.docker
def test_registry_anonymous(cfg, worker, thaw_cli, tmp_path, registry, app_archive, reference):
    skopeo_copy(f"docker-archive:{app_archive}", f"docker://{registry.host}/thaw/app:1", "--dest-tls-verify=false")
    assert "not found in registry" in build_fails(cfg, thaw_cli, f"{registry.host}/thaw/app:nope")
    res = build(thaw_cli, f"{registry.host}/thaw/app:1")  # bare reference, pushed gzip-compressed by skopeo
    assert res["digest"] == reference.digest
    with oci.open_image(resolve(f"docker://{registry.host}/thaw/app:1")) as img:
        assert all(l.media_type.endswith("gzip") for l in img.layers)
        size = sum(l.size for l in img.layers)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(SourceError, match=rf"its layers are {size} bytes to download, over the image size limit of "
                                          rf"{size - 1} bytes \(THAW_MAX_IMAGE_SIZE\); nothing was pulled"):
        with oci.open_image(resolve(f"docker://{registry.host}/thaw/app:1"), scratch, max_bytes=size - 1):
            pass
    with oci.open_image(resolve(f"docker://{registry.host}/thaw/app:1"), scratch, max_bytes=size) as img:
        assert sum(l.size for l in img.layers) == size
    store = ChunkStore([LocalDirTier(tmp_path / "store")])  # ingest passes its limit on
    with pytest.raises(SourceError, match="bytes to download, over the image size limit"):
        ingest(resolve(f"docker://{registry.host}/thaw/app:1"), store.staging("big"), Limits(1 << 30, size - 1, 1000))
    assert not list((tmp_path / "store").rglob("*.tar*")) and not os.listdir(store.local.tmp)
    by_digest = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}",
                                f"docker://{registry.host}/thaw/app:1"], capture_output=True, text=True, check=True)
    pinned = f"docker://{registry.host}/thaw/app@{by_digest.stdout.strip()}"
    assert build(thaw_cli, pinned)["digest"] == reference.digest
    with oci.open_image(resolve(pinned.replace("/app@", "/app:1@")), scratch) as img:  # as k8s manifests write it
        assert sum(l.size for l in img.layers) == size


@pytest.mark.docker
def test_registry_image_over_the_size_limit_is_refused_before_the_pull(tmp_path, registry):
    """The limit is checked on the manifest skopeo will pull (an index: the host platform's), before any layer."""
    layout, host, _ = multi_platform_layout(tmp_path / "layout")
    skopeo_copy(f"oci:{layout}:multi", f"docker://{registry.host}/thaw/multi:1", "--all", "--dest-tls-verify=false")
    manifest = json.loads((layout / "blobs" / "sha256" / host["digest"][7:]).read_bytes())
    size = sum(l["size"] for l in manifest["layers"])  # the s390x image has none
    spec = resolve(f"docker://{registry.host}/thaw/multi:1")
    with pytest.raises(SourceError, match=f"its layers are {size} bytes to download, over the image size limit"):
        with oci.open_image(spec, max_bytes=size - 1):
            pass
    with oci.open_image(spec, max_bytes=size) as img:
        assert [l.size for l in img.layers] == [size]


def push_to_registry(host: str, repo: str, tag: str, layers: list[dict]) -> None:
    """Push an image manifest with these layer descriptors (one 100-byte blob stands for every layer) over the
    registry API itself: a registry stores manifests whose layer sizes lie, skopeo does not write them."""
    import urllib.request

    base = f"http://{host}/v2/{repo}"

    def blob(data: bytes) -> dict:
        start = urllib.request.Request(f"{base}/blobs/uploads/", b"", method="POST")
        loc = urllib.request.urlopen(start).headers["Location"]
        loc = loc if loc.startswith("http") else f"http://{host}{loc}"
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        urllib.request.urlopen(urllib.request.Request(f"{loc}{'&' if '?' in loc else '?'}digest={digest}", data,
                                                      {"Content-Type": "application/octet-stream"}, method="PUT"))
        return {"digest": digest, "size": len(data)}

    config = blob(json.dumps({"architecture": oci._host_platform()[0], "os": "linux",
                              "rootfs": {"type": "layers", "diff_ids": []}}).encode())
    one = blob(b"x" * 100)["digest"]
    manifest = {"schemaVersion": 2, "mediaType": oci.MT_OCI_MANIFEST,
                "config": {**config, "mediaType": oci.CONFIG_TYPES[0]},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": one, **d}
                           for d in layers]}
    urllib.request.urlopen(urllib.request.Request(f"{base}/manifests/{tag}", json.dumps(manifest).encode(),
                                                  method="PUT", headers={"Content-Type": oci.MT_OCI_MANIFEST}))


@pytest.mark.docker
def test_registry_manifest_whose_layer_sizes_lie_is_refused_before_the_pull(tmp_path, registry):
    """The size limit is checked from the manifest alone: a layer whose size is missing or negative (50 GiB, then
    -50 GiB) must not count as 0 or less and pass the limit; the manifest is refused, nothing pulled."""
    for tag, layers in {"neg": [{"size": -5}], "nosize": [{}],
                        "cancel": [{"size": 50 << 30}, {"size": -(50 << 30)}]}.items():
        push_to_registry(registry.host, "thaw/lies", tag, layers)
        with pytest.raises(SourceError, match=f"manifest sha256:[0-9a-f]{{64}} does not give every layer's size"):
            with oci.open_image(resolve(f"docker://{registry.host}/thaw/lies:{tag}"), tmp_path, max_bytes=1 << 30):
                pass
    assert not list(tmp_path.iterdir())  # nothing pulled


@pytest.fixture
def no_registry_creds(monkeypatch, tmp_path):
    """No registry credentials in the environment or a docker config (ask for it before ``worker``: see
    services.docker_env)."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    for var in ("THAW_REGISTRY_USERNAME", "THAW_REGISTRY_USER", "THAW_REGISTRY_PASSWORD"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.docker
def test_registry_with_token_auth(cfg, no_registry_creds, worker, thaw_cli, monkeypatch, tmp_path, token_registry,
                                  app_archive, reference):
    reg = token_registry
    skopeo_copy(f"docker-archive:{app_archive}", f"docker://{reg.host}/thaw/app:1", "--dest-tls-verify=false",
                "--dest-creds", reg.creds)
    source = f"docker://{reg.host}/thaw/app:1"

    err = build_fails(cfg, thaw_cli, source)  # anonymous: the token grants nothing
    assert f"registry {reg.host} denied access (authentication required); set THAW_REGISTRY_USERNAME" in err
    user, password = reg.creds.split(":")
    monkeypatch.setenv("THAW_REGISTRY_USERNAME", user)
    monkeypatch.setenv("THAW_REGISTRY_PASSWORD", "wrong")
    err = build_fails(cfg, thaw_cli, source)
    assert f"registry {reg.host} denied access as '{user}' (incorrect username or password)" in err

    monkeypatch.setenv("THAW_REGISTRY_PASSWORD", password)
    res = build(thaw_cli, source)
    assert res["digest"] == reference.digest
    assert (user, [{"type": "repository", "name": "thaw/app", "actions": ["pull"]}]) in reg.token_server.issued

    monkeypatch.delenv("THAW_REGISTRY_USERNAME")  # credentials from ~/.docker/config.json work too
    monkeypatch.delenv("THAW_REGISTRY_PASSWORD")
    (tmp_path / "docker-config").mkdir()
    (tmp_path / "docker-config" / "config.json").write_text(json.dumps(
        {"auths": {reg.host: {"auth": base64.b64encode(reg.creds.encode()).decode()}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    with oci.open_image(resolve(source)) as img:
        assert img.config["WorkingDir"] == "/app"
