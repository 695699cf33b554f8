"""DeploymentPool end to end: real Temporal, real agents (several hosts), real CRIU restores of a small server,
every scale signal path, buffer reservations, the control API's auth, and replacing a replica whose agent died."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from aiohttp import web
from click.testing import CliRunner
from temporalio import activity

from conftest import cfg_env, in_process_agent, undeploy
from services import wait_until
from test_criu import needs_criu
from test_snapshot import PORT, build_snapshot, image, image_config, rootfs  # noqa: F401  (fixtures)
from thaw.cli import cli
from thaw.ports import free_port
from thaw.registry import deployments, snapshots
from thaw.registry.queries import NotFound
from thaw.workflows.pool import HostsInput, HostsResult

pytestmark = needs_criu


def serving(cfg, name):
    return deployments.replicas(cfg.registry_url, deployment=name)


def answer(endpoint: str, path: str = "/answer-stable") -> dict:
    with urllib.request.urlopen(endpoint + path, timeout=10) as r:
        return json.loads(r.read())


def closed(endpoint: str) -> bool:
    """Whether a replica's published endpoint refuses (its row goes first: it may drain a moment longer)."""
    try:
        answer(endpoint)
    except OSError:
        return True
    return False


@pytest.fixture
def snap(cfg, worker, agent, thaw_cli, image, tmp_path):  # noqa: F811
    return build_snapshot(thaw_cli, image, tmp_path)["digest"]


@contextlib.contextmanager
def more_agents(cfg, n):
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(in_process_agent(cfg.model_copy(update={"host_id": f"{cfg.host_id}-{i}"})))
               for i in range(n)]


def signal_raw(cfg, name, replicas):
    """A raw Temporal signal, as `temporal workflow signal --name scale --input '{"replicas": N}'` sends it."""
    from temporalio.client import Client

    async def go():
        client = await Client.connect(cfg.temporal_address)
        await client.get_workflow_handle(f"pool-{name}").signal("scale", {"replicas": replicas, "source": "temporal"})

    asyncio.run(go())


@pytest.fixture
def api(cfg):
    """The real control API (aiohttp) on a free port, in a thread."""
    with serve_api(cfg) as served:
        yield served


@contextlib.contextmanager
def serve_api(cfg):
    from temporalio.client import Client

    from conftest import LoopThread
    from thaw.runtime.api import api_token, make_app

    lt = LoopThread()

    async def start():
        runner = web.AppRunner(make_app(cfg, await Client.connect(cfg.temporal_address)))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]

    runner, port = lt.run(start())
    try:
        yield f"http://127.0.0.1:{port}", api_token(cfg)
    finally:
        lt.run(runner.cleanup())
        lt.close()


def api_call(url, path, token=None, body=None):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}"} if token else {},
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_api_answers_one_json_line_when_the_registry_is_down(cfg, temporal_address, tmp_path):
    """A registry database server that is down: 503 with a one-line JSON error, counted in the metrics (it was
    aiohttp's plain-text 500 and a traceback)."""
    down = cfg.model_copy(update={"registry_url": f"postgresql+psycopg://thaw@127.0.0.1:{free_port()}/thaw"})
    with serve_api(down) as (url, token):
        for path, body in (("/v1/deployments", None), ("/v1/deployments/web/scale", {"replicas": 1})):
            status, answer = api_call(url, path, token, body)
            assert status == 503 and answer["error"].startswith("the registry did not answer: "), (status, answer)
            assert "\n" not in answer["error"] and "refused" in answer["error"], answer
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            assert 'code="503",route="/v1/deployments"} 1.0' in r.read().decode()


def test_the_apis_own_refusals_are_json_lines_and_counted(cfg, temporal_address):
    """A body over aiohttp's limit, or a path or method the API lacks: aiohttp's plain-text answers, and left
    out of thaw_api_requests_total, which counts every call."""
    with serve_api(cfg) as (url, token):
        status, answer = api_call(url, "/v1/deployments/web/scale", token, {"replicas": 1, "pad": "x" * (2 << 20)})
        assert status == 413 and answer["error"].startswith(
            "POST /v1/deployments/web/scale: Maximum request body size 1048576 exceeded"), answer
        assert api_call(url, "/v1/nope", token) == (404, {"error": "GET /v1/nope: Not Found"})
        assert api_call(url, "/v1/deployments", token, {"replicas": 1}) == (
            405, {"error": "POST /v1/deployments: Method Not Allowed"})
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            counted = r.read().decode()
        for code in (413, 404, 405):
            assert f'code="{code}"' in counted, counted


def test_scale_0_3_0_through_every_signal_path_with_a_buffer(cfg, worker, agent, thaw_cli, snap, api):
    url, token = api
    with more_agents(cfg, 2):  # three hosts
        thaw_cli("deploy", "web", "--snapshot", snap[:10], "--min", "0", "--max", "3", "--buffer", "1",
                 "--cooldown", "0")
        wait_until(lambda: len(snapshots.live_hosts(cfg.registry_url, 5)) == 3, what="3 live hosts")
        reserved = wait_until(lambda: [h.id for h in snapshots.list_hosts(cfg.registry_url) if h.reserved_for == "web"],
                              what="a buffer host")
        assert len(reserved) == 1
        assert serving(cfg, "web") == []

        for path, up in (("cli", lambda: thaw_cli("scale", "web", "3")),
                         ("api", lambda: api_call(url, "/v1/deployments/web/scale", token, {"replicas": 3})),
                         ("temporal", lambda: signal_raw(cfg, "web", 3))):
            up()
            reps = wait_until(lambda: len(serving(cfg, "web")) == 3 and serving(cfg, "web"),
                              what=f"3 replicas ({path})")
            answers = [answer(r.endpoint) for r in reps]
            assert len({a["digest"] for a in answers}) == 1, "every replica serves the snapshot's answer"
            assert all(r.outcome == "restored" for r in reps)
            assert len({r.host_id for r in reps}) >= 2, "replicas are spread over the hosts"
            if path == "cli":
                (listed,) = json.loads(thaw_cli("deployments", "ls", "--json").output)
                assert listed == {"name": "web", "snapshot": snap, "min": 0, "max": 3, "buffer": 1, "serving": 3,
                                  "pool": "running"}, listed
                assert api_call(url, "/v1/deployments", token) == (200, [  # the control API's list, the same
                    {k: v for k, v in listed.items() if k not in ("serving", "pool")}])
            down = {"cli": lambda: thaw_cli("scale", "web", "0"),
                    "api": lambda: api_call(url, "/v1/deployments/web/scale", token, {"replicas": 0}),
                    "temporal": lambda: signal_raw(cfg, "web", 0)}[path]
            down()
            wait_until(lambda: serving(cfg, "web") == [], what=f"0 replicas ({path})")
            for r in reps:  # stopped for real: the published endpoint is closed
                wait_until(lambda: closed(r.endpoint), timeout=10, what=f"{r.id} stopped")

        st = wait_until(lambda: "buffer     1/1" in (out := thaw_cli("status", "web").output) and out,
                        what="the buffer refilled")
        assert "restored" in st
        # a scale-down's stops are counted once all of them have ended: a moment after their endpoints closed
        status, body = wait_until(lambda: (res := api_call(url, "/v1/deployments/web", token))[0] == 200
                                  and res[1]["counts"].get("stopped") == 9 and res, what="9 stops counted")
        assert body["counts"]["restored"] == 9
        undeploy(cfg, thaw_cli, "web")
        wait_until(lambda: not any(h.reserved_for for h in snapshots.list_hosts(cfg.registry_url)),
                   what="buffer released")
        assert thaw_cli("deployments", "ls").output.splitlines() == [  # kept, ended, until its snapshot goes
            "NAME             SNAPSHOT     REPLICAS  BUFFER SERVING POOL",
            f"web              {snap[:12]} 0..3           1       0 ended"]
        dead = cfg.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})  # the registry still lists
        res = CliRunner().invoke(cli, ["deployments", "ls"], obj=dead)
        assert res.exit_code == 0 and f"{snap[:12]} 0..3           1       0 ?" in res.output, res.output
        assert f"(POOL ?: cannot reach Temporal at {dead.temporal_address} " in res.output, res.output
        # a namespace the server lacks: its "not found" is not "no such pool" (the pool would read as ended)
        lost = cfg.model_copy(update={"temporal_namespace": "no-such-namespace"})
        res = CliRunner().invoke(cli, ["deployments", "ls"], obj=lost)
        assert res.exit_code == 0 and f"{snap[:12]} 0..3           1       0 ?" in res.output, res.output
        assert "(POOL ?: Temporal at " in res.output and "has no namespace 'no-such-namespace'" in res.output
        res = CliRunner().invoke(cli, ["scale", "web", "1"], obj=lost)
        assert res.exit_code == 1 and res.output.strip().splitlines()[-1] == (
            f"error: Temporal at {cfg.temporal_address} has no namespace 'no-such-namespace' "
            "(THAW_TEMPORAL_NAMESPACE; `temporal operator namespace create` makes one)"), res.output


def test_buffer_hosts_are_warmed_before_any_restore(cfg, worker, agent, thaw_cli, snap):
    """A host reserved for a deployment's buffer mounts the snapshot and pins its memory pages at once, before
    any replica is asked of it: the first restore there reads them from RAM, like every later one."""
    with more_agents(cfg, 2) as fresh:  # never restored anything: nothing of the snapshot on them yet
        assert all(a.host.pins.pinned() == [] for a in fresh)
        thaw_cli("deploy", "warm", "--snapshot", snap, "--min", "0", "--max", "1", "--buffer", "3")
        for a in fresh:
            wait_until(lambda: a.host.pins.pinned() == [snap], what=f"{a.cfg.host_id} warmed for the buffer")
            assert a.host.pins.pinned_bytes > 0
            assert a.host.snapshot_files(snap).is_mount()
        assert serving(cfg, "warm") == []  # warmed, not started
        thaw_cli("scale", "warm", "1")
        (rep,) = wait_until(lambda: serving(cfg, "warm"), what="1 replica")
        assert rep.outcome == "restored"
        undeploy(cfg, thaw_cli, "warm")
        wait_until(lambda: not any(h.reserved_for for h in snapshots.list_hosts(cfg.registry_url)),
                   what="buffer released")


def test_control_api_refuses_calls_without_the_token(cfg, worker, agent, thaw_cli, snap, api):
    url, token = api
    thaw_cli("deploy", "api-dep", "--snapshot", snap, "--max", "2", "--buffer", "0")
    for bad in (None, "wrong", token + "x"):
        status, body = api_call(url, "/v1/deployments/api-dep/scale", bad, {"replicas": 2})
        assert status == 401 and "token" in body["error"]
        assert api_call(url, "/v1/deployments", bad)[0] == 401
    req = urllib.request.Request(url + "/v1/deployments", headers={"Authorization": token})  # no "Bearer "
    with pytest.raises(urllib.error.HTTPError) as no_scheme:
        urllib.request.urlopen(req, timeout=10)
    assert no_scheme.value.code == 401
    req = urllib.request.Request(url + "/v1/deployments", headers={"Authorization": "Bearer \xff"})  # not UTF-8
    with pytest.raises(urllib.error.HTTPError) as not_utf8:
        urllib.request.urlopen(req, timeout=10)
    assert not_utf8.value.code == 401
    st = json.loads(thaw_cli("status", "api-dep", "--json").output)  # a refused call never reached the pool
    assert st["desired"] == 0 and st["last_signal"] is None and serving(cfg, "api-dep") == [], st
    assert api_call(url, "/v1/deployments/nope/scale", token, {"replicas": 1})[0] == 404
    lower = urllib.request.Request(url + "/v1/deployments", headers={"Authorization": f"bearer {token}"})
    with urllib.request.urlopen(lower, timeout=10) as r:  # RFC 9110: the scheme's case does not matter
        assert r.status == 200
    for bad in ("x", "3", -1, 2.5, True, float("inf"), None):
        assert api_call(url, "/v1/deployments/api-dep/scale", token, {"replicas": bad})[0] == 400, bad
    for body, ctype in ((b"[" * 100_000, "application/json"),  # nested past the JSON parser
                        (b'{"replicas": 1}', "application/json; charset=bogus")):  # a charset Python lacks
        odd = urllib.request.Request(url + "/v1/deployments/api-dep/scale", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": ctype})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(odd, timeout=10)
        assert refused.value.code == 400, ctype
    assert json.loads(thaw_cli("status", "api-dep", "--json").output)["last_signal"] is None
    assert api_call(url, "/v1/deployments/api-dep/scale", token, {"replicas": 0}) == (   # accepted: signalled
        202, {"deployment": "api-dep", "replicas": 0, "kept": 0})
    assert wait_until(lambda: json.loads(thaw_cli("status", "api-dep", "--json").output)["last_signal"],
                      what="the accepted signal")["source"] == "api"
    with urllib.request.urlopen(url + "/metrics") as r:
        assert b'thaw_api_requests_total{code="401"' in r.read()
    undeploy(cfg, thaw_cli, "api-dep")


def test_an_empty_or_short_api_token_is_refused(tmp_path):
    """An empty token would let every request in (an empty Authorization header matches it): the API refuses to
    start instead, with a one-line error."""
    from thaw.config import Config
    from thaw.runtime.api import TokenError, api_token, token_file

    cfg = Config(state_dir=tmp_path)
    made = api_token(cfg)  # made on first use
    assert len(made) >= 32 and token_file(cfg).read_text() == made
    token_file(cfg).write_text("\n")  # e.g. a disk that filled up between create and write
    with pytest.raises(TokenError, match="0 characters.*or delete .*api-token to have one made") as err:
        api_token(cfg)
    assert "\n" not in str(err.value)
    with pytest.raises(TokenError, match="THAW_API_TOKEN.*or unset it to have one made"):
        api_token(cfg.model_copy(update={"api_token": "short"}))
    assert api_token(cfg.model_copy(update={"api_token": "x" * 16})) == "x" * 16


def test_deploy_env_reaches_restored_replicas_and_extra_ports_are_published(cfg, worker, agent, thaw_cli, snap):
    """``--env`` is not in the snapshot: it reaches each restored replica through its after-restore hook. ``--port``
    publishes another port of the replica (the test server's second listener) on the replica's host."""
    side = str(PORT + 1)
    thaw_cli("deploy", "side", "--snapshot", snap, "--max", "2", "--buffer", "0", "--env", "MODE=fast",
             "--port", side, "--port", str(PORT))  # the server's own port is published anyway
    assert deployments.get(cfg.registry_url, "side").env == {"MODE": "fast"}
    thaw_cli("scale", "side", "2")
    reps = wait_until(lambda: len(serving(cfg, "side")) == 2 and serving(cfg, "side"), what="2 replicas")
    for r in reps:
        assert r.outcome == "restored" and list(r.ports) == [side]
        assert answer(r.endpoint, "/env/MODE") == {"value": "fast", "port": PORT}
        assert answer(f"http://{r.ports[side]}", "/env/MODE") == {"value": "fast", "port": PORT + 1}
    assert len({r.ports[side] for r in reps}) == 2, "each replica's port on its own host port"
    out = thaw_cli("status", "side").output
    assert "env        MODE  ports 8081" in out and all(f"{side}->{r.ports[side]}" in out for r in reps)
    res = thaw_cli("replicas", "stop", reps[0].id, ok=False)
    assert res.exit_code == 1 and "belongs to deployment 'side'" in res.output
    undeploy(cfg, thaw_cli, "side")
    wait_until(lambda: serving(cfg, "side") == [], what="0 replicas")
    for r in reps:  # the extra listener went with the replica
        with pytest.raises(OSError):
            answer(f"http://{r.ports[side]}", "/health")

    with snapshots.session(cfg.registry_url, write=True) as s:  # no host can restore it now: replicas cold-boot
        row = s.get(snapshots.Snapshot, snap)
        row.host_facts = {**row.host_facts, "criu": "3.0"}
        s.add(row)
        s.commit()
    thaw_cli("deploy", "side", "--snapshot", snap, "--max", "1", "--buffer", "0", "--env", "MODE=cold")
    thaw_cli("scale", "side", "1")
    (r,) = wait_until(lambda: serving(cfg, "side"), what="1 replica")
    assert r.outcome == "cold-boot" and r.ports is None
    assert answer(r.endpoint, "/env/MODE") == {"value": "cold", "port": PORT}, "the env, as plain env of the boot"
    undeploy(cfg, thaw_cli, "side")
    wait_until(lambda: serving(cfg, "side") == [], what="0 replicas")


def test_a_deploy_with_another_spec_replaces_the_old_replicas_once_the_new_ones_serve(cfg, worker, agent, thaw_cli,
                                                                                       snap):
    """Deploying a running deployment again with another env (likewise another snapshot, secrets or ports) rolls
    it: new replicas start, and the old ones keep serving until their replacements do, then stop."""
    def deploy(mode):
        thaw_cli("deploy", "roll", "--snapshot", snap, "--max", "2", "--buffer", "0", "--env", f"MODE={mode}",
                 "--cooldown", "1")

    deploy("a")
    thaw_cli("scale", "roll", "2")
    old = wait_until(lambda: len(serving(cfg, "roll")) == 2 and serving(cfg, "roll"), what="2 replicas")
    deploy("b")
    fewest = 2

    def rolled():
        nonlocal fewest
        reps = serving(cfg, "roll")
        fewest = min(fewest, len(reps))
        return len(reps) == 2 and not {r.id for r in reps} & {r.id for r in old} and reps

    new = wait_until(rolled, timeout=120, what="2 replicas of the new spec, none of the old")
    assert fewest == 2, "an old replica stopped before its replacement served"
    for r in new:
        assert answer(r.endpoint, "/env/MODE") == {"value": "b", "port": PORT}
    wait_until(lambda: all(closed(r.endpoint) for r in old), what="the old replicas stopped")
    st = json.loads(thaw_cli("status", "roll", "--json").output)
    assert st["counts"]["replaced"] == 2 and st["outdated"] == [] and st["desired"] == 2, st
    undeploy(cfg, thaw_cli, "roll")
    wait_until(lambda: serving(cfg, "roll") == [], what="0 replicas")


def test_deploy_errors_are_one_line(cfg, worker, thaw_cli, snap):
    res = thaw_cli("deploy", "x", "--snapshot", "abcdef12", ok=False)
    assert res.exit_code == 1 and "no snapshot abcdef12" in res.output
    res = thaw_cli("deploy", "x", "--snapshot", snap, "--min", "3", "--max", "1", ok=False)
    assert res.exit_code == 1 and "--min" in res.output
    res = thaw_cli("scale", "never-deployed", "2", ok=False)
    assert res.exit_code == 1 and "never-deployed" in res.output
    # a pool Temporal runs that this registry does not know (another state dir's): one line, and not signalled
    thaw_cli("deploy", "elsewhere", "--snapshot", snap, "--min", "0", "--max", "1", "--buffer", "0",
             "--secret", "B", "--secret", "A", "--secret", "B")
    # the secrets as a set: the same ones in another order are no new spec (it rolled every replica)
    assert json.loads(thaw_cli("status", "elsewhere", "--json").output)["spec"]["secrets"] == ["A", "B"]
    row = deployments.get(cfg.registry_url, "elsewhere").model_dump()
    try:
        deployments.put_back(cfg.registry_url, "elsewhere", None)
        for args in (["scale", "elsewhere", "1"], ["undeploy", "elsewhere"]):
            res = thaw_cli(*args, ok=False)
            assert res.exit_code == 1 and res.output == "error: no deployment 'elsewhere' (see `thaw deploy`)\n", \
                res.output
        assert json.loads(thaw_cli("status", "elsewhere", "--json").output)["desired"] == 0
    finally:
        deployments.put_back(cfg.registry_url, "elsewhere", deployments.Deployment(**row))
        undeploy(cfg, thaw_cli, "elsewhere", ok=False)
    for args, message in ((["--env", "1BAD=x"], "'1BAD': not an environment variable name"),
                          (["--env", "novalue"], "expected NAME=VALUE"),
                          (["--env", "A=x\0B=y"], "--env A: a NUL character in the value"),
                          (["--env", "API_KEY=x", "--secret", "API_KEY"], "API_KEY: given as --env and as --secret"),
                          (["--port", "70000"], "--port 70000: a port is 1..65535")):
        res = thaw_cli("deploy", "x", "--snapshot", snap, *args, ok=False)
        assert res.exit_code == 1 and message in res.output, res.output
    with pytest.raises(NotFound):  # nothing stored for a refused deploy
        deployments.get(cfg.registry_url, "x")

    # a namespace Temporal does not have: one line at connect, before the registry is touched
    from click.testing import CliRunner
    from temporalio.client import Client

    from thaw.cli import cli
    from thaw.runtime import pool
    from thaw.workflows.pool import PoolSpec

    res = CliRunner().invoke(cli, ["deploy", "x", "--snapshot", snap, "--buffer", "0"], catch_exceptions=False,
                             obj=cfg.model_copy(update={"temporal_namespace": "no-such-namespace"}))
    assert res.exit_code == 1 and res.output == (
        f"error: Temporal at {cfg.temporal_address} has no namespace 'no-such-namespace' (THAW_TEMPORAL_NAMESPACE; "
        "`temporal operator namespace create` makes one)\n"), res.output
    with pytest.raises(NotFound):
        deployments.get(cfg.registry_url, "x")

    # Temporal refuses to start or update the pool after the row was written (here: a client of that namespace,
    # past the connect check): one line, and the registry keeps what it had (no row for a new deployment, the old
    # bounds for an existing one)
    def deploy_refused(name, max_replicas):
        async def go():
            client = await Client.connect(cfg.temporal_address, namespace="no-such-namespace")
            await pool.deploy(client, cfg, PoolSpec(name, snap, max_replicas=max_replicas))
        with pytest.raises(pool.PoolUnreachable) as err:
            asyncio.run(go())
        assert str(err.value).startswith(f"Temporal did not start or update the pool of deployment {name!r}: ")
        assert "\n" not in str(err.value)

    deploy_refused("x", 1)
    with pytest.raises(NotFound):
        deployments.get(cfg.registry_url, "x")
    thaw_cli("deploy", "kept", "--snapshot", snap, "--max", "0", "--buffer", "0")
    try:
        deploy_refused("kept", 3)
        assert deployments.get(cfg.registry_url, "kept").max_replicas == 0
        # a scale past --max is passed on, and the CLI says what the pool will keep
        assert "scale to 3 requested (the pool keeps it to 0: --min 0 --max 0)" in thaw_cli("scale", "kept", "3").output
    finally:
        undeploy(cfg, thaw_cli, "kept")


def release_dead_host(cfg, host_id):
    from thaw.snapshot.host import release_dead

    release_dead(cfg.model_copy(update={"host_id": host_id}))


def _agent_proc(cfg, host_id):
    return subprocess.Popen([sys.executable, "-m", "thaw", "agent", "--host-id", host_id],
                            env={**os.environ, **cfg_env(cfg)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def test_a_replica_that_dies_is_unregistered_and_replaced(cfg, worker, agent, thaw_cli, snap):
    """Its agent notices at the next heartbeat (the process is gone), stops it and drops its registry row; the
    pool sees the row gone at its next host check and starts another."""
    thaw_cli("deploy", "phoenix", "--snapshot", snap, "--min", "1", "--max", "1")
    try:
        (first,) = wait_until(lambda: serving(cfg, "phoenix"), what="first replica")
        wait_until(lambda: json.loads(thaw_cli("status", "phoenix", "--json").output)["replicas"], what="pool's")
        os.kill(agent.serving[first.id].replica.pid, signal.SIGKILL)
        new = wait_until(lambda: [r for r in serving(cfg, "phoenix") if r.id != first.id], timeout=60,
                         what="replacement replica")
        assert first.id not in agent.serving and answer(new[0].endpoint)["digest"]
        assert (cfg.work_dir / "replica-logs" / first.id / "restore.log").exists(), "a dead replica's logs stay"
        assert first.id not in [r.id for r in deployments.replicas(cfg.registry_url)], "unregistered"
        out = thaw_cli("replicas", "logs", first.id).output  # its host found from its recorded restore
        assert f"/replica-logs/{first.id}/restore.log <==" in out and f"after restore {first.id}" in out, out
        res = thaw_cli("replicas", "logs", "r-never", ok=False)
        assert res.exit_code == 1 and "no replica 'r-never' serving or recorded" in res.output, res.output
        res = thaw_cli("replicas", "logs", "r-never", "--host", cfg.host_id, ok=False)
        assert res.exit_code == 1 and "left no logs there" in res.output, res.output
        res = thaw_cli("replicas", "logs", "../replicas", "--host", cfg.host_id, ok=False)
        assert res.exit_code == 1 and "replica id '../replicas'" in res.output, res.output
        st = json.loads(thaw_cli("status", "phoenix", "--json").output)
        assert st["counts"]["gone"] == 1 and [r["id"] for r in st["replicas"]] == [new[0].id], st
    finally:
        undeploy(cfg, thaw_cli, "phoenix", ok=False)


def test_a_replica_that_fails_its_health_checks_is_stopped_and_replaced(cfg, worker, agent, thaw_cli, snap,
                                                                        monkeypatch):
    """A server alive but hung (SIGSTOP: its socket still accepts, nothing answers), then one whose health path
    answers 500: after replica_health_failures checks in a row (one per heartbeat) its agent stops it and drops its
    registry row, and the pool starts another. A healthy replica keeps serving through the checks."""
    from prometheus_client import REGISTRY

    monkeypatch.setattr(agent, "cfg", agent.cfg.model_copy(update={"replica_health_timeout_s": 1.0}))
    ended = lambda: REGISTRY.get_sample_value("thaw_replicas_ended_total", {"reason": "unhealthy"}) or 0  # noqa: E731
    before = ended()
    thaw_cli("deploy", "zombie", "--snapshot", snap, "--min", "1", "--max", "1")
    try:
        (first,) = wait_until(lambda: serving(cfg, "zombie"), what="first replica")
        time.sleep(4 * cfg.agent_heartbeat_s)  # more rounds of checks than it takes to fail
        assert [r.id for r in serving(cfg, "zombie")] == [first.id] and agent.serving[first.id].health_failures == 0
        pid = agent.serving[first.id].replica.pid
        os.kill(pid, signal.SIGSTOP)
        (second,) = wait_until(lambda: [r for r in serving(cfg, "zombie") if r.id != first.id], timeout=60,
                               what="the hung replica's replacement")
        assert first.id not in agent.serving and wait_until(lambda: not os.path.exists(f"/proc/{pid}"),
                                                            what="the hung replica's process gone")
        assert answer(second.endpoint)["digest"] and ended() == before + 1
        answer(second.endpoint, "/sick")
        (third,) = wait_until(lambda: [r for r in serving(cfg, "zombie") if r.id not in (first.id, second.id)],
                              timeout=60, what="the sick replica's replacement")
        assert second.id not in agent.serving and closed(second.endpoint) and answer(third.endpoint)["digest"]
        assert ended() == before + 2
        out = thaw_cli("replicas", "logs", second.id).output  # its logs stay, as a dead one's
        assert f"/replica-logs/{second.id}/" in out, out
    finally:
        undeploy(cfg, thaw_cli, "zombie", ok=False)


def test_the_agents_health_checks_go_on_after_a_failed_round_and_end_with_the_agent(cfg):
    """The real agent's loop (watch_health, apart from its heartbeat): a round that fails (the registry down) is
    logged and the next one runs; the loop ends once the agent is closing."""
    import types

    from thaw.runtime.agent import watch_health

    calls, acts = [], types.SimpleNamespace(closing=False)

    def check_health():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("registry down")
        acts.closing = len(calls) == 3

    acts.check_health = check_health
    asyncio.run(asyncio.wait_for(watch_health(cfg.model_copy(update={"agent_heartbeat_s": 0.01}), acts), 10))
    assert len(calls) == 3


def test_the_agents_heartbeat_is_not_held_by_its_clean_up(cfg, monkeypatch):
    """The real agent's loops: stopping an orphan replica waits for its process to go, an unmount for its daemon.
    Those ran in the heartbeat's round, and a few of them made a live host look dead (every replica replaced)."""
    import threading
    import types

    from thaw.runtime import agent

    beats = []
    monkeypatch.setattr(agent.snapshots, "heartbeat_host", lambda url, host_id: beats.append(time.monotonic()))
    slow = lambda *a: time.sleep(1.0)  # noqa: E731
    acts = types.SimpleNamespace(closing=False, leaving=threading.Event(), serving={}, reap=slow, stop_orphans=slow,
                                 host=types.SimpleNamespace(pins=types.SimpleNamespace(pinned_bytes=0),
                                                            gpu_loads=lambda: [], release_idle=slow))
    fast = cfg.model_copy(update={"agent_heartbeat_s": 0.05, "mount_idle_s": 1})

    async def main():
        loops = [asyncio.create_task(agent.heartbeat(fast, acts)),
                 asyncio.create_task(agent.rounds(fast, acts, "clean-up", lambda: agent.tidy(fast, acts)))]
        await asyncio.sleep(2.0)
        acts.closing = True
        for t in loops:
            t.cancel()

    asyncio.run(main())
    assert len(beats) >= 10 and max(b - a for a, b in zip(beats, beats[1:])) < 0.9, beats  # a round takes 3 s


def test_a_start_the_pool_gave_up_on_never_serves(cfg, worker, agent, snap):
    """The pool names each replica it starts; when a start fails on its side (a timeout while the agent goes
    on), it stops that id. A stop that arrives before the replica serves is kept: the replica stops as soon as
    it would have served, and leaves no registry row."""
    from temporalio.testing import ActivityEnvironment

    from thaw.workflows.pool import StartReplicaInput, StopReplicaInput

    def start(rid):  # as the agent's worker runs it: in an activity's context
        return ActivityEnvironment().run(agent.start_replica, StartReplicaInput("dep", snap, [], 0, replica_id=rid))

    agent.stop_replica(StopReplicaInput("r-given-up"))
    with pytest.raises(Exception, match="gave up on this start"):
        start("r-given-up")
    assert "r-given-up" not in agent.serving and serving(cfg, "dep") == []
    info = start("r-wanted")  # ids are kept
    assert info.id == "r-wanted" and [r.id for r in serving(cfg, "dep")] == ["r-wanted"]
    agent.stop_replica(StopReplicaInput("r-wanted"))
    assert serving(cfg, "dep") == [] and not agent.serving


def test_a_start_cancelled_while_its_replica_restores_leaves_nothing_running(cfg, agent, snap):
    """Temporal cancels an activity (its timeout, the worker shutting down) by raising into the activity's thread
    wherever it is. Landing just after the replica started, it must not leave that replica running unowned: the
    start ends with the replica stopped and no registry row."""
    import threading

    from temporalio.testing import ActivityEnvironment

    from thaw.workflows.pool import StartReplicaInput

    env, started = ActivityEnvironment(), []
    restore_many = agent.host.restore_many

    def then_cancelled(*args, **kwargs):
        started.extend(restore_many(*args, **kwargs))
        threading.Timer(0.05, env.cancel).start()
        time.sleep(1.0)  # where the cancel lands
        return started

    agent.host.restore_many = then_cancelled
    try:
        with pytest.raises(BaseException):
            env.run(agent.start_replica, StartReplicaInput("cancelled", snap, [], 0, replica_id="r-cancelled"))
    finally:
        del agent.host.restore_many
    ((running, _),) = started
    assert not running.replica.alive() and "r-cancelled" not in agent.serving
    assert deployments.replicas(cfg.registry_url, "cancelled") == []


def test_a_scale_signal_before_the_pool_runs_is_kept(cfg, worker, agent, thaw_cli, snap):
    """Signal-with-start delivers the signal in the pool's first workflow task, before run() starts: the state
    must already be there for it (it came with the input)."""
    from temporalio.client import Client

    from thaw.runtime.pool import deploy
    from thaw.workflows.pool import DeploymentPool, PoolSpec, PoolState, ScaleRequest

    async def go():
        client = await Client.connect(cfg.temporal_address)
        spec, _ = await deploy(client, cfg, PoolSpec("early", snap, max_replicas=2))
        await client.get_workflow_handle("pool-early").signal(DeploymentPool.stop)
        await client.get_workflow_handle("pool-early").result()
        await client.start_workflow(DeploymentPool.run, PoolState(spec), id="pool-early",
                                    task_queue=cfg.build_task_queue, start_signal="scale",
                                    start_signal_args=[ScaleRequest(2, "temporal")])

    asyncio.run(go())
    try:
        reps = wait_until(lambda: len(serving(cfg, "early")) == 2 and serving(cfg, "early"), what="2 replicas")
        assert all(answer(r.endpoint)["digest"] for r in reps)
    finally:
        undeploy(cfg, thaw_cli, "early", ok=False)


def test_a_pool_continues_as_new_with_its_replicas_and_takes_signals_across_runs(cfg, worker, agent, thaw_cli,
                                                                                   snap):
    """The pool's history is kept short: past its limit (here 100 events: a run of a few seconds) it continues
    as new with its replicas, counts and signals; scale signals work across runs. (No test ran a second run.)"""
    from temporalio.client import Client

    from thaw.runtime.pool import deploy
    from thaw.workflows.pool import PoolSpec

    async def run_id() -> str:
        client = await Client.connect(cfg.temporal_address)
        return (await client.get_workflow_handle("pool-short").describe()).run_id

    asyncio.run(_deploy(cfg, deploy, PoolSpec("short", snap, max_replicas=2, check_every_s=0.5, history_limit=100)))
    try:
        thaw_cli("scale", "short", "2")
        ids = wait_until(lambda: len(serving(cfg, "short")) == 2 and sorted(r.id for r in serving(cfg, "short")),
                         what="2 replicas")
        for _ in range(2):
            before = asyncio.run(run_id())
            wait_until(lambda: asyncio.run(run_id()) != before, timeout=60, what="a continue-as-new")
        st = json.loads(thaw_cli("status", "short", "--json").output)
        assert sorted(r["id"] for r in st["replicas"]) == ids and st["desired"] == 2, st
        assert st["counts"]["restored"] == 2 and st["last_signal"]["replicas"] == 2, st
        thaw_cli("scale", "short", "1")
        wait_until(lambda: len(serving(cfg, "short")) == 1, timeout=60, what="1 replica")
        thaw_cli("scale", "short", "2")
        wait_until(lambda: len(serving(cfg, "short")) == 2, timeout=60, what="2 replicas again")
    finally:
        undeploy(cfg, thaw_cli, "short", ok=False)


async def _deploy(cfg, deploy, spec):
    from temporalio.client import Client

    await deploy(await Client.connect(cfg.temporal_address), cfg, spec)


def test_two_deploys_of_one_name_at_once_both_land(cfg, worker, thaw_cli, snap, monkeypatch):
    """Two deploys of one name at once (the CLI and the API) both find no pool running; the one whose start
    comes second updates the pool the first started instead of failing (and putting back the registry row of a
    pool that runs)."""
    from temporalio.client import Client

    from thaw.runtime import pool
    from thaw.workflows.pool import PoolSpec

    async def both_find_none(client, name):
        return False

    monkeypatch.setattr(pool, "running", both_find_none)

    async def go():
        client = await Client.connect(cfg.temporal_address)
        first = await pool.deploy(client, cfg, PoolSpec("twice", snap, max_replicas=1))
        second = await pool.deploy(client, cfg, PoolSpec("twice", snap, max_replicas=2))
        return first[1], second[1], (await pool.state(client, "twice")).spec.max_replicas

    try:
        assert asyncio.run(go()) == (True, False, 2)
        assert deployments.get(cfg.registry_url, "twice").max_replicas == 2
    finally:
        monkeypatch.undo()
        undeploy(cfg, thaw_cli, "twice", ok=False)


def test_a_cancelled_pool_undeploys_and_a_deploy_while_undeploying_starts_afresh(cfg, worker, agent, thaw_cli,
                                                                                  snap):
    """Cancelling a pool (Temporal UI, `temporal workflow cancel`) stops its replicas and gives its buffer
    host back, as an undeploy does. A deploy that comes while the pool is still stopping is not lost: a fresh
    run of the pool follows with the new spec."""
    from temporalio.client import Client, WorkflowFailureError
    from temporalio.service import RPCError

    from thaw.runtime import pool

    def run(coro_fn):
        async def go():
            return await coro_fn(await Client.connect(cfg.temporal_address))
        return asyncio.run(go())

    with more_agents(cfg, 1):
        thaw_cli("deploy", "cx", "--snapshot", snap, "--min", "1", "--max", "2", "--buffer", "1")
        (rep,) = wait_until(lambda: serving(cfg, "cx"), what="1 replica")
        wait_until(lambda: any(h.reserved_for == "cx" for h in snapshots.list_hosts(cfg.registry_url)),
                   what="a buffer host")

        async def cancel(client, scale_first=True):  # while it reconciles (its activities turn a cancel into
            handle = client.get_workflow_handle(pool.workflow_id("cx"))  # their own failure)
            if scale_first:
                await pool.scale(client, "cx", 2, "test")
                await asyncio.sleep(0.05)
            with contextlib.suppress(RPCError):  # the undeploy may have ended the pool already
                await handle.cancel()
            with contextlib.suppress(WorkflowFailureError):  # cancelled (else it ended undeployed)
                await handle.result()
        run(cancel)
        assert run(lambda c: c.get_workflow_handle(pool.workflow_id("cx")).describe()).status.name == "CANCELED"
        assert serving(cfg, "cx") == [] and not any(h.reserved_for for h in snapshots.list_hosts(cfg.registry_url))
        with pytest.raises(OSError):  # stopped for real
            answer(rep.endpoint)

        thaw_cli("deploy", "cx", "--snapshot", snap, "--min", "1", "--max", "2")
        wait_until(lambda: serving(cfg, "cx"), what="1 replica again")
        thaw_cli("undeploy", "cx")
        thaw_cli("deploy", "cx", "--snapshot", snap, "--min", "2", "--max", "2")  # while it stops
        reps = wait_until(lambda: len(serving(cfg, "cx")) == 2 and serving(cfg, "cx"), 90, "2 replicas, fresh run")
        assert run(lambda c: pool.state(c, "cx")).spec.min_replicas == 2
        assert all(answer(r.endpoint)["digest"] for r in reps)
        thaw_cli("undeploy", "cx")  # and a cancel on top, while it undeploys: still everything goes
        run(lambda c: cancel(c, scale_first=False))
        assert serving(cfg, "cx") == [] and not any(h.reserved_for for h in snapshots.list_hosts(cfg.registry_url))


def test_a_scale_during_an_undeploy_says_it_was_dropped(cfg, worker, agent, thaw_cli, snap, api, monkeypatch):
    """An undeploying pool drops scale signals: `thaw scale` and the control API say so (exit 1, 409) instead of
    "requested"; once the pool has ended, a scale finds no pool."""
    thaw_cli("deploy", "bye", "--snapshot", snap, "--min", "1", "--max", "2", "--buffer", "0")
    wait_until(lambda: serving(cfg, "bye"), what="1 replica")
    monkeypatch.setattr(agent, "_drain", lambda rid: time.sleep(10))  # the undeploy's stop takes a while
    thaw_cli("undeploy", "bye")
    wait_until(lambda: json.loads(thaw_cli("status", "bye", "--json").output)["stopping"], what="undeploying")
    res = thaw_cli("scale", "bye", "2", ok=False)
    assert res.exit_code == 1 and "deployment 'bye' is undeploying: this scale was dropped" in res.output, res.output
    url, token = api
    status, body = api_call(url, "/v1/deployments/bye/scale", token, {"replicas": 2})
    assert status == 409 and "undeploying" in body["error"], (status, body)
    assert json.loads(thaw_cli("status", "bye", "--json").output)["last_signal"] is None, "the pool took neither"
    wait_until(lambda: "no running pool" in thaw_cli("scale", "bye", "1", ok=False).output, 30, "the pool's end")
    assert serving(cfg, "bye") == []
    res = thaw_cli("status", "never-deployed", ok=False)  # not "no running pool (workflow not found ...)"
    assert res.exit_code == 1 and "no deployment 'never-deployed' (see `thaw deploy`)" in res.output, res.output


def paused_pool(cfg, snap, name, signals=()):
    """Deploy ``name`` (at most 3 replicas), then run its pool afresh on a queue no worker polls yet and send it
    ``signals`` (ScaleRequests); returns the config whose build queue is that one (see :func:`pool_worker`)."""
    from temporalio.client import Client

    from thaw.runtime.pool import deploy
    from thaw.workflows.pool import DeploymentPool, PoolState, PoolSpec

    queue = cfg.model_copy(update={"build_task_queue": f"paused-{cfg.build_task_queue}"})

    async def go():
        client = await Client.connect(cfg.temporal_address)
        spec, _ = await deploy(client, cfg, PoolSpec(name, snap, max_replicas=3, cooldown_s=0))
        await client.get_workflow_handle(f"pool-{name}").signal(DeploymentPool.stop)  # its registry row stays
        await client.get_workflow_handle(f"pool-{name}").result()
        handle = await client.start_workflow(DeploymentPool.run, PoolState(spec), id=f"pool-{name}",
                                             task_queue=queue.build_task_queue)  # no worker polls it yet
        for req in signals:
            await handle.signal(DeploymentPool.scale, req)

    asyncio.run(go())
    return queue


def pool_worker(queue):
    """A worker polling the queue of a :func:`paused_pool` (a context manager)."""
    from conftest import running_worker
    from thaw.runtime.worker import build_worker

    return running_worker(queue, lambda client, ex: build_worker(client, queue, ex))


@contextlib.contextmanager
def pool_reading_at_once(cfg, thaw_cli, snap, name, signals):
    """A :func:`paused_pool` that reads ``signals`` in its first workflow task; yields with its worker running,
    undeploys."""
    with pool_worker(paused_pool(cfg, snap, name, signals)):
        try:
            yield
        finally:
            undeploy(cfg, thaw_cli, name, ok=False)


def test_each_replica_of_a_burst_is_timed_from_the_signal_that_asked_for_it(cfg, worker, agent, thaw_cli, snap):
    """Scale signals 1, 2, 3 that the pool reads in one workflow task place three replicas at once; replica N's
    signal time (P5's start) is that of the signal asking for N replicas, not the last signal's."""
    from thaw.workflows.pool import ScaleRequest

    at = [int(time.time() * 1000) + i * 1000 for i in range(3)]
    with pool_reading_at_once(cfg, thaw_cli, snap, "burst", [ScaleRequest(i + 1, "test", t) for i, t in enumerate(at)]):
        reps = wait_until(lambda: len(r := json.loads(thaw_cli("status", "burst", "--json").output)["replicas"])
                          == 3 and r, what="3 replicas")
        assert sorted(r["signal_ms"] for r in reps) == at, reps


def test_an_at_least_signal_raises_the_pool_but_never_lowers_it(cfg, worker, agent, thaw_cli, snap):
    """The gateway asks for "at least" one replica when it sees none ready: `thaw scale NAME 3` just before,
    whose replicas still restore, must not come down to 1 (a plain scale(1) stopped two of them). Signals, in
    the order the pool reads them: at least 2 (from 0: raises), 3, at least 1 (keeps 3)."""
    from thaw.workflows.pool import ScaleRequest

    now = int(time.time() * 1000)
    with pool_reading_at_once(cfg, thaw_cli, snap, "atleast", [ScaleRequest(n, "test", now, at_least) for n, at_least
                                                               in ((2, True), (3, False), (1, True))]):
        wait_until(lambda: len(serving(cfg, "atleast")) == 3, what="3 replicas")
        assert json.loads(thaw_cli("status", "atleast", "--json").output)["desired"] == 3


class SlowHostChecks:
    """The real ``pool_hosts``, except that while ``hold`` is set a check answers only once ``release`` is;
    ``calls``: when each check began (time.monotonic())."""

    def __init__(self, cfg):
        import threading

        from thaw.activities.pool import PoolActivities
        self.real = PoolActivities(cfg)
        self.hold, self.held, self.release = threading.Event(), threading.Event(), threading.Event()
        self.calls: list[float] = []

    @activity.defn(name="pool_hosts")
    def pool_hosts(self, inp: HostsInput) -> HostsResult:
        self.calls.append(time.monotonic())
        res = self.real.pool_hosts(inp)
        if self.hold.is_set():
            self.held.set()
            self.release.wait(60)
        return res


@contextlib.contextmanager
def pool_worker_of_its_own(cfg, tag: str):
    """A build queue of its own (its config is yielded) whose worker runs DeploymentPool and a SlowHostChecks
    (yielded too): a pool deployed with that config makes its host checks there."""
    from temporalio.worker import Worker

    from conftest import running_worker
    from thaw.workflows.pool import DeploymentPool

    queue = cfg.model_copy(update={"build_task_queue": f"{tag}-{cfg.build_task_queue}"})
    checks = SlowHostChecks(queue)
    with running_worker(queue, lambda client, ex: Worker(client, task_queue=queue.build_task_queue,
                                                         workflows=[DeploymentPool], activities=[checks.pool_hosts],
                                                         activity_executor=ex)):
        yield queue, checks


def test_a_scale_counts_as_sent_when_the_pool_cannot_say_whether_it_took_it(cfg, worker, agent, thaw_cli, snap,
                                                                            monkeypatch):
    """`thaw scale` asks the pool whether it dropped the signal (undeploying); a pool whose worker has stopped
    cannot answer: after QUERY_S the scale counts as sent, and it is (the pool reads it once a worker is back)."""
    from temporalio.client import Client

    from thaw.runtime import pool

    monkeypatch.setattr(pool, "QUERY_S", 3.0)

    async def scale():
        t0 = time.monotonic()
        await pool.scale(await Client.connect(cfg.temporal_address), "mute", 1, "test", report_dropped=True)
        return time.monotonic() - t0

    queue, took = paused_pool(cfg, snap, "mute"), None
    try:
        with pool_worker(queue):  # the pool runs its first workflow task, then its worker stops
            wait_until(lambda: thaw_cli("status", "mute", ok=False).exit_code == 0, what="the pool answering")
        took = asyncio.run(scale())
    finally:
        with pool_worker(queue):
            try:
                if took is not None:
                    wait_until(lambda: len(serving(cfg, "mute")) == 1, what="the replica the scale asked for")
            finally:
                undeploy(cfg, thaw_cli, "mute", ok=False)
    assert 3.0 <= took < 15, took


def test_a_scale_signal_is_placed_while_the_pool_waits_on_a_host_check(cfg, worker, agent, thaw_cli, snap):
    """A scale signal that arrives while the pool's loop waits on a host check (the registry is slow) starts its
    replica at once, on the hosts the last check saw: a burst's later signals do not queue behind the check."""
    from temporalio.client import Client

    from thaw.runtime.pool import deploy
    from thaw.workflows.pool import PoolSpec

    with pool_worker_of_its_own(cfg, "slow-hosts") as (queue, slow):
        try:
            async def go():  # its pool runs on the queue of this worker
                await deploy(await Client.connect(cfg.temporal_address), queue,
                             PoolSpec("slowreg", snap, max_replicas=3, cooldown_s=0))
            asyncio.run(go())
            thaw_cli("scale", "slowreg", "1")
            wait_until(lambda: len(serving(cfg, "slowreg")) == 1, what="the first replica")
            slow.hold.set()
            thaw_cli("scale", "slowreg", "2")  # placed, then the loop's host check hangs
            assert slow.held.wait(30), "the pool made no host check after its scale-up"
            thaw_cli("scale", "slowreg", "3")
            wait_until(lambda: len(serving(cfg, "slowreg")) == 3, timeout=30, what="3 replicas, the check hanging")
            assert not slow.release.is_set()
        finally:
            slow.release.set()
            undeploy(cfg, thaw_cli, "slowreg", ok=False)


def test_a_burst_of_signals_and_of_finished_starts_shares_its_host_checks(cfg, worker, agent, thaw_cli, snap):
    """Scale signals 1..4, 20 ms apart, place their replicas themselves; the pool then checks its hosts about
    once for the signals and once for the finished starts, not once or twice for each of the eight (every check
    is workflow tasks that a burst's later signals queue behind: P5)."""
    from temporalio.client import Client

    from thaw.runtime.pool import deploy
    from thaw.workflows.pool import DeploymentPool, PoolSpec, ScaleRequest

    with pool_worker_of_its_own(cfg, "counted-hosts") as (queue, checks):
        try:
            async def burst():  # its pool runs on the queue of this worker
                client = await Client.connect(cfg.temporal_address)
                await deploy(client, queue, PoolSpec("calm", snap, max_replicas=4, cooldown_s=0, check_every_s=30))
                wait_until(lambda: checks.calls, what="the pool's first host check")
                await asyncio.sleep(0.5)
                handle, start = client.get_workflow_handle("pool-calm"), time.monotonic()
                for n in range(1, 5):
                    await handle.signal(DeploymentPool.scale, ScaleRequest(n, "test", int(time.time() * 1000)))
                    await asyncio.sleep(0.02)
                return start
            start = asyncio.run(burst())
            wait_until(lambda: len(serving(cfg, "calm")) == 4, what="4 replicas")
            time.sleep(3)  # the checks that the finished starts ask for
            during = [t for t in checks.calls if t >= start]
            assert 1 <= len(during) <= 3, f"{len(during)} host checks for a burst of 4 signals and 4 starts"
        finally:
            undeploy(cfg, thaw_cli, "calm", ok=False)


def test_a_failed_start_s_replacement_is_timed_from_the_signal_that_asked_for_it(cfg, worker, agent, thaw_cli,
                                                                                 snap):
    """A start that fails (its secret is not set yet) is placed again after a backoff; its replacement keeps the
    time of the signal that asked for it, though another signal came during the backoff."""
    from temporalio.client import Client

    from thaw.runtime import pool
    from thaw.workflows.pool import DeploymentPool, ScaleRequest

    out = thaw_cli("deploy", "late", "--snapshot", snap, "--min", "0", "--max", "1", "--secret", "LATE_KEY").output
    assert f"warning: secret(s) LATE_KEY not set in {cfg.secrets_file}" in out, out
    first = int(time.time() * 1000) - 5000

    async def signal(at):
        client = await Client.connect(cfg.temporal_address)
        await client.get_workflow_handle(pool.workflow_id("late")).signal(DeploymentPool.scale,
                                                                           ScaleRequest(1, "test", at))
    try:
        asyncio.run(signal(first))
        st = wait_until(lambda: (st := json.loads(thaw_cli("status", "late", "--json").output))["failures"] and st,
                        what="a failed start")
        (failure,) = st["failures"][:1]  # why, where, which replica: `thaw status` shows it
        assert st["counts"]["failed"] >= 1 and failure["host_id"] == cfg.host_id, st
        assert failure["replica"].startswith("r-") and "LATE_KEY not set" in failure["error"], failure
        assert f"failed     {failure['replica']} on {cfg.host_id} at " in thaw_cli("status", "late").output
        asyncio.run(signal(first + 1000))  # during the backoff: asks for nothing new
        thaw_cli("secrets", "set", "LATE_KEY", "--value", "k")
        (rep,) = wait_until(lambda: json.loads(thaw_cli("status", "late", "--json").output)["replicas"],
                            timeout=90, what="the replacement")
        assert rep["signal_ms"] == first
        st = json.loads(thaw_cli("status", "late", "--json").output)  # a start worked: the streak is over
        assert st["failures"] and "\nfailed " not in thaw_cli("status", "late").output
    finally:
        undeploy(cfg, thaw_cli, "late", ok=False)


def test_a_host_where_starts_fail_is_avoided_while_another_has_room(cfg, worker, agent, thaw_cli, snap, tmp_path):
    """The replicas need secret KEY, set on this host only. Another host (its own state dir: no secrets) sorts
    first, so the buffer reserves it, and placement chose it again after each failed start (as loaded as this
    one, and reserved for the deployment): its second replica never served while this host had room."""
    from thaw.config import Config

    thaw_cli("secrets", "set", "KEY", "--value", "v")
    other = Config(**{**cfg.model_dump(), "state_dir": tmp_path / "other", "host_id": "aaa-no-secrets",
                      "db_url": cfg.registry_url, "store_path": cfg.store_dir})
    with contextlib.ExitStack() as stack:
        stack.enter_context(in_process_agent(other))
        wait_until(lambda: len(snapshots.live_hosts(cfg.registry_url, 5)) == 2, what="2 live hosts")
        thaw_cli("deploy", "picky", "--snapshot", snap[:10], "--max", "2", "--buffer", "1", "--secret", "KEY")
        stack.callback(undeploy, cfg, thaw_cli, "picky", ok=False)
        wait_until(lambda: [h.id for h in snapshots.list_hosts(cfg.registry_url) if h.reserved_for == "picky"] ==
                   ["aaa-no-secrets"], what="the host without the secret reserved")
        thaw_cli("scale", "picky", "2")  # one replica each: the one there fails; its replacement, placed while
        # the other runs here, found both hosts at load 1 and the reserved one first, each time
        reps = wait_until(lambda: len(serving(cfg, "picky")) == 2 and serving(cfg, "picky"), timeout=60,
                          what="both replicas on the host with the secret")
        st = json.loads(thaw_cli("status", "picky", "--json").output)
        assert {r.host_id for r in reps} == {cfg.host_id} and st["counts"]["failed"] == 1, st
        assert st["failures"][0]["host_id"] == "aaa-no-secrets" and "KEY not set" in st["failures"][0]["error"]


def test_an_agent_that_stops_or_cannot_reach_temporal_is_not_left_live(cfg, worker):
    """A host row is written at an agent's start. An agent stopped with SIGTERM, or one that could not reach
    Temporal, marks its host gone as it exits: no work is placed on a queue nobody polls for host_stale_s."""
    def live(host_id):
        return any(h.id == host_id for h in snapshots.live_hosts(cfg.registry_url, cfg.host_stale_s))

    proc = _agent_proc(cfg, "leaving")
    try:
        wait_until(lambda: live("leaving"), what="leaving up", every=0.005)  # SIGTERM the moment its row is
        proc.send_signal(signal.SIGTERM)  # there: its handler must be in place by then (it was not, at times)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not live("leaving")
    res = subprocess.run([sys.executable, "-m", "thaw", "--temporal-address", "127.0.0.1:1", "agent", "--host-id",
                          "lonely"], env={**os.environ, **cfg_env(cfg)}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "cannot reach Temporal at 127.0.0.1:1" in res.stderr, res.stderr
    assert any(h.id == "lonely" for h in snapshots.list_hosts(cfg.registry_url)) and not live("lonely")


def test_a_leaving_agent_marks_its_host_gone_at_once_and_no_late_beat_undoes_it(cfg):
    """SIGTERM: the agent's worker takes no more work at once, but the host was marked gone only once the work
    under way ended (a start can take minutes), so pools placed starts on a queue nobody polled; and a heartbeat
    under way could write "alive" after "gone". Now it is marked gone when it starts leaving, and no beat after."""
    import threading
    import types

    from thaw.runtime.agent import beat, mark_gone

    def live():
        return any(h.id == "leaver" for h in snapshots.live_hosts(cfg.registry_url, cfg.host_stale_s))

    mine = cfg.model_copy(update={"host_id": "leaver"})
    acts = types.SimpleNamespace(closing=False, leaving=threading.Event())
    snapshots.upsert_host(cfg.registry_url, "leaver", "thaw-host-leaver", {}, None, 4)
    beat(mine, acts)
    assert live()
    mark_gone(mine, acts)  # what SIGTERM does now, before the work under way ends
    assert acts.leaving.is_set() and not live()
    beat(mine, acts)  # one that was under way
    assert not live()


def test_a_second_agent_of_a_host_is_refused_and_leaves_the_first_alone(cfg, worker):
    """Two agents of one host (one from `thaw up`, one run by hand) would each take the other's replicas for
    stale ones: the second refuses to start, in one line, before it touches anything; so does an agent whose
    metrics port is taken, before it writes a host row."""
    def host_row(host_id):
        return next((h for h in snapshots.live_hosts(cfg.registry_url, cfg.host_stale_s) if h.id == host_id), None)

    proc = _agent_proc(cfg, "twin")
    try:
        wait_until(lambda: host_row("twin"), what="twin up")
        res = subprocess.run([sys.executable, "-m", "thaw", "agent", "--host-id", "twin"],
                             env={**os.environ, **cfg_env(cfg)}, capture_output=True, text=True, timeout=60)
        assert res.returncode == 1, res.stderr
        assert res.stderr.strip() == (f"error: agent: host twin already has an agent running (pid {proc.pid}); "
                                      f"stop it first, or give this one another --host-id"), res.stderr
        assert proc.poll() is None and host_row("twin").pid == proc.pid
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            res = subprocess.run([sys.executable, "-m", "thaw", "agent", "--host-id", "portless"],
                                 env={**os.environ, **cfg_env(cfg), "THAW_AGENT_METRICS_PORT":
                                      str(busy.getsockname()[1])}, capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and "error: agent: metrics on 127.0.0.1:" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not any(h.id == "portless" for h in snapshots.list_hosts(cfg.registry_url))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


@contextlib.contextmanager
def replica_on_another_host(cfg, agent, thaw_cli, snap, name: str, host_id: str):
    """Deployment ``name`` with its one replica on a subprocess agent ``host_id`` (the in-process agent is full
    meanwhile), held by the pool too; yields (that agent's process, the replica). The in-process agent has room
    again by then. Afterwards: the agent killed, the deployment undeployed, the dead host's leftovers released."""
    snapshots.upsert_host(cfg.registry_url, cfg.host_id, cfg.host_task_queue, agent.host.facts, os.getpid(), 0)
    proc = _agent_proc(cfg, host_id)
    try:
        wait_until(lambda: any(h.id == host_id for h in snapshots.live_hosts(cfg.registry_url, 5)),
                   what=f"{host_id} up")
        thaw_cli("deploy", name, "--snapshot", snap, "--min", "1", "--max", "1", "--buffer", "0")
        (rep,) = wait_until(lambda: serving(cfg, name), what="first replica")
        assert rep.host_id == host_id
        # the pool holds it too (the registry row comes first): lost from now on, not a failed start
        wait_until(lambda: json.loads(thaw_cli("status", name, "--json").output)["replicas"], what="pool's replica")
        snapshots.upsert_host(cfg.registry_url, cfg.host_id, cfg.host_task_queue, agent.host.facts, os.getpid(), 4)
        yield proc, rep
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
        proc.wait()
        try:
            undeploy(cfg, thaw_cli, name, ok=False)
        finally:
            release_dead_host(cfg, host_id)


def test_replica_on_a_killed_agent_is_replaced_on_another_host(cfg, worker, agent, thaw_cli, snap):
    from thaw.runtime.frontdoor import PoolBackends
    from thaw.snapshot import cgroup
    from thaw.snapshot.host import replicas_cgroup

    victim_cgroup = cgroup.path_of(replicas_cgroup("victim"))

    with replica_on_another_host(cfg, agent, thaw_cli, snap, "ha", "victim") as (victim, _):
        assert victim_cgroup.is_dir()  # its replica runs there
        os.kill(victim.pid, signal.SIGKILL)  # the host dies with its replica
        victim.wait()
        new = wait_until(lambda: [r for r in serving(cfg, "ha") if r.host_id == cfg.host_id], timeout=60,
                         what="replacement replica")
        assert answer(new[0].endpoint)["digest"]
        # the agent lists a replica before its start activity returns to the pool: wait for the pool to have it
        st = wait_until(lambda: (s := pool_state(thaw_cli, "ha"))["replicas"] and s, what="the pool's replica")
        assert st["counts"]["lost"] == 1 and st["replicas"][0]["host_id"] == cfg.host_id
        # its row stays (its agent removes it if it comes back), but gateways are no longer sent there
        assert sorted(r.host_id for r in serving(cfg, "ha")) == sorted([cfg.host_id, "victim"])
        assert [r.host_id for r in deployments.serving(cfg, "ha")] == [cfg.host_id]
        assert asyncio.run(PoolBackends(cfg, "ha").endpoints()) == [new[0].endpoint]
    assert not victim_cgroup.exists(), "the dead host's replica cgroup outlived its release"


def test_a_replica_left_on_a_host_that_comes_back_is_stopped(cfg, worker, agent, thaw_cli, snap):
    """A host silent long enough for the pool to replace its replica, then back (a pause, a network split): the
    replica it kept running is stopped, not left serving uncounted."""
    with replica_on_another_host(cfg, agent, thaw_cli, snap, "split", "paused") as (paused, rep):
        os.kill(paused.pid, signal.SIGSTOP)  # silent, its replica still running
        wait_until(lambda: [r for r in serving(cfg, "split") if r.host_id == cfg.host_id], timeout=60,
                   what="replacement replica")
        assert rep.id in {r.id for r in serving(cfg, "split")}  # its row stays while the host is silent
        os.kill(paused.pid, signal.SIGCONT)
        wait_until(lambda: closed(rep.endpoint), timeout=60, what="the first stopped")
        assert rep.id not in {r.id for r in serving(cfg, "split")}
        st = json.loads(thaw_cli("status", "split", "--json").output)
        assert st["counts"]["lost"] == 1 and [r["host_id"] for r in st["replicas"]] == [cfg.host_id]


def pool_state(thaw_cli, name: str) -> dict:
    return json.loads(thaw_cli("status", name, "--json").output)


def test_a_replica_whose_host_comes_back_is_kept_when_nothing_replaced_it(cfg, worker, agent, thaw_cli, snap):
    """Every host silent for a while (a registry outage longer than host_stale_s looks like that): the pool gives
    their replicas up, but has nowhere to place replacements. When the host is back, its replica, still serving,
    is the pool's again, not stopped and restored anew."""
    with replica_on_another_host(cfg, agent, thaw_cli, snap, "outage", "paused") as (paused, rep):
        snapshots.upsert_host(cfg.registry_url, cfg.host_id, cfg.host_task_queue, agent.host.facts, os.getpid(), 0)
        os.kill(paused.pid, signal.SIGSTOP)
        wait_until(lambda: pool_state(thaw_cli, "outage")["counts"].get("lost") == 1, timeout=60, what="given up")
        assert pool_state(thaw_cli, "outage")["replicas"] == []
        os.kill(paused.pid, signal.SIGCONT)
        wait_until(lambda: [r["id"] for r in pool_state(thaw_cli, "outage")["replicas"]] == [rep.id], timeout=60,
                   what="the replica taken back")
        st = pool_state(thaw_cli, "outage")
        assert st["counts"]["back"] == 1 and not st["counts"].get("stopped") and not st["lost"], st
        assert [r.id for r in serving(cfg, "outage")] == [rep.id] and answer(rep.endpoint)["digest"]


def test_a_replica_whose_host_comes_back_after_a_redeploy_is_replaced_not_kept(cfg, worker, agent, thaw_cli, snap):
    """As above, but the deployment got new env while its host was silent: the replica that comes back runs the
    old spec, so it is stopped and a new one started, not taken back (it served the old env for good)."""
    with replica_on_another_host(cfg, agent, thaw_cli, snap, "moved", "paused") as (paused, rep):
        snapshots.upsert_host(cfg.registry_url, cfg.host_id, cfg.host_task_queue, agent.host.facts, os.getpid(), 0)
        os.kill(paused.pid, signal.SIGSTOP)
        wait_until(lambda: pool_state(thaw_cli, "moved")["counts"].get("lost") == 1, timeout=60, what="given up")
        thaw_cli("deploy", "moved", "--snapshot", snap, "--min", "1", "--max", "1", "--buffer", "0", "--env", "V=2")
        os.kill(paused.pid, signal.SIGCONT)
        (new,) = wait_until(lambda: pool_state(thaw_cli, "moved")["replicas"], timeout=90, what="a new replica")
        assert new["id"] != rep.id, "the replica of the old spec was taken back"
        wait_until(lambda: closed(rep.endpoint), timeout=60, what="the old replica stopped")
        assert not pool_state(thaw_cli, "moved")["counts"].get("back")


def test_a_stop_its_host_did_not_take_in_time_is_tried_again(cfg, worker, agent, thaw_cli, snap):
    """A scale-down whose stop the host does not pick up in time (paused here; too busy, or cut off) keeps the
    replica on the pool's list of lost ones: stopped when its host is seen again, not left serving uncounted."""
    with replica_on_another_host(cfg, agent, thaw_cli, snap, "stuck", "paused") as (paused, rep):
        thaw_cli("deploy", "stuck", "--snapshot", snap, "--min", "0", "--max", "1", "--cooldown", "0")
        os.kill(paused.pid, signal.SIGSTOP)
        thaw_cli("scale", "stuck", "0")  # the host check right after still sees the host: the stop goes there
        wait_until(lambda: [r["id"] for r in pool_state(thaw_cli, "stuck")["lost"]] == [rep.id], timeout=60,
                   what="the stop to time out")
        assert rep.id in {r.id for r in serving(cfg, "stuck")}
        os.kill(paused.pid, signal.SIGCONT)  # (the stop it holds may run first; the pool's own comes after)
        wait_until(lambda: not pool_state(thaw_cli, "stuck")["lost"], timeout=60, what="the stop tried again")
        wait_until(lambda: closed(rep.endpoint), timeout=30, what="stopped at last")
        assert rep.id not in {r.id for r in serving(cfg, "stuck")}
        st = pool_state(thaw_cli, "stuck")
        assert not st["counts"].get("lost") and st["counts"]["stopped"] == 1, st


def test_a_replica_an_undeploy_could_not_reach_is_stopped_when_its_host_is_back(cfg, worker, agent, thaw_cli, snap):
    """Undeployed while a host is silent: its replica cannot be stopped, and the pool ends. It forgets the
    replica's row, so the host's agent, heard from again, stops the replica itself: no run would."""
    with replica_on_another_host(cfg, agent, thaw_cli, snap, "left", "paused") as (paused, rep):
        os.kill(paused.pid, signal.SIGSTOP)
        wait_until(lambda: pool_state(thaw_cli, "left")["counts"].get("lost") == 1, timeout=60, what="given up")
        undeploy(cfg, thaw_cli, "left")  # its stop of the lost replica times out: the pool ends without it
        assert rep.id not in {r.id for r in serving(cfg, "left")}
        os.kill(paused.pid, signal.SIGCONT)
        wait_until(lambda: closed(rep.endpoint), timeout=60, what="stopped by its own agent")


def test_a_scale_down_lets_the_requests_under_way_finish(cfg, worker, agent, thaw_cli, snap):
    """A replica scaled down leaves the registry first (gateways stop sending it requests), keeps serving for
    replica_drain_s, then gets SIGTERM and replica_stop_grace_s to exit: a request under way when the scale-down
    came, longer than the drain, still gets its whole answer, and the replica goes as soon as its server exits,
    not at the end of the grace. Its host slot stays taken until it is gone."""
    import threading

    from thaw.snapshot.host import SnapshotError

    agent.cfg = agent.cfg.model_copy(update={"replica_drain_s": 0.5, "replica_stop_grace_s": 30,
                                             "host_capacity": 1})
    thaw_cli("deploy", "drain", "--snapshot", snap, "--min", "0", "--max", "1", "--buffer", "0", "--cooldown", "0")
    try:
        thaw_cli("scale", "drain", "1")
        (rep,) = wait_until(lambda: serving(cfg, "drain"), what="the replica")
        wait_until(lambda: pool_state(thaw_cli, "drain")["replicas"], what="the pool's replica")
        got = []
        def call():
            try:
                got.append(answer(rep.endpoint, "/slow?4"))
            except Exception as e:  # noqa: BLE001 - shown by the assert below
                got.append(repr(e))
        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        thaw_cli("scale", "drain", "0")
        wait_until(lambda: not serving(cfg, "drain"), timeout=10, what="the row to go first")
        with pytest.raises(SnapshotError, match="is full"):  # while it drains, it still holds its slot
            with agent._slots(1):
                pass
        t.join(30)
        assert got == [{"slow": True}]
        wait_until(lambda: pool_state(thaw_cli, "drain")["counts"].get("stopped") == 1, what="the stop")
        assert time.monotonic() - t0 < 15, "the stop waited out the grace: the server's exit went unseen"
        assert snapshots.get(cfg.registry_url, snap).spec["stop_signal"] == "SIGTERM"  # the image has no StopSignal
        with pytest.raises(OSError):
            answer(rep.endpoint)
    finally:
        undeploy(cfg, thaw_cli, "drain", ok=False)


def test_gateway_holds_a_request_at_zero_and_loses_none_when_an_agent_dies_mid_restore(cfg, worker, agent,
                                                                                         thaw_cli, snap):
    import threading

    from thaw.runtime.frontdoor import PoolBackends
    from thaw.runtime.gateway import Gateway, GatewayThread

    # only the subprocess agent has room at first, so the first restore runs there
    snapshots.upsert_host(cfg.registry_url, cfg.host_id, cfg.host_task_queue, agent.host.facts, os.getpid(), 0)
    victim = _agent_proc(cfg, "victim")
    gw = None
    try:
        wait_until(lambda: any(h.id == "victim" for h in snapshots.live_hosts(cfg.registry_url, 5)), what="victim up")
        thaw_cli("deploy", "gw", "--snapshot", snap, "--min", "0", "--max", "2", "--buffer", "0")
        gw = GatewayThread(Gateway("gw", PoolBackends(cfg, "gw"), max_replicas=2, scale_to_zero_grace_s=600,
                                   refresh_s=0.2, hold_timeout_s=90))
        assert serving(cfg, "gw") == []
        got = {}

        def call():
            req = urllib.request.Request(gw.url + "/answer-stable", data=b"{}", method="POST")
            with urllib.request.urlopen(req, timeout=120) as r:
                got["status"], got["body"] = r.status, json.loads(r.read())

        t = threading.Thread(target=call)
        t.start()  # arrives at zero replicas: held, and the gateway signals the pool at once
        victim_dir = cfg.model_copy(update={"host_id": "victim"}).work_dir / "replicas"
        wait_until(lambda: victim_dir.is_dir() and any(victim_dir.iterdir()), timeout=60, what="restore on victim")
        os.kill(victim.pid, signal.SIGKILL)  # mid-restore
        victim.wait()
        snapshots.upsert_host(cfg.registry_url, cfg.host_id, cfg.host_task_queue, agent.host.facts, os.getpid(), 4)
        t.join(120)
        assert got.get("status") == 200 and got["body"]["digest"], got
        (rep,) = serving(cfg, "gw")
        # the failed start is placed again after its backoff (1 s): the stop of its replica on the dead host
        # (another heartbeat timeout) runs aside, not before the replacement
        failure = json.loads(thaw_cli("status", "gw", "--json").output)["failures"][0]  # the latest
        assert rep.created_at.timestamp() * 1000 - failure["at_ms"] < cfg.heartbeat_timeout * 1000
        assert rep.host_id == cfg.host_id, "the replacement runs on the surviving host"
        st = gw.gateway.state()
        assert st["ready"] == 1
        # the victim died before its restore finished: it recorded none, and the pool counted a failed start
        assert [e.host_id for e in snapshots.restores(cfg.registry_url, snap) if e.deployment == "gw"] == [cfg.host_id]
        assert json.loads(thaw_cli("status", "gw", "--json").output)["counts"].get("failed", 0) >= 1
        # undeployed behind the gateway's back: once its replica went, a request is answered 503 as soon as the pool
        # has heard the count again, not after the hold
        undeploy(cfg, thaw_cli, "gw")
        wait_until(lambda: gw.gateway.state()["ready"] == 0, timeout=15, what="the gateway saw the replica go")
        t0 = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as err:
            call()
        assert err.value.code == 503 and time.monotonic() - t0 < 5
        error = json.loads(err.value.read())["error"]
        assert error.startswith("gw is not serving: deployment 'gw' "), error  # has no running pool, or undeploying
    finally:
        if gw:
            gw.stop()
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        try:
            undeploy(cfg, thaw_cli, "gw", ok=False)
        finally:
            release_dead_host(cfg, "victim")


DEAD_TEMPORAL = """
import asyncio, os, sys
from temporalio.testing import WorkflowEnvironment
from thaw.runtime import pool
from thaw.stack import temporal_binary

async def main():
    env = await WorkflowEnvironment.start_local(dev_server_existing_path=temporal_binary())
    gone = env.client
    await env.shutdown()  # the client stays, its server does not
    for call in (pool.running(gone, "x"), pool.scale(gone, "x", 1, "test"), pool.state(gone, "x")):
        try:
            await asyncio.wait_for(call, 60)
            print("answered")
        except pool.PoolUnreachable as e:
            print(f"unreachable: {e}")

asyncio.run(main())
sys.stdout.flush()
os._exit(0)  # as thaw's own entry point: the SDK's native threads can abort interpreter finalization (SIGABRT)
"""


def test_a_silent_temporal_is_not_a_missing_pool(temporal_address):
    """"No such pool" (NotFound, 404) and "Temporal did not answer" (PoolUnreachable, 503) are told apart: a
    Temporal outage must not read as ended pools (`thaw snapshots rm` would forget a snapshot they run). The
    client of a server that is gone lives in a process of its own (not in this one, which runs on)."""
    from temporalio.client import Client

    from thaw.runtime import pool

    async def go():
        live = await Client.connect(temporal_address)
        assert await pool.running(live, "nope") is False
        with pytest.raises(NotFound, match="'nope' has no running pool"):
            await pool.scale(live, "nope", 1, "test")

    asyncio.run(go())
    res = subprocess.run([sys.executable, "-c", DEAD_TEMPORAL], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith(("answered", "unreachable:"))]  # not logs
    want = "unreachable: Temporal did not answer about the pool of deployment 'x'"
    assert len(lines) == 3 and all(line.startswith(want) for line in lines), res.stdout[-2000:]
