"""Checkpoints, at every step of the loop: the `Checkpointer` decides when a checkpoint is written
and writes it, in the background with `checkpoint.async_save`.

The run's stateful parts register once (`register`). The loop then asks once per step
(`maybe_save`) and the checkpointer decides: a checkpoint every `checkpoint.every_steps` steps,
at the last step, after an evaluation with a new best top-1, and when a signal stops the run.

With `async_save` the state is first copied to host memory (training may change the live
tensors), then written by a background thread; the next save or `close()` waits for it. A
background write's failure is raised in the training thread at the next step boundary
(`maybe_save` and `raise_write_failure`), so the run stops there with it.

What a checkpoint holds is `layout`'s, where its files go `storage`'s, where a run resumes
`resume`'s; this class is their one entry point for the run.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Mapping, Optional, Tuple

from cspx.checkpoint import resume as resume_point
from cspx.checkpoint.layout import Part, Parts, to_host
from cspx.checkpoint.storage import CheckpointFiles
from cspx.config import CheckpointConfig
from cspx.distributed import DistEnv


class Checkpointer:
    """Saves and restores a run's state in `<run_dir>/checkpoints/` (writes on rank 0 only).
    `meta` is what every checkpoint records about the run besides its state (layout's meta;
    its "run_id" marks the files this run owns)."""

    def __init__(self, *, run_dir: str, cfg: CheckpointConfig, env: DistEnv,
                 meta: Optional[Mapping[str, Any]] = None):
        self.every, self.async_save = cfg.every_steps, cfg.async_save
        self.env, self.meta = env, dict(meta or {})
        self.run_id = self.meta.setdefault("run_id", "")
        self.files = CheckpointFiles(folder=os.path.join(run_dir, "checkpoints"),
                                     run_id=self.run_id, keep_last=cfg.keep_last,
                                     create=env.is_main)
        self.dir = self.files.dir
        self.parts: Optional[Parts] = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def register(self, *, shared: Mapping[str, Optional[Part]],
                 per_rank: Mapping[str, Part]) -> None:
        """The run's stateful parts, once, by their layout names (layout.SHARED, PER_RANK)."""
        self.parts = Parts(shared=shared, per_rank=per_rank)

    def _registered(self) -> Parts:
        if self.parts is None:
            raise RuntimeError("Checkpointer.register must name the run's parts first")
        return self.parts

    # ----- when -------------------------------------------------------------------------------
    def due(self, step: int, *, last_step: int, best: bool = False, stopping: bool = False) -> bool:
        """A checkpoint is written every `checkpoint.every_steps` steps, at `last_step`, after
        an evaluation with a new best top-1, and when a signal stops the run."""
        periodic = bool(self.every) and step % self.every == 0
        return periodic or best or stopping or step == last_step

    def maybe_save(self, step: int, *, last_step: int, best: bool = False,
                   stopping: bool = False) -> bool:
        """Called by every rank after each optimizer step (and its evaluation): saves when a
        checkpoint is `due` (a collective then), waiting for the write at the last step and when
        stopping; then raises a background write's failure, if one failed. Returns whether it
        saved."""
        saved = self.due(step, last_step=last_step, best=best, stopping=stopping)
        if saved:
            self.save(step, best=best, blocking=stopping or step == last_step)
        self.raise_write_failure()
        return saved

    # ----- what -------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The whole run state and meta (a collective: gathers every rank's per-rank parts)."""
        return self._registered().snapshot(self.env, self.meta)

    def restore(self, state: Dict[str, Any], *, same_world: bool = True,
                force: bool = False) -> List[str]:
        """Load the registered parts from `state` (layout.Parts.restore); returns the shared
        parts the checkpoint does not hold."""
        return self._registered().restore(state, self.env, same_world=same_world, force=force)

    # ----- write ------------------------------------------------------------------------------
    def path_for(self, step: int) -> str:
        return self.files.path_for(step)

    def save(self, step: int, *, best: bool = False, blocking: bool = False) -> str:
        """The registered parts' state as the checkpoint of `step` (a collective: every rank
        calls it; rank 0 writes)."""
        return self.write(self.state_dict(), step, best=best, blocking=blocking)

    def write(self, state: Dict[str, Any], step: int, *, best: bool = False,
              blocking: bool = False) -> str:
        """Write `state` as the checkpoint of `step` (rank 0 only; other ranks return at once),
        in the background with async_save unless `blocking`."""
        path = self.files.path_for(step)
        if not self.env.is_main:
            return path
        self.wait()
        if self.async_save and not blocking:
            snapshot = to_host(state)
            self._thread = threading.Thread(target=self._write_guarded, args=(snapshot, path, best),
                                            name="cspx-checkpoint", daemon=False)
            self._thread.start()
        else:
            self.files.write(state, path, best=best)
        return path

    def _write_guarded(self, state: Dict[str, Any], path: str, best: bool) -> None:
        try:
            self.files.write(state, path, best=best)
        except BaseException as e:
            self._error = e

    def wait(self) -> None:
        """Wait for a background write; re-raise its failure here, in the training thread."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.raise_write_failure()

    def raise_write_failure(self) -> None:
        """Re-raise, once, the failure of a background write that has ended (else nothing)."""
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def close(self) -> None:
        self.wait()

    # ----- where a run resumes ----------------------------------------------------------------
    def latest_valid(self) -> Optional[Tuple[str, Dict[str, Any]]]:
        """The newest readable checkpoint here (resume.latest_valid)."""
        return resume_point.latest_valid(self.files)

    def resume_state(self, resume: Optional[str]) -> Optional[Dict[str, Any]]:
        """The state to resume from (resume.resume_state): `--resume auto`, a path, or None."""
        return resume_point.resume_state(self.files, self.env, resume)

    def check_compat(self, state: Dict[str, Any], *, config: Dict[str, Any], fingerprint: str,
                     force: bool) -> bool:
        """Refuse an inexact resume unless forced (resume.check_compat); returns whether the
        world size is the checkpoint's."""
        return resume_point.check_compat(state, config=config, fingerprint=fingerprint,
                                         world=self.env.world, force=force)
