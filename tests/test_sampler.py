"""The torch path's data order: per-rank shards are disjoint, cover the epoch, and compose into
the single-process order, so results do not depend on the world size."""
from __future__ import annotations

import itertools

from cspx.data.loader import EpochBatchSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_rank_shards_are_disjoint_and_cover_the_epoch():
    n, mb, world = 103, 4, 2
    per_epoch = n // (mb * world)                       # 12 steps; 7 images sit out each epoch
    shards = [take(EpochBatchSampler(n=n, micro_batch=mb, rank=r, world=world, seed=3),
                   2 * per_epoch) for r in range(world)]
    for epoch in range(2):
        seen = [[k for b in s[epoch * per_epoch:(epoch + 1) * per_epoch] for k in b]
                for s in shards]
        assert all(e == epoch for part in seen for e, _ in part)
        idx = [{i for _, i in part} for part in seen]
        assert not idx[0] & idx[1]                         # disjoint
        assert len(idx[0]) == len(idx[1]) == per_epoch * mb
        full = EpochBatchSampler(n=n, micro_batch=mb, rank=0, world=1,
                                 seed=3).permutation(epoch).tolist()
        assert idx[0] | idx[1] == set(full[: per_epoch * mb * world])   # the epoch's images
    first = {i for b in shards[0][:per_epoch] for _, i in b}
    second = {i for b in shards[0][per_epoch:] for _, i in b}
    assert first != second                                 # a new permutation each epoch


def test_two_ranks_compose_into_the_single_process_batches():
    one = take(EpochBatchSampler(n=50, micro_batch=8, rank=0, world=1, seed=1), 12)
    r0 = take(EpochBatchSampler(n=50, micro_batch=4, rank=0, world=2, seed=1), 12)
    r1 = take(EpochBatchSampler(n=50, micro_batch=4, rank=1, world=2, seed=1), 12)
    assert [a + b for a, b in zip(r0, r1)] == one


def test_resume_position_is_one_integer():
    full = take(EpochBatchSampler(n=30, micro_batch=4, rank=1, world=2, seed=0), 10)
    s = EpochBatchSampler(n=30, micro_batch=4, rank=1, world=2, seed=0, start=7)
    assert take(s, 3) == full[7:10]
