"""Random generators of a run, used at setup and in every checkpoint: seeding, and their state as
plain tensors and Python values.

Python's `random`, NumPy's global generator, torch's CPU generator and (on a GPU) the CUDA
generator of the rank's device. Loaders never draw from these: their randomness is seeded per
sample (torch path) or lives in DALI's own checkpointed generators, so a resumed run restores
these states and continues exactly.
"""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed every generator a run may draw from: Python, NumPy, torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RngState:
    """The process's generators as one checkpointed part (state_dict / load_state_dict)."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> Dict[str, Any]:
        np_state = np.random.get_state(legacy=True)
        assert isinstance(np_state, tuple)  # a dict only for a generator other than MT19937
        state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                 "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                           *np_state[2:]]}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        torch.set_rng_state(state["torch"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)
