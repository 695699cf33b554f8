"""`thaw up` / `status` / `down` with the real Temporal dev server and worker processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def thaw(env, *args, check=True):
    res = subprocess.run(["thaw", *args], env=env, capture_output=True, text=True, timeout=180)
    if check:
        assert res.returncode == 0, f"thaw {' '.join(args)}: {res.stdout}{res.stderr}"
    return res


def test_up_status_build_down(tmp_path):
    env = {**os.environ, "THAW_STATE_DIR": str(tmp_path / "state"),
           "THAW_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}", "THAW_TEMPORAL_UI_PORT": str(free_port()),
           "THAW_API_PORT": str(free_port()), "THAW_AGENT_METRICS_PORT": "0"}
    try:
        out = thaw(env, "up").stdout
        assert "temporal: started" in out and "worker: started" in out and "agent: started" in out and "api: started" in out
        st = json.loads(thaw(env, "status", "--json").stdout)
        assert st["temporal"]["reachable"] and st["temporal"]["pid"] and st["worker"]["pid"] and st["agent"]["pid"]
        assert st["temporal"]["ui"] == f"http://127.0.0.1:{env['THAW_TEMPORAL_UI_PORT']}"
        assert st["registry"]["status"] == "ok" and st["state_dir"] == env["THAW_STATE_DIR"]
        pids = (st["temporal"]["pid"], st["worker"]["pid"])

        again = thaw(env, "up").stdout  # re-running is safe
        assert again.count("already running") == 4
        assert (tmp_path / "state" / "temporal.db").exists()  # persistent Temporal history

        (tmp_path / "img").mkdir()
        (tmp_path / "img" / "hello.txt").write_text("hello\n")
        built = json.loads(thaw(env, "build", "image", str(tmp_path / "img"), "--json").stdout)
        st = json.loads(thaw(env, "status", "--json").stdout)
        assert st["registry"]["images"] == 1 and st["store"]["objects"] == 2 and st["store"]["bytes"] > 0
        human = thaw(env, "status").stdout
        assert "running" in human and built["digest"][:16] in thaw(env, "images", "ls").stdout
    finally:
        down = thaw(env, "down", check=False)
    assert down.returncode == 0 and "temporal: stopped" in down.stdout
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    st = json.loads(thaw(env, "status", "--json").stdout)
    assert st["temporal"]["pid"] is None and not st["temporal"]["reachable"]


def test_up_refuses_a_port_taken_by_someone_else(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        env = {**os.environ, "THAW_STATE_DIR": str(tmp_path / "state"),
               "THAW_TEMPORAL_ADDRESS": f"127.0.0.1:{s.getsockname()[1]}", "THAW_TEMPORAL_UI_PORT": str(free_port())}
        res = thaw(env, "up", check=False)
    assert res.returncode == 1 and "already in use" in res.stderr
