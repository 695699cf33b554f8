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
