"""thaw.snapshot with real CRIU and real processes: launch, checkpoint, restore (one and four side by side),
secrets after restore, a failing restore, compatibility facts. Needs root and a working `criu check`.

The test image is two read-only layers: a small tmpfs holding the app (a stdlib HTTP server using the SDK)
over the host's own "/" (for python3). The app layer is a tmpfs because overlayfs refuses a lower layer
that lies inside another lower layer.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import pytest

from thaw.snapshot import (CriuError, HookFailed, Incompatible, ReplicaError, after_restore, before_snapshot, check,
                           checkpoint, compat_key, criu_check, host_facts, launch, prepare_root, require, restore)
from thaw.snapshot import _linux, cgroup, sdk
from thaw.snapshot.sdk import READY_PATH
from thaw.snapshot.host import SnapshotError, after_restore as host_after_restore
from thaw.snapshot.replica import REAP, answers_differ, comparable

_skip = "needs root (namespaces, mounts, criu)" if os.geteuid() != 0 else criu_check()
needs_criu = pytest.mark.skipif(_skip is not None, reason=f"CRIU unusable here: {_skip}")

PORT = 8080
USER = "thaw-test"  # in the test image's /etc/passwd (uid 4242) and /etc/group (4242, and thaw-extra 4343)
DATA_MB = 50
MARKER = "thaw-test-marker-4f1c2e"     # plain env at launch: must be in the images (positive control)
SECRET = "thaw-test-secret-9b7d13a5e0"  # only ever sent after restore: must not be in the images
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else os.path.realpath(sys.executable)

SERVER = r'''
import hashlib, json, os, random, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import thaw_sdk

SEED = random.getrandbits(64)                       # state made at start ...
DATA = random.Random(SEED).randbytes(int(os.environ["DATA_MB"]) << 20)
DIGEST = hashlib.sha256(DATA).hexdigest()[:16]      # ... and 50 MB of it
count = 0
seen = {}

@thaw_sdk.on_after_restore
def reread(env):
    if os.environ.get("FAIL_AFTER_RESTORE"):
        raise RuntimeError("cannot re-read the secret")
    seen["secret"] = os.environ.get("API_KEY")

@thaw_sdk.on_before_snapshot
def before():
    if os.environ.get("FAIL_BEFORE_SNAPSHOT"):
        raise RuntimeError("cannot get ready for the snapshot")
    seen["before_snapshot"] = seen.get("before_snapshot", 0) + 1

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
        global count
        if self.command == "POST" and os.environ.get("HANG_UP_POSTS"):  # no answer: the connection just closes
            self.close_connection = True
            return
        if os.environ.get("SDK") != "0" and thaw_sdk.handle(self):
            return
        if self.path == "/health":
            return self.reply({"ok": True})
        if self.path == "/answer":
            count += 1
            return self.reply({"seed": SEED, "digest": DIGEST, "count": count, "pid": os.getpid(),
                               "marker": os.environ.get("MARKER")})
        if self.path == "/rehash":  # the memory as it is now, not the digest taken at start
            return self.reply({"digest": hashlib.sha256(DATA).hexdigest()[:16]})
        if self.path == "/seen":
            return self.reply(seen)
        if self.path == "/environ":
            return self.reply(sorted(os.environ))
        if self.path == "/trickle":  # an answer that comes a byte at a time (a stream, a wedged server)
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.2)
            return
        if self.path == "/secret":
            return self.reply({"secret": seen.get("secret"), "restore_id": thaw_sdk.restore_id,
                               "rand": random.getrandbits(64)})
        self.send_error(404)

    do_POST = do_GET

server = HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
print("serving", flush=True)
thaw_sdk.mark_ready()
server.serve_forever()
'''

# A process tree for CRIU's page readers: two forked children that keep hashing their own 16 MB and report it
# through pipes, and a parent with busy threads; GET / says whether every process's memory is what it was.
TREE = r'''
import hashlib, json, os, random, threading, time
from http.server import BaseHTTPRequestHandler, HTTPServer

def blob(seed, mb):
    return bytearray(random.Random(seed).randbytes(mb << 20))

kids, want_kids = [], []
for i in range(2):
    r, w = os.pipe()
    if os.fork() == 0:
        os.close(r)
        b = blob(100 + i, 16)
        while True:
            os.write(w, (hashlib.sha256(b).hexdigest() + "\n").encode())
            time.sleep(0.05)
    os.close(w)
    kids.append(r)
    want_kids.append(hashlib.sha256(blob(100 + i, 16)).hexdigest())
B = [blob(i, 8) for i in range(4)]
digests = [hashlib.sha256(b).hexdigest() for b in B]

def spin(b):
    while True:
        hashlib.sha256(b[: 1 << 20]).digest()
        time.sleep(0.01)

for b in B[:2]:
    threading.Thread(target=spin, args=(b,), daemon=True).start()

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        seen = [(os.read(r, 1 << 16).decode().split() or [""])[-1] for r in kids]
        body = json.dumps({"parent": [hashlib.sha256(b).hexdigest() for b in B] == digests,
                           "children": seen == want_kids}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''


def _points_into(link: Path, d: Path) -> bool:
    try:
        return os.readlink(link).startswith(str(d))
    except OSError:
        return False


def get(replica, path):
    status, body = replica.http_request("GET", path, port=PORT)
    assert status == 200, (path, status, body)
    return json.loads(body)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("image")
    layer = d / "app-layer"
    layer.mkdir()
    _linux.mount("tmpfs", layer, "tmpfs", 0, "size=16m,mode=755")
    try:
        (layer / "app").mkdir()
        (layer / "app" / "server.py").write_text(SERVER)
        (layer / "app" / "tree.py").write_text(TREE)
        (layer / "etc").mkdir()  # the host's users and groups, and a user of the test's with a second group
        (layer / "etc" / "passwd").write_text(Path("/etc/passwd").read_text()
                                              + f"{USER}:x:4242:4242::/home/t:/bin/sh\n")
        (layer / "etc" / "group").write_text(Path("/etc/group").read_text()
                                             + f"{USER}:x:4242:\nthaw-extra:x:4343:root,{USER}\n")
        shutil.copy(sdk.__file__, layer / "app" / "thaw_sdk.py")
        yield [layer, Path("/")]
    finally:
        _linux.umount(layer)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("criu")
    yield d
    left = [m for m in _linux.mountpoints() if m.startswith(str(d))]
    assert not left, f"mounts left behind: {left}"


@pytest.fixture
def roots(image, work):
    """prepare_root() for the test image; every root made is cleaned up after the test."""
    made = []

    def make():
        made.append(prepare_root(image, work / "roots"))
        return made[-1]
    yield make
    for r in made:
        r.cleanup()


def start(root, work, name, data_mb=DATA_MB, user="", **extra):
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PORT": str(PORT), "DATA_MB": str(data_mb), "MARKER": MARKER,
           **extra}
    return launch(root.path, [PYTHON, "-I", "/app/server.py"], env, "/app", work / f"{name}.log", user=user)


@pytest.fixture(scope="module")
def snapshot(image, work):
    """Launched once, warmed, golden request answered, checkpointed (the launched replica is gone after)."""
    root = prepare_root(image, work / "roots")
    replica = start(root, work, "launch")
    try:
        beats = []
        ready_ms = replica.wait_ready(PORT, "/health", timeout=60, beat=lambda: beats.append(1))
        assert beats
        golden = get(replica, "/answer")
        # the env went through a pipe: it is in the workload's environment but on no command line
        environ = Path(f"/proc/{replica.pid}/environ").read_bytes()
        assert f"MARKER={MARKER}".encode() in environ
        for pid in (replica.pid, replica.proc.pid):
            assert MARKER.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        cp = checkpoint(replica, work / "images")
    finally:
        replica.stop()
        root.cleanup()
    assert not replica.alive()
    print(f"\nlaunch {replica.timings['launch_ms']:.0f} ms, ready {ready_ms:.0f} ms; "
          f"dump {cp.dump_ms:.0f} ms, {cp.size_bytes / 2**20:.1f} MiB of images")
    return cp, golden


@needs_criu
def test_restore_gives_the_golden_answer(snapshot, roots, work):
    cp, golden = snapshot
    assert golden["pid"] == 1 and golden["count"] == 1 and golden["marker"] == MARKER
    replica = restore(cp.images_dir, roots().path, work / "one.log")
    try:
        print(f"\nrestore {replica.timings['restore_ms']:.0f} ms")
        assert get(replica, READY_PATH) == {"ready": True}
        assert get(replica, "/answer") == {**golden, "count": golden["count"] + 1}
        t0 = time.monotonic()  # the timeout bounds the whole answer, not each read of it
        with pytest.raises(TimeoutError):
            replica.http_request("GET", "/trickle", port=PORT, timeout=1.0)
        assert time.monotonic() - t0 < 3
        assert get(replica, "/answer")["count"] == golden["count"] + 2  # it serves on
        replica.stop()
        replica.stop()  # idempotent
        assert not replica.alive() and not Path(f"/proc/{replica.pid}").exists()
    finally:
        replica.stop()


@needs_criu
@pytest.mark.parametrize("threads", [1, 3])
def test_restore_reads_pages_with_threads(snapshot, roots, work, threads):
    """read_threads (thaw's CRIU build): the pages are read by that many threads, each its share of the images,
    and the restored memory is the dumped memory, byte for byte (the 50 MB buffer is hashed again)."""
    cp, golden = snapshot
    with restore(cp.images_dir, roots().path, work / f"threads-{threads}.log", read_threads=threads) as r:
        assert get(r, "/rehash")["digest"] == golden["digest"]
        assert get(r, "/answer") == {**golden, "count": golden["count"] + 1}
    log = (work / f"threads-{threads}.criu-restore.log").read_text()
    assert (f"pages with {threads} threads" in log) is (threads > 1), "is criu built with infra/criu/*.patch?"


@needs_criu
def test_process_tree_restores_with_read_threads(roots, work):
    """Every process of a tree (a parent with running threads, two forked children) is restored with 4 page
    readers, and each one's memory is what was dumped, restore after restore."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PORT": str(PORT)}
    replica = launch(roots().path, [PYTHON, "-I", "/app/tree.py"], env, "/app", work / "tree.log")
    try:
        replica.wait_healthy(PORT, "/", timeout=60)
        assert get(replica, "/") == {"parent": True, "children": True}
        checkpoint(replica, work / "images-tree")
    finally:
        replica.stop()
    for i in range(3):
        with restore(work / "images-tree", roots().path, work / f"tree-{i}.log", read_threads=4) as r:
            time.sleep(0.2)  # the children report again
            assert get(r, "/") == {"parent": True, "children": True}
        log = (work / f"tree-{i}.criu-restore.log").read_text()
        readers = [int(n) for n in re.findall(r"pages with (\d+) threads", log)]
        assert len(readers) == 3 and max(readers) == 4, readers  # each process read its pages with threads


@needs_criu
def test_four_replicas_side_by_side(snapshot, roots, work):
    cp, golden = snapshot
    rs = [roots() for _ in range(4)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(restore, cp.images_dir, r.path, work / f"four-{i}.log") for i, r in enumerate(rs)]
        replicas = [f.result() for f in futures if f.exception() is None]
        errors = [f.exception() for f in futures if f.exception() is not None]
    wall_ms = (time.monotonic() - t0) * 1000
    try:
        assert not errors, errors
        print(f"\n4 restores side by side: {wall_ms:.0f} ms wall, each "
              + ", ".join(f"{r.timings['restore_ms']:.0f}" for r in replicas) + " ms")
        assert len({r.pid for r in replicas}) == 4
        for r in replicas:  # same port, same in-namespace pid, same state in each
            assert get(r, "/answer") == {**golden, "count": golden["count"] + 1}
        # one memory image, so one random stream, until after_restore re-seeds each replica
        assert len({get(r, "/secret")["rand"] for r in replicas}) == 1
        for i, r in enumerate(replicas):
            assert after_restore(r, PORT, {}, restore_id=f"r{i}")["restore_id"] == f"r{i}"
        assert len({get(r, "/secret")["rand"] for r in replicas}) == 4
    finally:
        for r in replicas:
            r.stop()
    for r in rs:
        r.cleanup()
    for r in replicas:
        assert not r.alive() and r.proc.returncode is not None
        assert not Path(f"/proc/{r.pid}").exists(), f"replica pid {r.pid} still there"
    left = [m for m in _linux.mountpoints() if m.startswith(str(work / "roots"))]
    assert not left, f"mounts left behind: {left}"


@needs_criu
def test_secret_arrives_after_restore_only(snapshot, roots, work):
    cp, _ = snapshot
    replica = restore(cp.images_dir, roots().path, work / "secret.log")
    try:
        # the reaper (what criu became) lives in the agent's mount namespace, not in the one criu may have run
        # in for its kdat cache, which held a copy of every mount of the agent (stopped replicas' roots too)
        assert os.readlink(f"/proc/{replica.proc.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
        assert get(replica, "/secret")["secret"] is None
        answer = after_restore(replica, PORT, {"API_KEY": SECRET}, restore_id="rid-1")
        assert answer == {"restore_id": "rid-1", "env": ["API_KEY"], "callbacks": 1}
        assert get(replica, "/secret")["secret"] == SECRET
        again = checkpoint(replica, work / "images-after-secret")  # a restored replica checkpoints too
    finally:
        replica.stop()

    def grep(value, d):
        return subprocess.run(["grep", "-r", "-l", "-F", "-a", value, str(d)], capture_output=True, text=True)
    found = grep(SECRET, cp.images_dir)
    assert found.returncode == 1, f"secret found in the images: {found.stdout}{found.stderr}"
    # the controls: grep finds the plain launch env in the images, and the secret once the server held it
    assert "pages-" in grep(MARKER, cp.images_dir).stdout
    assert "pages-" in grep(SECRET, again.images_dir).stdout


@needs_criu
def test_before_snapshot_callbacks_run_once_before_the_dump_and_a_failing_hook_is_an_error(roots, work):
    """The host's POST /thaw/before-snapshot runs the SDK's callbacks in the process that is then dumped (its
    restores carry what they did); a failing callback of either hook is a one-line HookFailed (the host then
    stores nothing, or falls back); a server without the SDK is told apart (False) and snapshotted as before."""
    replica = start(roots(), work, "before", data_mb=1)
    try:
        replica.wait_ready(PORT, "/health", timeout=60)
        assert get(replica, "/seen") == {}
        assert before_snapshot(replica, PORT) is True
        cp = checkpoint(replica, work / "images-before")
    finally:
        replica.stop()
    restored = restore(cp.images_dir, roots().path, work / "before-restored.log")
    try:
        assert get(restored, "/seen") == {"before_snapshot": 1}
    finally:
        restored.stop()
    for name, env, failing in (("failing", {"FAIL_BEFORE_SNAPSHOT": "1", "FAIL_AFTER_RESTORE": "1"}, True),
                               ("no-sdk", {"SDK": "0"}, False)):
        replica = start(roots(), work, name, data_mb=1, **env)
        try:
            replica.wait_ready(PORT, "/health", timeout=60)
            if failing:
                with pytest.raises(HookFailed, match="RuntimeError in a callback of /thaw/before-snapshot") as e:
                    before_snapshot(replica, PORT)
                assert "\n" not in str(e.value) and "cannot get ready" not in str(e.value)  # the type, not the text
                assert f"; log {replica.log_path}" in str(e.value)  # where the callback's traceback is
                with pytest.raises(HookFailed, match="RuntimeError in a callback of /thaw/after-restore"):
                    after_restore(replica, PORT, {})
                with pytest.raises(HookFailed):  # the host's rule: with nothing to deliver, still an error
                    host_after_restore(replica, {"port": PORT}, {}, optional_env={"CUDA_VISIBLE_DEVICES": "GPU-x"})
            else:
                assert before_snapshot(replica, PORT) is False
                with pytest.raises(ReplicaError) as e:
                    after_restore(replica, PORT, {})
                assert not isinstance(e.value, HookFailed)
                # the host's rule: ignored unless there is env to deliver (the GPU a replica moved to is not:
                # every GPU restore of a server without the SDK failed when it was)
                host_after_restore(replica, {"port": PORT}, {}, optional_env={"CUDA_VISIBLE_DEVICES": "GPU-x"})
                with pytest.raises(ReplicaError):
                    host_after_restore(replica, {"port": PORT}, {"API_KEY": SECRET})
        finally:
            replica.stop()
    # one that hangs up on any POST: the same rule (it was an error however little there was to deliver, and
    # its restore fell back to a cold boot though it served)
    replica = start(roots(), work, "hangs-up", data_mb=1, SDK="0", HANG_UP_POSTS="1")
    try:
        replica.wait_ready(PORT, "/health", timeout=60)
        host_after_restore(replica, {"port": PORT}, {}, optional_env={"CUDA_VISIBLE_DEVICES": "GPU-x"})
        with pytest.raises(SnapshotError, match=f"replica {replica.pid}: its after-restore hook failed: "
                                                f"RemoteDisconnected: ") as e:
            host_after_restore(replica, {"port": PORT}, {"API_KEY": SECRET})
        assert "\n" not in str(e.value)
    finally:
        replica.stop()


def test_only_the_host_that_launched_a_server_may_call_its_hooks(roots, work):
    """A replica's port is published on the host, so anything on the host's network could POST /thaw/after-restore
    (env, secrets) or /thaw/before-snapshot (weights parked). The host launches the server with a hook token the
    SDK takes out of its environment; a POST without it, or with another, runs nothing and is a HookFailed."""
    replica = start(roots(), work, "token", data_mb=1, THAW_HOOK_TOKEN="t0ken")
    try:
        replica.wait_ready(PORT, "/health", timeout=60)
        assert "THAW_HOOK_TOKEN" not in get(replica, "/environ") and "MARKER" in get(replica, "/environ")
        for token in ("", "t0ke", "t0ken\u00e9"):
            with pytest.raises(HookFailed, match=f"/thaw/before-snapshot answered 403: .*{sdk.HOOK_TOKEN_HEADER}"):
                before_snapshot(replica, PORT, token=token)
            with pytest.raises(HookFailed, match="/thaw/after-restore answered 403"):
                after_restore(replica, PORT, {"API_KEY": SECRET}, token=token)
            with pytest.raises(HookFailed):  # the host's rule: a refusal is an error, with or without env
                host_after_restore(replica, {"port": PORT, "hook_token": token}, {})
        assert get(replica, "/seen") == {} and get(replica, "/secret")["secret"] is None  # nothing ran
        assert before_snapshot(replica, PORT, token="t0ken") is True
        host_after_restore(replica, {"port": PORT, "hook_token": "t0ken"}, {"API_KEY": SECRET})
        assert get(replica, "/seen") == {"before_snapshot": 1, "secret": SECRET}
    finally:
        replica.stop()


def test_clear_stops_a_replica_no_record_names_and_unmounts_its_root(image, work):
    """What an agent killed mid-restore leaves: a replica on an overlay root under its dir, no record. An agent
    start (cleanup_stale -> clear) finds it by its root's mount, kills it (held by a pidfd first: the scan of
    /proc takes a while, so its pid could be another process's by then), unmounts and removes the dir."""
    from thaw.snapshot.host import clear

    d = work / "orphan"
    replica = start(prepare_root(image, d), work, "orphan", data_mb=1)
    replica.wait_ready(PORT, "/health", timeout=60)
    clear(d)
    assert replica.proc.wait(10) is not None and not d.exists()
    assert not [m for m in _linux.mountpoints() if m.startswith(f"{d}/")]


def test_a_failed_start_whose_process_outlives_its_sigkill_keeps_its_gpu_and_root_till_it_is_gone(tmp_path):
    """A replica that failed to start is stopped; one that outlives its SIGKILL (stuck in the kernel, a wedged
    driver call) still uses its GPU and root: they were handed back at once (the next replica got a busy GPU, the
    root was detached under it). Now they go once it is gone, and the start's own error is what is raised."""
    import threading
    import types

    from thaw.snapshot.host import HostSnapshots

    gone, released = threading.Event(), []

    class Stuck:
        proc = types.SimpleNamespace(wait=lambda: gone.wait(30))

        def stop(self):
            raise ReplicaError("replica 42 is still there 10 s after SIGKILL")

    host = types.SimpleNamespace(give_gpu=lambda slot: released.append(f"gpu {slot}"))
    root = types.SimpleNamespace(cleanup=lambda: released.append("root"))
    work, logs = tmp_path / "work", tmp_path / "logs" / "r-1"
    work.mkdir()
    logs.mkdir(parents=True)
    with pytest.raises(KeyError):  # the start's own failure (here: a spec without a port), not the stop's
        HostSnapshots._own(host, "r-1", Stuck, root, {}, work, logs, 0)
    time.sleep(0.2)
    assert released == [] and work.exists()
    gone.set()
    deadline = time.monotonic() + 10
    while len(released) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert released == ["gpu 0", "root"] and not work.exists()


def test_the_reaper_keeps_a_pid_1_that_died_at_once_until_the_agent_holds_it():
    """criu exec()s the reaper, which prints ``ready <pid>``: a restored pid 1 that died at once (the OOM killer)
    was reaped before the agent's pidfd_open, which then failed with a bare ProcessLookupError or, its pid
    reused, held a stranger the next stop would SIGKILL. It stays a zombie until the agent closes its stdin."""
    code = ("import os, sys\n"
            "if os.fork() == 0:\n    os._exit(7)  # the restored pid 1, dead at once\n"
            "os.execv(sys.executable, [sys.executable, '-I', '-S', sys.argv[1]])  # as criu --exec-cmd")
    reaper = subprocess.Popen([sys.executable, "-c", code, str(REAP)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    try:
        word, pid = reaper.stdout.readline().split()
        assert word == b"ready"
        time.sleep(0.3)
        assert Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"  # not reaped
        pidfd = os.pidfd_open(int(pid))
        reaper.stdin.close()  # the agent holds it now
        assert reaper.wait(10) == 7  # its exit code, as before
        os.close(pidfd)
    finally:
        reaper.kill()
        reaper.wait()


def test_the_sdks_hooks_refuse_hostile_bodies_and_apply_nothing():
    """A body too long for memory, a negative or bad Content-Length (read until the client closed), JSON nested
    past the parser, or a payload of the wrong shape: a traceback and no answer, or a 500 "callback failed" with
    os.environ partly updated. Now 413 or 400, and nothing applied."""
    import http.client
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            if not sdk.handle(self):
                self.send_error(404)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    def post(body: bytes, length: str | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
        try:
            conn.putrequest("POST", sdk.AFTER_RESTORE_PATH)
            conn.putheader("Content-Length", str(len(body)) if length is None else length)
            conn.endheaders()
            conn.send(body)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    env = dict(os.environ)
    try:
        for body, length, status in ((b"[" * 100_000, None, 400), (b"[]", None, 400), (b'{"env": []}', None, 400),
                                     (b'{"env": {"A=B": "x", "OK": "1"}}', None, 400), (b"{}", "-1", 413),
                                     (b"{}", "two", 413), (b"{}", str(1 << 40), 413)):
            got = post(body, length)
            assert got[0] == status and "error" in got[1], (body[:20], length, got)
        assert dict(os.environ) == env  # nothing applied
        status, reply = post(b'{"env": {"THAW_SDK_TEST": "1"}, "restore_id": "r-1"}')
        assert status == 200 and reply["env"] == ["THAW_SDK_TEST"] and os.environ["THAW_SDK_TEST"] == "1"
    finally:
        os.environ.pop("THAW_SDK_TEST", None)
        srv.shutdown()
        srv.server_close()


@needs_criu
def test_leave_running_checkpoint(roots, work):
    root = roots()
    replica = start(root, work, "leave", data_mb=1, SDK="0")
    try:
        replica.wait_ready(PORT, "/health", timeout=60)  # no /thaw/ready here: falls back to /health
        first = get(replica, "/answer")
        cp = checkpoint(replica, work / "images-leave", leave_running=True)
        assert cp.leave_running and replica.alive()
        assert get(replica, "/answer")["count"] == first["count"] + 1
    finally:
        replica.stop()
    assert not replica.alive()


def cpu_cgroup_of(pid: int) -> str:
    """``pid``'s cgroup in the hierarchy with the cpu controller (v1 ``cpu``, else v2's)."""
    lines = [line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()]
    return next((p for _, c, p in lines if "cpu" in c.split(",")), None) or next(p for _, c, p in lines if not c)


@needs_criu
def test_replicas_run_in_the_cgroup_given_and_a_snapshot_does_not_carry_it(roots, work):
    """A launch and a restore put the replica's whole tree in the cgroup they are given, at its weight. CRIU
    leaves cgroups alone: a restore lands where it is told (or where its caller is), not where the dumped
    replica ran (with CRIU's default cgroup handling it would go back there)."""
    names = [f"thaw-test-{os.getpid()}-{x}" for x in "ab"]
    a, b = (cgroup.create(n, w) for n, w in zip(names, (10, 1)))
    replicas = []
    try:
        assert a is not None and b is not None, "no writable cpu cgroup on this host"
        v2 = (a / "cgroup.controllers").exists()
        assert [(cg / ("cpu.weight" if v2 else "cpu.shares")).read_text().strip() for cg in (a, b)] == \
            (["10", "1"] if v2 else ["102", "10"])
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PORT": str(PORT), "DATA_MB": "1", "MARKER": MARKER}
        replicas.append(launch(roots().path, [PYTHON, "-I", "/app/server.py"], env, "/app", work / "cg.log", cg=a))
        replicas[0].wait_ready(PORT, "/health", timeout=60)
        own = PurePosixPath(cpu_cgroup_of(os.getpid()))
        assert {cpu_cgroup_of(p) for p in (replicas[0].pid, replicas[0].proc.pid)} == {str(own / names[0])}
        cp = checkpoint(replicas[0], work / "images-cg")
        for cg, where in ((b, str(own / names[1])), (None, str(own))):
            replicas.append(restore(cp.images_dir, roots().path, work / "cg-restore.log", cg=cg))
            r = replicas[-1]
            assert get(r, "/answer")["marker"] == MARKER
            assert {cpu_cgroup_of(p) for p in (r.pid, r.proc.pid)} == {where}
    finally:
        for r in replicas:
            r.stop()
        for cg in (a, b):
            cgroup.remove(cg)
    assert not any(cg and cg.exists() for cg in (a, b))


def test_where_no_cpu_cgroup_can_be_made_the_reason_is_logged_and_replicas_stay_put(tmp_path, caplog):
    """Where no cgroup can be made (no cpu controller, a read-only cgroupfs), the replicas run where the agent
    does, and the reason is logged once; nothing is left behind."""
    parent = tmp_path / "not-a-cgroup"
    assert cgroup.create("thaw-replicas-x", 10, parent=parent) is None
    assert "replicas share the agent's CPU cgroup" in caplog.text and str(parent) in caplog.text
    assert cgroup.join(None, ["true"]) == ["true"] and not parent.exists()
    cgroup.remove(None)


def launch_host_root(image, work, name: str, data_mb: int):
    """The test server on the host's filesystem (``launch(root=None)``), ready to answer."""
    app = image[0] / "app"
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PORT": str(PORT), "DATA_MB": str(data_mb), "MARKER": MARKER}
    replica = launch(None, [PYTHON, "-I", str(app / "server.py")], env, str(app), work / f"{name}.log")
    try:
        replica.wait_ready(PORT, "/health", timeout=60)
    except BaseException:
        replica.stop()
        raise
    return replica


@needs_criu
def test_host_root_replica(image, work):
    """root=None: the host's filesystem and pids, its own network namespace (the GPU path, where the model's CUDA
    stack is the host's); it checkpoints and restores like an image-rooted replica, under the same pid."""
    replica = launch_host_root(image, work, "host-root", data_mb=1)
    try:
        golden = get(replica, "/answer")
        assert golden["pid"] == replica.pid and replica.root is None
        for ns in ("mnt", "pid"):
            assert os.readlink(f"/proc/{replica.pid}/ns/{ns}") == os.readlink(f"/proc/self/ns/{ns}")
        assert os.readlink(f"/proc/{replica.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        checkpoint(replica, work / "images-host-root")
    finally:
        replica.stop()
    for i in range(2):
        with restore(work / "images-host-root", None, work / f"host-root-{i}.log") as r:
            assert r.pid == golden["pid"] and get(r, "/answer") == {**golden, "count": 2}


def _anon_vmas(pid: int) -> list[tuple[int, bool]]:
    """(size in kB, MADV_HUGEPAGE set) of each anonymous mapping of pid, from /proc/PID/smaps."""
    out, size = [], 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[:1] in "0123456789abcdef" and "-" in line.split()[0]:
                anon = len(line.split()) < 6  # no path: anonymous
            elif line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("VmFlags:") and anon:
                out.append((size, "hg" in line.split()[1:]))
    return out


def _anon_huge_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))


@needs_criu
def test_restore_into_huge_pages(image, work):
    """huge_pages=True (thaw's CRIU build): the restored process's large anonymous memory is MADV_HUGEPAGE and
    backed by transparent huge pages, whatever the host's THP mode (madvise here); False leaves it as dumped."""
    replica = launch_host_root(image, work, "thp", data_mb=64)
    try:
        golden = get(replica, "/answer")
        assert not any(hg for _, hg in _anon_vmas(replica.pid))  # nothing asked for huge pages at launch
        checkpoint(replica, work / "images-thp")
    finally:
        replica.stop()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    for huge in (True, False):
        with restore(work / "images-thp", None, work / f"thp-{huge}.log", huge_pages=huge) as r:
            assert get(r, "/answer") == {**golden, "count": 2}  # same memory, whatever the pages
            marked = [kb for kb, hg in _anon_vmas(r.pid) if hg]
            if huge:
                assert any(kb >= 64 << 10 for kb in marked), \
                    "the 64 MB buffer is not MADV_HUGEPAGE: is criu built with infra/criu/restore-thp.patch?"
                assert "[never]" in thp or _anon_huge_kb(r.pid) >= 32 << 10
            else:
                assert marked == [] and _anon_huge_kb(r.pid) == 0 or "[always]" in thp


@needs_criu
def test_launch_failures_are_reported(roots, work):
    replica = launch(roots().path, ["/no/such/server"], {}, "/", work / "nope.log")
    with pytest.raises(ReplicaError, match="exited with code 127.*No such file"):
        replica.wait_healthy(PORT, "/health", timeout=30)
    replica.stop()
    with pytest.raises(ReplicaError, match="no-such-dir"):
        launch(roots().path, [PYTHON, "-c", "pass"], {}, "/no-such-dir", work / "nope.log")


def test_a_launch_gets_dockers_etc_hosts_home_path_and_hostname(roots, work):
    """HOME, PATH and HOSTNAME unless the env has them; /etc/hosts and /etc/hostname over whatever the image has
    there (a symlink, a FIFO), inside its root."""
    from services import wait_until

    code = ("import os, time; print(repr([os.environ.get(k) for k in ('HOME', 'PATH', 'HOSTNAME')] + "
            "[open(p).read() for p in ('/etc/hosts', '/etc/hostname', '/app/target')]), flush=True); "
            "time.sleep(60)")
    names = ["127.0.0.1\tlocalhost thaw\n::1\tlocalhost ip6-localhost ip6-loopback\n", "thaw\n", "mine\n"]
    for env, want in (({}, ["/root", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "thaw"]),
                      ({"HOME": "/srv", "PATH": "/usr/bin", "HOSTNAME": "h"}, ["/srv", "/usr/bin", "h"])):
        root, log = roots().path, work / f"env-{len(env)}.log"
        (root / "etc").mkdir(exist_ok=True)
        (root / "app" / "target").write_text("mine\n")
        (root / "etc" / "hosts").unlink(missing_ok=True)
        (root / "etc" / "hosts").symlink_to("/app/target")
        (root / "etc" / "hostname").unlink(missing_ok=True)
        os.mkfifo(root / "etc" / "hostname")
        replica = launch(root, [PYTHON, "-c", code], env, "/", log)
        try:
            wait_until(lambda: log.exists() and log.read_text().strip(), 30, "the server's line")
            assert log.read_text().strip() == repr(want + names)
        finally:
            replica.stop()


def test_users_and_ports_are_read_from_the_image_as_docker_reads_them(monkeypatch):
    """USER: a name or uid (the entry found either way), an optional group by name or gid, supplementary groups
    that list the user, HOME from the entry; a number need not be listed, a name must. The port: the image's one
    exposed TCP port. Root is any spelling of uid 0 and gid 0."""
    from thaw.activities.snapshot import image_port
    from thaw.registry.queries import NotFound
    from thaw.snapshot import _nsinit
    from thaw.snapshot.host import is_root

    tables = {"/etc/passwd": [["root", "x", "0", "0", "root", "/root", "/bin/sh"],
                              ["app", "x", "1000", "1000", "", "/home/app", "/bin/sh"]],
              "/etc/group": [["app", "x", "1000", ""], ["video", "x", "44", "root,app"], ["staff", "x", "50", ""]]}
    monkeypatch.setattr(_nsinit, "_table", tables.__getitem__)
    assert _nsinit.resolve_user("app") == _nsinit.resolve_user("1000") == (1000, 1000, [44, 1000], "/home/app")
    assert _nsinit.resolve_user("app:staff") == (1000, 50, [50], "/home/app")
    assert _nsinit.resolve_user("777:44") == (777, 44, [44], "/")
    assert _nsinit.resolve_user("777") == (777, 0, [0], "/")
    for bad in ("nobody", "app:nogroup", "\u00b2", "app:\u00b2"):
        with pytest.raises(RuntimeError, match="is not in the image's /etc/"):
            _nsinit.resolve_user(bad)
    assert all(map(is_root, ("", "root", "0", "root:0", "0:root"))) and not any(map(is_root, ("app", "0:staff")))
    assert image_port({}) == 8080 and image_port({"ExposedPorts": {"9000/tcp": {}, "53/udp": {}}}) == 9000
    assert image_port({"ExposedPorts": {"9000": {}}}) == 9000
    for ports in ({"80/tcp": {}, "443/tcp": {}}, {"http": {}}, {"\uff19\uff10/tcp": {}}, {"0/tcp": {}}):
        with pytest.raises(NotFound, match="--port"):
            image_port({"ExposedPorts": ports})


def test_the_stop_signal_is_the_images_stopsignal_unless_given():
    """As Docker: the image's StopSignal (a name with or without SIG, or a number), else SIGTERM; --stop-signal
    overrides it. One that is no signal, or would only pause the server, fails the build's plan."""
    import signal

    from thaw.activities.snapshot import image_defaults
    from thaw.registry.queries import NotFound
    from thaw.snapshot.replica import parse_signal
    from thaw.workflows.build_snapshot import ModelSpec

    cmd = {"Cmd": ["serve"]}
    assert image_defaults(ModelSpec(), cmd).stop_signal == "SIGTERM"
    assert image_defaults(ModelSpec(), {**cmd, "StopSignal": "quit"}).stop_signal == "SIGQUIT"
    assert image_defaults(ModelSpec(), {**cmd, "StopSignal": "2"}).stop_signal == "SIGINT"
    assert image_defaults(ModelSpec(stop_signal="SIGUSR1"), {**cmd, "StopSignal": "SIGQUIT"}).stop_signal == "SIGUSR1"
    assert image_defaults(ModelSpec(), {**cmd, "StopSignal": "SIGRTMIN+3"}).stop_signal == "SIGRTMIN+3"  # systemd's
    assert image_defaults(ModelSpec(), {**cmd, "StopSignal": "RTMAX-1"}).stop_signal == "SIGRTMIN+29"
    assert parse_signal("SIGRTMIN+29") == parse_signal("63") == signal.SIGRTMAX - 1
    for bad in ("32", "65", "0", "SIGRTMIN+31", "SIGRTMIN-1", "KILLME", ""):
        with pytest.raises(ValueError, match="is not a signal"):
            parse_signal(bad)
    with pytest.raises(NotFound, match=r"'SIGBOGUS' is not a signal.*\(the image says so: override it with "
                                       r"--stop-signal\)"):
        image_defaults(ModelSpec(), {**cmd, "StopSignal": "SIGBOGUS"})
    with pytest.raises(NotFound, match="SIGSTOP would pause the server"):
        image_defaults(ModelSpec(stop_signal="STOP"), cmd)


def creds(pid: int) -> tuple[str, str, str]:
    """A process's real uid, real gid and supplementary groups, from /proc/PID/status."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return status["Uid"].split()[0], status["Gid"].split()[0], status["Groups"].strip()


@needs_criu
def test_the_images_user_runs_the_server_and_its_restores(roots, work):
    """The image's User (Docker's USER: a name or id, with or without a group) runs the server, looked up in the
    root's /etc/passwd and /etc/group (here the host's, the image's lower layer), HOME from there unless set; a
    restore brings back the same credentials; a name the image does not know is a one-line launch error."""
    replica = start(roots(), work, "numeric", data_mb=1, user="4321:55", HOME="/app")
    try:
        replica.wait_ready(PORT, "/health", timeout=60)
        assert creds(replica.pid) == ("4321", "55", "55")
        assert b"HOME=/app\0" in Path(f"/proc/{replica.pid}/environ").read_bytes()
    finally:
        replica.stop()
    for user, error in (("no-such-user", "user 'no-such-user' (the image's User) is not in the image's /etc/passwd"),
                        ("nobody:no-such-group", "group 'no-such-group' (the image's User) is not in the image's")):
        with pytest.raises(ReplicaError, match=re.escape(error)):
            start(roots(), work, "unknown", data_mb=1, user=user)
    nobody = pwd.getpwnam("nobody")  # a name of the host's /etc/passwd, the image's lower layer
    replica = start(roots(), work, "nobody", data_mb=1, user="nobody:thaw-extra")
    try:
        replica.wait_ready(PORT, "/health", timeout=60)
        assert creds(replica.pid) == (str(nobody.pw_uid), "4343", "4343")
    finally:
        replica.stop()
    replica = start(roots(), work, USER, data_mb=1, user=USER)
    try:
        replica.wait_ready(PORT, "/health", timeout=60)
        want = ("4242", "4242", "4242 4343")  # its primary group and the one that lists it
        assert creds(replica.pid) == want
        assert b"HOME=/home/t\0" in Path(f"/proc/{replica.pid}/environ").read_bytes()
        if not _linux.has_capability(_linux.CAP_SYS_RESOURCE):  # this VM's root lacks it: what the host checks
            with pytest.raises(CriuError, match="rlimit"):  # (SnapshotError before the launch, test_snapshot)
                checkpoint(replica, work / "images-user")
            return
        cp = checkpoint(replica, work / "images-user")
    finally:
        replica.stop()
    restored = restore(cp.images_dir, roots().path, work / "user-restored.log")
    try:
        assert get(restored, "/answer")["marker"] == MARKER and creds(restored.pid) == want
    finally:
        restored.stop()


@needs_criu
def test_a_server_on_another_port_is_named_when_readiness_times_out(roots, work, monkeypatch):
    """The server listens on 8081, the host waits on 8080: the timeout says where it listens (its own network
    namespace: nothing else of the host shows); while nothing listens yet, it says that. thaw's default health
    path answering 404 is not waited out for the whole timeout; a path of the user's is (404 while loading)."""
    from thaw.snapshot import replica as replica_mod

    replica = start(roots(), work, "other-port", data_mb=1, PORT=str(PORT + 1))
    try:
        replica.wait_ready(PORT + 1, "/health", timeout=60)
        assert replica.listening_ports() == {PORT + 1}
        with pytest.raises(ReplicaError, match=f"listens on TCP port {PORT + 1}, not {PORT} \\(--port\\)"):
            replica.wait_ready(PORT, "/health", timeout=1)
    finally:
        replica.stop()
    monkeypatch.setattr(replica_mod, "NOT_FOUND_S", 0.5)
    replica = start(roots(), work, "no-sdk", data_mb=1, SDK="0")  # no /thaw/ready: the health path decides
    try:
        replica.wait_healthy(PORT, "/health", timeout=60)
        t0 = time.monotonic()
        with pytest.raises(ReplicaError, match=r"/healthz answered 404 for 0.5s: the server has no such path "
                                               r"\(thaw's default\); give its health path with --health"):
            replica.wait_ready(PORT, "/healthz", timeout=60)
        assert time.monotonic() - t0 < 10
        with pytest.raises(ReplicaError, match="not 200 after 2s \\(HTTP 404"):  # a path of the user's: waited
            replica.wait_ready(PORT, "/loading", timeout=2)
    finally:
        replica.stop()
    replica = start(roots(), work, "sdk", data_mb=1)  # its /thaw/ready answers, but not the health path
    try:
        replica.wait_ready(PORT, "/health", timeout=60)
        with pytest.raises(ReplicaError, match=r"/healthz answered 404 for 0.5s: the server has no such path"):
            replica.wait_ready(PORT, "/healthz", timeout=60)
    finally:
        replica.stop()
    idle = launch(roots().path, [PYTHON, "-c", "import time; time.sleep(60)"], {}, "/", work / "idle.log")
    try:
        with pytest.raises(ReplicaError, match="nothing listens on a TCP port in the replica"):
            idle.wait_healthy(PORT, "/health", timeout=1)
    finally:
        idle.stop()


@needs_criu
def test_broken_images_fail_with_the_log_named(snapshot, roots, work):
    cp, _ = snapshot
    truncated, garbled = work / "images-truncated", work / "images-garbled"
    for d in (truncated, garbled):
        shutil.copytree(cp.images_dir, d)
    pages = max(truncated.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    os.truncate(pages, pages.stat().st_size // 2)  # caught before criu runs (CRIU 4.2.1 would spin forever)
    with pytest.raises(CriuError, match=f"{pages.name} has .* bytes"):
        restore(truncated, roots().path, work / "truncated.log")

    meta = json.loads((truncated / "thaw-snapshot.json").read_text())  # hide the damage from the size check
    meta["files"][pages.name] = pages.stat().st_size
    (truncated / "thaw-snapshot.json").write_text(json.dumps(meta))
    with pytest.raises(CriuError, match="criu restore"):  # 4.2.1 hangs; killed at the timeout with its children
        restore(truncated, roots().path, work / "hung.log", timeout=1.5)
    holders = [p for p in Path("/proc").glob("[0-9]*/fd/*") if _points_into(p, truncated)]
    assert not holders, f"processes still hold the broken images: {holders}"
    (work / "hung.criu-restore.log").unlink()  # the spinning restorer logs ~40 MB/s

    with open(garbled / "core-1.img", "r+b") as f:  # same size, broken magic: criu itself fails
        f.write(b"\0" * 8)
    log = work / "garbled.criu-restore.log"
    with pytest.raises(CriuError) as e:
        restore(garbled, roots().path, work / "garbled.log", criu_log=log)
    msg = str(e.value)
    print(f"\n{msg}")
    assert msg.startswith("criu restore failed") and "\n" not in msg and str(log) in msg and log.exists()

    # a dump that fails names its log too: an open, deleted 2 MiB file is over CRIU's ghost-file limit
    ghost = "import os, time; f = open('/big', 'wb'); f.write(bytes(2 << 20)); f.flush(); os.unlink('/big'); " \
            "print('ready', flush=True); time.sleep(600)"
    replica = launch(roots().path, [PYTHON, "-I", "-c", ghost], {}, "/", work / "ghost.log")
    try:
        deadline = time.monotonic() + 30
        while "ready" not in replica.log_tail() and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(CriuError) as e:
            checkpoint(replica, work / "images-ghost")
        msg = str(e.value)
        print(msg)
        assert "criu dump failed" in msg and str(work / "images-ghost" / "dump.log") in msg and "\n" not in msg
        assert replica.alive()  # criu lets the tree run on after a failed dump
    finally:
        replica.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (overlay mounts, mknod, trusted.* xattrs)")
def test_a_roots_writes_are_kept_as_a_layer_without_sockets_devices_or_the_mounts_records(image, roots, work):
    """Root.keep_writes: the upper layer, moved, is a lower layer that shows a new root what the old one showed
    (whiteouts, opaque dirs, xattrs); sockets and device nodes other than whiteouts are left out, and overlayfs'
    records of the mount that wrote it (origin, impure, uuid) are dropped. A root nobody wrote to keeps nothing."""
    import socket

    empty = roots()
    assert empty.keep_writes(work / "nothing") == 0 and not (work / "nothing").exists()
    assert not empty.dir.exists() and str(empty.path) not in _linux.mountpoints()

    fs = work / "writes-fs"  # a tmpfs: overlayfs takes no layer inside another one (the test image has "/")
    fs.mkdir()
    _linux.mount("tmpfs", fs, "tmpfs", 0, "size=4m,mode=755")
    root = prepare_root(image, fs / "roots")
    try:
        (root.path / "app" / "server.py").unlink()  # a file of the image deleted: a whiteout
        (root.path / "app" / "new").mkdir()
        (root.path / "app" / "new" / "f").write_text("data")
        os.setxattr(root.path / "app" / "new" / "f", "user.kind", b"cache")
        (root.path / "etc" / "passwd").write_text("copied up\n")  # a copy-up: overlayfs records its origin
        os.mknod(root.path / "app" / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(root.path / "app" / "control.sock"))
        sock.close()
        writes = fs / "writes"
        kept = root.keep_writes(writes)
        assert not root.dir.exists() and str(root.path) not in _linux.mountpoints()
        names = {str(p.relative_to(writes)) for p in writes.rglob("*")}
        assert names == {"app", "app/server.py", "app/new", "app/new/f", "etc", "etc/passwd", "app/blk",
                         "app/control.sock"} and kept == 8
        for gone in ("server.py", "blk", "control.sock"):  # whiteouts: the socket and the device left out
            st = os.lstat(writes / "app" / gone)
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, gone
        assert not [n for p in [writes, *writes.rglob("*")]
                    for n in os.listxattr(p, follow_symlinks=False) if n.startswith("trusted.overlay.")]
        with prepare_root([writes, *image], work / "roots") as again:
            assert not (again.path / "app" / "server.py").exists() and (again.path / "app" / "tree.py").exists()
            assert (again.path / "app" / "new" / "f").read_text() == "data"
            assert os.getxattr(again.path / "app" / "new" / "f", "user.kind") == b"cache"
            assert (again.path / "etc" / "passwd").read_text() == "copied up\n"
            assert not (again.path / "app" / "blk").exists() and not (again.path / "app" / "control.sock").exists()
            (again.path / "app" / "new" / "f").write_text("mine")  # on its own upper layer
        assert (writes / "app" / "new" / "f").read_text() == "data"
    finally:
        root.cleanup()
        _linux.umount(fs)


def test_golden_answers_are_compared_without_the_fields_to_ignore_and_a_difference_is_named():
    a = json.dumps({"id": "cmpl-1", "created": 1, "text": "hi", "choices": [{"t": 1, "x": 2}, {"t": 3, "x": 4}]})
    b = json.dumps({"choices": [{"x": 2, "t": 9}, {"x": 4, "t": 8}], "text": "hi", "created": 2, "id": "cmpl-2"})
    assert comparable(a.encode(), []) == a.encode()  # nothing to ignore: the bytes as they are
    ignore = ["id", "created", "choices.t", "usage.absent"]  # through a list; a field not there is no error
    assert comparable(a.encode(), ignore) == comparable(b.encode(), ignore) == \
        b'{"choices":[{"x":2},{"x":4}],"text":"hi"}'
    assert comparable(a.encode(), ["id"]) != comparable(b.encode(), ["id"])
    assert answers_differ(a.encode(), b.encode()) == "JSON fields choices.t, created, id"
    assert answers_differ(b'{"a": 1, "b": 2}', b'{"b": 2, "a": 1}') == \
        "the same JSON, written differently (key order or spacing)"
    assert answers_differ(b"abcd", b"abXd") == "4 and 4 bytes, first different at byte 2"
    assert answers_differ(b'{"a": null, "n": NaN}', b'{"n": NaN}') == "JSON field a"  # null is not missing
    deep = b"[" * 100_000 + b"]" * 100_000  # more than the parser's recursion allows: told as bytes
    assert answers_differ(deep, deep[:-1]) == f"{len(deep)} and {len(deep) - 1} bytes, first different at byte " \
        f"{len(deep) - 1}"
    with pytest.raises(ReplicaError, match="the golden answer is not JSON"):
        comparable(deep, ["id"])
    assert answers_differ(json.dumps(list(range(5))).encode(), b"[]") == "the whole JSON answer"
    with pytest.raises(ReplicaError, match=r"the golden answer is not JSON \(2 bytes: b'hi'\), so fields to ignore"):
        comparable(b"hi", ["id"])


def test_compat_facts_key_and_check():
    facts = host_facts()
    assert facts["arch"] and facts["kernel"] and facts["cpu_flags"] == sorted(facts["cpu_flags"])
    key = compat_key(facts, "sha256:abc")
    assert key == compat_key(json.loads(json.dumps(facts)), "sha256:abc")
    assert key != compat_key(facts, "sha256:def")
    assert check(facts, facts) == []
    # a newer kernel patch release or more host CPU features do not matter; the rest does
    newer = {**facts, "kernel": facts["kernel"] + "-1", "cpu_flags": facts["cpu_flags"] + ["zzz_new"]}
    assert check(facts, newer) == [] and compat_key(facts, "x") != compat_key(newer, "x")
    snap = {**facts, "cpu_flags": facts["cpu_flags"] + ["avx512_made_up"], "criu": "4.1", "arch": "riscv64"}
    reasons = check(snap, facts)
    assert any("host lacks avx512_made_up" in r for r in reasons)
    assert any(r.startswith(f"criu 4.1 != {facts['criu']}") for r in reasons)
    assert any(r.startswith("arch riscv64") for r in reasons)
    with pytest.raises(Incompatible, match="host lacks avx512_made_up"):
        require(snap, facts)
    # a build host's mitigations, hypervisor bit or timer flags that this host lacks are no instructions
    vm = {**facts, "cpu_flags": sorted({*facts["cpu_flags"], "pti", "md_clear", "hypervisor", "tsc_known_freq"})}
    bare = {**facts, "cpu_flags": sorted(set(facts["cpu_flags"]) - {"pti", "md_clear", "hypervisor", "tsc_known_freq"})}
    assert check(vm, bare) == [] and check(bare, vm) == []
    assert check({**vm, "cpu_flags": [*vm["cpu_flags"], "avx512_made_up"]}, bare) == [
        "cpu flags differ: host lacks avx512_made_up"]


@pytest.mark.parametrize("name", ["b-clear", "b clear"])  # mountinfo writes a space as \\040
def test_clear_kills_replicas_rooted_in_the_dir_not_holders_of_a_mount_copy(image, work, name):
    """clear(d) is what a restarted agent does with a dead one's scratch. It kills the replica whose root is an
    overlay under d, but not a process that merely holds a copy of that mount: a criu restoring another
    replica copies the agent's mounts of that moment into its private mount namespace, and lives on as that
    replica's reaper."""
    from thaw.imagefs.mount import mountinfo
    from thaw.snapshot.host import clear, write_record

    d = work / "builds" / name
    root = prepare_root(image, d)
    replica = launch(root.path, [PYTHON, "-I", "-c", "import time; time.sleep(600)"], {"PATH": "/usr/bin:/bin"}, "/",
                     d / "launch.log")
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sleep", "600"])
    try:
        deadline = time.monotonic() + 10
        while not any(m.mountpoint.startswith(f"{d}/") for m in mountinfo(holder.pid)):
            assert time.monotonic() < deadline, "the copy never showed"
            time.sleep(0.05)
        write_record(d / "replica.json", 999999)  # a stale record: nobody by that pid, so the scan must find it
        clear(d)
        assert replica.proc.wait(10) is not None  # killed (its root was under d)
        assert holder.poll() is None, "a process that only held a copy of the mount was killed"
        assert not d.exists()
    finally:
        holder.kill()
        holder.wait()
        replica.stop()
        root.cleanup()


# A server without the thaw SDK that answers 200 to anything (first with text, then with some JSON), and has a
# child process of its own (its pid in a file).
CATCH_ALL = r'''
import json, os, subprocess, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
answers = [b'{"ok": true}', b"ok", b'{"ok": true}']  # the POSTs' answers in turn, then {}

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = answers.pop(0) if self.command == "POST" and answers else b"{}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET

HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''


def test_a_host_root_replica_takes_its_children_and_a_server_without_the_sdk_is_told_apart(work):
    """Without a root of its own a replica has no pid namespace: stop() must take its children too (they kept
    the port and GPU before). A server without the SDK that answers 200 to anything is told apart: its
    before-snapshot "hook" is not the SDK's, and after_restore says so in one line instead of a JSONDecodeError or
    a silent success."""
    child_file = work / "child.pid"
    replica = launch(None, [PYTHON, "-I", "-c", CATCH_ALL, str(child_file)],
                     {"PATH": "/usr/bin:/bin", "PORT": str(PORT)}, "/", work / "catch-all.log")
    try:
        replica.wait_ready(PORT, "/health", timeout=60)
        child = int(child_file.read_text())
        assert before_snapshot(replica, PORT) is False
        for secrets in ({}, {"API_KEY": SECRET}):
            with pytest.raises(ReplicaError, match="not the thaw SDK's JSON") as e:
                after_restore(replica, PORT, secrets)
            assert "\n" not in str(e.value)
        assert Path(f"/proc/{child}").exists()
    finally:
        replica.stop()
    def running(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
        except OSError:
            return False
    deadline = time.monotonic() + 10
    while running(child):
        assert time.monotonic() < deadline, "the replica's child outlived stop()"
        time.sleep(0.05)


def test_the_kdat_cache_dir_is_used_only_if_private(tmp_path, monkeypatch):
    """/dev/shm is world-writable: a cache dir someone else made (or opened up) could hold a forged kernel
    probe for root's criu, so criu then runs without it."""
    from thaw.snapshot import criu as criu_mod

    monkeypatch.setattr(criu_mod, "_fstype", lambda p: "tmpfs" if p == "/dev/shm" else "ext4")
    d = tmp_path / "kdat"
    monkeypatch.setattr(criu_mod, "KDAT_RUN_DIR", str(d))
    assert criu_mod._with_kdat_cache(["criu", "restore"])[0] == "unshare" and (d.stat().st_mode & 0o777) == 0o700
    d.chmod(0o777)
    assert criu_mod._with_kdat_cache(["criu", "restore"]) == ["criu", "restore"]
    d.rmdir()
    d.symlink_to(tmp_path)
    assert criu_mod._with_kdat_cache(["criu", "restore"]) == ["criu", "restore"]
    d.unlink()
    d.write_text("a file")
    assert criu_mod._with_kdat_cache(["criu", "restore"]) == ["criu", "restore"]


@needs_criu
def test_a_replica_that_outlives_its_sigkill_is_stopped_once_gone(image, work, monkeypatch):
    """A replica still there 10 s after SIGKILL (a driver tearing down much device memory, say) keeps its GPU
    loan and root while it is there, and gives them back once it is gone: before, nobody tried again, and the
    host counted a GPU replica that no longer existed until the agent restarted."""
    import signal

    from services import wait_until
    from thaw.snapshot.host import Running

    replica = launch_host_root(image, work, "stubborn", data_mb=1)
    layer = work / "stubborn-layer"
    layer.mkdir()
    root = prepare_root([layer], work / "stubborn-rw")
    given, real, gone = [], replica.stop, []

    def stubborn(timeout=10.0):  # what a process in uninterruptible sleep does to the stop
        if not gone:
            raise ReplicaError(f"replica {replica.pid} is still there {timeout:g} s after SIGKILL")
        real(timeout)

    monkeypatch.setattr(replica, "stop", stubborn)
    running = Running("r-stubborn", replica, root, PORT, on_stop=lambda: given.append("gpu"))
    try:
        for _ in range(2):  # a second try, as the agent's stop_all makes: still there, and one waiter only
            with pytest.raises(ReplicaError):
                running.stop()
        assert not running.stopped and not given and str(root.path) in _linux.mountpoints()
        gone.append(True)
        os.kill(replica.pid, signal.SIGKILL)  # it goes at last
        wait_until(lambda: given == ["gpu"] and str(root.path) not in _linux.mountpoints(), 10,
                   "the stop to finish once the replica is gone")
        assert running.stopped
    finally:
        gone.append(True)
        real()
        root.cleanup()


@needs_criu
def test_terminate_waits_for_a_server_that_takes_its_stop_signal_and_not_for_one_that_cannot(roots, work):
    """As `docker stop`: the stop signal, then the grace to exit. A pid 1 without a handler never gets the signal
    (its pid namespace's init), so there is no wait; one that takes it but stays is waited for the grace only.
    On the host's pids (no root of its own) the signal's default action applies."""
    import signal
    import threading

    handler = ("import signal, sys, time\n"
               "def bye(*_):\n"
               "    print('got', signal.Signals(_[0]).name, flush=True); time.sleep(float(sys.argv[1])); sys.exit(0)\n"
               "signal.signal(signal.SIGQUIT, bye); signal.signal(signal.SIGTERM, bye)\n"
               "print('up', flush=True); time.sleep(600)\n")
    up = "import time; print('up', flush=True); time.sleep(600)"

    def started(argv, name, root=True):
        r = launch(roots().path if root else None, [PYTHON, "-I", "-c", *argv], {}, "/", work / f"{name}.log")
        deadline = time.monotonic() + 30
        while "up" not in r.log_tail() and time.monotonic() < deadline:  # its handlers are set
            time.sleep(0.05)
        return r

    cases = [  # code, root of its own, signal, grace -> gone on its own, seconds at least, at most, log
        (handler, ["0.5"], True, signal.SIGQUIT, 10, True, 0.5, 5, "got SIGQUIT"),
        (up, [], True, signal.SIGTERM, 10, False, 0, 1, ""),        # pid 1 without a handler: no wait
        (handler, ["600"], True, signal.SIGTERM, 1, False, 1, 5, "got SIGTERM"),  # takes it, stays: the grace
        (up, [], False, signal.SIGTERM, 10, True, 0, 5, ""),        # the host's pids: SIGTERM's default kills
    ]
    for i, (code, args, root, sig, grace, gone, at_least, at_most, said) in enumerate(cases):
        replica = started([code, *args], f"term{i}", root)
        try:
            t0 = time.monotonic()
            assert replica.terminate(sig, grace) is gone, (i, replica.log_tail())
            took = time.monotonic() - t0
            assert at_least <= took < at_most, (i, took)
            assert said in replica.log_tail(), (i, replica.log_tail())
            if not gone:  # (one that is gone is not reaped yet: stop does that)
                assert replica.alive()
        finally:
            replica.stop()
        assert not replica.alive()
        assert replica.terminate(sig, grace) is True  # stopped: nothing to ask
    # an agent told to stop cuts the grace short (its worker waits for the stop before the agent's own can run)
    abort = threading.Event()
    replica = started([handler, "600"], "term-abort")
    try:
        threading.Timer(0.5, abort.set).start()
        t0 = time.monotonic()
        assert replica.terminate(signal.SIGTERM, 30, abort) is False
        assert 0.4 < time.monotonic() - t0 < 5
    finally:
        replica.stop()
