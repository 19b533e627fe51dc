"""Exact resume: runs killed at random steps (SIGKILL) and resumed must end bit-identical to an
uninterrupted run; plus SIGTERM, fall-back past a truncated checkpoint, pruning, atomic saves and
the recipe-mismatch refusal."""
from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_py

TINY = ["train.steps=24", "sched.burn_in=4", "train.batch_size=16", "train.accum_steps=2",
        "aug.img_size=32", "eval.img_size=32", "eval.every_steps=12", "eval.batch_size=100",
        "checkpoint.every_steps=3", "checkpoint.keep_last=3", "run.log_every_steps=2",
        "run.tensorboard=true"]


def recipe_args(run_dir, data, *extra):
    return ["train.py", "--recipe", "recipes/demo.yaml", f"run.dir={run_dir}", f"data.root={data}",
            *TINY, *extra]


def start(args):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def steps_saved(run_dir):
    return sorted(int(os.path.basename(p)[5:13]) for p in glob.glob(f"{run_dir}/checkpoints/step_*.pt"))


def kill_after_checkpoint(proc, run_dir, min_step, timeout=240):
    """SIGKILL once a checkpoint at >= min_step exists, after a random extra delay (so the kill
    lands mid-step, mid-accumulation or mid-save)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(s >= min_step for s in steps_saved(run_dir)):
            time.sleep(random.uniform(0.0, 0.4))
            break
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    out = proc.communicate(timeout=60)[0]
    return out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def metrics(run_dir, kind="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.fixture(scope="module")
def reference(demo_data, tmp_path_factory):
    """One uninterrupted run per loader setting, shared by the tests of this module."""
    cache = {}

    def get(*extra):
        if extra not in cache:
            run_dir = tmp_path_factory.mktemp("ref")
            r = run_py(recipe_args(run_dir, demo_data, *extra))
            assert r.returncode == 0, r.stdout + r.stderr
            cache[extra] = str(run_dir)
        return cache[extra]
    return get


def check_equal_runs(ref_dir, run_dir):
    a, b = load(f"{ref_dir}/checkpoints/last.pt"), load(f"{run_dir}/checkpoints/last.pt")
    for key in ("model", "optimizer", "ema", "scaler"):
        assert_same_tensors(a[key], b[key], key)
    assert a["progress"] == b["progress"]
    # logs continue with no duplicated or missing steps, and the same values
    ra, rb = metrics(ref_dir), metrics(run_dir)
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == list(range(2, 25, 2))
    assert [r["loss"] for r in rb] == [r["loss"] for r in ra]
    assert [r["top1"] for r in metrics(run_dir, "eval")] == [r["top1"] for r in metrics(ref_dir, "eval")]


def tb_steps(run_dir, tag="train/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.parametrize("loader, workers", [("torch", 0), ("torch", 2), ("dali", 2)])
def test_sigkill_at_random_steps_resumes_exactly(demo_data, reference, tmp_path, loader, workers):
    extra = (f"data.workers={workers}",) + ((f"data.loader={loader}",) if loader != "torch" else ())
    ref = reference(*extra)
    run_dir = str(tmp_path / "run")
    rng = random.Random()
    targets = sorted(rng.sample(range(1, 20), 2))
    print("killing after checkpoints at steps >=", targets)
    for k, target in enumerate(targets):
        proc = start(recipe_args(run_dir, demo_data, *extra) + (["--resume", "auto"] if k else []))
        kill_after_checkpoint(proc, run_dir, target)
        assert proc.returncode == -signal.SIGKILL or proc.returncode == 0
    r = run_py(recipe_args(run_dir, demo_data, *extra) + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr or "no checkpoint" in r.stderr
    check_equal_runs(ref, run_dir)
    assert tb_steps(run_dir) == tb_steps(ref) == list(range(2, 25, 2))


def test_sigterm_saves_and_exits_0_then_resumes_exactly(demo_data, reference, tmp_path):
    ref = reference("data.workers=0")
    run_dir = str(tmp_path / "run")
    proc = start(recipe_args(run_dir, demo_data, "data.workers=0"))
    deadline = time.time() + 240
    while not steps_saved(run_dir) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out and "resume with:" in out and "--resume auto" in out
    stopped = load(f"{run_dir}/checkpoints/last.pt")["progress"]["step"]
    assert 0 < stopped < 24 and stopped in steps_saved(run_dir)
    r = run_py(recipe_args(run_dir, demo_data, "data.workers=0") + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert f"(step {stopped})" in r.stderr
    check_equal_runs(ref, run_dir)


def test_truncated_last_falls_back_and_pruning(demo_data, reference, tmp_path):
    ref = reference("data.workers=0")
    run_dir = tmp_path / "run"
    import shutil
    shutil.copytree(ref, run_dir)
    ck = run_dir / "checkpoints"
    # keep_last=3 step files, plus last.pt and best.pt as links
    assert steps_saved(str(run_dir)) == [18, 21, 24]
    assert sorted(os.listdir(ck)) == ["best.pt", "last.pt", "step_00000018.pt", "step_00000021.pt",
                                      "step_00000024.pt"]
    assert os.path.samefile(f"{ref}/checkpoints/last.pt", f"{ref}/checkpoints/step_00000024.pt")
    size = os.path.getsize(ck / "last.pt")
    for name in ("last.pt", "step_00000024.pt"):  # one file under two names in a real run dir
        with open(ck / name, "r+b") as f:
            f.truncate(size // 2)
    r = run_py(recipe_args(run_dir, demo_data, "data.workers=0") + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert "skipping invalid checkpoint" in r.stderr and "last.pt" in r.stderr
    assert "step_00000021.pt (step 21)" in r.stderr
    check_equal_runs(ref, str(run_dir))


def test_recipe_mismatch_is_refused_unless_forced(demo_data, reference, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(reference("data.workers=0"), run_dir)
    base = recipe_args(run_dir, demo_data, "data.workers=0")
    r = run_py(base + ["optim.lr=0.2", "train.steps=30", "--resume", "auto"])
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot resume exactly") and "optim.lr (0.1 -> 0.2)" in line
    assert "train.steps (24 -> 30)" in line and "--resume-force" in line
    # logging and eval keys may change freely; more steps with --resume-force continue the run
    r = run_py(base + ["train.steps=30", "run.log_every_steps=3", "eval.every_steps=0",
                       "--resume", "auto", "--resume-force"])
    assert r.returncode == 0, r.stderr
    assert load(f"{run_dir}/checkpoints/last.pt")["progress"]["step"] == 30


def test_fresh_start_never_overwrites_a_run(demo_data, reference, tmp_path):
    import shutil
    run_dir = tmp_path / "run"
    shutil.copytree(reference("data.workers=0"), run_dir)
    before = {p: os.path.getmtime(run_dir / p) for p in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt")}
    r = run_py(recipe_args(run_dir, demo_data, "data.workers=0"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: run.dir: {run_dir} already holds checkpoints (newest: step 24); pass --resume "
        f"auto to continue that run, or set run.dir to a new folder")
    assert before == {p: os.path.getmtime(run_dir / p) for p in before}
    # resuming a finished run is a no-op that reports the result again
    r = run_py(recipe_args(run_dir, demo_data, "data.workers=0") + ["--resume", "auto"])
    assert r.returncode == 0 and "done: 24 steps" in r.stderr, r.stderr[-2000:]
    assert [m["step"] for m in metrics(run_dir)] == list(range(2, 25, 2))
