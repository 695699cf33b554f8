"""BuildSnapshot / RestoreSnapshot end to end: real Temporal, real agent, real CRIU, real store and registry.

The image is a small real root filesystem (Debian's python3.11 + stdlib) with test_criu's stateful server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from conftest import activity_attempts, cfg_env, undeploy
from services import wait_until
from pyroot import python_rootfs
from s3server import s3server  # noqa: F401  (pytest fixture)
from test_criu import SECRET, cpu_cgroup_of, needs_criu
from thaw.config import Config
from thaw.imagefs.manifest import ImageManifest
from thaw.imagefs.mount import mountinfo
from thaw.imagefs.store import ChunkStore, StoreError
from thaw.registry import deployments, images, snapshots
from thaw.snapshot import _linux, criu, sdk
from thaw.snapshot.host import BUILD_LOGS, SnapshotError, use_huge_pages

pytestmark = needs_criu
PORT = 8080
DATA_MB = 20

SERVER = r'''
import hashlib, json, os, random, resource, shutil, signal, socket, sys, threading, time, uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
sys.path.insert(0, "/app")
import thaw_sdk

time.sleep(float(os.environ.get("SLOW_START", "0")))
STATE = random.getrandbits(64)                      # drawn at start: restored replicas share it, cold boots don't
DATA = random.Random(7).randbytes(int(os.environ["DATA_MB"]) << 20)
DIGEST = hashlib.sha256(DATA).hexdigest()           # the golden answer: the same in every correct process
seen = {}
SHM = hashlib.sha256(b"shm").digest() * (int(os.environ.get("SHM_MB", "0")) << 15)  # SHM_MB MiB
if SHM:  # shared memory of its own making, as torch.multiprocessing's or NCCL's
    with open("/dev/shm/blob", "wb") as f:
        f.write(SHM)
if os.environ.get("WRITES"):  # state on disk, made at start: a log kept open, a cache, a file of the image gone,
    os.makedirs("/var/log/app", exist_ok=True)  # a directory of the image replaced, a unix socket
    LOG = open("/var/log/app/server.log", "a")
    LOG.write("started\n")
    LOG.flush()
    os.makedirs("/root/.cache", exist_ok=True)
    with open("/root/.cache/blob", "wb") as f:
        f.write(DATA[:1 << 20])
    os.remove("/app/gone.txt")
    shutil.rmtree("/app/dir")
    os.mkdir("/app/dir")
    open("/app/dir/new", "w").close()
    CONTROL = socket.socket(socket.AF_UNIX)
    CONTROL.bind("/app/control.sock")
    CONTROL.listen()

@thaw_sdk.on_before_snapshot
def before():
    if os.environ.get("FAIL_BEFORE_SNAPSHOT"):
        raise RuntimeError("cannot get ready")
    seen["before_snapshot"] = seen.get("before_snapshot", 0) + 1

@thaw_sdk.on_after_restore
def reread(env):
    if os.environ.get("FAIL_AFTER_RESTORE"):
        raise RuntimeError("cannot re-read")
    seen["secret"] = os.environ.get("API_KEY")
    print(f"after restore {thaw_sdk.restore_id}", flush=True)

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if os.environ.get("SDK") != "0" and thaw_sdk.handle(self):  # SDK=0: a server without thaw's hooks
            return
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/health":
            return self.send_error(500) if seen.get("sick") else self.reply({"ok": True})
        if self.path == "/sick":  # from now on the health check answers 500
            seen["sick"] = True
            return self.reply({"sick": True})
        if self.path == "/answer-stable":
            return self.reply({"digest": DIGEST, "data_mb": len(DATA) >> 20, "pid": os.getpid()})
        if self.path == "/answer-changing":  # as OpenAI-style servers answer: an id and times of each request
            return self.reply({"digest": DIGEST, "id": uuid.uuid4().hex, "created": time.time(),
                               "usage": [{"t": time.monotonic()}, {"t": time.monotonic()}]})
        if self.path == "/answer-second":  # a time in whole seconds: the same in two requests close together
            return self.reply({"digest": DIGEST, "created": int(time.time())})
        if self.path == "/state":
            return self.reply({"state": STATE, "before_snapshot": seen.get("before_snapshot", 0)})
        if self.path == "/secret":
            return self.reply({"secret": seen.get("secret") or os.environ.get("API_KEY")})
        if self.path.startswith("/env/"):
            return self.reply({"value": os.environ.get(self.path[5:]), "port": self.server.server_port})
        if self.path == "/files":
            LOG.write("files\n")
            LOG.flush()
            with open("/root/.cache/blob", "rb") as f:
                blob = f.read() == DATA[:1 << 20]
            return self.reply({"log": LOG.tell(), "blob": blob, "gone": os.path.exists("/app/gone.txt"),
                               "dir": sorted(os.listdir("/app/dir")), "sock": os.path.exists("/app/control.sock")})
        if self.path == "/shm":
            st = os.statvfs("/dev/shm")
            with open("/dev/shm/blob", "rb") as f:
                blob = f.read() == SHM
            return self.reply({"size": st.f_blocks * st.f_frsize, "blob": blob})
        if self.path == "/names":  # what Docker's /etc/hosts and /etc/hostname give a server
            names = {}
            for name in ("localhost", socket.gethostname()):
                try:
                    names[name] = socket.getaddrinfo(name, 80, socket.AF_INET)[0][4][0]
                except OSError as e:
                    names[name] = str(e)
            return self.reply({**names, "hostname": open("/etc/hostname").read()})
        if self.path == "/nofile":
            return self.reply(resource.getrlimit(resource.RLIMIT_NOFILE))
        if self.path.startswith("/slow?"):  # an answer that takes this many seconds
            time.sleep(float(self.path.partition("?")[2]))
            return self.reply({"slow": True})
        self.send_error(404)

    do_POST = do_GET

side = HTTPServer(("127.0.0.1", int(os.environ["PORT"]) + 1), Handler)  # a second port, e.g. for metrics
threading.Thread(target=side.serve_forever, daemon=True).start()
server = HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
# a stop (SIGTERM, as `docker stop` sends) lets the request under way finish; the server then exits
signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
thaw_sdk.mark_ready()
server.serve_forever(poll_interval=0.1)
'''


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    return python_rootfs(tmp_path_factory.mktemp("img") / "rootfs",
                         {"server.py": SERVER, "thaw_sdk.py": Path(sdk.__file__).read_text(), "gone.txt": "",
                          "dir/old": ""})


def image_config(tmp_path, data_mb=DATA_MB, port=PORT, exposed=(), **env) -> Path:
    f = tmp_path / "image-config.json"
    f.write_text(json.dumps({"Cmd": ["python3", "-I", "/app/server.py"], "WorkingDir": "/app",
                             "Env": ["PATH=/usr/bin", f"PORT={port}", f"DATA_MB={data_mb}", "MARKER=m",
                                     *(f"{k}={v}" for k, v in env.items())],
                             **({"ExposedPorts": {p: {} for p in exposed}} if exposed else {})}))
    return f


def build_snapshot(thaw_cli, image, tmp_path, *extra, ok=True, port=PORT):
    golden = tmp_path / "golden.json"
    golden.write_text("{}")
    res = thaw_cli("build", "snapshot", image, *(("--port", str(port)) if port else ()), "--health", "/health",
                   "--golden", str(golden), "--golden-path", "/answer-stable", *extra, "--json", ok=ok)
    return json.loads(res.output) if ok else res


def recorded_on_another_criu(cfg, digest):
    """Make snapshot ``digest`` look built with another CRIU: this host is then incompatible, so its restores
    here are fallback cold boots."""
    with snapshots.session(cfg.registry_url, write=True) as s:
        row = s.get(snapshots.Snapshot, digest)
        row.host_facts = {**row.host_facts, "criu": "3.0"}
        s.add(row)
        s.commit()


def restore(thaw_cli, digest, *extra):
    return json.loads(thaw_cli("restore", digest, *extra, "--json").output)


@pytest.fixture
def image(cfg, worker, thaw_cli, rootfs, tmp_path):
    res = thaw_cli("build", "image", str(rootfs), "--config", str(image_config(tmp_path)), "--json")
    return json.loads(res.output)["digest"]


def test_snapshot_restores_four_replicas_with_identical_answers_and_secrets_after_restore(
        cfg, worker, agent, thaw_cli, image, tmp_path):
    thaw_cli("secrets", "set", "API_KEY", "--value", SECRET)
    snap = build_snapshot(thaw_cli, image, tmp_path, "--secret", "API_KEY")
    assert snap["created"] and snap["image_digest"] == image and snap["host_id"] == cfg.host_id
    assert list((cfg.work_dir / "builds").iterdir()) == []  # the host dropped the build's dir once registered
    assert {"cold_boot", "golden", "dump", "store", "verify_criu", "verify_replay", "register"} <= set(
        snap["timings_ms"])
    row = snapshots.get(cfg.registry_url, snap["digest"][:8])
    assert row.spec["secrets"] == ["API_KEY"] and "API_KEY" not in row.spec["env"]
    assert snap["digest"][:16] in thaw_cli("snapshots", "ls").output
    token = row.spec["hook_token"]  # drawn for this build; the hosts send it with the SDK's hooks
    for args in (["show", snap["digest"]], ["show", snap["digest"], "--json"], ["ls", "--json"]):
        shown = thaw_cli("snapshots", *args).output
        assert len(token) == 32 and token not in shown and "(hidden)" in shown, args

    # the secret is nowhere in the snapshot's files (the launch env marker is: the search works)
    files = tmp_path / "snapfiles"
    from thaw.imagefs.materialize import materialize
    store = ChunkStore.open(cfg)
    materialize(ImageManifest.load(store, snap["digest"]), store, files)
    grep = lambda s: subprocess.run(["grep", "-rl", s, str(files)], capture_output=True).returncode  # noqa: E731
    assert grep("MARKER=m") == 0 and grep(SECRET) == 1

    out = restore(thaw_cli, snap["digest"], "--replicas", "4", "--keep")
    reps = out["replicas"]
    assert [r["outcome"] for r in reps] == ["restored"] * 4 and all(r["golden_ok"] for r in reps)
    assert {"fetch", "root", "criu", "hooks", "health", "replay", "total"} <= set(reps[0]["timings_ms"])
    answers, states = [], set()
    for r in reps:
        running = agent.serving[r["replica"]]
        status, body = running.replica.http_request("GET", "/answer-stable", port=PORT)
        answers.append(body)
        states.add(running.replica.http_request("GET", "/state", port=PORT)[1])
        status, body = running.replica.http_request("GET", "/secret", port=PORT)
        assert status == 200 and json.loads(body)["secret"] == SECRET  # injected after restore
    assert len(set(answers)) == 1 and json.loads(answers[0])["data_mb"] == DATA_MB
    hook = {"body": b'{"env": {"API_KEY": "stolen"}}', "port": PORT, "content_type": "application/json"}
    assert running.replica.http_request("POST", "/thaw/after-restore", **hook)[0] == 403  # no token: not the host
    assert json.loads(running.replica.http_request("GET", "/secret", port=PORT)[1])["secret"] == SECRET
    assert len(states) == 1, "restored replicas carry the memory of the process that was checkpointed"
    assert json.loads(states.pop())["before_snapshot"] == 1, "the host ran the before-snapshot hook once, then dumped"
    assert len(snapshots.restores(cfg.registry_url, snap["digest"])) == 4
    # the snapshot's memory pages are now locked in RAM on this host (in the background, after the restores)
    wait_until(lambda: snap["digest"] in agent.host.pins.pinned(), 30, "the snapshot's pages pinned")
    assert agent.host.pins.pinned() == [snap["digest"]] and agent.host.pins.pinned_bytes >= DATA_MB << 20
    # the daemon serving the snapshot's files dies: the next restore mounts them again and pins the new mount
    mount = agent.host.mounts[agent.host.snapshot_files(snap["digest"])]
    os.kill(mount.pid, signal.SIGKILL)
    wait_until(lambda: not mount.alive(), 30, "the mount daemon gone")
    (r,) = restore(thaw_cli, snap["digest"])["replicas"]
    assert r["outcome"] == "restored", r
    wait_until(agent.host.pins.pinned, 30, "the new mount's pages pinned")
    files = agent.host.snapshot_files(snap["digest"])
    assert agent.host.pins.pinned() == [snap["digest"]] and agent.host.mounts[files].pid != mount.pid
    dev = os.stat(files).st_dev
    locked = [line.split()[3] for line in open("/proc/self/maps") if f"{files}/pages-" in line]
    assert locked == [f"{os.major(dev):02x}:{os.minor(dev):02x}"], "the pages locked are the new mount's"

    # a second build of the same image + spec checkpoints a new process (its STATE is drawn anew), so it
    # registers a second snapshot next to the first instead of overwriting or reusing it
    again = build_snapshot(thaw_cli, image, tmp_path, "--secret", "API_KEY")
    assert again["created"] and again["digest"] != snap["digest"], again
    assert {s.digest for s in snapshots.list_all(cfg.registry_url, image)} >= {snap["digest"], again["digest"]}


def test_incompatible_host_falls_back_to_cold_boot(cfg, worker, agent, thaw_cli, image, tmp_path):
    snap = build_snapshot(thaw_cli, image, tmp_path)
    recorded_on_another_criu(cfg, snap["digest"])
    (r,) = restore(thaw_cli, snap["digest"])["replicas"]
    assert r["outcome"] == "cold-boot" and "criu 3.0 != " in r["reason"] and r["golden_ok"]
    (ev,) = snapshots.restores(cfg.registry_url, snap["digest"])
    assert ev.outcome == "cold-boot" and "incompatible" in ev.reason and ev.golden_ok is True
    shown = thaw_cli("snapshots", "show", snap["digest"]).output
    assert "cold-boot" in shown and "differs" not in shown
    # a cold boot that answers otherwise is recorded and shown
    with snapshots.session(cfg.registry_url, write=True) as s:
        row = s.get(snapshots.Snapshot, snap["digest"])
        row.golden_digest = "0" * 64
        s.add(row)
        s.commit()
    (r,) = restore(thaw_cli, snap["digest"])["replicas"]
    assert r["outcome"] == "cold-boot" and r["golden_ok"] is False
    assert snapshots.restores(cfg.registry_url, snap["digest"])[0].golden_ok is False
    assert "[its golden answer differs from the snapshot's]" in thaw_cli("snapshots", "show", snap["digest"]).output


def test_a_golden_answer_that_changes_with_each_request_fails_before_the_dump_unless_its_fields_are_ignored(
        cfg, worker, agent, thaw_cli, image):
    """A server's answer carries an id and times of its own (as OpenAI-style ones do): no restore could answer as
    the launch did, so the build fails at the launch and names the fields; left out with --golden-ignore, the
    snapshot restores (a GET here: no --golden body)."""
    args = ("build", "snapshot", image, "--port", str(PORT), "--health", "/health", "--golden-path", "/answer-changing")
    res = thaw_cli(*args, ok=False)
    assert res.exit_code == 1 and res.output.count("\n") <= 2, res.output
    assert "GET /answer-changing differently twice in a row (JSON fields created, id, usage.t)" in res.output
    res = thaw_cli(*args[:-1], "/answer-second", ok=False)  # the launch asks again a second later
    assert res.exit_code == 1 and "differently twice in a row (JSON field created)" in res.output, res.output
    assert snapshots.list_all(cfg.registry_url) == [] and list((cfg.work_dir / "builds").iterdir()) == []
    ignore = ("--golden-ignore", "id", "--golden-ignore", "created", "--golden-ignore", "usage.t")
    snap = json.loads(thaw_cli(*args, *ignore, "--json").output)
    row = snapshots.get(cfg.registry_url, snap["digest"])
    assert (row.golden_request["method"], row.golden_request["ignore"]) == ("GET", ["id", "created", "usage.t"])
    assert [r["outcome"] for r in restore(thaw_cli, snap["digest"], "--replicas", "2")["replicas"]] == ["restored"] * 2
    recorded_on_another_criu(cfg, snap["digest"])  # a cold boot's answer is compared without them too
    (r,) = restore(thaw_cli, snap["digest"])["replicas"]
    assert r["outcome"] == "cold-boot" and r["golden_ok"] is True, r


def test_a_snapshot_built_from_a_source_builds_its_image_first(cfg, worker, agent, thaw_cli, rootfs, tmp_path):
    """`thaw build snapshot SOURCE`: anything but a digest is built with `thaw build image` first (here a
    directory, its command and env given), then snapshotted; a second build finds the image registered."""
    env = ("--env", "PATH=/usr/bin", "--env", f"PORT={PORT}", "--env", f"DATA_MB={DATA_MB}")
    snap = build_snapshot(thaw_cli, str(rootfs), tmp_path, "--cmd", "python3 -I /app/server.py", *env)
    assert snap["created"] and images.get(cfg.registry_url, snap["image_digest"]).source == str(rootfs)
    out = thaw_cli("build", "snapshot", str(rootfs), "--port", str(PORT), "--health", "/health", "--golden-path",
                   "/answer-stable", "--cmd", "python3 -I /app/server.py", *env).output
    assert f"image {snap['image_digest']}" in out and "already registered" in out, out
    assert len(images.list_all(cfg.registry_url)) == 1
    res = thaw_cli("build", "snapshot", str(tmp_path / "nope"), ok=False)  # neither a digest nor a source
    assert res.exit_code == 1 and res.output.count("\n") <= 2 and "nope: no such file" in res.output, res.output


def test_a_build_asking_what_an_older_agent_does_not_apply_is_not_registered(cfg):
    """An agent of before --golden-ignore and --shm-size returns no `applied`: its snapshot would have a raw
    golden digest (every restore on a newer host would cold-boot) or a 64 MiB /dev/shm, so it is refused."""
    from dataclasses import replace

    from temporalio.exceptions import ApplicationError

    from thaw.activities.snapshot import SnapshotActivities
    from thaw.workflows.build_snapshot import (CheckpointResult, Golden, ModelSpec, Plan, RegisterSnapshotInput,
                                               StoredSnapshot)

    plan = Plan("0" * 64, ModelSpec(cmd=["server"], port=PORT), "old", "thaw-host-old")
    ck = CheckpointResult("b", "/nowhere", "d" * 64, 2, {}, "key", {})  # as an older agent's: no `applied`
    stored = StoredSnapshot("5" * 64, 1, 1, 1, 1)
    for golden, spec in ((Golden(ignore=["id"]), plan.spec), (Golden(), replace(plan.spec, shm_bytes=1 << 30))):
        inp = RegisterSnapshotInput("b", replace(plan, spec=spec), golden, ck, stored, {})
        with pytest.raises(ApplicationError, match="host old's agent is older than this build worker"):
            SnapshotActivities(cfg).register_snapshot(inp)
    assert snapshots.list_all(cfg.registry_url) == []


def test_a_snapshot_whose_chunks_left_the_store_before_its_register_step_is_not_registered(cfg, tmp_path):
    """Stored by the host, then a chunk swept (a `thaw gc` that ran between the store and register steps): the
    register step finds it missing, as an image's does, and registers nothing."""
    from temporalio.exceptions import ApplicationError

    from test_registry import _image
    from thaw.activities.snapshot import SnapshotActivities
    from thaw.imagefs.ingest import Limits, ingest_and_commit
    from thaw.imagefs.oci import SourceSpec
    from thaw.workflows.build_snapshot import (CheckpointResult, Golden, ModelSpec, Plan, RegisterSnapshotInput,
                                               StoredSnapshot)

    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "pages-1.img").write_bytes(os.urandom(3 << 20))
    store = ChunkStore.open(cfg)
    manifest, _, _ = ingest_and_commit(SourceSpec("dir", str(dump)), store, "b-snap", Limits.from_config(cfg))
    stats = manifest.stats()
    stored = StoredSnapshot(manifest.digest, stats["size"], stats["files"], 0, 1)
    gone = sorted(manifest.chunk_digests())[0]
    store.local.delete(f"chunks/{gone[:2]}/{gone}")
    image = images.register(cfg.registry_url, _image("0" * 64))[0]  # registered: only the chunk is missing
    plan = Plan(image.digest, ModelSpec(cmd=["server"], port=PORT), "h", "thaw-host-h")
    ck = CheckpointResult("b-snap", "/nowhere", "d" * 64, 2, {}, "key", {}, applied={})
    inp = RegisterSnapshotInput("b-snap", plan, Golden(), ck, stored, {})
    with pytest.raises(ApplicationError, match=f"snapshot {manifest.digest[:12]}: 1 of its chunks missing"):
        SnapshotActivities(cfg).register_snapshot(inp)
    store.local.delete(f"manifests/{manifest.digest[:2]}/{manifest.digest}")
    with pytest.raises(ApplicationError, match=f"manifest {manifest.digest} is not in the store"):
        SnapshotActivities(cfg).register_snapshot(inp)
    assert snapshots.list_all(cfg.registry_url) == []


def test_corrupt_chunk_and_failing_criu_fall_back_with_clear_reasons(cfg, worker, agent, thaw_cli, image, tmp_path,
                                                                     monkeypatch):
    snap = build_snapshot(thaw_cli, image, tmp_path)
    store = ChunkStore.open(cfg)
    manifest = ImageManifest.load(store, snap["digest"])
    pages = max((e for e in manifest.entries if e.chunks), key=lambda e: e.size)
    assert pages.size > cfg.image_chunk_size  # CRIU images are cut at chunk_size (4 MiB), images' files finer
    assert pages.chunks[0][1] == min(pages.size, cfg.chunk_size)
    chunk = store.local.path(f"chunks/{pages.chunks[0][0][:2]}/{pages.chunks[0][0]}")
    assert chunk.exists()
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    agent.host.close()  # as on a host that has not read this snapshot yet (verify left a warm mount here)
    (r,) = restore(thaw_cli, snap["digest"])["replicas"]
    assert r["outcome"] == "cold-boot" and "corrupt" in r["reason"].lower() and r["golden_ok"], r
    assert "chunk " + pages.chunks[0][0][:12] in r["reason"], "the reason names the chunk"

    # repair the store; with the materialized (non-lazy) layout, break the CRIU images in the host's copy:
    # criu fails and its log is named
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    agent.host.close()
    agent.host.cfg = cfg.model_copy(update={"lazy_mounts": False})
    (r,) = restore(thaw_cli, snap["digest"])["replicas"]
    assert r["outcome"] == "restored"
    core = next((cfg.work_dir / "snapshots" / snap["digest"]).glob("core-*.img"))
    core.write_bytes(b"\0" * core.stat().st_size)
    (r,) = restore(thaw_cli, snap["digest"])["replicas"]
    assert r["outcome"] == "cold-boot" and ".log" in r["reason"], r
    (named,) = set(re.findall(r"(/\S+\.log)", r["reason"]))  # the log the reason names is still there
    failed = Path(named).parent  # the failed restore's (its fallback is another replica)
    assert failed.parent == cfg.work_dir / "replica-logs" and "Error" in Path(named).read_text()
    assert not (cfg.work_dir / "replicas" / failed.name).exists(), "the failed restore's own dir is gone"
    out = thaw_cli("replicas", "logs", failed.name, "--host", cfg.host_id).output  # read through its host's agent
    assert f"==> {named} <==" in out and "Error" in out

    # a snapshot tree that cannot be mounted (its daemon failed) is one more reason to cold-boot, not a failure
    from thaw.imagefs.mount import MountError

    def no_mount(*a, **k):
        raise MountError("mount daemon exited (1): fuse: device not found")

    monkeypatch.setattr(agent.host, "trees", no_mount)
    (r,) = restore(thaw_cli, snap["digest"])["replicas"]
    assert r["outcome"] == "cold-boot" and r["reason"].startswith("MountError: mount daemon exited"), r

    for bad in ("../../etc", snap["digest"][:12]):  # digests name directories on the host: only whole ones
        with pytest.raises(StoreError, match="not a blake3 digest"):
            agent.host.image_root(bad)
    # and where the cold boot fails too, the error names both failures (the restore's is often the cause)
    monkeypatch.setattr(agent.host, "image_root", lambda digest: no_mount())
    res = thaw_cli("restore", snap["digest"][:12], ok=False)
    assert res.exit_code == 1 and "restore: MountError: mount daemon exited (1)" in res.output, res.output
    assert "; cold boot: MountError: mount daemon exited (1)" in res.output, res.output


def test_rm_and_gc_free_only_what_nothing_registered_uses(cfg, worker, agent, thaw_cli, image, rootfs, tmp_path):
    """rm is refused while something uses the row; gc deletes only objects no registered manifest reaches and
    that are old enough, never while a build runs; what stays registered still exports byte for byte."""
    import asyncio

    from temporalio.client import Client

    snap = build_snapshot(thaw_cli, image, tmp_path)
    store = ChunkStore.open(cfg)
    snap_chunks = ImageManifest.load(store, snap["digest"]).chunk_digests()
    image_chunks = ImageManifest.load(store, image).chunk_digests()
    only_snap = snap_chunks - image_chunks
    assert only_snap

    def fails(*args, want):
        res = thaw_cli(*args, ok=False)
        assert res.exit_code == 1 and want in res.output and res.output.count("\n") == 1, res.output

    fails("images", "rm", image, want=f"has 1 snapshot(s) ({snap['digest'][:12]})")
    thaw_cli("deploy", "web", "--snapshot", snap["digest"], "--min", "0", "--buffer", "0")
    fails("snapshots", "rm", snap["digest"], want="is deployed as 'web': `thaw undeploy web` first")
    undeploy(cfg, thaw_cli, "web")
    out = thaw_cli("snapshots", "rm", snap["digest"]).output
    assert "removed with its ended deployment(s) web" in out
    assert snapshots.list_all(cfg.registry_url) == [] and snapshots.restores(cfg.registry_url, snap["digest"]) == []

    # a build that no worker picks up stays running: gc waits for it
    async def stuck(terminate=False):
        c = await Client.connect(cfg.temporal_address)
        if terminate:
            return await c.get_workflow_handle("build-image-stuck").terminate()
        await c.start_workflow("BuildImage", id="build-image-stuck", task_queue=cfg.build_task_queue,
                               execution_timeout=__import__("datetime").timedelta(minutes=5))
    asyncio.run(stuck())
    try:
        wait_until(lambda: thaw_cli("gc", ok=False).exit_code == 1, 15, "gc to see the running build")
        fails("gc", want="1 build(s) running (build-image-stuck)")
    finally:
        asyncio.run(stuck(terminate=True))

    def gc(*args):
        return json.loads(thaw_cli("gc", "--json", *args).output)

    local = f"local:{cfg.store_dir}"
    young = gc()  # everything is younger than the default hour
    assert young["deleted"] == {local: []} and young["young"] == len(only_snap) + 1  # + the snapshot's manifest
    dry = gc("--dry-run", "--min-age", "0")
    want = {f"chunks/{d[:2]}/{d}" for d in only_snap} | {f"manifests/{snap['digest'][:2]}/{snap['digest']}"}
    assert set(dry["deleted"][local]) == want and store.has_manifest(snap["digest"])
    done = gc("--min-age", "0")
    assert set(done["deleted"][local]) == want and done["deleted_bytes"] > 0
    assert not store.has_manifest(snap["digest"]) and not any(store.has_chunk(d) for d in only_snap)
    assert all(store.has_chunk(d) for d in image_chunks)
    thaw_cli("images", "export", image, str(tmp_path / "out"))
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(rootfs), str(tmp_path / "out")], capture_output=True)
    assert diff.returncode == 0, diff.stdout[-2000:]

    thaw_cli("images", "rm", image)
    assert gc("--min-age", "0")["deleted"][local] and store.local.usage() == (0, 0)
    fails("images", "rm", image, want="no image")

    # a gc elsewhere holds the store's lease: this one is refused, and a build waits (it would re-use chunks)
    from thaw.registry import leases
    from thaw.workflows.build_image import BuildImageInput

    with leases.held(cfg.registry_url, leases.STORE, "thaw gc on elsewhere (pid 1)"):
        fails("gc", want="another gc is running: thaw gc on elsewhere (pid 1) holds the store lease")
        assert gc("--dry-run")["dry_run"]  # it deletes nothing: it does not take the lease (builds would wait)

    async def build_while_held():
        c = await Client.connect(cfg.temporal_address)
        with leases.held(cfg.registry_url, leases.STORE, "thaw gc on elsewhere (pid 2)"):
            h = await c.start_workflow("BuildImage", BuildImageInput(str(rootfs)), id=f"build-image-{uuid.uuid4().hex}",
                                       task_queue=cfg.build_task_queue)
            await asyncio.sleep(3)
            held = await h.query("current_stage"), (await h.describe()).status.name, images.list_all(cfg.registry_url)
        return held, await asyncio.wait_for(h.result(), 120)

    (stage, status, registered), built = asyncio.run(build_while_held())
    assert (stage, status, registered) == ("ingest", "RUNNING", []), (stage, status, registered)
    assert [r.digest for r in images.list_all(cfg.registry_url)] == [built["digest"]] and store.local.usage()[0]


def test_a_host_with_a_cold_cache_restores_and_cold_boots_from_s3(cfg, worker, agent, thaw_cli, image, s3server,
                                                                  tmp_path):
    """A new host whose only source is S3 (every object of the build uploaded there, compressed where it pays):
    it restores the snapshot (mounts, prefetch, criu, replay) and, as a fallback, cold-boots the image while
    prefetching what the snapshot's own launch read (the boot profile stored with it)."""
    from thaw.snapshot.host import BOOT_PROFILE, PROFILE, HostSnapshots

    snap = build_snapshot(thaw_cli, image, tmp_path)
    row = snapshots.get(cfg.registry_url, snap["digest"]).model_dump()
    assert BOOT_PROFILE in {e.path for e in ImageManifest.load(ChunkStore.open(cfg), snap["digest"]).files()}
    bucket_cfg = s3server.settings()
    build = ChunkStore.open(cfg)
    s3 = ChunkStore.open(Config(state_dir=tmp_path / "uploader", **bucket_cfg)).durable
    for key, _, _ in build.local.entries():
        s3.put(key, build.local.get(key))

    cold = Config(state_dir=tmp_path / "cold", host_id="cold-host", **bucket_cfg)
    host = HostSnapshots(cold)
    try:
        running, ms = host.restore(row, {})  # raises unless the golden answer is byte-identical
        running.stop()
        assert ms["prefetch_chunks"] > 0, ms
        running, ms, same = host.cold_boot(row["image_digest"], row["spec"], {}, row["golden_request"],
                                           row["golden_digest"], row["digest"])
        running.stop()
        assert same and ms["prefetch_chunks"] > 0, ms
    finally:
        host.close()
    assert host.store.durable.stats["gets"] > 0 and host.store.durable.stats["wire_get_bytes"] < \
        host.store.durable.stats["get_bytes"]  # compressed on the wire
    # the restore profile lost from S3: another new host restores without a prefetch (that was an error, and
    # the replica cold-booted)
    (profile,) = [e for e in ImageManifest.load(build, snap["digest"]).files() if e.path == PROFILE]
    for digest, _ in profile.chunks:
        s3.delete(f"chunks/{digest[:2]}/{digest}")
    host = HostSnapshots(Config(state_dir=tmp_path / "cold2", host_id="cold-host-2", **bucket_cfg))
    try:
        running, ms = host.restore(row, {})
        running.stop()
        assert "prefetch_chunks" not in ms and ms["replay"] >= 0, ms
    finally:
        host.close()


def test_unknown_snapshot_and_bad_input_are_one_line_errors(cfg, worker, agent, thaw_cli, image, tmp_path):
    res = thaw_cli("restore", "abcdef123456", ok=False)
    assert res.exit_code == 1 and "no snapshot abcdef123456" in res.output and res.output.count("\n") <= 2
    res = build_snapshot(thaw_cli, "abcdef123456", tmp_path, ok=False)
    assert res.exit_code == 1 and "no image abcdef123456" in res.output
    res = build_snapshot(thaw_cli, image, tmp_path, "--cmd", "python3 /app/nope.py", ok=False)
    assert res.exit_code == 1 and "nope.py" in res.output and res.output.count("\n") <= 2
    launch_log = Path(re.search(r"log (/\S+/launch\.log)", res.output)[1])  # the log the error names stays
    assert launch_log.parent.parent == cfg.work_dir / BUILD_LOGS and "nope.py" in launch_log.read_text(), res.output
    for value in ("nan", "inf", "0", str(8 * 86400)):  # timedelta() in the workflow
        res = build_snapshot(thaw_cli, image, tmp_path, "--ready-timeout", value, ok=False)
        assert res.exit_code == 2 and "--ready-timeout" in res.output, (value, res.output)
    # stored, then refused by verify-by-replay: the secret arrives after a restore only, so the answer differs
    thaw_cli("secrets", "set", "API_KEY", "--value", SECRET)
    res = build_snapshot(thaw_cli, image, tmp_path, "--secret", "API_KEY", "--golden-path", "/secret", ok=False)
    assert res.exit_code == 1 and "golden" in res.output and res.output.count("\n") <= 2, res.output
    # a failing callback of the SDK's hooks: before the dump, or in the verifying restore (no env to deliver
    # there, so a server without the hook would pass; a callback that failed must not)
    for hook, env in (("before-snapshot", "FAIL_BEFORE_SNAPSHOT=1"), ("after-restore", "FAIL_AFTER_RESTORE=1")):
        res = build_snapshot(thaw_cli, image, tmp_path, "--env", env, ok=False)
        assert res.exit_code == 1 and f"RuntimeError in a callback of /thaw/{hook}" in res.output, res.output
        assert res.output.count("\n") <= 2, res.output
    assert snapshots.list_all(cfg.registry_url) == []  # nothing registered half-done
    assert list((cfg.work_dir / "builds").iterdir()) == []  # nor left on the host: the stored dump went too
    with pytest.raises(SnapshotError, match=r"build id '\.\./x'"):
        agent.host.discard("../x")


def test_the_servers_port_is_the_images_exposed_one_unless_given(cfg, worker, agent, thaw_cli, rootfs, tmp_path):
    """Without --port the server's port is the image's one exposed TCP port (UDP ones aside); an image that
    exposes several, or one that is not a port, is a one-line error before anything launches."""
    def img(exposed, port=PORT):
        return json.loads(thaw_cli("build", "image", str(rootfs), "--config",
                                   str(image_config(tmp_path, port=port, exposed=exposed)), "--json").output)["digest"]
    other = PORT + 11  # not the default 8080: only the image's config can name it
    snap = build_snapshot(thaw_cli, img([f"{other}/tcp", "53/udp"], port=other), tmp_path, port=None)
    assert snapshots.get(cfg.registry_url, snap["digest"]).spec["port"] == other
    assert restore(thaw_cli, snap["digest"])["replicas"][0]["outcome"] == "restored"
    for exposed, error in (([f"{PORT}/tcp", "9000"], f"the image exposes TCP ports {PORT}, 9000: say which one"),
                           (["http"], "the image's ExposedPorts has 'http', not PORT[/tcp]: give the port")):
        image = img(exposed)
        res = build_snapshot(thaw_cli, image, tmp_path, port=None, ok=False)
        assert res.exit_code == 1 and error in res.output and res.output.count("\n") <= 2, res.output
        assert build_snapshot(thaw_cli, image, tmp_path)["digest"]  # --port settles it
    assert len(snapshots.list_all(cfg.registry_url)) == 3


def test_a_snapshot_is_not_held_to_the_image_size_limits(cfg, worker, agent, thaw_cli, image, tmp_path, monkeypatch):
    """A process's memory is one pages-N.img (with the GPU memory its checkpoint parks: over the 64 GiB per-file
    limit of images for a large model); storing the dump refused it, after the launch and the dump."""
    # the image is built already; the server holds 50 MB
    monkeypatch.setattr(agent, "cfg", cfg.model_copy(update={"max_file_size": 1 << 20}))
    snap = build_snapshot(thaw_cli, image, tmp_path)
    sizes = [e.size for e in ImageManifest.load(ChunkStore.open(cfg), snap["digest"]).files()]
    assert max(sizes) > 1 << 20 and snapshots.get(cfg.registry_url, snap["digest"])


def test_env_and_secrets_are_refused_for_a_server_without_the_sdk(cfg, worker, agent, thaw_cli, image, tmp_path):
    """Secrets and a deployment's env reach a restored replica only through the SDK's after-restore hook: for a
    server without it a build with --secret fails before its dump, and a deploy of its snapshot with
    --env/--secret is refused (every replica would cold-boot), nothing registered; without them it builds,
    restores and deploys. Whether the server has the SDK is kept in the snapshot's spec, not in its host facts
    (an agent of an older thaw compares every host fact it does not know)."""
    thaw_cli("secrets", "set", "API_KEY", "--value", SECRET)
    res = build_snapshot(thaw_cli, image, tmp_path, "--env", "SDK=0", "--secret", "API_KEY", ok=False)
    assert res.exit_code == 1 and "--secret API_KEY: the server does not use thaw_sdk" in res.output, res.output
    assert res.output.count("\n") <= 2, res.output  # (it was dumped and stored, then its verify failed)
    res = build_snapshot(thaw_cli, image, tmp_path, "--secret", "NOT_SET", ok=False)  # before the launch
    assert res.exit_code == 1 and f"secret(s) NOT_SET not set on host {cfg.host_id}" in res.output, res.output
    assert snapshots.list_all(cfg.registry_url) == []
    plain = build_snapshot(thaw_cli, image, tmp_path, "--env", "SDK=0")["digest"]
    assert snapshots.get(cfg.registry_url, plain).spec["sdk"] is False
    assert restore(thaw_cli, plain)["replicas"][0]["outcome"] == "restored"
    (kept,) = restore(thaw_cli, plain, "--keep")["replicas"]  # it prints nothing after its restore:
    build = snapshots.get(cfg.registry_url, plain).build_id  # its logs say where its output of before is
    out = thaw_cli("replicas", "logs", kept["replica"]).output
    assert f"replica {kept['replica']} wrote nothing since it started" in out, out
    assert f"build-logs/{build}/launch.log in the work dir of host {cfg.host_id}, if still there" in out, out
    assert (cfg.work_dir / BUILD_LOGS / build / "launch.log").is_file()
    thaw_cli("replicas", "stop", kept["replica"])
    (cold,) = restore(thaw_cli, plain, "--keep")["replicas"]  # a cold boot's log begins at its launch: no hint
    with snapshots.session(cfg.registry_url, write=True) as s:  # (recorded as a fallback would be; its log is as quiet)
        row = s.get(deployments.Replica, cold["replica"])
        row.outcome = "cold-boot"
        s.add(row)
        s.commit()
    out = thaw_cli("replicas", "logs", cold["replica"]).output
    assert f"replica {cold['replica']} wrote nothing since it started)" in out and "build-logs" not in out, out
    thaw_cli("replicas", "stop", cold["replica"])
    for extra, given in ((("--env", "A=1"), "--env"), (("--secret", "API_KEY"), "--secret")):
        res = thaw_cli("deploy", "nosdk", "--snapshot", plain, *extra, ok=False)
        assert res.exit_code == 1, res.output
        assert f"server does not use thaw_sdk: {given} reaches a restored" in res.output, res.output
    assert deployments.list_all(cfg.registry_url) == []
    with_sdk = snapshots.get(cfg.registry_url, build_snapshot(thaw_cli, image, tmp_path)["digest"])
    assert with_sdk.spec["sdk"] is True and "sdk" not in with_sdk.host_facts
    assert with_sdk.compat_key == snapshots.get(cfg.registry_url, plain).compat_key


def test_what_the_server_wrote_before_its_snapshot_is_under_each_restore(cfg, worker, agent, thaw_cli, image,
                                                                           tmp_path):
    """A log the server keeps open, a cache it wrote, a file of the image it deleted, a directory it replaced:
    what it wrote to its root is its state too. Kept with the snapshot (a socket left out), it is the topmost
    lower layer of each restore's root, lazily mounted or materialized, and each replica writes on its own layer.
    Without it CRIU cannot reopen the log, and the build's verifying restore fails."""
    snap = build_snapshot(thaw_cli, image, tmp_path, "--env", "WRITES=1")["digest"]
    store = ChunkStore.open(cfg)
    writes = {e.path: e for e in ImageManifest.load(store, snap).entries if e.path.startswith("root-writes/")}
    assert {"root-writes/var/log/app/server.log", "root-writes/root/.cache/blob", "root-writes/app/dir/new",
            "root-writes/app/gone.txt", "root-writes/etc/hosts", "root-writes/etc/hostname"} <= set(writes), \
        sorted(writes)  # (the last two: the launch's, as Docker's)
    assert writes["root-writes/app/gone.txt"].type == "chr" and not writes["root-writes/app/gone.txt"].rdev
    assert "trusted.overlay.opaque" in (writes["root-writes/app/dir"].xattrs or {})
    assert writes["root-writes/app/control.sock"].type == "chr", "a socket left out: a whiteout in its place"
    assert not [e for e in writes.values() if "trusted.overlay.origin" in (e.xattrs or {})], "the launch's records"
    logged = writes["root-writes/var/log/app/server.log"].size  # "started", the golden request's log lines

    def files(r):
        with urllib.request.urlopen(r["endpoint"] + "/files", timeout=10) as resp:
            return json.loads(resp.read())

    reps = restore(thaw_cli, snap, "--replicas", "2", "--keep")["replicas"]
    assert [r["outcome"] for r in reps] == ["restored"] * 2, reps
    first = {"blob": True, "gone": False, "dir": ["new"], "sock": True, "log": logged + len("files\n")}
    assert files(reps[0]) == first
    assert files(reps[0])["log"] == first["log"] + len("files\n")
    assert files(reps[1]) == first, "each replica writes on a layer of its own"
    assert snap not in agent.host.release_idle(0), "a kept replica's root has the snapshot's tree as a layer"
    thaw_cli("replicas", "stop", *(r["replica"] for r in reps))

    agent.host.close()  # the host's trees materialized instead: the whiteout and the opaque dir written out
    agent.host.cfg = cfg.model_copy(update={"lazy_mounts": False})
    (r,) = restore(thaw_cli, snap, "--keep")["replicas"]
    assert r["outcome"] == "restored" and files(r) == first, r
    thaw_cli("replicas", "stop", r["replica"])


def test_dev_shm_has_the_size_given_and_names_resolve_as_in_docker(cfg, worker, agent, thaw_cli, image, tmp_path):
    """A server that puts 40 MiB in /dev/shm (Docker's 64 MiB by default) cannot put 80 there, unless the build
    gives /dev/shm room: then its restores have the same /dev/shm, with what it held, and so do cold boots.
    Both resolve localhost and their hostname, as in a Docker container, though the image has no /etc/hosts."""
    res = build_snapshot(thaw_cli, image, tmp_path, "--env", "SHM_MB=80", ok=False)
    assert res.exit_code == 1 and "No space left on device" in res.output, res.output
    snap = build_snapshot(thaw_cli, image, tmp_path, "--env", "SHM_MB=80", "--shm-size", "96m")
    assert snapshots.get(cfg.registry_url, snap["digest"]).spec["shm_bytes"] == 96 << 20
    (r,) = restore(thaw_cli, snap["digest"], "--keep")["replicas"]
    recorded_on_another_criu(cfg, snap["digest"])  # a cold boot gets the spec's /dev/shm too
    (c,) = restore(thaw_cli, snap["digest"], "--keep")["replicas"]
    assert (r["outcome"], c["outcome"]) == ("restored", "cold-boot")
    for rid in (r["replica"], c["replica"]):
        status, body = agent.serving[rid].replica.http_request("GET", "/shm", port=PORT)
        assert status == 200 and json.loads(body) == {"size": 96 << 20, "blob": True}, body
        status, body = agent.serving[rid].replica.http_request("GET", "/names", port=PORT)
        assert json.loads(body) == {"localhost": "127.0.0.1", "thaw": "127.0.0.1", "hostname": "thaw\n"}, body
    thaw_cli("replicas", "stop", r["replica"], c["replica"])
    small = build_snapshot(thaw_cli, image, tmp_path, "--env", "SHM_MB=40")["digest"]
    (r,) = restore(thaw_cli, small, "--keep")["replicas"]
    assert json.loads(agent.serving[r["replica"]].replica.http_request("GET", "/shm", port=PORT)[1]) == \
        {"size": 64 << 20, "blob": True}
    thaw_cli("replicas", "stop", r["replica"])


def test_the_images_user_is_checked_before_the_launch(cfg, worker, agent, thaw_cli, rootfs, tmp_path):
    """The image's User goes into the snapshot's spec and runs the server (test_criu checks its credentials).
    Where CRIU cannot checkpoint another user's process (an agent without CAP_SYS_RESOURCE, as on this VM) the
    build fails before the launch, in one line, and --user root builds it; elsewhere it restores as that user."""
    f = image_config(tmp_path)
    f.write_text(json.dumps({**json.loads(f.read_text()), "User": "65534:65534"}))  # no name: the rootfs has none
    image = json.loads(thaw_cli("build", "image", str(rootfs), "--config", str(f), "--json").output)["digest"]
    if _linux.has_capability(_linux.CAP_SYS_RESOURCE):
        snap = build_snapshot(thaw_cli, image, tmp_path)
        assert snapshots.get(cfg.registry_url, snap["digest"]).spec["user"] == "65534:65534"
        assert restore(thaw_cli, snap["digest"])["replicas"][0]["outcome"] == "restored"
        return
    res = build_snapshot(thaw_cli, image, tmp_path, ok=False)
    assert res.exit_code == 1 and "runs as user '65534:65534' (the image's User)" in res.output, res.output
    assert "CAP_SYS_RESOURCE" in res.output and res.output.count("\n") <= 2
    assert snapshots.list_all(cfg.registry_url) == []
    snap = build_snapshot(thaw_cli, image, tmp_path, "--user", "root")
    assert snapshots.get(cfg.registry_url, snap["digest"]).spec["user"] == "root"


def _get(url: str):
    """A GET's JSON answer, or the error it ended in."""
    try:
        with urllib.request.urlopen(url, timeout=90) as resp:
            return json.loads(resp.read())
    except Exception as e:  # noqa: BLE001 - the caller looks at what it was
        return e


def _agent_proc(cfg, **env) -> subprocess.Popen:
    """`thaw agent`, started as from a systemd service: at a soft limit of 1024 open files."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return subprocess.Popen([sys.executable, "-m", "thaw", "agent"], env={**os.environ, **cfg_env(cfg), **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard)))


def test_a_build_on_a_host_whose_agent_is_gone_fails_in_bounded_time(cfg, worker, thaw_cli, image):
    """The host row is fresh (its agent died a moment ago), so the build is planned there; nothing polls its
    queue, so the launch is not picked up: the build fails after pickup_timeout_s with a one-line reason,
    instead of waiting forever, and registers nothing."""
    import asyncio

    from temporalio.client import Client, WorkflowFailureError

    from thaw.cli import _failure_message
    from thaw.workflows.build_snapshot import BuildSnapshot, BuildSnapshotInput, Golden, ModelSpec

    snapshots.upsert_host(cfg.registry_url, "ghost", "thaw-host-ghost", {}, None, 4)

    async def build():
        client = await Client.connect(cfg.temporal_address)
        return await client.execute_workflow(
            BuildSnapshot.run, BuildSnapshotInput(image, ModelSpec(port=PORT, health="/health"), Golden("/"),
                                                  host="ghost", pickup_timeout_s=2),
            id="build-on-ghost", task_queue=cfg.build_task_queue)

    t0 = time.monotonic()
    with pytest.raises(WorkflowFailureError) as err:
        asyncio.run(build())
    assert time.monotonic() - t0 < 30
    assert _failure_message(err.value) == ("no host agent took the work in time: is the host's agent running "
                                           "(`thaw hosts ls`), or busy with other builds and restores (its log)?")
    assert snapshots.list_all(cfg.registry_url) == []


def test_killed_agent_during_build_retries_and_registers_once(cfg, worker, thaw_cli, rootfs, tmp_path):
    from thaw.stack import agent_ready_file

    # a server that takes longer to get ready than the heartbeat timeout (5 s here): the agent dies mid-launch,
    # and the retried launch only survives if the agent keeps heartbeating while it waits
    assert cfg.heartbeat_timeout < 8
    img = json.loads(thaw_cli("build", "image", str(rootfs), "--config",
                              str(image_config(tmp_path, SLOW_START="8")), "--json").output)["digest"]
    agent, build, stopper = _agent_proc(cfg), None, None
    try:
        ready = agent_ready_file(cfg)
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert time.monotonic() < deadline and agent.poll() is None, "agent did not start"
            time.sleep(0.1)
        golden = tmp_path / "golden.json"
        golden.write_text("{}")
        build = subprocess.Popen(["thaw", "build", "snapshot", img, "--port", str(PORT), "--health", "/health",
                                  "--golden", str(golden), "--golden-path", "/answer-stable", "--json"],
                                 env={**os.environ, **cfg_env(cfg)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        wait_until(lambda: any((cfg.work_dir / BUILD_LOGS).glob("*/launch.log")), 60, "the launch")
        time.sleep(1)
        os.kill(agent.pid, signal.SIGKILL)  # the agent only: the replica it launched is left behind
        agent.wait()
        # a restarted agent clears the leftovers; Temporal retries the activity
        agent = _agent_proc(cfg, THAW_REPLICA_STOP_GRACE_S="40")
        out, err = build.communicate(timeout=240)
        assert build.returncode == 0, (out, err[-3000:])
        res = json.loads(out)
        assert res["created"]
        assert [s.digest for s in snapshots.list_all(cfg.registry_url)] == [res["digest"]]
        attempts = activity_attempts(cfg, res["workflow_id"], "checkpoint_model")
        assert max(attempts) >= 2, f"the launch was not retried after the agent died: {attempts}"
        # the agent, started at a soft limit of 1024 open files, raised it to its hard one, and so the server it
        # launched (as a restore of it shows) has that too
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        assert hard > 1024, "this check needs a hard limit above the soft 1024 the agent started at"
        limits = Path(f"/proc/{agent.pid}/limits").read_text()
        assert re.search(rf"Max open files +{hard} +{hard} ", limits), limits
        (r,) = restore(thaw_cli, res["digest"], "--keep")["replicas"]
        with urllib.request.urlopen(r["endpoint"] + "/nofile", timeout=10) as resp:
            assert json.loads(resp.read()) == [hard, hard]
        # a stop in its grace (the server finishes a 60 s request first; the grace is 40 s): the agent told to
        # stop cuts it short, or its worker would wait for it, and `thaw down` kills an agent after 30 s
        slow = []
        threading.Thread(target=lambda: slow.append(_get(r["endpoint"] + "/slow?60")), daemon=True).start()
        time.sleep(0.5)
        stopper = subprocess.Popen(["thaw", "replicas", "stop", r["replica"]], env={**os.environ, **cfg_env(cfg)},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: r["replica"] not in {x.id for x in deployments.replicas(cfg.registry_url)}, 60,
                   "the stop's drain")  # its row goes first
        time.sleep(1)  # the drain (0.2 s) passed: the server has its SIGTERM
        assert stopper.poll() is None and not slow, "the stop did not wait for the request under way"
        t0 = time.monotonic()
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(60)
        assert time.monotonic() - t0 < 15, "the agent waited out its replica's grace"
        wait_until(lambda: slow, 10, "the request cut")
        assert "slow" not in str(slow[0]), slow  # cut, not answered
        # the stop's activity, cut short by its worker's shutdown, failed retryably: an agent started again
        # takes the retry, finds nothing left to stop, and the stop ends well
        agent = _agent_proc(cfg)
        out, err = stopper.communicate(timeout=90)
        assert stopper.returncode == 0, err
    finally:
        for proc in (build, stopper):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(60)


def test_gpu_host_replicas_get_the_driver_layer_and_device_nodes(cfg, worker, agent, thaw_cli, image, tmp_path):
    """On a GPU host every image-rooted replica gets the driver's libraries (a root layer, first on
    LD_LIBRARY_PATH) and the GPU device nodes, at launch and after each restore. No driver here: the layer holds
    the host's zlib (python links it, so the process maps the layer's copy) and the node has /dev/full's numbers."""
    from pyroot import PYTHON, _libs
    from thaw.snapshot.nvidia import LIB_DIR, Device, GpuAccess, build_layer

    libz = next(p for p in _libs(PYTHON) if p.name == "libz.so.1")
    layer = build_layer(cfg.work_dir / "gpu-driver", "driver-test", {"libz.so.1": libz}, [])
    agent.host.gpu = GpuAccess(layer, (Device("thaw-test/node", 1, 7, 0o666),))
    snap = build_snapshot(thaw_cli, image, tmp_path)  # launch, dump, profile restore and verify restore use them
    out = restore(thaw_cli, snap["digest"], "--replicas", "2", "--keep")
    assert [r["outcome"] for r in out["replicas"]] == ["restored"] * 2, out
    for r in out["replicas"]:
        pid = agent.serving[r["replica"]].replica.pid
        assert f"LD_LIBRARY_PATH={LIB_DIR}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        with open(f"/proc/{pid}/maps") as f:
            assert {line.split()[-1] for line in f if "libz.so" in line} == {f"{LIB_DIR}/{libz.resolve().name}"}
        node = os.stat(f"/proc/{pid}/root/dev/thaw-test/node")
        assert stat.S_ISCHR(node.st_mode) and node.st_rdev == os.makedev(1, 7)


def test_a_gpu_host_lends_each_replica_the_least_used_gpu(cfg, worker, agent, thaw_cli, image, tmp_path,
                                                          monkeypatch):
    """Two stand-in GPUs (nodes with /dev/full's and /dev/zero's numbers) and a GPU snapshot built, verified
    and restored by the real agent, CRIU and Temporal; the one stand-in is cuda-python's side (the process
    "uses the GPU", its CUDA checkpoint is a no-op, its CUDA restore records the node it finds and the GPU
    pairs it is asked for). Each launch, cold boot and restore gets the GPU running the fewest replicas, sees
    only that GPU's node and (launched) its UUID in CUDA_VISIBLE_DEVICES; a restore moved to another GPU gets
    gpuPairs and the new UUID through its after-restore hook; a stopped replica gives its GPU back."""
    from types import SimpleNamespace

    from thaw.snapshot import cuda
    from thaw.snapshot.nvidia import Device, GpuAccess, build_layer

    u0, u1 = "GPU-0a1b2c3d-0000-1111-2222-333344445555", "GPU-9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff"
    host = agent.host
    host.gpu = GpuAccess(build_layer(cfg.work_dir / "gpu-driver", "driver-test", {}, []),
                         (Device("nvidia0", 1, 7, 0o666), Device("nvidia1", 1, 5, 0o666)),
                         ((u0, "nvidia0"), (u1, "nvidia1")))
    gpu_facts = {"gpu_model": "Test GPU", "nvidia_driver": "580.95.05", "cuda": "13.0"}
    monkeypatch.setattr(host, "facts", {**host.facts, **gpu_facts, "gpu_count": 2, "gpu_uuids": [u0, u1]})

    def nodes(pid) -> list[str]:
        return sorted(p.name for p in Path(f"/proc/{pid}/root/dev").glob("nvidia*"))

    def visible(running) -> str | None:
        env = dict(v.split(b"=", 1) for v in Path(f"/proc/{running.replica.pid}/environ").read_bytes().split(b"\0")
                   if b"=" in v)
        return env.get(b"CUDA_VISIBLE_DEVICES", b"").decode() or None

    cuda_restores = []

    class DriverSide:
        def uses_gpu(self, pid):
            return True

        def around_dump(self, pids, dump_fn):
            dump_fn()
            return SimpleNamespace(timings_ms={})

        def restore_tree(self, pid, expected=None, gpu_pairs=None):
            cuda_restores.append((nodes(pid), gpu_pairs))
            return {}

    monkeypatch.setattr(cuda, "GpuCheckpointer", DriverSide)
    monkeypatch.setattr(cuda, "tree_uses_nvidia", lambda pid: [pid])

    busy = host.take_gpu()  # another replica holds GPU 0: the build launches on GPU 1
    digest = build_snapshot(thaw_cli, image, tmp_path)["digest"]
    snap = snapshots.get(cfg.registry_url, digest).model_dump()
    assert snap["host_facts"]["gpu_uuids"] == [u1] and snap["host_facts"]["gpu_count"] == 1
    # the profile restore and the verify restore: on the snapshot's own GPU (the least used), nothing to move
    assert cuda_restores == [(["nvidia1"], None)] * 2
    host.give_gpu(busy)
    assert host.gpu_loads() == [0, 0]

    started = []
    try:
        for _ in range(3):
            started.append(host.cold_boot(snap["image_digest"], snap["spec"], {})[0])
        assert [(nodes(r.replica.pid), visible(r)) for r in started] == [
            (["nvidia0"], u0), (["nvidia1"], u1), (["nvidia0"], u0)]
        assert host.gpu_loads() == [2, 1]
        started.pop(0).stop()
        assert host.gpu_loads() == [1, 1]

        def restore_one(snap=snap):
            started.append(host.restore(snap, {})[0])
            status, body = started[-1].replica.http_request("GET", "/env/CUDA_VISIBLE_DEVICES", port=PORT)
            assert status == 200, body
            return cuda_restores[-1], json.loads(body)["value"]

        cuda_restores.clear()
        assert restore_one() == ((["nvidia1"], None), u1)  # a tie: the snapshot's own GPU, no pairs
        assert host.gpu_loads() == [1, 2]
        assert restore_one() == ((["nvidia0"], [(u1, u0)]), u0)  # GPU 0 runs fewer: moved there
        assert host.gpu_loads() == [2, 2]
        started.pop(1).stop()  # the second cold boot, on GPU 0
        assert host.gpu_loads() == [1, 2]
        # a 570 driver can't move a process to another GPU: its own, although it runs more
        monkeypatch.setitem(host.facts, "nvidia_driver", "570.86.15")
        assert restore_one({**snap, "host_facts": {**snap["host_facts"], "nvidia_driver": "570.86.15"}}) == (
            (["nvidia1"], None), u1)
        assert host.gpu_loads() == [1, 3]
        # a snapshot from before GPUs were lent one by one lists them all: every node, no GPU counted for it
        monkeypatch.setitem(host.facts, "nvidia_driver", "580.95.05")
        assert restore_one({**snap, "host_facts": {**snap["host_facts"], "gpu_uuids": [u0, u1], "gpu_count": 2}})[0] \
            == (["nvidia0", "nvidia1"], None)
        assert host.gpu_loads() == [1, 3]
    finally:
        for r in started:
            r.stop()
    assert host.gpu_loads() == [0, 0]


def test_kept_replicas_are_published_listed_protect_their_snapshot_and_stop(cfg, worker, agent, thaw_cli, image,
                                                                            tmp_path):
    snap = build_snapshot(thaw_cli, image, tmp_path)["digest"]
    reps = restore(thaw_cli, snap, "--replicas", "2", "--keep")["replicas"]
    for r in reps:  # published on the host, like a deployment's replicas
        assert answer_of(r) == DATA_MB
    listed = json.loads(thaw_cli("replicas", "ls", "--json").output)
    assert {(x["id"], x["deployment"], x["snapshot_digest"], x["endpoint"]) for x in listed} == {
        (r["replica"], "", snap, r["endpoint"]) for r in reps}
    assert "(kept)" in thaw_cli("replicas", "ls").output
    cg = agent.host.cgroup  # the host's replicas run in its replica cgroup (snapshot/cgroup.py), reapers too
    assert cg is not None and cg.name == f"thaw-replicas-{cfg.host_id}"
    assert {cpu_cgroup_of(p).rsplit("/", 1)[-1] for r in agent.serving.values()
            for p in (r.replica.pid, r.replica.proc.pid)} == {cg.name}
    for r in reps:  # what each wrote to stdout since its restore, read by the agent
        assert f"after restore {r['replica']}" in thaw_cli("replicas", "logs", r["replica"]).output
    res = thaw_cli("snapshots", "rm", snap, ok=False)  # gc would take the files they read lazily
    assert res.exit_code == 1 and f"thaw replicas stop {reps[0]['replica']} {reps[1]['replica']}" in res.output
    res = thaw_cli("replicas", "stop", "r-nope", ok=False)
    assert res.exit_code == 1 and "no replica 'r-nope'" in res.output
    from thaw.registry import deployments
    from thaw.registry.models import Replica
    deployments.add_replica(cfg.registry_url, Replica(id="r-orphan", deployment="", snapshot_digest=snap,
                                                      host_id="gone", endpoint="http://127.0.0.1:9",
                                                      outcome="restored"))
    for cmd, then in (("stop", "(`thaw replicas stop --forget` forgets it now)"), ("logs", "its logs stay")):
        res = thaw_cli("replicas", cmd, "r-orphan", ok=False)  # a host whose agent is not heartbeating
        assert res.exit_code == 1 and "the agent of host gone is down" in res.output and then in res.output, res.output
    # a host that never comes back: its kept replica held the snapshot against `thaw snapshots rm` for good
    assert "forgot r-orphan" in thaw_cli("replicas", "stop", "--forget", "r-orphan").output
    assert "r-orphan" not in {r.id for r in deployments.replicas(cfg.registry_url)}
    assert set(agent.serving) == {r["replica"] for r in reps}, "a refused stop stops nothing"

    # a criu run in a namespace of its own (the kdat cache) copies the agent's mounts, the other's overlay root
    # among them: its reaper goes back to the agent's namespace, and were a copy held anywhere, removing a stopped
    # replica's dir detaches it (else its overlay and upper layer would live on until the other replica stops)
    def held(by, rid):
        return [m for m in mountinfo(by.replica.proc.pid) if rid in m.mountpoint + m.super_options]

    a, b = (agent.serving[r["replica"]] for r in reps)
    first, other = (a, b) if held(b, a.id) else (b, a)  # the one whose mounts the other's reaper holds, if any
    assert "stopped" in thaw_cli("replicas", "stop", first.id).output
    assert not held(other, first.id)
    assert "stopped" in thaw_cli("replicas", "stop", other.id).output
    assert agent.serving == {} and json.loads(thaw_cli("replicas", "ls", "--json").output) == []
    assert not [r for r in reps if (cfg.work_dir / "replica-logs" / r["replica"]).exists()], "a plain stop keeps none"
    for r in reps:
        with pytest.raises(OSError):
            urllib.request.urlopen(r["endpoint"] + "/health", timeout=5)
    thaw_cli("snapshots", "rm", snap)


def test_idle_trees_are_unmounted_unless_a_replica_uses_them_or_their_pages_are_pinned(cfg, worker, agent, thaw_cli,
                                                                                       image, tmp_path):
    from thaw.imagefs.mount import is_mounted

    snap = build_snapshot(thaw_cli, image, tmp_path)["digest"]
    (kept,) = restore(thaw_cli, snap, "--keep")["replicas"]
    host = agent.host
    trees = {image: host.image_root(image), snap: host.snapshot_files(snap)}
    daemons = {d: host.mounts[mp].pid for d, mp in trees.items()}
    wait_until(lambda: snap in host.pins.pinned(), 30, "the snapshot's pages pinned")
    assert host.release_idle(0) == [], "a pinned snapshot is hot: both its trees stay"

    host.pins.unpin(snap)
    assert host.release_idle(3600) == [], "not idle long enough"
    # both trees are layers of the kept replica's root: the snapshot's through what the server wrote before it
    assert (trees[snap] / criu.WRITES / "app/__pycache__").is_dir()  # (thaw_sdk's .pyc)
    assert host.release_idle(0) == [], "the kept replica's root has both trees as layers"
    assert all(is_mounted(mp) for mp in trees.values())
    assert answer_of(kept) == DATA_MB, "the replica still reads its image"

    thaw_cli("replicas", "stop", kept["replica"])
    assert sorted(host.release_idle(0)) == sorted(trees)
    assert host.mounts == {} and not any(is_mounted(mp) for mp in trees.values())
    for pid in daemons.values():
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), 10, f"mount daemon {pid} gone")
    (r,) = restore(thaw_cli, snap)["replicas"]  # the next restore mounts both again
    assert r["outcome"] == "restored" and all(is_mounted(mp) for mp in trees.values())


def answer_of(replica: dict) -> int:
    with urllib.request.urlopen(replica["endpoint"] + "/answer-stable", timeout=10) as resp:
        return json.loads(resp.read())["data_mb"]


@pytest.mark.slow
def test_example_model_snapshot_restores_with_identical_embeddings(cfg, worker, agent, thaw_cli, tmp_path):
    from thaw.examples.minilm import recipe

    rootfs = recipe.build_rootfs()
    image = json.loads(thaw_cli("build", "image", str(rootfs), "--config", str(rootfs.parent / "image-config.json"),
                                "--json").output)["digest"]
    snap = json.loads(thaw_cli("build", "snapshot", image, "--port", "8080", "--health", "/healthz", "--golden",
                               str(recipe.GOLDEN_JSON), "--golden-path", "/embed", "--json").output)
    assert snap["created"] and snap["timings_ms"]["verify_replay"] >= 0
    out = restore(thaw_cli, snap["digest"], "--replicas", "2", "--keep")
    assert [r["outcome"] for r in out["replicas"]] == ["restored"] * 2
    body = recipe.GOLDEN_JSON.read_bytes()
    answers = {agent.serving[r["replica"]].replica.http_request("POST", "/embed", body, 8080,
                                                                content_type="application/json")[1]
               for r in out["replicas"]}
    (answer,) = answers
    for r in out["replicas"]:  # the example logs its restore: `thaw replicas logs` reads it through the agent
        assert f"minilm-server: restored as {r['replica']}" in thaw_cli("replicas", "logs", r["replica"]).output
    emb = json.loads(answer)["embeddings"]
    assert len(emb) == len(json.loads(body)["texts"]) and len(emb[0]) == 384
    # the restored model is the real one: related sentences are closer than unrelated ones
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert dot(emb[0], emb[1]) > dot(emb[0], emb[7]) + 0.2
    # and a restore beats the cold boot it replaced, by a wide margin
    restore_ms = min(r["timings_ms"]["total"] for r in out["replicas"])
    assert restore_ms * 3 < snap["timings_ms"]["cold_boot"], (restore_ms, snap["timings_ms"])


@pytest.mark.parametrize("mode, gpu, want", [("gpu", True, True), ("gpu", False, False), ("always", False, True),
                                             ("never", True, False)])
def test_restore_huge_pages_setting(mode, gpu, want, tmp_path, monkeypatch):
    monkeypatch.setenv("THAW_RESTORE_HUGE_PAGES", mode)
    facts = {"arch": "x86_64", **({"gpu_model": "NVIDIA H100 80GB HBM3"} if gpu else {})}
    assert use_huge_pages(Config(state_dir=tmp_path).restore_huge_pages, facts) is want


def test_restore_huge_pages_rejects_other_values(tmp_path, monkeypatch):
    monkeypatch.setenv("THAW_RESTORE_HUGE_PAGES", "sometimes")
    with pytest.raises(ValueError, match="restore_huge_pages"):
        Config(state_dir=tmp_path)


def test_a_cancelled_build_stops_its_launch_and_leaves_nothing_on_the_host(cfg, worker, agent, thaw_cli, rootfs,
                                                                            tmp_path):
    """Cancelled from Temporal UI or `temporal workflow cancel` mid-launch: the launch activity is cancelled and
    waited for (its process stopped, its mounts gone), then the host drops the build's dir."""
    import asyncio

    from temporalio.client import Client, WorkflowFailureError

    from thaw.snapshot.host import RECORD
    from thaw.workflows.build_snapshot import BuildSnapshot, BuildSnapshotInput, Golden, ModelSpec

    img = json.loads(thaw_cli("build", "image", str(rootfs), "--config",
                              str(image_config(tmp_path, SLOW_START="120")), "--json").output)["digest"]
    builds = cfg.work_dir / "builds"

    async def build_and_cancel():
        client = await Client.connect(cfg.temporal_address)
        handle = await client.start_workflow(
            BuildSnapshot.run, BuildSnapshotInput(img, ModelSpec(port=PORT, health="/health"), Golden("/health"),
                                                  heartbeat_timeout_s=cfg.heartbeat_timeout),
            id="build-snapshot-cancelled", task_queue=cfg.build_task_queue)
        await asyncio.to_thread(wait_until, lambda: any(builds.glob(f"*/{RECORD}")), 60, "the launch")
        pid = json.loads(next(builds.glob(f"*/{RECORD}")).read_text())["pid"]
        await handle.cancel()
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        return pid

    pid = asyncio.run(build_and_cancel())
    assert list(builds.iterdir()) == []
    try:
        assert "State:\tZ" in Path(f"/proc/{pid}/status").read_text()  # stopped, not yet reaped
    except FileNotFoundError:
        pass  # gone
    assert not [m for m in open("/proc/self/mountinfo") if str(cfg.work_dir / "builds") in m]
    assert snapshots.list_all(cfg.registry_url) == []


def test_a_stopped_replicas_row_the_registry_refused_goes_at_a_later_heartbeat(cfg, worker, agent, monkeypatch):
    """The process is stopped first; when the registry then fails to drop its row (down for longer than the
    stop's retries), the agent's heartbeat drops it later instead of leaving it for good (a stale row counts
    against the host's capacity and points gateways at a dead endpoint)."""
    from sqlalchemy.exc import OperationalError

    from thaw.activities import host as host_acts
    from thaw.registry.models import Replica
    from thaw.workflows.pool import StopReplicaInput

    deployments.add_replica(cfg.registry_url, Replica(id="r-stale", deployment="web", host_id=cfg.host_id,
                                                      endpoint="http://127.0.0.1:9", outcome="restored"))
    real = host_acts.deployments.remove_replica

    def down(url, rid):
        raise OperationalError("DELETE", {}, Exception("database is locked"))

    monkeypatch.setattr(host_acts.deployments, "remove_replica", down)
    with pytest.raises(OperationalError):
        agent.stop_replica(StopReplicaInput("r-stale"))
    assert [r.id for r in deployments.replicas(cfg.registry_url)] == ["r-stale"] and agent.unlisted == {"r-stale"}
    monkeypatch.setattr(host_acts.deployments, "remove_replica", real)
    wait_until(lambda: deployments.replicas(cfg.registry_url) == [], 30, "the heartbeat to drop the row")
    assert agent.unlisted == set()


@pytest.mark.parametrize("why", ["passthrough off", "no driver libraries"])
def test_a_host_whose_replicas_get_no_gpu_advertises_none(cfg, monkeypatch, why):
    """A host whose driver reports a GPU but whose replicas cannot use it (THAW_GPU_PASSTHROUGH off, or no
    libcuda for their root) drops the GPU facts it advertises: no pool places a GPU snapshot there, and a restore
    of one is refused by the compatibility check instead of failing in CUDA."""
    from thaw.snapshot import compat, nvidia
    from thaw.snapshot.host import HostSnapshots

    gpu_facts = {"gpu_model": "Test GPU", "nvidia_driver": "580.95.05", "cuda": "13.0", "gpu_count": 1,
                 "gpu_uuids": ["GPU-0a1b2c3d-0000-1111-2222-333344445555"]}
    monkeypatch.setattr(compat, "gpu_host_facts", lambda: gpu_facts)

    def no_libcuda(*a, **kw):
        raise nvidia.GpuAccessError("this host has NVIDIA devices but no libcuda.so.1 in its library cache")

    monkeypatch.setattr(nvidia, "for_host", no_libcuda)
    host = HostSnapshots(cfg.model_copy(update={"gpu_passthrough": why != "passthrough off"}))
    assert compat.host_facts()["gpu_model"] == "Test GPU" and host.gpu is None
    assert not set(gpu_facts) & set(host.facts), host.facts
    assert compat.check({**host.facts, **gpu_facts}, host.facts)[0].startswith("no NVIDIA GPU on host")


def test_a_full_host_refuses_a_start(cfg, worker, agent):
    """Two pools placing at once both see a host free (registry rows appear once a replica serves): the agent
    itself refuses a start beyond its capacity, counting the starts under way, before restoring anything."""
    from thaw.workflows.pool import StartReplicaInput

    agent.cfg = cfg.model_copy(update={"host_capacity": 1})
    agent.starts = 1  # one start under way
    with pytest.raises(Exception, match=f"host {cfg.host_id} is full: 1 of its 1 replicas serve or start"):
        agent.start_replica(StartReplicaInput("web", "0" * 64, [], 0))
    assert agent.starts == 1
    agent.starts = 0
    with pytest.raises(Exception, match="no snapshot"):  # room: on to the restore, which finds no such snapshot
        agent.start_replica(StartReplicaInput("web", "0" * 64, [], 0))
    assert agent.starts == 0


def test_a_full_host_refuses_replicas_kept_by_restore(cfg, worker, agent):
    """`thaw restore --keep` takes slots of the host's capacity as a pool's start does; a restore that only
    verifies (replicas stopped after) takes none."""
    from thaw.workflows.build_snapshot import RestorePlan

    agent.cfg = cfg.model_copy(update={"host_capacity": 2})
    agent.starts = 1
    with pytest.raises(Exception, match=f"host {cfg.host_id} is full: 1 of its 2 replicas serve or start, 2 more "
                                        "asked for"):
        agent.restore_replicas(RestorePlan("0" * 64, cfg.host_id, cfg.host_task_queue, 2, [], True))
    assert agent.starts == 1
    agent.starts = 2
    with pytest.raises(Exception, match="no snapshot"):  # not kept: on to the restore, which finds no such snapshot
        agent.restore_replicas(RestorePlan("0" * 64, cfg.host_id, cfg.host_task_queue, 2, [], False))
    agent.starts = 0
    with pytest.raises(Exception, match="no snapshot"):
        agent.restore_replicas(RestorePlan("0" * 64, cfg.host_id, cfg.host_task_queue, 2, [], True))
    assert agent.starts == 0


def test_an_agent_drops_the_dirs_of_ended_builds_at_its_start_and_then_now_and_then(cfg):
    """A finished checkpoint's dir outlives an agent restart, for its build's next step (store, verify). A build
    that ended meanwhile (failed while the agent was away longer than its pickup timeout, so its own clean-up
    never reached the host) leaves a dump of GBs: the next agent start drops it, and keeps a running build's."""
    import asyncio
    import uuid

    from temporalio.client import Client

    from thaw.runtime.agent import drop_ended_builds, drop_ended_builds_every
    from thaw.snapshot.host import RESULT, HostSnapshots, cleanup_stale

    ids = {k: f"build-{k}-{uuid.uuid4().hex[:8]}" for k in ("running", "ended", "unknown")}
    for b in ids.values():
        (cfg.work_dir / "builds" / b / "dump").mkdir(parents=True)
        (cfg.work_dir / "builds" / b / RESULT).write_text("{}")
    assert cleanup_stale(cfg.work_dir) == 0  # what an agent start clears first: not these
    host = HostSnapshots(cfg)
    nobody = f"nobody-{uuid.uuid4().hex[:8]}"  # workflows that never run: only their status matters

    async def go():
        client = await Client.connect(cfg.temporal_address)
        running = await client.start_workflow("BuildSnapshot", id=ids["running"], task_queue=nobody)
        ended = await client.start_workflow("BuildSnapshot", id=ids["ended"], task_queue=nobody)
        await ended.terminate("failed while its host was away")
        try:
            dropped = await drop_ended_builds(client, host)
            kept = host.finished_builds()
        finally:
            await running.terminate("ended while the agent ran")
        # one that ends while the agent runs (its clean-up did not reach a busy agent): dropped at a later round
        rounds = asyncio.ensure_future(drop_ended_builds_every(client, host, every_s=0.1))
        try:
            for _ in range(100):
                if not host.finished_builds():
                    break
                await asyncio.sleep(0.05)
        finally:
            rounds.cancel()
        return dropped, kept, host.finished_builds()

    try:
        dropped, kept, later = asyncio.run(go())
    finally:
        host.close()
    assert sorted(dropped) == sorted([ids["ended"], ids["unknown"]])
    assert kept == [ids["running"]] and later == []


def test_the_logs_of_the_last_ended_replicas_are_kept(tmp_path):
    """Replicas that failed to start or died keep their logs (their errors name them); of those whose dir is gone
    the newest LOGS_KEPT stay, a running replica's (its dir is there) whatever its age."""
    from thaw.snapshot.host import LOGS, LOGS_KEPT, _end_logs, prune_logs

    names = [f"r-{i:02d}" for i in range(LOGS_KEPT + 5)]
    for i, name in enumerate(names):
        (tmp_path / LOGS / name).mkdir(parents=True)
        (tmp_path / LOGS / name / "restore.log").write_text(name)
        os.utime(tmp_path / LOGS / name, (1000 + i, 1000 + i))
    (tmp_path / "replicas" / names[0]).mkdir(parents=True)  # the oldest still runs
    prune_logs(tmp_path)
    assert sorted(d.name for d in (tmp_path / LOGS).iterdir()) == [names[0]] + names[-LOGS_KEPT:]
    # a replica that ran long ends now: its logs are the newest, whenever it started
    (tmp_path / "replicas" / names[0]).rmdir()
    _end_logs(tmp_path / LOGS / names[0], keep=True)
    prune_logs(tmp_path)
    assert sorted(d.name for d in (tmp_path / LOGS).iterdir()) == [names[0]] + names[-LOGS_KEPT + 1:]
    # builds' logs the same way, beside them: those of a build whose dir is there stay, whatever their age
    for i, name in enumerate(names):
        (tmp_path / BUILD_LOGS / name).mkdir(parents=True)
        os.utime(tmp_path / BUILD_LOGS / name, (1000 + i, 1000 + i))
    (tmp_path / "builds" / names[1]).mkdir(parents=True)
    prune_logs(tmp_path)
    assert sorted(d.name for d in (tmp_path / BUILD_LOGS).iterdir()) == [names[1]] + names[-LOGS_KEPT:]
    assert sorted(d.name for d in (tmp_path / LOGS).iterdir()) == [names[0]] + names[-LOGS_KEPT + 1:]


def test_the_logs_an_ended_replica_left_are_read_with_their_paths(tmp_path):
    """What `thaw replicas logs` shows of a replica that is not serving: the end of each log its failed restore
    and its fallback cold boot (``<id>.cold``) left, headed by its path; nothing for an id that left none, and
    no id that is a path."""
    from thaw.snapshot.host import LOGS, SnapshotError, ended_logs

    (tmp_path / LOGS / "r-1").mkdir(parents=True)
    (tmp_path / LOGS / "r-1.cold").mkdir()
    (tmp_path / LOGS / "r-1" / "restore.criu-restore.log").write_text("x" * 5000 + "Error (criu/cr-restore.c)\n")
    (tmp_path / LOGS / "r-1.cold" / "launch.log").write_text("Traceback: ModuleNotFoundError: torch\n")
    (tmp_path / LOGS / "r-1" / "stats-restore").write_bytes(b"\x00\xff binary")  # CRIU's, not a log
    (tmp_path / LOGS / "r-10").mkdir()
    (tmp_path / LOGS / "r-10" / "restore.log").write_text("another replica's")
    text = ended_logs(tmp_path, "r-1", 100)  # 50 bytes of each (a reply must stay small)
    assert text == (f"==> {tmp_path / LOGS / 'r-1' / 'restore.criu-restore.log'} <==\n"
                    f"{'x' * 24}Error (criu/cr-restore.c)\n\n"
                    f"==> {tmp_path / LOGS / 'r-1.cold' / 'launch.log'} <==\nTraceback: ModuleNotFoundError: torch")
    assert ended_logs(tmp_path, "r-2", 100) is None
    for bad in ("../r-1", "r-1/..", ".", "..", "/etc"):
        with pytest.raises(SnapshotError, match="replica id"):
            ended_logs(tmp_path, bad, 100)


def test_a_replica_whose_root_cannot_be_made_leaves_no_dirs(cfg):
    """An image whose tree is gone (its mount daemon died, say): the replica's dir and log dir go with the error,
    or they would stay until the agent restarts (a dir under replicas/ marks its logs as a live replica's)."""
    from thaw.snapshot.host import LOGS, HostSnapshots

    host = HostSnapshots(cfg)
    try:
        with pytest.raises(FileNotFoundError, match="is not a directory"):
            host._replica_root("r-noroot", cfg.work_dir / "no-such-image")
    finally:
        host.close()
    assert not (cfg.work_dir / "replicas" / "r-noroot").exists() and not (cfg.work_dir / LOGS / "r-noroot").exists()


def test_only_root_reaches_a_hosts_image_trees(cfg):
    """Image trees are mounted below the host's work dir with their setuid files (and device nodes where
    allowed): under a state dir such as /var/lib/thaw, another local user could have run a setuid-root program
    of any image. The work dir is root's alone (0700), whatever the umask made it."""
    import stat as stat_mod

    from thaw.snapshot.host import HostSnapshots

    cfg.work_dir.mkdir(parents=True)
    os.chmod(cfg.work_dir, 0o755)  # as an older thaw, or the umask, made it
    (cfg.work_dir / "images" / "x").mkdir(parents=True)
    host = HostSnapshots(cfg)
    host.close()
    assert stat_mod.S_IMODE(os.stat(cfg.work_dir).st_mode) == 0o700
    (cfg.state_dir / "open").mkdir(mode=0o755)  # the control: a dir nobody may list
    fd = os.open(cfg.state_dir, os.O_RDONLY)  # from here: the dirs above (pytest's, 0700) are not in the way
    try:
        def as_nobody(rel: str) -> subprocess.CompletedProcess:  # through the fd it inherits
            return subprocess.run(["ls", f"/proc/self/fd/{fd}/{rel}"], user="nobody", pass_fds=[fd],
                                  capture_output=True, text=True)

        assert as_nobody("open").returncode == 0
        denied = as_nobody(str((cfg.work_dir / "images" / "x").relative_to(cfg.state_dir)))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    finally:
        os.close(fd)


def test_a_checkpoint_retry_waits_for_the_attempt_still_running(cfg):
    """A retried checkpoint that reaches the host while the attempt that timed out still runs (blocked in a dump,
    say) waits for it, then answers with its result, instead of clearing the dir under it; a discard waits too,
    and an attempt that waited out its workflow's end (the discard came first) launches nothing."""
    import threading

    from thaw.snapshot.host import DISCARDED_KEPT_S, RESULT, HostSnapshots

    host = HostSnapshots(cfg)
    work = cfg.work_dir / "builds" / "b1"
    entered, got, real = [], [], host._take
    host._take = lambda *a: entered.append(a[0]) or real(*a)
    try:
        with host.build_lock("b1"):  # the first attempt, still running
            t = threading.Thread(target=lambda: got.append(host.take("b1", "img", {}, {})))
            t.start()
            t.join(1.5)
            assert t.is_alive() and not entered
            work.mkdir(parents=True)
            (work / RESULT).write_text('{"dump_dir": "d"}')  # what the first attempt ends with
        t.join(10)
        assert got == [{"dump_dir": "d"}] and entered == ["b1"]
        host._discarded["b0"] = time.monotonic() - DISCARDED_KEPT_S - 1  # a build that ended a day ago
        with host.build_lock("b1"):
            t = threading.Thread(target=host.discard, args=("b1",))
            t.start()
            t.join(1.5)
            assert t.is_alive() and work.exists()
        t.join(10)
        assert not work.exists()
        assert list(host._discarded) == ["b1"] and "b1" not in host._builds  # what it remembers stays bounded
        with pytest.raises(SnapshotError, match="build b1 has ended"):  # an attempt arriving late
            host.take("b1", "img", {}, {})
        assert entered == ["b1"] and not work.exists()
    finally:
        host.close()


def test_a_store_retry_waits_for_the_attempt_still_storing(cfg):
    """A store that outran its time limit is retried on the host while the first attempt still runs (it learns of
    its cancel at its next heartbeat): the retry ingested the same dump, which the first attempt deleted when it
    finished, and failed the build for good on the missing files. It waits, then answers with what was stored."""
    import threading

    from thaw.activities.host import STORED_FILE, HostActivities
    from thaw.snapshot.host import HostSnapshots
    from thaw.workflows.build_snapshot import CheckpointResult, StoredSnapshot

    host = HostSnapshots(cfg)
    acts = HostActivities(cfg, host)
    work = cfg.work_dir / "builds" / "b2"
    (work / "dump").mkdir(parents=True)
    ck = CheckpointResult("b2", str(work / "dump"), "g", 1, {}, "k", {})
    got = []
    try:
        with host.build_lock("b2"):  # the first attempt, still storing
            t = threading.Thread(target=lambda: got.append(acts.store_snapshot(ck)))
            t.start()
            t.join(1.5)
            assert t.is_alive()
            stored = StoredSnapshot("d" * 64, 10, 2, 10, 5)  # what it ends with: the record, the dump gone
            (work / STORED_FILE).write_text(json.dumps(dataclasses.asdict(stored)))
            (work / "dump").rmdir()
        t.join(10)
        assert got == [stored]
    finally:
        host.close()


def test_a_replica_id_that_is_not_a_plain_name_is_refused_before_anything_is_made(cfg):
    """The pool names replicas safely, but a direct caller on a host's task queue could pass "../builds/x": its
    dirs would be made, and later removed, outside replicas/."""
    from thaw.snapshot.host import HostSnapshots

    host = HostSnapshots(cfg)
    for rid in ("../builds/x", "a/b", ".hidden"):
        with pytest.raises(SnapshotError, match=r"replica id .*: letters, digits"):
            host.restore({"spec": {}, "host_facts": host.facts}, {}, rid=rid)
        with pytest.raises(SnapshotError, match=r"replica id .*: letters, digits"):
            host.cold_boot("0" * 64, {}, {}, rid=rid)
    assert not (cfg.work_dir / "builds" / "x").exists() and not list(cfg.work_dir.glob("replicas/*"))


def test_a_kept_restore_that_fails_half_way_stops_every_replica_it_started(cfg, worker, agent, thaw_cli, image,
                                                                          tmp_path, monkeypatch):
    """`thaw restore --keep` of 3: the third's record fails (a registry blip), and so do the stops' row removals.
    The first kept replica's stop raised, which ended the loop and left the second serving, known to nobody
    (the workflow fails, so the CLI never prints its id)."""
    from thaw.activities import host as host_acts

    snap = build_snapshot(thaw_cli, image, tmp_path)
    real_record, calls = agent._record, []

    def record(*args, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("registry blip")
        return real_record(*args, **kw)

    def remove_replica(url, rid):
        raise RuntimeError("registry still down")

    monkeypatch.setattr(agent, "_record", record)
    monkeypatch.setattr(host_acts.deployments, "remove_replica", remove_replica)
    res = thaw_cli("restore", snap["digest"], "--replicas", "3", "--keep", ok=False)
    assert res.exit_code == 1 and "registry blip" in res.output, res.output
    assert agent.serving == {} and len(calls) == 3
    assert not [d for d in (cfg.work_dir / "replicas").iterdir()], "a replica's dir (and process) stayed"
    monkeypatch.undo()
    agent.reap()  # the registry is back: the rows of the two that were recorded go
    assert deployments.replicas(cfg.registry_url) == []
