"""Registry on SQLite and on PostgreSQL: the same sqlmodel code."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from services import wait_until
from thaw.registry import images, snapshots
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


def test_a_snapshot_of_an_image_removed_during_its_build_is_not_registered(tmp_path):
    """`thaw images rm` while a snapshot of the image builds: the image's chunks may go with the next `thaw gc`,
    so a snapshot registered against it could never be restored or cold-booted. Registering it fails instead."""
    _removed_image(f"sqlite:///{tmp_path / 'reg.db'}")


def _removed_image(url: str) -> None:
    from thaw.registry import snapshots
    from thaw.registry.models import Snapshot

    img = images.register(url, _image(uuid.uuid4().hex * 2))[0]
    snap = dict(image_digest=img.digest, compat_key="k", golden_digest="g", size=1, files=1, new_bytes=1)
    first, second = uuid.uuid4().hex * 2, uuid.uuid4().hex * 2
    assert snapshots.register(url, Snapshot(digest=first, **snap))[1]
    with pytest.raises(images.InUse):
        images.remove(url, img.digest)  # while a snapshot of it is registered
    snapshots.remove(url, first, lambda name: False)
    images.remove(url, img.digest)  # the build of a second snapshot is under way now
    with pytest.raises(images.NotFound, match="was removed while its snapshot was built"):
        snapshots.register(url, Snapshot(digest=second, **snap))
    assert snapshots.list_all(url, img.digest) == []


def _snapshots(url: str, *digests: str) -> None:
    from thaw.registry import snapshots
    from thaw.registry.models import Snapshot

    img = images.register(url, _image(uuid.uuid4().hex * 2))[0]
    for d in digests:
        snapshots.register(url, Snapshot(digest=d, image_digest=img.digest, compat_key="k", golden_digest="g",
                                         size=1, files=1, new_bytes=1))


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_a_deploy_of_a_snapshot_being_removed_is_refused(tmp_path, request, db):
    """`thaw snapshots rm` and a `thaw deploy` of that snapshot at once: the deployment must not be left
    pointing at a snapshot that is gone (every start of it would fail). The remove locks the snapshot's row
    first (SQLite: the database's write lock); a deploy then waits for it and is refused. Staged with the
    remove's lock held."""
    from sqlmodel import select

    from thaw.config import Config
    from thaw.registry import deployments
    from thaw.registry.db import session
    from thaw.registry.models import Deployment, Snapshot

    url = (Config(state_dir=tmp_path / "state").registry_url if db == "sqlite"
           else request.getfixturevalue("postgres_url"))
    digest = uuid.uuid4().hex * 2
    _snapshots(url, digest)
    name = f"d{digest[:8]}"
    out = []
    with session(url, write=True) as s:  # what snapshots.remove holds from its first statement to its commit
        row = s.exec(select(Snapshot).where(Snapshot.digest == digest).with_for_update()).first()

        def deploy():
            try:
                out.append(deployments.upsert(url, Deployment(name=name, snapshot_digest=digest)))
            except Exception as e:  # noqa: BLE001
                out.append(e)

        t = threading.Thread(target=deploy)
        t.start()
        t.join(1.0)
        assert out == [], "the deploy went ahead while the snapshot's row was locked for its removal"
        s.delete(row)
        s.commit()
    t.join(30)
    assert isinstance(out[0], images.NotFound) and "was removed meanwhile" in str(out[0]), out
    with pytest.raises(images.NotFound):
        deployments.get(url, name)


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_a_replica_recorded_while_its_snapshot_is_removed_either_holds_it_or_is_refused(
        tmp_path, request, monkeypatch, db):
    """A replica's row is recorded (`add_replica`) just as `thaw snapshots rm` runs: the check that the snapshot
    is registered and the insert are one locked step, so the remove either sees the replica (InUse) or the
    replica is refused. Staged: the recording pauses between its check and its insert while the remove runs."""
    from thaw.config import Config
    from thaw.registry import deployments, queries
    from thaw.registry.models import Replica

    url = (Config(state_dir=tmp_path / "state").registry_url if db == "sqlite"
           else request.getfixturevalue("postgres_url"))
    digest = uuid.uuid4().hex * 2
    _snapshots(url, digest)
    checked, go_on = threading.Event(), threading.Event()
    require = queries.require

    def paused(s, requires):
        require(s, requires)
        checked.set()
        go_on.wait(30)

    monkeypatch.setattr(queries, "require", paused)
    rep = Replica(id=f"r{digest[:8]}", host_id=f"h{digest[:8]}", snapshot_digest=digest, deployment="",
                  endpoint="http://127.0.0.1:1", outcome="restored")
    with ThreadPoolExecutor(2) as pool:
        recorded = pool.submit(deployments.add_replica, url, rep)
        assert checked.wait(30)
        removed = pool.submit(snapshots.remove, url, digest, lambda n: False)
        time.sleep(1.0)
        assert not removed.done(), "the remove went ahead between the replica's check and its insert"
        go_on.set()
        recorded.result(30)
        with pytest.raises(images.InUse, match="kept by `thaw restore --keep`"):
            removed.result(30)
    assert [r.id for r in deployments.replicas(url, host_id=rep.host_id)] == [rep.id]
    assert snapshots.get(url, digest).digest == digest
    deployments.remove_replica(url, rep.id)  # the PostgreSQL database is the module's


def test_snapshots_rm_waits_on_a_silent_temporal_for_a_bounded_time(tmp_path):
    """`thaw snapshots rm` asks Temporal about a deployment's pool inside its transaction; on SQLite every other
    writer (agents' heartbeats, replicas' rows) waits for it, up to SQLite's 30 s busy timeout. A Temporal that
    accepts connections and never answers fails the rm in one line after 10 s, the snapshot stays, and a
    heartbeat written meanwhile goes through."""
    import os
    import socket
    import sys

    from thaw.config import Config
    from thaw.registry import deployments
    from thaw.registry.models import Deployment

    cfg = Config(state_dir=tmp_path / "state")
    url, digest = cfg.registry_url, uuid.uuid4().hex * 2
    _snapshots(url, digest)
    deployments.upsert(url, Deployment(name="web", snapshot_digest=digest))
    snapshots.upsert_host(url, "h1", "q", {}, None, 4)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        env = {**os.environ, "THAW_STATE_DIR": str(cfg.state_dir), "THAW_TEMPORAL_ADDRESS": address}
        t0 = time.monotonic()
        rm = subprocess.Popen([sys.executable, "-m", "thaw", "snapshots", "rm", digest], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(5)  # it holds the write lock by now
        snapshots.heartbeat_host(url, "h1")  # waits for it: "database is locked" after 30 s
        out, err = rm.communicate(timeout=60)
        took = time.monotonic() - t0
    assert rm.returncode == 1 and err.splitlines() == [f"error: Temporal at {address} did not answer within 10 s"], err
    assert took < 25, took
    assert snapshots.get(url, digest).digest == digest


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
    port = line[2]
    try:
        subprocess.run([*psql, f"CREATE ROLE {db} LOGIN PASSWORD '{pw}'"], check=True)
        subprocess.run([*psql, f"CREATE DATABASE {db} OWNER {db}"], check=True)
        yield f"postgresql+psycopg://{db}:{pw}@127.0.0.1:{port}/{db}"
    finally:
        from thaw.registry.db import engine

        engine(f"postgresql+psycopg://{db}:{pw}@127.0.0.1:{port}/{db}").dispose()
        subprocess.run([*psql, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"], check=False)  # pools of other URLs
        subprocess.run([*psql, f"DROP ROLE IF EXISTS {db}"], check=False)
        if was_down:
            subprocess.run(["pg_ctlcluster", "15", "main", "stop"], check=False)


def test_postgres_registry(postgres_url):
    from sqlalchemy import inspect

    from thaw.registry.db import engine

    _exercise(postgres_url)
    columns = {c["name"]: c["type"] for c in inspect(engine(postgres_url)).get_columns("host")}
    assert columns["heartbeat_at"].timezone  # timestamptz: a server whose TimeZone is not UTC reads ages right
    with engine(postgres_url).connect() as conn:  # and so do columns an older sqlmodel made naive
        assert conn.exec_driver_sql("SHOW timezone").scalar() == "UTC"
    _removed_image(postgres_url)  # the code path with PostgreSQL's row locks; the race itself is not staged
    # the user's own session options (here in the URL) are kept beside thaw's UTC: they were replaced by it
    eng = engine(postgres_url + "?options=-c%20statement_timeout%3D4321")
    with eng.connect() as conn:
        assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "4321ms"
        assert conn.exec_driver_sql("SHOW timezone").scalar() == "UTC"
    eng.dispose()  # (the fixture drops the database)


def test_a_host_whose_clock_is_behind_is_judged_by_the_databases_clock(postgres_url, monkeypatch):
    """Agents on several machines write their heartbeats to one PostgreSQL, and gateways, workers and `thaw
    snapshots rm` judge their age: an agent's clock a minute behind made its host look dead at every beat (its
    replicas got no traffic and were replaced). Heartbeats and ages now both read the database's clock."""
    from datetime import timedelta

    from thaw.registry import models
    from thaw.registry.db import session

    real = models.utcnow
    behind = lambda: real() - timedelta(hours=1)  # noqa: E731 - this process plays the agent an hour behind
    monkeypatch.setattr(models, "utcnow", behind)
    monkeypatch.setattr(snapshots, "utcnow", behind, raising=False)  # (what the registry used to read)
    snapshots.upsert_host(postgres_url, "skewed", "q", {}, None, 4)
    snapshots.heartbeat_host(postgres_url, "skewed")
    monkeypatch.undo()  # and now a reader with the right time
    try:
        assert "skewed" in {h.id for h in snapshots.live_hosts(postgres_url, 45)}
        snapshots.heartbeat_host(postgres_url, "skewed", gone=True)
        assert "skewed" not in {h.id for h in snapshots.live_hosts(postgres_url, 45)}
    finally:  # the database is the module's
        with session(postgres_url, write=True) as s:
            s.delete(s.get(models.Host, "skewed"))
            s.commit()


def test_a_sqlite_url_naming_its_driver_gets_the_same_set_up(tmp_path):
    """sqlite+pysqlite:///FILE is the same database as sqlite:///FILE: WAL, and writers that take the lock."""
    from thaw.registry.db import engine

    url = f"sqlite+pysqlite:///{tmp_path / 'reg.db'}"
    snapshots.upsert_host(url, "h", "q", {}, None, 4)
    with engine(url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_gpu_snapshots_are_placed_on_gpu_hosts_only(tmp_path):
    """Placement (DeploymentPool's host check and its in-workflow placement, registry only): a GPU snapshot goes to hosts with the same GPU,
    driver and CUDA; with none free it cold-boots on another GPU host, never on a CPU-only one. A CPU snapshot
    goes anywhere."""
    from thaw.activities.pool import PoolActivities
    from thaw.config import Config
    from thaw.registry import snapshots
    from thaw.registry.models import Snapshot
    from thaw.snapshot import compat
    from thaw.snapshot.cuda import facts_from
    from thaw.workflows.pool import HostsInput, place

    cfg = Config(state_dir=tmp_path / "state")
    url = cfg.registry_url
    cpu = {**compat.host_facts(), "gpu_processes": 0}
    cpu = {k: v for k, v in cpu.items() if not k.startswith("gpu") and k not in ("nvidia_driver", "cuda")}
    h200 = {**cpu, **facts_from(["NVIDIA H200"], ["GPU-1"], "580.159.04", 13000)}
    old_driver = {**cpu, **facts_from(["NVIDIA H200"], ["GPU-2"], "570.86.15", 12080)}
    for host, facts in (("cpu-a", cpu), ("gpu-old", old_driver), ("gpu-a", h200), ("gpu-b", h200)):
        snapshots.upsert_host(url, host, f"q-{host}", facts, None, capacity=1)
    images.register(url, _image("i" * 64))
    for digest, facts in (("a" * 64, h200), ("c" * 64, cpu)):
        snapshots.register(url, Snapshot(digest=digest, image_digest="i" * 64, compat_key=compat.compat_key(facts, "i"),
                                         host_facts=facts, golden_digest="x", size=1, files=1, new_bytes=0))
    acts = PoolActivities(cfg)

    def place_new(snap, count):
        hosts = acts.pool_hosts(HostsInput("d", snap, buffer=0, busy=[])).hosts
        return sorted(h.host_id for h in place(hosts, count, "d", {}))

    assert place_new("a" * 64, 2) == ["gpu-a", "gpu-b"]
    assert place_new("a" * 64, 4) == ["gpu-a", "gpu-b", "gpu-old"]  # a cold boot on the other driver, not on cpu-a
    assert place_new("c" * 64, 4) == ["cpu-a", "gpu-a", "gpu-b", "gpu-old"]
    hosts = acts.pool_hosts(HostsInput("d", "a" * 64, buffer=3, busy=[]))
    assert sorted(hosts.reserved) == ["gpu-a", "gpu-b"]
    slots = {h.host_id: h for h in hosts.hosts}
    # cpu-a is no place for it, but is live: replicas there (of an earlier CPU snapshot) are not lost
    assert sorted(hosts.live) == ["cpu-a", "gpu-a", "gpu-b", "gpu-old"] and sorted(slots) == sorted(hosts.live)[1:]
    assert slots["gpu-a"].reserved_for == "d" and slots["gpu-a"].compatible and not slots["gpu-old"].compatible
    # placement counts this deployment's replicas (running or starting) and everyone else's against capacity
    assert [h.host_id for h in place(hosts.hosts, 3, "d", {"gpu-a": 1})] == ["gpu-b", "gpu-old"]
    assert place([replace(slots["gpu-a"], others=1)], 1, "d", {}) == []
    # a host where a start just failed comes last: others with room first (a cold boot too), then it again
    assert [h.host_id for h in place(hosts.hosts, 1, "d", {}, {"gpu-a"})] == ["gpu-b"]
    assert [h.host_id for h in place(hosts.hosts, 3, "d", {}, {"gpu-a"})] == ["gpu-b", "gpu-old", "gpu-a"]

    from click.testing import CliRunner
    from thaw.cli import cli
    out = CliRunner().invoke(cli, ["--state-dir", str(cfg.state_dir), "hosts", "ls"]).output.splitlines()
    assert out[0].split() == ["HOST", "STATE", "CAP", "RESERVED", "FOR", "GPUS"]
    rows = {line.split()[0]: line for line in out[1:]}
    assert rows["cpu-a"].split()[1:] == ["live", "1", "-", "-"]
    assert rows["gpu-a"].split(None, 4)[1:] == ["live", "1", "d", "1x NVIDIA H200, driver 580.159.04, CUDA 13.0"]


def test_a_pool_whose_snapshot_was_removed_gives_its_buffer_back(tmp_path):
    """An undeploy whose snapshot was removed meanwhile (`thaw snapshots rm` while a deploy of another one waited
    for the undeploy): its host check failed on the missing snapshot and the undeploy retried it for ever, its
    buffer host reserved and the deploy never started. Now no host can run it and the buffer goes back."""
    from thaw.activities.pool import PoolActivities
    from thaw.config import Config
    from thaw.registry import deployments, snapshots
    from thaw.registry.models import Deployment, Snapshot
    from thaw.workflows.pool import HostsInput

    cfg = Config(state_dir=tmp_path / "state")
    url = cfg.registry_url
    snapshots.upsert_host(url, "h1", "q-h1", {}, None, capacity=1)
    images.register(url, _image("i" * 64))
    snapshots.register(url, Snapshot(digest="b" * 64, image_digest="i" * 64, compat_key="k", host_facts={},
                                     golden_digest="x", size=1, files=1, new_bytes=0))
    deployments.upsert(url, Deployment(name="m", snapshot_digest="b" * 64))  # deployed again, with b
    assert deployments.set_reservations(url, "m", ["h1"]) == ["h1"]
    res = PoolActivities(cfg).pool_hosts(HostsInput("m", "a" * 64, buffer=0, busy=[]))  # the pool still runs a
    assert (res.live, res.reserved, res.hosts) == (["h1"], [], [])
    assert {h.id: h.reserved_for for h in snapshots.list_hosts(url)} == {"h1": None}


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_a_host_is_reserved_for_one_deployment_at_a_time(tmp_path, request, db):
    """Two pools that chose the same idle host in the same moment: the first reservation stands, the second
    pool is told which hosts it really holds; a released host can then be reserved by the other."""
    from thaw.config import Config
    from thaw.registry import deployments, snapshots

    from sqlmodel import update

    from thaw.registry.db import session
    from thaw.activities.pool import PoolActivities
    from thaw.registry.models import Deployment, Host, Replica, Snapshot
    from thaw.registry.queries import InUse
    from thaw.workflows.pool import HostsInput

    url = (Config(state_dir=tmp_path / "state").registry_url if db == "sqlite"
           else request.getfixturevalue("postgres_url"))
    for host in ("h1", "h2", "h3"):
        snapshots.upsert_host(url, host, f"q-{host}", {}, None, capacity=1)
    images.register(url, _image("i" * 64))
    for digest in ("a" * 64, "c" * 64):
        snapshots.register(url, Snapshot(digest=digest, image_digest="i" * 64, compat_key="k", host_facts={},
                                         golden_digest="x", size=1, files=1, new_bytes=0))
    for name, digest in (("a", "a" * 64), ("b", "a" * 64), ("c", "c" * 64)):
        deployments.upsert(url, Deployment(name=name, snapshot_digest=digest))
    assert deployments.set_reservations(url, "a", ["h1", "h2"]) == ["h1", "h2"]
    assert deployments.set_reservations(url, "b", ["h2", "h3"]) == ["h3"]
    assert deployments.set_reservations(url, "a", ["h1"]) == ["h1"]  # h2 released
    assert deployments.set_reservations(url, "b", ["h2", "h3"]) == ["h2", "h3"]
    assert deployments.set_reservations(url, "b", []) == []
    assert {h.id: h.reserved_for for h in snapshots.list_hosts(url)} == {"h1": "a", "h2": None, "h3": None}
    # a deployment forgotten with its snapshot (its pool ended without releasing its buffer) holds no host;
    # its replica row on a host that went silent does not keep the snapshot, but one on a live host does
    assert deployments.set_reservations(url, "c", ["h2"]) == ["h2"]
    deployments.add_replica(url, Replica(id="r-dead", deployment="c", snapshot_digest="c" * 64, host_id="h9",
                                         endpoint="http://10.0.0.9:1", outcome="restored"))
    with pytest.raises(InUse, match="1 replica"):
        snapshots.remove(url, "c" * 64, lambda name: False)
    cfg = Config(state_dir=tmp_path / "state", **({"db_url": url} if db == "postgres" else {}))
    assert deployments.serving(cfg, "c") == []
    snapshots.remove(url, "c" * 64, lambda name: False, stale_s=60)
    assert deployments.replicas(url) == []
    assert {h.id: h.reserved_for for h in snapshots.list_hosts(url)} == {"h1": "a", "h2": None, "h3": None}
    with session(url, write=True) as s:  # a reservation left by a deployment row removed some other way
        s.exec(update(Host).where(Host.id == "h3").values(reserved_for="gone"))
        s.commit()
    hosts = PoolActivities(cfg).pool_hosts(HostsInput("b", "a" * 64, buffer=2, busy=[]))
    assert hosts.reserved == ["h2", "h3"]  # h1 is a's
    assert deployments.set_reservations(url, "b", ["h3"]) == ["h3"]
    # a replica of a deployment deployed since with another snapshot, not yet replaced, keeps the one it runs
    snapshots.register(url, Snapshot(digest="d" * 64, image_digest="i" * 64, compat_key="k", host_facts={},
                                     golden_digest="x", size=1, files=1, new_bytes=0))
    deployments.add_replica(url, Replica(id="r-old", deployment="b", snapshot_digest="d" * 64, host_id="h1",
                                         endpoint="http://10.0.0.1:1", outcome="restored"))
    with pytest.raises(InUse, match="1 replica\\(s\\) of 'b', deployed since with another snapshot"):
        snapshots.remove(url, "d" * 64, lambda name: False, stale_s=60)
    deployments.remove_replica(url, "r-old")
    snapshots.remove(url, "d" * 64, lambda name: False)
    # a replica that was starting while its snapshot was removed (no row of it yet to refuse the removal) is not
    # recorded: gc would take the files it reads
    with pytest.raises(images.NotFound, match="snapshot dddddddddddd was removed while replica r-late started"):
        deployments.add_replica(url, Replica(id="r-late", deployment="", snapshot_digest="d" * 64, host_id="h1",
                                             endpoint="http://10.0.0.1:2", outcome="restored"))
    assert deployments.replicas(url) == []


def test_a_registry_file_that_is_not_a_database_or_a_state_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "registry.db").write_text("not a database")
    r = subprocess.run(["thaw", "--state-dir", str(tmp_path), "images", "ls"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stderr == ("error: the registry database cannot be used: file is not a database "
                                              "(THAW_DB_URL / --db-url)\n"), r
    r = subprocess.run(["thaw", "--state-dir", str(tmp_path / "registry.db"), "images", "ls"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and r.stderr == f"error: File exists: {tmp_path / 'registry.db'}\n", r


def test_an_unreachable_registry_database_is_a_one_line_error(tmp_path):
    """A wrong THAW_DB_URL or a database that is down: one line naming the setting, no traceback."""
    r = subprocess.run(["thaw", "--state-dir", str(tmp_path), "--db-url", "postgresql+psycopg://thaw@127.0.0.1:1/x",
                        "images", "ls"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r
    assert r.stderr.startswith("error: the registry database cannot be used: ") and r.stderr.count("\n") == 1
    assert "THAW_DB_URL" in r.stderr


def test_a_damaged_secrets_file_is_a_one_line_error_and_is_kept(tmp_path):
    """`thaw secrets set` must not replace a secrets file it can't read (that would drop every other secret)."""
    from click.testing import CliRunner

    from thaw.cli import cli

    (tmp_path / "secrets.json").write_text('{"API_KEY": "x", ')
    for args in (["secrets", "ls"], ["secrets", "set", "OTHER", "--value", "y"]):
        r = CliRunner().invoke(cli, ["--state-dir", str(tmp_path), *args])
        assert r.exit_code == 1 and r.output.startswith("error: ") and "secrets.json is not a JSON object" in r.output
        assert r.output.count("\n") == 1, r.output
    assert (tmp_path / "secrets.json").read_text() == '{"API_KEY": "x", '


def test_secrets_and_settings_set_at_once_are_all_kept(tmp_path):
    """Each writer reads the file, adds its key and writes it whole: two at once lost one of the keys."""
    from thaw.config import save_settings

    n = 12
    procs = [subprocess.Popen(["thaw", "--state-dir", str(tmp_path), "secrets", "set", f"K{i}", "--value", str(i)],
                              stdout=subprocess.DEVNULL) for i in range(n)]
    with ThreadPoolExecutor(n) as pool:  # and settings (made-up keys: another dir), from threads of this process
        list(pool.map(lambda i: save_settings(tmp_path / "settings", **{f"k{i}": i}), range(n)))
    assert all(p.wait(60) == 0 for p in procs)
    assert json.loads((tmp_path / "secrets.json").read_text()) == {f"K{i}": str(i) for i in range(n)}
    saved = (tmp_path / "settings" / "config.toml").read_text()
    assert all(f"k{i} = {i}\n" in saved for i in range(n)), saved


def test_saved_settings_apply_with_a_user_config_file_too(tmp_path, monkeypatch):
    """`thaw up --s3` saves into <state_dir>/config.toml; a THAW_CONFIG file of the user's must not hide it."""
    from thaw.config import load, save_settings

    save_settings(tmp_path, s3_bucket="saved-bucket", temporal_ui_port=8000)
    user = tmp_path / "mine.toml"
    user.write_text("temporal_ui_port = 9999\n")
    monkeypatch.setenv("THAW_CONFIG", str(user))
    cfg = load(state_dir=tmp_path)
    assert (cfg.s3_bucket, cfg.temporal_ui_port) == ("saved-bucket", 9999)


@pytest.mark.parametrize("db_kind", ["sqlite", "postgres"])
def test_processes_opening_a_new_registry_at_once_all_start(tmp_path, request, db_kind):
    """`thaw` commands, agents and workers started together on a new state dir (or a new PostgreSQL database)
    each create the tables they miss: one that looked before another created a table must not fail ("table ...
    already exists", PostgreSQL's duplicate key in pg_type, or SQLite's "database is locked" for a transaction
    that read before another wrote)."""
    import sys

    from sqlmodel import SQLModel

    from thaw.registry.db import engine

    code = ("import sys, time; from thaw.registry import snapshots\n"
            "time.sleep(max(0, float(sys.argv[3]) - time.time()))  # all at once, once imported\n"
            "for _ in range(10): snapshots.upsert_host(sys.argv[1], sys.argv[2], 'q', {}, None, 4)")
    for round_ in range(3):
        url, at = f"sqlite:///{tmp_path / f'reg{round_}.db'}", str(time.time() + 5)
        if db_kind == "postgres":  # the same database each round, without its tables
            url = request.getfixturevalue("postgres_url")
            SQLModel.metadata.drop_all(engine(url))
        procs = [subprocess.Popen([sys.executable, "-c", code, url, f"h{i}", at], stderr=subprocess.PIPE, text=True)
                 for i in range(6)]
        errs = [p.communicate(timeout=120)[1] for p in procs]
        fails = [(p.returncode, err.strip().splitlines()[-3:]) for p, err in zip(procs, errs) if p.returncode]
        assert fails == [], fails
        assert len(snapshots.list_hosts(url)) == 6


@pytest.mark.parametrize("db_kind", ["sqlite", "postgres"])
def test_two_processes_upgrading_one_registry(tmp_path, request, monkeypatch, db_kind):
    """A column added since an older thaw: every process upgrades the tables at start. The one that looked
    second (it saw the column missing, another added it meanwhile) must not fail."""
    from sqlalchemy import inspect as real_inspect, text

    from thaw.registry import db

    url = (f"sqlite:///{tmp_path / 'reg.db'}" if db_kind == "sqlite" else request.getfixturevalue("postgres_url"))
    eng = db.engine(url)
    snapshots.upsert_host(url, "old", "thaw-host-old", {}, None, 4)
    with eng.begin() as conn:
        conn.execute(text('ALTER TABLE "host" DROP COLUMN "capacity"'))
    db._add_missing_columns(eng)  # the first process
    assert "capacity" in {c["name"] for c in real_inspect(eng).get_columns("host")}
    assert snapshots.get_host(url, "old").capacity == 4  # the row from before gets the default

    class Stale:  # what the second process saw before the first added it
        def __init__(self, e):
            self.i = real_inspect(e)

        def get_columns(self, table):
            return [c for c in self.i.get_columns(table) if (table, c["name"]) != ("host", "capacity")]

    monkeypatch.setattr(db, "inspect", Stale)
    db._add_missing_columns(eng)


@pytest.mark.parametrize("db_kind", ["sqlite", "postgres"])
def test_an_older_registry_gains_the_indexes_added_since(tmp_path, request, monkeypatch, caplog, db_kind):
    """An index added since an older thaw (RestoreEvent.replica, for `thaw replicas logs` of an ended replica) is
    made at the next start; create_all makes indexes only with a new table. One that cannot be made (a role that
    does not own the table) is a warning: the registry still works, its lookups scan."""
    from sqlalchemy import inspect as real_inspect, text

    from thaw.registry import db

    url = (f"sqlite:///{tmp_path / 'reg.db'}" if db_kind == "sqlite" else request.getfixturevalue("postgres_url"))

    def indexes():
        return {i["name"]: i["column_names"] for i in real_inspect(db.engine(url)).get_indexes("restoreevent")}

    def restart():  # a new process: its engine upgrades the tables
        db.engine(url).dispose()
        db.engine.cache_clear()
        return db.engine(url)

    assert indexes()["ix_restoreevent_replica"] == ["replica"]
    with db.engine(url).begin() as conn:
        conn.execute(text('DROP INDEX "ix_restoreevent_replica"'))
    monkeypatch.setattr(db, "CreateIndex", lambda index, **kw: text("CREATE INDEX refused ON no_such_table (x)"))
    restart()
    assert "ix_restoreevent_replica" not in indexes()
    assert any("index ix_restoreevent_replica on restoreevent not created" in r.getMessage() for r in caplog.records)
    snapshots.restores(url, replica="r-x")  # still answers
    monkeypatch.undo()
    restart()
    assert indexes()["ix_restoreevent_replica"] == ["replica"]
    restart()  # made already: left be


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_a_first_upsert_that_races_another_updates_the_winners_row(tmp_path, request, monkeypatch, db):
    """Two processes create the same deployment at once (`thaw deploy` and the API): both see no row, both
    insert; the second used to fail with IntegrityError. It now updates the row that won. On SQLite the other
    waits for the first one's commit (its write lock) and then updates that row."""
    from sqlmodel import Session

    from thaw.registry import deployments
    from thaw.registry.models import Deployment

    url = f"sqlite:///{tmp_path / 'reg.db'}" if db == "sqlite" else request.getfixturevalue("postgres_url")
    a, b, name = uuid.uuid4().hex * 2, uuid.uuid4().hex * 2, f"m{uuid.uuid4().hex[:8]}"
    _snapshots(url, a, b)
    real_get, other, raced = Session.get, ThreadPoolExecutor(1), threading.Event()
    waited = []

    def get(self, model, key, *args, **kwargs):
        row = real_get(self, model, key, *args, **kwargs)
        if model is Deployment and row is None and not raced.is_set():  # the other inserts right after our look
            raced.set()
            waited.append(other.submit(deployments.upsert, url, Deployment(name=name, snapshot_digest=a,
                                                                           max_replicas=1)))
            if db == "sqlite":  # it waits for this one's write lock
                time.sleep(1.0)
                assert not waited[0].done(), "the other upsert went ahead while this one held the write lock"
            else:  # it inserts and commits first
                waited[0].result(30)
        return row

    monkeypatch.setattr(Session, "get", get)
    with other:
        deployments.upsert(url, Deployment(name=name, snapshot_digest=b, max_replicas=3))
        waited[0].result(30)
    dep = deployments.get(url, name)
    if db == "sqlite":  # the other one waited, then updated this one's row
        assert (dep.snapshot_digest, dep.max_replicas) == (a, 1)
    else:  # the other one inserted first; this one's insert failed and it updated the row instead
        assert (dep.snapshot_digest, dep.max_replicas) == (b, 3)


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_a_lease_has_one_holder_until_it_is_given_back_or_runs_out(tmp_path, request, db):
    """What keeps `thaw gc` and builds apart: one holder at a time (two takers racing, one wins), renewed while
    held, free once given back or once its holder stops renewing (died)."""
    from thaw.config import Config
    from thaw.registry import leases

    url = (Config(state_dir=tmp_path / "state").registry_url if db == "sqlite"
           else request.getfixturevalue("postgres_url"))
    name = f"store-{uuid.uuid4().hex[:8]}"
    assert leases.current(url, name) is None
    won, lost = [], []
    go = threading.Barrier(4)

    def race(i):
        go.wait()
        try:
            leases.take(url, name, f"gc {i}", ttl_s=1.0)
            won.append(i)
        except leases.LeaseHeld as e:
            lost.append(str(e))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1 and len(lost) == 3, (won, lost)
    assert all(f"gc {won[0]} holds the {name} lease" in m or "changed hands" in m for m in lost), lost
    assert leases.current(url, name).holder == f"gc {won[0]}"
    assert leases.renew(url, name, f"gc {won[0]}", ttl_s=1.0) and not leases.renew(url, name, "someone else")
    time.sleep(1.2)  # not renewed: it ran out, as a dead holder's does
    assert leases.current(url, name) is None
    assert not leases.renew(url, name, f"gc {won[0]}")  # too late: others may have taken it as free already
    leases.take(url, name, "next", ttl_s=30)
    with pytest.raises(leases.LeaseHeld, match=f"next holds the {name} lease"):
        leases.take(url, name, "other")
    seen = []
    threading.Timer(1.5, leases.give_back, (url, name, "next")).start()
    t0 = time.monotonic()
    leases.wait_free(url, name, seen.append, poll_s=0.2)
    assert 1.3 < time.monotonic() - t0 < 10 and seen and seen[0].holder == "next"
    with leases.held(url, name, "block", ttl_s=1.5) as hold:
        time.sleep(2.0)  # renewed meanwhile, every 0.5 s
        assert leases.current(url, name).holder == "block"
        hold.check()
    assert leases.current(url, name) is None
    with leases.held(url, name, "slow", ttl_s=0.6) as hold:  # it ran out (say) and another took it: lost
        leases.give_back(url, name, "slow")
        leases.take(url, name, "other", ttl_s=30)
        time.sleep(0.5)
        with pytest.raises(leases.LeaseHeld, match=f"the {name} lease was lost: it ran out before it was renewed, or"):
            hold.check()
    assert leases.current(url, name).holder == "other"  # not given back by the one that lost it
    leases.give_back(url, name, "other")
    # a renewal stuck on the database (on a lock here; on a dead connection, say, elsewhere): the holder stops
    # before the lease may have run out, and the renewal, once through, finds that it did (not "renewed")
    with leases.held(url, name, "stuck", ttl_s=0.6) as hold:
        with _write_locked(url):
            time.sleep(0.8)
            with pytest.raises(leases.LeaseHeld, match=rf"{name} lease was not renewed for \d+ s: it may have run"):
                hold.check()
        wait_until(lambda: hold.lost, 10, "the stuck renewal to come back")
        assert hold.lost.startswith("it ran out before it was renewed") and leases.current(url, name) is None
    leases.take(url, name, "late", ttl_s=0.5)  # a renewal is judged by the time it ran, not the time it was sent
    with ThreadPoolExecutor(1) as pool, _write_locked(url):
        renewed = pool.submit(leases.renew, url, name, "late", 0.5)
        time.sleep(0.8)
    assert renewed.result(10) is False and leases.current(url, name) is None


@contextlib.contextmanager
def _write_locked(url: str):
    """Writes to the leases wait while in the block, before they read anything: SQLite's write lock, a table lock
    on PostgreSQL (a row lock would make an UPDATE wait after it read the row)."""
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    from sqlalchemy import text

    from thaw.registry.db import engine
    with engine(url).connect() as conn:
        conn.execute(text("LOCK TABLE lease IN EXCLUSIVE MODE"))
        try:
            yield
        finally:
            conn.rollback()
