"""Checkpoints, at the start of a resumed run: which checkpoint a run resumes from (`--resume
auto`: the newest trustworthy one; or a path), and whether it may resume from it exactly (the
same training-relevant config, training set and world size, unless `--resume-force`).

Trustworthy: readable, every checksum matching (integrity.verify), every value finite
(integrity.nonfinite_parts). `--resume auto` falls back past the others with one warning each.
It never deletes one: a corrupted step file this run wrote is renamed `<name>.corrupted` (kept
for inspection, and out of the way of the save that later writes that step again, and of
pruning); last.pt and best.pt are hard links to step files, so each file is tried and named once.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

from cspx import configio, distributed
from cspx.checkpoint.integrity import CorruptCheckpoint, nonfinite_parts
from cspx.checkpoint.storage import LINKS, CheckpointFiles, load
from cspx.config import Config
from cspx.distributed import DistEnv
from cspx.errors import CspxError

log = logging.getLogger("cspx")

# Keys that may change between a checkpoint and its resumption without changing the training
# trajectory. The dataset is checked by fingerprint, so its path and storage format may change.
# train.max_skipped_steps only decides when a run of skipped steps stops the run.
RESUME_FREE = ("run.", "eval.", "checkpoint.", "data.workers", "data.root", "data.exclude",
               "data.synthetic", "data.format", "data.bad_shards", "model.init_from",
               "model.compile", "train.max_skipped_steps")


def training_diff(old: dict, new: dict) -> List[str]:
    """Dotted keys that differ between two config dicts and do affect training. Keys an older
    cspx did not have take today's defaults on the old side."""
    old = configio.merge(configio.to_dict(Config()), old)
    return [k for k in configio.diff(old, new) if not k.startswith(RESUME_FREE)]


def latest_valid(files: CheckpointFiles) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The newest trustworthy checkpoint (module doc), falling back past the others with a
    warning naming each; None if there is none. Step files newest first, then last.pt where it
    is not one of them (a copy, on file systems without hard links)."""
    steps = [p for _, p in sorted(files.step_files(), reverse=True)]
    links = {}  # link name -> identity, for naming the links of a file
    for name in LINKS:
        ident = _identity(os.path.join(files.dir, name))
        if ident is not None:
            links[name] = ident
    seen = set()
    for path in steps + [os.path.join(files.dir, "last.pt")]:
        ident = _identity(path)
        if ident is None or ident in seen:
            continue
        seen.add(ident)
        names = [n for n, i in links.items() if i == ident and n != os.path.basename(path)]
        also = f" (also named {' and '.join(names)})" if names else ""
        try:
            state = load(path)
        except CorruptCheckpoint as e:
            log.warning(f"skipping corrupted checkpoint{also}: {e}; {_set_aside(files, path)}")
            continue
        except CspxError as e:
            log.warning(f"skipping invalid checkpoint{also}: {e}")
            continue
        bad = nonfinite_parts(state)
        if bad:
            log.warning(f"skipping checkpoint{also}: {path}: NaN or infinite values in its "
                        f"{', '.join(bad)} (the run had diverged)")
            continue
        return path, state
    return None


def _identity(path: str) -> Optional[Tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _set_aside(files: CheckpointFiles, path: str) -> str:
    """Rename a corrupted step file this run wrote to `<name>.corrupted`; say what was done."""
    name = os.path.basename(path)
    if name in LINKS or not files.owns(path):
        return "left as it is"
    kept = path + ".corrupted"
    try:
        os.rename(path, kept)
    except OSError as e:
        return f"left as it is (renaming it failed: {e.strerror or e})"
    return f"kept as {kept} (cspx never deletes it)"


def resume_state(files: CheckpointFiles, env: DistEnv,
                 resume: Optional[str]) -> Optional[Tuple[str, Dict[str, Any]]]:
    """The checkpoint to resume from, (path, state): `--resume auto` (the newest trustworthy in
    `files`, or None), a path (refused unless trustworthy), or None for a fresh start, which is
    refused where this run folder holds checkpoints. Rank 0 chooses; every rank gets the same
    answer."""
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
        bad = nonfinite_parts(state)
        if bad:
            raise CspxError(f"{path}: NaN or infinite values in its {', '.join(bad)} (the run "
                            f"had diverged); resume from an earlier checkpoint")
    log.info(f"resuming from {path} (step {state['progress']['step']})")
    return path, state


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
