"""Prefetch the chunks a recorded start read, in the order it read them.

The profile is an access recording written by the image filesystem (``--record``):
``{"image": digest, "reads": [[path, chunk_index, chunk_digest, t_ms], ...]}``. Fetching goes through
``store.get_chunk``, which copies a chunk found in a slower tier (S3) into the faster ones (disk, memory).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from thaw.errors import first_line

from .store import StoreUnavailable

log = logging.getLogger(__name__)


@dataclass
class PrefetchStats:
    chunks: int = 0
    bytes: int = 0
    ms: float = 0.0
    errors: int = 0
    first_error: str = ""  # the first failure, one line

    def timings(self) -> dict[str, int]:
        """What the prefetch cost, as entries of a stage breakdown."""
        return {"prefetch": int(self.ms), "prefetch_chunks": self.chunks, "prefetch_kb": self.bytes // 1024}


def parse_profile(text: str | bytes) -> list[str]:
    """Chunk digests of a recording (its JSON), in first-read order, each once; ValueError if it is not one."""
    try:
        digests = [r[2] for r in json.loads(text)["reads"]]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"not an access recording ({type(e).__name__}: {e})") from None
    if not all(isinstance(d, str) for d in digests):
        raise ValueError("not an access recording (a chunk digest is not a string)")
    return list(dict.fromkeys(digests))


def load_profile(path) -> list[str]:
    with open(path) as f:
        return parse_profile(f.read())


def prefetch(store, digests, concurrency: int = 8, stop: threading.Event | None = None,
             stats: PrefetchStats | None = None) -> PrefetchStats:
    """Fetch ``digests`` with ``concurrency`` threads (roughly in order); failures are counted, not raised. The
    first that finds the store unavailable (S3 down) ends the prefetch: each chunk after it would wait out the
    retries in turn, for minutes, while readers fetch by need anyway."""
    stats = stats if stats is not None else PrefetchStats()
    stop = stop if stop is not None else threading.Event()
    lock = threading.Lock()
    t0 = time.monotonic()

    def one(digest: str) -> None:
        if stop.is_set():
            return
        try:
            n = len(store.get_chunk(digest))
        except Exception as err:  # a missing chunk is the reader's problem, not the prefetcher's
            log.warning("prefetch of chunk %s failed: %s", digest, err)
            if isinstance(err, StoreUnavailable) and not stop.is_set():
                log.warning("prefetch stopped: the store is unavailable; readers fetch what they need")
                stop.set()
            with lock:
                stats.errors += 1
                stats.first_error = stats.first_error or f"chunk {digest[:12]}: {first_line(err)}"
            return
        with lock:
            stats.chunks += 1
            stats.bytes += n

    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="prefetch") as pool:
        list(pool.map(one, digests))
    stats.ms = round((time.monotonic() - t0) * 1000, 1)
    log.info("prefetched %d chunks (%d bytes) in %.0f ms, %d failed", stats.chunks, stats.bytes, stats.ms,
             stats.errors)
    return stats


class PrefetchHandle:
    def __init__(self, store, digests, concurrency: int):
        self.stats = PrefetchStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=prefetch, args=(store, list(digests), concurrency, self._stop,
                                                               self.stats), name="prefetch", daemon=True)
        self._thread.start()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> PrefetchStats:
        """Joined a second at a time: an exception raised into the waiting thread (an activity's cancel) lands."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread.is_alive():
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if left <= 0:
                break
            self._thread.join(left)
        return self.stats

    def cancel(self) -> None:
        """Skip the chunks not started yet."""
        self._stop.set()


def start_prefetch(store, digests, concurrency: int = 8) -> PrefetchHandle:
    """:func:`prefetch` on a background thread; ``.wait()`` returns the stats."""
    return PrefetchHandle(store, digests, concurrency)
