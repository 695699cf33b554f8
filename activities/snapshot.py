"""Build-queue activities of BuildSnapshot / RestoreSnapshot: planning and registration (registry only)."""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import replace

from temporalio import activity

from thaw.config import Config
from thaw.imagefs.store import ChunkStore
from thaw.registry import images, snapshots
from thaw.registry.models import Snapshot
from thaw.registry.queries import NotFound
from thaw.snapshot.replica import parse_signal, signal_name
from thaw.workflows.build_snapshot import (
    DEFAULT_PORT, BuildSnapshotInput, BuildSnapshotResult, Plan, RegisterSnapshotInput, RestoreInput, RestorePlan)

from .build_image import after_gc, stored_whole, user_errors_fail_fast

def host_queue(cfg: Config, host_id: str) -> str:
    return f"{cfg.host_task_queue_prefix}{host_id}"


def live_host(cfg: Config, host_id: str = ""):
    """The named host, or the most recently heartbeating one; NotFound with what to do otherwise."""
    live = snapshots.live_hosts(cfg.registry_url, cfg.host_stale_s)
    if host_id:
        snapshots.get_host(cfg.registry_url, host_id)  # NotFound when it never registered
        live = [h for h in live if h.id == host_id]
        if not live:
            raise NotFound(f"host {host_id}'s agent is not heartbeating: it is down (`thaw up` restarts it)")
    if not live:
        raise NotFound("no live host agent: start one with `thaw up` or `thaw agent`")
    return live[0]


def image_port(config: dict) -> int:
    """The port a server of this image listens on: its one exposed TCP port (``ExposedPorts``), else 8080."""
    ports = set()
    for key in config.get("ExposedPorts") or {}:
        number, _, proto = str(key).partition("/")
        if (proto or "tcp").lower() != "tcp":
            continue
        if not (number.isascii() and number.isdigit()) or not 1 <= int(number) <= 65535:
            raise NotFound(f"the image's ExposedPorts has {str(key)[:40]!r}, not PORT[/tcp]: give the port with --port")
        ports.add(int(number))
    if len(ports) > 1:
        raise NotFound(f"the image exposes TCP ports {', '.join(map(str, sorted(ports)))}: say which one the server "
                       f"answers on with --port")
    return ports.pop() if ports else DEFAULT_PORT


def image_defaults(spec, config: dict):
    """Fill a ModelSpec's blanks from the image config (Entrypoint + Cmd, Env, WorkingDir, ExposedPorts, User,
    StopSignal)."""
    cmd = spec.cmd or [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
    if not cmd:
        raise NotFound("the image has no Cmd/Entrypoint: give the command with --cmd")
    env = dict(e.split("=", 1) for e in config.get("Env") or [] if "=" in e)
    env.update(spec.env)
    leaked = sorted(set(spec.secrets) & set(env))
    if leaked:
        raise NotFound(f"secret(s) {', '.join(leaked)} also set as plain env; a secret must not be in the snapshot")
    try:
        stop = signal_name(parse_signal(spec.stop_signal or config.get("StopSignal") or "SIGTERM"))
    except ValueError as e:
        raise NotFound(f"{e}{'' if spec.stop_signal else ' (the image says so: override it with --stop-signal)'}") \
            from None
    return replace(spec, cmd=list(cmd), env=env, cwd=spec.cwd or config.get("WorkingDir") or "/",
                   port=spec.port or image_port(config), user=spec.user or config.get("User") or "", stop_signal=stop)


class SnapshotActivities:
    def __init__(self, cfg: Config, store: ChunkStore | None = None):
        self.cfg = cfg
        self.store = store or ChunkStore.open(cfg)  # the build queue's (the image builds' store)

    @activity.defn(name="plan_snapshot")
    @user_errors_fail_fast
    def plan_snapshot(self, inp: BuildSnapshotInput) -> Plan:
        image = images.get(self.cfg.registry_url, inp.image)
        host = live_host(self.cfg, inp.host)
        spec = replace(image_defaults(inp.spec, image.config), hook_token=secrets.token_hex(16))
        return Plan(image.digest, spec, host.id, host.task_queue)

    @activity.defn(name="register_snapshot")
    @user_errors_fail_fast
    def register_snapshot(self, inp: RegisterSnapshotInput) -> BuildSnapshotResult:
        t0 = time.monotonic()
        ck, st, plan = inp.checkpoint, inp.stored, inp.plan
        if (inp.golden.ignore or plan.spec.shm_bytes) and ck.applied is None:
            raise NotFound(f"host {plan.host_id}'s agent is older than this build worker: it applies neither "
                           f"--golden-ignore nor --shm-size, so its snapshot would not restore as asked; upgrade "
                           f"the agent and build again")
        after_gc(self.cfg)  # a gc sweeping now took stock of what was registered without this snapshot
        stored_whole(self.store, st.digest, "snapshot")
        spec, golden = dataclasses.asdict(plan.spec), dataclasses.asdict(inp.golden)
        if ck.sdk is not None:  # a fact of the server, kept with how to run it (runtime.pool.deploy reads it)
            spec["sdk"] = ck.sdk
        timings = dict(inp.timings_ms)
        row, created = snapshots.register(self.cfg.registry_url, Snapshot(
            digest=st.digest, image_digest=plan.image_digest, compat_key=ck.compat_key, host_facts=ck.host_facts,
            spec=spec, golden_request=golden, golden_digest=ck.golden_digest, size=st.size, files=st.files,
            new_bytes=st.new_bytes, build_id=inp.build_id, host_id=plan.host_id, timings_ms=timings))
        timings["register"] = int((time.monotonic() - t0) * 1000)
        return BuildSnapshotResult(row.digest, created, row.image_digest, row.host_id or "", row.compat_key,
                                   row.size, st.new_bytes, timings)

    @activity.defn(name="plan_restore")
    @user_errors_fail_fast
    def plan_restore(self, inp: RestoreInput) -> RestorePlan:
        if inp.replicas < 1:
            raise NotFound(f"--replicas must be at least 1 (got {inp.replicas})")
        snap = snapshots.get(self.cfg.registry_url, inp.snapshot)
        host = live_host(self.cfg, inp.host)
        secrets = sorted(set(snap.spec.get("secrets", [])) | set(inp.secrets))
        return RestorePlan(snap.digest, host.id, host.task_queue, inp.replicas, secrets, inp.keep,
                           float(snap.spec.get("ready_timeout_s", 600)))

    def all(self) -> list:
        return [self.plan_snapshot, self.register_snapshot, self.plan_restore]
