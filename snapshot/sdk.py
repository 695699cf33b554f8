"""thaw's server-side SDK: what a model server does to be snapshotted well. Standard library only, so the
file can be copied into an image and imported by any server.

Convention (the host side is ``thaw.snapshot.replica``):

- ``GET /thaw/ready``: 200 once the server is warm and may be snapshotted (``mark_ready()``), 503 before.
  A server without it is snapshotted once its health path answers 200.
- ``POST /thaw/after-restore`` with ``{"env": {...}, "restore_id": "..."}``: sent by the host right after a
  restore. Secrets are never in the environment at launch (so never in the snapshot); they arrive here. The
  SDK puts ``env`` into ``os.environ``, re-seeds ``random`` (every replica of a snapshot would otherwise
  draw the same numbers) and runs the callbacks registered with ``@on_after_restore`` (re-read secrets,
  re-seed other generators, reopen connections).

In an ``http.server`` handler::

    from thaw_sdk import handle, mark_ready, on_after_restore   # this file, copied as thaw_sdk.py
    def do_GET(self):
        if handle(self): return
        ...
    do_POST = do_GET
"""

from __future__ import annotations

import json
import os
import random
import threading
import traceback
from typing import Callable

READY_PATH = "/thaw/ready"
AFTER_RESTORE_PATH = "/thaw/after-restore"

_callbacks: list[Callable[[dict], None]] = []
_ready = threading.Event()
restore_id: str | None = None  # set by the last after-restore call


def on_after_restore(fn: Callable[[dict], None]) -> Callable[[dict], None]:
    """Register ``fn(env)`` to run after each restore (usable as a decorator)."""
    _callbacks.append(fn)
    return fn


def mark_ready(ready: bool = True) -> None:
    """Say that the server is warm: the host may snapshot it now. Garbage from loading and warm-up is
    collected and free heap handed back to the kernel first, so the snapshot (and every restore) is smaller."""
    if ready:
        _trim()
    (_ready.set if ready else _ready.clear)()


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def is_ready() -> bool:
    return _ready.is_set()


def after_restore(payload: dict) -> dict:
    """Apply an after-restore payload: environment, fresh randomness, then the registered callbacks."""
    global restore_id
    env = {str(k): str(v) for k, v in (payload.get("env") or {}).items()}
    os.environ.update(env)
    random.seed()  # from os.urandom
    restore_id = payload.get("restore_id")
    for fn in _callbacks:
        fn(env)
    return {"restore_id": restore_id, "env": sorted(env), "callbacks": len(_callbacks)}


def _reply(handler, status: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def handle(handler) -> bool:
    """Answer the two thaw paths in a ``BaseHTTPRequestHandler``; False when the request is not one of them."""
    path = handler.path.split("?", 1)[0]
    if handler.command == "GET" and path == READY_PATH:
        _reply(handler, 200 if is_ready() else 503, {"ready": is_ready()})
        return True
    if handler.command == "POST" and path == AFTER_RESTORE_PATH:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        try:
            payload = json.loads(body or b"{}")
        except ValueError as e:
            _reply(handler, 400, {"error": f"body is not JSON: {e}"})
            return True
        try:
            _reply(handler, 200, after_restore(payload))
        except Exception as e:  # noqa: BLE001 - a failing callback must reach the host as an error
            traceback.print_exc()  # to the replica's log; the host gets the type only: the text may hold a secret
            _reply(handler, 500, {"error": f"{type(e).__name__} in an after-restore callback (see the replica's log)"})
        return True
    return False
