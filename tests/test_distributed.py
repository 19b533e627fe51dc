"""DDP on CPU (gloo, 2 processes through torchrun): equivalence with one process, exact
distributed evaluation, resume after kill -9, coordinated preemption and failure handling."""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_main
from test_resume import assert_same_tensors, load, steps_saved

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_port=0", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0"]


def recipe(run_dir, data, *extra):
    return ["train.py", "--recipe", "recipes/demo.yaml", f"run.dir={run_dir}", f"data.root={data}",
            "model.name=cspresnext_tiny_gn", "train.batch_size=8", "aug.img_size=32",
            "eval.img_size=32", "eval.batch_size=64", "sched.burn_in=2", "data.workers=0",
            "run.log_every_steps=2", *extra]


def torchrun(args, timeout=300, **kw):
    return subprocess.run(TORCHRUN + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


def test_two_ranks_equal_one_rank_and_accumulation(demo_data, tmp_path):
    """2 ranks x 4 images = 1 rank x 8 images = 1 rank x (2 micro-batches x 4), per step, with
    the backbone frozen for the first 3 steps: DDP, built while only the classifier trained,
    must be rebuilt at the unfreeze, or the ranks' backbone gradients would not be averaged."""
    common = ["train.steps=6", "eval.every_steps=0", "checkpoint.every_steps=0",
              "train.freeze_backbone_steps=3"]
    # one thread per process, as each torchrun rank: CPU kernels pick their algorithm and
    # reduction order by thread count, and while the backbone is frozen 2 threads put the
    # runs 3e-5 apart after 6 steps; at one thread each the runs differ only by float sum order
    # (the one-process runs in this process, at one torch thread)
    one = run_main(recipe(tmp_path / "one", demo_data, *common), threads=1)
    assert one.returncode == 0, one.stderr
    acc = run_main(recipe(tmp_path / "acc", demo_data, *common, "train.accum_steps=2"),
                   threads=1)
    assert acc.returncode == 0, acc.stderr
    two = torchrun(recipe(tmp_path / "two", demo_data, *common))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "step 3: the backbone is unfrozen" in two.stderr
    ref = load(tmp_path / "one/checkpoints/last.pt")["model"]
    for other in ("two", "acc"):
        got = load(tmp_path / other / "checkpoints/last.pt")["model"]
        # same images and seeds per step; only the order of float sums differs (gradient
        # all-reduce, two partial means): after 6 SGD steps that stays far below 1e-5
        worst = max((got[k].double() - ref[k].double()).abs().max().item() for k in ref)
        assert worst < 1e-5, (other, worst)
    # the data really differed per rank: rank 1's loader position equals rank 0's
    ranks = load(tmp_path / "two/checkpoints/last.pt")["ranks"]
    assert len(ranks) == 2
    assert ranks[0]["loader"] == ranks[1]["loader"] == {"kind": "torch", "consumed": 6}


def test_distributed_validate_counts_every_image_once(sample_dir, demo_data, tmp_path):
    """105 images, batch 16, 2 ranks: 105 = 2 x 16 x 3 + 9, so padding would show."""
    from cspx.models import create_model
    torch.manual_seed(3)
    m = create_model("cspresnext_tiny", num_classes=1000)
    for p in m.parameters():  # spread the logits so predictions vary across images
        p.data.normal_(0, 0.05)
    torch.save(m.state_dict(), tmp_path / "w.pt")
    args = ["validate.py", "--checkpoint", str(tmp_path / "w.pt"), "--model", "cspresnext_tiny",
            "--data-dir", sample_dir, "--classes", f"{sample_dir}/synsets.txt", "--img-size", "64",
            "--batch-size", "16", "--workers", "0", "--loader", "torch"]
    single = run_main(args + ["--json", str(tmp_path / "1.json"),
                              "--predictions", str(tmp_path / "1.csv")])
    assert single.returncode == 0, single.stderr
    dist = torchrun(args + ["--json", str(tmp_path / "2.json"),
                            "--predictions", str(tmp_path / "2.csv")])
    assert dist.returncode == 0, dist.stderr[-3000:]
    a, b = json.load(open(tmp_path / "1.json")), json.load(open(tmp_path / "2.json"))
    assert a["count"] == b["count"] == 105
    assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-12)
    assert b["settings"]["world_size"] == 2
    rows_a = list(csv.reader(open(tmp_path / "1.csv")))
    rows_b = list(csv.reader(open(tmp_path / "2.csv")))
    assert len(rows_b) == 106 and [r[:3] for r in rows_a] == [r[:3] for r in rows_b]
    assert len({r[0] for r in rows_b[1:]}) == 105


def _worker_pids(parent):
    """(rank, pid) of torchrun's worker processes."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            rank = next(int(e[5:]) for e in env if e.startswith(b"RANK="))
            out.append((rank, int(pid)))
        except (OSError, StopIteration, ValueError):
            continue
    return sorted(out)


def _start(args):
    return subprocess.Popen(TORCHRUN + args, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def _wait_checkpoint(run_dir, proc, min_step=1, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(s >= min_step for s in steps_saved(str(run_dir))):
            return
        time.sleep(0.02)


# the 2-rank run that kill -9 (here) and a dead agent and rank (test_reliability.py) interrupt:
# a data worker per rank, an evaluation half way
COMMON = ["train.steps=40", "eval.every_steps=20", "checkpoint.every_steps=3", "data.workers=1",
          "run.tensorboard=false"]


def two_rank_reference(tmp_path_factory, data):
    """<work>/ref: an uninterrupted 2-rank run of COMMON, trained in <work>/run and moved aside,
    made once per session; returns <work>. The runs compared with it train in <work>/run (this
    empties it), the same run.dir in their recipes, so their final checkpoints compare whole:
    every tensor and value of every rank."""
    work = tmp_path_factory.getbasetemp() / "two-ranks"
    run_dir = work / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    if not (work / "ref").exists():
        ref = torchrun(recipe(run_dir, data, *COMMON))
        assert ref.returncode == 0, ref.stderr[-3000:]
        os.rename(run_dir, work / "ref")
    return work


def test_resume_two_ranks_after_kill9(demo_data, tmp_path_factory):
    work = two_rank_reference(tmp_path_factory, demo_data)
    run_dir = work / "run"
    proc = _start(recipe(run_dir, demo_data, *COMMON))
    _wait_checkpoint(run_dir, proc, random.randint(2, 20))
    time.sleep(random.uniform(0, 0.3))
    assert proc.poll() is None, "the run ended before the kill"
    # the whole node dies: both workers (torchrun starts them in sessions of their own) and the
    # agent, at once
    workers = _worker_pids(proc.pid)
    assert len(workers) == 2, workers
    for _, pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert max(steps_saved(str(run_dir))) < 40
    res = torchrun(recipe(run_dir, demo_data, *COMMON) + ["--resume", "auto"])
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load(work / "ref/checkpoints/last.pt"), load(run_dir / "checkpoints/last.pt")
    assert a.pop("run_id") and b.pop("run_id")   # the run folder's random id, not state
    assert_same_tensors(a, b, "checkpoint")
    assert len(a["ranks"]) == 2                   # every rank's RNG and loader state


def _long_run(data, run_dir):
    """A 2-rank run that has saved its first checkpoint; returns torchrun and (rank, pid)s."""
    proc = _start(recipe(run_dir, data, "train.steps=2000", "eval.every_steps=0",
                         "checkpoint.every_steps=3"))
    _wait_checkpoint(run_dir, proc, 3)
    pids = _worker_pids(proc.pid)
    assert [r for r, _ in pids] == [0, 1], pids
    return proc, pids


def test_sigterm_to_one_rank_saves_once_and_all_exit(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    proc, pids = _long_run(demo_data, run_dir)
    os.kill(pids[1][1], signal.SIGTERM)   # only rank 1 hears it
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert out.count("SIGTERM received") == 1 and "resume with:" in out
    step = load(run_dir / "checkpoints/last.pt")["progress"]["step"]
    assert 3 <= step < 2000


def test_a_dying_rank_brings_the_job_down(demo_data, tmp_path):
    proc, pids = _long_run(demo_data, tmp_path / "run")
    os.kill(pids[1][1], signal.SIGKILL)
    t = time.time()
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode != 0
    assert time.time() - t < 120, "the surviving rank hung"
    assert "exitcode" in out and "-9" in out   # torchrun names the failed rank and its signal
