"""Checkpoints, at every step of the loop: the `Checkpointer` decides when a checkpoint is written
and writes it, in the background with `checkpoint.async_save`.

The run's stateful parts register once (`register`). The loop then asks once per step
(`maybe_save`) and the checkpointer decides: a checkpoint every `checkpoint.every_steps` steps,
at the last step, after an evaluation with a new best top-1, and when a signal stops the run.

Before a checkpoint is written its state is checked for NaN and infinities
(`integrity.nonfinite_parts`, one device reduction and one read per save, agreed by every rank):
a state that holds one is never written (`NonfiniteState`). The trainer's divergence guard
(cspx.divergence) stops a diverged run before it gets here; this is the last line of defence.

With `async_save` the state is first copied to host memory (training may change the live
tensors), then written by a background thread; the next save or `close()` waits for it.

A save that fails with an OSError (disk full, quota, file-size limit, I/O error; `SaveFailed`)
leaves no temp file and the earlier checkpoints and links intact. It is logged as one warning
naming the file and the error, training goes on, and the next checkpoint is tried as usual; a
background write's failure is found at the first step boundary after it ended (`maybe_save`).
`checkpoint.max_failed_saves` failures in a row stop the run, as does a failed final or
preemption save (blocking saves): `RunFailure`, exit 1, one line naming the newest checkpoint.

What a checkpoint holds is `layout`'s, where its files go `storage`'s, where a run resumes
`resume`'s; this class is their one entry point for the run.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from cspx.checkpoint import integrity
from cspx.checkpoint import resume as resume_point
from cspx.checkpoint.layout import Part, Parts, to_host
from cspx.checkpoint.storage import CheckpointFiles, SaveFailed
from cspx.config import CheckpointConfig
from cspx.distributed import DistEnv, all_reduce_sum
from cspx.errors import RunFailure

log = logging.getLogger("cspx")


class NonfiniteState(RunFailure):
    """The state of a due checkpoint holds NaN or infinities (`parts`: which); nothing was
    written."""

    def __init__(self, step: int, parts: List[str]):
        super().__init__(f"the checkpoint of step {step} was not written: NaN or infinite "
                         f"values in its {', '.join(parts)}")
        self.step, self.parts = step, parts


class Checkpointer:
    """Saves and restores a run's state in `<run_dir>/checkpoints/` (writes on rank 0 only).
    `meta` is what every checkpoint records about the run besides its state (layout's meta;
    its "run_id" marks the files this run owns)."""

    def __init__(self, *, run_dir: str, cfg: CheckpointConfig, env: DistEnv,
                 meta: Optional[Mapping[str, Any]] = None):
        self.every, self.async_save = cfg.every_steps, cfg.async_save
        self.max_failed = cfg.max_failed_saves
        self.env, self.meta = env, dict(meta or {})
        self.run_id = self.meta.setdefault("run_id", "")
        self.files = CheckpointFiles(folder=os.path.join(run_dir, "checkpoints"),
                                     run_id=self.run_id, keep_last=cfg.keep_last,
                                     create=env.is_main)
        self.dir = self.files.dir
        self.parts: Optional[Parts] = None
        self._thread: Optional[threading.Thread] = None
        # a background write's outcome: (path, None) written, (path, exception) failed
        self._outcome: Optional[Tuple[str, Optional[BaseException]]] = None
        self.failures = 0                  # failed saves in a row (rank 0)
        self.newest: Optional[str] = None  # the newest checkpoint written or resumed from

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
        """Called by every rank after each optimizer step (and its evaluation): first takes the
        outcome of a background write that has ended, then saves when a checkpoint is `due` (a
        collective then), waiting for the write at the last step and when stopping. Returns
        whether it saved."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()
        saved = self.due(step, last_step=last_step, best=best, stopping=stopping)
        if saved:
            final = ("the final save" if step == last_step else
                     "the save on stopping" if stopping else None)
            self.save(step, best=best, final=final)
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

    def save(self, step: int, *, best: bool = False, final: Optional[str] = None) -> str:
        """The registered parts' state as the checkpoint of `step` (a collective: every rank
        calls it; rank 0 writes), unless it holds a non-finite value on any rank
        (`NonfiniteState`, raised on every rank). `final` (what the save is: "the final save",
        "the save on stopping") makes it blocking, and its failure ends the run."""
        state = self.state_dict()
        bad = integrity.nonfinite_parts(state)
        if self.env.distributed:  # every rank stops, or none: the count of ranks that found one
            found = all_reduce_sum(torch.tensor([int(bool(bad))], device=self.env.device),
                                   self.env).item()
            bad = bad or (["state on another rank"] if found else [])
        if bad:
            raise NonfiniteState(step, bad)
        return self.write(state, step, best=best, final=final)

    def write(self, state: Dict[str, Any], step: int, *, best: bool = False,
              final: Optional[str] = None) -> str:
        """Write `state` as the checkpoint of `step` (rank 0 only; other ranks return at once),
        in the background with async_save unless `final` (then blocking, and a failure ends the
        run)."""
        path = self.files.path_for(step)
        if not self.env.is_main:
            return path
        self.wait()
        if self.async_save and final is None:
            snapshot = to_host(state)
            self._thread = threading.Thread(target=self._write_guarded, args=(snapshot, path, best),
                                            name="cspx-checkpoint", daemon=False)
            self._thread.start()
        else:
            try:
                self.files.write(state, path, best=best)
            except SaveFailed as e:
                self._count_failure(e, final)
            else:
                self._count_success(path)
        return path

    def _write_guarded(self, state: Dict[str, Any], path: str, best: bool) -> None:
        try:
            self.files.write(state, path, best=best)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self._outcome = (path, e)
        else:
            self._outcome = (path, None)

    def wait(self) -> None:
        """Wait for a background write and take its outcome here, in the training thread: a
        SaveFailed is counted (and may end the run), any other failure is raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._outcome is not None:
            (path, err), self._outcome = self._outcome, None
            if err is None:
                self._count_success(path)
            elif isinstance(err, SaveFailed):
                self._count_failure(err, None)
            else:
                raise err

    def _count_success(self, path: str) -> None:
        self.failures, self.newest = 0, path

    def _count_failure(self, err: SaveFailed, final: Optional[str]) -> None:
        self.failures += 1
        newest = (f"the newest checkpoint is {self.newest}" if self.newest else
                  "no checkpoint of this run was written")
        fix = ("free space (or raise the quota or file-size limit), then run the same command "
               "with --resume auto")
        if final is not None:
            raise RunFailure(f"{final} failed: {err}; {newest}; {fix}") from None
        if self.failures >= self.max_failed:
            raise RunFailure(f"{self.failures} checkpoint saves in a row failed "
                             f"(checkpoint.max_failed_saves={self.max_failed}), the last: {err}; "
                             f"{newest}; {fix}") from None
        log.warning(f"{err}; training goes on and the next checkpoint tries again "
                    f"({self.failures} failed in a row; checkpoint.max_failed_saves="
                    f"{self.max_failed} stop the run)")

    def settle(self) -> Optional[str]:
        """Wait for a background write without raising (a run that is ending for another
        reason); returns the newest checkpoint written or resumed from."""
        try:
            self.wait()
        except Exception as e:  # noqa: BLE001 - the run is ending with its own error
            log.warning(f"the last checkpoint write failed too: {e}")
        return self.newest

    def close(self) -> None:
        """At the end of a run, however it ends: the background write's outcome is logged, not
        raised (a run that ends normally waited for its final save already)."""
        self.settle()

    # ----- where a run resumes ----------------------------------------------------------------
    def latest_valid(self) -> Optional[Tuple[str, Dict[str, Any]]]:
        """The newest readable checkpoint here (resume.latest_valid)."""
        return resume_point.latest_valid(self.files)

    def resume_state(self, resume: Optional[str]) -> Optional[Dict[str, Any]]:
        """The state to resume from (resume.resume_state): `--resume auto`, a path, or None."""
        found = resume_point.resume_state(self.files, self.env, resume)
        if found is None:
            return None
        self.newest = found[0]
        return found[1]

    def check_compat(self, state: Dict[str, Any], *, config: Dict[str, Any], fingerprint: str,
                     force: bool) -> bool:
        """Refuse an inexact resume unless forced (resume.check_compat); returns whether the
        world size is the checkpoint's."""
        return resume_point.check_compat(state, config=config, fingerprint=fingerprint,
                                         world=self.env.world, force=force)
