"""BuildImage end to end: real Temporal dev server, real worker, real store and registry, the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import activity_attempts, cfg_env, end_workflows, running_worker
from s3server import s3server  # noqa: F401  (pytest fixture)
from tarutil import docker_archive, layer, member
from test_ingest import make_fancy_tree, snapshot_stats
from thaw.imagefs.manifest import ImageManifest
from thaw.imagefs.materialize import materialize
from thaw.imagefs.store import ChunkStore
from thaw.registry import images


def build_json(thaw_cli, source) -> dict:
    return json.loads(thaw_cli("build", "image", str(source), "--json").output)


def test_directory_build_round_trips_through_the_cli(cfg, worker, thaw_cli, tmp_path):
    src = make_fancy_tree(tmp_path / "src")
    res = build_json(thaw_cli, src)
    assert res["created"] and len(res["digest"]) == 64
    assert res["ui"].startswith(cfg.temporal_ui_url) and res["workflow_id"] in res["ui"]
    assert set(res["timings_ms"]) == {"ingest", "store", "register"}

    out = tmp_path / "out"
    thaw_cli("images", "export", res["digest"][:12], str(out))
    diff = subprocess.run(["diff", "-r", "--no-dereference", src, out], capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout
    assert snapshot_stats(src) == snapshot_stats(out)

    listed = thaw_cli("images", "ls").output
    assert res["digest"][:16] in listed
    shown = json.loads(thaw_cli("images", "show", res["digest"][:10], "--json").output)
    assert shown["digest"] == res["digest"] and shown["files"] == res["files"] and shown["source"] == str(src)


def test_a_build_id_reused_for_another_source_builds_that_source(cfg, worker, thaw_cli, tmp_path):
    """A build that stopped after its ingest leaves its staging area (with the ingest's result) under its id;
    a later build given the same --id but another source must ingest that source, not return the old one."""
    from temporalio.testing import ActivityEnvironment

    from thaw.activities.build_image import BuildActivities
    from thaw.workflows.build_image import IngestInput, ResolvedSource

    a, b = make_fancy_tree(tmp_path / "a"), tmp_path / "b"
    b.mkdir()
    (b / "only-in-b").write_text("b")
    left = ActivityEnvironment().run(BuildActivities(cfg).ingest_image,
                                     IngestInput("img-reused", ResolvedSource("dir", str(a))))
    res = json.loads(thaw_cli("build", "image", str(b), "--id", "img-reused", "--json").output)
    assert res["digest"] != left.manifest_digest
    out = tmp_path / "out"
    thaw_cli("images", "export", res["digest"][:12], str(out))
    assert sorted(p.name for p in out.iterdir()) == ["only-in-b"]
    # the same source, changed since (a registry tag that moved): a new run of the id reads it again
    left = ActivityEnvironment().run(BuildActivities(cfg).ingest_image,
                                     IngestInput("img-moved", ResolvedSource("dir", str(b))))
    (b / "only-in-b").write_text("b, moved on")
    res = json.loads(thaw_cli("build", "image", str(b), "--id", "img-moved", "--json").output)
    assert res["digest"] != left.manifest_digest
    thaw_cli("images", "export", res["digest"][:12], str(tmp_path / "out2"))
    assert (tmp_path / "out2" / "only-in-b").read_text() == "b, moved on"


def test_second_build_stores_nothing_new_and_registers_once(cfg, worker, thaw_cli, tmp_path):
    src = make_fancy_tree(tmp_path / "src")
    first = build_json(thaw_cli, src)
    objects_after_first = ChunkStore.open(cfg).usage()
    second = build_json(thaw_cli, src)
    assert first["digest"] == second["digest"]
    assert first["new_chunks"] > 0 and first["new_bytes"] > 5 << 20
    assert (second["new_chunks"], second["new_bytes"], second["created"]) == (0, 0, False)
    assert ChunkStore.open(cfg).usage() == objects_after_first
    assert len(images.list_all(cfg.registry_url)) == 1
    assert not any((cfg.store_dir / "staging").iterdir())


def test_same_content_from_another_source_shares_chunks(cfg, worker, thaw_cli, tmp_path):
    payload = os.urandom(3 << 20)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.bin").write_bytes(payload)
    build_json(thaw_cli, tmp_path / "a")
    archive = docker_archive(tmp_path / "img.tar", [layer(member("weights", "dir"),
                                                          member("weights/model.bin", data=payload))],
                             {"Cmd": ["python3", "serve.py"], "Env": ["A=1"]})
    res = build_json(thaw_cli, f"docker-archive:{archive}")
    # builds cut container images at image_chunk_size (1 MiB): three chunks, all stored by the first build
    assert cfg.image_chunk_size == 1 << 20 and res["chunks"] == 3 and res["new_chunks"] == 0
    assert json.loads(thaw_cli("images", "show", res["digest"], "--json").output)["config"] == {
        "Cmd": ["python3", "serve.py"], "Env": ["A=1"]}


@pytest.mark.parametrize("case", ["dotdot", "symlink-escape", "device"])
def test_hostile_archive_fails_with_one_line_and_stores_nothing(cfg, worker, thaw_cli, tmp_path, case):
    good = layer(member("ok", data=os.urandom(100_000)))
    bad = {"dotdot": layer(member("../../etc/cron.d/evil", data=b"* * * * * root sh")),
           "symlink-escape": layer(member("x", "sym", link="../../../root")),
           "device": layer(member("dev", "dir"), member("dev/mem", "chr", devmajor=1, devminor=1))}[case]
    archive = docker_archive(tmp_path / "bad.tar", [good, bad])
    res = thaw_cli("build", "image", f"docker-archive:{archive}", ok=False)
    assert res.exit_code == 1
    err_lines = [l for l in res.output.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1 and "failed" in err_lines[0], res.output
    assert ChunkStore.open(cfg).usage() == (0, 0)  # the good layer's chunk never got a final name
    assert not any((cfg.store_dir / "staging").iterdir())
    assert images.list_all(cfg.registry_url) == []


def test_a_source_path_is_sent_absolute_even_when_missing_here(tmp_path, monkeypatch):
    """The worker resolves what the CLI sends in its own directory: `./rootfs` typed where there is none must
    reach it as this directory's (and fail there), not as the worker's ./rootfs."""
    from thaw.cli import _absolute_source

    monkeypatch.chdir(tmp_path)
    for given, sent in (("./rootfs", tmp_path / "rootfs"), ("../x", tmp_path / ".." / "x"), (".", tmp_path),
                        ("~/img", Path.home() / "img"), ("dir:sub", f"dir:{tmp_path / 'sub'}")):
        assert _absolute_source(given) == str(sent), given
    for ref in ("127.0.0.1:5000/thaw/minilm:1", "docker://debian:12", "rootfs"):  # registry refs (or not paths)
        assert _absolute_source(ref) == ref
    (tmp_path / "rootfs").mkdir()
    assert _absolute_source("rootfs") == str(tmp_path / "rootfs")  # a bare name that exists here is a path


def test_user_errors_are_one_line(cfg, worker, thaw_cli, tmp_path):
    res = thaw_cli("build", "image", f"dir:{tmp_path / 'nope'}", ok=False)
    assert res.exit_code == 1 and res.output.count("\n") <= 2 and "nope" in res.output
    res = thaw_cli("images", "show", "deadbeef", ok=False)
    assert res.exit_code == 1 and "no image deadbeef" in res.output
    for bad in ("../x", ".hidden", "a/b"):  # a build id names a directory on the worker and the host
        res = thaw_cli("build", "image", str(tmp_path), "--id", bad, ok=False)
        assert res.exit_code == 1 and f"--id {bad!r}: letters, digits" in res.output, res.output
    res = thaw_cli("images", "show", "xyz", ok=False)
    assert res.exit_code == 1 and "not an image digest" in res.output
    (tmp_path / "src").mkdir()
    (tmp_path / "config.json").write_text('{"Cmd": "python3 app.py"}')  # would run "p" with args "y", "t", ...
    res = thaw_cli("build", "image", str(tmp_path / "src"), "--config", str(tmp_path / "config.json"), ok=False)
    assert res.exit_code == 1 and "Cmd: want a list of strings" in res.output and res.output.count("\n") == 1
    assert images.list_all(cfg.registry_url) == []


def test_cli_says_when_temporal_is_down(tmp_path):
    from click.testing import CliRunner

    from thaw.cli import cli

    res = CliRunner().invoke(cli, ["--state-dir", str(tmp_path / "s"), "--temporal-address", "127.0.0.1:1",
                                   "build", "image", str(tmp_path)])
    assert res.exit_code == 1 and "cannot reach Temporal at 127.0.0.1:1 (`thaw up` starts one" in res.output
    assert res.output.endswith("--temporal-address): Connection refused\n"), res.output  # not the transport's dump


def _worker_proc(cfg) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "thaw", "worker"], env={**os.environ, **cfg_env(cfg)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_build_survives_a_killed_worker_and_registers_once(cfg, tmp_path):
    """SIGKILL the worker mid-ingest; the heartbeat times out, a fresh worker retries, one image results."""
    from temporalio.client import Client

    from thaw.workflows.build_image import BuildImage, BuildImageInput

    src = tmp_path / "src"
    src.mkdir()
    with open(src / "zeros.img", "wb") as f:  # sparse: hashing 6 GiB takes seconds, stores one chunk
        f.truncate(6 << 30)
    (src / "real.bin").write_bytes(os.urandom(1 << 20))

    async def go():
        client = await Client.connect(cfg.temporal_address)
        first = _worker_proc(cfg)
        try:
            handle = await client.start_workflow(BuildImage.run, BuildImageInput(str(src), heartbeat_timeout_s=2),
                                                 id=f"kill-{uuid.uuid4().hex[:8]}", task_queue=cfg.build_task_queue)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # wait for ingest progress before killing
                desc = await handle.describe()
                if any(pa.heartbeat_details.payloads for pa in desc.raw_description.pending_activities):
                    break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("ingest never reported progress")
        finally:
            os.kill(first.pid, signal.SIGKILL)  # on purpose, or because the test failed
            first.wait()
        second = _worker_proc(cfg)
        try:
            result = await asyncio.wait_for(handle.result(), 120)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
        return result, handle.id

    result, wid = asyncio.run(go())
    attempts = activity_attempts(cfg, wid, "ingest_and_store_image")
    assert max(attempts) >= 2, f"the ingest was never retried: {attempts}"
    assert len(images.list_all(cfg.registry_url)) == 1
    assert images.get(cfg.registry_url, result.digest).size == (6 << 30) + (1 << 20)
    assert ChunkStore.open(cfg).usage()[0] == 3  # zero chunk + random chunk + manifest, once each
    assert not any((cfg.store_dir / "staging").iterdir())


def test_build_workers_on_two_machines_build_every_image(cfg, s3server, tmp_path):
    """Two build workers share the task queue, the registry and S3, not their disks. The ingest stages chunks
    on the disk of the worker that runs it, so they must be stored from there: every build succeeds, and every
    image is whole in S3."""
    from temporalio.client import Client

    from thaw.runtime.worker import build_worker
    from thaw.workflows.build_image import BuildImage, BuildImageInput

    shared = {**s3server.settings(), "db_url": cfg.registry_url}
    machines = [cfg.model_copy(update={"state_dir": tmp_path / m, **shared}) for m in ("a", "b")]
    sources = []
    for i in range(6):
        sources.append(tmp_path / f"src{i}")
        sources[-1].mkdir()
        (sources[-1] / "f.bin").write_bytes(os.urandom(300_000 + i))

    async def go():
        client = await Client.connect(cfg.temporal_address)
        return await asyncio.gather(*(client.execute_workflow(
            BuildImage.run, BuildImageInput(str(src)), id=f"two-{uuid.uuid4().hex[:8]}",
            task_queue=cfg.build_task_queue) for src in sources))

    with running_worker(machines[0], lambda c, ex: build_worker(c, machines[0], ex)), \
            running_worker(machines[1], lambda c, ex: build_worker(c, machines[1], ex)):
        results = asyncio.run(go())
    assert len(images.list_all(cfg.registry_url)) == 6
    third = ChunkStore.open(cfg.model_copy(update={"state_dir": tmp_path / "c", **shared}))  # S3 only
    for res, src in zip(results, sources):
        out = materialize(ImageManifest.load(third, res.digest), third, tmp_path / "out" / res.digest[:12])
        assert (out / "f.bin").read_bytes() == (src / "f.bin").read_bytes()


def test_a_build_that_no_worker_polls_for_says_so(cfg, tmp_path):
    """No worker runs (the stack is down, or another task queue is set): the command says so instead of waiting
    without a word."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("x")
    proc = subprocess.Popen(["thaw", "build", "image", str(tmp_path / "src")], env={**os.environ, **cfg_env(cfg)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        time.sleep(8)
    finally:
        proc.kill()
        err = proc.communicate(timeout=30)[1]
        end_workflows(cfg, grace_s=0)
    assert f"warning: no worker polls task queue '{cfg.build_task_queue}'" in err, err


def test_a_full_disk_fails_a_build_at_once_and_registers_nothing(cfg, thaw_cli, tmp_path):
    """The store on a 4 MiB file system, an 8 MiB image: the ingest fails at its first try, saying where the disk
    is full and what frees space, instead of retries that only fill it again; nothing is registered, and the same
    build succeeds once there is room."""
    import re

    from thaw.runtime.worker import build_worker

    small, src = tmp_path / "small", tmp_path / "src"
    small.mkdir()
    src.mkdir()
    (src / "data.bin").write_bytes(os.urandom(8 << 20))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        on_small = cfg.model_copy(update={"store_path": small / "store"})
        with running_worker(on_small, lambda client, ex: build_worker(client, on_small, ex)):
            res = thaw_cli("build", "image", str(src), ok=False)
            assert res.exit_code == 1 and res.output.count("\n") <= 2, res.output
            assert (f"No space left on device on host {cfg.host_id}: its store is {small / 'store'}" in res.output
                    and "`thaw gc` drops store objects" in res.output), res.output
            wid = re.search(r"/workflows/(build-image-[0-9a-f]+)/", res.output)[1]
            assert activity_attempts(cfg, wid, "ingest_and_store_image") == [1]
            assert images.list_all(cfg.registry_url) == []
            subprocess.run(["mount", "-o", "remount,size=64m", str(small)], check=True)
            digest = build_json(thaw_cli, str(src))["digest"]
            assert [i.digest for i in images.list_all(cfg.registry_url)] == [digest]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


@pytest.mark.parametrize("why, again", [
    (dict(cancel_requested=True), False),  # the workflow asked: the build ends, its staging goes
    (dict(not_found=True), True),  # the server no longer knows this attempt: the next may use the staging now
    (dict(timed_out=True), True),  # these run again: a finished ingest's staging is kept for the next attempt
    (dict(worker_shutdown=True), True),
    (dict(paused=True), True),
])
def test_a_cancel_is_final_only_when_temporal_does_not_retry(why, again):
    """The ingest-and-store activity drops its staging area (the image's new chunks) only when Temporal will not
    run it again: every cancel counted as final, so a timed-out or shut-down attempt threw away a finished
    ingest and each retry re-read and re-chunked the whole source."""
    from temporalio.activity import ActivityCancellationDetails
    from temporalio.exceptions import CancelledError
    from temporalio.testing import ActivityEnvironment

    from thaw.activities.build_image import retried

    env = ActivityEnvironment()

    def attempt():
        try:
            env.cancel(ActivityCancellationDetails(**why))  # raised in this thread, as in a sync activity
        except CancelledError as e:
            return retried(e)
    assert env.run(attempt) is again
    assert ActivityEnvironment().run(lambda: retried(RuntimeError("S3 down"))) is True  # and errors as before
