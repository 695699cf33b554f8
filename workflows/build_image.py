"""BuildImage: source → chunks in the store → registered image. Deterministic; passes ids and digests only."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=5,
    non_retryable_error_types=["UserError"],
)


@dataclass
class BuildImageInput:
    source: str  # as the user gave it (paths already absolute)
    config: dict | None = None  # OCI image config (Cmd, Env, ...): a directory's, or overrides for an image's
    heartbeat_timeout_s: float = 30.0
    activity_timeout_s: float = 3600.0


@dataclass
class ResolvedSource:
    kind: str
    location: str


@dataclass
class IngestInput:
    build_id: str
    source: ResolvedSource
    config: dict | None = None


@dataclass
class IngestResult:
    build_id: str
    manifest_digest: str
    size: int
    files: int
    entries: int
    chunks: int
    new_chunks: int  # chunks staged (absent from the store when the build ran)
    new_bytes: int
    ms: int


@dataclass
class StoreResult:
    manifest_digest: str
    committed_chunks: int
    committed_bytes: int
    ms: int


@dataclass
class IngestedAndStored:
    ingest: IngestResult
    store: StoreResult


@dataclass
class RegisterInput:
    source: str
    source_kind: str
    ingest: IngestResult
    timings_ms: dict[str, int] = field(default_factory=dict)


@dataclass
class RegisterResult:
    digest: str
    created: bool
    ms: int


@dataclass
class BuildImageResult:
    digest: str
    created: bool  # False when the image was already registered
    size: int
    files: int
    chunks: int
    new_chunks: int
    new_bytes: int
    timings_ms: dict[str, int]


QUICK = dict(start_to_close_timeout=timedelta(minutes=2), retry_policy=RETRY)  # registry-only activities


def long_step(inp) -> dict:
    """A build step's activity options: its build's activity and heartbeat timeouts (``inp``: the build's input)."""
    return dict(start_to_close_timeout=timedelta(seconds=inp.activity_timeout_s),
                heartbeat_timeout=timedelta(seconds=inp.heartbeat_timeout_s), retry_policy=RETRY)


class Staged:
    """A build workflow whose current stage can be queried (Temporal UI's "Queries" tab, `current_stage`)."""

    def __init__(self) -> None:
        self.stage = "pending"

    @workflow.query
    def current_stage(self) -> str:
        return self.stage


@workflow.defn(name="BuildImage")
class BuildImage(Staged):
    @workflow.run
    async def run(self, inp: BuildImageInput) -> BuildImageResult:
        build_id = workflow.info().workflow_id
        quick = QUICK
        long = long_step(inp)

        self.stage = "resolve"
        src = await workflow.execute_activity("resolve_source", inp.source, result_type=ResolvedSource, **quick)
        self.stage = "ingest"
        if workflow.patched("ingest-and-store-on-one-worker"):  # the staging area is on the worker's own disk:
            # with several build workers, a store_image of its own could run where that area is not
            both = await workflow.execute_activity("ingest_and_store_image", IngestInput(build_id, src, inp.config),
                                                   result_type=IngestedAndStored, **long)
            ing, stored = both.ingest, both.store
        else:
            ing = await workflow.execute_activity(
                "ingest_image", IngestInput(build_id, src, inp.config), result_type=IngestResult, **long)
            self.stage = "store"
            stored = await workflow.execute_activity("store_image", ing, result_type=StoreResult, **long)
        timings = {"ingest": ing.ms, "store": stored.ms}
        self.stage = "register"
        reg = await workflow.execute_activity(  # as long as a build step: it asks S3 for every chunk (only the
            # id and type of an activity are checked on replay, so its timeouts may change)
            "register_image", RegisterInput(inp.source, src.kind, ing, timings), result_type=RegisterResult, **long)
        timings["register"] = reg.ms
        self.stage = "done"
        return BuildImageResult(
            digest=reg.digest, created=reg.created, size=ing.size, files=ing.files, chunks=ing.chunks,
            new_chunks=stored.committed_chunks, new_bytes=stored.committed_bytes, timings_ms=timings)
