#!/usr/bin/env bash
# CRIU 4.2.1 for thaw: the pristine upstream tarball in shared/vendor (checksum-verified) plus thaw's patches in
# infra/criu/ (CRIU_RESTORE_THP and CRIU_RESTORE_THREADS, see snapshot/criu.py), installed as PREFIX/sbin/criu.
# Debian's criu packages fail on recent kernels, so it is always built. ~45 s on 2 cores.
# Usage: install-criu.sh [PREFIX]   (default /usr/local)
set -euo pipefail
prefix=${1:-/usr/local}
repo=$(cd "$(dirname "$0")/.." && pwd)
shared=${THAW_SHARED_DIR:-$(cd "$repo/.." && pwd)/shared}
tarball=$shared/vendor/criu_4.2.1.orig.tar.xz
echo "29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9  $tarball" | sha256sum -c --quiet
export DEBIAN_FRONTEND=noninteractive
deps=(build-essential pkg-config python3 libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
      libnl-3-dev libnet1-dev libcap-dev libnftables-dev libbsd-dev uuid-dev libgnutls28-dev iptables iproute2)
missing=()
for p in "${deps[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xJf "$tarball" -C "$work"
for patch in "$repo"/infra/criu/*.patch; do patch -s -p1 -d "$work/criu-4.2.1" < "$patch"; done
make -C "$work/criu-4.2.1" -j"$(nproc)" criu >"$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
install -m 0755 "$work/criu-4.2.1/criu/criu" "$prefix/sbin/criu"
"$prefix/sbin/criu" check
