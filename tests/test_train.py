"""The trainer end to end on CPU: the demo learns, precisions, bad files, dry run, run folder."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import torch

from conftest import ROOT, run_main

SMALL = ["aug.img_size=32", "eval.img_size=32", "train.batch_size=16", "sched.burn_in=2",
         "data.workers=0", "run.log_every_steps=1"]


def args(run_dir, data, *extra):
    return ["train.py", "--recipe", "recipes/demo.yaml", f"run.dir={run_dir}",
            f"data.root={data}", *extra]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


def test_demo_learns_and_validate_agrees(demo_data, tmp_path):
    """A shortened demo (200 of its 500 steps, 48 px) still learns the synthetic classes."""
    run_dir = tmp_path / "demo"
    r = run_main(args(run_dir, demo_data, "train.steps=200", "sched.burn_in=20", "aug.img_size=48",
                      "eval.img_size=48", "eval.every_steps=100", "checkpoint.every_steps=100"))
    assert r.returncode == 0, r.stderr[-3000:]
    ev = [m for m in metrics(run_dir) if m["kind"] == "eval"]
    assert [m["step"] for m in ev] == [100, 200]
    assert ev[-1]["top1"] >= 80.0, ev           # chance is 10%; the full demo reaches >= 90%
    assert [m["kind"] for m in metrics(run_dir)].count("eval_ema") == 2
    # the run folder: resolved config, provenance, log, TensorBoard, checkpoints
    for name in ("config.yaml", "provenance.json", "train.log", "metrics.jsonl",
                 "checkpoints/last.pt",
                 "checkpoints/best.pt"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "tb").iterdir())
    prov = json.load(open(run_dir / "provenance.json"))
    for key in ("commit", "python", "torch", "torchvision", "dali", "device", "command"):
        assert prov[key], key
    for key in ("commit", "torch", "torchvision", "dali", "device", "command"):
        assert re.search(rf"^\s+{key}\s+\S", r.stderr, re.M), key   # header at the top of the log
    assert "train.steps" not in r.stderr or "steps: 200" in r.stderr   # resolved config printed
    # the printed validate.py command, run exactly as printed, reproduces the final evaluation
    line = r.stderr.split("evaluate the result with:")[1].strip().splitlines()[0]
    v = subprocess.run(line, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert v.returncode == 0, v.stderr
    last = ev[-1]
    assert f"top-1 {last['top1']:.3f}%  top-5 {last['top5']:.3f}%" in v.stdout, (v.stdout, last)
    assert f"images {last['count']} " in v.stdout


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_steps_run_on_cpu(demo_data, tmp_path, precision):
    r = run_main(args(tmp_path / precision, demo_data, *SMALL, f"train.precision={precision}",
                      "train.steps=3", "eval.every_steps=0", "run.tensorboard=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(tmp_path / precision / "checkpoints/last.pt", weights_only=True)
    assert ck["config"]["train"]["precision"] == precision
    assert all(torch.isfinite(t).all() for t in ck["model"].values() if t.is_floating_point())
    if precision == "fp16":
        assert ck["scaler"]["scale"] > 0     # the GradScaler state is checkpointed
    losses = [m["loss"] for m in metrics(tmp_path / precision) if m["kind"] == "train"]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)


def test_bad_files_never_crash_a_run(demo_data, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("s00_circle", "s01_square"):
            src = os.path.join(demo_data, split, cls)
            os.makedirs(data / split / cls)
            for name in sorted(os.listdir(src))[:10]:
                shutil.copy(os.path.join(src, name), data / split / cls / name)
    bad = data / "train" / "s00_circle"
    (bad / "empty.JPEG").write_bytes(b"")
    good = open(os.path.join(demo_data, "train/s00_circle", "s00_circle_00000.JPEG"), "rb").read()
    (bad / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (bad / "notes.JPEG").write_text("not an image at all")
    # passes the quick scan (JPEG markers at both ends) but does not decode
    (bad / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(3000) + b"\xff\xd9")
    # 21 readable-looking files, batch 7: every epoch visits all of them
    r = run_main(args(tmp_path / "run", data, *SMALL, "train.batch_size=7", "train.steps=6",
                      "eval.every_steps=0", "data.synthetic=false", "run.tensorboard=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"excluding 3 files: .*empty.JPEG \(empty file\).*notes.JPEG "
                     r"\(not an image", r.stderr)
    assert "truncated.JPEG (truncated JPEG" in r.stderr
    assert "corrupt.JPEG: cannot decode" in r.stderr and "replaced by the next file" in r.stderr
    m = [x for x in metrics(tmp_path / "run") if x["kind"] == "train"]
    assert m[-1]["bad_files"] >= 1 and m[-1]["step"] == 6


def test_dry_run_prints_the_plan(small_imagenet, tmp_path):
    data = small_imagenet
    r = run_main(["train.py", "--recipe", "recipes/cspresnext50_ra.yaml", f"data.root={data}",
                 f"run.dir={tmp_path / 'run'}", "--dry-run"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    params = 20_569_896 - (2048 * 1000 + 1000) + (2048 * 3 + 3)   # the fc shrinks to 3 classes
    assert f"cspresnext50: {params:,} parameters, 3 classes" in out
    assert "8,000,000 optimizer steps = 7,757,575.76 epochs, 1,024,000,000 images seen" in out
    # 0.1 (1 - i/8e6)^4 at the end of burn-in, half way and at the last step
    assert re.search(r"learning rate +step +0 +0 +start", out)
    assert re.search(r"step +1,000 +0\.09995 +end of burn-in", out)
    assert re.search(r"step +4,000,000 +0\.00625 +50%", out)
    assert re.search(r"step +7,999,999 +2\.44141e-29 +100%", out)
    assert re.search(r"about \d+ MiB each \(model \+ momentum\)", out)
    assert not (tmp_path / "run").exists()   # nothing trained or written


# the recipes that train from scratch (finetune.yaml needs weights: tests/test_finetune.py)
RECIPES = ["recipes/cspresnext50_ra.yaml", "recipes/cspresnext50_darknet.yaml",
           "recipes/cspresnext50_modern.yaml", "recipes/demo.yaml"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_short_runs_of_every_recipe_dry_run(small_imagenet, tmp_path, recipe, capsys):
    """Smoke tests with a few steps are the first thing people run: a burn-in or warmup as long
    as the run or longer is allowed, with one warning line, and the LR follows darknet's burn-in
    or the linear warmup; the plan names the batch augmentations the recipe turns on. A batch
    larger than the 132 images is cut to 128. (In this process, through train.py's main: the
    CLI subprocess path is tested above.)"""
    import yaml

    from cspx.cli.train import main
    recipe = os.path.join(ROOT, recipe)
    with open(recipe) as f:
        rec = yaml.safe_load(f)
    fit = ["train.batch_size=128"] if rec["train"]["batch_size"] > 128 else []
    for steps in (1, 10, 1000):
        code = main(["--recipe", recipe, f"data.root={small_imagenet}", "data.synthetic=false",
                     f"run.dir={tmp_path / 'run'}", f"train.steps={steps}", *fit, "--dry-run"])
        r = capsys.readouterr()
        assert code == 0, (steps, r.err[-2000:])
        aug = re.search(r"^  augment +(.+)$", r.out, re.M).group(1)
        a = rec["aug"]
        assert (f"mixup {a['mixup_alpha']:g}" in aug) == (a["mixup_alpha"] > 0), aug
        assert (f"CutMix {a['cutmix_alpha']:g}" in aug) == (a["cutmix_alpha"] > 0), aug
        assert (f"random erasing p {a['erase_prob']:g}" in aug) == (a["erase_prob"] > 0), aug
        # darknet's burn-in, lr * (i / burn_in)^power, or the linear warmup, warmup_lr + i *
        # (lr - warmup_lr) / warmup_steps, at the last step i = steps - 1
        sch, lr, i = rec["sched"], rec["optim"]["lr"], steps - 1
        warm = sch["burn_in"] or sch["warmup_steps"]
        warned = [ln for ln in r.err.splitlines() if "ends inside" in ln]
        assert len(warned) == (1 if warm and warm >= steps else 0), r.err
        if warned and sch["burn_in"]:
            assert "ends inside burn-in" in warned[0]
            assert f"LR {lr * (i / warm) ** sch['power']:.4g} of" in warned[0]
        elif warned:
            assert "ends inside the warmup" in warned[0]
            lr_i = sch["warmup_lr"] + i * (lr - sch["warmup_lr"]) / warm
            assert f"LR {lr_i:.4g} of" in warned[0]
        assert f"{steps:,} optimizer steps" in r.out
    assert not (tmp_path / "run").exists()


def test_out_of_memory_is_one_clear_message(demo_data, tmp_path, monkeypatch, capsys):
    """An OOM names the micro-batch and suggests train.accum_steps (simulated: no GPU here)."""
    from cspx import train_setup as run
    from cspx.cli.train import main
    real = run.create_model

    def oom_model(*a, **kw):
        m = real(*a, **kw)
        def boom(*_):
            raise run.OOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        m.forward = boom
        return m
    monkeypatch.setattr(run, "create_model", oom_model)
    code = main(args(tmp_path / "run", demo_data, *SMALL, "train.steps=3",
                     "run.tensorboard=false")[1:])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("error: out of memory on cpu with micro-batch 16;")
    assert "train.accum_steps=2" in err


def test_init_from_drops_a_mismatched_classifier(demo_data, tmp_path):
    """Fine-tuning: timm-format weights with 1000 classes start a 10-class run; the backbone is
    taken, the classifier is dropped and the log says so."""
    from cspx.models import create_model
    torch.manual_seed(5)
    src = create_model("cspresnext_tiny", num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "w1000.pth")
    r = run_main(args(tmp_path / "run", demo_data, *SMALL,
                      f"model.init_from={tmp_path / 'w1000.pth'}", "train.steps=3",
                      "optim.lr=1.0e-9", "sched.burn_in=0", "eval.every_steps=0",
                      "ema.enabled=false", "run.tensorboard=false"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dropped classifier: checkpoint has 1000 classes, model has 10" in r.stderr
    got = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["model"]
    assert got["head.fc.weight"].shape == (10, 256)
    # with a vanishing LR the backbone is still the source's (BN statistics aside)
    w = "stages.2.blocks.1.conv2.conv.weight"
    torch.testing.assert_close(got[w], src.state_dict()[w], rtol=0, atol=1e-6)
