"""scripts/benchmark.py: the `augment` mode end to end, and the parts of the other modes that make
their figures comparable (the same settings as the commands they stand for, the same optimizer,
a baseline that never re-spawns its workers) and keep them when a run is cut short."""
from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
from argparse import Namespace

import pytest
import torch

from conftest import ROOT, run_main

CPU = torch.device("cpu")


def bench_args(**over):
    from cspx.bench.common import Report
    a = dict(model="cspresnext_tiny", batch=4, img_size=32, precision="auto", channels_last=False,
             workers=0, set=[], recipe=os.path.join(ROOT, "recipes", "cspresnext50_ra.yaml"),
             device="cpu", steps=1, rounds=1, warmup=1, report=Report(None, {}))
    return Namespace(**{**a, **over})


def test_augment_mode_times_every_augmentation(sample_dir, tmp_path):
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "aug.json"
    r = run_main(["scripts/benchmark.py", "augment", "--data", os.path.join(sample_dir, "val"),
                 "--batch", "8", "--rounds", "1", "--device", "cpu", "--json", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    ops = [row["op"] for row in res["rows"]]
    # torchvision's RandAugment op list, in DALI's names, then the whole RandAugment and the
    # other two policies, then the rows behind docs figures: DALI's own versions of the two
    # rebuilt ops, and the cast alone; then the batch augmentations after either loader
    assert ops == ["translate_x", "translate_y", "shear_x", "shear_y", "rotate", "brightness",
                   "contrast", "color", "sharpness", "posterize", "solarize", "equalize",
                   "auto_contrast", "identity", "RandAugment, 2 ops", "TrivialAugment Wide",
                   "AutoAugment, ImageNet policy", "contrast (DALI's own op)",
                   "solarize (DALI's own op)", "float -> uint8 cast",
                   "mixup, alpha 0.2 (batch)", "CutMix, alpha 1 (batch)",
                   "mixup + CutMix per image (elem)", "random erasing, pixel",
                   "random erasing, rand", "random erasing, const"]
    assert res["magnitude_bin"] == 21 and res["interpolation"] == "nearest"  # the recipe's
    assert res["complete"] is True
    for row in res["rows"]:
        assert math.isfinite(row["DALI ms/img"])
        assert row["op"] == "float -> uint8 cast" or math.isfinite(row["torchvision ms/img"])
    for whole in res["rows"][14:17]:  # the three policies
        assert whole["DALI ms/img"] > 0 and whole["torchvision ms/img"] > 0
    for row in res["rows"][20:]:  # one measurement on the device serves both loaders
        assert row["DALI ms/img"] == row["torchvision ms/img"] > 0
        assert row["DALI / torchvision"] == "-"
    assert res["batch_device"] == "cpu"
    assert "RandAugment, 2 ops" in r.stdout  # the printed table


def test_report_rewrites_its_json_after_every_row(tmp_path):
    """A benchmark stopped at a time limit keeps every row it had measured."""
    from cspx.bench.common import Report
    path = tmp_path / "r.json"
    rep = Report(str(path), {"mode": "x"})
    assert json.loads(path.read_text()) == {"mode": "x", "complete": False, "rows": []}
    row = rep.row({"loop": "a"})
    assert json.loads(path.read_text())["rows"] == [{"loop": "a"}]
    row["img/s"] = 12.5  # a row updated after a round
    rep.flush()
    assert json.loads(path.read_text())["rows"] == [{"loop": "a", "img/s": 12.5}]
    rep.finish([row, {"loop": "b"}], {"ratio": 2.0})
    got = json.loads(path.read_text())
    assert got["complete"] is True and got["ratio"] == 2.0
    assert got["rows"] == [{"loop": "a", "img/s": 12.5}, {"loop": "b"}]


def test_a_failing_variant_is_an_error_row_and_the_others_run():
    """One variant that does not compile or does not fit must not cost a GPU run the rest."""
    from cspx.bench.steps import measure

    def broken(n):
        raise RuntimeError("CUDA graphs: cannot capture\nsecond line")

    c = {"ok": dict(run=lambda n: 0.01, flop=1e9, group="eager",
                    row={"loop": "cspx synthetic", "batch": 4, "compile": "eager"}),
         "bad": dict(run=broken, flop=1e9, group="reduce-overhead",
                     row={"loop": "cspx synthetic", "batch": 4, "compile": "reduce-overhead"}),
         "same trainer": dict(run=lambda n: 0.01, flop=1e9, group="reduce-overhead",
                              row={"loop": "cspx dali loader", "batch": 4,
                                   "compile": "reduce-overhead"})}
    rows = measure(bench_args(rounds=2), CPU, 4, c)
    assert rows[0]["img/s"] == pytest.approx(400.0) and rows[0]["rounds"] == 2
    assert rows[0]["TFLOP/s"] == pytest.approx(400 * 1e9 / 1e12)
    assert rows[1]["error"] == "RuntimeError: CUDA graphs: cannot capture"
    assert rows[2]["error"].startswith("not run: RuntimeError") and "img/s" not in rows[2]


def test_bare_loop_uses_the_trainers_optimizer_scaler_and_schedule(tmp_path):
    """`overhead` compares loops, not optimizers: the bare loop's SGD has the trainer's
    parameter groups, weight decay and kernel flags (cspx.optim.build_optimizer)."""
    from cspx.bench.steps import SYNTHETIC_ONLY, BareLoop, bench_config, make_trainer, synthetic
    from cspx.schedule import lr_for
    cfg = bench_config(bench_args(), SYNTHETIC_ONLY)
    fixed = synthetic(cfg, CPU)
    trainer = make_trainer(cfg, CPU, fixed, str(tmp_path))
    bare = BareLoop(cfg, CPU)
    tg, bg = trainer.optimizer.param_groups, bare.opt.param_groups
    assert [g["name"] for g in bg] == [g["name"] for g in tg] == ["decay", "no_decay"]
    for t, b in zip(tg, bg):
        assert [p.shape for p in b["params"]] == [p.shape for p in t["params"]]
        for key in ("weight_decay", "momentum", "nesterov", "dampening", "foreach", "fused"):
            assert b.get(key) == t.get(key), key
    assert bg[0]["foreach"] is False  # on the CPU: the single-tensor loop (build_optimizer)
    assert bare.scaler.is_enabled() == trainer.scaler.is_enabled()
    bare.runner(itertools.repeat((fixed.images, fixed.labels)))(2)
    assert bare.step == 2 and bg[0]["lr"] == lr_for(cfg, 1)


def test_baseline_loader_serves_epoch_after_epoch_without_new_workers(small_imagenet):
    from cspx.bench.steps import SYNTHETIC_ONLY, baseline_loader, bench_config
    cfg = bench_config(bench_args(batch=64, workers=1), SYNTHETIC_ONLY, "aug.randaugment_ops=0")
    before = set(multiprocessing.active_children())
    it = baseline_loader(os.path.join(small_imagenet, "train"), cfg, CPU)
    per_epoch = 132 // 64  # 132 training images, drop_last
    x, _ = next(it)
    assert x.shape == (64, 3, 32, 32)
    workers = set(multiprocessing.active_children()) - before  # the DataLoader's processes
    assert len(workers) == 1  # data.workers=1
    for _ in range(3 * per_epoch):
        next(it)
    assert set(multiprocessing.active_children()) - before == workers
    assert all(w.is_alive() for w in workers)


def test_validate_mode_sets_up_as_validate_py(small_imagenet, tmp_path, monkeypatch):
    """benchmark.py validate measures what validate.py runs: the same kernel settings
    (precision.configure_backends, without TF32) and fp32 unless told otherwise."""
    import cspx.bench.io as bench_io
    import cspx.eval_checkpoint as eval_checkpoint
    from cspx import precision
    from cspx.cli.validate import parse_args
    from cspx.eval_metrics import evaluate
    from cspx.models import create_model
    backends, amps = [], []
    real = precision.configure_backends
    monkeypatch.setattr(precision, "configure_backends",
                        lambda *a, **k: backends.append((a, k)) or real(*a, **k))
    for who, module in (("bench", bench_io), ("validate.py", eval_checkpoint)):
        monkeypatch.setattr(module, "evaluate", lambda m, ld, env, amp="fp32", who=who, **k:
                            amps.append((who, amp)) or evaluate(m, ld, env, amp, **k))
    bench_io.validate(bench_args(data=os.path.join(small_imagenet, "val"), loaders=["torch"]))
    torch.save(create_model("cspresnext_tiny", num_classes=3).state_dict(), tmp_path / "w.pt")
    eval_checkpoint.run(parse_args(["--checkpoint", str(tmp_path / "w.pt"), "--model",
                                    "cspresnext_tiny", "--data-dir", small_imagenet,
                                    "--img-size", "32", "--batch-size", "4", "--workers", "0",
                                    "--device", "cpu"]))
    assert backends == [((CPU,), {"tf32": False})] * 2
    assert {amp for who, amp in amps} == {"fp32"} and {who for who, _ in amps} == {
        "bench", "validate.py"}


def test_evaldiff_mode_compares_dali_eval_pipelines_with_pil(sample_dir, tmp_path):
    """The command behind docs/dali.md's DALI-vs-PIL table (there at 224 px and 3 seeds)."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "ev.json"
    r = run_main(["scripts/benchmark.py", "evaldiff", "--data", os.path.join(sample_dir, "val"),
                 "--img-size", "64", "--rounds", "1",
                 "--workers", "2", "--batch", "35", "--json", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["pipeline"]: row for row in json.loads(out.read_text())["rows"]}
    cspx, naive = rows["cspx DALI eval, bilinear"], rows[
        "naive DALI (resize_shorter, crop_pos 0.5), bilinear"]
    assert "cspx DALI eval, bicubic" in rows
    assert cspx["mean |d| avg"] < 0.01 < naive["mean |d| avg"]
    assert cspx["max |d| worst"] < naive["max |d| worst"]
