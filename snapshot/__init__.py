"""CPU snapshots of model servers with CRIU: per-replica root filesystems, namespaced replicas, dump/restore.

    root = prepare_root(image_dir, work)                       # overlay: image (read-only) + fresh layer
    r = launch(root.path, argv, env, cwd, log_path)           # own pid/mount/net namespaces, loopback only
    r.wait_ready(port)                                        # /thaw/ready (sdk) or the health path
    before_snapshot(r, port)                                  # the SDK's before-snapshot callbacks, if any
    cp = checkpoint(r, images_dir)                            # criu dump; r is gone afterwards
    r2 = restore(images_dir, prepare_root(image_dir, work).path, log2)
    after_restore(r2, port, secrets)                          # secrets arrive only after restore
    r2.http_request("GET", "/answer", port=port); r2.stop(); root.cleanup()
"""

from .compat import Incompatible, check, compat_key, host_facts, require
from .criu import CheckpointResult, CriuError, checkpoint, criu_check, restore
from .replica import HookFailed, Replica, ReplicaError, after_restore, before_snapshot, launch
from .rootfs import Root, prepare_root

__all__ = [
    "Root", "prepare_root", "Replica", "ReplicaError", "HookFailed", "launch", "before_snapshot", "after_restore",
    "CheckpointResult", "CriuError", "checkpoint", "restore", "criu_check",
    "host_facts", "compat_key", "check", "require", "Incompatible",
]
