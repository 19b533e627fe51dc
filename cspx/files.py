"""Writing files without losing anyone's data: atomic writes, and the ownership rules that keep
cspx from deleting or overwriting anything it did not create itself.

Every write in cspx goes through `atomic_write` (or `atomic_save` for checkpoints): a temp file
named `.<name>.tmp<pid>` in the same folder, flushed and fsynced, then `os.replace`d over the
target, then the folder fsynced. A crash leaves the old file intact and at worst a stray temp
file, which only `remove_stale_temps` removes, and only when its pid is dead.

Ownership. cspx deletes or replaces a path only when it can prove it created it:
- a folder cspx made carries a marker file (`claim_folder`); a non-empty folder without one is
  refused, with one line naming it;
- a temp file carries the pid of the process that wrote it;
- an output flag whose documented job is to (re)write a file (`validate.py --json`) overwrites;
  any other existing file is refused unless `--force` is given (`check_writable`).
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable, Dict, Optional, Union

from cspx.errors import CspxError

TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tmp(?P<pid>\d+)$")


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (some filesystems cannot open folders: then skip)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: str) -> str:
    """`.<name>.tmp<pid>` beside `path`: the only temp name cspx writes."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp{os.getpid()}")


Content = Union[bytes, str, Callable[[Any], None]]


def atomic_write(path: str, content: Content, durable: bool = True) -> None:
    """Write `content` (bytes, text, or a function writing to a binary file object) to `path`
    atomically. durable=False skips the fsyncs (caches that can be rebuilt)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def write_json(path: str, obj: Any, durable: bool = True) -> None:
    atomic_write(path, json.dumps(obj, indent=2) + "\n", durable)


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temps(folder: str, wanted: Callable[[str], bool]) -> int:
    """Remove `.<name>.tmp<pid>` files in `folder` whose writer is dead and whose <name> is one
    cspx writes there (`wanted(name)`). Returns how many were removed."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for e in entries:
        m = TEMP_RE.match(e.name)
        if not m or not e.is_file(follow_symlinks=False):
            continue
        if not wanted(m.group("name")):
            continue
        if pid_alive(int(m.group("pid"))):
            continue
        try:
            os.remove(e.path)
            removed += 1
        except OSError:
            pass
    return removed


def read_marker(folder: str, marker: str) -> Optional[Dict[str, Any]]:
    """The marker's JSON if `folder/marker` exists (an empty or unreadable marker counts as {})."""
    path = os.path.join(folder, marker)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def folder_is_empty(path: str) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def claim_folder(path: str, marker: str, what: str, key: str, hint: str,
                 info: Optional[Dict[str, Any]] = None,
                 adopt: Optional[Callable[[str], bool]] = None) -> bool:
    """Make `path` a folder cspx may write in, or refuse with one line.

    The folder is claimed when it does not exist (created), is empty, or already carries the
    marker; `adopt(path)` may accept a folder an earlier cspx wrote before markers existed.
    Anything else stops with `<key>: <path> ... not a <what> ...; <hint>`. Returns True when the
    folder was claimed just now (created, or adopted)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise CspxError(f"{key}: {path} exists and is not a folder; {hint}")
    if os.path.isdir(path) and read_marker(path, marker) is not None:
        return False
    if os.path.isdir(path) and not folder_is_empty(path) and not (adopt and adopt(path)):
        raise CspxError(f"{key}: {path} is not empty and was not made by cspx as a {what} "
                        f"(no {marker} in it); nothing in it was touched. {hint}")
    os.makedirs(path, exist_ok=True)
    record = {"what": what, "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "pid": os.getpid(), **(info or {})}
    write_json(os.path.join(path, marker), record)
    return True


def check_writable(path: str, flag: str, force: bool,
                   owned: Optional[Callable[[str], bool]] = None) -> None:
    """Refuse to replace an existing `path` unless `force`, or `owned(path)` proves that cspx
    wrote it (so a re-run may refresh its own output)."""
    if not os.path.lexists(path) or force:
        return
    if os.path.isdir(path):
        raise CspxError(f"{flag}: {path} is a folder")
    if owned is not None and owned(path):
        return
    raise CspxError(f"{flag}: {path} already exists and was not written by this tool; "
                    f"nothing was written. Choose another path, or pass --force to replace it")
