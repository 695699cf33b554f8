"""thaw's server-side SDK: what a model server does to be snapshotted well. Standard library only, so the
file can be copied into an image and imported by any server.

Convention (the host side is ``thaw.snapshot.replica``):

- ``GET /thaw/ready``: 200 once the server is warm and may be snapshotted (``mark_ready()``), 503 before.
  A server without it is snapshotted once its health path answers 200.
- ``POST /thaw/before-snapshot``: sent by the host after the golden request, right before the checkpoint. The
  SDK runs the callbacks registered with ``@on_before_snapshot`` (a failing one fails the snapshot: nothing
  is stored), then hands free heap back to the kernel, and answers 200 with ``{"callbacks": N}`` (how the host
  tells the SDK from a server that answers every POST). A failing callback of either hook answers 500 with
  ``{"error": "<type> in a callback of <path> ..."}``.
- ``POST /thaw/after-restore`` with ``{"env": {...}, "restore_id": "..."}``: sent by the host right after a
  restore. Secrets are never in the environment at launch (so never in the snapshot); they arrive here. The
  SDK puts ``env`` into ``os.environ``, re-seeds ``random`` (every replica of a snapshot would otherwise
  draw the same numbers) and runs the callbacks registered with ``@on_after_restore`` (re-read secrets,
  re-seed other generators, reopen connections).

Both POSTs must carry the ``X-Thaw-Hook-Token`` header the host launched the server with (in ``THAW_HOOK_TOKEN``,
which the SDK takes out of the environment at import); without it a POST answers 403 and runs nothing. A
replica's published port is open to anything on the host's network: only its host may deliver env or park
weights.

``park_weights(model)`` (torch on CUDA) uses both hooks: the weights wait out the snapshot in host memory and
come back to the GPU at pinned-copy speed after a restore (see its docstring).

In an ``http.server`` handler::

    from thaw_sdk import handle, mark_ready, on_after_restore   # this file, copied as thaw_sdk.py
    def do_GET(self):
        if handle(self): return
        ...
    do_POST = do_GET
"""

from __future__ import annotations

import hmac
import json
import os
import random
import threading
import traceback
from typing import Callable

PATHS = "/thaw"  # every path the SDK answers is below this (a gateway in front of replicas refuses them)
READY_PATH = f"{PATHS}/ready"
BEFORE_SNAPSHOT_PATH = f"{PATHS}/before-snapshot"
AFTER_RESTORE_PATH = f"{PATHS}/after-restore"
MAX_HOOK_BODY = 1 << 20  # bytes of a hook's JSON body (env and a restore id)
HOOK_TOKEN_ENV = "THAW_HOOK_TOKEN"  # the host's launch sets it; none (a server launched by hand): no check
HOOK_TOKEN_HEADER = "X-Thaw-Hook-Token"
_token = os.environ.pop(HOOK_TOKEN_ENV, "")  # out of the server's environment and its children's

_callbacks: list[Callable[[dict], None]] = []
_before: list[Callable[[], None]] = []
_ready = threading.Event()
restore_id: str | None = None  # set by the last after-restore call


def on_after_restore(fn: Callable[[dict], None]) -> Callable[[dict], None]:
    """Register ``fn(env)`` to run after each restore (usable as a decorator)."""
    _callbacks.append(fn)
    return fn


def on_before_snapshot(fn: Callable[[], None]) -> Callable[[], None]:
    """Register ``fn()`` to run right before each snapshot (usable as a decorator)."""
    _before.append(fn)
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


def before_snapshot() -> dict:
    """Run the before-snapshot callbacks, then trim the heap (what they freed is not dumped)."""
    for fn in _before:
        fn()
    _trim()
    return {"callbacks": len(_before)}


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


# -- torch on CUDA: the weights wait out the snapshot in host memory ---------------------------------------------
PARK_ALIGN = 4096      # each tensor's offset in the host buffer: page-aligned, so views of any dtype are aligned
PARK_CHUNK = 64 << 20  # bytes page-locked and copied at a time after a restore: one locks while the last copies


def park_weights(*modules) -> None:
    """Keep the CUDA weights (parameters and buffers) of torch ``modules`` in host memory across snapshots.

    Before a snapshot they move into one page-aligned host buffer and their device memory is freed, so the CUDA
    checkpoint holds little device memory. After a restore they go back into one device buffer, the host buffer
    page-locked (``cudaHostRegister``) a chunk at a time while the chunk before copies, so they move at the speed
    of copies from pinned memory, where the driver's own restore copies from pageable memory (on an H200 about 55
    against 4-8 GB/s; docs/gpu.md); the host buffer is then unlocked and freed. Tensors keep their identity (their
    ``.data`` is swapped), so references to them stay valid. Call it once the model is on its GPU; the server
    must serve no request while the snapshot is taken (thaw sends none). One GPU per process."""
    parked: dict = {}

    def park() -> None:
        import torch
        tensors = list({id(t): t for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_cuda}.values())
        devices = {t.device for t in tensors}
        if len(devices) > 1:
            raise RuntimeError("park_weights: the weights are on more than one GPU")
        offsets, total = [], 0
        for t in tensors:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // PARK_ALIGN) * PARK_ALIGN
        if not total:  # nothing on a GPU (or parked already)
            return
        host = _host_buffer(total)

        def to_host(start: int, end: int) -> None:  # all at once: the host buffer is locked whole
            for t, o in zip(tensors, offsets):
                _as(host, o, t).copy_(t, non_blocking=True)
        _copy_locked(torch, host, total, to_host)
        for t, o in zip(tensors, offsets):
            t.data = _as(host, o, t)
        torch.cuda.empty_cache()
        parked.update(host=host, tensors=tensors, offsets=offsets, device=devices.pop())

    def unpark(env: dict) -> None:
        if not parked:
            return
        import torch
        host, tensors, offsets = parked.pop("host"), parked.pop("tensors"), parked.pop("offsets")
        gpu = torch.empty(host.numel(), dtype=torch.uint8, device=parked.pop("device"))
        _copy_locked(torch, host, PARK_CHUNK, lambda a, b: gpu[a:b].copy_(host[a:b], non_blocking=True))
        for t, o in zip(tensors, offsets):
            t.data = _as(gpu, o, t)
        # the last reference to the host buffer goes here: its memory is unmapped

    on_before_snapshot(park)
    on_after_restore(unpark)


def _host_buffer(size: int):
    """A page-aligned, private anonymous host buffer as a uint8 tensor (freed with the last tensor using it)."""
    import mmap

    import torch
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)  # fewer pages to lock, and CRIU restores it into huge pages anyway
    except (AttributeError, OSError):
        pass
    return torch.frombuffer(mm, dtype=torch.uint8)


def _as(buf, offset: int, like):
    """``buf`` (uint8) from ``offset`` seen as a tensor of ``like``'s dtype and shape."""
    return buf[offset:offset + like.numel() * like.element_size()].view(like.dtype).view(like.shape)


def _copy_locked(torch, host, chunk: int, copy) -> None:
    """Page-lock ``host`` ``chunk`` bytes at a time and call ``copy(start, end)`` (which queues non-blocking GPU
    copies of that range) as each chunk is locked, so one chunk locks while the one before copies. Returns, or
    raises, with every copy done and every chunk unlocked again."""
    rt, locked = torch.cuda.cudart(), []
    try:
        for start in range(0, host.numel(), chunk):
            end = min(start + chunk, host.numel())
            torch.cuda.check_error(rt.cudaHostRegister(host.data_ptr() + start, end - start, 0))
            locked.append(start)
            copy(start, end)
    finally:
        torch.cuda.synchronize()  # no copy may still use host memory once it is unlocked
        for start in locked:
            torch.cuda.check_error(rt.cudaHostUnregister(host.data_ptr() + start))


def _reply(handler, status: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def handle(handler) -> bool:
    """Answer the thaw paths in a ``BaseHTTPRequestHandler``; False when the request is not one of them."""
    path = handler.path.split("?", 1)[0]
    if handler.command == "GET" and path == READY_PATH:
        _reply(handler, 200 if is_ready() else 503, {"ready": is_ready()})
        return True
    if handler.command != "POST" or path not in (BEFORE_SNAPSHOT_PATH, AFTER_RESTORE_PATH):
        return False
    given = (handler.headers.get(HOOK_TOKEN_HEADER) or "").encode("utf-8", "replace")
    if _token and not hmac.compare_digest(given, _token.encode()):
        handler.close_connection = True  # the body is left unread
        _reply(handler, 403, {"error": f"{path} needs the {HOOK_TOKEN_HEADER} the host launched the server with"})
        return True
    try:
        size = int(handler.headers.get("Content-Length") or 0)
    except ValueError:
        size = -1
    if not 0 <= size <= MAX_HOOK_BODY:  # unread: the connection cannot be used again
        handler.close_connection = True
        _reply(handler, 413, {"error": f"Content-Length must be 0 to {MAX_HOOK_BODY} bytes"})
        return True
    error = None
    try:
        payload = json.loads(handler.rfile.read(size) or b"{}")
    except (ValueError, RecursionError) as e:  # nested too deep
        payload, error = None, f"body is not JSON: {type(e).__name__}"
    env = payload.get("env") if isinstance(payload, dict) else None
    if error is None and not (isinstance(payload, dict) and (env is None or isinstance(env, dict))
                              and all(isinstance(k, str) and k and "=" not in k and "\0" not in k + str(v)
                                      for k, v in (env or {}).items())):
        error = 'body must be {"env": {NAME: value, ...}, "restore_id": ...}'
    if error:
        _reply(handler, 400, {"error": error})
        return True
    try:
        _reply(handler, 200, before_snapshot() if path == BEFORE_SNAPSHOT_PATH else after_restore(payload))
    except Exception as e:  # noqa: BLE001 - a failing callback must reach the host as an error
        traceback.print_exc()  # to the replica's log; the host gets the type only: the text may hold a secret
        _reply(handler, 500, {"error": f"{type(e).__name__} in a callback of {path} (see the replica's log)"})
    return True
