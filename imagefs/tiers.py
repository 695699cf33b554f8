"""Tiers of the chunk store besides the local directory: a bounded in-memory LRU and S3.

A tier stores opaque bytes under keys like ``chunks/ab/<blake3hex>``; it does not hash anything itself.
:class:`~thaw.imagefs.store.ChunkStore` verifies every object (blake3) before it puts it into a tier and
after it reads it from one, so a tier only has to keep bytes and say when it has none.

- :class:`MemoryTier` — thread-safe LRU bounded by bytes; filled by reads (never by builds). Objects in it
  were verified on the way in and live in this process's memory only, so reads from it are not re-hashed
  (``trusted``).
- :class:`S3Tier` — boto3 against any S3 endpoint (AWS, SeaweedFS, MinIO): HEAD for ``has``, whole-object
  or ranged GET, single PUT below ``multipart_threshold`` and a multipart upload (boto3's transfer manager)
  above it, bounded retries with backoff (botocore "standard" mode) and connect/read timeouts, so a dead or
  frozen server is a :class:`StoreError` after at most about ``max_attempts × timeout_s`` plus backoff,
  never a hang. The bucket is created on first use when missing. Every failure is a one-line
  :class:`StoreError` naming the endpoint and bucket.
  Objects travel and rest zstd-compressed where that saves at least 3 % (``compress_level``; CRIU memory
  pages and shared libraries shrink to 20–27 %, weights hardly at all), marked by the user metadata
  ``thaw-encoding: zstd``. get() returns the bytes as they were put, so the other tiers and the store's blake3
  check never see the encoding; objects without the mark (uploaded with compression off) read as they are.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from pathlib import Path

from .store import QUARANTINE, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

MiB = 1 << 20
ENCODING = "thaw-encoding"  # S3 user metadata: how the object's bytes were encoded ("zstd"); absent: as put
MAX_DECODED = 1 << 30  # a frame claiming more is not one of ours (the store's objects are chunks and manifests)


class MemoryTier:
    """Objects in process memory, least recently used evicted beyond ``max_bytes``."""

    trusted = True  # holds only bytes verified on the way in; reads skip re-hashing

    def __init__(self, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("a memory tier needs max_bytes > 0")
        self.max_bytes = max_bytes
        self.name = f"memory:{max_bytes >> 20}MiB"
        self._objects: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def has(self, key: str) -> bool:
        with self._lock:
            return key in self._objects

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._objects.get(key)
            if data is not None:
                self._objects.move_to_end(key)
            return data

    def put(self, key: str, data: bytes | memoryview) -> bool:
        n = len(data)
        if n > self.max_bytes:
            return False  # would evict everything else and still not fit
        data = bytes(data)
        with self._lock:
            if key in self._objects:
                self._objects.move_to_end(key)
                return False
            self._objects[key] = data
            self._bytes += n
            while self._bytes > self.max_bytes:
                _, old = self._objects.popitem(last=False)
                self._bytes -= len(old)
            return True

    def put_file(self, key: str, path: Path) -> bool:
        """Copy ``path``'s content in (the file stays where it is)."""
        return self.put(key, Path(path).read_bytes())

    def delete(self, key: str) -> None:
        with self._lock:
            data = self._objects.pop(key, None)
            if data is not None:
                self._bytes -= len(data)

    def usage(self) -> tuple[int, int]:
        with self._lock:
            return len(self._objects), self._bytes

    def clear(self) -> None:
        with self._lock:
            self._objects.clear()
            self._bytes = 0

    def forget(self) -> None:
        """Nothing to forget: it holds the objects themselves."""


_DENIED = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
           "Forbidden", "403", "InvalidClientTokenId", "AuthorizationHeaderMalformed"}
_MISSING = {"404", "NoSuchKey", "NotFound"}
_NO_BUCKET = {"404", "NoSuchBucket", "NotFound"}


class S3Tier:
    """Objects in an S3 bucket under ``prefix``.

    ``access_key``/``secret_key`` None → boto3's default credential chain (env, ~/.aws, instance role).
    ``put_file`` uploads a copy; the file stays where it is.
    """

    trusted = False

    def __init__(self, bucket: str, endpoint_url: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, region: str = "us-east-1", prefix: str = "", *,
                 timeout_s: float = 5.0, max_attempts: int = 3, multipart_threshold: int = 8 * MiB,
                 multipart_chunksize: int = 8 * MiB, max_concurrency: int = 8, create_bucket: bool = True,
                 known_limit: int = 1_000_000, compress_level: int = 3):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config as BotoConfig

        if not bucket:
            raise StoreError("S3 tier needs a bucket name (s3_bucket)")
        self.bucket = bucket
        self.endpoint_url = endpoint_url or None
        self.region = region or "us-east-1"
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.multipart_threshold = multipart_threshold
        self.create_bucket = create_bucket
        self.compress_level = compress_level  # zstd level for uploads; 0: upload as given
        self._zstd = threading.local()  # zstandard's (de)compressor objects are not thread-safe
        self.name = f"s3:{self.endpoint_url or 'aws'}/{bucket}/{self.prefix}"
        extra = {}
        if self.endpoint_url:
            extra["s3"] = {"addressing_style": "path"}  # S3-compatible servers rarely do virtual hosts
        try:  # botocore >= 1.36 adds CRC trailers by default; not every S3-compatible server takes them
            BotoConfig(request_checksum_calculation="when_required")
            extra.update(request_checksum_calculation="when_required",
                         response_checksum_validation="when_required")
        except TypeError:  # pragma: no cover - older botocore
            pass
        config = BotoConfig(
            region_name=self.region, connect_timeout=timeout_s, read_timeout=timeout_s,
            retries={"mode": "standard", "total_max_attempts": max_attempts},  # first try included
            max_pool_connections=max(10, 2 * max_concurrency), **extra)
        session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                                        region_name=self.region)
        self.client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                       multipart_chunksize=multipart_chunksize, max_concurrency=max_concurrency)
        self._ready = False
        self._ready_lock = threading.Lock()
        self._check_failed: tuple[float, str] | None = None  # when the last bucket check found S3 down, and why
        # keys this process has seen in the bucket (objects are immutable and content-addressed): spares
        # repeated HEADs when builds re-check chunks they uploaded or found earlier
        self._known: set[str] = set()
        self._known_limit = known_limit
        # put_bytes/get_bytes: as given and returned; wire_put_bytes/wire_get_bytes: what S3 stored and sent
        self.stats = {"heads": 0, "lists": 0, "gets": 0, "puts": 0, "put_bytes": 0, "multipart_puts": 0, "get_bytes": 0,
                      "wire_put_bytes": 0, "wire_get_bytes": 0}
        self._stats_lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg) -> "S3Tier":
        return cls(cfg.s3_bucket, cfg.s3_endpoint, cfg.s3_access_key, cfg.s3_secret_key, cfg.s3_region,
                   cfg.s3_prefix, timeout_s=cfg.s3_timeout_s, max_attempts=cfg.s3_max_attempts,
                   multipart_threshold=cfg.s3_multipart_threshold, max_concurrency=cfg.s3_upload_workers,
                   compress_level=cfg.s3_compress_level)

    # -- errors ---------------------------------------------------------------------------------
    def _error(self, op: str, key: str | None, e: BaseException) -> StoreError:
        from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, IncompleteReadError, NoCredentialsError

        chain, c = [], e  # S3UploadFailedError (multipart) wraps the botocore error that caused it
        while c is not None and len(chain) < 10:
            chain.append(c)
            c = c.__cause__ or c.__context__
        network = (HTTPClientError, BotoConnectionError, IncompleteReadError)  # timeouts, refusals, resets
        cause = next((c for c in chain if isinstance(c, (ClientError, NoCredentialsError) + network)), e)
        where = f"S3 {self.endpoint_url or 'aws'} bucket {self.bucket!r}"
        what = f"{op} {self.prefix}{key}" if key else op
        kind = StoreError
        if isinstance(cause, ClientError):
            err = cause.response.get("Error", {})
            code = str(err.get("Code", "?"))
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _DENIED or status == 403:
                msg = (f"{where}: access denied on {what} ({code}); check s3_access_key/s3_secret_key "
                       f"(THAW_S3_ACCESS_KEY/THAW_S3_SECRET_KEY)")
            else:
                msg = f"{where}: {what} failed: {code} {err.get('Message', '')}".rstrip()
                if isinstance(status, int) and status >= 500 or code in ("SlowDown", "ServiceUnavailable"):
                    kind = StoreUnavailable
        elif isinstance(cause, NoCredentialsError):
            msg = f"{where}: no S3 credentials; set s3_access_key/s3_secret_key or configure boto3's credentials"
        elif isinstance(cause, network):
            msg = (f"{where}: {what}: no answer after {self.max_attempts} attempts ({self.timeout_s:g} s timeout "
                   f"each): {cause}; is the S3 server up and reachable?")
            kind = StoreUnavailable
        else:
            msg = f"{where}: {what} failed: {type(e).__name__}: {e}"
        return kind(" ".join(msg.split()))

    def _call(self, op: str, key: str | None, fn, *args, **kwargs):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise self._error(op, key, e) from None

    @staticmethod
    def _code(e) -> str:
        return str(e.response.get("Error", {}).get("Code", ""))

    # -- bucket ---------------------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        """Check the bucket (and the credentials) once; create it when missing (``create_bucket``)."""
        if self._ready:
            return
        asked = time.monotonic()
        with self._ready_lock:
            if self._ready:
                return
            failed = self._check_failed
            if failed and failed[0] >= asked:  # it failed while this call waited: N threads would wait N times
                raise StoreUnavailable(failed[1])
            try:
                self._call("head bucket", None, self._head_bucket)
            except StoreUnavailable as e:
                self._check_failed = (time.monotonic(), str(e))
                raise
            except _NoBucket:
                if not self.create_bucket:
                    raise StoreError(f"S3 {self.endpoint_url or 'aws'}: bucket {self.bucket!r} does not exist "
                                     f"(create it or let thaw create it)") from None
                kwargs = {}
                if self.region != "us-east-1":
                    kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
                try:
                    self._call("create bucket", None, self._create_bucket, **kwargs)
                except _Exists:
                    pass
                log.info("created S3 bucket %s at %s", self.bucket, self.endpoint_url or "aws")
            self._ready = True

    def _head_bucket(self):
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if self._code(e) in _NO_BUCKET:
                raise _NoBucket() from None
            raise

    def _create_bucket(self, **kwargs):
        from botocore.exceptions import ClientError

        try:
            self.client.create_bucket(Bucket=self.bucket, **kwargs)
        except ClientError as e:
            if self._code(e) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise _Exists() from None
            raise

    # -- the tier -------------------------------------------------------------------------------
    def _count(self, **n: int) -> None:
        with self._stats_lock:
            for k, v in n.items():
                self.stats[k] += v

    def _remember(self, key: str) -> None:
        if len(self._known) >= self._known_limit:
            self._known.clear()
        self._known.add(key)

    def forget(self) -> None:
        """Drop what this process remembered the bucket holds: another process (`thaw gc`) may have deleted it."""
        self._known.clear()

    def has(self, key: str) -> bool:
        if key in self._known:
            return True
        self.ensure_bucket()
        from botocore.exceptions import ClientError

        def head():
            self._count(heads=1)
            try:
                self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
                return True
            except ClientError as e:
                if self._code(e) in _MISSING:
                    return False
                raise

        found = self._call("HEAD", key, head)
        if found:
            self._remember(key)
        return found

    def list_keys(self, prefix: str, max_pages: int, page_size: int = 1000) -> tuple[set[str], bool]:
        """The keys under ``prefix`` (this tier's own prefix not included), from at most ``max_pages`` LIST
        calls of ``page_size`` keys each, and whether that was all of them. They are remembered as present (objects
        are immutable; ``forget`` drops them like those HEAD found)."""
        if max_pages < 1:
            return set(), False
        self.ensure_bucket()
        found: set[str] = set()

        def pages():
            paginator = self.client.get_paginator("list_objects_v2")
            for n, page in enumerate(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix,
                                                        PaginationConfig={"PageSize": page_size}), 1):
                self._count(lists=1)
                found.update(obj["Key"][len(self.prefix):] for obj in page.get("Contents", ()))
                if not page.get("IsTruncated"):
                    return True
                if n >= max_pages:  # the next page is not asked for
                    return False
            return True

        complete = self._call("LIST", prefix, pages)
        for key in found:
            self._remember(key)
        return found, complete

    def get_range(self, key: str, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of the object as it was put (a ranged GET; a compressed object is fetched
        whole and sliced); None when the object is missing.

        Unverified: the caller checks what it reads (whole chunks go through :meth:`get`)."""
        if not 0 <= start < end:
            raise ValueError(f"bad range [{start}, {end})")
        data, whole = self._get(key, f"bytes={start}-{end - 1}")
        return data[start:end] if whole else data

    def get(self, key: str) -> bytes | None:
        return self._get(key, None)[0]

    def _get(self, key: str, rng: str | None) -> tuple[bytes | None, bool]:
        """(the object's bytes as put, or the range asked for; whether they are the whole object)"""
        self.ensure_bucket()
        from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError

        def fetch(rng):
            for attempt in range(1, self.max_attempts + 1):
                self._count(gets=1)
                try:
                    kw = {"Range": rng} if rng else {}
                    resp = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key, **kw)
                except ClientError as e:
                    if self._code(e) in _MISSING:
                        return None, None
                    if rng and self._code(e) == "InvalidRange":  # past the end of a compressed object, perhaps
                        return None, "?"
                    raise
                body = resp["Body"]  # its read(), not the urllib3 stream's that `with` gives: botocore's errors
                try:  # botocore retries a request until its headers come; a body cut short or stalled, here
                    data = body.read()
                except (HTTPClientError, IncompleteReadError):
                    if attempt == self.max_attempts:
                        raise
                    time.sleep(random.uniform(0, min(1.0, 0.05 * 2 ** attempt)))  # full jitter, as botocore's
                    continue
                finally:
                    body.close()
                self._count(wire_get_bytes=len(data))
                return data, resp.get("Metadata", {}).get(ENCODING)

        data, encoding = self._call("GET", key, fetch, rng)
        if encoding and rng:  # a range of the compressed bytes means nothing: fetch the object whole
            data, encoding = self._call("GET", key, fetch, None)
            rng = None
        if data is None:
            return None, False
        self._remember(key)
        data = self._decode(key, data, encoding)
        self._count(get_bytes=len(data))
        return data, rng is None

    def _decode(self, key: str, data: bytes, encoding: str | None) -> bytes:
        """The object's bytes as put. Bytes that do not decode are returned as they came: the store's blake3
        check then finds the object corrupt and drops it, as it does with any damaged object. An encoding this
        version does not know (a newer writer's) is an error, not damage: that object stays where it is."""
        if not encoding:
            return data
        if encoding != "zstd":
            raise StoreError(f"{self.name}: {key} is stored with encoding {encoding!r}, which this version of "
                             "thaw cannot read (written by a newer one?)")
        import zstandard

        try:
            size = zstandard.frame_content_size(data)
            if size > MAX_DECODED:
                raise ValueError(f"frame content size {size}")
            if getattr(self._zstd, "d", None) is None:
                self._zstd.d = zstandard.ZstdDecompressor()
            if size >= 0:
                with contextlib.suppress(zstandard.ZstdError):  # more than one frame: streamed below
                    return self._zstd.d.decompress(data, allow_extra_data=False)
            out = bytearray()  # frames that do not say their size, or several (another writer's): streamed, capped
            reader = self._zstd.d.stream_reader(io.BytesIO(data), read_across_frames=True)
            while piece := reader.read(1 << 20):
                out += piece
                if len(out) > MAX_DECODED:
                    raise ValueError(f"decodes to more than {MAX_DECODED} bytes")
            return bytes(out)
        except (ValueError, zstandard.ZstdError) as e:
            log.warning("%s: %s does not decode (%s)", self.name, key, e)
            return data

    def _encode(self, data: bytes | memoryview) -> tuple[bytes | memoryview, dict[str, str]]:
        """(body, metadata): zstd when that saves at least 3 %, else the bytes as given."""
        if self.compress_level > 0 and len(data) >= 512:
            import zstandard

            if getattr(self._zstd, "c", None) is None:
                self._zstd.c = zstandard.ZstdCompressor(level=self.compress_level)
            packed = self._zstd.c.compress(data)
            if len(packed) <= len(data) * 0.97:
                return packed, {ENCODING: "zstd"}
        return data, {}

    def put(self, key: str, data: bytes | memoryview) -> bool:
        """Upload unless the bucket already holds ``key``; True when uploaded."""
        if self.has(key):
            return False
        self._put_bytes(key, data)
        return True

    def put_file(self, key: str, path: Path) -> bool:
        if self.has(key):
            return False
        if self.compress_level > 0:  # the store's objects are small: encode in memory
            self._put_bytes(key, Path(path).read_bytes())
            return True
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._upload(key, f, size, {}, size)
        return True

    def _put_bytes(self, key: str, data: bytes | memoryview) -> None:
        body, meta = self._encode(data)
        self._upload(key, io.BytesIO(body), len(body), meta, len(data))

    def _upload(self, key: str, f, size: int, meta: dict[str, str], given: int) -> None:
        def up():
            if size >= self.multipart_threshold:
                self._count(multipart_puts=1)
                self.client.upload_fileobj(f, self.bucket, self.prefix + key, Config=self.transfer,
                                           ExtraArgs={"Metadata": meta})
            else:  # Content-MD5: the server refuses bytes damaged on the way (no CRC trailers, see __init__)
                body = f.read()
                self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=body, Metadata=meta,
                                       ContentMD5=base64.b64encode(hashlib.md5(body).digest()).decode())
            self._count(puts=1, put_bytes=given, wire_put_bytes=size)

        self._call("PUT", key, up)
        self._remember(key)

    def delete(self, key: str) -> None:
        self.ensure_bucket()
        self._known.discard(key)
        self._call("DELETE", key, self.client.delete_object, Bucket=self.bucket, Key=self.prefix + key)

    def quarantine(self, key: str) -> str:
        """Move the object to ``quarantine/<key>`` (a server-side copy, then a delete), and return that key: out
        of readers' way (a build uploads the object again) and out of gc's, which sweeps only chunks/ and
        manifests/, for an operator to look at or move back."""
        self.ensure_bucket()
        from botocore.exceptions import ClientError

        aside = f"{QUARANTINE}/{key}"

        def copy() -> bool:
            try:
                self.client.copy_object(Bucket=self.bucket, Key=self.prefix + aside, MetadataDirective="COPY",
                                        CopySource={"Bucket": self.bucket, "Key": self.prefix + key})
            except ClientError as e:
                if self._code(e) in _MISSING:  # another host set it aside first
                    return False
                raise
            return True

        if self._call("COPY", key, copy):
            self.delete(key)
        else:
            self._known.discard(key)  # read here before it went: has() must not answer from memory
        return aside

    def entries(self, under: str = "") -> list[tuple[str, int, float]]:
        """(key without the tier's prefix, stored size, last-modified epoch seconds) of every object whose
        key starts with ``under``."""
        self.ensure_bucket()

        def listing():
            out = []
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                          Prefix=self.prefix + under)
            for page in pages:
                out += [(o["Key"][len(self.prefix):], o["Size"], o["LastModified"].timestamp())
                        for o in page.get("Contents", ())]
            return out

        return self._call("LIST", under or None, listing)

    def keys(self, under: str = "") -> list[str]:
        """Keys (without the tier's prefix) that start with ``under``."""
        return [k for k, _, _ in self.entries(under)]

    def uploads(self, under: str = "") -> list[tuple[str, str, float]]:
        """(key without the tier's prefix, upload id, initiated epoch seconds) of every multipart upload under
        ``under`` begun and never completed nor aborted: a writer killed part way leaves its parts stored."""
        self.ensure_bucket()

        def listing():
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                 Prefix=self.prefix + under)
            return [(u["Key"][len(self.prefix):], u["UploadId"], u["Initiated"].timestamp())
                    for page in pages for u in page.get("Uploads", ())]

        return self._call("LIST uploads", under or None, listing)

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Drop an unfinished multipart upload and its parts (one already gone is no error)."""
        from botocore.exceptions import ClientError

        def abort():
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.prefix + key, UploadId=upload_id)
            except ClientError as e:
                if self._code(e) != "NoSuchUpload":
                    raise

        self._call("ABORT upload", key, abort)

    def usage(self) -> tuple[int, int]:
        objects = self.entries()
        return len(objects), sum(n for _, n, _ in objects)


class _NoBucket(Exception):
    pass


class _Exists(Exception):
    pass
