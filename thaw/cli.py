"""The `thaw` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

import click

from . import config as config_mod

PATH_PREFIXES = ("dir:", "docker-archive:", "oci:", "dockerfile:")


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(1)


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@click.group()
@click.option("--state-dir", type=click.Path(path_type=Path), help="State directory [env THAW_STATE_DIR].")
@click.option("--temporal-address", help="Temporal frontend host:port [env THAW_TEMPORAL_ADDRESS].")
@click.option("--db-url", help="Registry DSN, e.g. postgresql+psycopg://u:p@host/db [env THAW_DB_URL].")
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def cli(ctx, state_dir, temporal_address, db_url, verbose):
    """thaw: scale GPU inference up in seconds."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        ctx.obj = config_mod.load(state_dir=state_dir, temporal_address=temporal_address, db_url=db_url)
    except Exception as e:
        _fail(f"bad configuration: {e}")


# -- stack ------------------------------------------------------------------------------------------
@cli.command()
@click.pass_obj
def up(cfg):
    """Start the embedded stack: Temporal dev server (UI included), worker, registry. Safe to re-run."""
    from .stack import StackError, up as stack_up

    try:
        stack_up(cfg, echo=click.echo)
    except StackError as e:
        _fail(str(e))
    click.echo(f"Temporal {cfg.temporal_address}  UI {cfg.temporal_ui_url}  state {cfg.state_dir}")


@cli.command()
@click.pass_obj
def down(cfg):
    """Stop everything `thaw up` started."""
    from .stack import down as stack_down

    stack_down(cfg, echo=click.echo)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def status(cfg, as_json):
    """What runs and where."""
    from .stack import status as stack_status

    st = stack_status(cfg)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    t, w, r, s = st["temporal"], st["worker"], st["registry"], st["store"]
    run = lambda pid: f"running (pid {pid})" if pid else "stopped"
    click.echo(f"state dir  {st['state_dir']}")
    click.echo(f"temporal   {run(t['pid'])}  {t['address']}  UI {t['ui']}")
    click.echo(f"worker     {run(w['pid'])}  queue {w['task_queue']}")
    click.echo(f"registry   {r['url']}  {r['status']}  images {r['images']}")
    click.echo(f"store      {s['dir']}  {s['objects']} objects  {_human(s['bytes'])}")


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
    """Build images (and, later, snapshots)."""


def _absolute_source(source: str) -> str:
    for prefix in PATH_PREFIXES:
        if source.startswith(prefix):
            return prefix + str(Path(source[len(prefix):]).expanduser().absolute())
    if Path(source).expanduser().exists():
        return str(Path(source).expanduser().absolute())
    return source


async def _connect(cfg):
    from temporalio.client import Client

    try:
        return await Client.connect(cfg.temporal_address, namespace=cfg.temporal_namespace)
    except Exception:
        _fail(f"cannot reach Temporal at {cfg.temporal_address}: run `thaw up` first")


def _failure_message(err: BaseException) -> str:
    while getattr(err, "cause", None) is not None:
        err = err.cause
    return getattr(err, "message", None) or str(err)


async def _follow(handle, client, show_progress: bool):
    """Wait for the result, drawing a progress bar from the running activity's heartbeats."""
    from tqdm import tqdm

    result = asyncio.ensure_future(handle.result())
    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, disable=not show_progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        while not result.done():
            try:
                desc = await handle.describe()
                for pa in desc.raw_description.pending_activities:
                    bar.set_description(pa.activity_type.name.replace("_image", "").replace("_source", ""))
                    if pa.heartbeat_details.payloads:
                        (d,) = await client.data_converter.decode(pa.heartbeat_details.payloads)
                        if isinstance(d, dict) and "done" in d:
                            bar.total = d.get("total") or None
                            bar.n = d["done"]
                            bar.refresh()
            except Exception:
                pass
            await asyncio.wait([result], timeout=0.3)
    finally:
        bar.close()
    return result.result()


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
    from temporalio.client import WorkflowFailureError

    from thaw.workflows.build_image import BuildImage, BuildImageInput

    config = None
    if config_file:
        try:
            config = json.loads(Path(config_file).read_text())
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            _fail(f"--config {config_file}: not a JSON object of image config keys ({e})")

    async def go():
        client = await _connect(cfg)
        wid = workflow_id or f"build-image-{uuid.uuid4().hex[:12]}"
        handle = await client.start_workflow(
            BuildImage.run,
            BuildImageInput(_absolute_source(source), config, cfg.heartbeat_timeout, cfg.activity_timeout),
            id=wid, task_queue=cfg.build_task_queue)
        url = cfg.workflow_url(wid, handle.result_run_id)
        if not as_json:
            click.echo(f"building {source}  (Temporal UI: {url})", err=True)
        try:
            res = await _follow(handle, client, show_progress=not as_json and sys.stderr.isatty())
        except WorkflowFailureError as e:
            _fail(f"build of {source} failed: {_failure_message(e)}  ({url})")
        return wid, handle.result_run_id, url, res

    wid, run_id, url, res = asyncio.run(go())
    if as_json:
        click.echo(json.dumps({**asdict(res), "workflow_id": wid, "run_id": run_id, "ui": url}))
        return
    note = "new image" if res.created else "already registered"
    click.echo(f"{res.digest}")
    click.echo(f"  {note}: {res.files} files, {_human(res.size)}, {res.chunks} chunks; "
               f"stored {res.new_chunks} new chunks ({_human(res.new_bytes)}); "
               + " ".join(f"{k} {v} ms" for k, v in res.timings_ms.items()), err=True)


# -- images -----------------------------------------------------------------------------------------
@cli.group()
def images():
    """Inspect registered images."""


@images.command("ls")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def images_ls(cfg, as_json):
    from thaw.registry import images as q

    rows = q.list_all(cfg.registry_url)
    if as_json:
        click.echo(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return
    click.echo(f"{'DIGEST':<16} {'SIZE':>10} {'FILES':>7} {'CREATED':<20} SOURCE")
    for r in rows:
        click.echo(f"{r.digest[:16]} {_human(r.size):>10} {r.files:>7} "
                   f"{r.created_at:%Y-%m-%d %H:%M:%S}  {r.source}")


def _image_or_fail(cfg, ref):
    from thaw.registry import images as q

    try:
        return q.get(cfg.registry_url, ref)
    except q.NotFound as e:
        _fail(str(e))


@images.command("show")
@click.argument("digest")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def images_show(cfg, digest, as_json):
    row = _image_or_fail(cfg, digest)
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

    row = _image_or_fail(cfg, digest)
    try:
        materialize(ImageManifest.load(ChunkStore.open(cfg), row.digest), ChunkStore.open(cfg), dest)
    except (MaterializeError, StoreError) as e:
        _fail(str(e))
    click.echo(str(dest))


def main():
    cli(prog_name="thaw")
