"""data.val_split: the split held out of the training images, its invariances, its refusals, and
a run whose printed validate.py command reproduces its final evaluation."""
from __future__ import annotations

import json
import os
import shlex

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT
from cspx.data.holdout import held_out_count, holdout, min_class_size
from cspx.data.index import FolderSplit
from cspx.errors import CspxError


def index_of(per_class, root="/data/train", order=None):
    """An in-memory folder index: per_class = {wnid: image count}; files in `order` if given."""
    classes = sorted(per_class)
    files = [f"{w}/{w}_{i:04d}.JPEG" for w in classes for i in range(per_class[w])]
    if order is not None:
        files = [files[i] for i in order(len(files))]
    labels = np.array([classes.index(f.split("/")[0]) for f in files], dtype=np.int64)
    return FolderSplit(root, classes, files, labels)


def test_split_is_per_class_and_depends_only_on_names_and_seed():
    sizes = {"n01": 50, "n02": 7, "n03": 11, "n04": 3}
    train, val = holdout(index_of(sizes), 0.2, seed=3)
    held = set(val.files)
    assert held.isdisjoint(train.files) and len(held) + len(train) == sum(sizes.values())
    # round(0.2 n): 10, 1.4 -> 1, 2.2 -> 2, 0.6 -> 1
    for w, k in {"n01": 10, "n02": 1, "n03": 2, "n04": 1}.items():
        assert sum(f.startswith(w + "/") for f in held) == k
    assert held_out_count(5, 0.5) == 3        # halves round up
    # each side keeps the split's own order and labels
    assert train.files == sorted(train.files) and val.labels.tolist() == [
        train.classes.index(f.split("/")[0]) for f in val.files]
    # another listing order, another root, one class more: the same images held out
    rng = np.random.default_rng(0)
    shuffled = index_of({**sizes, "n00": 30}, root="/elsewhere", order=rng.permutation)
    again = holdout(shuffled, 0.2, seed=3)[1]
    assert {f for f in again.files if not f.startswith("n00/")} == held
    assert holdout(index_of(sizes), 0.2, seed=4)[1].files != val.files   # the seed draws it
    # the fingerprint of the training side changes with the split (the resume check sees it)
    assert train.fingerprint() != holdout(index_of(sizes), 0.2, seed=4)[0].fingerprint()


# hand-computed: 0.1 x 4 = 0.4 rounds to 0, 0.1 x 5 to 1; 0.9 x 5 = 4.5 rounds to 5 (none left to
# train on), 0.9 x 6 = 5.4 to 5
@pytest.mark.parametrize("fraction, need", [(0.1, 5), (0.2, 3), (0.5, 2), (0.9, 6)])
def test_too_small_class_is_one_line(fraction, need):
    """round(f n) must be at least 1 and at most n - 1; the message names the class and the
    smallest class size that works."""
    assert min_class_size(fraction) == need
    ok = index_of({"n01": 40, "n02": need})
    holdout(ok, fraction, 0)
    with pytest.raises(CspxError) as e:
        holdout(index_of({"n01": 40, "n02": need - 1}), fraction, 0)
    msg = str(e.value)
    assert msg.startswith("data.val_split: class 'n02' has ") and "\n" not in msg
    assert f"needs at least {need} images" in msg and "/data/train" in msg


def test_a_folder_and_its_shards_hold_out_the_same_images(demo_data, demo_shards):
    from cspx.data.build import held_out_shards
    from cspx.data.index import build_index
    from cspx.data.shard_reader import ShardSplit
    folder = holdout(build_index(os.path.join(demo_data, "train")), 0.1, 7)[1]
    shards = ShardSplit(demo_shards, "train")
    with pytest.raises(CspxError, match=r"^--val-split: .* has a val split of its own"):
        held_out_shards(shards, 0.1, 7, "--val-split")
    shard_val = holdout(shards, 0.1, 7)[1]
    assert len(folder) == 200 and sorted(shard_val.paths()) == folder.files
    again = ShardSplit(demo_shards, "train")
    assert shard_val.fingerprint() != shards.fingerprint() == again.fingerprint()


def _train(argv, capsys):
    from cspx.cli.train import main
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    return err


def test_val_split_run_and_its_validate_command_agree(demo_data, tmp_path, capsys):
    """A run on data without val/ holds 5% of each class out, records the split, and the
    validate.py command it prints evaluates exactly that split: same top-1, top-5 and count.
    By default validate.py finds the split in the checkpoint. A val/ folder is refused."""
    from cspx.cli.validate import main as validate
    data = tmp_path / "own"
    data.mkdir()
    os.symlink(os.path.join(demo_data, "train"), data / "train")    # 10 classes x 200, no val/
    run = tmp_path / "run"
    base = ["--recipe", os.path.join(ROOT, "recipes/demo.yaml"), f"data.root={data}",
            "data.synthetic=false", "aug.img_size=32", "eval.img_size=32", "train.batch_size=16",
            "sched.burn_in=2", "data.workers=0", "train.steps=2", "eval.every_steps=0",
            "run.tensorboard=false", "ema.enabled=false", "seed=5"]
    err = _train(base + [f"run.dir={run}", "data.val_split=0.05"], capsys)
    ev = [json.loads(x) for x in open(run / "metrics.jsonl") if '"eval"' in x][-1]
    assert ev["count"] == 100
    assert yaml.safe_load(open(run / "config.yaml"))["data"]["val_split"] == 0.05
    ck = torch.load(run / "checkpoints/last.pt", weights_only=True)
    held = ck["val_split"]
    assert (held["fraction"], held["seed"], held["images"]) == (0.05, 5, 100)
    line = err.split("evaluate the result with:")[1].strip().splitlines()[0]
    argv = shlex.split(line)
    assert argv[1] == "validate.py" and argv[-4:] == ["--val-split", "0.05", "--seed", "5"]
    expect = f"top-1 {ev['top1']:.3f}%  top-5 {ev['top5']:.3f}%  loss"
    for args in (argv[2:], ["--checkpoint", str(run / "checkpoints/last.pt"), "--data-dir",
                            str(data), "--img-size", "32", "--workers", "0", "--device", "cpu"]):
        assert validate(args) == 0
        out = capsys.readouterr()
        assert expect in out.out and "images 100 " in out.out, (out.out, ev)
    assert "held out for validation by the checkpoint's run" in out.err
    # a dataset with its own val/ and data.val_split: one line, exit 2, nothing trained
    from cspx.cli.train import main
    code = main(base + [f"run.dir={tmp_path / 'r2'}", f"data.root={demo_data}",
                        "data.val_split=0.1"])
    msg = capsys.readouterr().err.strip().splitlines()[-1]      # after the provenance header
    assert code == 2 and msg.startswith("error: data.val_split: ") and "has a val/ folder" in msg
    assert not (tmp_path / "r2").exists()
