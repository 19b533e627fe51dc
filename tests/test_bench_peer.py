"""scripts/benchmark.py peer, without a timm checkout: the one-line refusals, both sides' settings
mapped from one config to the same values (checked against timm's poly formula and flag
meanings written out here), and the scratch dataset."""
from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import ROOT
from cspx.bench.peer import build_data, check_checkout
from cspx.bench.peer_args import (
    IMAGES,
    Peer,
    cspx_overrides,
    cspx_validate_argv,
    timm_train_argv,
    timm_validate_argv,
)
from cspx.config import load_config
from cspx.errors import CspxError, run_cli
from cspx.schedule import lr_for

CLONE = "git clone https://github.com/huggingface/pytorch-image-models"
RECIPE = os.path.join(ROOT, "recipes", "cspresnext50_ra.yaml")


def _benchmark_main():
    spec = importlib.util.spec_from_file_location("benchmark_script",
                                                  os.path.join(ROOT, "scripts", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_peer_mode_says_in_one_line_where_to_get_a_timm_checkout(tmp_path, capsys):
    main = _benchmark_main()
    not_checkout = tmp_path / "not-timm"
    (not_checkout / "timm").mkdir(parents=True)
    (not_checkout / "train.py").write_text("")
    cases = [([], "--timm-src: the peer mode runs timm's own train.py"),
             (["--timm-src", str(tmp_path / "missing")], "no such folder"),
             (["--timm-src", str(not_checkout)], "not a checkout of timm's repository")]
    for extra, says in cases:
        assert run_cli(main, ["peer", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err and CLONE in err, err
    (not_checkout / "validate.py").write_text("")
    (not_checkout / "timm" / "version.py").write_text("__version__ = '1.0.29.dev0'\n")
    assert check_checkout(str(not_checkout)) == "1.0.29.dev0"


def _flags(argv):
    """timm's argv as {flag: [values]} (a bare flag: [])."""
    out, key = {}, None
    for a in argv[2:]:
        if a.startswith("-") and not a[1:2].isdigit():
            key = a
            out[key] = []
        elif key is not None:
            out[key].append(a)
    return out


@pytest.mark.parametrize("setting", ["plain", "recipe"])
def test_both_sides_get_the_same_settings(setting, tmp_path):
    p = Peer(recipe=RECIPE, setting=setting, model="cspresnext50", batch=16, img_size=224,
             workers=2, device="cpu", precision="fp32", channels_last=False)
    steps = 12
    cfg = load_config(RECIPE, cspx_overrides(p, "/d", "/r", steps), check_paths=False)
    f = _flags(timm_train_argv(cfg, p, "/timm", "/d", "/out", "x", steps, classes=64))
    # the settings on cspx's side: torch loader, 2 workers, fp32, NCHW, batch 16, 224 px,
    # evaluation and checkpoint once, at the end
    assert (cfg.data.loader, cfg.data.workers, cfg.train.precision, cfg.model.channels_last,
            cfg.train.batch_size, cfg.aug.img_size, cfg.eval.img_size) == (
                "torch", 2, "fp32", False, 16, 224, 224)
    assert cfg.eval.every_steps == 0 and cfg.checkpoint.every_steps == 0
    # timm's side: the same data loader, model, batch and evaluation
    assert "--no-prefetcher" in f and "--channels-last" not in f and "--amp" not in f
    assert f["--model"] == ["cspresnext50"] and f["--num-classes"] == ["64"]
    assert f["-b"] == ["16"] and f["--grad-accum-steps"] == ["1"] and f["--workers"] == ["2"]
    assert f["--img-size"] == ["224"] and f["-vb"] == [str(cfg.eval.batch_size)]
    assert f["--crop-pct"] == ["0.875"] and f["--interpolation"] == ["bilinear"]
    # whole epochs of 64 / 16 = 4 steps; evaluation and checkpoint after the last one only
    assert f["--epochs"] == ["3"] and f["--val-interval"] == ["3"]
    # SGD with plain momentum (timm's "sgd" is Nesterov), decay, smoothing, augmentation
    assert f["--opt"] == ["momentum"] and not cfg.optim.nesterov
    assert [float(f[k][0]) for k in ("--lr", "--momentum", "--weight-decay", "--smoothing")] == [
        cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.train.label_smoothing]
    assert [float(x) for x in f["--scale"] + f["--ratio"]] == [*cfg.aug.scale, *cfg.aug.ratio]
    assert float(f["--hflip"][0]) == cfg.aug.hflip
    assert f["--train-interpolation"] == [cfg.aug.interpolation]
    if setting == "plain":
        assert cfg.aug.randaugment_ops == 0 and f["--color-jitter"] == ["0"] and "--aa" not in f
    else:
        assert (cfg.aug.randaugment_ops, cfg.aug.randaugment_magnitude) == (2, 7.0)
        assert f["--aa"] == ["rand-m7-n2"] and "--color-jitter" not in f
    # the same LR at every step: timm's poly schedule per update with no warm-up,
    # lr * (1 - t / T) ** power (timm.scheduler.PolyLRScheduler), against cspx's schedule
    assert f["--sched"] == ["poly"] and "--sched-on-updates" in f
    assert f["--warmup-epochs"] == ["0"] and f["--min-lr"] == ["0"]
    power, lr = float(f["--decay-rate"][0]), float(f["--lr"][0])
    for t in range(steps):
        assert lr_for(cfg, t) == pytest.approx(lr * (1 - t / steps) ** power, rel=1e-12)
    # validation: the same weights, folder, batch, workers and loader kind
    cv, tv = (_flags(cspx_validate_argv(p, "/w.pth", "/v")),
              _flags(timm_validate_argv(p, "/timm", "/w.pth", "/v", 64)))
    assert cv["--batch-size"] == tv["-b"] == ["16"] and cv["--workers"] == tv["-j"] == ["2"]
    assert cv["--loader"] == ["torch"] and "--no-prefetcher" in tv
    assert cv["--img-size"] == tv["--img-size"] == ["224"] and "--channels-last" not in cv


def test_what_the_mapping_does_not_carry_over_is_refused_in_one_line():
    p = Peer(recipe=RECIPE, setting="plain", model="cspresnext50", batch=16, img_size=224,
             workers=2, device="cpu", precision="fp32", channels_last=False)

    def argv(steps, *extra):
        cfg = load_config(RECIPE, cspx_overrides(p, "/d", "/r", steps) + list(extra),
                          check_paths=False)
        return timm_train_argv(cfg, p, "/timm", "/d", "/out", "x", steps, classes=64)

    with pytest.raises(CspxError, match="give multiples of 4"):
        argv(10)
    for key in ("aug.rotate=5", "aug.policy=trivialaugment", "aug.mixup_alpha=0.2",
                "aug.erase_prob=0.25", "optim.name=adamw", "optim.head_lr_mult=10",
                "train.freeze_backbone_steps=4", "train.on_nonfinite=skip"):
        with pytest.raises(CspxError, match=f"{key.split('=')[0]}=.* is not mapped") as e:
            argv(8, key)
        assert len(str(e.value).splitlines()) == 1
    assert _flags(argv(8, "optim.nesterov=true"))["--opt"] == ["sgd"]
    # two micro-batches per step: an epoch is 64 / 16 = 4 optimizer steps of 2 x 8 images
    f = _flags(argv(8, "train.accum_steps=2"))
    assert (f["-b"], f["--grad-accum-steps"], f["--epochs"]) == (["8"], ["2"], ["2"])
    # a recipe with another schedule gets the comparison's: poly without warmup on both sides
    cfg = load_config(os.path.join(ROOT, "recipes", "cspresnext50_modern.yaml"),
                      cspx_overrides(p, "/d", "/r", 8), check_paths=False)
    assert (cfg.sched.kind, cfg.sched.burn_in, cfg.sched.warmup_steps, cfg.sched.min_lr) == (
        "poly", 0, 0, 0.0)


def test_scratch_data_takes_one_image_per_class_in_turn(small_imagenet, tmp_path):
    root, twice, classes = build_data(small_imagenet, str(tmp_path))
    listing = {}
    for split in ("train", "val"):
        listing[split] = sorted(os.path.join(c, f) for c in os.listdir(os.path.join(root, split))
                                for f in os.listdir(os.path.join(root, split, c)))
    assert listing["train"] == listing["val"] and len(listing["train"]) == IMAGES
    assert classes == 3  # 3 classes of 44: 22 + 21 + 21 images
    assert sorted(len(os.listdir(os.path.join(root, "train", c)))
                  for c in os.listdir(os.path.join(root, "train"))) == [21, 21, 22]
    assert sum(len(files) for _, _, files in os.walk(twice)) == 2 * IMAGES
