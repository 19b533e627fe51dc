"""Distributed setup on CPU (gloo): the trainer's DDP wrapper, and the first start of a large run,
where rank 0 indexes the dataset for longer than a collective may wait."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT

CPU = torch.device("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_wrap_leaves_buffer_sync_to_evaluation(tmp_path, monkeypatch):
    """DDP does not broadcast rank 0's BatchNorm statistics before every forward pass
    (broadcast_buffers=False); cspx broadcasts them once before each evaluation."""
    from cspx.bench.fixed import FixedBatchLoader
    from cspx.bench.steps import SYNTHETIC_ONLY, bench_config
    from cspx.checkpoint import Checkpointer
    from cspx.distributed import DistEnv
    from cspx.models import create_model
    from cspx.optim import build_optimizer
    from cspx.runlog import MetricsLog
    from cspx.train_loop import Trainer
    from test_benchmark import bench_args
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        cfg = bench_config(bench_args(), SYNTHETIC_ONLY)
        env = DistEnv(rank=0, world=2, device=CPU)  # the trainer's multi-rank path, on 1 process
        model = create_model(cfg.model.name, num_classes=1000)
        t = Trainer(cfg=cfg, env=env, model=model, optimizer=build_optimizer(model, cfg.optim, CPU),
                    train_loader=FixedBatchLoader.random(batch=4, img_size=32, num_classes=1000,
                                                         device=CPU, channels_last=False),
                    eval_loader=None,
                    metrics=MetricsLog(run_dir=str(tmp_path), resume_step=None,
                                       tensorboard=False, enabled=False),
                    ckpt=Checkpointer(run_dir=str(tmp_path), cfg=cfg.checkpoint, env=env))
        t.wrap()
        ddp = t.forward_model
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.module is model
        # torch >= 2.14 names it forward_sync_buffers (and deprecates broadcast_buffers)
        old_name = getattr(ddp, "broadcast_buffers", None)
        assert getattr(ddp, "forward_sync_buffers", old_name) is False
        t.train_step()  # forward, backward with the gradient all-reduce, SGD step
        assert t.progress.step == 1 and t.model is model
    finally:
        dist.destroy_process_group()


WORKER = r"""
import datetime, json, os, sys, time
import torch.distributed as dist
from cspx import distributed
from cspx.distributed import DistEnv

rank, folder = int(os.environ["RANK"]), sys.argv[1]
timeout, sleep = float(sys.argv[2]), float(sys.argv[3])
open(os.path.join(folder, f"ready{rank}"), "w").close()
while not all(os.path.exists(os.path.join(folder, f"ready{r}")) for r in (0, 1)):
    time.sleep(0.05)  # start the rendezvous together, whatever each import took
dist.init_process_group("gloo", rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=timeout))
env = DistEnv(rank=rank, world=2)

def index():
    time.sleep(sleep)  # rank 0 scanning a cold filesystem, longer than the group's timeout
    return {"files": 1281167}

t = time.monotonic()
out = {"rank": rank, "got": distributed.main_first(index, env, "indexing data.root")}
out["waited"] = time.monotonic() - t
if rank == 0:
    time.sleep(sleep)  # the same wait, now as a plain collective
try:
    dist.barrier()
    out["barrier"] = "ok"
except Exception as e:
    out["barrier"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
print(json.dumps(out), flush=True)
os._exit(0)  # a group that timed out cannot be torn down cleanly
"""


@pytest.mark.slow
def test_main_first_outwaits_the_collective_timeout(tmp_path):
    """Rank 1 waits on the store while rank 0 works longer than the group's 3 s timeout, and
    gets rank 0's result; the same wait in dist.barrier fails."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE="2", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), "3", "6"], cwd=ROOT,
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    res = {}
    for (stdout, stderr), p in zip(outs, procs):
        assert p.returncode == 0, stderr[-2000:]
        r = json.loads(stdout.strip().splitlines()[-1])
        res[r["rank"]] = r
    assert res[0]["got"] == res[1]["got"] == {"files": 1281167}
    assert res[1]["waited"] > 5  # longer than the timeout, and it still got the result
    assert res[1]["barrier"] != "ok"  # a collective waiting as long fails: the test can fail
