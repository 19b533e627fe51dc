"""Fine-tuning: the backbone freeze and its exact resume with AdamW and a classifier LR, the
fine-tune recipe's one-line refusal without weights, the dry run's LR plan for every schedule,
and transfer on a CPU (scripts/benchmark.py finetune) beating training from scratch."""
from __future__ import annotations

import json
import os
import shutil
from argparse import Namespace

import pytest
import torch

from conftest import ROOT
from test_resume import assert_same_tensors, load

FREEZE = 3  # optimizer steps 0..2 train the classifier alone


def finetune_args(run_dir, data, weights, *extra):
    """Six steps on the small 3-class set from 1000-class weights: AdamW, a 10x classifier LR,
    cosine with warmup, the backbone frozen for 3 steps, an evaluation and a checkpoint in the
    frozen phase (evaluation returns the model to training mode: the freeze must hold)."""
    return ["--recipe", os.path.join(ROOT, "recipes", "demo.yaml"), f"run.dir={run_dir}",
            f"data.root={data}", "data.synthetic=false", f"model.init_from={weights}",
            "optim.name=adamw", "optim.lr=1e-3", "optim.weight_decay=0.05",
            "optim.head_lr_mult=10", "sched.kind=cosine", "sched.burn_in=0",
            "sched.warmup_steps=2", "sched.warmup_lr=1e-5", f"train.freeze_backbone_steps={FREEZE}",
            "train.steps=6", "train.batch_size=16", "aug.img_size=32", "eval.img_size=32",
            "eval.every_steps=2", "eval.batch_size=12", "data.workers=0",
            "checkpoint.every_steps=1", "checkpoint.keep_last=10", "run.log_every_steps=1",
            "run.tensorboard=false", *extra]


@pytest.fixture(scope="module")
def frozen_run(small_imagenet, tmp_path_factory):
    """An uninterrupted run in <work>/run, moved to <work>/ref when done."""
    from cspx.cli.train import main
    from cspx.models import create_model
    work = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(5)
    src = create_model("cspresnext_tiny", num_classes=1000)
    torch.save(src.state_dict(), work / "w1000.pth")
    assert main(finetune_args(work / "run", small_imagenet, work / "w1000.pth")) == 0
    os.rename(work / "run", work / "ref")
    return work, src.state_dict()


def test_only_the_classifier_trains_while_the_backbone_is_frozen(frozen_run):
    work, src = frozen_run
    ck = {k: load(work / "ref" / "checkpoints" / f"step_{k:08d}.pt") for k in (FREEZE, FREEZE + 1)}
    backbone = [k for k in src if not k.startswith("head.fc.")]
    # after the frozen steps: every backbone tensor (weights, BN statistics, the batch counter)
    # and its EMA are the source's bit for bit; the optimizer holds state for the classifier only
    frozen = ck[FREEZE]
    for k in backbone:
        assert torch.equal(frozen["model"][k], src[k]), k
        assert torch.equal(frozen["ema"][k], src[k]), k
    assert frozen["model"]["head.fc.weight"].shape == (3, 256)
    assert len(frozen["optimizer"]["state"]) == 2       # head.fc.weight and head.fc.bias
    groups = frozen["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["decay", "no_decay", "head_decay", "head_no_decay"]
    head_ids = sorted(i for g in groups[2:] for i in g["params"])
    assert head_ids == sorted(frozen["optimizer"]["state"])
    # the first step after the freeze trains everything
    after = ck[FREEZE + 1]
    moved = [k for k in backbone if not torch.equal(after["model"][k], src[k])]
    assert len(moved) > len(backbone) // 2
    assert len(after["optimizer"]["state"]) == sum(len(g["params"]) for g in groups)
    # metrics.jsonl: both LRs at every logged step, the classifier's 10x the schedule's
    with open(work / "ref" / "metrics.jsonl") as f:
        train = [r for r in map(json.loads, f) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[0]["lr"] == 1e-5
    assert all(r["lr_head"] == pytest.approx(10 * r["lr"]) for r in train)


def test_frozen_modules_are_in_eval_mode_and_the_head_trains():
    """Stem and stages: eval mode (BatchNorm keeps its statistics), no gradients; the head
    (pooling, dropout, fc) trains, and stays so after an evaluation's model.train()."""
    from cspx.freeze import BackboneFreeze
    from cspx.models import create_model
    m = create_model("cspresnext_tiny", num_classes=10, drop_rate=0.2).train()
    freeze = BackboneFreeze(m, steps=2)
    assert freeze.apply(0) and not freeze.apply(1)     # requires_grad changes once
    for _ in range(2):
        training = {n for n, x in m.named_modules() if x.training}
        assert training == {"", "head", "head.global_pool", "head.global_pool.pool",
                            "head.global_pool.flatten", "head.drop", "head.fc", "head.flatten"}
        assert [n for n, p in m.named_parameters() if p.requires_grad] == ["head.fc.weight",
                                                                          "head.fc.bias"]
        m.eval().train()                              # as cspx.eval_metrics.evaluate leaves it
        freeze.apply(1)
    assert freeze.apply(2)                             # the unfreeze
    assert all(x.training for x in m.modules()) and all(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("stop", [FREEZE - 1, FREEZE])
def test_resume_across_the_unfreeze_is_bit_exact(frozen_run, small_imagenet, stop):
    """Stopped inside the frozen phase (after an evaluation) or exactly at the unfreeze, then
    resumed in a new Trainer: the final checkpoint equals the uninterrupted run's in every
    tensor and value (model, AdamW moments and step counts, EMA, RNGs, loader, progress)."""
    from cspx.cli.train import main
    work, _ = frozen_run
    run = work / "run"
    shutil.copytree(work / "ref", run)
    try:
        path = run / "checkpoints" / f"step_{stop:08d}.pt"
        assert main(finetune_args(run, small_imagenet, work / "w1000.pth", "--resume",
                                  str(path))) == 0
        a, b = load(work / "ref" / "checkpoints" / "last.pt"), load(run / "checkpoints" / "last.pt")
        assert b["progress"]["step"] == 6
        assert_same_tensors(a, b, "checkpoint")
        def strip(path):   # every record and value but the clock's
            return [{k: v for k, v in json.loads(x).items() if k not in ("time", "img_per_sec")}
                    for x in open(path)]
        assert strip(run / "metrics.jsonl") == strip(work / "ref" / "metrics.jsonl")
    finally:
        shutil.rmtree(run)


def test_finetune_recipe_needs_weights_and_data(capsys):
    from cspx.cli.train import main
    code = main(["--recipe", os.path.join(ROOT, "recipes", "finetune.yaml"), "data.root=/tmp"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: ") and "recipes/finetune.yaml: this recipe needs " \
        "model.init_from (the pretrained weights: timm's cspresnext50_ra_224-648b4713.pth or a " \
        "cspx checkpoint); add model.init_from=... to the command line" in err


def test_dry_run_shows_the_lr_of_every_schedule(small_imagenet, tmp_path, capsys):
    """The fine-tune recipe as a user starts it (cosine, warmup, classifier LR) and the step
    schedule: the LR at the start, the warmup's end, each decay, the unfreeze and the quarters."""
    from cspx.cli.train import main
    (tmp_path / "w.pth").touch()
    recipe = os.path.join(ROOT, "recipes", "finetune.yaml")
    base = ["--recipe", recipe, f"model.init_from={tmp_path / 'w.pth'}",
            f"data.root={small_imagenet}", f"run.dir={tmp_path / 'run'}", "data.loader=torch",
            "model.name=cspresnext_tiny"]  # the plan's LR lines do not depend on the model
    assert main([*base, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "optimizer     AdamW betas [0.9, 0.999], eps 1e-08, weight decay 0.05, classifier " \
           "LR x 10; cosine schedule" in out
    assert "learning rate step           0  2.5e-06      head 2.5e-05      start" in out
    # cosine: 2.5e-4 (1 + cos(pi i / 4000)) / 2 at the end of warmup (500) and at half-way
    assert "step         500  0.000240485  head 0.00240485   end of warmup" in out
    assert "step       2,000  0.000125     head 0.00125      50%" in out
    assert main([*base, "sched.kind=step", "sched.decay_steps=1500", "sched.decay_rate=0.5",
                 "optim.head_lr_mult=1", "train.freeze_backbone_steps=700", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for line in ("step         500  0.00025      end of warmup",
                 "step         700  0.00025      backbone unfrozen",
                 "step       1,000  0.00025      25%",
                 "step       1,500  0.000125     decay 1",
                 "step       3,000  6.25e-05     decay 2, 75%"):
        assert line in out, (line, out)
    assert "only the classifier trains for the first 700 steps; step schedule" in out
    # a smoke run shorter than the warmup: allowed, with one warning line
    assert main([*base, "train.steps=400", "--dry-run"]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "inside the warmup" in ln]
    assert warned == ["sched.warmup_steps=500 >= train.steps=400: the run ends inside the warmup "
                      "(its last step has LR 0.0002 of optim.lr=0.00025)"]
    assert not (tmp_path / "run").exists()


def test_fine_tuned_demo_model_beats_training_from_scratch(demo_data, tmp_path, monkeypatch):
    """scripts/benchmark.py finetune at a small budget, in this process: the demo's model,
    pretrained for 100 steps on the demo task, fine-tuned for 20 steps with
    recipes/finetune.yaml's settings on eight other shapes, ends far above the same model
    trained from scratch for the same 20 steps, with either the fine-tune settings or the demo's
    own recipe (on CPU-2: 53.8% against 13.3% and 27.9%; chance is 12.5%)."""
    from cspx.bench.common import Report
    from cspx.bench.transfer import finetune
    args = Namespace(data=demo_data, steps=20, pretrain_steps=100, per_class=40, evals=2,
                     img_size=32, batch=32, model="cspresnext_tiny", workers=0,
                     shape_only=False, out_dir=str(tmp_path), report=Report(None, {}))
    rows, extra = finetune(args)
    top1 = {r["run"]: r["top-1 %"] for r in rows}
    assert list(top1) == ["pretrained (demo task)", "fine-tuned", "scratch, fine-tune settings",
                          "scratch, demo recipe"]
    assert top1["pretrained (demo task)"] > 40, rows      # chance: 10%
    assert extra["gain_over_scratch_fine_tune_settings"] >= 15, rows
    assert extra["gain_over_scratch_demo_recipe"] >= 15, rows
    assert [r["step"] for r in extra["raw"]["fine-tuned"] if r["kind"] == "eval"] == [10, 20]
    assert os.listdir(tmp_path) == []   # its run folders are removed
