"""Which process owns a run, and whether that process is still alive.

A process is named by host, pid and the kernel's start time of that pid, so that a pid reused by
another process after a crash does not pass for the original.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def identity(pid: int | None = None) -> str:
    """`host pid start-ticks` of this process (or of `pid` on this host)."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()} {pid} {_start_ticks(pid)}"


def alive(named: str) -> bool | None:
    """Whether the process `identity()` named is running; None when it ran on another host,
    where this machine cannot tell."""
    host, pid, ticks = named.rsplit(" ", 2)
    if host != socket.gethostname():
        return None
    return _start_ticks(int(pid)) == ticks


def host_of(named: str) -> str:
    return named.rsplit(" ", 2)[0]


def pid_of(named: str) -> int:
    return int(named.rsplit(" ", 2)[1])


def _start_ticks(pid: int) -> str:
    try:  # field 22 of /proc/PID/stat, after the command name in parentheses (which may hold spaces)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "gone"
