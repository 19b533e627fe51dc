"""What a run records, from its start to its end: the provenance header, the console and
train.log, metrics.jsonl and TensorBoard.

On resume from step S, events after S (written between that checkpoint and the interruption) are
dropped from metrics.jsonl and purged from TensorBoard, so both continue with no duplicated and no
missing steps.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any, Dict, Optional

import torch

import cspx
from cspx.files import atomic_write

log = logging.getLogger("cspx")


def git_commit() -> str:
    """Commit of the cspx source tree, with '+dirty' for uncommitted changes; 'unknown' outside
    git."""
    src = os.path.dirname(os.path.dirname(os.path.abspath(cspx.__file__)))
    try:
        r = subprocess.run(["git", "-C", src, "rev-parse", "--verify", "-q", "HEAD"],
                           capture_output=True, text=True, timeout=10)
        sha = r.stdout.strip()
        if r.returncode != 0 or not sha:
            return "unknown"
        dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def versions() -> Dict[str, str]:
    import torchvision
    out = {"cspx": cspx.__version__, "python": platform.python_version(),
           "torch": torch.__version__, "torchvision": torchvision.__version__,
           "cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version())}
    # from package metadata: importing DALI costs seconds and is not needed to name its version
    from importlib import metadata
    dali = [f"{d.metadata['Name']} {d.version}" for d in metadata.distributions()
            if (d.metadata["Name"] or "").startswith("nvidia-dali")]
    out["dali"] = ", ".join(sorted(dali)) or "not installed"
    return out


def provenance(device: torch.device, world: int = 1) -> Dict[str, Any]:
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": socket.gethostname(),
            "commit": git_commit(), **versions(), "device": device_name(device),
            "world_size": world, "command": " ".join([sys.executable] + sys.argv)}


def format_provenance(p: Dict[str, Any]) -> str:
    width = max(len(k) for k in p)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in p.items())


class _Stderr(logging.StreamHandler):
    """stderr as it is when a record is logged (tests and tools swap sys.stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _Buffer(logging.Handler):
    """Keeps the records logged before the run folder is claimed, for train.log."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def setup_console(is_main: bool, verbose: bool = False, keep: bool = False) -> None:
    """Log 'cspx' messages to stderr (rank 0, or warnings on other ranks). With `keep`, rank 0
    also keeps them until `attach_log_file` names the run's train.log."""
    logger = logging.getLogger("cspx")
    logger.handlers.clear()
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    h = _Stderr(sys.stderr)
    h.setLevel(logging.INFO if is_main else logging.WARNING)
    h.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(h)
    if is_main and keep:
        logger.addHandler(_Buffer())


def to_log_files(message: str, level: int = logging.ERROR) -> None:
    """`message` into the log files only (train.log): the error line a run ends with, which the
    command line prints on the console itself."""
    logger = logging.getLogger("cspx")
    record = logger.makeRecord(logger.name, level, __file__, 0, message, (), None)
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def attach_log_file(path: str) -> None:
    """Append the log to `path` from now on, starting with what was logged so far."""
    logger = logging.getLogger("cspx")
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for h in [h for h in logger.handlers if isinstance(h, _Buffer)]:
        for record in h.records:
            fh.handle(record)
        logger.removeHandler(h)
    logger.addHandler(fh)


def finite_json(values: Dict[str, Any]) -> Dict[str, Any]:
    """`values` with each non-finite float replaced by None, plus `nonfinite`: {key: "nan",
    "inf" or "-inf"} when there was any."""
    out: Dict[str, Any] = {}
    bad: Dict[str, str] = {}
    for k, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            bad[k] = "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
            v = None
        out[k] = v
    if bad:
        out["nonfinite"] = bad
    return out


class MetricsLog:
    """metrics.jsonl (one JSON object per event, with step and wall time) and TensorBoard."""

    def __init__(self, *, run_dir: str, resume_step: Optional[int], tensorboard: bool,
                 enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is not None:
            self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events at steps >= it that a killed run wrote after its checkpoint
            purge = resume_step + 1 if resume_step is not None else None
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge)
        self._f = open(self.path, "a", encoding="utf-8")

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path, "r", encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line)
                except ValueError:  # a line cut by the kill
                    continue
        atomic_write(self.path, "".join(kept))

    def write(self, kind: str, step: int, values: Dict[str, float]) -> None:
        """One line of strict JSON: a non-finite value is written as null, and the record's
        `nonfinite` field says what it was ({"loss": "nan"}), since NaN and Infinity are not
        JSON and strict parsers reject them. TensorBoard gets the value as it is."""
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **finite_json(values)}
        self._f.write(json.dumps(rec, allow_nan=False) + "\n")
        self._f.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def image_grid(self, tag: str, images: torch.Tensor, step: int = 0) -> None:
        if self.enabled and self.tb is not None:
            self.tb.add_images(tag, images, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self.tb is not None:
            self.tb.close()
