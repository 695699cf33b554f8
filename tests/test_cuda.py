"""thaw.snapshot.cuda: GPU checkpoint ordering, state checks, timeouts, rollback, GPU compatibility facts.

Without a GPU (this machine, CI) the only fake is ``FakeCu``: a stand-in for the ``cuda.bindings.driver`` module
(functions returning ``(CUresult, ...)`` tuples, a CUprocessState machine per pid, injectable error codes and
hangs). ``RealCudaDriver`` runs on it unchanged, so the timeouts and CUDA error names are thaw's real code.
Tests marked ``gpu`` use the real driver and skip where there is no NVIDIA GPU/driver:
``python3 -m pytest tests/test_cuda.py -m gpu -v -rs -s``.
"""

from __future__ import annotations

import ctypes
import enum
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from thaw.snapshot import compat
from thaw.snapshot import cuda as gpu
from thaw.snapshot.cuda import (CHECKPOINTED, LOCKED, RUNNING, CudaError, CudaStateError, CudaUnavailable,
                                GpuCheckpointer, RealCudaDriver, can_move_gpu, facts_from, gpu_checkpoint_around_dump,
                                gpu_remap)

PID = 4242
H100 = "NVIDIA H100 80GB HBM3"
UUID0 = "GPU-11111111-2222-3333-4444-555555555555"
UUID1 = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


# -- the fake cuda.bindings.driver -------------------------------------------------------------------------------
class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_NOT_INITIALIZED = 3
    CUDA_ERROR_NO_DEVICE = 100
    CUDA_ERROR_ILLEGAL_STATE = 401
    CUDA_ERROR_NOT_FOUND = 500
    CUDA_ERROR_NOT_READY = 600
    CUDA_ERROR_NOT_SUPPORTED = 801
    CUDA_ERROR_UNKNOWN = 999


class CUprocessState(enum.IntEnum):
    CU_PROCESS_STATE_RUNNING = 0
    CU_PROCESS_STATE_LOCKED = 1
    CU_PROCESS_STATE_CHECKPOINTED = 2
    CU_PROCESS_STATE_FAILED = 3
    CU_PROCESS_STATE_CHECKPOINTING = 4
    CU_PROCESS_STATE_RESTORING = 5


S = CUprocessState
OK = CUresult.CUDA_SUCCESS


class CUcheckpointLockArgs:
    timeoutMs = 0


class CUcheckpointRestoreArgs:
    gpuPairs: list = []
    gpuPairsCount = 0


class CUcheckpointGpuPair:
    oldUuid = newUuid = None


class CUuuid:
    def __init__(self, ptr: int = 0):
        self.bytes = ctypes.string_at(ptr, 16) if ptr else bytes(16)


class FakeCu:
    """``cuda.bindings.driver`` as far as thaw uses it. ``fail[name]`` or ``fail[(name, pid)] = CUresult`` makes
    that call fail once (leaving the state given in ``fail_state``); ``hang[name] = seconds`` makes it block first
    (in the transitional state CHECKPOINTING/RESTORING, as the real driver would be) and then finish."""

    CUresult, CUprocessState = CUresult, CUprocessState
    CUcheckpointLockArgs, CUcheckpointRestoreArgs = CUcheckpointLockArgs, CUcheckpointRestoreArgs
    CUcheckpointGpuPair, CUuuid = CUcheckpointGpuPair, CUuuid

    def __init__(self, states: dict[int, S] | None = None, version: int = 12080, init: CUresult = OK,
                 devices=((H100, UUID0),)):
        self.states = dict(states if states is not None else {PID: S.CU_PROCESS_STATE_RUNNING})
        self.version, self.init, self.devs = version, init, list(devices)
        self.calls: list[tuple[str, int | None]] = []
        self.fail: dict = {}
        self.fail_state: dict[str, S] = {}
        self.hang: dict[str, float] = {}
        self.lock_busy = False  # the target never releases its CUDA locks: lock waits timeoutMs, NOT_READY
        self.lock_args: list[int] = []
        self.restore_pairs: list = []
        self.release = threading.Event()  # ends every hang (teardown)
        self.mu = threading.Lock()

    # plumbing
    def _step(self, name, pid, need: S, then: S, transit: S | None = None):
        with self.mu:
            self.calls.append((name, pid))
            if pid not in self.states:
                return (CUresult.CUDA_ERROR_NOT_INITIALIZED,)
            key = (name, pid) if (name, pid) in self.fail else name
            if key in self.fail:
                err = self.fail.pop(key)
                if name in self.fail_state:
                    self.states[pid] = self.fail_state.pop(name)
                return (err,)
            if self.states[pid] != need:
                return (CUresult.CUDA_ERROR_ILLEGAL_STATE,)
            hang = self.hang.pop(name, 0)
            if hang and transit is not None:
                self.states[pid] = transit
        if hang:
            self.release.wait(hang)
        with self.mu:
            self.states[pid] = then
        return (OK,)

    def cuInit(self, flags):
        self.calls.append(("cuInit", None))
        return (self.init,)

    def cuDriverGetVersion(self):
        return (OK, self.version)

    def cuGetErrorName(self, err):
        return (OK, CUresult(err).name.encode())

    def cuDeviceGetCount(self):
        return (OK, len(self.devs))

    def cuDeviceGet(self, i):
        return (OK, i)

    def cuDeviceGetName(self, length, dev):
        return (OK, self.devs[dev][0].encode() + b"\0" * 8)

    def cuDeviceGetUuid(self, dev):
        u = CUuuid()
        u.bytes = gpu._uuid_bytes(self.devs[dev][1])
        return (OK, u)

    def cuCheckpointProcessGetState(self, pid):
        with self.mu:
            self.calls.append(("GetState", pid))
            if "GetState" in self.fail:
                return (self.fail.pop("GetState"), None)
            if pid not in self.states:
                return (CUresult.CUDA_ERROR_NOT_INITIALIZED, None)
            return (OK, self.states[pid])

    def cuCheckpointProcessGetRestoreThreadId(self, pid):
        return (OK, pid + 1) if pid in self.states else (CUresult.CUDA_ERROR_NOT_INITIALIZED, None)

    def cuCheckpointProcessLock(self, pid, args):
        self.lock_args.append(args.timeoutMs if args else 0)
        if self.lock_busy:
            with self.mu:
                self.calls.append(("Lock", pid))
            self.release.wait((args.timeoutMs if args else 0) / 1000)
            return (CUresult.CUDA_ERROR_NOT_READY,)  # the driver's lock timeout: left RUNNING
        return self._step("Lock", pid, S.CU_PROCESS_STATE_RUNNING, S.CU_PROCESS_STATE_LOCKED)

    def cuCheckpointProcessCheckpoint(self, pid, args):
        return self._step("Checkpoint", pid, S.CU_PROCESS_STATE_LOCKED, S.CU_PROCESS_STATE_CHECKPOINTED,
                          S.CU_PROCESS_STATE_CHECKPOINTING)

    def cuCheckpointProcessRestore(self, pid, args):
        if args is not None:
            self.restore_pairs.append([(p.oldUuid.bytes, p.newUuid.bytes) for p in args.gpuPairs])
        return self._step("Restore", pid, S.CU_PROCESS_STATE_CHECKPOINTED, S.CU_PROCESS_STATE_LOCKED,
                          S.CU_PROCESS_STATE_RESTORING)

    def cuCheckpointProcessUnlock(self, pid, args):
        return self._step("Unlock", pid, S.CU_PROCESS_STATE_LOCKED, S.CU_PROCESS_STATE_RUNNING)

    # for tests
    def state(self, pid=PID) -> str:
        return self.states[pid].name.removeprefix("CU_PROCESS_STATE_")

    def steps(self) -> list[str]:
        return [name for name, _ in self.calls if name != "cuInit"]


@pytest.fixture
def cu():
    fake = FakeCu()
    yield fake
    fake.release.set()


def checkpointer(cu: FakeCu, **kw) -> GpuCheckpointer:
    kw.setdefault("timeout_s", 2.0)
    kw.setdefault("lock_timeout_s", 1.0)
    kw.setdefault("state_timeout_s", 1.0)
    return GpuCheckpointer(RealCudaDriver(cu, lock_grace_s=0.2), **kw)


# -- ordering ----------------------------------------------------------------------------------------------------
def test_checkpoint_order_and_timings(cu):
    t = checkpointer(cu, lock_timeout_s=0.75).checkpoint(PID)
    assert cu.steps() == ["GetState", "Lock", "GetState", "Checkpoint", "GetState"]
    assert cu.state() == CHECKPOINTED
    assert cu.lock_args == [750]  # the lock's own driver timeout is set
    assert set(t) == {"cuda_lock", "cuda_checkpoint"} and all(v >= 0 for v in t.values())


def test_restore_order(cu):
    cu.states[PID] = S.CU_PROCESS_STATE_CHECKPOINTED
    t = checkpointer(cu).restore(PID)
    assert cu.steps() == ["GetState", "Restore", "GetState", "Unlock", "GetState"]
    assert cu.state() == RUNNING
    assert set(t) == {"cuda_restore", "cuda_unlock"}


def test_restore_tree(cu):
    cu.states[PID] = S.CU_PROCESS_STATE_CHECKPOINTED  # a pid not on this machine: its tree is itself
    c = checkpointer(cu)
    with pytest.raises(CudaStateError, match=f"1 CHECKPOINTED CUDA process\\(es\\) under pid {PID}, 2 were dumped"):
        c.restore_tree(PID, expected=2)
    assert set(c.restore_tree(PID, expected=1)) == {"cuda_restore", "cuda_unlock"}
    assert cu.state() == RUNNING
    assert c.checkpointed_pids(PID) == []


def test_restore_remaps_gpus(cu):
    cu.states[PID] = S.CU_PROCESS_STATE_CHECKPOINTED
    pairs = gpu_remap([UUID0], [UUID1])
    checkpointer(cu).restore(PID, gpu_pairs=pairs)
    assert cu.restore_pairs == [[(gpu._uuid_bytes(UUID0), gpu._uuid_bytes(UUID1))]]
    assert gpu_remap([UUID0], [UUID0, UUID1]) is None  # same GPUs: no remap
    assert can_move_gpu("580.95.05") and can_move_gpu("590.1") and not can_move_gpu("570.86.15")
    assert not can_move_gpu("unknown") and not can_move_gpu(None)
    with pytest.raises(CudaError, match="every checkpointed GPU"):
        gpu_remap([UUID0, UUID1], [UUID1])


# -- state checks ------------------------------------------------------------------------------------------------
def test_checkpoint_refuses_a_locked_process(cu):
    cu.states[PID] = S.CU_PROCESS_STATE_LOCKED
    with pytest.raises(CudaStateError, match=f"pid {PID} is LOCKED, not RUNNING: refusing cuCheckpointProcessLock"):
        checkpointer(cu).checkpoint(PID)
    assert cu.steps() == ["GetState"]  # nothing was done, nothing is undone
    assert cu.state() == LOCKED


def test_restore_refuses_a_running_process(cu):
    with pytest.raises(CudaStateError, match="is RUNNING, not CHECKPOINTED.*cuda_plugin"):
        checkpointer(cu).restore(PID)
    assert cu.steps() == ["GetState"]


def test_restore_failure_names_the_state_left(cu):
    cu.states[PID] = S.CU_PROCESS_STATE_CHECKPOINTED
    cu.fail["Restore"] = CUresult.CUDA_ERROR_NOT_SUPPORTED
    cu.fail_state["Restore"] = S.CU_PROCESS_STATE_FAILED
    with pytest.raises(CudaError) as ei:
        checkpointer(cu).restore(PID)
    assert str(ei.value) == (f"cuCheckpointProcessRestore(pid {PID}): CUDA_ERROR_NOT_SUPPORTED; "
                             f"pid {PID} is now FAILED")
    assert ei.value.code == "CUDA_ERROR_NOT_SUPPORTED" and ei.value.pid == PID


def test_uses_gpu(cu):
    c, me = checkpointer(cu), os.getpid()  # a pid that exists
    cu.states[me] = S.CU_PROCESS_STATE_RUNNING
    assert c.uses_gpu(me)
    assert not c.uses_gpu(PID + 1)  # no CUDA context: CUDA_ERROR_NOT_INITIALIZED
    cu.fail["GetState"] = CUresult.CUDA_ERROR_NOT_SUPPORTED
    with pytest.raises(CudaError, match="CUDA_ERROR_NOT_SUPPORTED"):
        c.uses_gpu(me)
    cu.fail["GetState"] = CUresult.CUDA_ERROR_NOT_SUPPORTED
    assert not c.uses_gpu(PID)  # a process that is gone
    assert c.gpu_pids(os.getpid()) == []  # this process holds no /dev/nvidia* file


def test_multi_gpu_is_refused_before_locking(cu, monkeypatch):
    monkeypatch.setattr(gpu, "nvidia_files", lambda pid: ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl"])
    with pytest.raises(gpu.CudaUnsupported, match="uses 2 GPUs .*not supported in this version"):
        checkpointer(cu).checkpoint(PID)
    assert "Lock" not in cu.steps() and cu.state() == RUNNING


def test_what_the_driver_cannot_checkpoint_is_told_apart(cu):
    """CUDA_ERROR_NOT_SUPPORTED (MPS, CUDA IPC, managed memory) would fail every retry the same way, after a cold
    boot each: CudaUnsupported, which the host's activities fail at once. Other errors stay plain CudaErrors."""
    cu.fail["Lock"] = CUresult.CUDA_ERROR_NOT_SUPPORTED
    with pytest.raises(gpu.CudaUnsupported, match="cuCheckpointProcessLock.*CUDA_ERROR_NOT_SUPPORTED"):
        checkpointer(cu).checkpoint(PID)
    assert cu.state() == RUNNING
    cu.fail["Lock"] = CUresult.CUDA_ERROR_UNKNOWN
    with pytest.raises(CudaError) as e:
        checkpointer(cu).checkpoint(PID)
    assert not isinstance(e.value, gpu.CudaUnsupported)


def test_a_state_cuda_python_cannot_name(cu, monkeypatch):
    """cuda-python 12.8.0 (NVIDIA/cuda-python#561) turns the driver's GetState error into a ValueError. In a
    restored tree that is a process without CUDA (a `sh -c` above the server), not a traceback that fails every
    restore; for a process that holds GPU device files (uses_gpu) it stays an error."""
    def garbled(pid):
        raise ValueError("32718 is not a valid CUprocessState")

    monkeypatch.setattr(cu, "cuCheckpointProcessGetState", garbled)
    c = checkpointer(cu)
    assert c.checkpointed_pids(os.getpid()) == []
    with pytest.raises(CudaError, match="an error cuda-python could not name"):
        c.uses_gpu(os.getpid())


def test_a_remap_needs_both_restore_structs(cu):
    """cuda-bindings 13.3.0 left out CUcheckpointRestoreArgs: a restore onto other GPUs says so in one line."""
    class Without:  # the fake, less that struct
        def __getattr__(self, name):
            if name == "CUcheckpointRestoreArgs":
                raise AttributeError(name)
            return getattr(cu, name)

    cu.states[PID] = S.CU_PROCESS_STATE_CHECKPOINTED
    c = GpuCheckpointer(RealCudaDriver(Without(), lock_grace_s=0.2), timeout_s=2.0, state_timeout_s=1.0)
    with pytest.raises(CudaUnavailable, match="can't remap GPUs on restore \\(no CUcheckpointRestoreArgs\\)"):
        c.restore(PID, gpu_pairs=gpu_remap([UUID0], [UUID1]))
    assert cu.state() == CHECKPOINTED and "Restore" not in cu.steps()


# -- failures roll back ------------------------------------------------------------------------------------------
def test_lock_timeout_rolls_back(cu):
    cu.lock_busy = True  # the driver's own lock timeout: CUDA_ERROR_NOT_READY, process left RUNNING
    t0 = time.monotonic()
    with pytest.raises(CudaError) as ei:
        checkpointer(cu, lock_timeout_s=0.2).checkpoint(PID)
    assert time.monotonic() - t0 < 1.5
    assert str(ei.value) == (f"cuCheckpointProcessLock(pid {PID}): CUDA_ERROR_NOT_READY; "
                             f"rolled back: pid {PID} is RUNNING again")
    assert cu.state() == RUNNING


def test_lock_hang_past_its_own_timeout(cu):
    cu.hang["Lock"] = 30  # the driver ignores timeoutMs: thaw's thread timeout still ends it
    t0 = time.monotonic()
    with pytest.raises(CudaError) as ei:
        checkpointer(cu, lock_timeout_s=0.2).checkpoint(PID)
    assert time.monotonic() - t0 < 2.0
    assert ei.value.timed_out
    assert str(ei.value) == (f"cuCheckpointProcessLock timed out after 0.4 s for pid {PID}; "
                             f"pid {PID} is RUNNING and the timed-out call is still in the driver: stop it")


def test_checkpoint_error_rolls_back_to_running(cu):
    cu.fail["Checkpoint"] = CUresult.CUDA_ERROR_NOT_SUPPORTED  # e.g. UVM memory; the process stays LOCKED
    with pytest.raises(CudaError) as ei:
        checkpointer(cu).checkpoint(PID)
    assert str(ei.value) == (f"cuCheckpointProcessCheckpoint(pid {PID}): CUDA_ERROR_NOT_SUPPORTED; "
                             f"rolled back: pid {PID} is RUNNING again")
    assert cu.steps()[-3:] == ["GetState", "Unlock", "GetState"]
    assert cu.state() == RUNNING


def test_checkpoint_that_leaves_failed_says_stop_it(cu):
    cu.fail["Checkpoint"] = CUresult.CUDA_ERROR_UNKNOWN
    cu.fail_state["Checkpoint"] = S.CU_PROCESS_STATE_FAILED
    with pytest.raises(CudaError, match=f"CUDA_ERROR_UNKNOWN; rollback impossible: pid {PID} is FAILED: stop it"):
        checkpointer(cu).checkpoint(PID)


def test_checkpoint_hang_times_out_within_bound(cu):
    cu.hang["Checkpoint"] = 30
    t0 = time.monotonic()
    with pytest.raises(CudaError) as ei:
        checkpointer(cu, state_timeout_s=0.2).checkpoint(PID, timeout_s=0.3)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.3 + 3 * 0.2 + 0.5, elapsed  # the call's bound plus at most a rollback state query
    assert ei.value.timed_out
    assert str(ei.value) == (f"cuCheckpointProcessCheckpoint timed out after 0.3 s for pid {PID}; "
                             f"pid {PID} is CHECKPOINTING and the timed-out call is still in the driver: stop it")


def test_hung_state_query_is_bounded(cu):
    cu.states[PID] = S.CU_PROCESS_STATE_RUNNING
    slow = cu.cuCheckpointProcessGetState
    cu.cuCheckpointProcessGetState = lambda pid: (cu.release.wait(30), slow(pid))[1]
    t0 = time.monotonic()
    with pytest.raises(CudaError, match="cuCheckpointProcessGetState timed out after 0.2 s for pid"):
        checkpointer(cu, state_timeout_s=0.2).checkpoint(PID)
    assert time.monotonic() - t0 < 1.0


# -- around the CRIU dump ----------------------------------------------------------------------------------------
def test_around_dump_dumps_only_checkpointed(cu):
    seen = []
    res = gpu_checkpoint_around_dump(PID, lambda: seen.append(cu.state()) or "images",
                                     checkpointer=checkpointer(cu))
    assert seen == [CHECKPOINTED] and res.value == "images" and res.pids == [PID]
    assert {"cuda_lock", "cuda_checkpoint", "dump"} <= set(res.timings_ms)
    assert cu.state() == CHECKPOINTED  # without leave_running criu ends the process: nothing to restore


def test_around_dump_leave_running(cu):
    res = checkpointer(cu).around_dump([PID], lambda: None, leave_running=True)
    assert cu.state() == RUNNING
    assert {"cuda_restore", "cuda_unlock"} <= set(res.timings_ms)


def test_around_dump_leave_running_restore_failure_is_raised(cu):
    cu.fail["Restore"] = CUresult.CUDA_ERROR_ILLEGAL_STATE
    with pytest.raises(CudaError, match=f"cuCheckpointProcessRestore\\(pid {PID}\\): CUDA_ERROR_ILLEGAL_STATE"):
        checkpointer(cu).around_dump(PID, lambda: None, leave_running=True)


def test_failed_dump_puts_the_process_back_running(cu):
    class DumpFailed(RuntimeError):
        pass

    def dump():
        assert cu.state() == CHECKPOINTED
        raise DumpFailed("criu dump failed (exit 1): ... -- see log dump.log")

    with pytest.raises(DumpFailed) as ei:
        checkpointer(cu).around_dump(PID, dump)
    assert cu.state() == RUNNING
    assert ei.value.__notes__ == [f"pid {PID} is RUNNING again"]


def test_half_done_checkpoint_never_reaches_the_dump(cu):
    other = PID + 10
    cu.states[other] = S.CU_PROCESS_STATE_RUNNING
    cu.fail[("Checkpoint", other)] = CUresult.CUDA_ERROR_NOT_SUPPORTED
    dumped = []
    # the first pid checkpoints, the second fails: both end RUNNING, the dump never runs
    with pytest.raises(CudaError, match=f"pid {other}.*CUDA_ERROR_NOT_SUPPORTED.*pid {PID} is RUNNING again"):
        checkpointer(cu).around_dump([PID, other], lambda: dumped.append(1))
    assert dumped == []
    assert cu.state(PID) == RUNNING and cu.state(other) == RUNNING


def test_around_dump_without_gpu_pids_just_dumps(cu):
    assert checkpointer(cu).around_dump([], lambda: 7).value == 7
    assert cu.steps() == []


# -- driver availability and facts -------------------------------------------------------------------------------
def test_cuda_errors_that_would_repeat_fail_the_agent_s_work_at_once():
    """No driver >= 570 (or no cuda-python), or a state the step refuses, would only repeat: the host's activities
    fail at once with its one line instead of running a cold boot again on each retry. A failed CUDA call (out of
    memory on a busy GPU, say) is left to Temporal's retries."""
    pytest.importorskip("temporalio")
    from temporalio.exceptions import ApplicationError

    from thaw.activities.host import host_errors_fail_fast

    def raising(err):
        def take():
            raise err
        return host_errors_fail_fast(take)

    for err in (CudaUnavailable("no NVIDIA driver >= 570 here"), CudaStateError("pid 7 is LOCKED, not RUNNING"),
                gpu.CudaUnsupported("cuCheckpointProcessLock(pid 7): CUDA_ERROR_NOT_SUPPORTED")):
        with pytest.raises(ApplicationError) as e:
            raising(err)()
        assert e.value.non_retryable and e.value.message == str(err)
    with pytest.raises(CudaError, match="CUDA_ERROR_OUT_OF_MEMORY"):
        raising(CudaError("cuCheckpointProcessRestore(pid 7): CUDA_ERROR_OUT_OF_MEMORY"))()


def test_driver_unavailable_is_explained(cu):
    with pytest.raises(CudaUnavailable, match="driver >= 570"):
        RealCudaDriver(FakeCu(version=12040))
    with pytest.raises(CudaUnavailable, match="no usable NVIDIA GPU: cuInit: CUDA_ERROR_NO_DEVICE"):
        RealCudaDriver(FakeCu(init=CUresult.CUDA_ERROR_NO_DEVICE))

    class Old:
        pass

    with pytest.raises(CudaUnavailable, match="lacks the checkpoint API"):
        RealCudaDriver(Old())


HAS_NVIDIA = Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


@pytest.mark.skipif(HAS_NVIDIA, reason="this host has an NVIDIA driver")
def test_real_driver_on_a_host_without_gpu():
    with pytest.raises(CudaUnavailable) as ei:
        RealCudaDriver()
    assert "cuda-python is not installed" in str(ei.value) or "no NVIDIA driver on this host" in str(ei.value)
    assert gpu.gpu_facts() == {}
    facts = compat.host_facts()
    assert not any(k.startswith("gpu") or k in ("nvidia_driver", "cuda") for k in facts)


def test_gpu_facts_from_the_driver(cu):
    cu.devs = [(H100, UUID0), (H100, UUID1)]
    cu.version = 12090
    facts = gpu.gpu_facts(RealCudaDriver(cu))
    assert facts["gpu_model"] == H100 and facts["gpu_count"] == 2 and facts["cuda"] == "12.9"
    assert facts["gpu_uuids"] == [UUID0, UUID1]
    assert facts_from([], [], None, None) == {}
    assert facts_from(["B", "A", "B"], [], "580.1", 13000)["gpu_model"] == "A; B"


@pytest.mark.parametrize("text", [
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15  Wed Jan 22 00:00:00 UTC 2025\nGCC version: gcc\n",
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder@U16)\n",
])
def test_proc_driver_version(tmp_path, monkeypatch, text):
    (tmp_path / "version").write_text(text)
    monkeypatch.setattr(gpu, "NVIDIA_PROC", tmp_path)
    assert gpu._proc_driver_version() == "570.86.15"


# -- compatibility -----------------------------------------------------------------------------------------------
CPU = {"arch": "x86_64", "cpu_model": "Xeon", "cpu_flags": ["avx2", "sse4_2"], "cpu_flags_hash": "x",
       "kernel": "6.1.0-18-amd64", "criu": "4.2.1"}


def with_gpu(model=H100, driver="570.86.15", cuda="12.8", uuids=(UUID0,)):
    major, minor = cuda.split(".")
    return {**CPU, **facts_from([model] * len(uuids), list(uuids), driver, int(major) * 1000 + int(minor) * 10)}


def test_compat_refuses_gpu_mismatches():
    snap = with_gpu()
    assert compat.check(snap, with_gpu(uuids=(UUID1, UUID0))) == []  # other GPUs of the same kind: fine
    assert compat.check(snap, with_gpu(model="NVIDIA A100-SXM4-80GB")) == [
        f"gpu model {H100} != NVIDIA A100-SXM4-80GB (snapshot != host)"]
    assert compat.check(snap, with_gpu(driver="580.65.06")) == [
        "nvidia driver 570.86.15 != 580.65.06 (snapshot != host)"]
    assert compat.check(snap, with_gpu(cuda="13.0")) == ["CUDA 12.8 != 13.0 (snapshot != host)"]
    # a snapshot of a process that saw two GPUs needs two here: refused before CRIU restores anything
    assert compat.check(with_gpu(uuids=(UUID0, UUID1)), snap) == ["snapshot was taken with 2 GPUs visible, host has 1"]
    assert compat.check(with_gpu(uuids=(UUID0, UUID1)), with_gpu(uuids=(UUID1, UUID0))) == []
    assert compat.check(snap, CPU) == [f"no NVIDIA GPU on host (snapshot needs {H100}, driver 570.86.15, CUDA 12.8)"]
    with pytest.raises(compat.Incompatible, match="nvidia driver"):
        compat.require(snap, with_gpu(driver="580.65.06"))
    # a driver version that could not be read matches nothing, not even another unknown one, except on the
    # same machine (the snapshot's GPU is the host's: verify-by-replay after the build)
    unknown, elsewhere = with_gpu(driver="unknown"), with_gpu(driver="unknown", uuids=(UUID1,))
    assert compat.check(unknown, elsewhere) == compat.check(unknown, with_gpu(uuids=(UUID1,))) == [
        "nvidia driver version unknown on the snapshot (the driver did not say): cannot tell it matches"]
    assert compat.check(snap, elsewhere)[0].startswith("nvidia driver version unknown on the host")
    assert compat.check(unknown, unknown) == [] and compat.check(unknown, with_gpu(driver="unknown")) == []


def test_compat_cpu_snapshots():
    assert compat.check(CPU, CPU) == []
    assert compat.check(CPU, with_gpu()) == []  # a CPU-only snapshot restores on a GPU host
    assert compat.check(CPU, {**with_gpu(), "kernel": "6.2.0"}) == ["kernel series 6.1 != 6.2 (snapshot != host)"]
    # the key of CPU facts is what it was before GPU facts existed; GPU facts are part of a GPU snapshot's key
    assert compat.compat_key(CPU, "img") == compat.compat_key(dict(CPU), "img")
    assert compat.compat_key(with_gpu(), "img") != compat.compat_key(with_gpu(driver="580.65.06"), "img")
    assert compat.compat_key(with_gpu(), "img") == compat.compat_key(with_gpu(uuids=(UUID1,)), "img")


def test_snapshot_facts_and_placement():
    assert compat.needs_gpu(with_gpu()) and not compat.needs_gpu(CPU)
    assert compat.snapshot_facts(with_gpu(), uses_gpu=False) == CPU
    assert compat.snapshot_facts(with_gpu(), uses_gpu=True) == with_gpu()


def test_process_tree_and_device_files():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 5
        while child.pid not in gpu.process_tree(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert child.pid in gpu.process_tree(os.getpid())
        assert gpu.nvidia_files(child.pid) == [] and gpu.tree_uses_nvidia(child.pid) == []
    finally:
        child.kill()
        child.wait()
    assert gpu.gpus_in_use(["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia3"]) == ["/dev/nvidia3"]


# -- the real driver (GPU hosts only) ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_driver():
    try:
        return RealCudaDriver()
    except CudaUnavailable as e:
        pytest.skip(f"no NVIDIA GPU/driver: {e}")


# the start of every child below: a CUDA context on GPU 0, current on the main thread
CUDA_SETUP = textwrap.dedent("""
    from cuda.bindings import driver as cu
    def ok(r):
        if int(r[0]) != 0:
            raise SystemExit(f"CUDA error {r[0]!r}")
        return r[1] if len(r) == 2 else None
    ok(cu.cuInit(0))
    ctx = ok(cu.cuDevicePrimaryCtxRetain(ok(cu.cuDeviceGet(0))))
    ok(cu.cuCtxSetCurrent(ctx))
""")

CHILD_CUDA_PYTHON = CUDA_SETUP + textwrap.dedent("""
    import sys
    n = 64 << 20
    data = bytes(range(256)) * (n // 256)
    ptr = ok(cu.cuMemAlloc(n))
    ok(cu.cuMemcpyHtoD(ptr, data, n))
    print("ready", sum(data[::4096]), flush=True)
    sys.stdin.readline()
    out = bytearray(n)
    ok(cu.cuMemcpyDtoH(out, ptr, n))
    print("after", sum(out[::4096]), flush=True)
""")

CHILD_TORCH = textwrap.dedent("""
    import sys, torch
    x = torch.arange(1 << 24, device="cuda", dtype=torch.float64)
    torch.cuda.synchronize()
    print("ready", float(x.sum()), flush=True)
    sys.stdin.readline()
    print("after", float((x * 1).sum()), flush=True)
""")


def _torch_cuda() -> bool:
    try:
        import torch
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["cuda-python", "torch"])
def test_real_checkpoint_and_restore(real_driver, kind):
    """A process with 64 MiB (or a torch tensor) on the GPU: checkpoint (device memory to host), restore, unlock,
    and its data is intact."""
    if kind == "torch" and not _torch_cuda():
        pytest.skip("torch with CUDA is not installed")
    code = CHILD_CUDA_PYTHON if kind == "cuda-python" else CHILD_TORCH
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        first = child.stdout.readline().split()
        assert first and first[0] == "ready", first
        c = GpuCheckpointer(real_driver, timeout_s=60)
        assert c.uses_gpu(child.pid) and c.state(child.pid) == RUNNING
        print(f"\n{kind}: open before checkpoint: {gpu.nvidia_files(child.pid)}")
        t1 = c.checkpoint(child.pid)
        assert c.state(child.pid) == CHECKPOINTED
        print(f"{kind}: open while checkpointed: {gpu.nvidia_files(child.pid)}; checkpoint ms {t1}")
        t2 = c.restore(child.pid)
        print(f"{kind}: restore ms {t2}")
        assert c.state(child.pid) == RUNNING
        child.stdin.write("go\n")
        child.stdin.flush()
        after = child.stdout.readline().split()
        assert after == ["after", first[1]], (first, after)
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.gpu
def test_real_checkpoint_refused_states(real_driver):
    child = subprocess.Popen([sys.executable, "-c", CHILD_CUDA_PYTHON], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().startswith("ready")
        c = GpuCheckpointer(real_driver, timeout_s=60)
        with pytest.raises(CudaStateError, match="is RUNNING, not CHECKPOINTED"):
            c.restore(child.pid)
        c.checkpoint(child.pid)
        with pytest.raises(CudaStateError, match="is CHECKPOINTED, not RUNNING"):
            c.checkpoint(child.pid)
        c.restore(child.pid)
        assert c.state(child.pid) == RUNNING
    finally:
        child.kill()
        child.wait()


@pytest.mark.gpu
def test_real_gpu_facts(real_driver):
    facts = gpu.gpu_facts(real_driver)
    print(f"\nGPU facts: {facts}")
    assert facts["gpu_count"] >= 1 and facts["gpu_model"]
    assert tuple(map(int, facts["cuda"].split("."))) >= (12, 8) and facts["nvidia_driver"] != "unknown"
    assert compat.check(facts, facts) == []


CRIU_CHILD = CUDA_SETUP + textwrap.dedent("""
    import os, sys, time
    d = sys.argv[1]
    n = 16 << 20
    data = bytes(range(251)) * (n // 251)
    ptr = ok(cu.cuMemAlloc(len(data)))
    ok(cu.cuMemcpyHtoD(ptr, data, len(data)))
    open(os.path.join(d, "ready"), "w").close()
    while not os.path.exists(os.path.join(d, "go")):
        time.sleep(0.05)
    out = bytearray(len(data))
    ok(cu.cuMemcpyDtoH(out, ptr, len(data)))
    with open(os.path.join(d, "result.tmp"), "w") as f:
        f.write("same" if bytes(out) == data else "differs")
    os.rename(os.path.join(d, "result.tmp"), os.path.join(d, "result"))
""")


def _wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout:g} s")
        time.sleep(0.05)


@pytest.mark.gpu
def test_real_checkpoint_criu_dump_restore(real_driver, tmp_path):
    """The whole path without namespaces: CUDA checkpoint -> criu dump -> criu restore -> CUDA restore + unlock."""
    from thaw.snapshot.criu import criu_binary, criu_check
    if os.geteuid() != 0:
        pytest.skip("needs root (criu)")
    if (why := criu_check()) is not None:
        pytest.skip(f"criu unusable: {why}")
    images = tmp_path / "images"
    images.mkdir()
    log = open(tmp_path / "child.log", "w")
    child = subprocess.Popen([sys.executable, "-c", CRIU_CHILD, str(tmp_path)], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, start_new_session=True)
    restored = None
    try:
        _wait_for(tmp_path / "ready")
        c = GpuCheckpointer(real_driver, timeout_s=60)
        res = c.around_dump(child.pid, lambda: subprocess.run(
            [criu_binary(), "dump", "-t", str(child.pid), "-D", str(images), "-o", "dump.log", "-v4"],
            check=True, capture_output=True, timeout=120))
        print(f"\ncheckpoint+dump ms {res.timings_ms}")
        child.wait(30)
        subprocess.run([criu_binary(), "restore", "-D", str(images), "-o", "restore.log", "-v4",
                        "--restore-detached", "--pidfile", str(tmp_path / "pid")], check=True,
                       capture_output=True, timeout=120)
        restored = int((tmp_path / "pid").read_text())
        print(f"restore ms {c.restore(restored)}")
        (tmp_path / "go").touch()
        _wait_for(tmp_path / "result")
        assert (tmp_path / "result").read_text() == "same"
    finally:
        for pid in (restored, child.pid):
            if pid:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        if child.poll() is None:
            child.wait()
        log.close()


GPU_SERVER = CUDA_SETUP + textwrap.dedent("""
    import json, os
    from http.server import BaseHTTPRequestHandler, HTTPServer
    data = bytes(range(251)) * ((64 << 20) // 251)
    ptr = ok(cu.cuMemAlloc(len(data)))
    ok(cu.cuMemcpyHtoD(ptr, data, len(data)))

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            out = bytearray(len(data))
            ok(cu.cuMemcpyDtoH(out, ptr, len(data)))
            libcuda = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libcuda.so" in line})
            body = json.dumps({"same": bytes(out) == data, "libcuda": libcuda, "pid": os.getpid()}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    HTTPServer(("127.0.0.1", 8080), H).serve_forever()
""")


def _host_root_image_or_skip(layers: Path, cuda_python: bool = True) -> Path:
    """For replicas whose image is this host's "/" (its Python and, with ``cuda_python``, cuda-python): skips where
    that can't run, else
    mounts a tmpfs at ``layers`` for the driver's layer and the roots (overlayfs refuses a lower layer inside
    another one, here "/"); the caller unmounts it."""
    from thaw.snapshot import _linux
    from thaw.snapshot.criu import criu_check
    if os.geteuid() != 0:
        pytest.skip("needs root (namespaces, criu)")
    if (why := criu_check()) is not None:
        pytest.skip(f"criu unusable: {why}")
    needed = [os.path.realpath(sys.executable)]
    if cuda_python:
        import cuda.bindings
        needed.append(cuda.bindings.__file__)
    # an overlay of "/" does not descend into other mounts
    off_root = [p for p in needed if os.stat(p).st_dev != os.stat("/").st_dev]
    if off_root:
        pytest.skip(f"not on the root file system, so not in an image made of it: {off_root}")
    layers.mkdir()
    _linux.mount("tmpfs", layers, "tmpfs", 0, "size=8g,mode=755")
    return layers


@pytest.mark.gpu
def test_real_image_rooted_replicas_restore_side_by_side(real_driver, tmp_path):
    """A replica with a root of its own (own pid, mount and network namespaces) on the GPU: the driver's nodes and
    libraries come from snapshot/nvidia.py. CUDA checkpoint + CRIU dump once, then two restored replicas of it
    side by side on this host (a host-root GPU replica keeps its host pid, so only one could be restored)."""
    import json

    from thaw.snapshot import _linux, checkpoint, launch, nvidia, prepare_root, restore
    layers = _host_root_image_or_skip(tmp_path / "layers")
    roots, restored = [], []

    def new_root():
        roots.append(prepare_root([access.layer, Path("/")], layers / "roots"))  # upper dir off "/" (overlayfs?)
        return roots[-1].path

    def get(r):
        status, body = r.http_request("GET", "/", port=8080, timeout=60)
        assert status == 200, body
        return json.loads(body)

    try:
        uuids = [d["uuid"] for d in real_driver.devices()]
        access = nvidia.for_host(layers, "test", uuids)
        assert access is not None and "nvidiactl" in {d.name for d in access.devices}, access
        assert any(nvidia.GPU_NODE.match(d.name) for d in access.devices), access  # nvidiaN: N need not be 0
        assert [u for u, _ in access.gpus] == uuids, access.gpus  # the driver names each GPU's node
        print(f"\ndevices {[d.arg() for d in access.devices]}; GPUs {access.gpus}; "
              f"layer {sorted(p.name for p in access.layer.rglob('*'))}")
        # GPU 0 as the agent lends it: its node only, and CUDA_VISIBLE_DEVICES=its UUID
        replica = launch(new_root(), [sys.executable, "-c", GPU_SERVER], access.env({"PATH": os.environ["PATH"]}, 0),
                         "/", tmp_path / "launch.log", devices=access.devices_for(0), timeout=60)
        c = GpuCheckpointer(real_driver, timeout_s=60)
        try:
            replica.wait_ready(8080, "/", timeout=120)
            first = get(replica)
            assert first["same"] and first["pid"] == 1, first
            assert first["libcuda"] and all(p.startswith(nvidia.LIB_DIR) for p in first["libcuda"]), first
            pids = c.gpu_pids(replica.pid)
            dump = c.around_dump(pids, lambda: checkpoint(replica, tmp_path / "images"))
            print(f"checkpoint + dump ms {dump.timings_ms}")
        finally:
            replica.stop()
        for i in range(2):
            restored.append(restore(tmp_path / "images", new_root(), tmp_path / f"restore{i}.log"))
            access.refresh(restored[-1].pid, 0)
            print(f"replica {i}: CUDA restore ms {c.restore_tree(restored[-1].pid, expected=len(pids))}")
        assert [get(r) for r in restored] == [first, first]
    finally:
        for r in restored:
            r.stop()
        for r in roots:
            r.cleanup()
        _linux.umount(layers)


@pytest.mark.gpu
def test_real_host_builds_places_and_restores_gpu_replicas(real_driver, tmp_path):
    """The agent's own path on a real GPU (HostSnapshots, as `thaw build snapshot` and a pool's starts drive it,
    without Temporal): launch on the GPU the host lends, CUDA checkpoint + CRIU dump, the snapshot stored in the
    chunk store and read back from it, facts a pool places by (the one GPU the process saw), then two restores
    and a cold boot side by side, each on the least-loaded GPU, every GPU given back when they stop. The image is
    this host's "/" (materializing a GPU image's many GB is not what is tested here)."""
    import json

    from thaw.config import Config
    from thaw.imagefs.ingest import Limits, ingest_and_commit
    from thaw.imagefs.oci import SourceSpec
    from thaw.snapshot import _linux, nvidia
    from thaw.snapshot.host import HostSnapshots
    state = _host_root_image_or_skip(tmp_path / "state")
    host = None
    cfg = Config(state_dir=state, host_id="gpu-host", lazy_mounts=False)
    uuids = [d["uuid"] for d in real_driver.devices()]
    spec = {"cmd": [sys.executable, "-c", GPU_SERVER], "env": {"PATH": os.environ["PATH"]}, "port": 8080,
            "health": "/", "cwd": "/", "ready_timeout_s": 120}
    golden = {"path": "/", "method": "GET", "body_b64": "", "content_type": "application/json"}
    served = []
    try:
        host = HostSnapshots(cfg)
        host.image_root = lambda digest: Path("/")
        assert host.gpu is not None and host.facts["gpu_uuids"] == uuids, host.facts
        assert host.gpu_loads() == [0] * len(uuids)
        took = host.take("gpu-build", "host-root", spec, golden)
        facts = took["host_facts"]
        print(f"\ntake ms {took['timings_ms']}; facts {facts}")
        assert compat.needs_gpu(facts) and facts["gpu_processes"] == 1, facts
        assert facts["gpu_uuids"] == uuids[:1] and facts["gpu_count"] == 1, facts  # the GPU it was lent
        assert host.gpu_loads() == [0] * len(uuids)  # the launch gave its GPU back
        stored = ingest_and_commit(SourceSpec("dir", took["dump_dir"]), host.store, "gpu-build-snapshot",
                                   Limits.from_config(cfg))[0]
        snap = {"digest": stored.digest, "image_digest": "host-root", "spec": spec, "golden_request": golden,
                "golden_digest": took["golden_digest"], "host_facts": facts}
        # a pool's placement: this host qualifies, the same host advertising no GPU does not
        assert compat.check(facts, host.facts) == []
        assert compat.check(facts, compat.snapshot_facts(host.facts, uses_gpu=False))
        print(f"verify ms {host.verify(stored.digest, 'host-root', spec, golden, took['golden_digest'], [], facts)}")
        for running, info in host.restore_many(snap, 2, {}):
            served.append(running)
            assert info["outcome"] == "restored" and "cuda" in info["timings_ms"], info
            print(f"restore ms {info['timings_ms']}")
        running, ms, same = host.cold_boot("host-root", spec, {}, golden, took["golden_digest"])
        served.append(running)
        assert same, "a cold boot on the GPU answers as the snapshot did"
        loads = host.gpu_loads()
        assert sum(loads) == 3 and max(loads) - min(loads) <= 1, loads  # least-loaded first
        answers = []
        for r in served:
            status, body = r.replica.http_request("GET", "/", port=8080, timeout=60)
            assert status == 200, body
            answers.append(json.loads(body))
        assert all(a["same"] and a["pid"] == 1 for a in answers), answers
        assert all(p.startswith(nvidia.LIB_DIR) for a in answers for p in a["libcuda"]), answers
        for r in served:
            r.stop()
        assert host.gpu_loads() == [0] * len(uuids)
    finally:
        for r in served:
            r.stop()
        if host is not None:
            host.close()
        _linux.umount(state)


PLAIN_SERVER = textwrap.dedent("""
    from http.server import BaseHTTPRequestHandler, HTTPServer
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
    HTTPServer(("0.0.0.0", 8080), H).serve_forever()
""")


def test_a_build_launch_that_outlives_its_sigkill_is_waited_for(tmp_path, monkeypatch):
    """A build's launch still there 10 s after SIGKILL (a driver tearing down much device memory, say): the build
    waits for it, heartbeating, and only then gives back its GPU loan and root (and its dir, which a retry of the
    build clears and mounts again). Before, they were given back at once, so the next launch could be lent the GPU
    the dying process still held. No GPU here: the loan is the slot (None) handed to ``give_gpu``."""
    import functools
    import signal

    from services import wait_until
    from thaw.config import Config
    from thaw.snapshot import _linux
    from thaw.snapshot import host as host_mod
    from thaw.snapshot.host import HostSnapshots
    from thaw.snapshot.replica import ReplicaError
    state = _host_root_image_or_skip(tmp_path / "state", cuda_python=False)
    host, launched, roots, given, gone, beats, took = None, [], [], [], [], [], []
    spec = {"cmd": [sys.executable, "-c", PLAIN_SERVER], "env": {"PATH": os.environ["PATH"]}, "port": 8080,
            "health": "/", "cwd": "/", "ready_timeout_s": 60}
    golden = {"path": "/", "method": "GET", "body_b64": "", "content_type": "text/plain"}
    try:
        host = HostSnapshots(Config(state_dir=state, host_id="stubborn-host", lazy_mounts=False, gpu_passthrough=False))
        host.image_root = lambda digest: Path("/")
        real_launch, real_root, real_give = host._launch, host._root, host.give_gpu

        def launch(*a):
            replica = real_launch(*a)
            real_stop = replica.stop

            def stubborn(timeout=10.0):  # what a process in uninterruptible sleep does to the stop
                if not gone:
                    time.sleep(0.1)
                    raise ReplicaError(f"replica {replica.pid} is still there {timeout:g} s after SIGKILL")
                real_stop(timeout)
            replica.stop = stubborn
            launched.append(replica)
            return replica

        host._launch = launch
        host._root = lambda *a: roots.append(real_root(*a)) or roots[-1]
        monkeypatch.setattr(host_mod.criu, "checkpoint", functools.partial(host_mod.criu.checkpoint,
                                                                           leave_running=True))  # else the dump ends it
        host.give_gpu = lambda slot: given.append(slot) or real_give(slot)
        t = threading.Thread(target=lambda: took.append(host.take("b-stubborn", "host-root", spec, golden,
                                                                  beats.append)))
        t.start()
        wait_until(lambda: beats.count("stop") >= 3, 60, "the build to wait for its launch")
        [replica], [root] = launched, roots
        assert t.is_alive() and replica.alive() and not given and str(root.path) in _linux.mountpoints()
        gone.append(True)
        os.kill(replica.pid, signal.SIGKILL)  # it goes at last
        t.join(30)
        assert took and took[0]["dump_dir"], took
        assert given == [None] and str(root.path) not in _linux.mountpoints()
    finally:
        gone.append(True)
        for r in launched:
            r.stop()
        for r in roots:
            r.cleanup()
        if host is not None:
            host.close()
        _linux.umount(state)


PARK_SERVER = textwrap.dedent("""
    import hashlib, json, torch
    from http.server import BaseHTTPRequestHandler, HTTPServer
    from thaw.snapshot import sdk
    torch.manual_seed(0)
    shared = torch.nn.Linear(2048, 2048)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(24)], shared, torch.nn.GELU(), shared)
    model.register_buffer("scale", torch.full((2048,), 0.5))
    model = model.half().cuda().eval()
    x = torch.randn(64, 2048, device="cuda", dtype=torch.half)
    weights = id(model[0].weight)
    sdk.park_weights(model)
    sdk.mark_ready()

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            if sdk.handle(self):
                return
            if self.path == "/run":
                with torch.inference_mode():
                    out = bytes((model(x) * model.scale).float().cpu().view(torch.uint8).flatten().tolist())
                body = {"digest": hashlib.sha256(out).hexdigest(), "same_tensor": id(model[0].weight) == weights}
            else:
                body = {"allocated": torch.cuda.memory_allocated(), "on": str(model[0].weight.device)}
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_POST = do_GET
    HTTPServer(("127.0.0.1", 8080), H).serve_forever()
""")


@pytest.mark.gpu
def test_real_parked_weights_leave_the_gpu_for_the_snapshot_and_come_back_after_restore(real_driver, tmp_path):
    """``sdk.park_weights`` on a real GPU: 25 fp16 layers (one tied) and a buffer move to host memory before the
    snapshot (the CUDA checkpoint then holds little device memory), come back after CRIU + CUDA restore through the
    after-restore hook, answer byte-identically, and the host copy is freed."""
    import json

    from thaw.snapshot import criu
    if os.geteuid() != 0 or criu.criu_check() is not None:
        pytest.skip("needs root and a usable criu")
    if not _torch_cuda():
        pytest.skip("torch with CUDA is not installed")
    get = lambda r, path: json.loads(r.http_request("GET", path, timeout=60)[1])  # noqa: E731
    anonymous = lambda pid: int(next(line.split()[1] for line in open(f"/proc/{pid}/smaps_rollup")  # noqa: E731
                                     if line.startswith("Anonymous:"))) << 10
    r = criu.launch(None, [sys.executable, "-c", PARK_SERVER], dict(os.environ), str(tmp_path), tmp_path / "s.log")
    restored = None
    try:
        r.wait_ready(8080, "/mem", timeout=120)
        golden, loaded = get(r, "/run"), get(r, "/mem")
        weights = 25 * 2048 * 2049 * 2 + 2048 * 2  # 25 distinct layers and the buffer, fp16: 0.21 GB
        assert loaded["allocated"] >= weights, loaded
        t0 = time.monotonic()
        assert criu.before_snapshot(r, 8080)
        parked = get(r, "/mem")
        print(f"\nparked in {(time.monotonic() - t0) * 1000:.0f} ms: {loaded} -> {parked}")
        assert parked["on"] == "cpu" and parked["allocated"] <= loaded["allocated"] - weights, parked  # x, cuBLAS
        c = GpuCheckpointer(real_driver, timeout_s=120)
        res = c.around_dump(c.gpu_pids(r.pid), lambda: criu.checkpoint(r, tmp_path / "images"))
        restored = criu.restore(tmp_path / "images", None, tmp_path / "r.log", huge_pages=True)
        cuda_ms = c.restore_tree(restored.pid, expected=1)
        host_before = anonymous(restored.pid)
        t0 = time.monotonic()
        criu.after_restore(restored, 8080, {})
        back_ms = (time.monotonic() - t0) * 1000
        host_after = anonymous(restored.pid)
        print(f"checkpoint + dump {res.timings_ms}; restore {cuda_ms}, weights back in {back_ms:.0f} ms; host "
              f"anonymous memory {host_before / 1e9:.2f} -> {host_after / 1e9:.2f} GB")
        back = get(restored, "/mem")
        assert back["on"] == "cuda:0" and back["allocated"] >= weights, back
        assert get(restored, "/run") == {**golden, "same_tensor": True}
        assert host_before - host_after > 0.9 * weights, "the host copy of the weights was freed"
    finally:
        for rep in (r, restored):
            if rep is not None:
                rep.stop()
