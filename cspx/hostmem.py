"""Host memory, set once per process at setup (training, validation, benchmarks) and again in
every DataLoader worker: how glibc's malloc serves the large blocks of a run on the CPU.

A training step on the CPU allocates and frees its activations and gradients in host memory:
about 1.4 GB per step for cspresnext50 at batch 16 and 224 px, in blocks of 0.1 to 51 MB. glibc
serves a block above its mmap threshold (128 KiB at first, rising with the blocks freed to at
most 32 MiB) with a fresh mmap and unmaps it when it is freed, and it trims the free top of its
heap back to the kernel above the trim threshold. Either way the next step faults every page in
again and the kernel zeroes it: 350,000 page faults and 1.1 s of system time per step, on top of
4.9 s of user time, with one thread (tools to measure it: `ru_minflt` and `ru_stime` of
`resource.getrusage`). timm's train.py pays the same; it is glibc's default.

On a CPU device, cspx's process therefore serves every block from its heap and never trims it
(`retain_freed_memory`): a step reuses the memory the step before freed, with 15,000 page faults
and 0.03 s of system time (and 4.5 s of user time). The process keeps the high-water mark of its
heap, which a training step, repeating the same allocations, reaches in its first steps; host
memory then stays flat (`scripts/benchmark.py memory`). On a GPU the activations live in device
memory, under CUDA's caching allocator, so nothing changes there.

DataLoader workers are forked from that process; each puts glibc's defaults back, with the mmap
threshold fixed (`worker_defaults`), before decoding anything.
"""
from __future__ import annotations

import ctypes

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

GLIBC_MMAP_MAX = 65536           # glibc's default M_MMAP_MAX: blocks it may serve with mmap
GLIBC_TRIM_THRESHOLD = 128 << 10  # bytes: glibc's initial trim threshold
WORKER_MMAP_THRESHOLD = 128 << 10  # bytes: glibc's initial mmap threshold, kept fixed in workers


def _mallopt(*settings) -> bool:
    """Apply (parameter, value) pairs with glibc's mallopt; False where there is no glibc (musl
    and macOS ignore or lack it) or a value is refused."""
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(fn(param, value) == 1 for param, value in settings)


def retain_freed_memory() -> bool:
    """Serve every allocation of this process from its heap (no mmap) and never trim the heap
    (mallopt(3): M_MMAP_MAX 0, M_TRIM_THRESHOLD -1). For a process whose model runs on the CPU;
    returns whether glibc took the settings."""
    return _mallopt((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def worker_defaults() -> bool:
    """In a DataLoader worker: glibc's defaults back (the worker was forked from a process that
    may have changed them), with the mmap threshold fixed at 128 KiB.

    Allocations above it (decoded images, 0.2-1 MB; sample tensors) are then mapped and
    unmapped as they come and go. By default glibc raises the threshold to the largest block
    freed so far, after which such buffers come from the heap, whose free space fragments over
    the varying image sizes: measured on the demo, each worker's memory grew by about 15% over
    its first 8 epochs before levelling off, and stays flat with the threshold fixed
    (scripts/benchmark.py memory). Elsewhere than glibc: a no-op."""
    return _mallopt((M_MMAP_MAX, GLIBC_MMAP_MAX), (M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD),
                    (M_MMAP_THRESHOLD, WORKER_MMAP_THRESHOLD))
