"""Process-level faults injected for real (docs/reliability.md): a NaN reaching metrics.jsonl,
the torchrun agent SIGKILLed, one rank SIGKILLed under --max-restarts, DataLoader workers
SIGSTOPped under a short run.stall_timeout. CPU, torchrun with gloo."""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import signal
import time

import pytest
import torch
import torch.nn.functional as F

from test_distributed import (
    COMMON,
    _start,
    _wait_checkpoint,
    _worker_pids,
    recipe,
    two_rank_reference,
)
from test_resume import assert_same_tensors, load, steps_saved


def _strict(line):
    """json.loads that accepts nothing but JSON: NaN, Infinity and -Infinity raise."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")
    return json.loads(line, parse_constant=refuse)


def test_metrics_jsonl_stays_strict_json_with_a_real_nan(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cspx.runlog import MetricsLog
    inf_logit = torch.tensor([[float("inf"), 0.0]])
    nan = F.cross_entropy(inf_logit, torch.tensor([0])).item()   # inf - inf inside log_softmax
    inf = (torch.tensor(1.0) / torch.tensor(0.0)).item()
    neg_inf = torch.log(torch.tensor(0.0)).item()
    assert math.isnan(nan) and inf == math.inf and neg_inf == -math.inf
    m = MetricsLog(run_dir=str(tmp_path), resume_step=None, tensorboard=True, enabled=True)
    m.write("train", 1, {"loss": 2.5, "lr": 0.1})
    m.write("train", 2, {"loss": nan, "lr": 0.1, "img_per_sec": inf, "grad": neg_inf})
    m.write("eval", 2, {"top1": 50.0, "loss": nan, "count": 300})
    m.close()
    with pytest.raises(ValueError):  # the parser really is strict
        _strict('{"loss": NaN}')
    rows = [_strict(line) for line in open(tmp_path / "metrics.jsonl", encoding="utf-8")]
    assert [(r["kind"], r["step"]) for r in rows] == [("train", 1), ("train", 2), ("eval", 2)]
    assert rows[0]["loss"] == 2.5 and "nonfinite" not in rows[0]
    assert rows[1]["loss"] is None and rows[1]["img_per_sec"] is None and rows[1]["grad"] is None
    assert rows[1]["nonfinite"] == {"loss": "nan", "img_per_sec": "inf", "grad": "-inf"}
    assert rows[1]["lr"] == 0.1
    assert rows[2]["nonfinite"] == {"loss": "nan"} and rows[2]["count"] == 300
    # TensorBoard keeps the value as it was
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")][0] == (1, 2.5)
    assert math.isnan(acc.Scalars("train/loss")[1].value)
    assert acc.Scalars("train/img_per_sec")[0].value == math.inf
    # a resumed run re-reads the file (dropping events after its checkpoint): nulls pass
    MetricsLog(run_dir=str(tmp_path), resume_step=1, tensorboard=False, enabled=True).close()
    assert [_strict(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1]


def test_a_compilation_holds_the_stall_clock():
    """torch.compile reports no progress while it compiles (minutes for a large model): the
    watchdog does not count that time, and counts again from the compilation's end."""
    from cspx import watchdog
    dog = watchdog.Watchdog(timeout=0.2, rank=0, world=1)  # its thread is not started: checked here
    during = []

    def slow_backend(gm, inputs):
        time.sleep(0.4)                             # twice the timeout, inside the compilation
        during.append(dog.stalled())
        return gm.forward

    assert watchdog.cover_compilation()
    watchdog.progress("training step", 1)
    f = torch.compile(lambda x: x * 2 + 1, backend=slow_backend)
    assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))
    assert during == [False]
    assert not dog.stalled()                        # the compilation's end counted as progress
    time.sleep(0.4)
    assert dog.stalled()                            # and the clock runs again


def test_the_run_dir_lock_dies_with_its_holder_not_with_its_forked_children(tmp_path):
    """A data worker forked after the lock was taken must not keep it: a rank SIGKILLed while
    its workers linger (they notice their parent's death only after seconds, a SIGSTOPped one
    never) would otherwise block the resubmitted job."""
    from cspx.run_dir import RunDir
    run = RunDir(str(tmp_path / "run"))
    run.claim()
    run.lock()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # a forked worker: report whether it still holds the lock's descriptor
        held = any(os.path.realpath(f"/proc/self/fd/{fd}").endswith(".cspx-lock")
                   for fd in os.listdir("/proc/self/fd"))
        os.write(w, b"1" if held else b"0")
        time.sleep(30)
        os._exit(0)
    try:
        assert os.read(r, 1) == b"0"
        assert not _lock_free(run.path)             # the holder has it
        run.release()                               # the holder is gone; its child lives on
        assert _alive(child)
        assert _lock_free(run.path)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(r)
        os.close(w)


# ----- processes ---------------------------------------------------------------------------------
def _tree(pid):
    """pid and every process below it, from the kernel's own child lists."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def _alive(pid):
    """Running or stopped; a zombie (dead, not yet reaped by init) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids, timeout):
    """Seconds until every pid has exited (or None past `timeout`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not any(_alive(p) for p in pids):
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


def _lock_free(run_dir):
    fd = os.open(os.path.join(run_dir, ".cspx-lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@pytest.mark.slow
def test_dead_agent_then_dead_rank_under_restarts(demo_data, tmp_path_factory):
    """The agent SIGKILLed: every rank and data worker exits within 10 s and the lock is free.
    The resubmitted job (--max-restarts=1 --resume auto) starts at once; rank 0 SIGKILLed in
    it, torchrun restarts both ranks, and the run ends with every checkpoint tensor equal to an
    uninterrupted run's (the 40-step reference test_distributed.py's kill -9 test shares)."""
    work = two_rank_reference(tmp_path_factory, demo_data)
    run_dir = work / "run"

    # 1. the agent dies
    agent = _start(recipe(run_dir, demo_data, *COMMON))
    _wait_checkpoint(run_dir, agent, 3)
    ranks = _worker_pids(agent.pid)
    assert [r for r, _ in ranks] == [0, 1], ranks
    procs = [p for _, pid in ranks for p in _tree(pid)]
    assert len(procs) >= 4, procs                     # 2 ranks, each with its data worker
    os.kill(agent.pid, signal.SIGKILL)                # the agent alone: ranks are in own sessions
    took = _wait_gone(procs, 10)
    out = agent.communicate(timeout=60)[0]
    assert took is not None, f"orphans left after 10 s: {[p for p in procs if _alive(p)]}"
    assert out.count("the torchrun agent") == 2, out[-3000:]
    assert _lock_free(run_dir)
    # the newest step file, which --resume auto continues from: saves are atomic, so a step
    # file is whole, while last.pt may not be linked yet to one written just before the kill
    killed_at = max(steps_saved(str(run_dir)))
    assert load(run_dir / "checkpoints/last.pt")["progress"]["step"] <= killed_at < 40

    # 2. resubmitted with restarts; rank 0 (lock holder, checkpoint writer) dies
    job = _start(["--max-restarts=1", *recipe(run_dir, demo_data, *COMMON), "--resume", "auto"])
    _wait_checkpoint(run_dir, job, max(steps_saved(str(run_dir))) + 3)
    rank0 = dict(_worker_pids(job.pid))[0]
    os.kill(rank0, signal.SIGKILL)
    out = job.communicate(timeout=240)[0]
    assert job.returncode == 0, out[-4000:]
    assert "in use by another cspx job" not in out
    resumed = [int(s) for s in _resumed_steps(out)]
    assert len(resumed) == 2 and resumed[0] == killed_at <= resumed[1], resumed
    a, b = load(work / "ref/checkpoints/last.pt"), load(run_dir / "checkpoints/last.pt")
    assert a.pop("run_id") and b.pop("run_id")   # the run folder's random id, not state
    assert_same_tensors(a, b, "checkpoint")
    assert b["progress"]["step"] == 40 and len(b["ranks"]) == 2


def _resumed_steps(out):
    return re.findall(r"resuming from \S+ \(step (\d+)\)", out)


@pytest.mark.slow
def test_stalled_data_workers_end_every_rank_with_status_3(demo_data, tmp_path):
    """Rank 1's DataLoader worker SIGSTOPped: rank 1 waits for its next batch, rank 0 for the
    gradient all-reduce. Both end within run.stall_timeout (plus the watchdog's 1 s check),
    naming what they waited for, with stacks in train.log, status 3, no worker left behind."""
    timeout = 5
    run_dir = tmp_path / "run"
    agent = _start(recipe(run_dir, demo_data, "train.steps=2000", "eval.every_steps=0",
                          "checkpoint.every_steps=3", "data.workers=1",
                          "run.tensorboard=false", f"run.stall_timeout={timeout}"))
    _wait_checkpoint(run_dir, agent, 3)
    ranks = dict(_worker_pids(agent.pid))
    workers = [p for p in _tree(ranks[1]) if p != ranks[1]]
    assert workers, "rank 1 has no data worker"
    procs = [p for pid in ranks.values() for p in _tree(pid)]
    for p in workers:
        os.kill(p, signal.SIGSTOP)
    t0 = time.monotonic()
    out = agent.communicate(timeout=120)[0]
    took = time.monotonic() - t0
    assert agent.returncode != 0
    assert took < timeout + 6, f"{took:.1f} s"
    assert _wait_gone(procs, 5) is not None, [p for p in procs if _alive(p)]
    lines = [ln for ln in out.splitlines() if "stalled: no training step for" in ln]
    r1 = [ln for ln in lines if "rank 1:" in ln]
    assert r1 and "waiting for the next batch from the data loader" in r1[0], out[-4000:]
    assert "exitcode  : 3" in out                 # torchrun names the status of the rank
    log = open(run_dir / "train.log", encoding="utf-8").read()
    assert "rank 0: stalled: no training step for" in log
    assert "Thread 0x" in log and "most recent call first" in log and "cspx-watchdog" in log
    # rank 0 waited on its peer, not on data: the all-reduce of the backward pass or the vote
    r0 = log[log.index("rank 0: stalled"):].splitlines()[0]
    assert "other ranks" in r0, r0

