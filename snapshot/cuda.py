"""GPU snapshots: move a model server's CUDA state to host memory around the CRIU dump, and back after restore.

The CUDA driver (>= 570, CUDA 12.8) checkpoints *another* process by its (host-visible) pid:

    snapshot:  RUNNING --lock--> LOCKED --checkpoint--> CHECKPOINTED  (device memory now in host memory)
               --> criu dump  (the process no longer refers to the GPU, so CRIU can dump it)
    restore:   criu restore --> CHECKPOINTED --restore--> LOCKED --unlock--> RUNNING --> health --> golden replay

The boundary to cuda-python is ``CudaDriver`` (``RealCudaDriver`` calls ``cuda.bindings.driver``, imported lazily).
Every driver call runs on a worker thread with a timeout, so a hung driver is an error in bounded time, never a
hang; every failure is a ``CudaError`` naming the call, the pid and the CUDA error name. ``GpuCheckpointer``
checks the process state before and after every step; a checkpoint that fails half-way is rolled back (restore +
unlock, or unlock) so the process runs again, and the error is raised, so nothing half-done is ever dumped,
stored or registered. ``gpu_facts()`` describes the host's GPUs for the compatibility key (``compat.py``).
See docs/gpu.md for the limits (MPS, CUDA IPC, UVM, multi-GPU, NCCL/P2P).
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

RUNNING, LOCKED, CHECKPOINTED, FAILED = "RUNNING", "LOCKED", "CHECKPOINTED", "FAILED"
MIN_CUDA = 12080  # cuDriverGetVersion of the first driver (570) with the checkpoint API
# get_state answers for a process that never initialised CUDA (no context to checkpoint).
NO_CUDA_ERRORS = {"CUDA_ERROR_NOT_INITIALIZED", "CUDA_ERROR_INVALID_VALUE", "CUDA_ERROR_NOT_FOUND"}
UNSUPPORTED_ERRORS = {"CUDA_ERROR_NOT_SUPPORTED"}  # what the process does cannot be checkpointed (CudaUnsupported)
UNNAMED_ERROR = "UNNAMED_ERROR"  # get_state's error that cuda-python 12.8.0 turned into a ValueError
NVIDIA_PROC = Path("/proc/driver/nvidia")


class CudaError(RuntimeError):
    """A CUDA checkpoint step failed; the message names the call, the pid and the CUDA error (one line)."""

    def __init__(self, message: str, *, call: str = "", pid: int | None = None, code: str | None = None,
                 timed_out: bool = False):
        super().__init__(message)
        self.call, self.pid, self.code, self.timed_out = call, pid, code, timed_out

    def append(self, detail: str) -> None:
        """Add what happened next (e.g. the rollback) to the one-line message."""
        self.args = (f"{self.args[0]}; {detail}",)


class CudaStateError(CudaError):
    """The process is not in the state the next step needs (e.g. a checkpoint of a process already LOCKED)."""

    state: str | None = None  # the state it was in


class CudaUnavailable(CudaError):
    """No usable CUDA checkpoint support here: cuda-python, the NVIDIA driver, a GPU or driver >= 570 is missing."""


class CudaUnsupported(CudaError):
    """What the process does cannot be checkpointed (the driver says CUDA_ERROR_NOT_SUPPORTED: MPS, CUDA IPC,
    managed memory; or more GPUs than one): every retry would fail the same way, after another cold boot."""


# -- the cuda-python boundary ------------------------------------------------------------------------------------
class CudaDriver(Protocol):
    """What thaw needs from the CUDA driver. States are the CUprocessState names without the prefix
    (RUNNING, LOCKED, CHECKPOINTED, FAILED, ...). Every call raises CudaError; ``timeout_s`` bounds it."""

    def lock(self, pid: int, timeout_s: float) -> None: ...
    def checkpoint(self, pid: int, timeout_s: float) -> None: ...
    def restore(self, pid: int, timeout_s: float, gpu_pairs: Sequence[tuple[str, str]] | None = None) -> None: ...
    def unlock(self, pid: int, timeout_s: float) -> None: ...
    def get_state(self, pid: int, timeout_s: float) -> str: ...
    def restore_thread_id(self, pid: int, timeout_s: float) -> int: ...
    def driver_version(self) -> int: ...          # cuDriverGetVersion, e.g. 12080
    def devices(self) -> list[dict]: ...          # [{"name": ..., "uuid": "GPU-..."}] in CUDA ordinal order


def call_with_timeout(what: str, fn: Callable[[], Any], timeout_s: float) -> Any:
    """Run ``fn`` on a daemon thread; CudaError(timed_out) if it has not returned after ``timeout_s``.

    A driver call can't be cancelled: a timed-out call keeps its thread until the driver returns. The process it
    was acting on is then in an unknown state; callers roll back what they can and report the state."""
    box: dict[str, Any] = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name=f"thaw-cuda-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise CudaError(f"{what} timed out after {timeout_s:g} s", call=what.split()[0].split("(")[0],
                        timed_out=True)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _uuid_str(raw: bytes) -> str:
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _uuid_bytes(uuid: str) -> bytes:
    try:
        raw = bytes.fromhex(uuid.removeprefix("GPU-").replace("-", ""))
    except ValueError:
        raw = b""
    if len(raw) != 16:
        raise CudaError(f"not a GPU UUID: {uuid!r} (MIG instances cannot be checkpointed)", code="BAD_UUID")
    return raw


class RealCudaDriver:
    """``CudaDriver`` on cuda-python's ``cuda.bindings.driver`` (or any module with the same functions: ``cu``).

    Construction imports the bindings, calls ``cuInit(0)`` in this process (the driver's checkpoint calls need it;
    restore needs it or persistence mode) and checks the driver version; CudaUnavailable says what is missing."""

    def __init__(self, cu: Any = None, init_timeout_s: float = 30.0, lock_grace_s: float = 5.0):
        self.lock_grace_s = lock_grace_s  # the driver's own lock timeout fires first (cleaner: leaves RUNNING)
        if cu is None:
            try:
                from cuda.bindings import driver as cu  # type: ignore[no-redef]
            except ImportError as e:
                raise CudaUnavailable(f"cuda-python is not installed ({e}): GPU snapshots need "
                                      f"`pip install cuda-python` (thaw's `gpu` extra)") from None
        missing = [n for n in ("cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
                               "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock",
                               "cuCheckpointProcessGetState", "CUcheckpointLockArgs") if not hasattr(cu, n)]
        if missing:
            raise CudaUnavailable(f"this cuda-python lacks the checkpoint API ({', '.join(missing)}): "
                                  f"install cuda-python >= 12.8")
        self.cu = cu
        try:
            self._call("cuInit", None, init_timeout_s, lambda: cu.cuInit(0))
        except CudaError as e:
            raise CudaUnavailable(f"no usable NVIDIA GPU: {e}") from None
        except Exception as e:  # noqa: BLE001 - cuda-python raises (RuntimeError) when libcuda.so is missing
            raise CudaUnavailable(f"no NVIDIA driver on this host (libcuda not loadable: {e})") from None
        version = self.driver_version()
        if version < MIN_CUDA:
            raise CudaUnavailable(f"the NVIDIA driver supports CUDA {cuda_version_str(version)}; GPU checkpoints need "
                                  f"driver >= 570 (CUDA {cuda_version_str(MIN_CUDA)})")

    # -- plumbing ------------------------------------------------------------------------------------------------
    def error_name(self, err: Any) -> str:
        try:
            res, name = self.cu.cuGetErrorName(err)
            if int(res) == 0 and name:
                return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001 - the enum's own name is good enough
            pass
        return getattr(err, "name", None) or f"CUresult {int(err)}"

    def _call(self, name: str, pid: int | None, timeout_s: float, fn: Callable[[], Any]) -> Any:
        """One driver call: timeout, then (CUresult, value...) -> value or CudaError with the error name."""
        what = f"{name}(pid {pid})" if pid is not None else name
        try:
            res = call_with_timeout(what, fn, timeout_s)
        except CudaError as e:
            if e.timed_out and pid is not None:
                e.args = (f"{name} timed out after {timeout_s:g} s for pid {pid}",)
            e.call, e.pid = name, pid
            raise
        res = res if isinstance(res, tuple) else (res,)
        err = res[0]
        if int(err) != 0:
            code = self.error_name(err)
            raise (CudaUnsupported if code in UNSUPPORTED_ERRORS else CudaError)(f"{what}: {code}", call=name,
                                                                                 pid=pid, code=code)
        return res[1] if len(res) == 2 else res[1:] or None

    # -- CudaDriver ----------------------------------------------------------------------------------------------
    def lock(self, pid: int, timeout_s: float) -> None:
        args = self.cu.CUcheckpointLockArgs()
        args.timeoutMs = max(1, int(timeout_s * 1000))  # the driver's own timeout leaves the process RUNNING
        self._call("cuCheckpointProcessLock", pid, timeout_s + self.lock_grace_s,
                   lambda: self.cu.cuCheckpointProcessLock(pid, args))

    def checkpoint(self, pid: int, timeout_s: float) -> None:
        self._call("cuCheckpointProcessCheckpoint", pid, timeout_s,
                   lambda: self.cu.cuCheckpointProcessCheckpoint(pid, None))

    def restore(self, pid: int, timeout_s: float, gpu_pairs: Sequence[tuple[str, str]] | None = None) -> None:
        args, keep = None, []
        if gpu_pairs:  # migration onto other GPUs of the same chip (driver >= 580): every checkpointed GPU
            cu = self.cu
            lacks = [n for n in ("CUcheckpointGpuPair", "CUcheckpointRestoreArgs") if not hasattr(cu, n)]
            if lacks:  # (cuda-bindings 13.3.0 left out CUcheckpointRestoreArgs; 13.3.1 has it again)
                raise CudaUnavailable(f"this cuda-python can't remap GPUs on restore (no {', '.join(lacks)})")
            pairs = []
            for old, new in gpu_pairs:
                pair = cu.CUcheckpointGpuPair()
                for attr, uuid in (("oldUuid", old), ("newUuid", new)):
                    buf = ctypes.create_string_buffer(_uuid_bytes(uuid), 16)
                    keep.append(buf)  # CUuuid points into it: alive until the call returns
                    setattr(pair, attr, cu.CUuuid(ctypes.addressof(buf)))
                pairs.append(pair)
            args = cu.CUcheckpointRestoreArgs()
            args.gpuPairs = pairs
            args.gpuPairsCount = len(pairs)
        self._call("cuCheckpointProcessRestore", pid, timeout_s,
                   lambda: self.cu.cuCheckpointProcessRestore(pid, args))

    def unlock(self, pid: int, timeout_s: float) -> None:
        self._call("cuCheckpointProcessUnlock", pid, timeout_s,
                   lambda: self.cu.cuCheckpointProcessUnlock(pid, None))

    def get_state(self, pid: int, timeout_s: float) -> str:
        try:
            state = self._call("cuCheckpointProcessGetState", pid, timeout_s,
                               lambda: self.cu.cuCheckpointProcessGetState(pid))
        except ValueError as e:  # cuda-python 12.8.0 (NVIDIA/cuda-python#561): the driver's error (which one is
            # lost: a pid without CUDA, or one that cannot be checkpointed) came back as a state no CUprocessState has
            raise CudaError(f"cuCheckpointProcessGetState(pid {pid}): an error cuda-python could not name ({e})",
                            call="cuCheckpointProcessGetState", pid=pid, code=UNNAMED_ERROR) from None
        name = getattr(state, "name", None) or str(state)
        return name.removeprefix("CU_PROCESS_STATE_")

    def restore_thread_id(self, pid: int, timeout_s: float) -> int:
        return int(self._call("cuCheckpointProcessGetRestoreThreadId", pid, timeout_s,
                              lambda: self.cu.cuCheckpointProcessGetRestoreThreadId(pid)))

    def driver_version(self) -> int:
        return int(self._call("cuDriverGetVersion", None, 10.0, self.cu.cuDriverGetVersion))

    def devices(self) -> list[dict]:
        cu, out = self.cu, []
        for i in range(int(self._call("cuDeviceGetCount", None, 10.0, cu.cuDeviceGetCount))):
            dev = self._call("cuDeviceGet", None, 10.0, lambda i=i: cu.cuDeviceGet(i))
            name = self._call("cuDeviceGetName", None, 10.0, lambda dev=dev: cu.cuDeviceGetName(256, dev))
            name = (name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)).strip()
            uuid = self._call("cuDeviceGetUuid", None, 10.0, lambda dev=dev: cu.cuDeviceGetUuid(dev))
            out.append({"name": name, "uuid": _uuid_str(bytes(getattr(uuid, "bytes", uuid))[:16])})
        return out


# -- processes ---------------------------------------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (host pids), parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split() if int(c) not in out]
            except OSError:
                pass
    return out


NVIDIA_DEV = re.compile(r"^/dev/nvidia(\d+|ctl|-uvm|-uvm-tools|-caps.*|-modeset)?$")


def nvidia_files(pid: int) -> list[str]:
    """The /dev/nvidia* files ``pid`` holds open or mapped (sorted, unique): a cheap "does it use the GPU?" that
    needs no driver. Paths are as the process sees them (inside its mount namespace)."""
    found = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = []
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if NVIDIA_DEV.match(target):
            found.add(target)
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and NVIDIA_DEV.match(parts[5].strip()):
                    found.add(parts[5].strip())
    except OSError:
        pass
    return sorted(found)


def gpus_in_use(files: Iterable[str]) -> list[str]:
    """The numbered GPU device nodes among ``nvidia_files`` (``/dev/nvidia0``, ...)."""
    return sorted(f for f in files if re.fullmatch(r"/dev/nvidia\d+", f))


def tree_uses_nvidia(root_pid: int) -> list[int]:
    """Pids in ``root_pid``'s tree that hold /dev/nvidia* files (no driver needed: fine on CPU hosts)."""
    return [p for p in process_tree(root_pid) if nvidia_files(p)]


# -- the checkpoint protocol -------------------------------------------------------------------------------------
@dataclass
class GpuDump:
    """What ``around_dump`` did: dump_fn's value, the CUDA pids, per-step ms (summed over pids)."""
    value: Any
    pids: list[int]
    timings_ms: dict[str, int] = field(default_factory=dict)


class GpuCheckpointer:
    """Lock/checkpoint/restore/unlock with a state check before and after every step.

    ``timeout_s`` bounds checkpoint and restore (device memory <-> host: seconds per GB), ``lock_timeout_s`` the
    lock (it waits for already-submitted GPU work), ``state_timeout_s`` each state query and rollback step."""

    def __init__(self, driver: CudaDriver | None = None, *, timeout_s: float = 120.0, lock_timeout_s: float = 30.0,
                 state_timeout_s: float = 5.0, max_gpus: int = 1):
        self.driver = driver if driver is not None else RealCudaDriver()
        self.timeout_s, self.lock_timeout_s, self.state_timeout_s = timeout_s, lock_timeout_s, state_timeout_s
        self.max_gpus = max_gpus

    # -- queries -------------------------------------------------------------------------------------------------
    def state(self, pid: int) -> str:
        return self.driver.get_state(pid, self.state_timeout_s)

    def uses_gpu(self, pid: int) -> bool:
        """Does ``pid`` have a CUDA context? False for a process that never initialised CUDA (or is gone);
        other driver errors (e.g. CUDA_ERROR_NOT_SUPPORTED) are raised: they would make its snapshot fail."""
        try:
            self.state(pid)
            return True
        except CudaError as e:
            if e.code in NO_CUDA_ERRORS or not os.path.exists(f"/proc/{pid}"):
                return False
            raise

    def gpu_pids(self, root_pid: int) -> list[int]:
        """The CUDA processes in ``root_pid``'s tree (only those holding /dev/nvidia* files are asked)."""
        return [p for p in tree_uses_nvidia(root_pid) if self.uses_gpu(p)]

    def _require(self, pid: int, expected: str, before: str, hint: str = "") -> None:
        state = self.state(pid)
        if state != expected:
            e = CudaStateError(f"pid {pid} is {state}, not {expected}: refusing {before}{hint}", call=before, pid=pid)
            e.state = state
            raise e

    @staticmethod
    def _timed(timings: dict[str, int], key: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            timings[key] = timings.get(key, 0) + int((time.monotonic() - t0) * 1000)

    # -- checkpoint ----------------------------------------------------------------------------------------------
    def checkpoint(self, pid: int, timeout_s: float | None = None) -> dict[str, int]:
        """RUNNING -> lock -> LOCKED -> checkpoint -> CHECKPOINTED. Returns ms per step. On any failure the
        process is put back RUNNING where the driver allows (the error says what became of it) and CudaError
        is raised: the caller must not dump or store anything."""
        timeout_s = timeout_s or self.timeout_s
        t: dict[str, int] = {}
        self._require(pid, RUNNING, "cuCheckpointProcessLock")
        gpus = gpus_in_use(nvidia_files(pid))
        if len(gpus) > self.max_gpus:
            raise CudaUnsupported(f"pid {pid} uses {len(gpus)} GPUs ({', '.join(gpus)}): snapshots of more than "
                            f"{self.max_gpus} GPU per process are not supported in this version", pid=pid,
                            code="MULTI_GPU")
        try:
            self._timed(t, "cuda_lock", lambda: self.driver.lock(pid, min(self.lock_timeout_s, timeout_s)))
            self._require(pid, LOCKED, "cuCheckpointProcessCheckpoint")
            self._timed(t, "cuda_checkpoint", lambda: self.driver.checkpoint(pid, timeout_s))
            self._require(pid, CHECKPOINTED, "criu dump")
        except BaseException as e:
            outcome = self._roll_back(pid, in_flight=isinstance(e, CudaError) and e.timed_out)
            if isinstance(e, CudaError):
                e.append(outcome)
            else:
                e.add_note(outcome)
            raise
        return t

    def _roll_back(self, pid: int, in_flight: bool = False) -> str:
        """Best effort back to RUNNING after a failed checkpoint; returns what happened, in words. After a timeout
        the driver call is still running (it can't be cancelled): nothing is attempted, the process must go."""
        try:
            state = self.state(pid)
            if in_flight:
                return f"pid {pid} is {state} and the timed-out call is still in the driver: stop it"
            if state == CHECKPOINTED:
                self.driver.restore(pid, self.timeout_s)
                state = self.state(pid)
            if state == LOCKED:
                self.driver.unlock(pid, self.state_timeout_s)
                state = self.state(pid)
        except CudaError as e:
            return f"rollback failed, pid {pid} is in an unknown CUDA state ({e}): stop it"
        if state == RUNNING:
            return f"rolled back: pid {pid} is RUNNING again"
        return f"rollback impossible: pid {pid} is {state}: stop it"

    # -- restore -------------------------------------------------------------------------------------------------
    def restore(self, pid: int, timeout_s: float | None = None,
                gpu_pairs: Sequence[tuple[str, str]] | None = None) -> dict[str, int]:
        """CHECKPOINTED -> restore -> LOCKED -> unlock -> RUNNING (call it after ``criu restore``; then health and
        golden replay). ``gpu_pairs`` (old UUID, new UUID) remaps the GPUs when restoring on another host.
        Returns ms per step; raises CudaError naming the step and the state the process is left in."""
        timeout_s = timeout_s or self.timeout_s
        t: dict[str, int] = {}
        self._require(pid, CHECKPOINTED, "cuCheckpointProcessRestore",
                      hint=" (a RUNNING process after criu restore means CRIU's cuda_plugin restored it: "
                           "thaw drives the driver itself, remove the plugin)")
        try:
            self._timed(t, "cuda_restore", lambda: self.driver.restore(pid, timeout_s, gpu_pairs))
            self._require(pid, LOCKED, "cuCheckpointProcessUnlock")
            self._timed(t, "cuda_unlock", lambda: self.driver.unlock(pid, self.state_timeout_s))
            self._require(pid, RUNNING, "the health check")
        except CudaError as e:
            try:
                e.append(f"pid {pid} is now {self.state(pid)}")
            except CudaError as e2:
                e.append(f"pid {pid} state unknown ({e2})")
            raise
        return t

    def checkpointed_pids(self, root_pid: int) -> list[int]:
        """The CHECKPOINTED processes in ``root_pid``'s tree (after ``criu restore``; they hold no /dev/nvidia*
        files then, so every process is asked)."""
        out = []
        for p in process_tree(root_pid):
            try:
                if self.state(p) == CHECKPOINTED:
                    out.append(p)
            except CudaError as e:  # (a process with no CUDA is most of a tree: an error unnamed is taken for that)
                if e.code not in NO_CUDA_ERRORS | {UNNAMED_ERROR} and os.path.exists(f"/proc/{p}"):
                    raise
        return out

    def restore_tree(self, root_pid: int, expected: int | None = None, timeout_s: float | None = None,
                     gpu_pairs: Sequence[tuple[str, str]] | None = None) -> dict[str, int]:
        """``restore`` every CHECKPOINTED process in a restored replica's tree; ``expected`` is how many CUDA
        processes were dumped (fewer found is an error: a snapshot must not come back half on the GPU)."""
        pids = self.checkpointed_pids(root_pid)
        if expected is not None and len(pids) != expected:
            raise CudaStateError(f"{len(pids)} CHECKPOINTED CUDA process(es) under pid {root_pid}, {expected} were "
                                 f"dumped", pid=root_pid)
        t: dict[str, int] = {}
        for pid in pids:
            for k, v in self.restore(pid, timeout_s, gpu_pairs).items():
                t[k] = t.get(k, 0) + v
        return t

    # -- around a CRIU dump --------------------------------------------------------------------------------------
    def around_dump(self, pids: int | Iterable[int], dump_fn: Callable[[], Any], *,
                    leave_running: bool = False, timeout_s: float | None = None) -> GpuDump:
        """checkpoint every pid -> dump_fn() -> (leave_running) restore + unlock.

        - A checkpoint that fails rolls back the pids already checkpointed and raises: dump_fn never runs.
        - If dump_fn fails, every pid is put back RUNNING before its error propagates (failures to do so are
          added to it as notes).
        - Without leave_running the dump ends the process (criu dump's default), so nothing is restored."""
        pids = [pids] if isinstance(pids, int) else list(pids)
        t: dict[str, int] = {}
        done: list[int] = []
        try:
            for pid in pids:
                for k, v in self.checkpoint(pid, timeout_s).items():
                    t[k] = t.get(k, 0) + v
                done.append(pid)
            for pid in pids:  # nothing may have moved since: the dump must see every pid CHECKPOINTED
                self._require(pid, CHECKPOINTED, "criu dump")
        except BaseException as e:
            for pid in reversed(done):
                note = self._put_back(pid)
                if isinstance(e, CudaError):
                    e.append(note)
                else:
                    e.add_note(note)
            raise
        t0 = time.monotonic()
        try:
            value = dump_fn()
        except BaseException as e:
            for pid in reversed(pids):
                note = self._put_back(pid)
                e.add_note(note)
            raise
        t["dump"] = int((time.monotonic() - t0) * 1000)
        if leave_running:  # every pid is tried; the first failure is raised (the images themselves are complete)
            errors = []
            for pid in reversed(pids):
                try:
                    for k, v in self.restore(pid, timeout_s).items():
                        t[k] = t.get(k, 0) + v
                except CudaError as e:
                    errors.append(e)
            if errors:
                for other in errors[1:]:
                    errors[0].append(str(other))
                raise errors[0]
        return GpuDump(value, pids, t)

    def _put_back(self, pid: int) -> str:
        try:
            state = self.state(pid)
            if state == CHECKPOINTED:
                self.restore(pid)
            elif state == LOCKED:
                self.driver.unlock(pid, self.state_timeout_s)
            state = self.state(pid)
        except CudaError as e:
            return f"pid {pid} could not be put back RUNNING: {e}"
        return f"pid {pid} is {state} again" if state == RUNNING else f"pid {pid} left {state}: stop it"


def gpu_checkpoint_around_dump(pids: int | Iterable[int], dump_fn: Callable[[], Any], *,
                               checkpointer: GpuCheckpointer | None = None, leave_running: bool = False,
                               timeout_s: float | None = None) -> GpuDump:
    """``GpuCheckpointer.around_dump`` with the real driver unless ``checkpointer`` is given."""
    return (checkpointer or GpuCheckpointer()).around_dump(pids, dump_fn, leave_running=leave_running,
                                                           timeout_s=timeout_s)


def can_move_gpu(driver_version: str | None) -> bool:
    """Can this driver restore a process onto another GPU (``gpuPairs``)? 580 and later can; 570 "does not
    support GPU migration"; an unknown version is taken as unable."""
    try:
        return int(str(driver_version).split(".")[0]) >= 580
    except ValueError:
        return False


def gpu_remap(snapshot_uuids: Sequence[str], host_uuids: Sequence[str]) -> list[tuple[str, str]] | None:
    """(old, new) UUID pairs for a restore on other GPUs, in CUDA ordinal order; None when they are the same."""
    if not snapshot_uuids or list(snapshot_uuids) == list(host_uuids)[:len(snapshot_uuids)]:
        return None
    if len(host_uuids) < len(snapshot_uuids):
        raise CudaError(f"snapshot was taken with {len(snapshot_uuids)} GPUs visible, this host has "
                        f"{len(host_uuids)}: a restore must map every checkpointed GPU", code="GPU_COUNT")
    return list(zip(snapshot_uuids, host_uuids))


# -- GPU facts for the compatibility key -------------------------------------------------------------------------
def cuda_version_str(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _proc_driver_version() -> str | None:
    try:
        text = (NVIDIA_PROC / "version").read_text()
    except OSError:
        return None
    m = (re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
         or re.search(r"\s(\d{3}\.\d+(?:\.\d+)?)\s", text))
    return m[1] if m else None


def nvml_gpus() -> dict | None:
    """The GPUs as NVML (nvidia-ml-py) sees them, in NVML's order: names, uuids, minors (of /dev/nvidiaN), and
    the driver and CUDA versions; None without NVML or a driver."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - NVMLError: no driver / no GPU
        return None
    try:
        def s(v):
            return v.decode() if isinstance(v, bytes) else str(v)
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        return {"names": [s(pynvml.nvmlDeviceGetName(h)) for h in handles],
                "uuids": [s(pynvml.nvmlDeviceGetUUID(h)) for h in handles],
                "minors": [int(pynvml.nvmlDeviceGetMinorNumber(h)) for h in handles],
                "driver": s(pynvml.nvmlSystemGetDriverVersion()),
                "cuda": int(pynvml.nvmlSystemGetCudaDriverVersion())}
    except Exception:  # noqa: BLE001
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def facts_from(names: Sequence[str], uuids: Sequence[str], nvidia_driver: str | None, cuda: int | None) -> dict:
    """The compat facts for GPUs with these names: ``gpu_model`` (the distinct names, sorted, "; "-joined),
    ``nvidia_driver``, ``cuda`` ("12.8") are compared; ``gpu_count`` and ``gpu_uuids`` are information only."""
    if not names:
        return {}
    return {"gpu_model": "; ".join(sorted(set(names))), "gpu_count": len(names), "gpu_uuids": list(uuids),
            "nvidia_driver": nvidia_driver or "unknown", "cuda": cuda_version_str(cuda) if cuda else "unknown"}


def gpu_facts(driver: CudaDriver | None = None) -> dict:
    """This host's GPU facts (see ``facts_from``), or {} when it has no NVIDIA GPU/driver. Uses ``driver`` if
    given, else NVML (nvidia-ml-py) when installed, else the CUDA driver API through cuda-python."""
    if driver is None:
        if not (NVIDIA_PROC / "version").exists() and not os.path.exists("/dev/nvidiactl"):
            return {}  # no kernel driver: don't load any library
        nv = nvml_gpus()
        if nv:
            return facts_from(nv["names"], nv["uuids"], nv["driver"], nv["cuda"])
        try:
            driver = RealCudaDriver()
        except CudaUnavailable:
            return {}
    try:
        devs = driver.devices()
        return facts_from([d["name"] for d in devs], [d["uuid"] for d in devs], _proc_driver_version(),
                          driver.driver_version())
    except CudaError:
        return {}
