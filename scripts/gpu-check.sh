#!/bin/bash
# The GPU checks, in one run on a GPU machine (driver >= 570, torch with CUDA, cuda-python, nvidia-ml-py),
# from the repository root, after scripts/gpu-carry.sh made .gpu/ here:
#   the real-driver tests (tests/test_cuda.py, gpu-marked: among them two image-rooted GPU replicas restored
#   side by side, with snapshot/nvidia.py's device nodes and driver layer, and the agent's HostSnapshots building,
#   storing, placing and restoring a GPU snapshot), a host-root CRIU replica, and
#   bench/gpu.py (P6) on the float16 MiniLM and on BERTs made there (SIZES, HIDDENxLAYERS each: default 2048x24,
#   1.3 B parameters), snapshotted without and with the weights parked in host memory (PARK) and restored with
#   and without huge pages (HUGE_PAGES; CRIU reading pages with its default threads). Output and logs go to $OUT
#   (default /tmp/gpu-out). TESTS=... runs other tests; SKIP_TESTS=1 or SKIP_BENCH=1 leaves out the tests or the
#   benchmark; TESTS_TIMEOUT and BENCH_TIMEOUT (seconds) bound them.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
repo=$PWD
# thaw importable without installing it (no registry there): a thaw package made of links into the checkout
# (pyproject's package-dir map), and the carried wheels of what its host code imports beyond what is there
py=/tmp/thaw-py
rm -rf $py && mkdir -p $py/thaw
for f in "$repo"/thaw/*.py; do ln -s "$f" $py/thaw/; done
for d in imagefs registry workflows activities runtime snapshot examples; do ln -s "$repo/$d" $py/thaw/$d; done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $py .gpu/wheels/*.whl
export PYTHONPATH=$py THAW_CRIU=$repo/.gpu/criu/criu
step() { echo; echo "### $* ($(date +%T))"; }

step facts
nvidia-smi --query-gpu=name,driver_version,memory.total,persistence_mode --format=csv
uname -r; python3 -V; nproc; free -g | head -2
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.is_available())"
$THAW_CRIU --version && $THAW_CRIU check

step namespaces and CUDA
for ns in "" "--net --uts --ipc" "--pid --fork" "--pid --fork --mount-proc"; do
  echo "unshare $ns: $(timeout 30 unshare $ns python3 -c 'from cuda.bindings import driver as cu
print(cu.cuInit(0)[0].name, cu.cuDeviceGetCount())' 2>&1 | tail -1)"
done

step real-driver tests
# step limits add up to under the device's 600 s per command: 150 + 90 + 330 + the facts, by default
[ -n "${SKIP_TESTS:-}" ] || timeout ${TESTS_TIMEOUT:-150} python3 -P -m pytest ${TESTS:-tests/test_cuda.py tests/test_criu.py::test_host_root_replica} --noconftest \
  -p no:cacheprovider -m "gpu or not gpu" -v -rs -s

[ -z "${SKIP_BENCH:-}" ] || exit 0

step host-to-device copy and memory settings
cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag
grep -E '^(thp_fault_alloc|thp_fault_fallback|compact_stall) ' /proc/vmstat

step P6 benchmark: restores with and without huge pages, alternating
IMAGES_IN=${IMAGES_IN:-/dev/shm/thaw-gpu-images}
models=()
for size in ${SIZES:-2048x24}; do
  model=/tmp/bert-$size
  timeout 90 python3 bench/gpu.py --make-model $model --from .gpu/minilm --hidden ${size%x*} --layers ${size#*x} &&
    models+=(--model-dir $model)
done
timeout ${BENCH_TIMEOUT:-330} python3 bench/gpu.py --model-dir .gpu/minilm "${models[@]}" --runs ${RUNS:-3} \
  --huge-pages ${HUGE_PAGES:-off,on} --park ${PARK:-off,on} --json "$OUT/p6.json" --images-in "$IMAGES_IN"
echo "bench exit $?"
grep -E '^(thp_fault_alloc|thp_fault_fallback|compact_stall) ' /proc/vmstat
rm -rf "$IMAGES_IN"
tar czf "$OUT/logs.tgz" --exclude '*.img' -C /tmp thaw-gpu-bench $(cd /tmp && ls -d pytest-of-* 2>/dev/null)
ls -la "$OUT"
sleep 1  # let tee write the last lines
