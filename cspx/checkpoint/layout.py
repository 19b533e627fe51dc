"""Checkpoints, at every save and at the start of a resumed run: what a checkpoint holds. The
stateful parts of a run are named once here; `Parts` snapshots them into one dict and restores
them from it.

Layout (FORMAT "cspx-checkpoint", FORMAT_VERSION 1): only tensors and plain Python values, so
`torch.load(weights_only=True)` reads it back.
  format, format_version
  model, optimizer, scaler, ema (None without EMA), progress   shared by all ranks (rank 0's)
  world_size, ranks[r] = {"rng": ..., "loader": ..., "batch_aug": ...}   every rank's own
  config, config_hash, data_fingerprint, model_name, num_classes, classes, val_split,
  cspx_version, git_commit, run_id                             what the run is (the meta)
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Mapping, Optional, Protocol

import torch

from cspx import distributed
from cspx.distributed import DistEnv
from cspx.errors import CspxError

log = logging.getLogger("cspx")

FORMAT = "cspx-checkpoint"
FORMAT_VERSION = 1
SHARED = ("model", "optimizer", "scaler", "ema", "progress")
PER_RANK = ("rng", "loader", "batch_aug")
PORTABLE = ("loader",)  # per-rank parts offered rank 0's state on another world size
# per-rank parts added within FORMAT_VERSION 1: checkpoints written before them (cspx 0.1.0's)
# lack them, and a run resumed from one starts them from their per-rank seeds, as a fresh run
LATER_PER_RANK = ("batch_aug",)


class Part(Protocol):
    """A stateful part of a run (a module, an optimizer, a loader, ...)."""

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> Any: ...


def to_host(obj: Any) -> Any:
    """Deep copy with every tensor on the CPU and detached from the live one."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def leaves(obj: Any) -> Iterator[Any]:
    """Every value of a state below its dicts, lists and tuples (tensors, numbers, strings)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from leaves(v)
    else:
        yield obj


class Parts:
    """The stateful parts of one run, by their names in the layout: `shared` (SHARED; a part
    may be None, as the EMA is without ema.enabled) and `per_rank` (PER_RANK)."""

    def __init__(self, *, shared: Mapping[str, Optional[Part]], per_rank: Mapping[str, Part]):
        for given, names, what in ((shared, SHARED, "shared"), (per_rank, PER_RANK, "per_rank")):
            if set(given) != set(names):
                raise ValueError(f"checkpoint layout: {what} parts are {sorted(names)}, "
                                 f"got {sorted(given)}")
        self.shared, self.per_rank = dict(shared), dict(per_rank)

    def snapshot(self, env: DistEnv, meta: Mapping[str, Any]) -> Dict[str, Any]:
        """The whole run state, with `meta` (a collective: every rank's per-rank parts are
        gathered, so every rank calls it)."""
        ranks = distributed.all_gather_objects(
            {k: self.per_rank[k].state_dict() for k in PER_RANK}, env)
        state: Dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
        for k in SHARED:
            part = self.shared[k]
            state[k] = part.state_dict() if part is not None else None
        return {**state, "world_size": env.world, "ranks": ranks, **meta}

    def restore(self, state: Dict[str, Any], env: DistEnv, *, same_world: bool,
                force: bool = False) -> List[str]:
        """Load every part from `state`. On another world size only the portable per-rank
        parts get rank 0's state (and decide themselves whether they can follow it); the RNGs
        start afresh and the batch augmentation from its per-rank seed, as does a part of
        LATER_PER_RANK that an older checkpoint lacks. A per-rank part that cannot take its
        state (a loader of another kind or graph) stops the resume, or with `force` starts
        afresh with a warning. Returns the shared parts the checkpoint does not hold."""
        missing = []
        for k in SHARED:
            part = self.shared[k]
            if part is None:
                continue
            if state.get(k) is None:
                missing.append(k)
                continue
            part.load_state_dict(state[k])
        for k in PER_RANK:
            if not same_world and k not in PORTABLE:
                continue
            own = state["ranks"][env.rank if same_world else 0]
            if k not in own and k in LATER_PER_RANK:
                continue
            try:
                self.per_rank[k].load_state_dict(own[k])
            except CspxError as e:
                if not force:
                    raise CspxError(f"{e}; pass --resume-force to continue with the {k} "
                                    f"started afresh") from None
                if env.is_main:
                    log.warning(f"{e}; with --resume-force the {k} starts afresh")
        return missing
