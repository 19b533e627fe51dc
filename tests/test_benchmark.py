"""scripts/benchmark.py's `augment` mode runs end to end and reports every RandAugment op."""
from __future__ import annotations

import json
import math
import os

import pytest

from conftest import run_py

pytest.importorskip("nvidia.dali")


def test_augment_mode_times_every_randaugment_op(sample_dir, tmp_path):
    out = tmp_path / "aug.json"
    r = run_py(["scripts/benchmark.py", "augment", "--data", os.path.join(sample_dir, "val"),
                "--batch", "8", "--rounds", "1", "--json", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    ops = [row["op"] for row in res["rows"]]
    # torchvision's RandAugment op list, in DALI's names, then the whole RandAugment
    assert ops == ["translate_x", "translate_y", "shear_x", "shear_y", "rotate", "brightness",
                   "contrast", "color", "sharpness", "posterize", "solarize", "equalize",
                   "auto_contrast", "identity", "RandAugment, 2 ops"]
    assert res["magnitude_bin"] == 21 and res["interpolation"] == "nearest"  # the recipe's
    for row in res["rows"]:
        assert math.isfinite(row["DALI ms/img"]) and math.isfinite(row["torchvision ms/img"])
    whole = res["rows"][-1]
    assert whole["DALI ms/img"] > 0 and whole["torchvision ms/img"] > 0
    assert "RandAugment, 2 ops" in r.stdout  # the printed table
