"""Registry tables. Rows refer to store digests; a row is written only after its objects are durable.

Images now; snapshots (with their compatibility key), deployments, hosts and replicas join this module
as the snapshot and runtime features land.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Image(SQLModel, table=True):
    digest: str = Field(primary_key=True, max_length=64)  # blake3 of the image manifest
    source: str  # what the user asked to build (first registration wins)
    source_kind: str
    created_at: datetime = Field(default_factory=utcnow)
    size: int  # file bytes, each inode once
    files: int
    entries: int
    chunks: int
    new_chunks: int  # chunks this build added to the store
    new_bytes: int
    build_id: str | None = None  # Temporal workflow id
    config: dict = Field(default_factory=dict, sa_column=Column(JSON))  # Cmd, Env, ExposedPorts...
    timings_ms: dict = Field(default_factory=dict, sa_column=Column(JSON))  # stage -> milliseconds


class Snapshot(SQLModel, table=True):
    """A checkpointed, verified model process: CRIU image files as chunks in the store, plus what restores need."""

    digest: str = Field(primary_key=True, max_length=64)  # blake3 of the snapshot's file manifest
    image_digest: str = Field(index=True, max_length=64)
    compat_key: str = Field(index=True)  # hash of the host facts a restore depends on (see thaw.snapshot.compat)
    host_facts: dict = Field(default_factory=dict, sa_column=Column(JSON))  # facts of the host that took it
    spec: dict = Field(default_factory=dict, sa_column=Column(JSON))  # cmd, env, port, health, ...
    golden_request: dict = Field(default_factory=dict, sa_column=Column(JSON))  # method, path, body (base64)
    golden_digest: str  # blake3 of the golden answer, replayed on every restore
    size: int  # bytes of CRIU image files
    files: int
    new_bytes: int
    build_id: str | None = None
    host_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    timings_ms: dict = Field(default_factory=dict, sa_column=Column(JSON))


class Host(SQLModel, table=True):
    """A host agent: its own Temporal task queue and the facts that decide which snapshots it can restore."""

    id: str = Field(primary_key=True)
    task_queue: str
    facts: dict = Field(default_factory=dict, sa_column=Column(JSON))
    started_at: datetime = Field(default_factory=utcnow)
    heartbeat_at: datetime = Field(default_factory=utcnow)
    pid: int | None = None
    reserved_for: str | None = Field(default=None, index=True)  # deployment keeping it as an idle buffer host
    capacity: int = 4  # replicas it may run


class RestoreEvent(SQLModel, table=True):
    """One replica start: restored from a snapshot, or cold-booted because the snapshot could not be used."""

    id: int | None = Field(default=None, primary_key=True)
    snapshot_digest: str = Field(index=True, max_length=64)
    host_id: str
    replica: str = Field(index=True)  # `thaw replicas logs` of one that ended
    outcome: str  # "restored" | "cold-boot"
    deployment: str | None = Field(default=None, index=True)
    reason: str = ""  # why a fallback happened, with the criu log path where there is one
    timings_ms: dict = Field(default_factory=dict, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)
    golden_ok: bool | None = None  # it answered the golden request as the snapshot did (a cold boot may not)


class Deployment(SQLModel, table=True):
    """A served model: which snapshot, how many replicas, how many idle hosts to keep reserved."""

    name: str = Field(primary_key=True)
    snapshot_digest: str = Field(max_length=64)
    min_replicas: int = 0
    max_replicas: int = 1
    buffer: int = 0
    secrets: list = Field(default_factory=list, sa_column=Column(JSON))
    env: dict | None = Field(default=None, sa_column=Column(JSON))  # delivered after each restore
    ports: list | None = Field(default=None, sa_column=Column(JSON))  # extra replica ports published
    created_at: datetime = Field(default_factory=utcnow)


class Replica(SQLModel, table=True):
    """A replica serving (written by the agent that started it once its health check and replay passed)."""

    id: str = Field(primary_key=True)
    deployment: str = Field(index=True)  # "" for one kept by `thaw restore --keep`
    snapshot_digest: str | None = None
    host_id: str = Field(index=True)
    endpoint: str  # http://host:port reaching the replica's server
    ports: dict | None = Field(default=None, sa_column=Column(JSON))  # extra replica port -> host:port
    outcome: str  # "restored" | "cold-boot"
    created_at: datetime = Field(default_factory=utcnow)


class Lease(SQLModel, table=True):
    """A claim on something all hosts share, held until ``expires`` (epoch seconds) unless renewed: `thaw gc`
    holds "store" while it sweeps, and builds wait for it before they take chunks from the store or register."""

    name: str = Field(primary_key=True)
    holder: str  # who: "gc on HOST pid N"
    since: float
    expires: float
