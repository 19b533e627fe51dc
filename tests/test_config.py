"""Recipes and overrides: every bad key or value is one clear line naming the source and key."""
from __future__ import annotations

import glob
import os
import re

import pytest
import yaml

from conftest import ROOT, run_main, run_py
from cspx import configio
from cspx.config import Config, load_config
from cspx.errors import CspxError

RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.fixture
def recipe(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    return write(tmp_path, f"seed: 1\nrun: {{dir: {tmp_path / 'run'}}}\ndata: {{root: {data}}}\n"
                           "model: {name: cspresnext_tiny}\n"
                           "train: {steps: 10, batch_size: 8}\n"
                           "optim: {lr: 0.1}\n")


def test_all_recipes_load_and_are_complete(tmp_path):
    assert {os.path.basename(p) for p in RECIPES} >= {"cspresnext50_ra.yaml",
                                                      "cspresnext50_darknet.yaml", "demo.yaml"}
    every_key = set(configio.flatten(configio.to_dict(Config())))
    (tmp_path / "w.pth").touch()
    for path in RECIPES:
        cfg = load_config(path, [f"data.root={tmp_path}", f"model.init_from={tmp_path / 'w.pth'}"])
        assert isinstance(cfg, Config)
        # a recipe spells out every key, so it documents the whole run
        assert set(configio.flatten(yaml.safe_load(open(path)))) == every_key, path


def test_every_recipe_key_has_a_comment():
    for path in RECIPES:
        for n, line in enumerate(open(path), 1):
            if re.match(r"^\s*[a-z_]+:\s*\S", line):   # a key with a value (not a section)
                assert "#" in line, f"{path}:{n}: key without a comment: {line.strip()}"


def test_documented_recipe_values(tmp_path):
    c = load_config(os.path.join(ROOT, "recipes", "cspresnext50_ra.yaml"),
                    [f"data.root={tmp_path}"])
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (0.1, 0.9, 0.005)
    assert (c.train.steps, c.train.batch_size, c.train.label_smoothing) == (8_000_000, 128, 0.1)
    assert (c.sched.power, c.sched.burn_in) == (4.0, 1000)
    assert (c.aug.img_size, c.aug.scale, c.aug.interpolation) == (224, (0.08, 1.0), "bilinear")
    assert c.aug.ratio == pytest.approx((3 / 4, 4 / 3))
    assert (c.aug.randaugment_ops, c.aug.randaugment_magnitude, c.aug.hflip) == (2, 7.0, 0.5)
    assert (c.eval.img_size, c.eval.crop_pct, c.eval.interpolation) == (224, 0.875, "bilinear")
    d = load_config(os.path.join(ROOT, "recipes", "cspresnext50_darknet.yaml"),
                    [f"data.root={tmp_path}"])
    assert (d.train.steps, d.optim.weight_decay, d.train.label_smoothing) == (800_000, 0.0005, 0.0)
    assert (d.aug.hue, d.aug.saturation, d.aug.exposure, d.aug.rotate) == (0.1, 0.75, 0.75, 7.0)


def test_overrides_are_yaml_scalars(recipe):
    c = load_config(recipe, ["train.steps=2000", "optim.lr=0.2", "model.init_from=null",
                             "aug.scale=[0.5, 1.0]", "ema.enabled=true"])
    assert (c.train.steps, c.optim.lr, c.model.init_from, c.aug.scale, c.ema.enabled) == \
        (2000, 0.2, None, (0.5, 1.0), True)
    assert c.seed == 1  # untouched file values stay


@pytest.mark.parametrize("text, message", [
    ("optim: {lrr: 0.1}", "optim.lrr: unknown key, did you mean optim.lr?"),
    ("optimm: {lr: 0.1}", "optimm: unknown key, did you mean optim?"),
    ("train: {steps: 1.5}", "train.steps: expected an integer, got 1.5"),
    ("optim: {lr: fast}", "optim.lr: expected a number, got 'fast'"),
    ("optim: {lr: .nan}", "optim.lr: expected a number, got nan"),
    ("optim: {lr: 'inf'}", "optim.lr: expected a number, got 'inf'"),
    ("optim: {lr: 1e-3x}", "optim.lr: expected a number, got '1e-3x'"),
    ("optim: {lr: true}", "optim.lr: expected a number, got True"),
    ("optim: {name: adam}", "optim.name: expected 'sgd' or 'adamw', got 'adam'"),
    ("optim: {name: adamw, nesterov: true}", "optim.nesterov: is SGD's; optim.name is adamw"),
    ("optim: {betas: [0.9, 1.0]}", "optim.betas: must both be in [0, 1), got [0.9, 1.0]"),
    ("optim: {head_lr_mult: 0}", "optim.head_lr_mult: must be > 0, got 0.0"),
    ("sched: {kind: cosine}", "sched.burn_in: darknet's burn-in belongs to sched.kind=poly; "
                              "with cosine set sched.burn_in=0"),
    ("sched: {warmup_steps: 100}", "sched.warmup_steps: conflicts with sched.burn_in=1000"),
    ("sched: {kind: step, burn_in: 0}", "sched.decay_steps: sched.kind=step needs decay_steps > 0"),
    ("sched: {decay_steps: 30}", "sched.decay_steps: is used by sched.kind=step only; with poly"),
    ("sched: {kind: step, burn_in: 0, decay_steps: 3, min_lr: 1e-5}", "sched.min_lr: the step "
                                                                        "schedule has no floor"),
    ("sched: {min_lr: 0.5}", "sched.min_lr: 0.5 is above optim.lr=0.1"),
    ("sched: {decay_rate: 0}", "sched.decay_rate: must be in (0, 1], got 0.0"),
    ("train: {freeze_backbone_steps: -1}", "train.freeze_backbone_steps: must be >= 0"),
    ("train: {precision: fp8}", "train.precision: expected 'fp32' or 'bf16' or 'fp16' or 'auto'"),
    ("optim: {lr: 0}", "optim.lr: must be > 0, got 0.0"),
    ("optim: {momentum: 1.0}", "optim.momentum: must be in [0, 1), got 1.0"),
    ("run: {stall_timeout: 0.5}", "run.stall_timeout: must be 0 (off) or >= 1 second, got 0.5"),
    ("run: {stall_timeout: -1}", "run.stall_timeout: must be 0 (off) or >= 1 second, got -1.0"),
    ("train: {on_nonfinite: ignore}", "train.on_nonfinite: expected 'stop' or 'skip'"),
    ("train: {max_skipped_steps: 0}", "train.max_skipped_steps: must be >= 1, got 0"),
    ("checkpoint: {max_failed_saves: 0}", "checkpoint.max_failed_saves: must be >= 1, got 0"),
    ("eval: {crop_pct: 1.5}", "eval.crop_pct: must be in (0, 1], got 1.5"),
    ("data: {val_split: 1}", "data.val_split: must be in (0, 1) or null, got 1"),
    ("train: {steps: 0}", "train.steps: must be > 0, got 0"),
    ("train: {batch_size: 128, accum_steps: 3}",
     "train.batch_size: 128 is not divisible by train.accum_steps=3"),
    ("aug: {scale: [0.5]}", "aug.scale: expected a list of 2 a number"),
    ("train: 5", "train: expected a mapping"),
    ("data: {root: /nonexistent/imagenet}",
     "data.root: folder '/nonexistent/imagenet' does not exist"),
])
def test_recipe_errors_name_file_and_key(tmp_path, text, message):
    data = tmp_path / "d"
    data.mkdir()
    base = {"run": {"dir": "r"}, "model": {"name": "cspresnext_tiny"}, "data": {"root": str(data)},
            "train": {"steps": 10, "batch_size": 8}, "optim": {"lr": 0.1}}
    parsed = yaml.safe_load(text)
    merged = configio.merge(base, parsed) if isinstance(parsed, dict) else text
    path = write(tmp_path, yaml.safe_dump(merged) if isinstance(merged, dict) else text)
    with pytest.raises(CspxError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: "), str(e.value)
    assert message in str(e.value)


FLOATS = ["1e-3", "5E-4", ".5", "1.0e+6", "1e3", "+2.5e-2", " 1e-3 ", "1_000.5", "'0.1'", "7"]


@pytest.mark.parametrize("text", FLOATS)
def test_float_literals_are_numbers_in_files_and_overrides(recipe, tmp_path, text):
    """Every literal Python's float() reads is a number for a float key: PyYAML (YAML 1.1)
    reads 1e-3 as a string, yet it is how learning rates are written."""
    value = float(yaml.safe_load(text))
    path = write(tmp_path, open(recipe).read().replace("optim: {lr: 0.1}",
                                                       f"optim: {{lr: {text}}}"), "f.yaml")
    assert load_config(path).optim.lr == value
    assert load_config(recipe, [f"optim.lr={text}"]).optim.lr == value
    # in lists and optional keys too
    c = load_config(recipe, [f"aug.scale=[{text}, {text}]" if value <= 1 else "aug.scale=[0.5, 1]",
                             f"train.clip_grad_norm={text}", "sched.warmup_lr=1e-9"])
    assert c.train.clip_grad_norm == value and c.sched.warmup_lr == 1e-9
    assert value > 1 or c.aug.scale == (value, value)


@pytest.mark.parametrize("text", ["nan", ".nan", "inf", "-inf", ".inf", "Infinity", "1e999",
                                  "abc", "0x1p-3", "1e-3x", "''", "yes"])
def test_non_numbers_nan_and_inf_stay_refused(recipe, tmp_path, text):
    with pytest.raises(CspxError, match=r"^command line: optim.lr: expected a number, got "):
        load_config(recipe, [f"optim.lr={text}"])
    path = write(tmp_path, open(recipe).read().replace("optim: {lr: 0.1}",
                                                       f"optim: {{lr: {text}}}"), "f.yaml")
    with pytest.raises(CspxError, match=rf"^{path}: optim.lr: expected a number, got "):
        load_config(path)


def test_override_errors_name_the_command_line(recipe):
    for ov, msg in [(["optim.lrr=1"],
                     "command line: optim.lrr: unknown key, did you mean optim.lr?"),
                    (["train.steps=abc"],
                     "command line: train.steps: expected an integer, got 'abc'"),
                    (["optim=1"], "command line: optim: is a section"),
                    (["nonsense"], "command line: 'nonsense': expected dotted.key=value")]:
        with pytest.raises(CspxError) as e:
            load_config(recipe, ov)
        assert str(e.value).startswith(msg), str(e.value)


def test_cli_bad_recipe_is_one_line_exit_2(tmp_path, recipe):
    r = run_py(["train.py", "--recipe", recipe, "optim.momentum=2"], timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: command line: optim.momentum: must be in [0, 1), got 2.0"
    assert "Traceback" not in r.stderr
    # the same entry point in this process (the one above is a process of its own)
    r = run_main(["train.py", "--recipe", str(tmp_path / "missing.yaml")])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.yaml" in r.stderr
    r = run_main(["train.py", "--recipe", recipe, "optim.momentum=2", "--verbose"])
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_resume_free_keys():
    from cspx.checkpoint import training_diff
    a = configio.to_dict(Config())
    b = configio.merge(a, {"run": {"dir": "x", "log_every_steps": 7}, "eval": {"every_steps": 5},
                           "checkpoint": {"every_steps": 3}, "data": {"workers": 1}})
    assert training_diff(a, b) == []
    c = configio.merge(a, {"train": {"steps": 5}, "optim": {"lr": 0.3},
                           "data": {"loader": "dali", "val_split": 0.1}})
    assert training_diff(a, c) == ["data.loader", "data.val_split", "optim.lr", "train.steps"]
