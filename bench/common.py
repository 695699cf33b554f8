"""What every benchmark in bench/ shares: the machine line its output starts with, and its percentiles."""

from __future__ import annotations

import os
import platform


def machine_line() -> str:
    """The line that says where the numbers below it were measured."""
    return (f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, {platform.platform()}, "
            f"Python {platform.python_version()}")


def pct(xs, p):
    """The p-th percentile of ``xs``: the sample nearest to rank p/100 * (n - 1)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]
