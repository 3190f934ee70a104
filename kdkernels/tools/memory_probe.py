"""The one RSS probe: fields of /proc/self/status (Linux), used by the bench, the demo and the
benchmark scripts."""
from __future__ import annotations

import re

__all__ = ["proc_status_kib"]


def proc_status_kib(key: str) -> int:
    """A kB field of /proc/self/status (``VmRSS``, ``VmHWM``, ...) in KiB (Linux)."""
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    if m is None:
        raise RuntimeError(f"{key} not found in /proc/self/status")
    return int(m.group(1))
