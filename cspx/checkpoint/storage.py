"""Checkpoints, at every save and at the start of a resumed run: the files of
`<run.dir>/checkpoints/`, written atomically, linked, pruned and read, and the proof of which of
them this run wrote.

Files: `step_00012000.pt` (the newest `checkpoint.keep_last` are kept), `last.pt` (the newest)
and `best.pt` (best eval top-1) as hard links to step files, so neither costs a second write.
Pruning and re-linking touch only checkpoints that record this run's id (`written_by`; an
unreadable file only when RECORD lists its name), never a file someone else put there.

Writes are atomic (cspx.files): a crash at any point leaves every earlier checkpoint intact. A
write that fails (disk full, quota, file-size limit, I/O error) removes its temp file, leaves the
earlier checkpoints and the links as they were, and raises `SaveFailed`; the Checkpointer decides
whether the run goes on. Reads verify the file's checksums first (`integrity.verify`).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

import torch

from cspx.checkpoint import integrity
from cspx.checkpoint.layout import FORMAT, FORMAT_VERSION
from cspx.errors import CspxError, RunFailure
from cspx.files import atomic_write, fsync_dir, remove_stale_temps, temp_path

STEP_RE = re.compile(r"^step_(\d+)\.pt$")
LINKS = ("last.pt", "best.pt")
RECORD = ".cspx-written"  # names of the files this run wrote, one per line


def atomic_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


class SaveFailed(RunFailure):
    """A checkpoint write failed with an OSError; nothing of it is left, the earlier checkpoints
    and links are intact. `error` is the OSError."""

    def __init__(self, path: str, error: OSError):
        code = errno.errorcode.get(error.errno or 0)
        why = f"{error.strerror or error}" + (f", {code}" if code else "")
        super().__init__(f"{path}: saving the checkpoint failed ({why}); earlier checkpoints in "
                         f"{os.path.dirname(path)} are intact")
        self.path, self.error = path, error


def load(path: str) -> Dict[str, Any]:
    """Read a cspx checkpoint, its checksums verified first; raises CspxError naming the file if
    it is not a valid one (integrity.CorruptCheckpoint when its bytes changed)."""
    integrity.verify(path)
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


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind a failed write: `e` itself, or the one a RuntimeError of torch.save's
    zip writer was raised while handling (a failed write of the file object leaves the writer's
    end-of-file record with "unexpected pos"); None if there is none."""
    seen = set()
    cur: Optional[BaseException] = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def written_by(path: str, run_id: str, recorded: Iterable[str] = ()) -> bool:
    """Whether `path` is a checkpoint file of the run `run_id`: a cspx checkpoint that records
    this run id, or none at all (cspx 0.1.0 wrote no id; its files in a run folder are the
    run's); or, when it cannot be read (truncated, corrupt), a name in `recorded`, the names
    this run has written. Memory-mapped: the tensors are not read. The id travels inside the
    file, so a run folder copied or moved elsewhere stays its run's."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable: only the record can prove it ours
        return os.path.basename(path) in set(recorded)
    return (isinstance(obj, dict) and obj.get("format") == FORMAT
            and obj.get("run_id", run_id) == run_id)


def _identity(path: str) -> Tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class CheckpointFiles:
    """The checkpoint folder of the run `run_id`. Only rank 0 writes (`create` makes the
    folder); any rank may list and read."""

    def __init__(self, *, folder: str, run_id: str, keep_last: int, create: bool):
        self.dir, self.run_id, self.keep_last = folder, run_id, keep_last
        self._known: Set[Tuple[int, int, int]] = set()  # identities of files known to be ours
        if create:
            os.makedirs(self.dir, exist_ok=True)

    def path_for(self, step: int) -> str:
        return os.path.join(self.dir, f"step_{step:08d}.pt")

    def step_files(self) -> List[Tuple[int, str]]:
        """(step, path) of every step file in the folder, whoever wrote it, in no order."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        return [(int(m.group(1)), os.path.join(self.dir, n))
                for n in names for m in [STEP_RE.match(n)] if m]

    def write(self, state: Dict[str, Any], path: str, *, best: bool) -> None:
        """Write `state` to `path` atomically, point last.pt (and with `best`, best.pt) at it,
        and prune this run's older step files. An OSError is a SaveFailed naming the file."""
        try:
            remove_stale_temps(self.dir, lambda n: bool(STEP_RE.match(n)) or n in LINKS)
            self._check_ours(path)
            self._record(os.path.basename(path))
            atomic_save(state, path)
            self._known.add(_identity(path))
            self._link(path, "last.pt")
            if best:
                self._link(path, "best.pt")
            self._prune()
        except (OSError, RuntimeError) as e:
            cause = _os_error(e)
            if cause is None:
                raise
            raise SaveFailed(path, cause) from None

    def _link(self, src: str, name: str) -> None:
        """Atomically point `name` at the same file as `src` (a hard link; a copy where links
        fail), replacing only a file this run wrote."""
        dst = os.path.join(self.dir, name)
        self._check_ours(dst)
        self._record(name)
        tmp = temp_path(dst)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        fsync_dir(self.dir)
        self._known.add(_identity(dst))

    def _check_ours(self, path: str) -> None:
        if os.path.lexists(path) and not self.owns(path):
            raise CspxError(f"{path}: exists and was not written by this run; move it away")

    def owns(self, path: str) -> bool:
        """written_by, skipped for the files this process wrote or checked already (identified
        by inode, size and mtime): a save then reads no other checkpoint."""
        try:
            ident = _identity(path)
        except OSError:
            return False
        if ident in self._known:
            return True
        ours = written_by(path, self.run_id, self._recorded())
        if ours:
            self._known.add(ident)
        return ours

    def _recorded(self) -> List[str]:
        try:
            with open(os.path.join(self.dir, RECORD), "r", encoding="utf-8") as f:
                return f.read().split()
        except OSError:
            return []

    def _record(self, name: str) -> None:
        """Note `name` before writing it, so even a file later found truncated is provably ours."""
        if name in self._recorded():
            return
        with open(os.path.join(self.dir, RECORD), "a", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _prune(self) -> None:
        """Keep the newest `keep_last` step files this run wrote and remove its older ones;
        files it did not write neither count nor go."""
        own = [(s, p) for s, p in self.step_files() if self.owns(p)]
        for _, path in sorted(own, reverse=True)[self.keep_last:]:
            os.remove(path)
