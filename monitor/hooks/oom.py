"""Evidence of kernel OOM kills: the `oom_kill` counter of the memory cgroup we run in.

A SIGKILL the master did not send is the kernel OOM killer only if this counter moved. Read
from, in order: cgroup v2 `memory.events`, cgroup v1 `memory.oom_control`, and only when no
cgroup counter is readable, the machine-wide `/proc/vmstat`.
"""

from __future__ import annotations

import os

CGROUP_ROOT = "/sys/fs/cgroup"


def counter_paths(pid: int | str = "self") -> list[str]:
    paths = []
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        path = path.lstrip("/")
        if controllers == "":
            for base in (CGROUP_ROOT, os.path.join(CGROUP_ROOT, "unified")):
                candidate = os.path.join(base, path, "memory.events")
                if os.path.exists(candidate):
                    paths.append(candidate)
                    break
        elif "memory" in controllers.split(","):
            candidate = os.path.join(CGROUP_ROOT, "memory", path, "memory.oom_control")
            if os.path.exists(candidate):
                paths.append(candidate)
    return paths or ["/proc/vmstat"]


def read_oom_kills(paths: list[str]) -> int:
    """Sum of the `oom_kill` lines of the given files (absent or unreadable count as 0)."""
    total = 0
    for path in paths:
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        total += int(value)
        except (OSError, ValueError):
            pass
    return total
