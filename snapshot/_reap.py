"""Run by ``criu restore --exec-cmd`` with the host's ``python3 -I -S`` once the restored tree runs, which
leaves it the parent of the restored pid 1. It prints ``ready <pid>`` on stdout, closes stdout, waits for the
agent to close its stdin (the agent holds the pid by a pidfd by then: a pid 1 that died at once stays a zombie
until then, so its number is not reused under the agent), and waits for its children (so the replica's
processes are never left as zombies), exiting with the restored init's exit code.

Apart from ``_nsinit.py`` and with nothing but ``os`` imported: it starts on every restore's critical path.
"""

import os
import sys


def reap():
    with open(f"/proc/self/task/{os.getpid()}/children") as f:
        children = [int(p) for p in f.read().split()]
    if not children:
        print("error no restored process is a child of the reaper", flush=True)
        raise SystemExit(1)
    print(f"ready {children[0]}", flush=True)
    os.close(1)
    os.read(0, 1)  # EOF once the agent attached (or died)
    os.close(0)
    code = 0
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return code
        if pid == children[0]:
            code = os.waitstatus_to_exitcode(status)
            code = 128 - code if code < 0 else code  # killed by a signal: the shell's 128 + signo


if __name__ == "__main__":
    sys.exit(reap())
