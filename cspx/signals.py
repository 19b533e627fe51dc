"""Preemption during the loop: signals ask the training loop to save and exit at the next
optimizer step.

SIGTERM (schedulers, torchrun), SIGUSR1 (SLURM's --signal warning before preemption) and SIGINT
(Ctrl-C) only set a flag: the loop finishes the step in flight, checkpoints, prints the resume
command and exits 0. A second SIGINT aborts at once, for when the save itself is not wanted.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, Callable, Dict, Optional, Union

CATCH = ("SIGTERM", "SIGINT", "SIGUSR1")
# what signal.signal takes and returns: a function, SIG_DFL / SIG_IGN, or None (set outside Python)
Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


class Preemption:
    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._old: Dict[int, Handler] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal_name == "SIGINT":
            print("\nsecond SIGINT: aborting without saving", file=sys.stderr, flush=True)
            os._exit(130)
        if self.signal_name is None:
            self.signal_name = name
            print(f"\n{name} received: finishing this step, then saving a checkpoint "
                  f"(Ctrl-C again aborts at once)", file=sys.stderr, flush=True)

    def install(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for name in CATCH:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
