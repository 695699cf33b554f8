"""P6: a GPU model server's snapshot restore against its cold boot, each to the first correct answer.

The server is the example embedding server (examples/minilm/server.py) on CUDA, for each ``--model-dir``: the
real all-MiniLM-L6-v2 weights (``scripts/gpu-carry.sh`` makes a float16 copy small enough to carry to a GPU
machine) and, to measure bandwidth, larger BERT models made by ``--make-model`` (seeded random weights: same
code path, more device memory). Each runs in its own pid and network namespaces on the host's filesystem
(``launch(root=None)``), because the CUDA torch is the host's.

- cold boot: launch -> torch import, weights to the GPU, warm-up -> healthy -> golden request answered.
- snapshot: launch, golden answer A -> before-snapshot hook -> ``GpuCheckpointer.around_dump``: lock ->
  checkpoint (device memory to host) -> ``criu dump``.
- restore: ``criu restore`` -> CUDA restore -> unlock -> after-restore hook -> healthy -> golden request, whose
  answer must be byte-identical to A.

``--park off,on`` compares, on one cold boot figure, snapshots of the server without and with its weights parked
in host memory by the hooks (``thaw_sdk.park_weights``: the driver then checkpoints and restores little device
memory, and the after-restore hook copies the weights back from page-locked host memory).

Both are measured on a warm host (libraries and images in the page cache: one unmeasured cold boot and one
unmeasured restore come first), ``--runs`` times; the medians are compared. A model that fails leaves no
headline (exit 1). With ``--huge-pages off,on`` each snapshot is restored both ways, alternating: CRIU writing
the memory back into 4 KiB pages or into transparent huge pages (``criu.restore(huge_pages=...)``, thaw's CRIU build);
``--read-threads 1,8`` compares the threads CRIU reads the pages with the same way (modes ``on/1``, ``on/8``).
Bandwidth = the GPU memory the server held (NVML, device-wide delta over its launch) divided by the time from
the start of ``cuCheckpointProcessRestore`` to the end of the after-restore hook (CUDA restore, unlock, and the
weights' copy back when parked); for scale, the host-to-device copy rate of this machine (torch, 2 GiB, from
pageable and from pinned memory) is printed first. The last line is the headline, for restores the way the last
``--huge-pages`` and ``--park`` entries say: the speedup of the first ``--model-dir`` (the example server's model;
the demo's) and the bandwidth of the model that held the most GPU memory (the driver's fixed cost of ~0.25 s
weighs least there):
``P6 gpu restore speedup: <ratio>x bandwidth: <GB/s> GB/s``.

    python bench/gpu.py --model-dir DIR [--model-dir DIR2 ...] [--runs 3] [--huge-pages off,on]
                        [--read-threads 1,8] [--park off,on] [--json out.json]
    python bench/gpu.py --make-model OUT --from MINILM_DIR --hidden 2048 --layers 24

``--device cpu`` runs the same protocol without the CUDA steps (a check of the harness on a CPU host).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from thaw.examples.minilm import recipe
from thaw.snapshot import criu, cuda
from thaw.snapshot.replica import Replica, after_restore, before_snapshot, golden_answer

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "examples" / "minilm" / "server.py"
PORT = 8080
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def log(msg: str) -> None:
    print(msg, flush=True)


def ms_since(t0: float) -> float:
    return (time.monotonic() - t0) * 1000


# -- GPU memory (NVML: no CUDA context in this process) ------------------------------------------------------------
def gpu_used_bytes() -> int | None:
    try:
        import pynvml
        pynvml.nvmlInit()
        return sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used
                   for i in range(pynvml.nvmlDeviceGetCount()))
    except Exception:  # noqa: BLE001 - no NVML: no bandwidth figure
        return None


def memory_kb(pid: int, keys: tuple[str, ...] = ("Anonymous", "AnonHugePages")) -> dict[str, int]:
    """Anonymous and AnonHugePages (kB, or other ``keys``) of a process, from /proc/PID/smaps_rollup."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in keys:
                out[key] = int(rest.split()[0])
    return out


COPY_PROBE = """
import json, sys, time, torch
n = 2 << 30
out = {}
for kind in ("pageable", "pinned"):
    src = torch.ones(n, dtype=torch.uint8, pin_memory=kind == "pinned")
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize(); t = time.perf_counter()
        dst = src.to("cuda", non_blocking=kind == "pinned"); torch.cuda.synchronize()
        best = max(best, n / (time.perf_counter() - t) / 1e9)
        del dst
    out[kind] = round(best, 1)
print(json.dumps(out))
"""


def copy_ceiling() -> dict | None:
    """Host-to-device copy rate (GB/s, best of 3 copies of 2 GiB) from pageable and from pinned memory."""
    try:
        res = subprocess.run([sys.executable, "-c", COPY_PROBE], capture_output=True, text=True, timeout=120)
        return json.loads(res.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - a figure for scale only
        log(f"host-to-device copy probe failed: {type(e).__name__}: {e}")
        return None


DRIVER_PROBE = """
import sys, torch
x = torch.full((4 << 30,), 7, dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.readline()
print("same" if bool((x == 7).all()) else "differs", flush=True)
"""


def driver_rate() -> None:
    """For scale: the driver alone checkpointing and restoring 4 GiB of device memory in place (no CRIU: its host
    copy never leaves the process), and whether that host copy is locked memory or in huge pages."""
    before = gpu_used_bytes()
    child = subprocess.Popen([sys.executable, "-c", DRIVER_PROBE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("the probe process did not start")
        after = gpu_used_bytes()
        gb = (after - before) / 1e9 if before is not None and after is not None else 4 * 2**30 / 1e9
        ck = cuda.GpuCheckpointer(cuda.RealCudaDriver(), timeout_s=120)
        t1 = ck.checkpoint(child.pid)
        kb = memory_kb(child.pid, ("Anonymous", "AnonHugePages", "Locked"))
        t2 = ck.restore(child.pid)
        child.stdin.write("go\n")
        child.stdin.flush()
        data = child.stdout.readline().strip()
        rate = {k: gb / max(t[k], 1) * 1000 for k, t in (("cuda_checkpoint", t1), ("cuda_restore", t2))}
        log(f"driver alone, in place (no CRIU), {gb:.2f} GB of GPU memory: checkpoint {rate['cuda_checkpoint']:.1f}"
            f" GB/s, restore {rate['cuda_restore']:.1f} GB/s ({t1} {t2}); its host copy, kB: {kb}; data after "
            f"restore: {data}")
    except Exception as e:  # noqa: BLE001 - a figure for scale only
        log(f"driver probe failed: {type(e).__name__}: {e}")
    finally:
        child.kill()
        child.wait()


# -- one model ------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, model_dir: Path, label: str, work: Path, device: str, dtype: str, images_in: Path,
                 read_threads: int | None = None):
        self.model_dir, self.work, self.device, self.dtype = model_dir, work, device, dtype
        self.read_threads = read_threads
        self.images = images_in / f"images-{label}"
        self.label = label
        self.argv = [sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", str(PORT), "--model-dir",
                     str(model_dir), "--device", device, "--dtype", dtype, "--model-name", self.label]
        # the whole environment: the host's CUDA libraries, thaw on PYTHONPATH for the server's SDK import
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.golden = recipe.golden_request()
        self.ck = cuda.GpuCheckpointer(timeout_s=300) if device != "cpu" else None
        self.n = 0

    def _log(self, name: str) -> Path:
        self.n += 1
        return self.work / f"{self.label}-{self.n:02d}-{name}.log"

    def answer(self, r: Replica) -> bytes:
        return golden_answer(r, PORT, self.golden)

    def launch(self, name: str, park: bool = True) -> tuple[Replica, float]:
        t0 = time.monotonic()
        argv = [*self.argv, "--park-weights" if park else "--no-park-weights"]
        r = criu.launch(None, argv, self.env, str(REPO), self._log(name))
        try:
            r.wait_ready(PORT, "/healthz", timeout=600)
        except BaseException:
            r.stop()
            raise
        return r, t0

    def cold_boot(self) -> tuple[float, bytes]:
        r, t0 = self.launch("cold")
        try:
            body = self.answer(r)
            return ms_since(t0), body
        finally:
            r.stop()

    def snapshot(self, images: Path, park: bool) -> dict:
        before = gpu_used_bytes()
        r, _ = self.launch("snapshot", park)
        try:
            golden = self.answer(r)
            mem = {"running": memory_kb(r.pid)}
            after = gpu_used_bytes()
            gpu_bytes = after - before if before is not None and after is not None else None
            t0 = time.monotonic()
            before_snapshot(r, PORT)
            hook_ms = round(ms_since(t0))
            if self.ck:
                pids = self.ck.gpu_pids(r.pid)
                if not pids:
                    raise RuntimeError(f"the server (pid {r.pid}) holds no CUDA context: is it on the GPU?")
                mem["checkpointed"] = {}

                def dump():  # the device memory is in the process's host memory now
                    mem["checkpointed"] = memory_kb(r.pid)
                    return criu.checkpoint(r, images)
                res = self.ck.around_dump(pids, dump)
                steps, cp = res.timings_ms, res.value
            else:
                pids, steps, cp = [], {}, criu.checkpoint(r, images)
            steps = {"before_snapshot": hook_ms, **steps}
            return {"golden": golden, "gpu_pids": len(pids), "gpu_bytes": gpu_bytes, "steps_ms": steps,
                    "snapshot_ms": ms_since(t0), "images_bytes": cp.size_bytes, "memory_kb": mem}
        finally:
            r.stop()

    def restore(self, images: Path, snap: dict, huge_pages: bool, read_threads: int | None) -> dict:
        t0 = time.monotonic()
        r = criu.restore(images, None, self._log("restore"), huge_pages=huge_pages, read_threads=read_threads)
        try:
            out = {"criu_ms": ms_since(t0), "memory_kb": memory_kb(r.pid)}
            if self.ck:
                out.update(self.ck.restore_tree(r.pid, expected=snap["gpu_pids"]))
            t1 = time.monotonic()
            after_restore(r, PORT, {})
            out["hooks"] = round(ms_since(t1))
            r.wait_healthy(PORT, "/healthz", timeout=120)
            body = self.answer(r)
            out["total_ms"] = ms_since(t0)
            if body != snap["golden"]:
                raise RuntimeError(f"restored replica answered the golden request differently "
                                   f"({len(body)} vs {len(snap['golden'])} bytes; log {r.log_path})")
            return out
        finally:
            r.stop()

    def run(self, runs: int, cold_runs: int, modes: list[str], parks: list[bool]) -> list[dict]:
        """Cold boots, then per ``parks`` entry a snapshot and its restores: one result each."""
        log(f"== {self.label}: {self.device} {self.dtype}, {cold_runs} cold boot(s), {runs} restore(s) per mode, "
            f"each side after one unmeasured run")
        self.cold_boot()  # warm-up: the page cache, the driver's first-use costs; as the restores get below
        cold, cold_bodies = [], []
        for i in range(cold_runs):
            ms, body = self.cold_boot()
            cold.append(ms)
            cold_bodies.append(body)
            log(f"  cold boot {i + 1}: {ms:8.0f} ms to the first answer")
        images = self.images
        out = []
        for park in parks:
            shutil.rmtree(images, ignore_errors=True)
            try:  # a failed run must not leave GBs of images in /dev/shm for the next model's
                out.append(self._measure(images, runs, modes, cold, cold_bodies, park))
            except Exception as e:  # noqa: BLE001 - the other park mode still runs; the error is printed
                log(f"  {self.label}, park {'on' if park else 'off'}: FAILED: {type(e).__name__}: {e}")
                out.append({"model": self.label, "park": park, "failed": f"{type(e).__name__}: {e}"})
            finally:
                shutil.rmtree(images, ignore_errors=True)
        return out

    def _measure(self, images: Path, runs: int, modes: list[str], cold: list[float], cold_bodies: list[bytes],
                 park: bool) -> dict:
        name = f"{self.label}, park {'on' if park else 'off'}"
        snap = self.snapshot(images, park)
        gb, mem = snap["gpu_bytes"], snap["memory_kb"]
        log(f"  {name}: snapshot {snap['snapshot_ms']:.0f} ms {snap['steps_ms']}, images "
            f"{snap['images_bytes'] / 1e9:.2f} GB" + (f", GPU memory {gb / 1e9:.2f} GB" if gb else "")
            + f"; host anonymous memory {mem['running'].get('Anonymous', 0) / 1e6:.2f} GB running"
            + (f", {mem['checkpointed'].get('Anonymous', 0) / 1e6:.2f} GB checkpointed" if mem.get("checkpointed")
               else ""))
        huge, _, threads = modes[-1].partition("/")
        self.restore(images, snap, huge == "on", int(threads) if threads else self.read_threads)  # warm-up
        restores: dict[str, list[dict]] = {m: [] for m in modes}
        for i in range(runs):
            for mode in modes:  # alternating, so both see the same host state
                huge, _, threads = mode.partition("/")  # "on", "off", or with CRIU's read threads: "on/8"
                res = self.restore(images, snap, huge == "on", int(threads) if threads else self.read_threads)
                restores[mode].append(res)
                log(f"  restore {i + 1} huge pages {mode:>4}: {res['total_ms']:6.0f} ms to the same answer "
                    f"(criu {res['criu_ms']:.0f} ms"
                    + (f", cuda restore {res['cuda_restore']} ms, unlock {res['cuda_unlock']} ms"
                       if "cuda_restore" in res else "")
                    + f", after-restore hook {res['hooks']} ms"
                    + f"; {res['memory_kb'].get('AnonHugePages', 0) / 1e6:.2f} of "
                      f"{res['memory_kb'].get('Anonymous', 0) / 1e6:.2f} GB anonymous in huge pages)")
        cold_ms = statistics.median(cold)
        same = all(b == snap["golden"] for b in cold_bodies)
        log(f"  cold boots answered the golden request as the snapshot did: {'yes' if same else 'NO'}")
        out = {"model": self.label, "park": park, "device": self.device, "dtype": self.dtype, "runs": runs,
               "cold_ms": cold, "cold_median_ms": cold_ms, "cold_same_answer": same,
               "modes": {}, **{k: v for k, v in snap.items() if k != "golden"}}
        for mode, rs in restores.items():
            m = {"restores": rs, "restore_median_ms": statistics.median(r["total_ms"] for r in rs)}
            m["speedup"] = cold_ms / m["restore_median_ms"]
            if gb and "cuda_restore" in rs[0]:  # CUDA restore start -> the after-restore hook's end
                gpu_ms = statistics.median(r["cuda_restore"] + r["cuda_unlock"] + r["hooks"] for r in rs)
                m["restore_gbps"] = gb / 1e9 / max(gpu_ms / 1000, 1e-3)
            out["modes"][mode] = m
            log(f"  {name}, huge pages {mode}: cold {cold_ms:.0f} ms, restore {m['restore_median_ms']:.0f} ms: "
                f"{m['speedup']:.1f}x" + (f"; GPU memory restore {m['restore_gbps']:.1f} GB/s" if "restore_gbps" in m
                                          else ""))
        if gb and "cuda_checkpoint" in snap["steps_ms"]:
            st = snap["steps_ms"]
            out["checkpoint_gbps"] = gb / 1e9 / max((st["cuda_checkpoint"] + st["before_snapshot"]) / 1000, 1e-3)
            log(f"  GPU memory checkpoint {out['checkpoint_gbps']:.1f} GB/s (before-snapshot hook + CUDA checkpoint)")
        # the headline mode's figures at the top level
        out.update({k: v for k, v in out["modes"][modes[-1]].items() if k != "restores"})
        return out


# -- a larger model for the bandwidth figure ------------------------------------------------------------------------
def make_model(out: Path, tokenizer_from: Path, hidden: int, layers: int, dtype: str) -> None:
    """A BERT of the given width and depth with seeded random weights, saved like a real one (config +
    safetensors + all-MiniLM-L6-v2's tokenizer), so the example server loads it unchanged."""
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                        intermediate_size=4 * hidden, vocab_size=30522)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = BertModel(config).to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy2(tokenizer_from / name, out / name)
    n = sum(p.numel() for p in model.parameters())
    log(f"made {out}: {n / 1e9:.2f} B parameters, {n * model.dtype.itemsize / 1e9:.2f} GB ({dtype})")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, action="append", default=[])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--runs", type=int, default=3, help="restores per huge-pages mode (and cold boots)")
    p.add_argument("--cold-runs", type=int, help="cold boots (default: --runs)")
    p.add_argument("--huge-pages", default="on", help="restore modes to compare, alternating: off, on or off,on")
    p.add_argument("--park", default="on", help="snapshots with the weights parked in host memory by the server's "
                                                "hooks: off, on or off,on (one snapshot each)")
    p.add_argument("--read-threads", help=f"threads CRIU reads pages with (default {criu.DEFAULT_READ_THREADS}); "
                                          "several, comma-separated, are compared like --huge-pages modes")
    p.add_argument("--work", type=Path, default=Path("/tmp/thaw-gpu-bench"))
    p.add_argument("--json", type=Path)
    p.add_argument("--images-in", type=Path, help="where the CRIU images go (default: --work)")
    p.add_argument("--make-model", type=Path, metavar="OUT")
    p.add_argument("--from", dest="tokenizer_from", type=Path)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24)
    a = p.parse_args()
    if a.make_model:
        make_model(a.make_model, a.tokenizer_from, a.hidden, a.layers, a.dtype)
        return 0
    if not a.model_dir:
        p.error("give --model-dir (or --make-model)")
    modes = a.huge_pages.split(",")
    if not modes or set(modes) - {"on", "off"}:
        p.error("--huge-pages: off, on or off,on")
    parks = a.park.split(",")
    if not parks or set(parks) - {"on", "off"}:
        p.error("--park: off, on or off,on")
    parks = [x == "on" for x in parks]
    try:
        threads = [int(t) for t in (a.read_threads or "").split(",") if t.strip()]
    except ValueError:
        p.error("--read-threads: a number, or several comma-separated")
    if len(threads) > 1:  # compare them too: modes "off/1", "on/8", ...
        modes = [f"{m}/{t}" for m in modes for t in threads]
    if (why := criu.criu_check()) is not None:
        raise SystemExit(f"criu is not usable here: {why}")
    if a.device != "cpu":
        try:
            log(f"GPU: {cuda.gpu_facts(cuda.RealCudaDriver())}")
        except cuda.CudaUnavailable as e:
            raise SystemExit(f"no GPU for the P6 benchmark: {e} (--device cpu checks the harness)")
        if ceiling := copy_ceiling():
            log(f"host-to-device copy (torch, 2 GiB): pageable {ceiling['pageable']} GB/s, "
                f"pinned {ceiling['pinned']} GB/s")
        driver_rate()
    a.work.mkdir(parents=True, exist_ok=True)
    log(f"CRIU reads pages with {','.join(map(str, threads)) or criu.DEFAULT_READ_THREADS} thread(s)")
    read_threads = threads[0] if len(threads) == 1 else None
    results, failed = [], []
    for d in a.model_dir:
        try:
            done = Bench(d.resolve(), d.name, a.work, a.device, a.dtype, a.images_in or a.work,
                         read_threads).run(a.runs, a.cold_runs or a.runs, modes, parks)
        except Exception as e:  # noqa: BLE001 - the next model still runs; the error is printed
            log(f"  {d.name}: FAILED: {type(e).__name__}: {e}")
            failed.append(d.name)
            continue
        results += [r for r in done if "failed" not in r]
        failed += [f"{r['model']} (park {'on' if r['park'] else 'off'})" for r in done if "failed" in r]
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))
    if not results:
        return 1
    log("\nmodel                park  huge pages  cold ms  restore ms  speedup  GPU GB  restore GB/s")
    for r in results:
        gb = r["gpu_bytes"] / 1e9 if r["gpu_bytes"] else 0
        for mode, m in r["modes"].items():
            log(f"{r['model']:<20} {'on' if r['park'] else 'off':>4}  {mode:>10}  {r['cold_median_ms']:7.0f}  "
                f"{m['restore_median_ms']:10.0f}  {m['speedup']:6.1f}x {gb:7.2f}  {m.get('restore_gbps', 0):12.1f}")
    if failed:  # the headline names the first model as the example's speedup: not with one missing
        log(f"no headline: {', '.join(failed)} failed")
        return 1
    head = [r for r in results if r["park"] == parks[-1]]
    example, big = head[0], max(head, key=lambda r: r["gpu_bytes"] or 0)
    log(f"headline, huge pages {modes[-1]}, park {'on' if parks[-1] else 'off'}: speedup of {example['model']} "
        f"(the first --model-dir: the example), bandwidth of {big['model']} (the most GPU memory)")
    log(f"P6 gpu restore speedup: {example['speedup']:.1f}x bandwidth: {big.get('restore_gbps', 0):.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
