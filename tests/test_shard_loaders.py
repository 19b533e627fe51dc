"""Both loaders on sharded datasets, checked against the folder path on the same images: the same
decoded pixels and predictions, cspx's global per-epoch shuffle, every image counted once on any
number of ranks, undecodable samples and bad shards, and data.format."""
from __future__ import annotations

import csv
import io
import logging
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_main
from cspx.config import AugConfig, Config, DataConfig
from cspx.data import shard_format as sh
from cspx.data.build import build_splits, open_shards
from cspx.data.index import FolderSplit, build_index, read_classes_file
from cspx.data.loader import DataSplit, EpochBatchSampler
from cspx.data.shard_reader import ShardSplit
from cspx.data.torch_loader import TorchEvalLoader, TorchTrainLoader, TrainDataset
from cspx.distributed import DistEnv
from cspx.errors import CspxError

dali = pytest.importorskip("nvidia.dali", reason="DALI wheels exist for Linux x86_64/aarch64 only")
from cspx.data.dali_loader import DaliEvalLoader, DaliTrainLoader  # noqa: E402
from test_dali import GREY_LEVEL, collect  # noqa: E402  (the folder tests' bounds and helper)

CPU = torch.device("cpu")
AUG = AugConfig(img_size=32, randaugment_ops=2, hue=0.1, saturation=0.75, rotate=7.0)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Module-wide cache folder (module fixtures run before conftest's per-test CSPX_CACHE)."""
    base = tmp_path_factory.mktemp("shard-loaders")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CSPX_CACHE", str(base / "cache"))
        yield base


@pytest.fixture(scope="module")
def folder(env, sample_dir) -> FolderSplit:
    return build_index(os.path.join(sample_dir, "val"),
                       read_classes_file(os.path.join(sample_dir, "synsets.txt")))


@pytest.fixture(scope="module")
def split(sample_shards_root) -> ShardSplit:
    return ShardSplit(sample_shards_root, "val")


def copy_of(root, dst: Path) -> Path:
    shutil.copytree(root, dst)
    return dst


# ----- one interface, two formats -----------------------------------------------------------------
def test_shard_split_and_folder_index_are_the_same_split(folder, split):
    """The sample's val shards hold the folder's files in its order: sample i is file i."""
    assert isinstance(split, DataSplit) and isinstance(folder, DataSplit)
    assert (split.format, folder.format) == ("shards", "folder")
    assert len(split) == len(folder) == 105 and split.classes == folder.classes
    assert split.labels.tolist() == folder.labels.tolist()
    for i in range(0, 105, 13):
        assert split.name(i) == folder.name(i) == folder.files[i]
        assert split.read(i) == folder.read(i) == open(folder.path(i), "rb").read()
    where = split.location(3)
    assert where.startswith(f"{folder.files[3]} (sample 3 in ") and where.endswith(".tar)")


def test_torch_training_batches_equal_the_folder_batches(folder, split):
    """Same indices, same bytes, same per-sample seeds: the same augmented pixels, whether the
    DataLoader workers read files or preads from shards (each worker opening its own)."""
    ref = TorchTrainLoader(split=folder, aug=AUG, seed=0, micro_batch=8, rank=0, world=1, workers=0,
                           device=CPU, channels_last=False)
    got = TorchTrainLoader(split=split, aug=AUG, seed=0, micro_batch=8, rank=0, world=1, workers=2,
                           device=CPU, channels_last=False)
    for k in range(14):  # into the second epoch (13 batches each)
        (x, y), (a, b) = next(ref), next(got)
        assert torch.equal(x, a) and torch.equal(y, b), f"batch {k}"
    got.close()


# ----- order --------------------------------------------------------------------------------------
def test_both_loaders_follow_one_global_permutation_with_disjoint_ranks(env, split):
    """Two ranks of one run: per epoch each rank's micro-batches are its slices of one permutation
    of the whole split (cspx's EpochBatchSampler), the ranks' images are disjoint, the batches mix
    shards, and the DALI loader hands out exactly the torch loader's images. The sample has one
    image per class, so labels identify images."""
    # each shard holds the positions [first, first + samples); nothing is excluded here
    shard_of = np.searchsorted([s.first for s in split.shards], split.positions, side="right") - 1
    per_epoch = {}
    for rank in (0, 1):
        d = DaliTrainLoader(split=split, aug=AUG, seed=0, micro_batch=8, rank=rank, world=2,
                            workers=1, device=CPU, channels_last=False)
        t = TorchTrainLoader(split=split, aug=AUG, seed=0, micro_batch=8, rank=rank, world=2,
                             workers=0, device=CPU, channels_last=False)
        sampler = EpochBatchSampler(n=105, micro_batch=8, rank=rank, world=2, seed=0)
        assert d.batches_per_epoch == t.batches_per_epoch == 6  # 105 // 16
        for k in range(12):
            epoch, idx = sampler.batch(k)
            want = split.labels[idx].tolist()
            assert next(d)[1].tolist() == next(t)[1].tolist() == want, f"rank {rank} batch {k}"
            assert len(set(shard_of[idx].tolist())) > 1  # not one shard at a time
            per_epoch.setdefault((epoch, rank), []).extend(idx)
        d.close()
    for epoch in (0, 1):
        r0, r1 = per_epoch[(epoch, 0)], per_epoch[(epoch, 1)]
        assert len(set(r0)) == len(r0) == 48 and len(set(r1)) == 48 and not set(r0) & set(r1)
    assert per_epoch[(0, 0)] != per_epoch[(1, 0)]  # a new permutation each epoch


def test_dali_shard_loader_resumes_exactly_across_an_epoch_boundary(env, split):
    first = DaliTrainLoader(split=split, aug=AUG, seed=0, micro_batch=16, rank=0, world=1,
                            workers=2, device=CPU, channels_last=False)
    ref = [next(first) for _ in range(9)]  # 6 batches per epoch
    first.close()
    a = DaliTrainLoader(split=split, aug=AUG, seed=0, micro_batch=16, rank=0, world=1, workers=2,
                        device=CPU, channels_last=False)
    for _ in range(4):
        next(a)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    a.close()
    buf.seek(0)
    b = DaliTrainLoader(split=split, aug=AUG, seed=0, micro_batch=16, rank=0, world=1, workers=2,
                        device=CPU, channels_last=False)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for k in range(4, 9):
        x, y = next(b)
        assert torch.equal(x, ref[k][0]) and torch.equal(y, ref[k][1]), f"batch {k}"
    b.close()
    other = DaliTrainLoader(split=split, aug=AUG, seed=1, micro_batch=16, rank=0, world=1,
                            workers=2, device=CPU, channels_last=False)  # another seed
    with pytest.raises(CspxError, match="another dataset, batch size, seed"):
        other.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))


# ----- evaluation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_eval_counts_every_image_once_on_two_ranks(env, sample_shards_root, tmp_path, kind):
    """With a shard excluded and with --limit: the ranks' indices are disjoint, cover the split,
    and carry the split's labels."""
    root = copy_of(sample_shards_root, tmp_path / "copy")
    bad = sh.read_manifest(str(root)).splits["val"].shards[2]
    with open(root / "val" / f"{bad.name}.tar", "r+b") as f:
        f.truncate(bad.bytes - 1000)
    excluded = ShardSplit(str(root), "val", bad_shards="exclude")
    assert len(excluded) == 105 - bad.samples
    cls = {"torch": TorchEvalLoader, "dali": DaliEvalLoader}[kind]
    for part in (excluded, excluded.subset(37)):
        seen = []
        for rank in (0, 1):
            loader = cls(split=part, img_size=32, crop_pct=0.875, interpolation="bilinear",
                         batch_size=16, rank=rank, world=2, workers=1, device=CPU,
                         channels_last=False)
            got = [(i, y) for _, ys, idx in loader for i, y in zip(idx.tolist(), ys.tolist())]
            assert len(got) == loader.num_samples and len(loader) == -(-len(got) // 16)
            seen += got
            loader.close()
        assert sorted(i for i, _ in seen) == list(range(len(part)))
        assert all(y == part.labels[i] for i, y in seen)


def test_dali_eval_same_pixels_as_folder_and_pil_bounds(env, folder, split):
    """DALI decodes the same bytes with the same graph: bit-identical to the folder path, and so
    within tests/test_dali.py's bounds of PIL (mean |d| < 0.01 on average, < 0.02 per image,
    max |d| < 2.5 grey levels)."""
    ref, ref_labels = collect(TorchEvalLoader(split=folder, img_size=224, crop_pct=0.875,
                                              interpolation="bilinear", batch_size=35, rank=0,
                                              world=1, workers=0, device=CPU,
                                              channels_last=False), 105)
    runs = []
    for index in (folder, split):
        loader = DaliEvalLoader(split=index, img_size=224, crop_pct=0.875, interpolation="bilinear",
                                batch_size=16, rank=0, world=1, workers=2, device=CPU,
                                channels_last=False, file_list_dir=str(env / "lists"))
        runs.append(collect(loader, 105))
        loader.close()
    (dali_folder, _), (got, got_labels) = runs
    assert got_labels == ref_labels == dict(enumerate(folder.labels.tolist()))
    means = []
    for k in range(105):
        assert torch.equal(got[k], dali_folder[k]), folder.files[k]
        d = (got[k] - ref[k]).abs()
        means.append(float(d.mean()))
        assert float(d.max()) < 2.5 * GREY_LEVEL
    assert np.mean(means) < 0.01 and max(means) < 0.02


def predictions(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_validate_on_shards_gives_the_folder_predictions(
        env, folder, sample_dir, sample_shards_root, tiny_weights, tmp_path):
    """validate.py --data-dir takes the shard folder (the same class list given to both, which
    the shards' must equal). With the torch loader every image's top-5 and probabilities equal
    the folder's (bit-exact decoding). With DALI they equal the model's top-5 on the DALI folder
    path's images (bit-identical, see above), which differ from PIL's within test_dali's bounds."""
    path, model = tiny_weights
    out = {}
    for name, data, loader in (("folder", sample_dir, "torch"),
                               ("shards", sample_shards_root, "torch"),
                               ("dali", sample_shards_root, "dali")):
        pred = tmp_path / f"{name}.csv"
        r = run_main(["validate.py", "--checkpoint", path, "--model", "cspresnext_tiny",
                     "--data-dir", data, "--img-size", "64", "--batch-size", "21", "--workers",
                     "1", "--loader", loader, "--predictions", str(pred),
                     "--classes", os.path.join(sample_dir, "synsets.txt")])
        assert r.returncode == 0, r.stderr[-2000:]
        assert "images 105" in r.stdout
        out[name] = predictions(pred)
    assert out["shards"] == out["folder"]
    assert len({row["top5"] for row in out["folder"]}) > 10  # the model's predictions vary
    assert [(row["path"], row["label"]) for row in out["dali"]] == \
        [(f, str(y)) for f, y in zip(folder.files, folder.labels.tolist())]
    loader = DaliEvalLoader(split=folder, img_size=64, crop_pct=0.875, interpolation="bilinear",
                            batch_size=21, rank=0, world=1, workers=1, device=CPU,
                            channels_last=False, file_list_dir=str(env / "lists"))
    model.eval()
    with torch.no_grad():
        for x, _, idx in loader:
            probs = model(x).softmax(1)
            top = probs.topk(5)
            for i, t, p in zip(idx.tolist(), top.indices.tolist(), top.values.tolist()):
                row = out["dali"][i]
                assert row["top5"] == " ".join(map(str, t)), folder.files[i]
                assert [float(v) for v in row["top5_prob"].split()] == pytest.approx(p, abs=1e-5)
    loader.close()


# ----- bad samples and bad shards -----------------------------------------------------------------
@pytest.fixture
def damaged(sample_shards_root, tmp_path):
    """A copy whose sample in the middle of shard 2 is garbage of its own size: the start-up
    check (sizes, first and last 64 KiB) cannot see it, as bit rot."""
    root = copy_of(sample_shards_root, tmp_path / "damaged")
    s = ShardSplit(str(root), "val").shards[2]
    tar = root / "val" / f"{s.name}.tar"
    with tarfile.open(tar) as t:  # the images (KEY.jpg, KEY = position) placed by tarfile itself
        mid = [m for m in t.getmembers() if m.name.endswith(".jpg") and
               sh.QUICK_BYTES < m.offset_data < s.bytes - sh.QUICK_BYTES - m.size]
    i = int(mid[0].name[:-len(".jpg")])  # no shard is excluded: sample i is at position i
    with open(tar, "r+b") as f:
        f.seek(mid[0].offset_data)
        f.write(b"\xff\xd8" + bytes(mid[0].size - 2))
    return ShardSplit(str(root), "val"), i  # still passes the start-up check


def test_undecodable_sample_replaced_named_and_counted(damaged, caplog):
    split, i = damaged
    name = split.name(i)
    with caplog.at_level(logging.WARNING, logger="cspx"):
        loader = TorchTrainLoader(split=split.subset(i + 2), aug=AUG, seed=0, micro_batch=i + 2,
                                  rank=0, world=1, workers=0, device=CPU, channels_last=False)
        x, y = next(loader)  # one batch = one epoch of the subset, sample i among it
    # counted as fetched: this epoch's batch and the next one, already prefetched
    assert loader.bad_files == 2 and x.shape[0] == i + 2
    assert sorted(y.tolist()) == sorted(split.labels[[*range(i), i + 1, i + 1]].tolist())
    assert f"{name} (sample {i} in " in caplog.text and "replaced by the next file" in caplog.text
    sample = TrainDataset(split, AUG, 0)[(0, i)]
    assert sample[1:] == (int(split.labels[i + 1]), 1)  # the next sample's image, replaced once
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cspx"):
        labels = {k: v for _, ys, idx in TorchEvalLoader(split=split, img_size=32, crop_pct=0.875,
                                                         interpolation="bilinear", batch_size=50,
                                                         rank=0, world=1, workers=0, device=CPU,
                                                         channels_last=False)
                  for k, v in zip(idx.tolist(), ys.tolist())}
    assert [k for k, v in labels.items() if v == -1] == [i] and len(labels) == 105
    assert name in caplog.text and "skipped" in caplog.text
    ev = DaliEvalLoader(split=split, img_size=32, crop_pct=0.875, interpolation="bilinear",
                        batch_size=16, rank=0, world=1, workers=1, device=CPU, channels_last=False)
    with pytest.raises(CspxError, match=re.escape(name) + r".*make_shards.py --verify"):
        list(ev)
    ev.close()


def dry_run(data, *extra):
    return run_main(["train.py", "--recipe", "recipes/demo.yaml", f"data.root={data}",
                    "data.synthetic=false", "run.dir=unused", *extra, "--dry-run"])


def test_truncated_shard_refused_in_one_line_or_excluded_with_a_warning(demo_shards, tmp_path):
    root = copy_of(demo_shards, tmp_path / "copy")
    s = sh.read_manifest(str(root)).splits["train"].shards[3]
    tar = root / "train" / f"{s.name}.tar"
    with open(tar, "r+b") as f:
        f.truncate(s.bytes // 2)
    r = dry_run(root)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {tar}: {s.name}.tar is {s.bytes // 2} bytes, the manifest says {s.bytes} "
        f"(truncated or replaced); set data.bad_shards=exclude to train without it, or rerun "
        f"scripts/make_shards.py to rewrite it")
    r = dry_run(root, "data.bad_shards=exclude")
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(rf"excluding 1 train shard.*{s.samples} samples: train/{s.name}.tar "
                     rf"\({s.name}.tar is {s.bytes // 2} bytes", r.stderr), r.stderr[-3000:]
    assert f"data          {2000 - s.samples:,} train / 300 val images in 10 classes (1 " \
           f"excluded), shards, torch loader" in r.stdout
    resolved = r.stderr.split("resolved config:", 1)[1]
    assert "  format: shards\n" in resolved and "  bad_shards: exclude\n" in resolved


def cfg_for(root, **data) -> Config:
    return Config(data=DataConfig(root=str(root), **data))


def test_data_format_auto_explicit_and_refusals(demo_data, demo_shards, tmp_path):
    env = DistEnv()
    train, val = build_splits(cfg_for(demo_shards), env)  # auto
    assert (train.format, len(train), len(val)) == ("shards", 2000, 300)
    assert build_splits(cfg_for(demo_data), env)[0].format == "folder"
    assert build_splits(cfg_for(demo_shards, format="shards"), env)[1].format == "shards"
    synsets = os.path.join(demo_data, "synsets.txt")
    assert build_splits(cfg_for(demo_shards, classes=synsets), env)[0].classes == train.classes
    other = tmp_path / "other.txt"
    other.write_text("".join(f"{w}\n" for w in reversed(train.classes)))
    bad = tmp_path / "bad.txt"
    bad.write_text("x.JPEG\tunreadable\n")
    for data, kw, message in [
            (demo_shards, {"format": "folder"}, "no class folders found"),
            (demo_data, {"format": "shards"}, "no shards.json; not a complete sharded dataset"),
            (demo_shards, {"exclude": str(bad)}, "data.exclude: .* set data.exclude to null"),
            (demo_shards, {"classes": str(other)}, "data.classes: .* another order"),
            (demo_shards, {"synthetic": True}, "data.synthetic: true generates a folder")]:
        with pytest.raises(CspxError, match=message):
            build_splits(cfg_for(data, **kw), env)
    unfinished = copy_of(demo_shards, tmp_path / "unfinished")
    (unfinished / sh.MANIFEST).unlink()  # make_shards.py writes it last
    with pytest.raises(CspxError, match="no shards.json; not a complete sharded dataset"):
        build_splits(cfg_for(unfinished), env)


def test_ranks_check_their_own_copies_and_agree_or_all_stop(demo_shards, monkeypatch):
    """Every rank opens the shards it reads (a node-local copy on a cluster). Rank 0's view of a
    2-rank job, the other rank's outcome simulated: its failure, or other samples, stops both."""
    from cspx import distributed
    from cspx.data.build import open_shards_on_every_rank
    env = DistEnv(rank=0, world=2)
    mine = [s.fingerprint() for s in open_shards(demo_shards, ["train", "val"])]
    for other, message in [(("rank 1: /x/train/train-000003.tar is 5 bytes", None),
                            "^rank 1: /x/train/train-000003.tar is 5 bytes$"),
                           (("", [mine[0], "0" * 16]), "the ranks read different samples")]:
        monkeypatch.setattr(distributed, "all_gather_objects",
                            lambda obj, env, other=other: [obj, other])
        with pytest.raises(CspxError, match=message):
            open_shards_on_every_rank(demo_shards, ["train", "val"], "", "", "refuse", env)
    monkeypatch.setattr(distributed, "all_gather_objects", lambda obj, env: [obj, obj])
    got = open_shards_on_every_rank(demo_shards, ["train", "val"], "", "", "refuse", env)
    assert [s.fingerprint() for s in got] == mine
