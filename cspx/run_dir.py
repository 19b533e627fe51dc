"""The run folder (`run.dir`), at the start of a training run: claiming it, one writer at a time,
and where each file of a run goes.

- Claim. A run writes only into a folder that is new, empty, or already a cspx run folder (it
  holds MARKER, which also holds the run's id). A folder an earlier cspx wrote before markers
  existed (provenance.json naming cspx, beside config.yaml) is adopted. Anything else is
  refused, untouched.
- Lock. One job writes into a run folder at a time. Rank 0 holds an exclusive `fcntl.flock` on
  LOCK for the whole run. The kernel drops the lock when the process exits, however it exits
  (kill -9 included), so a lock is never stale; the other ranks of the same job never take it,
  so they never block each other. A second job fails at once with one line naming the holder.
  On NFS, Linux maps flock to NFS byte-range locks, which hold across hosts. A flock belongs to
  the open file, which a fork shares: a forked child (a DataLoader worker) closes its copy at
  once, so the lock dies with the holder itself, not with the last of its orphaned workers.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from typing import Optional, Set

from cspx.errors import CspxError
from cspx.files import claim_folder, read_marker

MARKER = ".cspx-run"
LOCK = ".cspx-lock"


def _legacy_run(path: str) -> bool:
    """A run folder written by cspx 0.1.0, which had no marker: provenance.json says cspx."""
    try:
        with open(os.path.join(path, "provenance.json"), "r", encoding="utf-8") as f:
            prov = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(prov, dict) and "cspx" in prov and os.path.isfile(
        os.path.join(path, "config.yaml"))


class RunDir:
    """Paths of one run: config.yaml, provenance.json, train.log, metrics.jsonl, tb/,
    checkpoints/ (owned by cspx.checkpoint) and index/ (the DALI file lists)."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        self._fd: Optional[int] = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def claim(self) -> None:
        claim_folder(self.path, MARKER, "training run folder", "run.dir",
                     "Set run.dir to a new folder (it is created).",
                     info={"id": uuid.uuid4().hex}, adopt=_legacy_run)

    @property
    def run_id(self) -> str:
        """The run's id, made when the folder was claimed; every checkpoint records it."""
        return str((read_marker(self.path, MARKER) or {}).get("id", ""))

    def lock(self) -> None:
        """Take the run's lock, or raise CspxError naming the job that holds it."""
        fd = os.open(self.file(LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise CspxError(f"run.dir: {self.path} is in use by another cspx job ({holder}); "
                            f"wait for it to finish, or set run.dir to another folder") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        _held.add(fd)

    def release(self) -> None:
        if self._fd is not None:
            _held.discard(self._fd)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


_held: Set[int] = set()  # lock descriptors this process holds


def _close_in_child() -> None:
    """After a fork, in the child: close the inherited lock descriptors (module doc)."""
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode("utf-8"))
        return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "holder unknown"
