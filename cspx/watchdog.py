"""A run's process-level guard, from the process group's start to the run's end: a stall
watchdog (`run.stall_timeout`) and, under torchrun, the end of ranks whose agent died.

Progress. The loop and the long phases call `progress(what, n)`: a training step, an evaluation
batch, a start-up phase's unit of work (a class folder indexed, a file scanned, a shard checked, a
poll while waiting for rank 0). It stores one tuple and reads the monotonic clock: no device
value, no lock, nothing on the step path but that. A torch.compile compilation reports no
progress of its own, so the clock is held while one runs (torch._dynamo's compile callbacks).

Stall. A thread checks once a second. With no progress for `run.stall_timeout` seconds it writes
every thread's stack (faulthandler) into train.log (stderr where the process has none: ranks
other than 0, or before the run folder is claimed), prints one line saying what the main thread
was waiting for, kills its own child processes (data workers, compile workers; SIGKILL, which
also ends a SIGSTOPped one), and exits with EXIT_STALLED (3), so a scheduler can requeue and
`--resume auto` continues from the last checkpoint. The main thread is stuck by definition, so
the thread ends the process itself (os._exit): no exception could reach the stuck call.

Dead agent. torchrun starts each rank in a session of its own, so when the agent is SIGKILLed
(node failure, `scancel -s KILL`, the OOM killer) nothing signals its ranks: they would train on
as orphans, rank 0 holding the run.dir lock. The same thread compares the parent pid with the
one the rank started under; when the agent is gone the rank exits at once (within about 1 s):
no checkpoint, no collective, since its peers may be dead too and a collective with a dead peer
waits for the process group's timeout. A watch on the parent pid was chosen over
PR_SET_PDEATHSIG: PDEATHSIG fires when the *thread* that forked the rank exits, not its process
(an agent forking from a helper thread would kill healthy ranks when that thread ends), it must
be set after the fork and races with a parent dying before it, and the signal it delivers would
run the rank's SIGTERM handler, a coordinated save with peers that may be gone, or with SIGKILL
leave the rank's data workers behind. The watch runs only under torchrun
(`TORCHELASTIC_RUN_ID`): a plain `nohup python train.py` whose shell exits must train on.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

log = logging.getLogger("cspx")

EXIT_STALLED = 3  # the watchdog ended the process: a stall, or an orphaned rank
CHECK_EVERY = 1.0  # seconds between the thread's checks: bounds the orphan's lifetime too

# (monotonic time, what, n): the last progress. One tuple, replaced whole, so the thread always
# reads a consistent one; module-level so that any module reports progress without a handle.
_mark: Tuple[float, str, Optional[int]] = (time.monotonic(), "start-up", None)
_compiling = 0          # torch.compile compilations in flight (the clock is held meanwhile)
_covered = False        # the compile callbacks are registered (once per process)
_active: Optional["Watchdog"] = None


def progress(what: str = "training step", n: Optional[int] = None) -> None:
    """Report progress: `what` happened (the n-th, where counted). Costs a clock read."""
    global _mark
    _mark = (time.monotonic(), what, n)


def beat_every() -> float:
    """The longest a waiting loop should go between progress reports (seconds)."""
    t = _active.timeout if _active is not None and _active.timeout > 0 else 240.0
    return max(0.2, min(60.0, t / 4))


def _compile_start(*_args) -> None:
    global _compiling
    _compiling += 1


def _compile_end(*_args) -> None:
    global _compiling, _mark
    _compiling = max(0, _compiling - 1)
    _mark = (time.monotonic(), *_mark[1:])  # the compilation counted as progress


def cover_compilation() -> bool:
    """Hold the stall clock while torch.compile compiles (a first step, a recompilation, a lazy
    backward, CUDA graph recording), which can take many minutes without a progress report."""
    global _covered
    if not _covered:
        try:
            from torch._dynamo.callback import callback_handler
            callback_handler.register_start_callback(_compile_start)
            callback_handler.register_end_callback(_compile_end)
            _covered = True
        except (ImportError, AttributeError):  # no compile callbacks: compilation is timed
            pass
    return _covered


class Watchdog:
    """The checking thread of one run (module doc): `timeout` is run.stall_timeout (0: no
    stall check); the parent-pid check runs under torchrun alone."""

    def __init__(self, *, timeout: float, rank: int, world: int):
        self.timeout, self.rank, self.world = timeout, rank, world
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cspx-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        if self.timeout > 0 or self.parent is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def orphaned(self) -> bool:
        """Whether the torchrun agent this rank started under is gone (it was reparented)."""
        return self.parent is not None and os.getppid() != self.parent

    def stalled(self) -> bool:
        """Whether `timeout` seconds passed without progress, outside a compilation."""
        return (self.timeout > 0 and not _compiling
                and time.monotonic() - _mark[0] > self.timeout)

    def _run(self) -> None:
        while not self._stop.wait(CHECK_EVERY):
            if self.orphaned():
                self._orphaned()
            if self.stalled():
                self._stalled()

    # ----- the two ends -----------------------------------------------------------------------
    def _prefix(self) -> str:
        return f"rank {self.rank}: " if self.world > 1 else ""

    def _orphaned(self) -> None:
        _say(f"{self._prefix()}the torchrun agent (pid {self.parent}) is gone: exiting now, "
             f"without a checkpoint or a collective with ranks that may be gone too; "
             f"`--resume auto` continues from the last checkpoint")
        _end()

    def _stalled(self) -> None:
        t, what, n = _mark
        secs = time.monotonic() - t
        if what in ("training step", "evaluation batch"):
            last = f" (the last: {what.split()[-1]} {n})" if n is not None else ""
            head = f"no {what} for {secs:.0f} s{last}"
        else:
            head = f"no progress for {secs:.0f} s (the last: {what})"
        stacks, where = _dump_stacks()
        _say(f"{self._prefix()}stalled: {head}; waiting for {_waiting_for(self.world)}. "
             f"Stacks of every thread are in {where}. Exiting with status {EXIT_STALLED} "
             f"(run.stall_timeout={self.timeout:g} s); `--resume auto` continues from the last "
             f"checkpoint", stacks)
        _end()


def start(stall_timeout: float, rank: int = 0, world: int = 1,
          cover_compile: bool = False) -> Watchdog:
    """Start the watchdog of this process (one at a time); `stop()` it when the run ends."""
    global _active
    if _active is not None:
        _active.stop()
    if cover_compile and stall_timeout > 0 and not cover_compilation():
        log.warning("this torch has no compile callbacks: a torch.compile compilation counts "
                    "against run.stall_timeout like any other wait")
    progress("start-up")
    _active = Watchdog(timeout=stall_timeout, rank=rank, world=world).start()
    return _active


def stop() -> None:
    global _active
    if _active is not None:
        _active.stop()
        _active = None


# ----- what the stuck main thread waits for ---------------------------------------------------
def _waiting_for(world: int) -> str:
    """The main thread's wait, named from its stack (innermost frames decide)."""
    ident = threading.main_thread().ident  # None only before a thread starts
    frame = sys._current_frames().get(ident) if ident is not None else None
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    files = [f.f_code.co_filename.replace(os.sep, "/") for f in frames]

    def within(part: str) -> bool:
        return any(part in f for f in files)

    for f in frames:
        if f.f_code.co_name == "main_first" and f.f_code.co_filename.endswith("distributed.py"):
            return f"rank 0 ({f.f_locals.get('what', 'start-up')})"
    evaluating = within("cspx/eval_metrics.py")
    if within("torch/utils/data/") or within("nvidia/dali"):
        kind = "DALI pipeline" if within("nvidia/dali") else "data loader (its worker processes)"
        return f"the next {'evaluation ' if evaluating else ''}batch from the {kind}"
    if within("cspx/checkpoint/"):
        return "a checkpoint save (the file system)"
    if within("torch/distributed/"):
        return "a collective with the other ranks (a peer stopped, stuck or dead)"
    if world > 1 and within("torch/autograd/"):
        return "the backward pass and its gradient all-reduce with the other ranks"
    if not frames:
        return "an unknown call"
    f = frames[0]
    return f"{f.f_code.co_name} ({f.f_code.co_filename}:{f.f_lineno})"


def _dump_stacks() -> Tuple[str, str]:
    """(every thread's stack as faulthandler writes it, where it will be written)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    with tempfile.TemporaryFile("w+") as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.flush()
        f.seek(0)
        text = f.read()
    header = "threads: " + ", ".join(f"0x{i:016x} {n}" for i, n in names.items()) + "\n"
    logs = _log_files()
    return header + text, (logs[0].baseFilename if logs else "the error output")


def _log_files() -> List[logging.FileHandler]:
    return [h for h in log.handlers if isinstance(h, logging.FileHandler)]


def _say(line: str, stacks: str = "") -> None:
    """The line to stderr and train.log; the stacks to train.log, or stderr without one."""
    print("\n" + line, file=sys.stderr, flush=True)  # a progress bar may hold the line
    files = _log_files()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    for h in files:
        try:
            h.acquire()
            if h.stream is None:  # closed, or opened lazily (delay=True) and never written
                continue
            h.stream.write(f"{stamp} ERROR {line}\n{stacks}")
            h.stream.flush()
        except (OSError, ValueError):
            pass
        finally:
            h.release()
    if stacks and not files:
        sys.stderr.write(stacks)
        sys.stderr.flush()


# ----- ending the process ---------------------------------------------------------------------
def descendants(pid: int) -> List[int]:
    """Every process below `pid` (children, their children...), from /proc; [] without it."""
    children: Dict[int, List[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for e in entries:
        try:
            with open(f"/proc/{e}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(e))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _end() -> None:
    """Kill this process's descendants, then exit with EXIT_STALLED. The descendants go first
    and by SIGKILL: a SIGSTOPped data worker would never notice its parent's death, and a
    running one would take up to 5 s (torch's own check) to notice."""
    import multiprocessing
    pids = set(descendants(os.getpid()))
    pids.update(p.pid for p in multiprocessing.active_children() if p.pid)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for h in log.handlers:
        try:
            h.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_STALLED)
