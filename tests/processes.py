"""Processes started by tests, seen from /proc: their descendants, and which are still alive."""

from __future__ import annotations

import contextlib
import os


def _live(field: int, value: int) -> set[int]:
    """Live processes whose /proc stat field ``field`` (after the name: 1 = parent, 2 = process group) is ``value``."""
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[field]) == value and fields[0] != b"Z":
            found.add(int(entry))
    return found


def _children(pid: int) -> set[int]:
    """Live children of ``pid``."""
    return _live(1, pid)


def group_members(pgid: int) -> set[int]:
    """Live processes of the process group ``pgid``."""
    return _live(2, pgid)


def descendants(pid: int) -> set[int]:
    """Live children of ``pid``, theirs, and so on."""
    found, todo = set(), [pid]
    while todo:
        for child in _children(todo.pop()):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat", "rb") as f:  # no such file: it exited
            if f.read().rsplit(b")", 1)[1].split()[0] != b"Z":  # a zombie has exited too
                living.add(pid)
    return living


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode()
    except OSError:
        return ""
