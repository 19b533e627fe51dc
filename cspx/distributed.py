"""Several processes, from setup to the end of a run: the process group from torchrun's
environment, the few collectives setup, the loop and evaluation need, and the model's
DistributedDataParallel wrapper (built, and released where the backbone unfreezes).

Without torchrun (no WORLD_SIZE in the environment) everything here degrades to single-process
no-ops, so the training loop has one code path.
"""
from __future__ import annotations

import datetime
import inspect
import itertools
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cspx import watchdog
from cspx.errors import CspxError

_CPU_GROUP: Optional[Any] = None  # gloo group for host-side flags, made by init()
_MAIN_FIRST = itertools.count()   # numbers the main_first calls: every rank makes them in order
T = TypeVar("T")
log = logging.getLogger("cspx")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(pref: str, local_rank: int) -> torch.device:
    """'auto' -> cuda:local_rank when CUDA is usable, else cpu. 'cuda' without CUDA is an error."""
    if pref == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if pref == "cuda":
        raise CspxError("run.device: cuda was requested but this machine has no usable CUDA GPU")
    return torch.device("cpu")


def init(device_pref: str = "auto", timeout_min: float = 30.0) -> DistEnv:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...).

    NCCL on GPUs, gloo on CPU. The timeout bounds how long a rank waits for a dead peer before
    the job fails with an error instead of hanging.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = pick_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw: Dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        timeout = datetime.timedelta(minutes=timeout_min)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
        store = dist.PrefixStore(f"cspx/{_join_attempt(store, rank, world, timeout)}/", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timeout, **kw)
        global _CPU_GROUP
        # small host-side flags get their own gloo group: with NCCL as the main backend a CPU
        # collective does not touch the CUDA stream, and with gloo it does not interleave with
        # DDP's gradient all-reduces
        _CPU_GROUP = dist.new_group(backend="gloo")
    return DistEnv(rank, world, local_rank, local_world, device)


def _join_attempt(store: Any, rank: int, world: int, timeout: datetime.timedelta) -> str:
    """A key prefix of this launch attempt's own, agreed on by all its ranks through `store`.

    torchrun's c10d rendezvous hands every attempt's ranks the same store: the agent's, which
    outlives them and keeps what an earlier attempt wrote there. A restarted attempt (after a
    rank died, under --max-restarts) would otherwise read its predecessors' keys: the process
    group's gloo or NCCL addresses, which point at dead processes (the restarted ranks fail to
    connect or wait), and main_first's results. torchrun's restart count cannot name the
    attempt: each node's agent counts its own restarts. So rank 0 draws a fresh id and
    publishes it; every other rank answers it with a nonce of its own, and proceeds once rank 0
    has confirmed exactly its nonce. A stale id (an earlier attempt's, whose rank 0 is gone) is
    never confirmed for a new nonce, so a rank that read one waits until this attempt's rank 0
    replaces it. The cost on a fresh start: one exchange through the store."""
    if rank == 0:
        attempt = uuid.uuid4().hex
        store.set("cspx/attempt", attempt)
        keys = [f"cspx/{attempt}/join/{r}" for r in range(1, world)]
        store.wait(keys, timeout)
        nonces = store.multi_get(keys) if hasattr(store, "multi_get") else map(store.get, keys)
        store.set(f"cspx/{attempt}/go", ",".join(n.decode() for n in nonces))
        return attempt
    nonce, attempt = uuid.uuid4().hex, ""
    deadline = time.monotonic() + timeout.total_seconds()
    store.wait(["cspx/attempt"], timeout)
    while time.monotonic() < deadline:
        now = store.get("cspx/attempt").decode()
        if now != attempt:
            attempt = now
            store.set(f"cspx/{attempt}/join/{rank}", nonce)
        go = f"cspx/{attempt}/go"
        try:  # waiting in the store, not polling it: thousands of ranks may wait at once
            store.wait([go], datetime.timedelta(seconds=1))
        except dist.DistStoreError:  # not confirmed yet; the id may be an earlier attempt's
            continue
        confirmed = store.get(go).decode().split(",")
        if len(confirmed) >= rank and confirmed[rank - 1] == nonce:
            return attempt
        time.sleep(0.5)  # an earlier attempt's confirmation: wait for this attempt's id
    raise CspxError(f"rank {rank}: rank 0 of this launch did not start within "
                    f"{timeout.total_seconds():.0f} s")


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any, env: DistEnv) -> List[Any]:
    """Every rank's `obj`, in rank order (pickled between processes, never written to disk)."""
    if not env.distributed:
        return [obj]
    out: List[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank. Parameters are identical
    across ranks under DDP; buffers drift apart as each rank normalises its own batches."""
    if env.distributed:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class StopVote:
    """Agree on stopping at a step boundary without stalling every step on it.

    Each boundary starts an async all-reduce (MAX) of this rank's flag and collects the one
    started at the previous boundary. A signal reaching any one rank therefore stops all ranks at
    the same step, one step later, and no rank blocks on a collective in between.
    """

    def __init__(self, env: DistEnv):
        self.env = env
        self._work: Optional[dist.Work] = None  # the all-reduce in flight
        self._buf = torch.zeros(1, dtype=torch.int32)  # the flag being reduced, in place

    def poll(self, local: bool) -> bool:
        if not self.env.distributed:
            return local
        decided = False
        if self._work is not None:
            self._work.wait()
            decided = bool(self._buf[0])
        self._buf = torch.tensor([int(local)], dtype=torch.int32)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=_CPU_GROUP,
                                     async_op=True)
        return decided

    def finish(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None


def main_first(fn: Callable[[], T], env: DistEnv, what: str) -> T:
    """Run `fn` on rank 0 while the other ranks wait, then give them its result (pickled).

    The others wait on the process group's key-value store, in short polls with no overall
    limit, not in a collective: a collective would fail after the group's 30-minute timeout,
    and indexing 1.28M files on a cold network filesystem can take longer. Each poll reports
    progress to the stall watchdog (rank 0 reports its own, and its watchdog ends a stalled
    rank 0, after which torchrun stops the others). If rank 0 fails, every rank stops with its
    message; if the store itself is gone (the agent that serves it died), the wait ends."""
    if not env.distributed:
        return fn()
    store = dist.distributed_c10d._get_default_store()
    key = f"cspx/main_first/{next(_MAIN_FIRST)}"
    if env.is_main:
        try:
            result = fn()
        except BaseException as e:
            store.set(key, f"failed: {e}")
            raise
        store.set(key, "ok")
    else:
        start = last_note = time.monotonic()
        while True:
            try:
                store.wait([key], datetime.timedelta(seconds=watchdog.beat_every()))
                break
            except dist.DistStoreError:  # a timeout (not DistNetworkError): keep waiting
                watchdog.progress(f"waiting for rank 0 ({what})")
                if time.monotonic() - last_note >= 600:  # say so every 10 minutes
                    last_note = time.monotonic()
                    log.warning(f"rank {env.rank}: still waiting for rank 0 ({what}, "
                                f"{(last_note - start) / 60:.0f} min)")
        status = store.get(key).decode()
        if status != "ok":
            raise CspxError(f"rank 0 stopped while {what}: {status[len('failed: '):]}")
        result = None
    return broadcast_object(result, env)


def destroy() -> None:
    global _CPU_GROUP
    if dist.is_initialized():
        dist.destroy_process_group()
    _CPU_GROUP = None


def wrap_ddp(module: nn.Module, *, env: DistEnv) -> nn.Module:
    """DistributedDataParallel on `env`'s device, without a buffer sync in the forward pass
    (`broadcast_buffers=False`, named `forward_sync_buffers` since torch 2.14): DDP would
    otherwise broadcast rank 0's BatchNorm statistics before every forward pass; cspx
    broadcasts them once before each evaluation instead (`broadcast_buffers`), which is the only
    place the ranks' statistics are used."""
    ids = [env.device.index] if env.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in
               inspect.signature(ddp).parameters else "broadcast_buffers")
    off: Dict[str, Any] = {no_sync: False}
    return ddp(module, device_ids=ids, gradient_as_bucket_view=True, **off)


def release_ddp(module: nn.Module) -> None:
    """Detach a DistributedDataParallel wrapper (under torch.compile's, if any) from the
    parameters before a new one is built: its reducer's gradient hooks would otherwise still
    all-reduce the parameters it had registered."""
    ddp = getattr(module, "_orig_mod", module)
    if isinstance(ddp, nn.parallel.DistributedDataParallel):
        ddp._remove_autograd_hooks()
        for handle in getattr(ddp, "_accum_grad_hooks", []):
            handle.remove()
