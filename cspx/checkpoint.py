"""Checkpoints, at every save and at the start of a resumed run: the one owner of
`<run.dir>/checkpoints/`. It decides what a checkpoint holds (the layout), when one is written
(the `checkpoint.*` keys), writes and reads it atomically, prunes, finds the resume point, and
refuses a resume that would not be exact.

Layout (FORMAT "cspx-checkpoint", FORMAT_VERSION 1): only tensors and plain Python values, so
`torch.load(weights_only=True)` reads it back.
  format, format_version
  model, optimizer, scaler, ema (None without EMA), progress   shared by all ranks (rank 0's)
  world_size, ranks[r] = {"rng": ..., "loader": ...}          every rank's own, gathered
  config, config_hash, data_fingerprint, model_name, num_classes, classes, cspx_version,
  git_commit                                                   what the run is


Files: `step_00012000.pt` (the newest `checkpoint.keep_last` are kept), `last.pt` (the newest)
and `best.pt` (best eval top-1) as hard links to step files, so neither costs a second write.
Pruning and re-linking touch only checkpoints that record this run's id (`written_by`; an
unreadable file only when RECORD lists its name), never a file someone else put there.

Writes are atomic (cspx.files). With `async_save` the state is first copied to host memory
(training may change the live tensors), then written by a background thread; the next save or
`close()` waits for it, and a failure there stops the run at the next step boundary.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Set, Tuple

import torch

from cspx import configio, distributed
from cspx.config import CheckpointConfig, Config
from cspx.distributed import DistEnv
from cspx.errors import CspxError
from cspx.files import atomic_write, fsync_dir, remove_stale_temps, temp_path

log = logging.getLogger("cspx")

FORMAT = "cspx-checkpoint"
FORMAT_VERSION = 1
STEP_RE = re.compile(r"^step_(\d+)\.pt$")
LINKS = ("last.pt", "best.pt")
RECORD = ".cspx-written"  # names of the files this run wrote, one per line
SHARED = ("model", "optimizer", "scaler", "ema", "progress")
PER_RANK = ("rng", "loader")
PORTABLE = ("loader",)  # per-rank parts offered rank 0's state on another world size

# Keys that may change between a checkpoint and its resumption without changing the training
# trajectory. The dataset is checked by fingerprint, so its path and storage format may change.
RESUME_FREE = ("run.", "eval.", "checkpoint.", "data.workers", "data.root", "data.exclude",
               "data.synthetic", "data.format", "data.bad_shards", "model.init_from",
               "model.compile")


def training_diff(old: dict, new: dict) -> List[str]:
    """Dotted keys that differ between two config dicts and do affect training. Keys an older
    cspx did not have take today's defaults on the old side."""
    old = configio.merge(configio.to_dict(Config()), old)
    return [k for k in configio.diff(old, new) if not k.startswith(RESUME_FREE)]


def atomic_save(obj: Any, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


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


class Checkpointer:
    """Saves and restores a run's state in `<run_dir>/checkpoints/` (writes on rank 0 only)."""

    def __init__(self, run_dir: str, cfg: CheckpointConfig, env: DistEnv,
                 meta: Optional[Dict[str, Any]] = None):
        self.dir = os.path.join(run_dir, "checkpoints")
        self.every, self.keep_last, self.async_save = cfg.every_steps, cfg.keep_last, cfg.async_save
        self.env, self.meta = env, dict(meta or {})
        self.run_id = self.meta.setdefault("run_id", "")
        self._known: Set[Tuple[int, int, int]] = set()  # identities of files known to be ours
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        if env.is_main:
            os.makedirs(self.dir, exist_ok=True)

    # ----- policy -----------------------------------------------------------------------------
    def due(self, step: int, total: int, best: bool = False, stopping: bool = False) -> bool:
        """A checkpoint is written every `checkpoint.every_steps` steps, at the end, after an
        evaluation with a new best top-1, and when a signal stops the run."""
        periodic = bool(self.every) and step % self.every == 0
        return periodic or best or stopping or step == total

    # ----- layout -----------------------------------------------------------------------------
    def snapshot(self, shared: Mapping[str, Any], per_rank: Mapping[str, Any]) -> Dict[str, Any]:
        """The whole run state (a collective: every rank's per-rank parts are gathered)."""
        ranks = distributed.all_gather_objects({k: per_rank[k].state_dict() for k in PER_RANK},
                                               self.env)
        state: Dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
        for k in SHARED:
            part = shared.get(k)
            state[k] = part.state_dict() if part is not None else None
        return {**state, "world_size": self.env.world, "ranks": ranks, **self.meta}

    def restore(self, state: Dict[str, Any], shared: Mapping[str, Any],
                per_rank: Mapping[str, Any], same_world: bool, force: bool = False) -> List[str]:
        """Load every part from `state`. On another world size only the portable per-rank
        parts get rank 0's state (and decide themselves whether they can follow it); the RNGs
        start afresh. A per-rank part that cannot take its state (a loader of another kind or
        graph) stops the resume, or with `force` starts afresh with a warning. Returns the
        shared parts the checkpoint does not hold."""
        missing = []
        for k in SHARED:
            part = shared.get(k)
            if part is None:
                continue
            if state.get(k) is None:
                missing.append(k)
                continue
            part.load_state_dict(state[k])
        for k in PER_RANK:
            if not same_world and k not in PORTABLE:
                continue
            try:
                per_rank[k].load_state_dict(state["ranks"][self.env.rank if same_world else 0][k])
            except CspxError as e:
                if not force:
                    raise CspxError(f"{e}; pass --resume-force to continue with the {k} "
                                    f"started afresh") from None
                if self.env.is_main:
                    log.warning(f"{e}; with --resume-force the {k} starts afresh")
        return missing

    # ----- write ------------------------------------------------------------------------------
    def path_for(self, step: int) -> str:
        return os.path.join(self.dir, f"step_{step:08d}.pt")

    def save(self, state: Dict[str, Any], step: int, best: bool = False,
             blocking: bool = False) -> str:
        """Write `state` as the checkpoint of `step` (rank 0 only; other ranks return at once)."""
        path = self.path_for(step)
        if not self.env.is_main:
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
            remove_stale_temps(self.dir, lambda n: bool(STEP_RE.match(n)) or n in LINKS)
            self._check_ours(path)
            self._record(os.path.basename(path))
            atomic_save(state, path)
            self._known.add(_identity(path))
            self._link(path, "last.pt")
            if best:
                self._link(path, "best.pt")
            self._prune()
        except OSError as e:
            raise CspxError(f"{path}: saving the checkpoint failed ({e.strerror or e}); "
                            f"earlier checkpoints in {self.dir} are intact") from None

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
        if os.path.lexists(path) and not self._ours(path):
            raise CspxError(f"{path}: exists and was not written by this run; move it away")

    def _ours(self, path: str) -> bool:
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
        own = [(s, p) for s, p in self.step_files() if self._ours(p)]
        for _, path in sorted(own, reverse=True)[self.keep_last:]:
            os.remove(path)

    def step_files(self) -> List[Tuple[int, str]]:
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        return [(int(m.group(1)), os.path.join(self.dir, n))
                for n in names for m in [STEP_RE.match(n)] if m]

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

    # ----- read: where a run resumes ------------------------------------------------------------
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

    def resume_state(self, resume: Optional[str]) -> Optional[Dict[str, Any]]:
        """The state to resume from: `--resume auto` (newest valid here, or None), a path, or
        None for a fresh start, which is refused where this run folder holds checkpoints."""
        env = self.env
        if resume is None:
            steps = distributed.broadcast_object(
                [s for s, _ in self.step_files()] if env.is_main else None, env)
            if steps:
                raise CspxError(f"run.dir: {os.path.dirname(self.dir)} already holds checkpoints "
                                f"(newest: step {max(steps)}); pass --resume auto to continue "
                                f"that run, or set run.dir to a new folder")
            return None
        if resume == "auto":
            found = self.latest_valid() if env.is_main else None
            path = distributed.broadcast_object(found[0] if found else None, env)
            if path is None:
                log.info("no checkpoint to resume from: starting fresh")
                return None
            state = found[1] if env.is_main else load(path)
        else:
            path, state = resume, load(resume)
        log.info(f"resuming from {path} (step {state['progress']['step']})")
        return state

    def check_compat(self, state: Dict[str, Any], cfg_dict: Dict[str, Any], fingerprint: str,
                     force: bool) -> bool:
        """Refuse to resume a different experiment unless forced. Returns whether the world size
        is the checkpoint's (then every rank restores its own state)."""
        old = configio.flatten(configio.merge(configio.to_dict(Config()), state["config"]))
        new = configio.flatten(cfg_dict)
        problems = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})"
                    for k in training_diff(state["config"], cfg_dict)]
        if state.get("data_fingerprint") != fingerprint:
            problems.append("the training set (files or labels) changed")
        world = self.env.world
        if state["world_size"] != world:
            problems.append(f"world size ({state['world_size']} -> {world})")
        if problems and not force:
            raise CspxError("cannot resume exactly, the run differs from its checkpoint in: "
                            + ", ".join(problems) + "; pass --resume-force to continue anyway")
        if problems:
            log.warning("resuming with --resume-force despite: " + ", ".join(problems))
        return state["world_size"] == world


Stateful = Callable  # documentation alias: parts expose state_dict() and load_state_dict()
