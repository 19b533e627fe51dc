"""Divergence (train.on_nonfinite, cspx.divergence), with real NaNs: a learning rate of 1e6
during burn-in, and a batch poisoned with an infinite pixel, in both modes. Runs are in-process
(cspx.cli.train.main) on the CPU; one torchrun case (gloo) checks that every rank decides alike.
"""
from __future__ import annotations

import json
import os
import re
import signal
from argparse import Namespace

import pytest
import torch

from cspx import checkpoint
from test_resume import assert_same_tensors, load

# the demo recipe, shortened, on small_imagenet (3 classes, 132 training and 12 validation JPEGs
# of 40 x 30 px): a run's fixed costs, its final evaluation included, stay small
TINY = ["data.synthetic=false", "train.batch_size=16", "aug.img_size=32", "eval.img_size=32",
        "eval.every_steps=0", "sched.burn_in=4", "data.workers=0", "run.tensorboard=false",
        "ema.enabled=false"]
STATE = ("model", "optimizer", "scaler", "ema", "progress", "ranks")  # a run's state, all of it


@pytest.fixture(autouse=True)
def one_thread():
    """Each test's in-process runs on one thread: the tiny model's kernels gain little from a
    second one and lose much waiting for it on a busy machine (a test's CPU time: a fifth)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(capsys, run_dir, data, *extra):
    """train.py in this process; returns (exit code, its stderr)."""
    from cspx.cli.train import main
    code = main(["--recipe", "recipes/demo.yaml", f"run.dir={run_dir}", f"data.root={data}",
                 *TINY, *extra])
    return code, capsys.readouterr().err


def last_line(err):
    return [ln for ln in err.strip().splitlines() if ln.strip()][-1]


def strict_rows(run_dir):
    """metrics.jsonl through a parser that rejects NaN and Infinity."""
    def refuse(token):
        raise ValueError(token)
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def all_finite(path):
    return checkpoint.nonfinite_parts(load(path)) == []


def test_lr_1e6_stops_with_one_line_and_never_saves_a_nan(small_imagenet, tmp_path, capsys):
    """stop (the default), the issue's case: the run ends at the next read with exit 1 and one
    line naming the steps, the last good checkpoint and the keys to change; no file written
    holds a NaN; the line is in train.log too."""
    run_dir = tmp_path / "run"
    ck = run_dir / "checkpoints"
    code, err = train(capsys, run_dir, small_imagenet, "train.steps=8", "optim.lr=1000000.0",
                      "checkpoint.every_steps=1", "run.log_every_steps=3")
    line = last_line(err)
    assert code == 1 and "Traceback" not in err, err[-3000:]
    m = re.fullmatch(r"error: training diverged in (?:step (\d+)|steps (\d+)-(\d+)) "
                     r"\(train.on_nonfinite=stop\): the loss became non-finite at step (\d+); "
                     r"no checkpoint holding it was written; the last good checkpoint is "
                     r"(\S+)\. To continue from it, lower optim.lr \(now 1e\+06\), set "
                     r"train.clip_grad_norm \(now off\), change train.precision \(now fp32\) or "
                     r"set train.on_nonfinite=skip, and run the same command with --resume auto "
                     r"--resume-force", line)
    assert m, line
    first, good = int(m.group(4)), m.group(5)
    saved = sorted(int(n[5:13]) for n in os.listdir(ck) if n.startswith("step_"))
    assert saved and max(saved) == first - 1 and good == str(ck / f"step_{first - 1:08d}.pt")
    for name in os.listdir(ck):  # every file written, links included, is finite
        if name.endswith(".pt"):
            assert all_finite(ck / name), name
    assert line[len("error: "):] in (run_dir / "train.log").read_text()
    rows = strict_rows(run_dir)
    assert rows and all(r["skipped_steps"] == 0 for r in rows)


# ----- skip: a poisoned batch -------------------------------------------------------------------
def poison(monkeypatch, at, signal_at=None):
    """The run's training loader hands out micro-batch number `at` (1-based, counted over the
    run, so the same batch after a resume) with an infinite pixel; at micro-batch `signal_at`
    the process sends itself SIGTERM (a preemption)."""
    from cspx import train_setup
    real = train_setup.build_train_loader

    def build(*a, **kw):
        loader = real(*a, **kw)
        base = type(loader)

        def __next__(self):
            images, labels = base.__next__(self)
            if self.consumed in at:
                images = images.clone()
                images[0, :, 5, 5] = float("inf")
            if self.consumed == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return images, labels
        loader.__class__ = type("Poisoned", (base,), {"__next__": __next__})
        return loader
    monkeypatch.setattr(train_setup, "build_train_loader", build)


def test_a_poisoned_batch_stops_and_resume_passes_over_a_nan_checkpoint(
        small_imagenet, tmp_path, capsys, monkeypatch):
    """stop on a batch with an infinite pixel: the run ends naming the step and its last good
    checkpoint. A newer checkpoint holding a NaN (as an earlier cspx wrote them) is passed over
    by --resume auto with a warning; the run continues from the good one with skip, as the line
    advised, and skips the poisoned batch's step."""
    poison(monkeypatch, at={5})
    run_dir = tmp_path / "run"
    ck = run_dir / "checkpoints"
    common = ["train.steps=6", "checkpoint.every_steps=2", "run.log_every_steps=2"]
    code, err = train(capsys, run_dir, small_imagenet, *common)
    assert code == 1, err[-3000:]
    assert last_line(err).startswith(
        "error: training diverged in steps 5-6 (train.on_nonfinite=stop): the loss became "
        f"non-finite at step 5; no checkpoint holding it was written; the last good checkpoint "
        f"is {ck / 'step_00000004.pt'}. ")
    state = load(ck / "step_00000004.pt")  # a real NaN written into real weights
    w = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][w][0] = torch.tensor(0.0) / torch.tensor(0.0)
    state["progress"]["step"] = 5
    torch.save(state, ck / "step_00000005.pt")
    code, err = train(capsys, run_dir, small_imagenet, *common, "train.on_nonfinite=skip",
                      "--resume", "auto", "--resume-force")
    assert code == 0, err[-3000:]
    assert (f"skipping checkpoint: {ck / 'step_00000005.pt'}: NaN or infinite values in its "
            f"model (the run had diverged)") in err
    assert f"resuming from {ck / 'step_00000004.pt'} (step 4)" in err
    final = load(ck / "last.pt")
    assert final["progress"]["step"] == 6 and final["progress"]["nonfinite"]["skipped"] == 1
    assert all_finite(ck / "last.pt")


def test_skip_passes_over_a_poisoned_batch_and_resumes_exactly(small_imagenet, tmp_path, capsys,
                                                               monkeypatch):
    """skip: the step of the poisoned batch is skipped and counted, the run goes on; a run
    preempted after it and resumed ends with every checkpoint tensor of the uninterrupted run
    (the skip counters included)."""
    poison(monkeypatch, at={3})
    common = ["train.steps=6", "train.on_nonfinite=skip", "checkpoint.every_steps=2",
              "run.log_every_steps=2", "ema.enabled=true"]
    code, err = train(capsys, tmp_path / "ref", small_imagenet, *common)
    assert code == 0, err[-3000:]
    assert ("steps 3-4: 1 step(s) skipped for a non-finite gradient norm, the first at step 3; "
            "1 skipped in all") in err, err[-3000:]
    ref = load(tmp_path / "ref/checkpoints/last.pt")
    assert ref["progress"]["nonfinite"]["skipped"] == 1 and not checkpoint.nonfinite_parts(ref)
    rows = strict_rows(tmp_path / "ref")
    assert [(r["step"], r["skipped_steps"], r.get("nonfinite_losses")) for r in rows
            if r["kind"] == "train"] == [(2, 0, None), (4, 1, 1), (6, 1, None)]
    assert all(r["loss"] is not None for r in rows)  # the window's mean leaves the NaN out

    poison(monkeypatch, at={3}, signal_at=5)
    code, err = train(capsys, tmp_path / "run", small_imagenet, *common)
    assert code == 0 and "SIGTERM received" in err, err[-3000:]
    assert load(tmp_path / "run/checkpoints/last.pt")["progress"]["step"] == 5
    code, err = train(capsys, tmp_path / "run", small_imagenet, *common, "--resume", "auto")
    assert code == 0 and "(step 5)" in err, err[-3000:]
    got = load(tmp_path / "run/checkpoints/last.pt")
    for k in STATE:
        assert_same_tensors(ref[k], got[k], k)


# (precision, optimizer, extra keys, the steps whose batch is poisoned): SGD and AdamW; fp16's
# GradScaler; accumulation with mixup, CutMix and random erasing; a frozen backbone (parameters
# without gradients or optimizer state), skipped while frozen and again after it unfroze
SKIP_CASES = [("fp32", "sgd", [], [3]), ("fp16", "sgd", [], [3]),
              ("fp32", "adamw", ["train.accum_steps=2", "aug.mixup_alpha=0.8",
                                 "aug.cutmix_alpha=1.0", "aug.erase_prob=0.5"], [3]),
              ("fp32", "sgd", ["train.freeze_backbone_steps=3"], [3, 5])]


def test_a_skipped_step_changes_nothing_but_its_batch(tmp_path):
    """skip, on the Trainer itself: after a step on a batch with infinite pixels the weights,
    the BatchNorm statistics, the optimizer's state (momentum; AdamW's moments and step counts)
    and the EMA are bit for bit what they were; with fp16 the GradScaler backs off and the skip
    counts the same way. stop (the default) changes no bit of the plain loop: the guard only
    reads."""
    from cspx.bench.fixed import FixedBatchLoader
    from cspx.bench.steps import BareLoop, bench_config, make_trainer
    from cspx.checkpoint.layout import to_host
    from cspx.config import micro_batch
    cpu = torch.device("cpu")
    args = Namespace(model="cspresnext_tiny", batch=8, img_size=32, precision="fp32",
                     channels_last=False, workers=0, recipe="recipes/demo.yaml", set=[],
                     device="cpu")
    for prec, optim, extra, poisoned in SKIP_CASES:
        case = f"{prec} {optim} {' '.join(extra)}"
        args.precision = prec
        cfg = bench_config(args, "train.on_nonfinite=skip", "ema.enabled=true",
                           "run.log_every_steps=100", f"optim.name={optim}",
                           "optim.lr=0.001" if optim == "adamw" else "optim.lr=0.1", *extra)
        ld = FixedBatchLoader.random(batch=micro_batch(cfg, 1), img_size=32,
                                     num_classes=cfg.model.num_classes, device=cpu,
                                     channels_last=False)
        t = make_trainer(cfg, cpu, ld, str(tmp_path))
        clean = ld.images.clone()

        def state(t=t):
            return to_host({"model": t.model.state_dict(), "ema": t.ema.state_dict(),
                            "optimizer": t.optimizer.state_dict()["state"]})
        for n, step in enumerate(poisoned, 1):
            t.fit(until=step - 1)
            if t.freeze is not None and t.freeze.frozen:  # the classifier's state alone
                assert len(t.optimizer.state) == 2, case
            before, scale = state(), t.scaler.get_scale()
            ld.images[0] = float("inf")  # every micro-batch; mixing or erasing keeps some
            t.fit(until=step)
            assert_same_tensors(before, state(), case)
            assert t.guard.state_dict()["skipped"] == n, case
            if prec == "fp16":
                assert t.scaler.get_scale() == scale / 2
            ld.images.copy_(clean)
        t.fit(until=poisoned[-1] + 1)  # a clean step: applied, finite
        after = state()
        assert t.guard.state_dict()["streak"] == 0 and not checkpoint.nonfinite_parts(after)
        assert any(not torch.equal(before["model"][k], v) for k, v in after["model"].items())
    # stop: the trainer's bits are the plain loop's (forward, backward, foreach SGD step)
    for prec in ("fp32", "fp16"):
        args.precision = prec
        cfg = bench_config(args)
        ld = FixedBatchLoader.random(batch=8, img_size=32, num_classes=cfg.model.num_classes,
                                     device=cpu, channels_last=False)
        t = make_trainer(cfg, cpu, ld, str(tmp_path))
        t.fit(until=3)
        bare = BareLoop(cfg, cpu)
        bare.runner(iter([(ld.images, ld.labels)] * 3))(3)
        assert_same_tensors(bare.model.state_dict(), t.model.state_dict(), prec)
        assert_same_tensors(bare.opt.state_dict()["state"], t.optimizer.state_dict()["state"])


def test_max_skipped_steps_in_a_row_stop_the_run(small_imagenet, tmp_path, capsys):
    """skip with a learning rate of 1e6: every step's gradients are NaN from some step on, so
    the steps in a row reach train.max_skipped_steps and the run stops as stop does."""
    run_dir = tmp_path / "run"
    code, err = train(capsys, run_dir, small_imagenet, "train.steps=12", "optim.lr=1000000.0",
                      "train.on_nonfinite=skip", "train.max_skipped_steps=3",
                      "checkpoint.every_steps=2", "run.log_every_steps=1")
    line = last_line(err)
    assert code == 1 and "Traceback" not in err, err[-3000:]
    m = re.fullmatch(r"error: training diverged in step (\d+) \(train.on_nonfinite=skip\): 3 "
                     r"steps in a row were skipped for a non-finite gradient norm, the last at "
                     r"step \1 \(train.max_skipped_steps=3\); no checkpoint holding it was "
                     r"written; the last good checkpoint is (\S+)\. To continue from it, lower "
                     r"optim.lr \(now 1e\+06\), set train.clip_grad_norm \(now off\) or change "
                     r"train.precision \(now fp32\), and run the same command with --resume "
                     r"auto --resume-force", line)
    assert m, line
    rows = {r["step"]: r for r in strict_rows(run_dir) if r["kind"] == "train"}
    stop, good = int(m.group(1)), load(m.group(2))
    assert rows[stop]["skipped_steps"] >= 3 and max(rows) == stop
    # the last good checkpoint: finite, its skip count the one logged at its step
    step = good["progress"]["step"]
    assert all_finite(m.group(2)) and step < stop
    assert good["progress"]["nonfinite"]["skipped"] == rows[step]["skipped_steps"]


@pytest.mark.slow
def test_every_rank_stops_at_the_same_step(small_imagenet, tmp_path):
    """torchrun, 2 ranks (gloo): the NaN's read is all-reduced, so both ranks end at the same
    step with the same reason, and no checkpoint holds a NaN."""
    from test_distributed import recipe, torchrun
    run_dir = tmp_path / "run"
    r = torchrun(recipe(run_dir, small_imagenet, "data.synthetic=false", "train.steps=8",
                        "optim.lr=1000000.0",
                        "sched.burn_in=4", "checkpoint.every_steps=1", "run.log_every_steps=3",
                        "eval.every_steps=0", "run.tensorboard=false"))
    assert r.returncode != 0
    lines = re.findall(r"error: training diverged in (step \d+|steps \d+-\d+) "
                       r"\(train.on_nonfinite=stop\): ([^;]+);", r.stderr)
    assert len(lines) == 2 and lines[0] == lines[1], r.stderr[-4000:]
    assert "Traceback" not in r.stderr.split("error: training diverged")[0]
    ck = run_dir / "checkpoints"
    assert [n for n in os.listdir(ck) if n.endswith(".pt")]
    for name in os.listdir(ck):
        if name.endswith(".pt"):
            assert all_finite(ck / name), name
