"""predict.py on the real ImageNet sample: the same top-5 as validate.py, every kind of PATH,
unreadable files, flip TTA, class names, and the output file rules. In-process (main())."""
from __future__ import annotations

import csv
import json
import os
import platform
import shutil

import pytest
import torch

from cspx.cli.predict import main as predict

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cspx",
                       "data", "imagenet_classes.txt")


def timm_info(name):
    import timm.data
    return os.path.join(os.path.dirname(timm.data.__file__), "_info", name)


def lemmas():
    """{wnid: WordNet lemmas} from timm's own file: the reference for the shipped names."""
    with open(timm_info("imagenet_synset_to_lemma.txt"), encoding="utf-8") as f:
        return dict(ln.rstrip("\n").split("\t", 1) for ln in f)


def one_image(sample_dir):
    folder = os.path.join(sample_dir, "val", "n01440764")
    return os.path.join(folder, sorted(os.listdir(folder))[0])


def synsets(sample_dir):
    return [ln.split()[0] for ln in open(os.path.join(sample_dir, "synsets.txt")) if ln.strip()]


def rows_of(path):
    return list(csv.DictReader(open(path, newline="")))


def run(capsys, *argv):
    """predict.py's main in this process: (exit status, stdout, stderr)."""
    code = predict(["--workers", "0", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def timm_reference(model, files, flip=False, size=64):
    """Softmax of `model` on timm's eval transform of each file (`size` px, crop 0.875,
    bilinear): the independent reference; with flip, the mean with the mirrored image's."""
    import timm.data
    from PIL import Image
    tf = timm.data.create_transform(size, crop_pct=0.875, interpolation="bilinear")
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        p = model.eval()(x).softmax(1)
        if flip:
            p = (p + model(x.flip(3)).softmax(1)) / 2
    return p


def test_shipped_imagenet_names_are_timms_in_ilsvrc_order(sample_dir):
    lines = [ln.rstrip("\n").split("\t") for ln in open(SHIPPED, encoding="utf-8")]
    wnids = [w for w, _ in lines]
    assert wnids == synsets(sample_dir)                        # ILSVRC2012 class-index order
    assert wnids == [ln.strip() for ln in open(timm_info("imagenet_synsets.txt"))]
    names = lemmas()
    assert all(name == names[w] for w, name in lines) and len(lines) == 1000


def test_predictions_equal_validate_top5(sample_dir, tiny_weights, tmp_path, capsys):
    """A timm-format 1000-class state_dict: predict.py's top-5 and probabilities on the 105 real
    images are validate.py's, named by the ImageNet names shipped with cspx."""
    from cspx.cli.validate import main as validate
    path, model = tiny_weights
    common = ["--checkpoint", path, "--model", "cspresnext_tiny", "--batch-size", "20",
              "--img-size", "32", "--loader", "torch", "--workers", "0"]
    assert validate(common + ["--data-dir", sample_dir, "--classes", f"{sample_dir}/synsets.txt",
                              "--predictions", str(tmp_path / "v.csv")]) == 0
    capsys.readouterr()
    code, out, err = run(capsys, *common[:-2], f"{sample_dir}/val", "--out", tmp_path / "p.csv")
    assert code == 0 and out == "" and "105 images classified, 0 failed" in err, err
    index = {w: k for k, w in enumerate(synsets(sample_dir))}
    names = lemmas()
    ref = {r["path"]: r for r in rows_of(tmp_path / "v.csv")}
    rows = rows_of(tmp_path / "p.csv")
    assert list(rows[0]) == ["path", "error"] + [f"{c}_{j}" for c in ("class", "name", "prob")
                                                 for j in range(1, 6)]
    assert len(rows) == len(ref) == 105
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)     # the folder's order
    for row in rows:
        rel = os.path.relpath(row["path"], f"{sample_dir}/val")
        top = [row[f"class_{j}"] for j in range(1, 6)]
        assert [index[w] for w in top] == [int(t) for t in ref[rel]["top5"].split()], rel
        assert [row[f"name_{j}"] for j in range(1, 6)] == [names[w] for w in top]
        p = [float(row[f"prob_{j}"]) for j in range(1, 6)]
        assert p == pytest.approx([float(v) for v in ref[rel]["top5_prob"].split()], abs=2e-6)
        assert row["error"] == ""
    assert len({r["class_1"] for r in rows}) > 10, "predictions should vary across images"


def test_every_path_kind_and_unreadable_files(sample_dir, sample_shards_root, tiny_weights,
                                              tmp_path, capsys):
    """A file, a folder (recursive), a list file, a sharded dataset and one of its splits, in one
    run: rows in argument order, each image's prediction the same whichever way it came, and
    unreadable files as rows with their reason, exit 1."""
    path, model = tiny_weights
    val = os.path.join(sample_dir, "val")
    imgs = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(val) for f in fs)
    photos = tmp_path / "photos"
    (photos / "deep" / "er").mkdir(parents=True)
    (photos / ".hidden").mkdir()
    shutil.copy(imgs[0], photos / "a.JPEG")
    shutil.copy(imgs[1], photos / "deep" / "er" / "b.jpeg")
    shutil.copy(imgs[2], photos / ".hidden" / "c.jpg")        # hidden: skipped
    (photos / "notes.txt").write_text("not searched: not an image name")
    (photos / "empty.jpg").write_bytes(b"")
    good = open(imgs[3], "rb").read()
    (photos / "truncated.jpg").write_bytes(good[: len(good) // 2])
    # passes the quick scan (JPEG markers at both ends) but does not decode
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(3000) + b"\xff\xd9")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "some.txt").write_text(f"# a comment\n\n../photos/a.JPEG\n{imgs[4]}\nmissing.jpg\n")
    args = [imgs[5], photos, lists / "some.txt", sample_shards_root, "--checkpoint", path,
            "--model", "cspresnext_tiny", "--batch-size", "16", "--topk", "3", "--img-size", "32",
            "--out", tmp_path / "p.csv"]
    code, _, err = run(capsys, *args)
    assert code == 1, err
    assert "109 images classified, 4 failed" in err   # 1 + 2 + 1 (a.JPEG once) + 105
    rows = rows_of(tmp_path / "p.csv")
    names = [r["path"] for r in rows]
    shard_paths = [os.path.join(sample_shards_root, "val", os.path.relpath(f, val)) for f in imgs]
    assert names == ([imgs[5]] + [str(photos / n) for n in ("a.JPEG", "corrupt.jpg")]
                     + [str(photos / "deep/er/b.jpeg")]
                     + [str(photos / n) for n in ("empty.jpg", "truncated.jpg")]
                     + [imgs[4], str(lists / "missing.jpg")] + shard_paths)
    errors = {os.path.basename(r["path"]): r["error"] for r in rows if r["error"]}
    assert errors.keys() == {"corrupt.jpg", "empty.jpg", "truncated.jpg", "missing.jpg"}
    assert errors["empty.jpg"] == "empty file"
    assert errors["truncated.jpg"].startswith("truncated JPEG")
    assert errors["corrupt.jpg"].startswith("decode failed")
    assert "No such file" in errors["missing.jpg"]
    for r in rows:
        assert (r["class_1"] == "") == bool(r["error"])
    # every image's top-3 is the model's on timm's eval transform of its file
    source = {imgs[5]: imgs[5], str(photos / "a.JPEG"): imgs[0],
              str(photos / "deep/er/b.jpeg"): imgs[1], imgs[4]: imgs[4],
              **dict(zip(shard_paths, imgs))}
    files = sorted(set(source.values()))
    probs = dict(zip(files, timm_reference(model, files, size=32)))
    wnids = synsets(sample_dir)
    for r in rows:
        if not r["error"]:
            top = probs[source[r["path"]]].topk(3).indices.tolist()
            assert [r[f"class_{j}"] for j in (1, 2, 3)] == [wnids[i] for i in top], r["path"]


def test_a_shard_split_folder_is_that_split(sample_shards_root):
    """ROOT/val of a sharded dataset names the same samples, as ROOT does (its only split)."""
    from cspx.data.inputs import collect
    (whole,) = collect([sample_shards_root])
    (split,) = collect([os.path.join(sample_shards_root, "val")])
    assert len(whole.split) == len(split.split) == 105 and split.split.split == "val"
    assert [whole.path(i) for i in range(105)] == [split.path(i) for i in range(105)]
    assert whole.path(0) == os.path.join(sample_shards_root, "val", split.split.name(0))


def test_ranks_share_images_as_the_evaluation_loaders_do(sample_dir):
    """Under torchrun, rank r classifies exactly the images the evaluation loader of rank r
    yields over the same split (the one rule, loader.contiguous_share), and the ranks' shares
    together are every image once: 7 images on 3 ranks (2, 2, 3), so an uneven split shows."""
    from cspx.data.build import build_eval_loader
    from cspx.data.inputs import collect, rank_share
    from cspx.distributed import DistEnv
    val = os.path.join(sample_dir, "val")
    imgs = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(val) for f in fs)[::15]
    (src,) = collect(imgs)
    assert len(src.split) == 7
    rows = []
    for rank in range(3):
        mine = rank_share(src, rank, 3)
        loader = build_eval_loader(kind="torch", split=src.split, img_size=16, crop_pct=0.875,
                                   interpolation="bilinear", batch_size=2,
                                   env=DistEnv(rank=rank, world=3), workers=0,
                                   channels_last=False)
        evaluated = [i for _, _, idx in loader for i in idx.tolist()]
        loader.close()
        assert [mine.path(j) for j in range(len(mine.split))] == [imgs[i] for i in evaluated]
        assert mine.split.files == [src.split.files[i] for i in evaluated]
        rows += mine.rows.tolist()
    assert rows == list(range(7))


def test_dali_skips_what_it_cannot_decode(sample_dir, tiny_weights, tmp_path, capsys):
    """DALI stops at an image it cannot decode: predict.py finds it with PIL, gives it an error
    row and goes on with DALI; the other images are classified (on DALI's pixels, which differ
    from PIL's by about 0.003 per pixel: the torch loader's top-1 is among DALI's top-5)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        pytest.skip("DALI wheels exist for Linux x86_64/aarch64 only")
    path, _ = tiny_weights
    val = os.path.join(sample_dir, "val")
    imgs = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(val) for f in fs)[20:25]
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, f in enumerate(imgs):
        shutil.copy(f, folder / f"{i}.jpg")
    # passes the quick scan (JPEG markers at both ends), then stops DALI's decoder
    (folder / "2b.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(3000) + b"\xff\xd9")
    base = ["--checkpoint", path, "--model", "cspresnext_tiny", folder, "--batch-size", "2"]
    code, _, err = run(capsys, *base, "--loader", "dali", "--out", tmp_path / "dali.csv")
    assert code == 1 and "DALI cannot skip an image; skipping 1 file" in err, err
    assert run(capsys, *base, "--loader", "torch", "--out", tmp_path / "torch.csv")[0] == 1
    dali, torch_rows = rows_of(tmp_path / "dali.csv"), rows_of(tmp_path / "torch.csv")
    assert [r["path"] for r in dali] == [r["path"] for r in torch_rows]
    assert [bool(r["error"]) for r in dali] == [False, False, False, True, False, False]
    for d, t in zip(dali, torch_rows):
        if not d["error"]:
            assert t["class_1"] in [d[f"class_{j}"] for j in range(1, 6)], d["path"]


def test_flip_tta_is_the_mean_of_both_softmaxes(sample_dir, tiny_weights, tmp_path, capsys):
    path, model = tiny_weights
    listed = tmp_path / "l.txt"
    val = os.path.join(sample_dir, "val")
    imgs = sorted(os.path.join(dp, f) for dp, _, fs in os.walk(val) for f in fs)[:12]
    listed.write_text("\n".join(imgs))
    base = ["--checkpoint", path, "--model", "cspresnext_tiny", "--topk", "4", "--img-size", "32",
            listed]
    for tta in ("flip", "none"):
        code, out, _ = run(capsys, *base, "--tta", tta, "--out", tmp_path / f"{tta}.json")
        assert code == 0
    flip = json.load(open(tmp_path / "flip.json"))["predictions"]
    plain = json.load(open(tmp_path / "none.json"))["predictions"]
    ref = timm_reference(model, imgs, flip=True, size=32)
    wnids = synsets(sample_dir)
    for rec, p in zip(flip, ref):
        top = p.topk(4)
        assert [rec[f"class_{j}"] for j in range(1, 5)] == [wnids[i] for i in top.indices.tolist()]
        probs = [rec[f"prob_{j}"] for j in range(1, 5)]
        assert probs == pytest.approx(top.values.tolist(), abs=1e-6)
    assert any(a["prob_1"] != b["prob_1"] for a, b in zip(flip, plain))   # the flip mattered


def test_class_names_of_a_cspx_checkpoint_and_overrides(tmp_path, sample_dir, capsys):
    """A cspx checkpoint names its outputs by its class list (ImageNet wnids by their lemmas,
    other folder names by themselves); --classes overrides it and must match the outputs; a
    plain state_dict with other than 1000 outputs is named by index."""
    from cspx.models import create_model
    torch.manual_seed(0)
    m = create_model("cspresnext_tiny", num_classes=3)
    classes = ["n01440764", "roses", "n04399382"]
    torch.save({"format": "cspx-checkpoint", "format_version": 1, "model": m.state_dict(),
                "ema": None, "model_name": "cspresnext_tiny", "classes": classes},
               tmp_path / "c.pt")
    torch.save(m.state_dict(), tmp_path / "plain.pth")
    img = one_image(sample_dir)
    code, out, _ = run(capsys, "--checkpoint", tmp_path / "c.pt", img, "--topk", "3")
    row = next(csv.DictReader(out.splitlines()))
    names = {"n01440764": "tench, Tinca tinca", "roses": "roses", "n04399382": "teddy, teddy bear"}
    assert code == 0 and sorted(row[f"class_{j}"] for j in (1, 2, 3)) == sorted(classes)
    assert all(row[f"name_{j}"] == names[row[f"class_{j}"]] for j in (1, 2, 3))
    (tmp_path / "mine.txt").write_text("a0 first class\nb1\nn04399382\n")
    code, out, _ = run(capsys, "--checkpoint", tmp_path / "c.pt", img, "--topk", "3",
                       "--classes", tmp_path / "mine.txt")
    row = next(csv.DictReader(out.splitlines()))
    mine = {"a0": "first class", "b1": "b1", "n04399382": "teddy, teddy bear"}
    assert code == 0 and all(row[f"name_{j}"] == mine[row[f"class_{j}"]] for j in (1, 2, 3))
    code, out, err = run(capsys, "--checkpoint", tmp_path / "plain.pth", "--model",
                         "cspresnext_tiny", img, "--topk", "3")
    row = next(csv.DictReader(out.splitlines()))
    assert code == 0 and {row[f"class_{j}"] for j in (1, 2, 3)} == {"0", "1", "2"}
    assert "classes are output indices" in err
    code, _, err = run(capsys, "--checkpoint", tmp_path / "c.pt", img,
                       "--classes", f"{sample_dir}/synsets.txt")
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: --classes: {sample_dir}/synsets.txt lists 1000 classes, the model has 3 outputs")


def test_out_replaces_only_its_own_files_and_bad_arguments(tiny_weights, sample_dir, tmp_path,
                                                           capsys):
    path, _ = tiny_weights
    base = ["--checkpoint", path, "--model", "cspresnext_tiny", one_image(sample_dir)]
    user = tmp_path / "mine.csv"
    user.write_text("path,label\nx.jpg,3\n")
    code, _, err = run(capsys, *base, "--out", user)
    assert code == 2 and user.read_text() == "path,label\nx.jpg,3\n"
    assert err.strip().splitlines()[-1].startswith(
        f"error: --out: {user} already exists and was not written")
    for name in ("p.csv", "p.json"):
        for _ in range(2):          # the second run replaces the first's file
            assert run(capsys, *base, "--out", tmp_path / name)[0] == 0
    # JSON: the CSV's fields per image, with its format tag, settings and counts
    doc = json.load(open(tmp_path / "p.json"))
    (row,) = rows_of(tmp_path / "p.csv")
    assert (doc["format"], doc["images"], doc["failed"], doc["settings"]["img_size"]) == (
        "cspx-predictions", 1, 0, 64)
    (rec,) = doc["predictions"]
    assert list(rec) == list(row) and rec["error"] is None and row["error"] == ""
    assert all(rec[c] == row[c] for c in row if c.startswith(("path", "class", "name")))
    assert all(f"{rec[c]:.6g}" == row[c] for c in row if c.startswith("prob"))
    assert run(capsys, *base, "--out", user, "--force")[0] == 0
    assert user.read_text().startswith("path,error,")
    for bad, msg in [(["--out", tmp_path / "p.txt"], "--out: "),
                     (["--topk", "0"], "--topk: must be > 0"),
                     ([str(tmp_path / "nowhere")], "nowhere: no such file or folder"),
                     ([str(tmp_path / "lists")], "no image files in it")]:
        (tmp_path / "lists").mkdir(exist_ok=True)
        code, _, err = run(capsys, *base, *bad)
        lines = err.strip().splitlines()
        assert code == 2 and lines[-1].startswith("error: ") and msg in lines[-1], (bad, err)
        assert "Traceback" not in err
