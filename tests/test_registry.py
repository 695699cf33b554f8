"""Registry on SQLite and on PostgreSQL: the same sqlmodel code."""

from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

from thaw.registry import images
from thaw.registry.models import Image


def _image(digest: str) -> Image:
    return Image(digest=digest, source="dir:/x", source_kind="dir", size=10, files=1, entries=2, chunks=1,
                 new_chunks=1, new_bytes=10, config={"Cmd": ["true"]}, timings_ms={"ingest": 1})


def _exercise(url: str) -> None:
    d = uuid.uuid4().hex + uuid.uuid4().hex
    row, created = images.register(url, _image(d))
    again, created_again = images.register(url, _image(d))
    assert (created, created_again) == (True, False)
    assert again.digest == d and again.config == {"Cmd": ["true"]}
    assert images.get(url, d[:8]).digest == d
    assert d in {r.digest for r in images.list_all(url)}
    with pytest.raises(images.NotFound, match="no image"):
        images.get(url, "0" * 64)


def test_sqlite_registry(tmp_path):
    _exercise(f"sqlite:///{tmp_path / 'reg.db'}")


@pytest.fixture(scope="module")
def postgres_url():
    if not shutil.which("pg_ctlcluster"):
        pytest.skip("PostgreSQL server tools are not installed (apt-get install postgresql)")
    started = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True).stdout
    line = next((l.split() for l in started.splitlines() if l.split()[:2] == ["15", "main"]), None)
    if line is None:
        pytest.skip("no PostgreSQL 15 'main' cluster")
    was_down = line[3] != "online"
    if was_down:
        subprocess.run(["pg_ctlcluster", "15", "main", "start"], check=True)
    db, pw = f"thaw_test_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    psql = ["runuser", "-u", "postgres", "--", "psql", "-q", "-v", "ON_ERROR_STOP=1", "-c"]
    subprocess.run([*psql, f"CREATE ROLE {db} LOGIN PASSWORD '{pw}'"], check=True)
    subprocess.run([*psql, f"CREATE DATABASE {db} OWNER {db}"], check=True)
    port = line[2]
    try:
        yield f"postgresql+psycopg://{db}:{pw}@127.0.0.1:{port}/{db}"
    finally:
        from thaw.registry.db import engine

        engine(f"postgresql+psycopg://{db}:{pw}@127.0.0.1:{port}/{db}").dispose()
        subprocess.run([*psql, f"DROP DATABASE IF EXISTS {db}"], check=False)
        subprocess.run([*psql, f"DROP ROLE IF EXISTS {db}"], check=False)
        if was_down:
            subprocess.run(["pg_ctlcluster", "15", "main", "stop"], check=False)


def test_postgres_registry(postgres_url):
    _exercise(postgres_url)
