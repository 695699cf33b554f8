"""P6: a GPU model server's snapshot restore against its cold boot, each to the first correct answer.

The server is the example embedding server (examples/minilm/server.py) on CUDA, for each ``--model-dir``: the
real all-MiniLM-L6-v2 weights (``scripts/gpu-carry.sh`` makes a float16 copy small enough to carry to a GPU
machine) and, to measure bandwidth, larger BERT models made by ``--make-model`` (seeded random weights: same
code path, more device memory). Each runs in its own pid and network namespaces on the host's filesystem
(``launch(root=None)``), because the CUDA torch is the host's.

- cold boot: launch -> torch import, weights to the GPU, warm-up -> healthy -> golden request answered.
- snapshot: launch, golden answer A -> ``GpuCheckpointer.around_dump``: lock -> checkpoint (device memory to
  host) -> ``criu dump``.
- restore: ``criu restore`` -> CUDA restore -> unlock -> after-restore hook -> healthy -> golden request, whose
  answer must be byte-identical to A.

Both are measured on a warm host (libraries and images in the page cache), ``--runs`` times; the medians are
compared. Bandwidth = the GPU memory the server held (NVML, device-wide delta over its launch) divided by the
time of ``cuCheckpointProcessRestore``. The last line is the headline, for the model that held the most GPU
memory: ``P6 gpu restore speedup: <ratio>x bandwidth: <GB/s> GB/s``.

    python bench/gpu.py --model-dir DIR [--model-dir DIR2 ...] [--runs 3] [--json out.json]
    python bench/gpu.py --make-model OUT --from MINILM_DIR --hidden 2048 --layers 24

``--device cpu`` runs the same protocol without the CUDA steps (a check of the harness on a CPU host).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from thaw.snapshot import criu, cuda
from thaw.snapshot.host import golden_answer
from thaw.snapshot.replica import Replica, after_restore

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "examples" / "minilm" / "server.py"
GOLDEN = json.loads((REPO / "examples" / "minilm" / "golden.json").read_text())
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


# -- one model ------------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, model_dir: Path, label: str, work: Path, device: str, dtype: str, images_in: Path):
        self.model_dir, self.work, self.device, self.dtype = model_dir, work, device, dtype
        self.images = images_in / f"images-{label}"
        self.label = label
        self.argv = [sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", str(PORT), "--model-dir",
                     str(model_dir), "--device", device, "--dtype", dtype, "--model-name", self.label]
        # the whole environment: the host's CUDA libraries, thaw on PYTHONPATH for the server's SDK import
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.golden = {"path": "/embed", "method": "POST", "content_type": "application/json",
                       "body_b64": base64.b64encode(json.dumps({"texts": GOLDEN["texts"]}).encode()).decode()}
        self.ck = cuda.GpuCheckpointer(timeout_s=300) if device != "cpu" else None
        self.n = 0

    def _log(self, name: str) -> Path:
        self.n += 1
        return self.work / f"{self.label}-{self.n:02d}-{name}.log"

    def answer(self, r: Replica) -> bytes:
        return golden_answer(r, PORT, self.golden)

    def launch(self, name: str) -> tuple[Replica, float]:
        t0 = time.monotonic()
        r = criu.launch(None, self.argv, self.env, str(REPO), self._log(name))
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

    def snapshot(self, images: Path) -> dict:
        before = gpu_used_bytes()
        r, _ = self.launch("snapshot")
        try:
            golden = self.answer(r)
            after = gpu_used_bytes()
            gpu_bytes = after - before if before is not None and after is not None else None
            t0 = time.monotonic()
            if self.ck:
                pids = self.ck.gpu_pids(r.pid)
                if not pids:
                    raise RuntimeError(f"the server (pid {r.pid}) holds no CUDA context: is it on the GPU?")
                res = self.ck.around_dump(pids, lambda: criu.checkpoint(r, images))
                steps, cp = res.timings_ms, res.value
            else:
                pids, steps, cp = [], {}, criu.checkpoint(r, images)
            return {"golden": golden, "gpu_pids": len(pids), "gpu_bytes": gpu_bytes, "steps_ms": steps,
                    "snapshot_ms": ms_since(t0), "images_bytes": cp.size_bytes}
        finally:
            r.stop()

    def restore(self, images: Path, snap: dict) -> dict:
        t0 = time.monotonic()
        r = criu.restore(images, None, self._log("restore"))
        try:
            out = {"criu_ms": ms_since(t0)}
            if self.ck:
                out.update(self.ck.restore_tree(r.pid, expected=snap["gpu_pids"]))
            after_restore(r, PORT, {})
            r.wait_healthy(PORT, "/healthz", timeout=120)
            body = self.answer(r)
            out["total_ms"] = ms_since(t0)
            if body != snap["golden"]:
                raise RuntimeError(f"restored replica answered the golden request differently "
                                   f"({len(body)} vs {len(snap['golden'])} bytes; log {r.log_path})")
            return out
        finally:
            r.stop()

    def run(self, runs: int) -> dict:
        log(f"== {self.label}: {self.device} {self.dtype}, {runs} run(s) each")
        cold, cold_bodies = [], []
        for i in range(runs):
            ms, body = self.cold_boot()
            cold.append(ms)
            cold_bodies.append(body)
            log(f"  cold boot {i + 1}: {ms:8.0f} ms to the first answer")
        images = self.images
        shutil.rmtree(images, ignore_errors=True)
        snap = self.snapshot(images)
        gb = snap["gpu_bytes"]
        log(f"  snapshot: {snap['snapshot_ms']:.0f} ms {snap['steps_ms']}, images {snap['images_bytes'] / 1e9:.2f} GB"
            + (f", GPU memory {gb / 1e9:.2f} GB" if gb else ""))
        restores = []
        for i in range(runs):
            res = self.restore(images, snap)
            restores.append(res)
            log(f"  restore {i + 1}: {res['total_ms']:8.0f} ms to the same answer "
                f"(criu {res['criu_ms']:.0f} ms" + (f", cuda restore {res['cuda_restore']} ms, unlock "
                                                    f"{res['cuda_unlock']} ms" if 'cuda_restore' in res else "") + ")")
        shutil.rmtree(images, ignore_errors=True)
        cold_ms = statistics.median(cold)
        restore_ms = statistics.median(r["total_ms"] for r in restores)
        out = {"model": self.label, "device": self.device, "dtype": self.dtype, "runs": runs,
               "cold_ms": cold, "restores": restores, "cold_median_ms": cold_ms, "restore_median_ms": restore_ms,
               "speedup": cold_ms / restore_ms, "cold_same_answer": all(b == snap["golden"] for b in cold_bodies),
               **{k: v for k, v in snap.items() if k != "golden"}}
        if gb and restores and "cuda_restore" in restores[0]:
            cuda_ms = statistics.median(r["cuda_restore"] for r in restores)
            out["restore_gbps"] = gb / 1e9 / max(cuda_ms / 1000, 1e-3)
            out["checkpoint_gbps"] = gb / 1e9 / max(snap["steps_ms"].get("cuda_checkpoint", 0) / 1000, 1e-3)
        log(f"  {self.label}: cold {cold_ms:.0f} ms, restore {restore_ms:.0f} ms: {out['speedup']:.1f}x"
            + (f"; GPU memory restore {out['restore_gbps']:.1f} GB/s, checkpoint {out['checkpoint_gbps']:.1f} GB/s"
               if "restore_gbps" in out else ""))
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
    p.add_argument("--runs", type=int, default=3)
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
    if (why := criu.criu_check()) is not None:
        raise SystemExit(f"criu is not usable here: {why}")
    if a.device != "cpu":
        try:
            log(f"GPU: {cuda.gpu_facts(cuda.RealCudaDriver())}")
        except cuda.CudaUnavailable as e:
            raise SystemExit(f"no GPU for the P6 benchmark: {e} (--device cpu checks the harness)")
    a.work.mkdir(parents=True, exist_ok=True)
    results = []
    for d in a.model_dir:
        try:
            results.append(Bench(d.resolve(), d.name, a.work, a.device, a.dtype, a.images_in or a.work).run(a.runs))
        except Exception as e:  # noqa: BLE001 - the next model still runs; the error is printed
            log(f"  {d.name}: FAILED: {type(e).__name__}: {e}")
            continue
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))
    if not results:
        return 1
    log("\nmodel                      cold ms  restore ms  speedup  GPU GB  restore GB/s")
    for r in results:
        gb = r["gpu_bytes"] / 1e9 if r["gpu_bytes"] else 0
        log(f"{r['model']:<26} {r['cold_median_ms']:7.0f}  {r['restore_median_ms']:10.0f}  {r['speedup']:6.1f}x "
            f"{gb:7.2f}  {r.get('restore_gbps', 0):12.1f}")
    top = max(results, key=lambda r: r["gpu_bytes"] or 0)
    log(f"P6 gpu restore speedup: {top['speedup']:.1f}x bandwidth: {top.get('restore_gbps', 0):.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
