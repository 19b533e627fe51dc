"""Checkpoints, at the start of a resumed run: which checkpoint a run resumes from (`--resume
auto`: the newest valid one; or a path), and whether it may resume from it exactly (the same
training-relevant config, training set and world size, unless `--resume-force`).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

from cspx import configio, distributed
from cspx.checkpoint.storage import CheckpointFiles, load
from cspx.config import Config
from cspx.distributed import DistEnv
from cspx.errors import CspxError

log = logging.getLogger("cspx")

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


def latest_valid(files: CheckpointFiles) -> Optional[Tuple[str, Dict[str, Any]]]:
    """Newest readable checkpoint, falling back past truncated or corrupt ones with a warning."""
    candidates = [p for _, p in sorted(files.step_files(), reverse=True)]
    last = os.path.join(files.dir, "last.pt")
    if os.path.exists(last):
        candidates.insert(0, last)
    for path in candidates:
        try:
            return path, load(path)
        except CspxError as e:
            log.warning(f"skipping invalid checkpoint: {e}")
    return None


def resume_state(files: CheckpointFiles, env: DistEnv,
                 resume: Optional[str]) -> Optional[Dict[str, Any]]:
    """The state to resume from: `--resume auto` (newest valid in `files`, or None), a path, or
    None for a fresh start, which is refused where this run folder holds checkpoints. Rank 0
    chooses; every rank gets the same answer."""
    if resume is None:
        steps = distributed.broadcast_object(
            [s for s, _ in files.step_files()] if env.is_main else None, env)
        if steps:
            raise CspxError(f"run.dir: {os.path.dirname(files.dir)} already holds checkpoints "
                            f"(newest: step {max(steps)}); pass --resume auto to continue "
                            f"that run, or set run.dir to a new folder")
        return None
    if resume == "auto":
        found = latest_valid(files) if env.is_main else None
        path = distributed.broadcast_object(found[0] if found else None, env)
        if path is None:
            log.info("no checkpoint to resume from: starting fresh")
            return None
        state = found[1] if found is not None else load(path)
    else:
        path, state = resume, load(resume)
    log.info(f"resuming from {path} (step {state['progress']['step']})")
    return state


def check_compat(state: Dict[str, Any], *, config: Dict[str, Any], fingerprint: str,
                 world: int, force: bool) -> bool:
    """Refuse to resume a different experiment unless forced: `config` (the run's resolved
    config as a dict), `fingerprint` (its training set's) and `world` (its world size) against
    the checkpoint's. Returns whether the world size is the checkpoint's (then every rank
    restores its own state)."""
    old = configio.flatten(configio.merge(configio.to_dict(Config()), state["config"]))
    new = configio.flatten(config)
    problems = [f"{k} ({old.get(k)!r} -> {new.get(k)!r})"
                for k in training_diff(state["config"], config)]
    if state.get("data_fingerprint") != fingerprint:
        problems.append("the training set (files or labels) changed")
    if state["world_size"] != world:
        problems.append(f"world size ({state['world_size']} -> {world})")
    if problems and not force:
        raise CspxError("cannot resume exactly, the run differs from its checkpoint in: "
                        + ", ".join(problems) + "; pass --resume-force to continue anyway")
    if problems:
        log.warning("resuming with --resume-force despite: " + ", ".join(problems))
    return state["world_size"] == world
