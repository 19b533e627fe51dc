"""cspx.hostmem: on the CPU the blocks a step frees serve the next step without new page faults;
DataLoader workers get glibc's mmap back. Page faults are counted by the kernel (getrusage's
ru_minflt) and mapped blocks by glibc (mallinfo2), so the checks do not depend on timing."""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import resource
import sys

import pytest
import torch

from cspx import hostmem

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
# bytes: a step's activations, some above glibc's largest dynamic mmap threshold (32 MiB)
SIZES = (48 << 20, 40 << 20, 8 << 20, 64 << 20, 1 << 20)
PAGES = sum(SIZES) // 4096
BIG = 1 << 30  # bytes: allocated, never touched (no memory used)


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo2() -> MallInfo2:
    fn = ctypes.CDLL(None).mallinfo2
    fn.restype = MallInfo2
    return fn()


def _mapped_bytes_of_a_block(size: int) -> int:
    """Bytes glibc serves with mmap for one allocation of `size` (mallinfo2's hblkhd)."""
    before = _mallinfo2().hblkhd
    x = torch.empty(size, dtype=torch.uint8)
    mapped = _mallinfo2().hblkhd - before
    del x
    return mapped


def _faults_per_step(steps: int = 6):
    """Page faults of each 'step': fill tensors of SIZES, then free them all."""
    out = []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = [torch.empty(s, dtype=torch.uint8).fill_(1) for s in SIZES]
        del xs
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out


def _worker(q) -> None:
    from cspx.data.torch_loader import worker_init
    worker_init(0)
    # glibc maps only what its heap cannot serve: ask for more than the whole heap inherited
    q.put(_mapped_bytes_of_a_block(_mallinfo2().arena + BIG) >= BIG)


def test_freed_memory_serves_the_next_step_and_workers_get_mmap_back():
    if not hostmem.retain_freed_memory() or not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("no glibc >= 2.33 here")
    faults = _faults_per_step()
    # the heap settles over the first steps (a 64 MiB block may still miss a hole of its size
    # now and then); after that nearly every page stays mapped. glibc's defaults fault every
    # page in again at every step (a block this large is unmapped when freed)
    assert sum(faults[3:]) < len(faults[3:]) * PAGES // 4, faults
    assert _mapped_bytes_of_a_block(BIG) == 0  # served from the heap, however large
    ctx = mp.get_context("fork")  # as DataLoader workers start on Linux
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(q,))
    p.start()
    assert q.get(timeout=60) is True
    p.join()
