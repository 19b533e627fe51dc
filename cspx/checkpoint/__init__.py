"""Checkpoints, at every save and at the start of a resumed run: the one owner of
`<run.dir>/checkpoints/`, by concern:

  layout.py        what a checkpoint holds (FORMAT, the shared and per-rank parts, `Parts`)
  integrity.py     whether it can be trusted: its checksums (`verify`), its values all finite
  storage.py       its files: atomic writes, last.pt/best.pt links, ownership, pruning, `load`
  resume.py        where a run resumes, and whether exactly (`RESUME_FREE`, `training_diff`)
  checkpointer.py  the `Checkpointer`: when to save, the background writer, failed saves

The names other modules use are importable from here: `from cspx.checkpoint import load`.
"""
from cspx.checkpoint.checkpointer import Checkpointer, NonfiniteState
from cspx.checkpoint.integrity import CorruptCheckpoint, nonfinite_parts, verify
from cspx.checkpoint.layout import (
    FORMAT,
    FORMAT_VERSION,
    PER_RANK,
    SHARED,
    Part,
    Parts,
    leaves,
    to_host,
)
from cspx.checkpoint.resume import RESUME_FREE, check_compat, latest_valid, training_diff
from cspx.checkpoint.storage import (
    RECORD,
    CheckpointFiles,
    SaveFailed,
    atomic_save,
    load,
    written_by,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "PER_RANK", "RECORD", "RESUME_FREE", "SHARED",
           "CheckpointFiles", "Checkpointer", "CorruptCheckpoint", "NonfiniteState", "Part",
           "Parts", "SaveFailed", "atomic_save", "check_compat", "latest_valid", "load",
           "leaves", "nonfinite_parts", "to_host", "training_diff", "verify", "written_by"]
