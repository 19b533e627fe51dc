"""scripts/prepare_imagenet.py on a miniature ILSVRC2012: 4 classes, 3 train + 2 val images each."""
from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from cspx.errors import run_cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import prepare_imagenet as prep  # noqa: E402

WNIDS = ["n01440764", "n01443537", "n02119789", "n02123045"]  # sorted: the label order
# ILSVRC class IDs are not in wnid order; the mini devkit keeps that property
ILSVRC_IDS = {"n02119789": 1, "n01440764": 2, "n02123045": 3, "n01443537": 4}
NAMES = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n02119789": "kit fox, Vulpes macrotis", "n02123045": "tabby, tabby cat"}
VAL_WNIDS = ["n02123045", "n01440764", "n02119789", "n01443537",
             "n01443537", "n02119789", "n01440764", "n02123045"]  # val image k+1 -> wnid
MINI = ["--expect-train", "12", "--expect-val", "8", "--expect-classes", "4",
        "--expect-val-per-class", "2"]


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 11 % 256, 90)).save(buf, "JPEG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def val_name(k: int) -> str:
    return f"ILSVRC2012_val_{k + 1:08d}.JPEG"


def class_tar(wnid: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for i in range(3):
            add(t, f"{wnid}_{i}.JPEG", jpeg(i + 3 * WNIDS.index(wnid)))
    return buf.getvalue()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """The downloads: train and val tars, a devkit, a synset map and Kaggle's CSV + mapping."""
    d = tmp_path / "src"
    (d / "devkit" / "ILSVRC2012_devkit_t12" / "data").mkdir(parents=True)
    (d / "kaggle").mkdir()
    with tarfile.open(d / "ILSVRC2012_img_train.tar", "w") as t:
        for w in WNIDS:
            add(t, f"{w}.tar", class_tar(w))
    with tarfile.open(d / "ILSVRC2012_img_val.tar", "w") as t:
        for k in range(len(VAL_WNIDS)):
            add(t, val_name(k), jpeg(100 + k))
    data = d / "devkit" / "ILSVRC2012_devkit_t12" / "data"
    (data / prep.GROUND_TRUTH).write_text("".join(f"{ILSVRC_IDS[w]}\n" for w in VAL_WNIDS))
    (d / "synset_map.txt").write_text(
        "".join(f"{i} {w} {NAMES[w]}\n" for w, i in sorted(ILSVRC_IDS.items(), key=lambda x: x[1])))
    (d / "kaggle" / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"{val_name(k)[:-5]},{w} 1 2 30 40 {w} 5 6 7 8\n" for k, w in enumerate(VAL_WNIDS)))
    (d / "kaggle" / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} {NAMES[w]}\n" for w in WNIDS))
    return d


def extracted(src: Path) -> Path:
    """The downloads already unpacked: train/<wnid>/*.JPEG and a flat val/ folder."""
    d = src / "extracted"
    for w in WNIDS:
        (d / "train" / w).mkdir(parents=True)
        for i in range(3):
            (d / "train" / w / f"{w}_{i}.JPEG").write_bytes(jpeg(i + 3 * WNIDS.index(w)))
    (d / "val").mkdir()
    for k in range(len(VAL_WNIDS)):
        (d / "val" / val_name(k)).write_bytes(jpeg(100 + k))
    return d


def devkit_args(src: Path, out: Path) -> list:
    return ["--train", str(src / "ILSVRC2012_img_train.tar"),
            "--val", str(src / "ILSVRC2012_img_val.tar"), "--devkit", str(src / "devkit"),
            "--synset-map", str(src / "synset_map.txt"), "--out", str(out), *MINI]


def check_layout(out: Path, names: bool = True) -> None:
    for w in WNIDS:
        assert sorted(p.name for p in (out / "train" / w).iterdir()) == \
            [f"{w}_{i}.JPEG" for i in range(3)]
    for k, w in enumerate(VAL_WNIDS):
        assert (out / "val" / w / val_name(k)).read_bytes() == jpeg(100 + k)
    assert sum(1 for _ in (out / "val").rglob("*.JPEG")) == len(VAL_WNIDS)
    lines = (out / "synsets.txt").read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == WNIDS
    if names:
        assert lines == [f"{w} {NAMES[w]}" for w in WNIDS]


def table(stdout: str) -> dict:
    """{split: (classes, images, added now)} from the summary the script prints."""
    rows = [ln.split() for ln in stdout.splitlines()]
    return {r[0]: tuple(map(int, r[1:])) for r in rows if len(r) == 4 and r[0] in ("train", "val")}


def error_line(stderr: str) -> str:
    """The one 'error: ...' line run_cli prints (tqdm bars may precede it on stderr)."""
    lines = [ln for ln in stderr.split("\n") if ln.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def run(argv, capsys=None):
    rc = run_cli(prep.main, [str(a) for a in argv])
    return (rc, capsys.readouterr()) if capsys else rc


def test_tars_with_devkit_and_synset_map_as_a_command(src, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_imagenet.py"),
                        *devkit_args(src, out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "counts verified" in r.stdout
    check_layout(out)


def test_kaggle_csv_labels_and_names(src, tmp_path, capsys):
    out = tmp_path / "out"
    rc, cap = run(["--train-tar", src / "ILSVRC2012_img_train.tar",
                   "--val-tar", src / "ILSVRC2012_img_val.tar",
                   "--val-csv", src / "kaggle" / "LOC_val_solution.csv", "--out", out, *MINI],
                  capsys)
    assert rc == 0, cap.err
    check_layout(out)


@pytest.mark.skipif(importlib.util.find_spec("scipy") is None,
                    reason="scipy is not installed, so no meta.mat can be written; the same labels "
                    "come through --synset-map in the other tests, and test_meta_mat_without_scipy "
                    "checks the error that asks for it")
def test_devkit_meta_mat(src, tmp_path, capsys):
    import numpy as np
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children"]
    rows = [(i, w, NAMES[w], "", 0) for w, i in sorted(ILSVRC_IDS.items(), key=lambda x: x[1])]
    rows.append((1001, "n00001740", "entity", "", 3))  # an inner node of the hierarchy: skipped
    synsets = np.array(rows, dtype=[(f, object) for f in fields])
    savemat(src / "devkit" / "ILSVRC2012_devkit_t12" / "data" / "meta.mat", {"synsets": synsets})
    argv = devkit_args(src, tmp_path / "out")
    i = argv.index("--synset-map")
    rc, cap = run(argv[:i] + argv[i + 2:], capsys)
    assert rc == 0, cap.err
    check_layout(tmp_path / "out")


def test_meta_mat_without_scipy(src, tmp_path, capsys, monkeypatch):
    (src / "devkit" / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").write_bytes(b"MATLAB 5.0")
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `import scipy.io` fail
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    argv = devkit_args(src, tmp_path / "out")
    i = argv.index("--synset-map")
    rc, cap = run(argv[:i] + argv[i + 2:], capsys)
    assert rc == 2
    assert "needs scipy" in cap.err and "--synset-map" in cap.err
    assert not (tmp_path / "out" / "train").exists()  # labels fail before anything is written


def test_synset_map_in_class_id_order(src, tmp_path, capsys):
    (src / "ids.txt").write_text("".join(
        f"{w}\n" for w, _ in sorted(ILSVRC_IDS.items(), key=lambda x: x[1])))
    argv = devkit_args(src, tmp_path / "out")
    argv[argv.index("--synset-map") + 1] = str(src / "ids.txt")
    rc, cap = run(argv, capsys)
    assert rc == 0, cap.err
    check_layout(tmp_path / "out", names=False)


@pytest.mark.parametrize("mode", ["copy", "move", "hardlink", "symlink"])
def test_modes_for_extracted_folders(src, tmp_path, capsys, mode):
    ex, out = extracted(src), tmp_path / "out"
    before = {p: p.stat().st_ino for p in ex.rglob("*.JPEG")}
    rc, cap = run(["--train", ex / "train", "--val", ex / "val", "--devkit", src / "devkit",
                   "--synset-map", src / "synset_map.txt", "--mode", mode, "--out", out, *MINI],
                  capsys)
    assert rc == 0, cap.err
    check_layout(out)
    k = 1
    pairs = [(ex / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG",
              out / "train" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG"),
             (ex / "val" / val_name(k), out / "val" / VAL_WNIDS[k] / val_name(k))]
    for s, d in pairs:
        assert os.path.islink(d) == (mode == "symlink")
        assert s.exists() == (mode != "move")
        if mode == "move":
            assert d.stat().st_ino == before[s]  # renamed, not copied
        elif mode == "hardlink":
            assert os.stat(d).st_ino == os.stat(s).st_ino and os.stat(s).st_nlink == 2
        elif mode == "symlink":
            assert os.readlink(d) == str(s.resolve())
        else:
            assert os.stat(d).st_ino != os.stat(s).st_ino and os.stat(s).st_nlink == 1
    assert not list(out.rglob("*.part"))


def test_train_folder_of_class_tars(src, tmp_path, capsys):
    d = tmp_path / "train_tars"
    d.mkdir()
    for w in WNIDS:
        (d / f"{w}.tar").write_bytes(class_tar(w))
    rc, cap = run(["--train", d, "--out", tmp_path / "out", "--expect-train", "12",
                   "--expect-classes", "4"], capsys)
    assert rc == 0, cap.err
    assert sum(1 for _ in (tmp_path / "out" / "train").rglob("*.JPEG")) == 12


def test_second_run_does_nothing(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(devkit_args(src, out)) == 0
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    rc, cap = run(devkit_args(src, out), capsys)
    assert rc == 0, cap.err
    assert table(cap.out) == {"train": (4, 12, 0), "val": (4, 8, 0)}
    changed = [p for p in out.rglob("*") if p.is_file() and p.name != "synsets.txt"
               and stamps.get(p) != p.stat().st_mtime_ns]
    assert changed == []
    check_layout(out)


def test_resume_after_interruption(src, tmp_path, capsys, monkeypatch):
    out, calls = tmp_path / "out", []
    real = prep.write_stream

    def dies_on_fifth(stream, dst):
        calls.append(dst)
        if len(calls) == 5:  # a half-written temp file, then the process is gone
            Path(prep.part_path(dst)).write_bytes(stream.read(10))
            raise KeyboardInterrupt
        real(stream, dst)

    monkeypatch.setattr(prep, "write_stream", dies_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        run(devkit_args(src, out))
    monkeypatch.setattr(prep, "write_stream", real)
    # the first class is complete and marked; the second is partial and not marked
    assert (out / prep.STATE / f"{WNIDS[0]}.done").read_text().strip() == "3"
    assert not (out / prep.STATE / f"{WNIDS[1]}.done").exists()
    assert len(list((out / "train" / WNIDS[1]).glob("*.JPEG"))) == 1
    assert run(devkit_args(src, out)) == 0
    check_layout(out)
    assert not list(out.rglob("*.part"))
    # a file lost after a class was marked done makes the class redo itself
    (out / "train" / WNIDS[2] / f"{WNIDS[2]}_1.JPEG").unlink()
    (out / "val" / VAL_WNIDS[3] / val_name(3)).unlink()
    rc, cap = run(devkit_args(src, out), capsys)
    assert rc == 0, cap.err
    assert table(cap.out) == {"train": (4, 12, 1), "val": (4, 8, 1)}
    check_layout(out)


def test_count_mismatch_is_an_error(src, tmp_path, capsys):
    argv = devkit_args(src, tmp_path / "out")
    rc, cap = run(argv[:argv.index("--expect-train")], capsys)  # the full ImageNet counts
    assert rc == 2
    assert "expected 1281167 images, found 12" in cap.err
    assert "expected 50000 images, found 8" in cap.err
    assert error_line(cap.err) == cap.err.split("\n")[-2]  # one line, the last
    rc, cap = run(argv + ["--expect-val-per-class", "3"], capsys)
    assert rc == 2
    assert "expected 3 images per class, found 2 in n01440764" in cap.err
    assert run(argv + ["--expect-val-per-class", "3", "--no-verify"]) == 0


def _unknown_wnid_csv(src):
    p = src / "kaggle" / "LOC_val_solution.csv"
    p.write_text(p.read_text().replace("n02123045", "n09999999"))
    return ["--val-csv", p]


@pytest.mark.parametrize("case,expect", [
    ("missing_tar", "does not exist"),
    ("val_tar_as_train", "expected one <wnid>.tar per class"),
    ("train_tar_as_val", "expected flat ILSVRC2012_val_*.JPEG"),
    ("short_ground_truth", "no label for val image ILSVRC2012_val_00000008.JPEG"),
    ("unknown_class_id", "class ID '7' is not in"),
    ("csv_unknown_wnid", "as n09999999, which is not a train class"),
    ("no_labels", "--val needs labels"),
])
def test_bad_input(src, tmp_path, capsys, case, expect):
    train, val = src / "ILSVRC2012_img_train.tar", src / "ILSVRC2012_img_val.tar"
    gt = src / "devkit" / "ILSVRC2012_devkit_t12" / "data" / prep.GROUND_TRUTH
    labels = ["--devkit", src / "devkit", "--synset-map", src / "synset_map.txt"]
    if case == "missing_tar":
        train = src / "nope.tar"
    elif case == "val_tar_as_train":
        train = val
    elif case == "train_tar_as_val":
        val = train
    elif case == "short_ground_truth":
        gt.write_text("".join(gt.read_text().splitlines(True)[:-1]))
    elif case == "unknown_class_id":
        gt.write_text(gt.read_text().replace("3\n", "7\n", 1))
    elif case == "csv_unknown_wnid":
        labels = _unknown_wnid_csv(src)
    elif case == "no_labels":
        labels = []
    rc, cap = run(["--train", train, "--val", val, *labels, "--out", tmp_path / "out", *MINI],
                  capsys)
    assert rc == 2
    assert expect in error_line(cap.err)


def test_sorted_list_is_not_taken_for_class_id_order(tmp_path):
    p = tmp_path / "LOC_synset_mapping.txt"
    p.write_text("".join(f"n{i:08d} name {i}\n" for i in range(1000)))
    with pytest.raises(prep.CspxError, match="sorted order"):
        prep.read_synset_map(str(p))


def test_standard_class_order_is_sorted_wnids(sample_dir, src, tmp_path):
    """synsets.txt is written in sorted order because that is the ILSVRC2012 class-index order:
    the sample's reference list (standard order, line k = class k) is sorted too."""
    reference = [ln.split()[0] for ln in open(os.path.join(sample_dir, "synsets.txt"))]
    assert len(reference) == 1000 and reference == sorted(reference)
    (tmp_path / "out" / "val" / WNIDS[2]).mkdir(parents=True)
    (tmp_path / "out" / "train" / WNIDS[0]).mkdir(parents=True)
    (tmp_path / "out" / "train" / WNIDS[1]).mkdir()
    prep.write_synsets(str(tmp_path / "out"), {})
    assert (tmp_path / "out" / "synsets.txt").read_text().split() == WNIDS[:3]
