"""Small files written whole or not at all: records, results and settings a later process trusts."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

# a build id (a workflow id) names a directory on the worker and on the host: one path component, never "..", "/x"
BUILD_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
BUILD_ID_RULE = "letters, digits, '.', '_' and '-' only, not first '.'"


def write_atomic(path: Path | str, data: str | bytes, mode: int = 0o600, durable: bool = True) -> Path:
    """Write ``data`` to a temporary file beside ``path`` (created with ``mode``), then rename it over ``path``:
    a reader sees the old content or the new, never an empty or torn file. ``durable`` flushes it to disk
    first, so that holds after a power loss too (records of live processes, gone with the power, skip it).
    Returns ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
            f.write(data.encode() if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def changing(path: Path | str) -> Iterator[None]:
    """Held while one process reads ``path``, changes it and writes it back (:func:`write_atomic`): an exclusive
    ``flock`` on ``<path>.lock``, so that two at once do not each write back what they read, losing the other's
    change."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
