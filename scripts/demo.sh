#!/usr/bin/env bash
# The main job on the embedded default: start the stack, build the example model's image into the
# content-addressed store (twice, to show the second build stores nothing new), print what happened.
set -euo pipefail
cd "$(dirname "$0")/.."
export THAW_STATE_DIR=${THAW_STATE_DIR:-$PWD/.state}

thaw up
rootfs=$(python3 -m thaw.examples.minilm.recipe)
config="$(dirname "$rootfs")/image-config.json"
echo "example image root: $rootfs"

t0=$(date +%s.%N)
first=$(thaw build image "$rootfs" --config "$config" --json)
t1=$(date +%s.%N)
second=$(thaw build image "$rootfs" --config "$config" --json)
t2=$(date +%s.%N)

python3 - "$first" "$second" "$t0" "$t1" "$t2" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
t0, t1, t2 = map(float, sys.argv[3:])
assert a["digest"] == b["digest"]
print(f"image        {a['digest']}")
print(f"size         {a['size'] / 2**20:.1f} MiB in {a['files']} files, {a['chunks']} chunks")
print(f"first build  {t1 - t0:.1f} s  stored {a['new_chunks']} chunks / {a['new_bytes'] / 2**20:.1f} MiB  {a['timings_ms']}")
print(f"rebuild      {t2 - t1:.1f} s  stored {b['new_chunks']} chunks / {b['new_bytes']} bytes (dedup)")
print(f"Temporal UI  {a['ui']}")
PY
thaw images ls
thaw status
echo "stop the stack with: THAW_STATE_DIR=$THAW_STATE_DIR thaw down"
