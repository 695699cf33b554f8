"""Can a snapshot taken on one host be restored on another? Host facts, a compatibility key, and a check.

What matters for a CRIU restore: the architecture; the CPU features (the restored code may already have
chosen AVX-512 paths, and CRIU refuses a host whose FPU/xsave features are missing; flags that name no
instruction, such as mitigations or the hypervisor bit, are not compared); the CRIU version (image
format and restore logic); and, conservatively, the kernel series (major.minor). The CPU model name is
kept for people, not compared. Facts added by other modules (GPU model, driver, CUDA version) are compared
for equality and are part of the key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import re
import subprocess

INFO_ONLY = {"cpu_model", "cpu_flags_hash", "gpu_count", "gpu_uuids", "gpu_processes"}  # reported, never compared
GPU_KEYS = ("gpu_model", "nvidia_driver", "cuda")  # compared when the snapshot has them (see check)
# x86 /proc/cpuinfo flags that name no instruction a restored process may have chosen to use: speculation
# mitigations (microcode, mitigations=off), the hypervisor bit and VM-host support (a VM or bare metal), timer,
# power and monitoring features, and what only the kernel uses. A build host's flag of these that a host lacks
# does not make it incompatible; any other flag, unknown ones too, still does.
NOT_ISA = frozenset("""
    pti kaiser md_clear flush_l1d arch_capabilities ibrs ibpb stibp ssbd ibrs_enhanced spec_ctrl_ssbd virt_ssbd
    amd_ssbd amd_stibp amd_ibpb amd_ibrs retpoline retpoline_amd rsb_ctxsw use_ibpb use_ibrs_fw srbds_ctrl sbpb
    bhi_ctrl rrsba_ctrl psfd ipred_ctrl tsx_ctrl
    hypervisor vmx svm ept vpid ept_ad flexpriority tpr_shadow vnmi npt lbrv svm_lock nrip_save tsc_scale
    vmcb_clean flushbyasid decodeassists pausefilter pfthreshold avic v_vmsave_vmload vgif v_spec_ctrl x2avic
    vmmcall
    tsc_known_freq tsc_reliable nonstop_tsc constant_tsc tsc_deadline_timer tsc_adjust arat aperfmperf epb est
    tm tm2 acpi pbe ida dtherm pln pts hwp hwp_notify hwp_act_window hwp_epp hwp_pkg_req cpb hw_pstate rapl cppc
    pebs bts ds_cpl dtes64 pdcm intel_pt arch_perfmon perfctr_core perfctr_nb perfctr_llc irperf ibs arch_lbr
    cqm cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local cat_l3 cdp_l3 mba rdt_a
    split_lock_detect bus_lock_detect cpuid_fault cpuid rep_good nopl xtopology pcid invpcid invpcid_single smep
    smap x2apic extd_apicid xtpr dca ht
""".split())
LABELS = {"kernel": "kernel series", "gpu_model": "gpu model", "nvidia_driver": "nvidia driver", "cuda": "CUDA"}


class Incompatible(Exception):
    """A snapshot can't be restored on this host; the message says why (see ``check``)."""


@functools.cache
def criu_version() -> str | None:
    from .criu import CriuError, criu_binary
    try:
        out = subprocess.run([criu_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (CriuError, OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"Version:\s*(\S+)", out)
    return m[1] if m else None


def _cpuinfo() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo."""
    info: dict[str, str] = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            if not line.strip():
                if info:
                    break
                continue
            key, _, val = line.partition(":")
            info.setdefault(key.strip(), val.strip())
    return info


def host_facts() -> dict:
    info = _cpuinfo()
    flags = sorted(set((info.get("flags") or info.get("Features") or "").split()))  # x86 | arm64
    return {
        "arch": platform.machine(),
        "cpu_model": info.get("model name") or info.get("CPU part") or "",
        "cpu_flags": flags,
        "cpu_flags_hash": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16],
        "kernel": platform.release(),
        "criu": criu_version(),
        **gpu_host_facts(),  # nothing on a host without an NVIDIA GPU/driver: CPU hosts' facts are unchanged
    }


@functools.cache
def gpu_host_facts() -> dict:
    """This host's GPU facts (``cuda.gpu_facts``: gpu_model, nvidia_driver, cuda; gpu_count and gpu_uuids for
    information), or {} without an NVIDIA GPU/driver. Cached: a driver upgrade restarts the agent."""
    from .cuda import gpu_facts
    try:
        return gpu_facts()
    except Exception:  # noqa: BLE001 - facts must never stop a host agent; no facts = no GPU snapshots here
        return {}


def needs_gpu(snapshot_facts: dict) -> bool:
    """Was the snapshot taken of a process using a GPU (so only a host with the same GPU facts may restore it)?"""
    return bool(snapshot_facts.get("gpu_model"))


def snapshot_facts(host_facts: dict, uses_gpu: bool) -> dict:
    """The facts to record with a snapshot: the host's, without its GPU facts when the dumped process did not use
    the GPU (a CPU-only snapshot taken on a GPU host then restores on CPU hosts too)."""
    if uses_gpu:
        return dict(host_facts)
    return {k: v for k, v in host_facts.items() if k not in GPU_KEYS and k not in ("gpu_count", "gpu_uuids")}


def _series(release: str | None) -> str:
    return ".".join((release or "").split(".")[:2])


def _key_facts(facts: dict) -> dict:
    out = {k: v for k, v in facts.items() if k not in INFO_ONLY}
    out["cpu_flags"] = sorted(out.get("cpu_flags") or [])
    out["kernel"] = _series(out.get("kernel"))
    return out


def compat_key(facts: dict, image_digest: str) -> str:
    """A stable hash of the facts that matter for a restore plus the image: equal keys restore each other."""
    blob = json.dumps({"facts": _key_facts(facts), "image": image_digest}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def check(snapshot_facts: dict, host_facts: dict) -> list[str]:
    """Why a snapshot with ``snapshot_facts`` can't be restored on a host with ``host_facts`` ([] = it can).

    Looser than key equality: a host with more CPU features than the snapshot's host is fine, and a snapshot
    without GPU facts (a CPU-only process) ignores the host's GPU facts. A GPU snapshot needs the same GPU model,
    NVIDIA driver and CUDA version.
    """
    snap, host = _key_facts(snapshot_facts), _key_facts(host_facts)
    reasons = []
    if not needs_gpu(snap):
        for key in GPU_KEYS:
            host.pop(key, None)
    elif not needs_gpu(host):
        reasons.append(f"no NVIDIA GPU on host (snapshot needs {snap['gpu_model']}, driver "
                       f"{snap.get('nvidia_driver')}, CUDA {snap.get('cuda')})")
        for key in GPU_KEYS:
            snap.pop(key, None)
            host.pop(key, None)
    # a version that could not be read matches no other (the driver restores the device state), unless the
    # snapshot's GPU is one of this host's: the same machine (verify-by-replay right after the build)
    same_gpu = set(snapshot_facts.get("gpu_uuids") or ()) & set(host_facts.get("gpu_uuids") or ())
    for key in ("nvidia_driver", "cuda") if needs_gpu(snap) and needs_gpu(host) and not same_gpu else ():
        if "unknown" in (snap.get(key), host.get(key)):
            side = "snapshot" if snap.get(key) == "unknown" else "host"
            reasons.append(f"{LABELS[key]} version unknown on the {side} (the driver did not say): cannot tell it "
                           f"matches")
            snap.pop(key, None)
            host.pop(key, None)
    wanted, has = (len(f.get("gpu_uuids") or ()) for f in (snapshot_facts, host_facts))
    if needs_gpu(snap) and needs_gpu(host) and wanted > has:  # a restore maps every checkpointed GPU to one here
        reasons.append(f"snapshot was taken with {wanted} GPUs visible, host has {has}")
    missing = sorted(set(snap.pop("cpu_flags")) - set(host.pop("cpu_flags")) - NOT_ISA)
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        reasons.append(f"cpu flags differ: host lacks {shown}")
    for key in sorted(set(snap) | set(host)):
        if snap.get(key) != host.get(key):
            what = LABELS.get(key, key)
            reasons.append(f"{what} {snap.get(key)} != {host.get(key)} (snapshot != host)")
    return reasons


def require(snapshot_facts: dict, host_facts: dict, what: str = "snapshot") -> None:
    """Raise Incompatible with every reason from ``check``, in one line."""
    reasons = check(snapshot_facts, host_facts)
    if reasons:
        raise Incompatible(f"{what} can't be restored on this host: {'; '.join(reasons)}")
