"""validate.py on the real ImageNet sample: labels, metrics, outputs, timm's eval transform."""
from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from conftest import run_main, run_py


def synsets(sample_dir):
    return [ln.split()[0] for ln in open(os.path.join(sample_dir, "synsets.txt")) if ln.strip()]


def test_torch_eval_tensors_equal_timm_transform(sample_dir):
    """Our eval path (PIL resize + crop to uint8, normalized on the device) is bit-identical to
    timm.data.create_transform(224, crop_pct=0.875, interpolation='bilinear')."""
    import timm.data
    from PIL import Image

    from cspx.data.index import build_index
    from cspx.data.torch_loader import TorchEvalLoader
    ref_tf = timm.data.create_transform(224, crop_pct=0.875, interpolation="bilinear")
    index = build_index(os.path.join(sample_dir, "val"), synsets(sample_dir))
    loader = TorchEvalLoader(split=index, img_size=224, crop_pct=0.875, interpolation="bilinear",
                             batch_size=16, rank=0, world=1, workers=0, device=torch.device("cpu"),
                             channels_last=False)
    n = 0
    for x, _y, idx in loader:
        for xi, i in zip(x, idx.tolist()):
            ref = ref_tf(Image.open(index.path(i)).convert("RGB"))
            assert torch.equal(xi, ref), index.files[i]
            n += 1
    assert n == 105


def test_validate_with_classes_labels_json_and_csv(sample_dir, tiny_weights, tmp_path):
    path, model = tiny_weights
    js, pred = tmp_path / "r.json", tmp_path / "p.csv"
    r = run_main(["validate.py", "--checkpoint", path, "--model", "cspresnext_tiny",
                 "--data-dir", sample_dir, "--classes", f"{sample_dir}/synsets.txt",
                 "--img-size", "64", "--batch-size", "20", "--workers", "0", "--loader", "torch",
                 "--json", str(js), "--predictions", str(pred)])
    assert r.returncode == 0, r.stderr
    res = json.load(open(js))
    for key in ("top1", "top5", "loss", "count", "images_per_sec"):
        assert key in res
    assert res["count"] == 105 and res["settings"]["img_size"] == 64 and res["settings"]["classes"]
    assert res["settings"]["crop_pct"] == 0.875 and res["settings"]["interpolation"] == "bilinear"
    assert f"top-1 {res['top1']:.3f}%" in r.stdout and "images 105" in r.stdout
    std = {w: k for k, w in enumerate(synsets(sample_dir))}
    rows = list(csv.DictReader(open(pred)))
    assert [list(rows[0])] == [["path", "label", "top5", "top5_prob"]]
    assert len(rows) == 105
    # independent reference: the model applied to timm's eval transform of each image
    import timm.data
    from PIL import Image
    tf = timm.data.create_transform(64, crop_pct=0.875, interpolation="bilinear")
    model.eval()
    top1 = top5 = 0
    tops = set()
    for row in rows:
        wnid = row["path"].split("/")[0]
        assert int(row["label"]) == std[wnid]          # standard ImageNet index of the wnid
        with torch.no_grad():
            image = Image.open(os.path.join(sample_dir, "val", row["path"])).convert("RGB")
            logits = model(tf(image)[None])[0]
        probs = logits.softmax(0)
        ref_top = probs.topk(5).indices.tolist()
        assert [int(t) for t in row["top5"].split()] == ref_top
        p = [float(v) for v in row["top5_prob"].split()]
        # 6 printed decimals (5e-7) plus fp32 convolutions picking other kernels at batch 20 than
        # at batch 1 (relative 1e-6 on the logits): 1e-5 absolute
        assert p == sorted(p, reverse=True)
        assert p == pytest.approx(probs[ref_top].tolist(), abs=1e-5)
        top1 += ref_top[0] == std[wnid]
        top5 += std[wnid] in ref_top
        tops.add(ref_top[0])
    assert len(tops) > 10, "predictions should vary across images"
    assert res["top1"] == pytest.approx(100 * top1 / 105)
    assert res["top5"] == pytest.approx(100 * top5 / 105)


def test_validate_without_classes_uses_sorted_folders(sample_dir, tiny_weights, tmp_path):
    path, _ = tiny_weights
    pred = tmp_path / "p.csv"
    r = run_main(["validate.py", "--checkpoint", path, "--model", "cspresnext_tiny", "--data-dir",
                 f"{sample_dir}/val", "--img-size", "32", "--workers", "0", "--loader", "torch",
                 "--limit", "30", "--predictions", str(pred)])
    assert r.returncode == 0, r.stderr
    folders = sorted(os.listdir(f"{sample_dir}/val"))
    rows = list(csv.DictReader(open(pred)))
    assert len(rows) == 30 and "images 30" in r.stdout
    assert all(int(row["label"]) == folders.index(row["path"].split("/")[0]) for row in rows)


def test_validate_timm_cspresnext50_state_dict(sample_dir, tmp_path):
    """A timm-format cspresnext50 state_dict (as released) evaluates at the model-card defaults."""
    import timm
    torch.manual_seed(0)
    torch.save(timm.create_model("cspresnext50").state_dict(), tmp_path / "timm.pth")
    r = run_main(["validate.py", "--checkpoint", str(tmp_path / "timm.pth"),
                 "--data-dir", sample_dir, "--classes", f"{sample_dir}/synsets.txt",
                 "--limit", "24", "--batch-size", "12", "--workers", "0", "--loader", "torch",
                 "--json", str(tmp_path / "r.json")])
    assert r.returncode == 0, r.stderr
    res = json.load(open(tmp_path / "r.json"))
    assert res["count"] == 24 and res["settings"]["model"] == "cspresnext50"
    assert (res["settings"]["img_size"], res["settings"]["crop_pct"]) == (224, 0.875)


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "other_arch", "bad_data_dir"])
def test_validate_bad_input_one_line_exit_2(sample_dir, tiny_weights, tmp_path, case):
    path, model = tiny_weights
    ck, data = str(tmp_path / "x.pth"), sample_dir
    if case == "missing":
        expect = "x.pth"
    elif case == "text":
        open(ck, "w").write("not a checkpoint\n")
        expect = "x.pth"
    elif case == "truncated":
        blob = open(path, "rb").read()
        open(ck, "wb").write(blob[: len(blob) // 2])
        expect = "x.pth"
    elif case == "other_arch":
        ck, expect = path, "cspresnext50"          # tiny weights into the default cspresnext50
    else:
        ck, data, expect = path, str(tmp_path / "nowhere"), "nowhere"
    args = ["validate.py", "--checkpoint", ck, "--data-dir", data, "--workers", "0",
            "--loader", "torch"]
    if case != "other_arch":
        args += ["--model", "cspresnext_tiny"]
    # in this process, but one case as a process of its own: nothing else printed at start-up
    r = (run_py if case == "missing" else run_main)(args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr
