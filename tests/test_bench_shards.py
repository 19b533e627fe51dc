"""scripts/benchmark.py's `shards` mode end to end at a tiny size: every figure it promises, from
datasets it makes once, and its scratch copies deleted."""
from __future__ import annotations

import json
import math
import os

from conftest import run_py


def test_shards_mode_reports_startup_throughput_and_copy(tmp_path):
    out, scratch = tmp_path / "shards.json", tmp_path / "scratch"
    scratch.mkdir()
    r = run_py(["scripts/benchmark.py", "shards", "--make-data", "60", "--loaders", "torch",
                "--workers", "0", "--batch", "4", "--steps", "1", "--img-size", "32",
                "--rounds", "1", "--device", "cpu", "--out-dir", str(scratch), "--json", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["sizes"] == [12, 60] and 90 < res["jpeg_kb_mean"] < 130  # ImageNet's ~110 KB
    got = [(row["measure"], row["images"], row["loader"]) for row in res["rows"]]
    per_size = ["startup, cold index, s", "startup, warm index, s", "data stage, cold index, s",
                "data stage, warm index, s", "index, cold index, s", "index, warm index, s",
                "loader img/s"]
    assert got == [(m, n, "torch") for n in (12, 60) for m in per_size] + \
        [("copy (cp -r), s", 60, "-")]
    for row in res["rows"]:
        assert row["folder"] > 0 and row["shards"] > 0
        faster = (row["shards"] / row["folder"] if row["measure"] == "loader img/s"
                  else row["folder"] / row["shards"])  # more img/s, or fewer seconds
        assert math.isclose(row["shards gain x"], faster)
    startup = {(row["measure"], row["images"]): row for row in res["rows"]}
    for n in (12, 60):  # the index is part of the data stage, itself part of the startup
        for which in ("cold", "warm"):
            for kind in ("folder", "shards"):
                assert startup[(f"index, {which} index, s", n)][kind] < \
                    startup[(f"data stage, {which} index, s", n)][kind] < \
                    startup[(f"startup, {which} index, s", n)][kind]
    assert os.listdir(scratch) == []  # its copies deleted, nothing else touched
    cache = os.path.join(os.environ["CSPX_CACHE"], "bench-shards")
    assert {"folder-12", "folder-60", "shards-12", "shards-60"} <= set(os.listdir(cache))
    assert "loader img/s" in r.stdout  # the printed table
