"""HTTP control API (aiohttp): scale and inspect deployments with a bearer token; Prometheus /metrics.

    POST /v1/deployments/{name}/scale   {"replicas": N}     -> 202 {"deployment", "replicas", "kept"}
                                                               (409: undeploying, the scale was dropped)
    GET  /v1/deployments                                     -> [{name, snapshot, min, max, buffer}]
    GET  /v1/deployments/{name}                              -> the pool's state
    GET  /metrics                                            -> Prometheus text (no token)

Every /v1 call needs ``Authorization: Bearer <token>``; the token is ``THAW_API_TOKEN`` or generated once
into ``<state_dir>/api-token`` (mode 0600). A missing or wrong token gets 401 and changes nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
from dataclasses import asdict
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.exc import DBAPIError
from temporalio.client import Client

from thaw.client import connect
from thaw.config import Config
from thaw.errors import first_line
from thaw.registry import deployments
from thaw.registry.queries import NotFound

from . import pool

log = logging.getLogger("thaw.api")


def token_file(cfg: Config) -> Path:
    return cfg.state_dir / "api-token"


MIN_TOKEN = 16  # characters


class TokenError(ValueError):
    """The configured API token can't protect anything (empty or too short); one line."""


def api_token(cfg: Config) -> str:
    """The configured token, else the one in the state dir (created on first use). TokenError when it is
    shorter than MIN_TOKEN: an empty token would let every request in."""
    if cfg.api_token:  # an empty THAW_API_TOKEN means unset
        token, where = cfg.api_token.strip(), "THAW_API_TOKEN"
    else:
        path = token_file(cfg)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        token, where = path.read_text().strip(), str(path)
    if len(token) < MIN_TOKEN:
        made = "unset it" if cfg.api_token else f"delete {token_file(cfg)}"
        raise TokenError(f"the API token in {where} has {len(token)} characters, fewer than {MIN_TOKEN}: "
                         f"set a longer one (or {made} to have one made)")
    return token


def _error(status: int, msg: str) -> web.Response:
    return web.json_response({"error": msg}, status=status)


def make_app(cfg: Config, client: Client, registry: CollectorRegistry | None = None) -> web.Application:
    token = api_token(cfg).encode()
    registry = registry or CollectorRegistry()
    calls = Counter("thaw_api_requests_total", "Control API calls", ["route", "code"], registry=registry)

    @web.middleware
    async def auth(request: web.Request, handler):
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "?"
        if request.path.startswith("/v1/"):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token):
                calls.labels(route, "401").inc()
                return _error(401, "missing or wrong bearer token (see <state_dir>/api-token or THAW_API_TOKEN)")
        try:
            resp = await handler(request)
        except NotFound as e:
            resp = _error(404, str(e))
        except pool.PoolUnreachable as e:  # Temporal down or slow: the deployment may well exist
            resp = _error(503, str(e))
        except pool.Undeploying as e:
            resp = _error(409, str(e))
        except web.HTTPException as e:  # aiohttp's own answers (no such route, a body over its 1 MiB)
            if e.status < 400:
                raise
            why = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason  # not "404: Not Found"
            resp = _error(e.status, f"{request.method} {request.path}: {first_line(Exception(why))}")
        except Exception as e:  # the registry's database down, say: one JSON line (and counted), not a traceback
            log.warning("%s %s failed", request.method, request.path, exc_info=True)
            down = isinstance(e, DBAPIError)
            resp = _error(503 if down else 500, ("the registry did not answer: " if down else "internal error: ")
                          + first_line(e, typed=not down))
        calls.labels(route, str(resp.status)).inc()
        return resp

    async def scale(request: web.Request) -> web.Response:
        try:
            replicas = (await request.json())["replicas"]
        except (ValueError, KeyError, TypeError, LookupError, RecursionError):  # nested too deep; a bogus charset
            replicas = None
        if type(replicas) is not int or replicas < 0:  # not bool, float, str
            return _error(400, 'expected a JSON body {"replicas": N} with N a whole number >= 0')
        name = request.match_info["name"]
        dep = await asyncio.to_thread(deployments.get, cfg.registry_url, name)
        await pool.scale(client, name, replicas, "api", report_dropped=True)
        return web.json_response({"deployment": name, "replicas": replicas, "kept": pool.bounded(dep, replicas)},
                                 status=202)

    async def list_deployments(request: web.Request) -> web.Response:
        return web.json_response([deployments.summary(d)
                                  for d in await asyncio.to_thread(deployments.list_all, cfg.registry_url)])

    async def show(request: web.Request) -> web.Response:
        return web.json_response(asdict(await pool.state(client, request.match_info["name"])))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[auth])
    app.add_routes([web.post("/v1/deployments/{name}/scale", scale), web.get("/v1/deployments", list_deployments),
                    web.get("/v1/deployments/{name}", show), web.get("/metrics", metrics)])
    return app


async def run(cfg: Config, ready_file: Path | None = None) -> None:
    """Serve the API until cancelled/SIGTERM (as `thaw api`)."""
    import asyncio
    import signal

    client = await connect(cfg)
    runner = web.AppRunner(make_app(cfg, client))
    await runner.setup()
    await web.TCPSite(runner, cfg.api_host, cfg.api_port).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if ready_file:
        ready_file.write_text(str(os.getpid()))
    try:
        await stop.wait()
    finally:
        if ready_file:
            ready_file.unlink(missing_ok=True)
        await runner.cleanup()
