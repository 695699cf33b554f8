#!/bin/sh
# Copy this host's criu and the shared libraries it needs into DEST (default .gpu/criu), with an RPATH of
# $ORIGIN/lib, so it runs on another x86-64 Linux without installing anything (e.g. a lent GPU machine:
# THAW_CRIU=DEST/criu). glibc itself is not copied: the target's (same or newer) is used.
set -eu
dest=${1:-.gpu/criu}
src=$(command -v criu || echo /usr/local/sbin/criu)
command -v patchelf >/dev/null || { echo "bundle-criu: needs patchelf (apt-get install -y patchelf)" >&2; exit 1; }
rm -rf "$dest" && mkdir -p "$dest/lib"
cp "$src" "$dest/criu"
ldd "$src" | awk '/=> \//{print $3}' | while read -r lib; do
  case $(basename "$lib") in libc.so.*|ld-linux*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*) continue;; esac
  cp -L "$lib" "$dest/lib/"
done
strip --strip-unneeded "$dest/criu" "$dest"/lib/*.so* 2>/dev/null || true
# DT_RPATH (not RUNPATH) also applies to the libraries' own dependencies
patchelf --force-rpath --set-rpath '$ORIGIN/lib' "$dest/criu"
"$dest/criu" --version >/dev/null
du -sh "$dest"
