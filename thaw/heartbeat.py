"""Heartbeat the running Temporal activity from a side thread while blocking work runs (a docker build, a
model loading, a CRIU dump): a silent step can outlast the heartbeat timeout. Outside an activity: no-op."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Callable, Iterator


@contextlib.contextmanager
def keepalive(stage: str, every: float = 1.0) -> Iterator[Callable[[str], None]]:
    """Yields ``set_stage(name)``; the heartbeat details are ``{"stage": name}``."""
    try:
        from temporalio import activity

        active = activity.in_activity()
    except Exception:
        active = False
    current = [stage]
    if not active:
        yield lambda s: current.__setitem__(0, s)
        return
    ctx = contextvars.copy_context()  # the activity context lives in a contextvar: carry it to the thread
    stop = threading.Event()

    def beat():
        while not stop.wait(every):
            with contextlib.suppress(Exception):
                ctx.run(activity.heartbeat, {"stage": current[0]})

    thread = threading.Thread(target=beat, name=f"thaw-{stage.replace(' ', '-')}", daemon=True)
    thread.start()
    try:
        yield lambda s: current.__setitem__(0, s)
    finally:
        stop.set()
        thread.join()
