"""A small real image for snapshot tests: Debian's python3.11 with its stdlib and shared libraries (~45 MB),
plus an app directory. Copied from this host's Debian packages (python3.11-minimal, libpython3.11-stdlib)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

PYTHON = Path("/usr/bin/python3.11")
STDLIB = Path("/usr/lib/python3.11")
SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "__pycache__", "site-packages",
        "dist-packages", "config-3.11-x86_64-linux-gnu", "pydoc_data"}


def _libs(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    return [Path(p) for p in re.findall(r"(/\S+) \(0x", out)]


def python_rootfs(dest: Path, app: dict[str, str]) -> Path:
    """Write the root filesystem to ``dest`` (must not exist); ``app`` maps /app file paths to contents."""
    dest.mkdir(parents=True)
    for sub in ("usr/bin", "tmp", "proc", "sys", "dev", "etc", "app"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(PYTHON, dest / "usr/bin/python3.11")
    os.symlink("python3.11", dest / "usr/bin/python3")
    libs = set(_libs(PYTHON))
    for so in (STDLIB / "lib-dynload").glob("*.so"):
        libs.update(_libs(so))
    for lib in libs:
        target = dest / lib.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), target)
    for src in ("lib", "lib64", "bin"):  # merged-/usr symlinks, as on Debian
        if Path("/" + src).is_symlink() and not (dest / src).exists():
            os.symlink(os.readlink("/" + src), dest / src)
    shutil.copytree(STDLIB, dest / STDLIB.relative_to("/"), symlinks=True,
                    ignore=lambda d, names: [n for n in names if n in SKIP])
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    for name, text in app.items():
        (dest / "app" / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / "app" / name).write_text(text)
    return dest
