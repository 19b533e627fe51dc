"""Atomic, prunable training checkpoints in `<run.dir>/checkpoints/`.

Layout: `step_00012000.pt` files (the newest `keep_last` are kept), `last.pt` (the newest) and
`best.pt` (best eval top-1) as hard links to step files, so neither costs a second write and
pruning a step file never breaks them.

A write is atomic: temp file in the same folder -> flush + fsync -> os.replace -> fsync of the
folder. A crash at any moment leaves the previous checkpoint intact and at worst a stray
`.tmp` file, which the next save removes.

Only tensors and plain Python values go in, so `torch.load(weights_only=True)` reads it back.
With `async_save`, the state is first copied to host memory (the training step may continue to
change the live tensors), then serialised by a background thread; the next save or `close()`
waits for it, and a failure there stops the run at the next step boundary.
"""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import threading
from typing import Any, Dict, List, Optional, Tuple

import torch

from cspx.errors import CspxError

log = logging.getLogger("cspx")

FORMAT = "cspx-checkpoint"
FORMAT_VERSION = 1
STEP_RE = re.compile(r"step_(\d+)\.pt$")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _link(src: str, dst: str) -> None:
    """Atomically point `dst` at the same file as `src` (hard link; a copy where links fail)."""
    folder = os.path.dirname(dst)
    tmp = os.path.join(folder, f".{os.path.basename(dst)}.tmp{os.getpid()}")
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    _fsync_dir(folder)


def to_host(obj: Any) -> Any:
    """Deep copy with every tensor on the CPU and detached from the live one."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def load(path: str) -> Dict[str, Any]:
    """Read a cspx checkpoint; raises CspxError naming the file if it is not a valid one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CspxError(f"{path}: checkpoint not found") from None
    except Exception as e:  # truncated zip, pickle errors, disallowed globals...
        raise CspxError(f"{path}: not a readable checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CspxError(f"{path}: not a cspx training checkpoint (use model.init_from for weights)")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise CspxError(f"{path}: written by a newer cspx (format {state['format_version']})")
    return state


class CheckpointManager:
    def __init__(self, run_dir: str, keep_last: int, async_save: bool, is_main: bool):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.keep_last, self.async_save, self.is_main = keep_last, async_save, is_main
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        if is_main:
            os.makedirs(self.dir, exist_ok=True)

    def path_for(self, step: int) -> str:
        return os.path.join(self.dir, f"step_{step:08d}.pt")

    def save(self, state: Dict[str, Any], step: int, best: bool = False,
             blocking: bool = False) -> str:
        """Write `state` as the checkpoint of `step` (rank 0 only; other ranks return at once)."""
        path = self.path_for(step)
        if not self.is_main:
            return path
        self.wait()
        if self.async_save and not blocking:
            snapshot = to_host(state)
            self._thread = threading.Thread(target=self._write_guarded, args=(snapshot, path, best),
                                            name="cspx-checkpoint", daemon=False)
            self._thread.start()
        else:
            self._write(state, path, best)
        return path

    def _write_guarded(self, state, path, best) -> None:
        try:
            self._write(state, path, best)
        except BaseException as e:
            self._error = e

    def _write(self, state: Dict[str, Any], path: str, best: bool) -> None:
        try:
            for stale in glob.glob(os.path.join(self.dir, ".*.tmp*")):
                os.remove(stale)
            atomic_save(state, path)
            _link(path, os.path.join(self.dir, "last.pt"))
            if best:
                _link(path, os.path.join(self.dir, "best.pt"))
            self._prune()
        except OSError as e:
            raise CspxError(f"{path}: saving the checkpoint failed ({e.strerror or e}); "
                            f"earlier checkpoints in {self.dir} are intact") from None

    def _prune(self) -> None:
        steps = sorted(self.step_files(), reverse=True)
        for _, path in steps[self.keep_last:]:
            os.remove(path)

    def step_files(self) -> List[Tuple[int, str]]:
        out = []
        for p in glob.glob(os.path.join(self.dir, "step_*.pt")):
            m = STEP_RE.search(p)
            if m:
                out.append((int(m.group(1)), p))
        return out

    def wait(self) -> None:
        """Wait for a background write; re-raise its failure here, in the training thread."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()

    def check(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        self.wait()

    def latest_valid(self) -> Optional[Tuple[str, Dict[str, Any]]]:
        """Newest readable checkpoint, falling back past truncated or corrupt ones with a warning."""
        candidates = [p for _, p in sorted(self.step_files(), reverse=True)]
        last = os.path.join(self.dir, "last.pt")
        if os.path.exists(last):
            candidates.insert(0, last)
        for path in candidates:
            try:
                return path, load(path)
            except CspxError as e:
                log.warning(f"skipping invalid checkpoint: {e}")
        return None
