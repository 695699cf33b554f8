"""The `thaw` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import click

from . import config as config_mod
from .errors import first_line
from .files import changing, write_atomic

PATH_PREFIXES = ("dir:", "docker-archive:", "oci-archive:", "oci:", "dockerfile:")


class FiniteRange(click.FloatRange):
    """click's FloatRange without nan and inf, which it lets through (`thaw gc --min-age nan` would take every
    object for old)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(1)


PORT = click.IntRange(1, 65535)


class Size(click.ParamType):
    """A size in bytes as Docker writes it: a number with k, m, g or t (powers of 1024; "MiB", "gb" too)."""

    name = "SIZE"
    UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
        size = int(float(m[1]) * (1 << self.UNITS[m[2].lower()])) if m else 0
        if not 1 << 20 <= size <= 1 << 50:
            self.fail(f"{value!r}: a size from 1 MiB to 1 PiB, e.g. 512m or 2g", param, ctx)
        return size
STAGE_FORMAT = "{desc}[{elapsed}]"  # a workflow's progress line while no activity counts bytes
STAGE_ORDER = ["fetch", "prefetch", "root", "criu", "hooks", "health", "boot", "replay", "total"]


def _ms(timings: dict[str, int]) -> str:
    """The stage breakdown, in the order stages run (JSON transport may have sorted them); unknown stages
    just before the total."""
    from thaw.snapshot.host import breakdown

    rank = {k: i for i, k in enumerate(STAGE_ORDER)}
    return breakdown(dict(sorted(timings.items(), key=lambda kv: rank.get(kv[0], rank["total"] - 0.5))))


def _dump(row) -> dict:
    """A registry row as JSON, a snapshot's hook token hidden (like a secret: for its hosts only)."""
    data = row.model_dump(mode="json")
    if isinstance(data.get("spec"), dict) and data["spec"].get("hook_token"):
        data["spec"]["hook_token"] = "(hidden)"
    return data


def _table(rows, as_json: bool, header: str, line) -> None:
    """Registry rows as JSON, or as a header plus one ``line(row)`` each."""
    if as_json:
        click.echo(json.dumps([_dump(r) for r in rows], indent=2))
        return
    click.echo(header)
    for r in rows:
        click.echo(line(r))


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@click.group()
@click.option("--state-dir", help="State directory [env THAW_STATE_DIR].")
@click.option("--temporal-address", help="Temporal frontend host:port [env THAW_TEMPORAL_ADDRESS].")
@click.option("--db-url", help="Registry DSN, e.g. postgresql+psycopg://u:p@host/db [env THAW_DB_URL].")
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def cli(ctx, state_dir, temporal_address, db_url, verbose):
    """thaw: scale GPU inference up in seconds."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if state_dir is not None and not state_dir.strip():  # click's Path would make "" the current directory
        _fail("--state-dir is empty: name a directory, or leave it out for THAW_STATE_DIR or the default")
    if ctx.obj is None and "--help" in sys.argv[1:]:  # a command's help needs no configuration: a bad setting
        return  # must not hide it (the command does not run; click has consumed its arguments by now)
    if ctx.obj is None:  # a Config handed in (click's obj=, by a program running this CLI in-process) is used as is
        ctx.obj = _configured(config_mod.load, state_dir=state_dir, temporal_address=temporal_address, db_url=db_url)


def _configured(make, **values):
    """``make(**values)`` (a Config); a bad value is a one-line failure naming it."""
    try:
        return make(**values)
    except Exception as e:
        errors = getattr(e, "errors", None)  # pydantic: one line per field, made one line in all
        _fail("bad configuration: " + ("; ".join((f"{'.'.join(map(str, x['loc']))}: " if x["loc"] else "")  # a field's
                                                 + x["msg"].removeprefix("Value error, ") for x in errors())
                                       if callable(errors) else str(e)))


# -- stack ------------------------------------------------------------------------------------------
@cli.command()
@click.option("--s3", "with_s3", is_flag=True,
              help="Also run SeaweedFS and use it as the store's S3 tier (remote-store mode); remembered.")
@click.pass_obj
def up(cfg, with_s3):
    """Start the embedded stack: Temporal dev server (UI included), worker, host agent, control API, registry.
    Safe to re-run."""
    from .stack import StackError, enable_s3, up as stack_up

    try:
        if with_s3 or cfg.s3_embedded:  # remembered; its endpoint follows THAW_S3_EMBEDDED_PORT
            cfg = enable_s3(cfg)
        stack_up(cfg, echo=click.echo)
    except StackError as e:
        _fail(str(e))
    click.echo(f"Temporal {cfg.temporal_address}  UI {cfg.temporal_ui_url}  state {cfg.state_dir}")


@cli.command()
@click.pass_obj
def down(cfg):
    """Stop everything `thaw up` and `thaw hosts up` started."""
    from .stack import StackError, down as stack_down

    try:
        stack_down(cfg, echo=click.echo)
    except StackError as e:
        _fail(str(e))


@cli.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status(cfg, name, as_json):
    """What runs and where; with NAME, that deployment's replicas, hosts, buffer, recent restores and failed starts."""
    from .stack import status as stack_status

    if name:
        return _deployment_status(cfg, name, as_json)

    st = stack_status(cfg)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    t, w, r, s = st["temporal"], st["worker"], st["registry"], st["store"]
    run = lambda pid: f"running (pid {pid})" if pid else "stopped"
    click.echo(f"state dir  {st['state_dir']}")
    temporal = run(t["pid"]) if t["pid"] or not t["reachable"] else "reachable (not started by this state dir)"
    click.echo(f"temporal   {temporal}  {t['address']}  UI {t['ui']}" + (f"  ({t['problem']})" if t["problem"] else ""))
    click.echo(f"worker     {run(w['pid'])}  queue {w['task_queue']}")
    click.echo(f"api        {run(st['api']['pid'])}  {st['api']['url']}  token {st['api']['token_file']}")
    a = st["agent"]
    click.echo(f"agent      {run(a['pid'])}  host {a['host_id']}  queue {a['task_queue']}")
    click.echo(f"registry   {r['url']}  {r['status']}  images {r['images']}  snapshots {r['snapshots']}  "
               f"deployments {r['deployments']}  replicas {r['replicas']} ({r['kept']} kept)")
    s3 = st["s3"]
    if s3["endpoint"]:
        click.echo(f"s3         {run(s3['pid']) if s3['embedded'] else 'external'}  {s3['endpoint']}  "
                   f"bucket {s3['bucket']}")
    click.echo(f"store      {s['dir']}  {s['objects']} objects  {_human(s['bytes'])}")


@cli.command(hidden=True)
@click.pass_obj
def s3(cfg):
    """Run the embedded SeaweedFS S3 server in the foreground."""
    from .stack import serve_s3

    serve_s3(cfg)


@cli.command(hidden=True)
@click.pass_obj
def worker(cfg):
    """Run thaw's Temporal worker in the foreground."""
    from thaw.runtime import worker as worker_mod
    from .stack import worker_ready_file

    logging.getLogger().setLevel(logging.INFO)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(worker_mod.run(cfg, ready_file=worker_ready_file(cfg)))
    except RuntimeError as e:
        _fail(f"worker: {e}")


# -- build ------------------------------------------------------------------------------------------
@cli.group()
def build():
    """Build images into the content-addressed store, and snapshots of models launched from them."""


def _absolute_source(source: str) -> str:
    for prefix in PATH_PREFIXES:
        if source.startswith(prefix):
            return prefix + str(Path(source[len(prefix):]).expanduser().absolute())
    local = Path(source).expanduser()
    if local.exists() or source in (".", "..") or source.startswith(("/", "./", "../", "~")):  # a path, also one
        return str(local.absolute())  # missing here: resolved in the worker's directory, it could name another
    return source


async def _connect(cfg):
    from .client import TemporalUnreachable, connect

    try:
        return await connect(cfg)
    except TemporalUnreachable as e:
        _fail(str(e))


def _failure_message(err: BaseException) -> str:
    from temporalio.exceptions import TimeoutError as ActivityTimeout, TimeoutType

    while getattr(err, "cause", None) is not None:
        err = err.cause
    if isinstance(err, ActivityTimeout) and err.type == TimeoutType.SCHEDULE_TO_START:
        return ("no host agent took the work in time: is the host's agent running (`thaw hosts ls`), or busy with "
                "other builds and restores (its log)?")
    return getattr(err, "message", None) or str(err)


async def _pollers(client, task_queue: str) -> int:
    """How many workers polled ``task_queue`` for workflow tasks lately (Temporal lists those of the last minutes)."""
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    resp = await client.workflow_service.describe_task_queue(DescribeTaskQueueRequest(
        namespace=client.namespace, task_queue=TaskQueue(name=task_queue),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW))
    return len(resp.pollers)


async def _follow(handle, client, show_progress: bool, task_queue: str | None = None):
    """Wait for the result, drawing a progress bar from the running activity's heartbeats. With ``task_queue``:
    when no worker polls it a few seconds in, say so once (the workflow waits for one; nothing else would tell)."""
    from tqdm import tqdm

    result = asyncio.ensure_future(handle.result())
    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, disable=not show_progress, file=sys.stderr,
               dynamic_ncols=True, bar_format=STAGE_FORMAT)  # bytes shown once an activity counts them
    look_at = time.monotonic() + 3
    try:
        while not result.done():
            if task_queue and time.monotonic() > look_at:
                task_queue, queue = None, task_queue
                with contextlib.suppress(Exception):
                    if not await _pollers(client, queue):
                        click.echo(f"warning: no worker polls task queue {queue!r}: this waits until one does "
                                   f"(`thaw status`; `thaw up` starts one)", err=True)
            try:
                desc = await handle.describe()
                for pa in desc.raw_description.pending_activities:
                    what = pa.activity_type.name.replace("_image", "").replace("_source", "")
                    d = None
                    if pa.heartbeat_details.payloads:
                        (d,) = await client.data_converter.decode(pa.heartbeat_details.payloads)
                    if isinstance(d, dict) and d.get("stage") and d["stage"] != what:  # e.g. a launch, waiting
                        what = f"{what}: {d['stage']}"
                    bar.set_description(what, refresh=False)
                    counted = isinstance(d, dict) and "done" in d
                    bar.bar_format = None if counted else STAGE_FORMAT  # bytes only while an activity counts them
                    bar.total, bar.n = (d.get("total") or None, d["done"]) if counted else (None, 0)
                    bar.refresh()
            except Exception:
                pass
            await asyncio.wait([result], timeout=0.3)
    finally:
        bar.close()
    return result.result()


def _run_workflow(cfg, run_fn, arg, wid: str, what: str, quiet: bool, progress: bool = True):
    """Start a workflow on the build queue, show its UI link and progress, wait; one-line error on failure."""
    from temporalio.client import WorkflowFailureError

    async def go():
        client = await _connect(cfg)
        handle = await client.start_workflow(run_fn, arg, id=wid, task_queue=cfg.build_task_queue)
        url = cfg.workflow_url(wid, handle.result_run_id)
        if not quiet:
            click.echo(f"{what}  (Temporal UI: {url})", err=True)
        try:
            res = await _follow(handle, client, show_progress=progress and not quiet and sys.stderr.isatty(),
                                task_queue=cfg.build_task_queue)
        except WorkflowFailureError as e:
            _fail(f"{what} failed: {_failure_message(e)}  ({url})")
        return wid, handle.result_run_id, url, res

    return asyncio.run(go())


@build.command("image")
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (has `digest`).")
@click.option("--id", "workflow_id", help="Workflow id (default build-image-<random>).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="JSON file with OCI image config keys (Cmd, Env, WorkingDir, ExposedPorts): a directory's "
                   "config, or overrides for an image's.")
@click.pass_obj
def build_image(cfg, source, as_json, workflow_id, config_file):
    """Ingest SOURCE into the chunk store and register it.

    SOURCE: a directory, docker-archive tar, OCI layout (dir or tar), registry reference
    (host:port/repo:tag or docker://...), docker-daemon:NAME, or dockerfile:CONTEXT_DIR.
    """
    from thaw.files import BUILD_ID, BUILD_ID_RULE
    from thaw.imagefs.manifest import config_errors

    if workflow_id is not None and not BUILD_ID.fullmatch(workflow_id):
        _fail(f"--id {workflow_id!r}: {BUILD_ID_RULE}")
    config = None
    if config_file:
        try:
            config = json.loads(Path(config_file).read_text())
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (ValueError, RecursionError) as e:
            _fail(f"--config {config_file}: not a JSON object of image config keys ({e})")
        bad = config_errors(config)
        if bad:
            _fail(f"--config {config_file}: bad image config: {'; '.join(bad)}")

    wid, run_id, url, res = _build_image(cfg, source, config, workflow_id, as_json)
    if as_json:
        click.echo(json.dumps({**asdict(res), "workflow_id": wid, "run_id": run_id, "ui": url}))
        return
    click.echo(f"{res.digest}")
    click.echo(_image_built(res), err=True)


def _build_image(cfg, source: str, config: dict | None, workflow_id: str | None, quiet: bool):
    """Run BuildImage for ``source`` (see `thaw build image`); (workflow id, run id, UI url, BuildImageResult)."""
    from thaw.workflows.build_image import BuildImage, BuildImageInput

    return _run_workflow(
        cfg, BuildImage.run, BuildImageInput(_absolute_source(source), config, cfg.heartbeat_timeout,
                                             cfg.activity_timeout),
        workflow_id or f"build-image-{uuid.uuid4().hex[:12]}", f"build of {source}", quiet)


def _image_built(res) -> str:
    return (f"  {'new image' if res.created else 'already registered'}: {res.files} files, {_human(res.size)}, "
            f"{res.chunks} chunks; stored {res.new_chunks} new chunks ({_human(res.new_bytes)}); "
            + _ms(res.timings_ms))


# -- images -----------------------------------------------------------------------------------------
@cli.group()
def images():
    """Registered images: list, show, export, remove."""


@images.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def images_ls(cfg, as_json):
    """Registered images, newest first: digest, size, files, source."""
    from thaw.registry import images as q

    _table(q.list_all(cfg.registry_url), as_json, f"{'DIGEST':<16} {'SIZE':>10} {'FILES':>7} {'CREATED':<20} SOURCE",
           lambda r: f"{r.digest[:16]} {_human(r.size):>10} {r.files:>7} {r.created_at:%Y-%m-%d %H:%M:%S}  {r.source}")


def _registered(cfg, ref: str, what: str = "image"):
    """The registry's image (or snapshot) row for a digest or unique prefix; else a one-line failure, before
    anything starts (no workflow that fails at once in the UI)."""
    from thaw.registry import images, queries, snapshots

    try:
        return (snapshots if what == "snapshot" else images).get(cfg.registry_url, ref)
    except queries.NotFound as e:
        _fail(str(e))


@images.command("show")
@click.argument("digest")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def images_show(cfg, digest, as_json):
    """One image (digest or unique prefix): its source, sizes and image config."""
    row = _registered(cfg, digest)
    data = row.model_dump(mode="json")
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for k, v in data.items():
        click.echo(f"{k:<12} {json.dumps(v) if isinstance(v, (dict, list)) else v}")


@images.command("export")
@click.argument("digest")
@click.argument("dest", type=click.Path(path_type=Path))
@click.pass_obj
def images_export(cfg, digest, dest):
    """Write the image's file tree to DEST (an empty or new directory)."""
    from thaw.imagefs.manifest import ImageManifest
    from thaw.imagefs.materialize import MaterializeError, materialize
    from thaw.imagefs.store import ChunkStore, StoreError

    row = _registered(cfg, digest)
    try:
        materialize(ImageManifest.load(ChunkStore.open(cfg), row.digest), ChunkStore.open(cfg), dest)
    except (MaterializeError, StoreError) as e:
        _fail(str(e))
    click.echo(str(dest))


@images.command("rm")
@click.argument("digest")
@click.pass_obj
def images_rm(cfg, digest):
    """Forget image DIGEST (refused while snapshots of it exist); `thaw gc` then frees what only it used."""
    from thaw.registry import images as q

    try:
        row = q.remove(cfg.registry_url, digest)
    except (q.NotFound, q.InUse) as e:
        _fail(str(e))
    click.echo(f"image {row.digest[:16]} removed; `thaw gc` frees the store objects only it used")


# -- snapshots --------------------------------------------------------------------------------------
def _pairs(items, what):
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            _fail(f"{what} {item!r}: expected NAME=VALUE")
        out[k] = v
    return out


@build.command("snapshot")
@click.argument("image", metavar="IMAGE|SOURCE")
@click.option("--cmd", help="Command line (shell words); default the image's Entrypoint + Cmd.")
@click.option("--port", type=PORT, help="Port the server listens on [default: the image's one exposed TCP port, "
                                         "else 8080].")
@click.option("--health", default="/healthz", show_default=True, help="Health-check path (200 = ready).")
@click.option("--golden", "golden_file", type=click.Path(exists=True, dir_okay=False),
              help="Body of the golden request, replayed after every restore (JSON unless --golden-content-type "
                   "says otherwise); its answer must not change.")
@click.option("--golden-path", default="/", show_default=True, help="Path the golden request goes to.")
@click.option("--golden-method", type=click.Choice(["GET", "POST", "PUT"], case_sensitive=False),
              help="[default: POST with a --golden body, else GET]")
@click.option("--golden-content-type", default="application/json", show_default=True,
              help="Content-Type of the --golden body.")
@click.option("--golden-ignore", "golden_ignore", multiple=True, metavar="FIELD",
              help="A field of the JSON answer that changes with each request (e.g. id, created, usage.time; "
                   "through lists too), left out when answers are compared.")
@click.option("--ready-timeout", type=FiniteRange(1, 7 * 86400), default=600, show_default=True,
              help="Seconds the server may take from launch to ready (loading its model).")
@click.option("--user", default="", help="USER[:GROUP] the server runs as [default: the image's User, else root].")
@click.option("--shm-size", "shm_bytes", type=Size(),
              help="Size of the server's /dev/shm (e.g. 2g for NCCL or torch.multiprocessing); its restores keep "
                   "it.  [default: 64m, as Docker's]")
@click.option("--stop-signal", default="", help="Signal that asks the server to exit when a replica is stopped "
                                                 "(it then has THAW_REPLICA_STOP_GRACE_S to finish its requests) "
                                                 "[default: the image's StopSignal, else SIGTERM].")
@click.option("--env", "env", multiple=True, help="NAME=VALUE, part of the snapshot.")
@click.option("--secret", "secrets", multiple=True,
              help="NAME of a secret (set with `thaw secrets set`): injected after restore, never in the snapshot.")
@click.option("--host", default="", help="Host id to build on (default: any live agent).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def build_snapshot(cfg, image, cmd, port, health, golden_file, golden_path, golden_method, golden_content_type,
                   golden_ignore, ready_timeout, user, shm_bytes, stop_signal, env, secrets, host, as_json):
    """Launch IMAGE once on a host, checkpoint it, verify a restore replays the golden request, register it.

    IMAGE: a registered image's digest (or a unique prefix); anything else is a SOURCE as `thaw build image`
    takes it (dockerfile:./ctx, a registry reference, ./rootfs ...), built into an image first."""
    import base64
    import shlex

    from thaw.runtime.pool import env_error, env_name_error
    from thaw.snapshot.replica import parse_signal
    from thaw.workflows.build_snapshot import BuildSnapshot, BuildSnapshotInput, Golden, ModelSpec

    body = Path(golden_file).read_bytes() if golden_file else b""
    method = (golden_method or ("POST" if golden_file else "GET")).upper()
    if method == "GET" and golden_file:
        _fail(f"--golden {golden_file}: a GET has no body (give --golden-method POST, or no --golden)")
    if golden_file and _is_json(golden_content_type):
        try:
            json.loads(body)
        except ValueError as e:
            _fail(f"--golden {golden_file}: not JSON ({e}); for another kind of body give --golden-content-type")
    bad = [f for f in golden_ignore if not f or "" in f.split(".")]
    if bad:
        _fail(f"--golden-ignore {bad[0]!r}: a field of the JSON answer, e.g. id or usage.time")
    for option, path in (("--health", health), ("--golden-path", golden_path)):
        if not path.startswith("/"):
            _fail(f"{option} {path!r}: a path on the server, starting with /")
    if stop_signal:
        try:
            parse_signal(stop_signal)
        except ValueError as e:
            _fail(f"--stop-signal: {e}")
    try:
        argv = shlex.split(cmd) if cmd else []
    except ValueError as e:  # an unbalanced quote
        _fail(f"--cmd {cmd!r}: {e}")
    spec = ModelSpec(cmd=argv, port=port or 0, health=health, env=_pairs(env, "--env"),
                     secrets=list(secrets), ready_timeout_s=ready_timeout, user=user, shm_bytes=shm_bytes or 0,
                     stop_signal=stop_signal)
    error = env_error(spec.env) or env_name_error(spec.secrets, "--secret")
    if error:
        _fail(error)
    golden = Golden(path=golden_path, method=method, body_b64=base64.b64encode(body).decode(),
                    content_type=golden_content_type, ignore=list(golden_ignore))
    if re.fullmatch(r"[0-9a-fA-F]+", image) and not Path(image).exists():  # a digest is never anything else
        image = _registered(cfg, image).digest
    else:  # a source: its image first
        res = _build_image(cfg, image, None, None, as_json)[3]
        if not as_json:
            click.echo(f"image {res.digest}", err=True)
            click.echo(_image_built(res), err=True)
        image = res.digest
    inp = BuildSnapshotInput(image, spec, golden, host, cfg.heartbeat_timeout, activity_timeout_s=cfg.activity_timeout)
    wid, run_id, url, res = _run_workflow(
        cfg, BuildSnapshot.run, inp,
        f"build-snapshot-{uuid.uuid4().hex[:12]}", f"snapshot of image {image[:12]}", as_json)
    if as_json:
        click.echo(json.dumps({**asdict(res), "workflow_id": wid, "run_id": run_id, "ui": url}))
        return
    click.echo(res.digest)
    click.echo(f"  {'new snapshot' if res.created else 'already registered'} of image {res.image_digest[:12]} on "
               f"host {res.host_id}: {_human(res.size)} ({_human(res.new_bytes)} new); "
               + _ms(res.timings_ms), err=True)


@cli.group()
def snapshots():
    """Registered snapshots: list, show (with recent restores), remove."""


@snapshots.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def snapshots_ls(cfg, as_json):
    """Registered snapshots, newest first: digest, image, size, host, command."""
    from thaw.registry import snapshots as q

    _table(q.list_all(cfg.registry_url), as_json,
           f"{'DIGEST':<16} {'IMAGE':<12} {'SIZE':>10} {'HOST':<12} {'CREATED':<20} CMD",
           lambda r: f"{r.digest[:16]} {r.image_digest[:12]} {_human(r.size):>10} {(r.host_id or '-'):<12} "
                     f"{r.created_at:%Y-%m-%d %H:%M:%S}  {' '.join(r.spec.get('cmd', []))}")


@snapshots.command("show")
@click.argument("digest")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def snapshots_show(cfg, digest, as_json):
    """One snapshot: its spec, build timings and recent restores (--json adds its compatibility facts)."""
    from thaw.registry import snapshots as q

    row = _registered(cfg, digest, "snapshot")
    data = _dump(row)
    data["restores"] = [e.model_dump(mode="json") for e in q.restores(cfg.registry_url, row.digest, limit=10)]
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for k, v in data.items():
        if k not in ("restores", "host_facts"):
            click.echo(f"{k:<15} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    for e in data["restores"]:
        click.echo(f"restore        {e['created_at']} {e['outcome']:<9} {e['replica']} "
                   + _ms(e["timings_ms"]) + (f"  ({e['reason']})" if e["reason"] else "")
                   + _golden_differs(e["golden_ok"]))


def _is_json(content_type: str) -> bool:
    """Whether a Content-Type names JSON (application/json, application/problem+json; parameters aside)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


def _golden_differs(golden_ok: bool | None) -> str:
    """What a restore line adds for a replica (a cold boot) that answered the golden request otherwise."""
    return "  [its golden answer differs from the snapshot's]" if golden_ok is False else ""


@snapshots.command("rm")
@click.argument("digest")
@click.pass_obj
def snapshots_rm(cfg, digest):
    """Forget snapshot DIGEST and its restore history (refused while a deployment of it runs or replicas kept
    by `thaw restore --keep` serve); `thaw gc` then frees what only it used."""
    from thaw.registry import queries
    from thaw.registry import snapshots as q
    from thaw.runtime.pool import PoolUnreachable
    from .client import TemporalUnreachable

    try:  # Temporal is asked inside remove's transaction, which holds the snapshot's row, about each deployment
        # of it found there without replicas serving: an answer from before would miss a deploy (or a redeploy
        # under an old name) meanwhile, and asking before too was the same question twice
        # bounded: on SQLite the whole registry waits for this transaction (agents' heartbeats, replicas' rows)
        row, forgotten = q.remove(cfg.registry_url, digest,
                                  lambda name: bool(_pools_running(cfg, [name], timeout_s=10.0)), cfg.host_stale_s)
    except (queries.NotFound, queries.InUse, PoolUnreachable, TemporalUnreachable) as e:  # Temporal silent:
        _fail(str(e))  # its pools may run
    click.echo(f"snapshot {row.digest[:16]} removed" + (f" with its ended deployment(s) {', '.join(forgotten)}"
                                                        if forgotten else "")
               + "; `thaw gc` frees the store objects only it used")


def _pools_running(cfg, names: list[str], timeout_s: float | None = None) -> set[str]:
    """The deployments among ``names`` whose pool workflow is running (TemporalUnreachable, PoolUnreachable: where
    Temporal does not say, or not within ``timeout_s``)."""
    from thaw.runtime import pool
    from .client import TemporalUnreachable, connect

    async def go():
        client = await connect(cfg)
        return {name for name in names if await pool.running(client, name)}

    try:
        return asyncio.run(asyncio.wait_for(go(), timeout_s))
    except TimeoutError:
        if timeout_s is None:  # not ours
            raise
        raise TemporalUnreachable(f"Temporal at {cfg.temporal_address} did not answer within {timeout_s:.0f} s"
                                  ) from None


BUILD_WORKFLOWS = ("BuildImage", "BuildSnapshot")


def _builds(cfg, query: str) -> list[str]:
    """Ids of this installation's build workflows (on its build queue) matching a visibility ``query``."""
    types = " OR ".join(f'WorkflowType="{t}"' for t in BUILD_WORKFLOWS)

    async def go():
        client = await _connect(cfg)
        q = f'({types}) AND TaskQueue="{cfg.build_task_queue}" AND {query}'
        return [w.id async for w in client.list_workflows(q)]

    return asyncio.run(go())


@cli.command()
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@click.option("--min-age", "min_age_s", type=FiniteRange(0), default=3600.0, show_default=True,
              help="Seconds: unreferenced objects younger than this are kept (a build may still need them).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def gc(cfg, dry_run, min_age_s, as_json):
    """Delete the store's chunks and manifests that no registered image or snapshot uses (the local store and
    S3). Refused while a build runs; builds that start meanwhile wait for it (it holds the store's lease in the
    registry). `thaw images rm` / `thaw snapshots rm` first to free their objects."""
    import socket

    from thaw.imagefs.gc import collect
    from thaw.imagefs.store import ChunkStore, StoreError
    from thaw.registry import images, leases, snapshots

    holder = f"thaw gc on {socket.gethostname()} (pid {os.getpid()})"
    lease = (contextlib.nullcontext(leases.Hold(leases.STORE)) if dry_run  # it lists only: no build need wait
             else leases.held(cfg.registry_url, leases.STORE, holder))
    try:  # builds wait while gc holds the store's lease: one that reused a chunk the sweep deletes would break
        with lease as hold:
            running = _builds(cfg, 'ExecutionStatus="Running"')  # ones that got past their wait before it
            if running:
                _fail(f"{len(running)} build(s) running ({', '.join(running[:3])}): run gc once they have finished")
            keep = [r.digest for r in images.list_all(cfg.registry_url)] + \
                [r.digest for r in snapshots.list_all(cfg.registry_url)]
            res = collect(ChunkStore.open(cfg), keep, min_age_s=min_age_s, dry_run=dry_run, check=hold.check)
    except leases.LeaseHeld as e:
        _fail(f"another gc is running: {e}")
    except StoreError as e:
        _fail(str(e))
    if as_json:
        click.echo(json.dumps({"dry_run": dry_run, "manifests_kept": res.manifests_kept,
                               "chunks_kept": res.chunks_kept, "young": res.young,
                               "deleted": {t: [k for k, _ in objs] for t, objs in res.deleted.items()},
                               "deleted_bytes": res.deleted_bytes(), "scratch": res.scratch}))
    else:
        verb = "would delete" if dry_run else "deleted"
        for tier, objs in res.deleted.items():
            click.echo(f"{tier}: {verb} {len(objs)} object(s), {_human(sum(n for _, n in objs))}")
        if res.scratch:
            click.echo(f"scratch: {verb} {len(res.scratch)} leftover(s) of unfinished writes and builds")
        click.echo(f"kept {res.manifests_kept} registered manifest(s) and their {res.chunks_kept} chunk(s)"
                   + (f"; {res.young} unreferenced object(s) younger than {min_age_s:g} s" if res.young else ""))


@cli.command()
@click.argument("snapshot")
@click.option("--replicas", type=int, default=1, show_default=True)
@click.option("--host", default="", help="Host id (default: any live agent).")
@click.option("--secret", "secrets", multiple=True, help="Extra secret NAME to inject after restore.")
@click.option("--keep", is_flag=True, help="Leave the replicas serving under the agent, published on its host "
                                           "(`thaw replicas ls`, `thaw replicas stop`); default: verify, then stop.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def restore(cfg, snapshot, replicas, host, secrets, keep, as_json):
    """Restore SNAPSHOT as N replicas side by side; each is health-checked and replays the golden request."""
    from thaw.workflows.build_snapshot import RestoreInput, RestoreSnapshot

    digest = _registered(cfg, snapshot, "snapshot").digest
    wid, run_id, url, res = _run_workflow(
        cfg, RestoreSnapshot.run, RestoreInput(digest, replicas, host, list(secrets), keep, cfg.heartbeat_timeout),
        f"restore-{uuid.uuid4().hex[:12]}", f"restore of snapshot {digest[:12]}", as_json, progress=False)
    if as_json:
        click.echo(json.dumps({**asdict(res), "workflow_id": wid, "ui": url}))
        return
    for r in res.replicas:
        click.echo(f"{r.replica} {r.outcome:<9} " + (f"{r.endpoint} " if r.endpoint else "") + _ms(r.timings_ms)
                   + (f"  fallback: {r.reason}" if r.reason else "") + _golden_differs(r.golden_ok))
    click.echo(f"{len(res.replicas)} replica(s) of {res.snapshot_digest[:12]} on {res.host_id} in {res.total_ms} ms"
               + ("; serving" if keep else "; stopped after verification"), err=True)


@cli.group()
def replicas():
    """Serving replicas: deployments' and those kept by `thaw restore --keep`."""


@replicas.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def replicas_ls(cfg, as_json):
    """Every serving replica: deployment (or kept), snapshot, host, restored or cold-booted, where it answers."""
    from thaw.registry import deployments

    _table(deployments.replicas(cfg.registry_url), as_json,
           f"{'REPLICA':<14} {'DEPLOYMENT':<16} {'SNAPSHOT':<12} {'HOST':<16} {'OUTCOME':<9} ENDPOINT",
           lambda r: f"{r.id:<14} {r.deployment or '(kept)':<16} {(r.snapshot_digest or '-')[:12]:<12} "
                     f"{r.host_id:<16} {r.outcome:<9} {r.endpoint}{_published(r.ports)}")


def _published(ports: dict[str, str] | None) -> str:
    """A replica's other published ports, as `` 9090->host:port`` each."""
    return "".join(f" {p}->{a}" for p, a in sorted((ports or {}).items()))


def _replica_hosts(cfg, ids, down_ok: bool = False) -> list:
    """(registry row, its agent's task queue) of each serving replica in ``ids``; one-line failure otherwise.
    ``down_ok``: a replica whose host's agent is down comes with the queue None."""
    from thaw.registry import deployments, snapshots

    rows = {r.id: r for r in deployments.replicas(cfg.registry_url)}
    live = {h.id: h for h in snapshots.live_hosts(cfg.registry_url, cfg.host_stale_s)}
    out = []
    for rid in dict.fromkeys(ids):
        r = rows.get(rid)
        if r is None:
            _fail(f"no replica {rid!r} serving (see `thaw replicas ls`)")
        out.append((r, None if down_ok and r.host_id not in live else _agent_queue(
            live, rid, r.host_id, "a restarted agent stops what it left running (`thaw replicas stop --forget` "
                                  "forgets it now)")))
    return out


def _agent_queue(live: dict, rid: str, host_id: str, then: str) -> str:
    """The task queue of ``host_id``'s agent, where it is live (``live``: id -> host); a one-line failure else."""
    if host_id not in live:
        _fail(f"replica {rid}: the agent of host {host_id} is down; {then}")
    return live[host_id].task_queue


@replicas.command("stop")
@click.argument("ids", nargs=-1, required=True)
@click.option("--forget", is_flag=True, help="A replica whose host's agent is down: forget it now (it holds its "
                                             "snapshot against `thaw snapshots rm`); the agent, if it ever starts "
                                             "again, stops what it left running.")
@click.pass_obj
def replicas_stop(cfg, ids, forget):
    """Stop replicas kept by `thaw restore --keep` (a deployment's: `thaw scale NAME N`)."""
    from thaw.registry import deployments
    from thaw.workflows.build_snapshot import StopReplicas, StopTarget

    targets, gone = [], []
    for r, queue in _replica_hosts(cfg, ids, down_ok=forget):
        if r.deployment:
            _fail(f"replica {r.id} belongs to deployment {r.deployment!r}: its pool would replace it; "
                  f"use `thaw scale {r.deployment} N` or `thaw undeploy {r.deployment}`")
        if queue:
            targets.append(StopTarget(r.id, queue))
        else:
            gone.append(r)
    if targets:
        _run_workflow(cfg, StopReplicas.run, targets, f"stop-replicas-{uuid.uuid4().hex[:12]}",
                      f"stop of {len(targets)} replica(s)", quiet=True)
        click.echo(f"stopped {' '.join(t.replica_id for t in targets)}")
    for r in gone:
        deployments.remove_replica(cfg.registry_url, r.id)
        click.echo(f"forgot {r.id} (the agent of host {r.host_id} is down; if it starts again, it stops it)")


@replicas.command("logs")
@click.argument("replica_id")
@click.option("--bytes", "-c", "max_bytes", type=click.IntRange(1, 1 << 20), default=16 << 10, show_default=True,
              help="How much of the end of its log (shared among the logs a failed replica left).")
@click.option("--host", "host_id", help="The host it ran on (`thaw status NAME` names the host of a failed start); "
                                        "default: where it serves, or where its last start was recorded.")
@click.pass_obj
def replicas_logs(cfg, replica_id, max_bytes, host_id):
    """The end of a replica's stdout + stderr, read by the agent of its host; of one that failed to start or
    died there, the logs it left (its restore's and CRIU's, a fallback cold boot's)."""
    from thaw.registry import snapshots
    from thaw.workflows.build_snapshot import ReplicaLog, ReplicaLogInput

    rows = None  # read only where needed, and once
    if not host_id:
        rows = _replica_rows(cfg, replica_id)
        if not rows:
            _fail(f"no replica {replica_id!r} serving or recorded; for one that failed to start, pass --host "
                  f"(`thaw status NAME` names it)")
        host_id = rows[0].host_id
    live = {h.id: h for h in snapshots.live_hosts(cfg.registry_url, cfg.host_stale_s)}
    queue = _agent_queue(live, replica_id, host_id, "its logs stay on that host, under its work dir's replica-logs/")
    *_, text = _run_workflow(cfg, ReplicaLog.run, ReplicaLogInput(replica_id, queue, max_bytes),
                             f"replica-log-{uuid.uuid4().hex[:12]}", f"log of replica {replica_id}", quiet=True)
    if text:
        click.echo(text)
    else:
        click.echo(f"(replica {replica_id} wrote nothing since it started"
                   f"{_restored_log_hint(cfg, replica_id, rows)})", err=True)


def _replica_rows(cfg, replica_id: str) -> list:
    """Replica ``replica_id``'s registry row while it serves, else its last recorded start ([] for neither)."""
    from thaw.registry import deployments, snapshots

    rows = [r for r in deployments.replicas(cfg.registry_url) if r.id == replica_id]
    return rows or snapshots.restores(cfg.registry_url, replica=replica_id, limit=1)


def _restored_log_hint(cfg, replica_id: str, rows: list | None = None) -> str:
    """For a restored replica: its log begins at its restore, and where what its server printed before the
    snapshot is (its build's launch.log). Only a hint: "" where that is not known. ``rows``: _replica_rows's,
    if the caller read them."""
    from thaw.registry import snapshots

    try:
        rows = _replica_rows(cfg, replica_id) if rows is None else rows
        if not rows or rows[0].outcome != "restored" or not rows[0].snapshot_digest:
            return ""  # a cold boot's log begins at its launch
        snap = snapshots.get(cfg.registry_url, rows[0].snapshot_digest)
    except Exception:  # noqa: BLE001 - the registry unreadable, the snapshot removed: no hint
        return ""
    where = (f"build-logs/{snap.build_id}/launch.log in the work dir of host {snap.host_id}, if still there (an "
             f"agent keeps its last builds' logs)" if snap.build_id and snap.host_id else "its build's launch.log")
    return (". A restored replica's log begins at its restore; what the server printed before its snapshot is in "
            + where)


@cli.group()
def secrets():
    """Secrets injected into replicas after restore (never part of a snapshot)."""


@secrets.command("set")
@click.argument("name")
@click.option("--value", help="The value (default: read from stdin, so it stays out of shell history).")
@click.pass_obj
def secrets_set(cfg, name, value):
    """Set secret NAME (value from --value or stdin) for the agents on this state dir."""
    from thaw.runtime.pool import env_error, env_name_error

    error = env_name_error([name], "secret")  # before a value is typed in
    if error:
        _fail(error)
    if value is None:
        value = sys.stdin.read().rstrip("\n")
    error = env_error({name: value}, "secret")  # delivered to replicas as an environment variable
    if error:
        _fail(error)
    path = cfg.secrets_file
    with changing(path):  # two `thaw secrets set` at once: each must keep the other's
        try:
            data = cfg.secrets()
        except ValueError as e:
            _fail(str(e))
        data[name] = value
        write_atomic(path, json.dumps(data), mode=0o600)
    click.echo(f"secret {name} set ({len(value)} characters)")


@secrets.command("ls")
@click.pass_obj
def secrets_ls(cfg):
    """Secret names (never their values)."""
    try:
        data = cfg.secrets()
    except ValueError as e:
        _fail(str(e))
    for name in sorted(data):
        click.echo(name)


@cli.command()
@click.option("--host-id", help="This host's id (default: the hostname) [env THAW_HOST_ID].")
@click.pass_obj
def agent(cfg, host_id):
    """Run this host's agent in the foreground: its own task queue, snapshots and restores of local processes."""
    from thaw.runtime import agent as agent_mod

    from .stack import agent_ready_file

    if host_id:
        cfg = _configured(type(cfg).model_validate, obj={**cfg.model_dump(), "host_id": host_id})
    logging.getLogger().setLevel(logging.INFO)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        asyncio.run(agent_mod.run(cfg, ready_file=agent_ready_file(cfg)))
    except RuntimeError as e:
        _fail(f"agent: {e}")


# -- runtime ----------------------------------------------------------------------------------------
def _pool_call(cfg, fn):
    """Run ``fn(client)`` against Temporal; registry/pool errors become one-line failures."""
    from thaw.registry.queries import NotFound
    from thaw.runtime.pool import PoolUnreachable, Undeploying

    async def go():
        return await fn(await _connect(cfg))

    try:
        return asyncio.run(go())
    except (NotFound, PoolUnreachable, Undeploying) as e:
        _fail(str(e))


@cli.command()
@click.argument("name")
@click.option("--snapshot", required=True, help="Snapshot digest or unique prefix.")
@click.option("--min", "min_replicas", type=int, default=0, show_default=True)
@click.option("--max", "max_replicas", type=int, default=4, show_default=True)
@click.option("--buffer", type=int, default=1, show_default=True, help="Idle healthy hosts kept reserved.")
@click.option("--secret", "secrets", multiple=True, help="Secret NAME injected after each restore.")
@click.option("--env", "env", multiple=True, metavar="K=V",
              help="Environment for the replicas: delivered after each restore (as secrets are), plain env on a "
                   "cold boot. Not secret: it is stored with the deployment.")
@click.option("--port", "ports", type=int, multiple=True,
              help="Another port of the replica to publish on its host, besides the snapshot's server port.")
@click.option("--cooldown", type=float, default=30.0, show_default=True, help="Seconds before scaling down.")
@click.pass_obj
def deploy(cfg, name, snapshot, min_replicas, max_replicas, buffer, secrets, env, ports, cooldown):
    """Create or update deployment NAME and start its pool (a Temporal entity workflow)."""
    from thaw.runtime import pool
    from thaw.workflows.pool import PoolSpec

    spec = PoolSpec(name, snapshot, min_replicas, max_replicas, buffer, list(secrets), cooldown,
                    heartbeat_timeout_s=cfg.heartbeat_timeout, env=_pairs(env, "--env"), ports=list(ports))
    spec, started = _pool_call(cfg, lambda c: pool.deploy(c, cfg, spec))
    click.echo(f"deployment {name}: snapshot {spec.snapshot[:12]}, replicas {min_replicas}..{max_replicas}, "
               f"buffer {buffer} ({'pool started' if started else 'pool updated'}; "
               f"UI {cfg.workflow_url(pool.workflow_id(name))})")
    with contextlib.suppress(ValueError, OSError):  # an unreadable secrets file: each start says so
        have = cfg.secrets() if secrets else {}
        unset = [n for n in dict.fromkeys(secrets) if n not in have]
        if unset:  # the agents of this state dir read its secrets; others may have theirs
            click.echo(f"warning: secret(s) {', '.join(unset)} not set in {cfg.secrets_file}: replicas on hosts "
                       f"reading it fail to start until `thaw secrets set NAME`", err=True)


def _signal(cfg, name: str, send):
    """``send(client)`` a signal to deployment ``name``'s pool; returns its registry row. The row first: a pool
    this registry does not know (another state dir's) is not signalled."""
    from thaw.registry import deployments

    async def go(client):
        dep = deployments.get(cfg.registry_url, name)
        await send(client)
        return dep

    return _pool_call(cfg, go)


@cli.command()
@click.argument("name")
@click.argument("replicas", type=int)
@click.pass_obj
def scale(cfg, name, replicas):
    """Ask deployment NAME for REPLICAS replicas (the pool restores or stops replicas to match)."""
    from thaw.runtime import pool

    dep = _signal(cfg, name, lambda c: pool.scale(c, name, replicas, "cli", report_dropped=True))
    kept = pool.bounded(dep, replicas)
    click.echo(f"deployment {name}: scale to {replicas} requested"
               + (f" (the pool keeps it to {kept}: --min {dep.min_replicas} --max {dep.max_replicas})"
                  if kept != replicas else ""))


@cli.command()
@click.argument("name")
@click.pass_obj
def undeploy(cfg, name):
    """Stop deployment NAME's replicas, release its buffer hosts and end its pool."""
    from thaw.runtime import pool

    _signal(cfg, name, lambda c: pool.undeploy(c, name))
    click.echo(f"deployment {name}: stopping")


@cli.command()
@click.pass_obj
def api(cfg):
    """Serve the HTTP control API (token-authenticated) in the foreground."""
    from thaw.runtime import api as api_mod

    from .stack import ready_file

    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    try:
        api_mod.api_token(cfg)
    except api_mod.TokenError as e:
        _fail(str(e))
    click.echo(f"control API on http://{cfg.api_host}:{cfg.api_port} (token: {api_mod.token_file(cfg)})", err=True)
    try:
        asyncio.run(api_mod.run(cfg, ready_file(cfg, "api")))
    except (RuntimeError, OSError) as e:  # Temporal unreachable, the port taken
        _fail(f"api: {e}")


@cli.command()
@click.argument("name")
@click.option("--port", type=PORT, help="Listen port [default: THAW_GATEWAY_PORT].")
@click.option("--keda-port", type=PORT, help="Also serve the KEDA external scaler (gRPC) on this port.")
@click.option("--host", "bind", default="127.0.0.1", show_default=True,
              help="Address the gateway and the KEDA scaler listen on (0.0.0.0: every interface).")
@click.option("--target-concurrency", type=FiniteRange(0, min_open=True), default=1.0, show_default=True,
              help="In-flight requests per replica the autoscaler aims for.")
@click.option("--scale-to-zero-after", type=FiniteRange(0), default=30.0, show_default=True,
              help="Seconds without traffic before scaling to zero; never less than the autoscaler's 60 s "
                   "stable window, which must have seen none.")
@click.option("--drain", type=FiniteRange(0, min_open=True), default=30.0, show_default=True,
              help="On SIGTERM: seconds the requests under way (and held) get to end; new connections are refused.")
@click.option("--deliveries", type=click.IntRange(1), default=3, show_default=True,
              help="Sends of a request whose replica broke before answering (it may have seen it); 1: never "
                   "send one again, for APIs whose requests have side effects (one sent on a keep-alive "
                   "connection the replica had just closed then gets 502 too).")
@click.pass_obj
def gateway(cfg, name, port, keda_port, bind, target_concurrency, scale_to_zero_after, drain, deliveries):
    """HTTP gateway for deployment NAME: balances by in-flight requests, holds requests at zero replicas while
    the pool restores one, and scales the pool from concurrency (stable and panic windows)."""
    from thaw.registry.queries import NotFound
    from thaw.runtime import frontdoor

    logging.getLogger().setLevel(logging.INFO)
    try:
        asyncio.run(frontdoor.run(cfg, name, port or cfg.gateway_port, keda_port, bind,
                                  target_concurrency=target_concurrency,
                                  scale_to_zero_grace_s=scale_to_zero_after, drain_s=drain,
                                  max_delivery_attempts=deliveries))
    except NotFound as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"gateway for {name}: {e}")


@cli.group("deployments")
def deployments_group():
    """Deployments: `thaw deploy` makes one, `thaw status NAME` shows one, `thaw undeploy NAME` ends its pool."""


@deployments_group.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def deployments_ls(cfg, as_json):
    """Every deployment: snapshot, replica bounds, buffer, replicas serving on live hosts, and whether its pool
    runs (an undeployed one stays listed, ended, until its snapshot is removed)."""
    from thaw.registry import deployments
    from thaw.runtime.pool import PoolUnreachable
    from .client import TemporalUnreachable

    rows = deployments.list_all(cfg.registry_url)
    try:
        running, unknown = _pools_running(cfg, [d.name for d in rows]) if rows else set(), None
    except (TemporalUnreachable, PoolUnreachable) as e:
        running, unknown = None, first_line(e)
    serving = Counter(r.deployment for r in deployments.serving(cfg))
    out = [{**deployments.summary(d), "serving": serving[d.name],
            "pool": "?" if running is None else "running" if d.name in running else "ended"} for d in rows]
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"{'NAME':<16} {'SNAPSHOT':<12} {'REPLICAS':<9} {'BUFFER':>6} {'SERVING':>7} POOL")
    for d in out:
        bounds = f"{d['min']}..{d['max']}"
        click.echo(f"{d['name']:<16} {d['snapshot'][:12]:<12} {bounds:<9} {d['buffer']:>6} {d['serving']:>7} "
                   f"{d['pool']}")
    if unknown:
        click.echo(f"(POOL ?: {unknown})", err=True)


@cli.group()
def hosts():
    """Host agents: list them with their GPUs; start several on this machine (test/demo mode)."""


@hosts.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def hosts_ls(cfg, as_json):
    """Registered host agents: live or stale, capacity, buffer reservation, GPUs (what placement matches)."""
    from thaw.registry import snapshots as q

    live = {h.id for h in q.live_hosts(cfg.registry_url, cfg.host_stale_s)}

    def gpus(f: dict) -> str:
        if not f.get("gpu_model"):
            return "-"
        return f"{f.get('gpu_count', 1)}x {f['gpu_model']}, driver {f.get('nvidia_driver')}, CUDA {f.get('cuda')}"

    _table(q.list_hosts(cfg.registry_url), as_json, f"{'HOST':<24} {'STATE':<6} {'CAP':>3} {'RESERVED FOR':<16} GPUS",
           lambda h: f"{h.id:<24} {'live' if h.id in live else 'stale':<6} {h.capacity:>3} "
                     f"{h.reserved_for or '-':<16} {gpus(h.facts)}")


@hosts.command("up")
@click.argument("count", type=click.IntRange(1))
@click.option("--capacity", type=click.IntRange(0), default=4, show_default=True,
              help="Replicas per namespaced host (THAW_HOST_CAPACITY is this machine's own agent's, which may be 0 "
                   "to keep it for builds).")
@click.pass_obj
def hosts_up(cfg, count, capacity):
    """Start COUNT host agents on this machine, each in its own network namespace (test/demo mode; needs
    THAW_TEMPORAL_ADDRESS=0.0.0.0:<port> for the stack)."""
    import signal

    from thaw.runtime import hosts as hosts_mod
    from thaw.stack import StackError, one_at_a_time

    def interrupted(*_):  # SIGTERM (`timeout`, a cancelled CI job) as Ctrl-C: the host being made is cleared
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, interrupted)
    try:
        with one_at_a_time(cfg):  # a `thaw down` meanwhile would miss the agents started after it read hosts.json
            for h in hosts_mod.up(cfg, count, capacity=capacity):
                click.echo(f"{h['host_id']}: agent pid {h['pid']} in netns {h['netns']}, replicas on {h['address']}")
    except (hosts_mod.HostsError, StackError) as e:
        _fail(str(e))
    finally:
        signal.signal(signal.SIGTERM, before)


@hosts.command("down")
@click.pass_obj
def hosts_down(cfg):
    """Stop the namespaced agents and delete their namespaces."""
    from thaw.runtime import hosts as hosts_mod
    from thaw.stack import StackError, one_at_a_time

    try:
        with one_at_a_time(cfg):
            for host_id in hosts_mod.down(cfg):
                click.echo(f"{host_id}: stopped")
    except (hosts_mod.HostsError, StackError) as e:
        _fail(str(e))


def _deployment_status(cfg, name, as_json):
    from thaw.registry import deployments
    from thaw.registry.queries import NotFound
    from thaw.runtime import pool

    async def go(client):
        try:
            return await pool.state(client, name)
        except NotFound:
            deployments.get(cfg.registry_url, name)  # a name never deployed says so (not "workflow not found")
            raise

    st = _pool_call(cfg, go)
    if as_json:
        click.echo(json.dumps(asdict(st), indent=2))
        return
    sp = st.spec
    click.echo(f"deployment {sp.name}  snapshot {sp.snapshot[:12]}  desired {st.desired} "
               f"(min {sp.min_replicas}, max {sp.max_replicas})  serving {len(st.replicas)}"
               + (f" ({old} of an earlier spec)" if (old := sum(r.id in st.outdated for r in st.replicas)) else ""))
    click.echo(f"buffer     {len(st.reserved)}/{sp.buffer} hosts reserved: {', '.join(st.reserved) or '-'}")
    click.echo("counts     " + (" ".join(f"{k}={v}" for k, v in sorted(st.counts.items())) or "-"))
    if sp.env or sp.ports:
        click.echo(f"env        {' '.join(sorted(sp.env)) or '-'}  ports {' '.join(map(str, sp.ports)) or '-'}")
    for r in st.replicas:
        click.echo(f"replica    {r.id} on {r.host_id} {r.endpoint}{_published(r.ports)} {r.outcome}"
                   + ("  (of an earlier spec: stops once replaced)" if r.id in st.outdated else ""))
    for r in st.recent:
        click.echo(f"restore    {r.id} {r.outcome:<9} {_ms(r.timings_ms)}" + (f"  ({r.reason})" if r.reason else ""))
    # the failed starts since the last one that worked (--json: the last FAILURES); the logs each left, if any:
    # `thaw replicas logs ID --host HOST`
    for f in [f for f in st.failures if f.at_ms > st.last_ok_ms]:
        at = time.strftime("%H:%M:%S", time.localtime(f.at_ms / 1000))
        click.echo(f"failed     {f.replica or '-'} on {f.host_id} at {at}: {f.error}")


def _add_simulate():
    from thaw.runtime import simulate

    cli.add_command(simulate.cli_command())


_add_simulate()


def main():
    """Entry point. Ends with os._exit once output is flushed: with grpcio installed, temporalio's native
    threads can abort the interpreter's finalization ("PyGILState_Release ... finalizing"), turning a
    finished command's exit code into SIGABRT. Nothing is left to do by then: every command has cleaned up."""
    from sqlalchemy.exc import DatabaseError

    try:
        cli(prog_name="thaw")
        code = 0
    except DatabaseError as e:  # the registry database: down, a wrong THAW_DB_URL, a file that is not one
        click.echo(f"error: the registry database cannot be used: {first_line(e.orig)} "
                   f"(THAW_DB_URL / --db-url)", err=True)
        code = 1
    except OSError as e:  # a state dir that is a file, a disk that is full: what the OS said, and where
        click.echo(f"error: {e.strerror or first_line(e, typed=True)}" + (f": {e.filename}" if e.filename else ""),
                   err=True)
        code = 1
    except Exception as e:  # Temporal refused a call (RPCError, an id already running): one line, not a traceback
        if not type(e).__module__.startswith("temporalio."):
            raise
        what = f" (workflow {e.workflow_id})" if getattr(e, "workflow_id", None) else ""
        click.echo(f"error: Temporal: {getattr(e, 'message', None) or e}{what}", err=True)
        code = 1
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            click.echo(str(e.code), err=True)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
