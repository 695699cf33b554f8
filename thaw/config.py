"""The one configuration object.

Resolution order (later wins): defaults → ``<state_dir>/config.toml`` (what thaw saved) → the TOML file
``$THAW_CONFIG`` names, if set (it must exist) → environment variables (``THAW_*``) → CLI flags (passed as
overrides to :func:`load`). A key of a file that is not a setting is an error, not ignored.
Every path thaw uses is derived here, from ``state_dir``.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from .files import changing, write_atomic

MiB = 1 << 20
GiB = 1 << 30


def _default_state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "thaw"  # empty: unset


def _state_path(v: str | os.PathLike) -> Path:
    """Absolute (``~`` expanded): processes thaw starts elsewhere (SeaweedFS runs in its own dir) agree."""
    return Path(v).expanduser().absolute()


LOOPBACK = ("127.0.0.1", "localhost", "::1")
# what a replica's drain and grace may take together: a pool gives its stop workflows.pool.STOP_TIMEOUT_S (60 s),
# and the SIGKILL after the grace may wait 10 s for the process to go
STOP_BUDGET_S = 50


class Config(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="THAW_", extra="forbid", frozen=True)

    state_dir: Path = Field(default_factory=_default_state_dir)

    @field_validator("state_dir", mode="before")
    @classmethod
    def _absolute(cls, v: str | os.PathLike) -> Path:
        if not str(v).strip():  # THAW_STATE_DIR= would be the current directory
            raise ValueError("empty: name a directory, or unset THAW_STATE_DIR for the default")
        return _state_path(v)

    # Registry: SQLite file under state_dir unless a DSN (e.g. postgresql+psycopg://...) is given.
    db_url: str | None = None

    @field_validator("db_url")
    @classmethod
    def _dsn(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(v)
            if url.get_backend_name() not in ("sqlite", "postgresql"):
                raise ValueError(f"{url.get_backend_name()!r}: the registry runs on SQLite or PostgreSQL")
            url.get_dialect().import_dbapi()  # the driver the DSN names is installed
        except ArgumentError:
            raise ValueError("not a database URL (e.g. postgresql+psycopg://user:pass@host/db)") from None
        except ImportError as e:
            raise ValueError(f"its driver is not installed ({e})") from None
        return v

    # Temporal
    temporal_address: str = "127.0.0.1:7233"

    @field_validator("temporal_address")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not (sep and re.fullmatch(r"[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]", host) and port.isdigit()
                and 0 < int(port) < 65536):  # no scheme: it is a gRPC target, and names the UI's host
            raise ValueError(f"{v!r} is not HOST:PORT")
        return v

    temporal_namespace: str = "default"
    temporal_ui_port: int = Field(8233, ge=1, le=65535)
    build_task_queue: str = "thaw-build"
    # Host agents: each polls "<host_task_queue_prefix><host_id>" for the activities that touch processes.
    host_task_queue_prefix: str = "thaw-host-"
    host_id: str = Field(default_factory=lambda: os.uname().nodename)

    @field_validator("host_id")
    @classmethod
    def _host_id(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v):  # names a directory under work/ and a queue
            raise ValueError(f"{v!r}: use up to 63 letters, digits, '.', '_' and '-', starting with a letter or digit")
        return v

    agent_heartbeat_s: float = Field(10.0, gt=0)
    lazy_mounts: bool = True  # serve image and snapshot trees through the FUSE filesystem (else materialize)
    # an agent unmounts trees unused this long (no replica on them, not pinned); 0: never
    mount_idle_s: float = Field(1800.0, ge=0)
    prefetch: bool = True  # on restore, fetch the snapshot's chunks and its recorded image reads in parallel
    prefetch_concurrency: int = Field(8, ge=1)
    # RAM (MiB) for the memory pages of recently restored snapshots, locked so restores never read them from disk
    pin_mb: int = Field(2048, ge=0)
    # CRIU restores large anonymous memory into transparent huge pages (thaw's CRIU build, snapshot/criu.py):
    # "gpu" for snapshots that hold GPU state (the driver's copy of device memory), "always" or "never"
    restore_huge_pages: Literal["gpu", "always", "never"] = "gpu"
    restore_threads: int = Field(0, ge=0)  # threads CRIU reads memory pages with; 0: one per CPU, at most 8
    # CPU weight of the cgroup all of a host's replicas share (cgroup v2 units; a process is 100), so a burst of
    # restores does not starve the agent and control plane that start them (snapshot/cgroup.py); 0: no cgroup
    replica_cpu_weight: int = Field(10, ge=0, le=10000)
    # on a GPU host, image-rooted replicas get the GPUs' device nodes and the driver's libraries (snapshot/nvidia.py)
    gpu_passthrough: bool = True
    host_stale_s: float = Field(45.0, gt=0)  # a host whose agent has not heartbeated for this long gets no work
    # replicas placed on this host (its GPU count gives each a GPU of its own); 0: builds only
    host_capacity: int = Field(4, ge=0)
    replica_bind: str = "127.0.0.1"  # where the agent publishes replicas' servers
    # a replica being stopped keeps serving this long after its registry row goes, so gateways (which look every
    # 0.5 s) stop sending it requests; then its server gets its stop signal (the image's StopSignal, else SIGTERM)
    # and replica_stop_grace_s to finish the requests under way and exit before SIGKILL, as `docker stop` does.
    # A server that does not catch the signal is killed at once (as pid 1 of its namespace it never gets it).
    replica_drain_s: float = Field(2.0, ge=0, le=600)
    replica_stop_grace_s: float = Field(10.0, ge=0, le=45)
    # a serving replica whose health path fails this many checks in a row (one every agent_heartbeat_s: no answer
    # within replica_health_timeout_s, or not 200) is stopped and unregistered, and its pool replaces it; 0: never
    replica_health_failures: int = Field(3, ge=0)
    replica_health_timeout_s: float = Field(5.0, gt=0)
    agent_metrics_port: int | None = Field(9101, ge=0, le=65535)  # the agent's Prometheus /metrics; 0: any free
    # port; "off" (None): none

    @model_validator(mode="after")
    def _a_stop_fits(self) -> Config:
        if self.replica_drain_s + self.replica_stop_grace_s > STOP_BUDGET_S:
            raise ValueError(f"replica_drain_s ({self.replica_drain_s:g}) + replica_stop_grace_s "
                             f"({self.replica_stop_grace_s:g}) is over the {STOP_BUDGET_S} s a pool gives a replica's "
                             f"stop before its SIGKILL: lower one of them")
        return self

    @field_validator("agent_metrics_port", mode="before")
    @classmethod
    def _off(cls, v):
        return None if isinstance(v, str) and v.strip().lower() in ("off", "none") else v

    agent_metrics_bind: str = "127.0.0.1"  # where the agent serves it (0.0.0.0: for a Prometheus elsewhere)

    # Runtime: control API (token-authenticated) and gateway
    api_host: str = "127.0.0.1"
    api_port: int = Field(8470, ge=1, le=65535)
    api_token: str | None = None  # default: generated once into <state_dir>/api-token
    gateway_port: int = Field(8480, ge=1, le=65535)
    # `thaw up --s3`: run SeaweedFS as the store's S3 tier (remote-store mode on one machine)
    s3_embedded: bool = False
    s3_embedded_port: int = Field(8333, ge=1, le=65535)

    # Content-addressed store
    chunk_size: int = Field(default=4 * MiB, le=4 * MiB, gt=0)  # the largest object; snapshots' CRIU images
    # Container images are cut finer: a replica touches scattered pages of its libraries and weights, and a
    # page fault fetches its whole chunk (bench/imagefs: 4 → 1 MiB cut a cold restore's bytes by a fifth).
    image_chunk_size: int = Field(default=1 * MiB, le=4 * MiB, gt=0)
    # Store tiers (memory → local disk → S3). Without s3_endpoint the local store directory is the source
    # of truth (unbounded, no memory tier); with it S3 is, and the local directory becomes a cache.
    memory_cache_bytes: int = Field(default=256 * MiB, ge=0)  # per process; 0 = no memory tier
    disk_cache_bytes: int = Field(default=20 * GiB, gt=0)  # bound of the local chunk cache (with S3 only)
    store_path: Path | None = None  # the local store directory; None: <state_dir>/store (`thaw hosts up` gives
    # each of its hosts its own with S3: a cache of that host's, cold when it starts, as on another machine)

    @field_validator("store_path", mode="before")
    @classmethod
    def _store_path(cls, v: str | os.PathLike | None) -> Path | None:
        if v is not None and not str(v).strip():  # THAW_STORE_PATH= would be the current directory
            raise ValueError("empty: name a directory, or unset THAW_STORE_PATH for <state_dir>/store")
        return None if v is None else _state_path(v)

    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:8333; None = no S3 tier

    @field_validator("s3_endpoint")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"https?://[^\s/:]+(:\d{1,5})?(/\S*)?", v):
            raise ValueError(f"{v!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:8333)")
        return v

    # an agent with s3_socket relays its s3_endpoint's loopback port to that Unix socket: how the hosts of
    # `thaw hosts up` reach `thaw up --s3`'s SeaweedFS, which listens on loopback and on its socket only
    s3_socket: Path | None = None
    s3_bucket: str = "thaw"
    s3_access_key: str | None = None  # None (both) → boto3's default credential chain
    s3_secret_key: str | None = Field(default=None, repr=False)
    s3_region: str = "us-east-1"
    s3_prefix: str = ""
    s3_timeout_s: float = Field(default=5.0, gt=0)  # connect and read timeout of each S3 request
    s3_max_attempts: int = Field(default=3, ge=1)  # per S3 call, first try included (backoff between)
    s3_multipart_threshold: int = Field(default=8 * MiB, ge=5 * MiB)  # objects this big go multipart
    s3_upload_workers: int = Field(default=8, ge=1)  # parallel chunk uploads when a build commits
    # zstd level of the objects uploaded to S3 (kept raw where zstd saves < 3 %); 0: upload them as they are
    s3_compress_level: int = Field(default=3, ge=0, le=22)

    # Ingest limits: anything past these is rejected as hostile or absurd.
    max_file_size: int = Field(64 * GiB, gt=0)
    max_image_size: int = Field(512 * GiB, gt=0)
    max_entries: int = Field(5_000_000, gt=0)
    allow_devices: bool = False

    # Activity timeouts (seconds)
    heartbeat_timeout: float = Field(30.0, gt=0)
    activity_timeout: float = Field(3600.0, gt=0)

    @property
    def fetch_timeout_s(self) -> float:
        """How long a lazy mount's read waits for a chunk before EIO: 30 s, or longer when S3's timeouts and
        attempts (with botocore's backoff, at most 1 s here) add up to more, so S3 gets its whole say."""
        return max(30.0, self.s3_max_attempts * (self.s3_timeout_s + 1.0) + 5.0)

    @cached_property
    def store_dir(self) -> Path:
        return self.store_path or self.state_dir / "store"

    def on_loopback(self) -> bool:
        """Whether Temporal listens on loopback only. `thaw hosts up` needs it beyond: its agents run in network
        namespaces of their own."""
        return self.temporal_address.rsplit(":", 1)[0].strip("[]") in LOOPBACK

    @cached_property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @cached_property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def work_dir(self) -> Path:
        """Host-local scratch: materialized image roots, checkpoint dumps, per-replica overlays (per host id,
        so several agents can share a state dir)."""
        return self.state_dir / "work" / self.host_id

    @property
    def host_task_queue(self) -> str:
        return f"{self.host_task_queue_prefix}{self.host_id}"

    @cached_property
    def secrets_file(self) -> Path:
        """NAME -> value, mode 0600, read by host agents when they inject secrets after a restore."""
        return self.state_dir / "secrets.json"

    def secrets(self) -> dict[str, str]:
        """The secrets file's NAME -> value ({} before the first `thaw secrets set`); ValueError, one line,
        when it is not such a JSON object."""
        try:
            data = json.loads(self.secrets_file.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            data = None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{self.secrets_file} is not a JSON object of secret names to values: fix or remove "
                             f"it, then `thaw secrets set` again")
        return data

    @cached_property
    def temporal_db(self) -> Path:
        return self.state_dir / "temporal.db"

    @cached_property
    def registry_url(self) -> str:
        return self.db_url or f"sqlite:///{self.state_dir / 'registry.db'}"

    def child_env(self) -> dict[str, str]:
        """What a thaw process this one starts (a worker, an agent) needs to share its state dir, Temporal and
        registry, on top of the environment it inherits."""
        return {"THAW_STATE_DIR": str(self.state_dir), "THAW_TEMPORAL_ADDRESS": self.temporal_address,
                **({"THAW_DB_URL": self.db_url} if self.db_url else {}),
                **({"THAW_STORE_PATH": str(self.store_path)} if self.store_path else {})}

    @cached_property
    def temporal_ui_url(self) -> str:
        host = self.temporal_address.rsplit(":", 1)[0]
        return f"http://{host}:{self.temporal_ui_port}"

    def workflow_url(self, workflow_id: str, run_id: str | None = None) -> str:
        tail = f"/{run_id}" if run_id else ""
        return f"{self.temporal_ui_url}/namespaces/{self.temporal_namespace}/workflows/{workflow_id}{tail}/history"


def save_settings(state_dir: Path, **values) -> Path:
    """Merge ``values`` (str/int/float/bool) into ``<state_dir>/config.toml``, which every thaw process reads."""
    import json

    path = Path(state_dir) / "config.toml"
    with changing(path):
        current = tomllib.loads(path.read_text()) if path.is_file() else {}
        current.update(values)
        write_atomic(path, "".join(f"{k} = {json.dumps(v)}\n" for k, v in sorted(current.items())),
                     mode=0o600)  # may hold credentials
    return path


def load(**overrides) -> Config:
    """Build the Config: file < env < overrides (None values in overrides are ignored)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    env_state = overrides.get("state_dir") or os.environ.get("THAW_STATE_DIR")
    state_dir = _state_path(env_state) if env_state else _default_state_dir()  # as Config has it
    file_values = {}  # what thaw saved for this state dir (save_settings), then the user's own file over it
    user_file = os.environ.get("THAW_CONFIG")
    if user_file and not Path(user_file).is_file():
        raise ValueError(f"THAW_CONFIG={user_file}: no such file")
    for path in (state_dir / "config.toml", *([Path(user_file)] if user_file else [])):
        if path.is_file():
            try:
                values = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not TOML ({e})") from None
            if "state_dir" in values:  # the files were chosen by it: the processes thaw starts would read others'
                raise ValueError(f"{path}: state_dir is set by THAW_STATE_DIR or --state-dir, not in a file")
            file_values.update(values)
    env_values = EnvSettingsSource(Config)()  # what THAW_* set, checked below with the rest (drain + grace: the two
    # may come from different places)
    merged = {**file_values, **env_values, **overrides}
    merged.setdefault("state_dir", state_dir)
    cfg = Config(**{k: v for k, v in merged.items()})
    return cfg
