"""scripts/gpu_check.sh, kept from rotting on machines without a GPU: `--rehearse` runs every
step of it on the CPU (same entry points and flags, tiny sizes, DALI CPU-only, the offline
wheel install with a wheel built on the spot), from a checkout with the ImageNet sample and
from one without it; and OUT is only ever a folder gpu_check made."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import ROOT, tree_digest

STEPS = ("install", "preflight", "data", "tests", "train", "loader", "model", "overhead",
         "validate", "checkpoint", "compile", "compile-tests")
BENCHMARKS = ("train", "loader", "model", "overhead", "validate", "checkpoint", "compile")


def gpu_check(*args, env=None, timeout=600):
    t = time.monotonic()
    r = subprocess.run(["bash", "scripts/gpu_check.sh", *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, PYTHON=sys.executable, **(env or {})))
    return r, time.monotonic() - t


def untracked():
    """Files in the checkout that git does not track (ignored ones too)."""
    r = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
                       cwd=ROOT, capture_output=True, text=True)
    return set(r.stdout.splitlines()) if r.returncode == 0 else set()


@pytest.mark.slow
def test_rehearsal_runs_every_step_on_the_cpu(sample_dir, tmp_path):
    out = tmp_path / "out"
    before = untracked()
    r, secs = gpu_check("--rehearse", out, env={"CSPX_SAMPLE_DIR": sample_dir})
    summary = (out / "summary.txt").read_text()
    print(f"\nrehearsal: {secs:.0f} s\n{summary}")
    assert r.returncode == 0, summary + r.stderr[-2000:]
    for step in STEPS:
        assert re.search(rf"^{re.escape(step)}\s+ok\s", summary, re.M), step
    assert f"sample: {os.path.realpath(sample_dir)}\n" in summary  # gpu_check.sh: realpath
    # the offline install: a wheel built here, installed into OUT/site, imported from there
    assert (out / "site" / "nvidia" / "cspx_rehearsal_probe" / "__init__.py").is_file()
    preflight = (out / "preflight.log").read_text()
    assert f"import nvidia.cspx_rehearsal_probe: from {out}/site/" in preflight
    assert "DALI ok: nvidia-dali" in summary and "CPU decoder" in summary
    # every GPU test collected and listed as GPU only; each CUDA-only call named
    for test in ("test_no_host_sync_inside_training_steps", "test_demo_trains_on_gpu_with_dali",
                 "test_gpu_eval_labels_and_positions_stay_on_the_device",
                 "test_compile_channels_last_checkpoint_has_plain_keys",
                 "test_cuda_graphs_train_as_eager_does"):
        assert re.search(rf"GPU only: tests/\S+::{test}", summary), test
    assert "FAILED" not in summary
    for what in ("nvidia-smi", "nvJPEG", "reduce-overhead (CUDA graphs)", "aot_eager"):
        assert what in summary.split("GPU only (left out")[1], what
    # the JSON files a GPU run writes, complete, every row measured
    res = {name: json.loads((out / f"{name}.json").read_text()) for name in BENCHMARKS}
    for name, d in res.items():
        assert d["complete"] and d["rows"], name
        assert not any("error" in row for row in d["rows"]), (name, d["rows"])
    assert {(x["loop"], x["batch"]) for x in res["train"]["rows"]} == {
        (loop, b) for b in (4, 8)
        for loop in ("cspx synthetic", "cspx dali loader", "baseline (ImageFolder+PIL)")}
    assert [x["loader"] for x in res["loader"]["rows"]] == [
        "dali loader (copy)", "dali loader (zero-copy)", "torch loader"]
    assert [(x["batch"], x["compile"]) for x in res["model"]["rows"]] == [(4, "eager"),
                                                                           (8, "eager")]
    compiled = res["compile"]["rows"]
    assert {x["compile"] for x in compiled} == {"default"} and compiled[0]["warm-up s"] > 0
    for row in res["train"]["rows"] + res["model"]["rows"] + compiled:
        assert row["img/s"] > 0 and row["TFLOP/s"] > 0 and row["peak MiB"] > 0
    assert res["compile"]["args"]["compile_backend"] == "aot_eager"
    # nothing written outside OUT
    assert untracked() == before


@pytest.mark.slow
def test_rehearsal_without_the_sample_makes_a_stand_in(tmp_path):
    """A checkout copied alone to a GPU machine has no ../shared: the GPU tests get generated
    ImageNet-sized JPEGs in the sample's layout instead of skipping."""
    from cspx.data.index import build_index, read_classes_file
    out = tmp_path / "out"
    r, _ = gpu_check("--rehearse", "--only", "data,tests", out,
                     env={"CSPX_SAMPLE_DIR": str(tmp_path / "no-such-sample")})
    summary = (out / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stderr[-2000:]
    assert f"sample: {out}/sample (generated stand-in" in summary
    assert re.search(r"^data\s+ok", summary, re.M) and re.search(r"^tests\s+ok", summary, re.M)
    assert "GPU only: tests/test_dali.py::test_gpu_eval_close_to_pil" in summary
    index = build_index(str(out / "sample" / "val"),
                        read_classes_file(str(out / "sample" / "synsets.txt")))
    assert len(index) == 105 and len(set(index.labels.tolist())) == 105  # test_dali's index


def test_out_is_refused_unless_gpu_check_made_it(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    before = tree_digest(mine)
    r, _ = gpu_check("--rehearse", mine)
    assert r.returncode == 2 and tree_digest(mine) == before
    assert len(r.stderr.strip().splitlines()) == 1
    assert "not empty and was not made by cspx" in r.stderr
    r, _ = gpu_check("--rehearse", "--only", "nothing", tmp_path / "new")
    assert r.returncode == 0 and (tmp_path / "new" / ".cspx-gpu-check").is_file()
    r, _ = gpu_check("--rehearse", "--only", "nothing", tmp_path / "new")  # its own: reused
    assert r.returncode == 0, r.stderr


def test_wheels_unpack_without_pip(tmp_path):
    """Where pip is missing, a wheel is unpacked: its files land as pip --target puts them."""
    from cspx.bench.check import probe_wheel, unpack_wheel
    wheel = probe_wheel(str(tmp_path / "wheels"))
    unpack_wheel(wheel, str(tmp_path / "site"))
    r = subprocess.run([sys.executable, "-c", "import nvidia.cspx_rehearsal_probe as p; "
                        "print(p.WHO, p.__file__)"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path / "site")))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"cspx rehearsal probe {tmp_path}/site/nvidia/")
