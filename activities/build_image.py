"""Activities of BuildImage: thin, idempotent adapters over thaw.imagefs and thaw.registry.

Each is safe to run twice: ingest restarts its staging area (or reuses a finished one), store skips chunks
already present, register inserts a digest once.
"""

from __future__ import annotations

import errno
import functools
import json
import time

from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError

from thaw.config import Config
from thaw.errors import first_line
from thaw.files import write_atomic
from thaw.heartbeat import keepalive
from thaw.imagefs import oci
from thaw.imagefs.ingest import IngestError, Limits, ingest, source_size
from thaw.imagefs.manifest import ImageManifest
from thaw.imagefs.store import ChunkStore, StoreError, StoreUnavailable
from thaw.registry import images, leases
from thaw.registry.models import Image
from thaw.workflows.build_image import (
    IngestedAndStored, IngestInput, IngestResult, RegisterInput, RegisterResult, ResolvedSource, StoreResult)

USER_ERRORS = (IngestError, oci.SourceError, StoreError, images.NotFound)
MANIFEST_FILE = ".manifest"
RESULT_FILE = ".result.json"


def fail_fast_on(*errors: type[BaseException]):
    """A bad input fails the workflow at once with its one-line message instead of being retried; so does a
    full disk (retries that fill it again only delay the error)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except StoreUnavailable:  # a remote tier is down: let Temporal retry with backoff
                raise
            except errors as e:
                raise ApplicationError(first_line(e), type="UserError", non_retryable=True) from None
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise ApplicationError(out_of_space(e, getattr(args[0] if args else None, "cfg", None)),
                                       type="UserError", non_retryable=True) from None

        return wrapper

    return decorate


user_errors_fail_fast = fail_fast_on(*USER_ERRORS)


def out_of_space(e: OSError, cfg: Config | None) -> str:
    """What a full disk (or quota) says: where, and what frees space. Nothing half-written is registered: the
    failed step's staging is reset by the next try, and `thaw gc` drops store objects nothing uses."""
    where = f" ({e.filename})" if e.filename else ""
    if cfg is not None:
        where += f" on host {cfg.host_id}: its store is {cfg.store_dir}, its work dir {cfg.work_dir}"
    return (f"{e.strerror or e}{where}; if a disk there is full, free space (`thaw gc` drops store objects no image "
            f"or snapshot uses)")


class Heartbeat:
    """Progress callback that heartbeats at most every ``every`` seconds."""

    def __init__(self, stage: str, total: int | None, every: float = 0.5):
        self.stage, self.total, self.every = stage, total, every
        self.done = 0
        self.last = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            activity.heartbeat({"stage": self.stage, "done": self.done, "total": self.total})


def retried(e: BaseException) -> bool:
    """Whether Temporal runs this activity again after it raises ``e``: not after a non-retryable error, a
    cancel the workflow asked for, or its last attempt. A cancel for a timeout, a worker's shutdown, a pause or
    a reset is retried; so may one for an attempt the server no longer knows (it timed out and the next attempt
    may already use the staging area: what a closed build leaves, `thaw gc` sweeps)."""
    info = activity.info()
    if isinstance(e, CancelledError) or activity.is_cancelled():
        why = activity.cancellation_details()
        if why is None or why.cancel_requested:
            return False
    elif (isinstance(e, ApplicationError) and e.non_retryable) or not isinstance(e, Exception):
        return False
    most = info.retry_policy.maximum_attempts if info.retry_policy else 0
    return not most or info.attempt < most


def after_gc(cfg: Config) -> None:
    """Wait while `thaw gc` sweeps the store (it holds the store's lease), heartbeating: a build must not take an
    unreferenced chunk the sweep is about to delete, nor register after the sweep took stock of what is."""
    if leases.current(cfg.registry_url, leases.STORE) is None:
        return
    with keepalive("waiting for gc") as stage:
        leases.wait_free(cfg.registry_url, leases.STORE, lambda row: stage(f"waiting for {row.holder}"))


def stored_whole(store: ChunkStore, digest: str, what: str) -> ImageManifest:
    """Manifest ``digest``, once it and every chunk it names are in the store's durable tier, asked afresh (a
    chunk seen there earlier may have been swept by `thaw gc` since); StoreError otherwise: nothing is registered
    half-stored."""
    with keepalive("checking the store"):  # many chunks: many S3 requests
        manifest = ImageManifest.load(store, digest)  # verified, but perhaps from this host's disk
        missing = store.missing_chunks(manifest.chunk_digests())  # (asked afresh from here on)
        lost = [f"{len(missing)} of its chunks"] if missing else []
        if not store.has_manifest_durably(digest):
            lost.append("its manifest")
    if lost:
        raise StoreError(f"{what} {digest[:12]}: {' and '.join(lost)} missing from the store (`thaw gc` swept "
                         f"them meanwhile?): build it again")
    return manifest


class BuildActivities:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.store = ChunkStore.open(cfg)

    @activity.defn(name="resolve_source")
    @user_errors_fail_fast
    def resolve_source(self, source: str) -> ResolvedSource:
        spec = oci.resolve(source)
        return ResolvedSource(spec.kind, spec.location)

    @activity.defn(name="ingest_image")
    @user_errors_fail_fast
    def ingest_image(self, inp: IngestInput) -> IngestResult:
        t0 = time.monotonic()
        after_gc(self.cfg)
        staging = self.store.staging(inp.build_id)
        done = staging.dir / RESULT_FILE
        what = {"source": [inp.source.kind, inp.source.location], "config": inp.config,
                "run": activity.info().workflow_run_id}  # a new run of a reused build id reads the source again
        if done.exists():  # an earlier attempt finished; its staging area is complete if it was of this input
            saved = json.loads(done.read_text())  # (and run: a registry tag may have moved since, a chunk gone bad)
            if saved.pop("input", None) == what:
                return IngestResult(**saved)
        staging.reset()
        spec = oci.SourceSpec(inp.source.kind, inp.source.location)
        try:
            with keepalive("sizing"):  # a directory of millions of files (or on NFS) takes a while to walk
                total = source_size(spec)
            manifest = ingest(spec, staging, Limits.from_config(self.cfg), Heartbeat("ingest", total), inp.config,
                              self.cfg.image_chunk_size)
        except BaseException:
            staging.abort()  # nothing of a rejected or failed image stays behind
            raise
        data = manifest.to_bytes()
        write_atomic(staging.dir / MANIFEST_FILE, data)
        stats = manifest.stats()
        result = IngestResult(
            build_id=inp.build_id, manifest_digest=manifest.digest, size=stats["size"], files=stats["files"],
            entries=stats["entries"], chunks=stats["chunks"], new_chunks=staging.new_chunks,
            new_bytes=staging.new_bytes, ms=int((time.monotonic() - t0) * 1000))
        write_atomic(done, json.dumps({**result.__dict__, "input": what}))
        return result

    @activity.defn(name="store_image")
    @user_errors_fail_fast
    def store_image(self, ing: IngestResult) -> StoreResult:
        t0 = time.monotonic()
        staging = self.store.staging(ing.build_id)
        manifest_file = staging.dir / MANIFEST_FILE
        if not manifest_file.exists():  # committed by an earlier attempt (its clean-up may have stopped half-way)
            if not self.store.has_manifest(ing.manifest_digest):
                raise StoreError(f"build {ing.build_id}: staging area is gone and manifest "
                                 f"{ing.manifest_digest} was never stored; rebuild the image")
            staging.abort()
            return StoreResult(ing.manifest_digest, 0, 0, int((time.monotonic() - t0) * 1000))
        manifest_bytes = manifest_file.read_bytes()
        with keepalive("store"):  # an upload to S3 can take minutes
            # chunks first (moved and synced), then the manifest that names them, then the staging dir goes
            count, size = staging.commit_chunks()
            self.store.put_manifest_bytes(manifest_bytes)
            self.store.sync()
            staging.abort()
        return StoreResult(ing.manifest_digest, count, size, int((time.monotonic() - t0) * 1000))

    @activity.defn(name="ingest_and_store_image")
    def ingest_and_store_image(self, inp: IngestInput) -> IngestedAndStored:
        """Both steps in one activity, on one worker: the staging area the ingest fills is on its local disk.
        (ingest_image and store_image stay registered for builds that a worker before this one started.) A
        failure that ends the build drops its staging area (the image's new chunks: GBs, on a full disk too);
        one Temporal retries keeps it for the next attempt."""
        try:
            ing = self.ingest_image(inp)
            return IngestedAndStored(ing, self.store_image(ing))
        except BaseException as e:
            if not retried(e):
                self.store.staging(inp.build_id).abort()
            raise

    @activity.defn(name="register_image")
    @user_errors_fail_fast
    def register_image(self, inp: RegisterInput) -> RegisterResult:
        t0 = time.monotonic()
        ing = inp.ingest
        after_gc(self.cfg)
        manifest = stored_whole(self.store, ing.manifest_digest, "image")
        row, created = images.register(self.cfg.registry_url, Image(
            digest=ing.manifest_digest, source=inp.source, source_kind=inp.source_kind, size=ing.size,
            files=ing.files, entries=ing.entries, chunks=ing.chunks, new_chunks=ing.new_chunks,
            new_bytes=ing.new_bytes, build_id=ing.build_id, config=manifest.config, timings_ms=inp.timings_ms))
        return RegisterResult(row.digest, created, int((time.monotonic() - t0) * 1000))

    def all(self) -> list:
        return [self.resolve_source, self.ingest_and_store_image, self.ingest_image, self.store_image,
                self.register_image]
