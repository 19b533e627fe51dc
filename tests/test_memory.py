"""Long runs do not grow: host memory of the trainer and its workers, epoch after epoch, with
each loader (a four-epoch version of `scripts/benchmark.py memory`, whose 30-epoch figures are in
docs/performance.md)."""
from __future__ import annotations

import os

import pytest

from conftest import ROOT
from cspx.bench import memory

pytestmark = pytest.mark.slow


def test_growth_is_measured_from_the_end_of_warm_up():
    # epochs 1 and 2 are warm-up; then the largest departure from the epoch-2 value, in %
    assert memory.growth([(1, 50.0), (2, 100.0), (3, 104.0), (4, 97.0)]) == pytest.approx(4.0)
    assert memory.growth([(1, 50.0), (2, 100.0), (3, 110.0)]) == pytest.approx(10.0)
    assert memory.growth([(1, 50.0), (2, 100.0)]) is None


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_host_memory_stays_flat_over_epochs(demo_data, loader):
    samples = memory.measure(os.path.join(ROOT, "recipes", "demo.yaml"), loader, epochs=4,
                             workers=2, extra=[f"data.root={demo_data}", "aug.img_size=32",
                                               "eval.img_size=32"], timeout=600)
    assert [e for e, _ in samples] == [1, 2, 3, 4]
    assert all(mb > 100 for _, mb in samples)  # a trainer with torch loaded: a real reading
    assert memory.growth(samples) <= 100 * memory.TOLERANCE, samples
