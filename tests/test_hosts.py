"""Several hosts on one machine, each agent in its own network namespace (`thaw hosts up`): replicas are
placed on both, reached over the veth hop, and a host whose agent dies is replaced by the other."""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request

import pytest

from services import wait_until
from test_criu import needs_criu
from test_snapshot import PORT, image_config, rootfs  # noqa: F401  (fixture)
from test_stack import free_port, thaw
from thaw.config import load
from thaw.registry import deployments
from thaw.snapshot import cgroup
from thaw.snapshot.host import replicas_cgroup

pytestmark = needs_criu


def test_namespaced_hosts_serve_and_replace_each_other(tmp_path, rootfs):  # noqa: F811
    port = free_port()
    env = {**os.environ, "THAW_STATE_DIR": str(tmp_path / "state"), "THAW_TEMPORAL_ADDRESS": f"0.0.0.0:{port}",
           "THAW_TEMPORAL_UI_PORT": str(free_port()), "THAW_API_PORT": str(free_port()),
           "THAW_AGENT_METRICS_PORT": "0", "THAW_HOST_ID": "builder", "THAW_HOST_CAPACITY": "0",
           "THAW_AGENT_HEARTBEAT_S": "1", "THAW_HOST_STALE_S": "4", "THAW_HEARTBEAT_TIMEOUT": "5"}
    cfg = load(state_dir=tmp_path / "state")
    golden = tmp_path / "golden.json"
    golden.write_text("{}")
    try:
        thaw(env, "up")
        img = json.loads(thaw(env, "build", "image", str(rootfs), "--config", str(image_config(tmp_path)),
                              "--json").stdout)["digest"]
        snap = json.loads(thaw(env, "build", "snapshot", img, "--port", str(PORT), "--health", "/health",
                               "--golden", str(golden), "--golden-path", "/answer-stable", "--json").stdout)["digest"]
        out = thaw(env, "hosts", "up", "2").stdout
        assert out.count("in netns") == 2
        thaw(env, "deploy", "ns", "--snapshot", snap, "--min", "2", "--max", "2", "--buffer", "0")
        reps = wait_until(lambda: len(r := deployments.replicas(cfg.registry_url, "ns")) == 2 and r, timeout=90,
                          what="2 replicas on the namespaced hosts")
        assert {r.host_id for r in reps} == {"nshost1", "nshost2"}
        for r in reps:
            assert r.endpoint.startswith("http://10.77.")  # published inside the host's namespace
            with urllib.request.urlopen(r.endpoint + "/answer-stable", timeout=10) as resp:
                assert json.loads(resp.read())["digest"]
        hosts = json.loads((cfg.run_dir / "hosts.json").read_text())
        (record,) = (cfg.state_dir / "work" / "nshost1" / "replicas").glob("*/replica.json")
        orphan = json.loads(record.read_text())
        os.kill(hosts[0]["pid"], signal.SIGKILL)  # host 1 dies; its replica goes on, owned by nobody
        wait_until(lambda: {r.host_id for r in deployments.replicas(cfg.registry_url, "ns")
                            if r.host_id == "nshost2"} and sum(r.host_id == "nshost2" for r in
                                                                deployments.replicas(cfg.registry_url, "ns")) == 2,
                   timeout=90, what="both replicas on the surviving host")
    finally:
        thaw(env, "undeploy", "ns", check=False)
        down = thaw(env, "down", check=False)  # the namespaced hosts first, then the stack
    assert "nshost2: stopped" in down.stdout
    assert not os.path.exists(f"/proc/{orphan['pid']}"), "the dead host's replica outlived `thaw down`"
    assert not [n for n in ("nshost1", "nshost2") if cgroup.path_of(replicas_cgroup(n)).exists()], \
        "a host's replica cgroup outlived `thaw down` (nshost1's agent was killed, nshost2's stopped)"
    assert not [n for n in os.listdir("/run/netns") if n.startswith("thaw-nshost")] if os.path.isdir("/run/netns") \
        else True


def test_namespaced_hosts_of_an_s3_stack_restore_from_s3_into_caches_of_their_own(tmp_path, rootfs):  # noqa: F811
    """`thaw up --s3` with Temporal beyond loopback: its S3 server stays on loopback (and its Unix socket); each
    namespaced host's agent relays to that socket, and keeps a chunk cache of its own, cold at first (its
    restore reads from S3) and gone with `thaw down`; what the server wrote before its snapshot comes with it.
    A stack started on loopback is named, before any agent starts, as what the namespaces cannot reach."""
    port = free_port()
    env = {**os.environ, "THAW_STATE_DIR": str(tmp_path / "state"), "THAW_TEMPORAL_ADDRESS": f"0.0.0.0:{port}",
           "THAW_TEMPORAL_UI_PORT": str(free_port()), "THAW_API_PORT": str(free_port()),
           "THAW_AGENT_METRICS_PORT": "0", "THAW_HOST_ID": "builder", "THAW_S3_EMBEDDED_PORT": str(free_port())}
    cfg = load(state_dir=tmp_path / "state")
    golden = tmp_path / "golden.json"
    golden.write_text("{}")
    try:
        thaw(env, "up", "--s3")
        img = json.loads(thaw(env, "build", "image", str(rootfs), "--config", str(image_config(tmp_path)),
                              "--json").stdout)["digest"]
        snap = json.loads(thaw(env, "build", "snapshot", img, "--port", str(PORT), "--health", "/health",
                               "--golden", str(golden), "--golden-path", "/answer-stable", "--env", "WRITES=1",
                               "--json").stdout)["digest"]
        assert "in netns" in thaw(env, "hosts", "up", "1").stdout
        cache = cfg.state_dir / "work" / "nshost1" / "store"
        (r,) = json.loads(thaw(env, "restore", snap, "--host", "nshost1", "--keep", "--json").stdout)["replicas"]
        assert r["outcome"] == "restored" and r["endpoint"].startswith("http://10.77.1.2:"), r
        assert r["timings_ms"]["prefetch_kb"] > 1024, r  # the snapshot's memory pages, from S3
        assert sum(1 for _ in cache.rglob("*") if _.is_file()) > 10, "the host's own cache holds what it read"
        with urllib.request.urlopen(r["endpoint"] + "/files", timeout=10) as resp:
            assert json.loads(resp.read())["blob"] is True  # a file the server wrote, read lazily from S3
        thaw(env, "replicas", "stop", r["replica"])
        with pytest.raises(ConnectionRefusedError):  # no S3 port open beyond loopback (its gRPC takes no keys)
            socket.create_connection(("10.77.1.1", int(env["THAW_S3_EMBEDDED_PORT"])), timeout=5).close()
    finally:
        down = thaw(env, "down", check=False)
    assert "nshost1: stopped" in down.stdout and "s3: stopped" in down.stdout, down.stdout
    assert not cache.exists(), "a namespaced host's cache goes with it"

    env["THAW_TEMPORAL_ADDRESS"] = f"127.0.0.1:{port}"  # a stack started on loopback (its S3 server too)
    try:
        thaw(env, "up")
        res = thaw({**env, "THAW_TEMPORAL_ADDRESS": f"0.0.0.0:{port}"}, "hosts", "up", "1", check=False)
        assert res.returncode == 1 and "Temporal does not answer at 10.77." in res.stderr, res
        assert "was the stack started with THAW_TEMPORAL_ADDRESS=0.0.0.0" in res.stderr
        assert not (cfg.run_dir / "hosts.json").exists() or json.loads((cfg.run_dir / "hosts.json").read_text()) == []
    finally:
        thaw(env, "down", check=False)
    assert not [n for n in os.listdir("/run/netns") if n.startswith("thaw-nshost")] if os.path.isdir("/run/netns") \
        else True


def test_hosts_down_does_not_signal_a_pid_that_is_not_its_agent(tmp_path):
    """hosts.json outlives its agents (a reboot, a crash): a pid there that now belongs to another process,
    outside the host's network namespace, is left alone."""
    import json
    import subprocess

    from thaw.config import Config
    from thaw.runtime import hosts

    cfg = Config(state_dir=tmp_path)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        cfg.run_dir.mkdir(parents=True)
        (cfg.run_dir / "hosts.json").write_text(json.dumps([{"host_id": "nshost1", "netns": "thaw-gone-0",
                                                             "veth": "thv1-0", "address": "10.77.1.2",
                                                             "pid": bystander.pid}]))
        assert hosts.down(cfg) == ["nshost1"]
        assert bystander.poll() is None and not (cfg.run_dir / "hosts.json").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_hosts_down_keeps_a_host_whose_agent_would_not_go(tmp_path):
    """An agent still there after SIGTERM and SIGKILL (stuck in the kernel on a FUSE request, say) holds its
    replicas and namespace: `down` said "stopped" and forgot it, so nothing stopped it later and the next `up`
    took its subnet again. Its record stays, the others go, and the error names it; a later `down` finishes."""
    import json

    from thaw.config import Config
    from thaw.runtime import hosts
    from thaw.runtime.agent import hold_host

    cfg = Config(state_dir=tmp_path)
    cfg.run_dir.mkdir(parents=True)
    records = [{"host_id": f"nshost{k}", "netns": f"thaw-gone-{k}", "veth": f"thv{k}-0", "address": f"10.77.{k}.2",
                "pid": os.getpid()} for k in (1, 2)]  # not in those namespaces: not signalled
    (cfg.run_dir / "hosts.json").write_text(json.dumps(records))
    stuck = cfg.model_copy(update={"host_id": "nshost1"})
    stuck.work_dir.mkdir(parents=True)
    fd = hold_host(stuck)  # as its agent still does
    try:
        with pytest.raises(hosts.HostsError, match=r"stopped 1 host\(s\); kept nshost1: its agent still runs"):
            hosts.down(cfg)
        assert json.loads((cfg.run_dir / "hosts.json").read_text()) == records[:1]
    finally:
        os.close(fd)
    assert hosts.down(cfg) == ["nshost1"] and not (cfg.run_dir / "hosts.json").exists()


def test_sigterm_during_hosts_up_leaves_no_namespace(tmp_path):
    """`timeout thaw hosts up`, a cancelled CI job: SIGTERM while a host's namespace is being made (here while
    its check for Temporal hangs) clears it as Ctrl-C does; its default action left the namespace and veth."""
    import subprocess
    import time

    from thaw.runtime import hosts

    lsock = socket.socket()
    lsock.bind(("0.0.0.0", 0))
    lsock.listen(0)  # never accepted: once its queue is full, connects hang
    port = lsock.getsockname()[1]
    fillers = [socket.socket() for _ in range(4)]
    for f in fillers:
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", port))
    env = {**os.environ, "THAW_STATE_DIR": str(tmp_path / "state"), "THAW_TEMPORAL_ADDRESS": f"0.0.0.0:{port}"}
    try:
        proc = subprocess.Popen(["thaw", "hosts", "up", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        ns = f"{hosts.PREFIX}nshost1-{proc.pid}"
        deadline = time.monotonic() + 30
        while ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
        time.sleep(0.5)  # into the reachability check, which hangs for 3 s
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
        assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout, out
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert f"thv1-{proc.pid % 10000}" not in links, out
    finally:
        for f in (*fillers, lsock):
            f.close()


def test_hosts_up_refuses_what_its_namespaces_cannot_reach(tmp_path):
    """Temporal, a registry DSN or S3 on loopback is refused before any namespace is made."""
    from thaw.config import Config
    from thaw.runtime import hosts

    with pytest.raises(hosts.HostsError, match="cannot reach Temporal on loopback"):
        hosts.up(Config(state_dir=tmp_path, temporal_address="127.0.0.1:7233"), 1)
    cfg = Config(state_dir=tmp_path, temporal_address="0.0.0.0:7233",
                 db_url="postgresql+psycopg://thaw@localhost:5432/thaw")
    with pytest.raises(hosts.HostsError, match="cannot reach the registry database on loopback"):
        hosts.up(cfg, 1)
    cfg = Config(state_dir=tmp_path, temporal_address="0.0.0.0:7233", s3_endpoint="http://127.0.0.1:8333")
    with pytest.raises(hosts.HostsError, match="cannot reach S3 on loopback"):  # not thaw's own SeaweedFS
        hosts.up(cfg, 1)
    cfg = Config(state_dir=tmp_path, temporal_address="0.0.0.0:7233", s3_endpoint="http://127.0.0.1:8333",
                 s3_embedded=True)  # `thaw up --s3`'s, reached through its socket: not running here
    with pytest.raises(hosts.HostsError, match=f"the embedded S3 server does not answer on {tmp_path}/s3/s3.sock"):
        hosts.up(cfg, 1)
    assert not (tmp_path / "run" / "hosts.json").exists()


def test_an_interrupted_hosts_up_leaves_no_namespace_or_agent(tmp_path, monkeypatch):
    """Ctrl-C while a host is being made: its namespace, veth pair and (already started) agent go; nothing is
    recorded for it. The agent runs in a session of its own, so nothing else would stop it."""
    import subprocess

    from thaw.config import Config
    from thaw.runtime import hosts
    from thaw.stack import agent_ready_file

    cfg = Config(state_dir=tmp_path, temporal_address="0.0.0.0:7233")
    started = []
    real_popen = subprocess.Popen

    def popen(argv, *args, **kwargs):
        if argv[0] == "nsenter":  # the agent: a stand-in in a session of its own, ready at once
            argv, kwargs = ["sleep", "600"], {"start_new_session": True}
            agent_ready_file(cfg.model_copy(update={"host_id": "nshost1"})).write_text("1")
        p = real_popen(argv, *args, **kwargs)
        if argv[0] == "sleep":
            started.append(p)
        return p

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hosts, "_reachable", lambda *a: True)  # no Temporal here
    monkeypatch.setattr(hosts.subprocess, "Popen", popen)
    monkeypatch.setattr(hosts.json, "dumps", interrupted)  # Ctrl-C as the agent is being recorded
    with pytest.raises(KeyboardInterrupt):
        hosts.up(cfg, 1)
    (proc,) = started
    assert proc.poll() is not None
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{hosts.PREFIX}nshost1-{os.getpid()}" not in ns
    assert not (tmp_path / "run" / "hosts.json").exists()
