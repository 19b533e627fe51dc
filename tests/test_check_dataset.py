"""scripts/check_dataset.py on a small dataset seeded with every kind of problem it reports."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cspx.data import scan
from cspx.data.index import build_index
from cspx.errors import run_cli

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import check_dataset as chk  # noqa: E402

A, B, C = "n01440764", "n01443537", "n02119789"


def jpeg_bytes(size=(64, 48), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 40).convert(mode).save(buf, "JPEG")
    return buf.getvalue()


# relative path in train/ -> (category, a phrase of the detail)
TRAIN_PROBLEMS = {
    f"{A}/empty.JPEG": ("bad", "empty file"),
    f"{A}/truncated.JPEG": ("bad", "truncated JPEG"),
    f"{B}/random.JPEG": ("bad", "not an image"),
    # intact start and end markers, so only a full decode finds these two
    f"{B}/garbage_body.JPEG": ("bad", "decode failed"),
    f"{B}/corrupt_tables.JPEG": ("bad", "decode failed"),
    f"{B}/cmyk.JPEG": ("cmyk", "CMYK JPEG"),
    f"{C}/png.JPEG": ("misnamed", "PNG data in a .JPEG file"),
    f"{C}/tiny.JPEG": ("tiny", "10x20 px"),
}


def write_problems(train: Path) -> None:
    good = jpeg_bytes()
    (train / A / "empty.JPEG").write_bytes(b"")
    (train / A / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (train / B / "random.JPEG").write_bytes(bytes((i * 97 + 13) % 256 for i in range(600)))
    (train / B / "garbage_body.JPEG").write_bytes(
        b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9")
    (train / B / "corrupt_tables.JPEG").write_bytes(good[:20] + bytes(100) + good[120:])
    (train / B / "cmyk.JPEG").write_bytes(jpeg_bytes(mode="CMYK"))
    Image.effect_noise((40, 40), 40).convert("RGB").save(train / C / "png.JPEG", "PNG")
    (train / C / "tiny.JPEG").write_bytes(jpeg_bytes(size=(10, 20)))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """root/train: 3 classes with 2 good images each plus the problems; root/val: clean; one empty
    class folder in train."""
    root = tmp_path / "imagenet"
    good = jpeg_bytes()
    for split, classes in (("train", (A, B, C)), ("val", (A, B, C))):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                (root / split / c / f"{split}_{i}.JPEG").write_bytes(good)
    (root / "train" / "n09999999").mkdir()  # no images: reported
    (root / "train" / A / "notes.txt").write_text("not an image; the loaders never list it")
    write_problems(root / "train")
    return root


def run(argv, capsys):
    rc = run_cli(chk.main, [str(a) for a in argv])
    return rc, capsys.readouterr()


def summary(stdout: str) -> dict:
    """{split: {column: value}} from the table printed last."""
    lines = stdout.strip().split("\n")
    i = max(k for k, ln in enumerate(lines) if ln.startswith("split "))
    head = lines[i].split()
    return {r.split()[0]: dict(zip(head[1:], r.split()[1:])) for r in lines[i + 1:]}


def test_command_reports_each_category(dataset, tmp_path):
    ex, js = tmp_path / "exclude.txt", tmp_path / "report.json"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "check_dataset.py"), str(dataset),
                        "--workers", "2", "--write-exclude", str(ex), "--json", str(js)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr  # bad files found
    report = json.loads(js.read_text())
    train = report["splits"]["train"]
    for rel, (cat, phrase) in TRAIN_PROBLEMS.items():
        assert phrase in train[cat][rel], (rel, cat, train[cat])
        for other in set(chk.CATEGORIES) - {cat}:
            assert rel not in train[other], (rel, other)
    assert {k: len(train[k]) for k in chk.CATEGORIES} == \
        {"bad": 5, "cmyk": 1, "misnamed": 1, "tiny": 1}
    assert train["empty_classes"] == ["n09999999"]
    assert train["classes"] == 4 and train["images"] == 6 + len(TRAIN_PROBLEMS)
    assert train["class_counts"] == {A: 4, B: 6, C: 4, "n09999999": 0}
    assert train["per_class"] == {"min": 0, "median": 4, "max": 6}
    assert train["modes"] == {"CMYK": 1, "RGB": 8}  # of the decodable images
    val = report["splits"]["val"]
    assert all(not val[k] for k in chk.CATEGORIES) and val["images"] == 6
    assert report["excluded"] == 5
    # the exclusion list: the bad files only, relative to the split folder
    assert scan.read_exclude_file(str(ex)) == {rel: r for rel, r in train["bad"].items()}
    assert set(train["bad"]) == {rel for rel, (cat, _) in TRAIN_PROBLEMS.items() if cat == "bad"}
    assert ex.read_text().startswith("# ")
    table = summary(r.stdout)
    assert table["train"] == {"classes": "4", "images": "14", "min/median/max": "0/4/6",
                              "empty": "1", "bad": "5", "cmyk": "1", "misnamed": "1", "tiny": "1"}
    assert table["val"]["bad"] == "0" and table["val"]["images"] == "6"


def test_exclusion_list_is_what_the_index_reads(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CSPX_CACHE", str(tmp_path / "cache"))
    ex = tmp_path / "exclude.txt"
    rc, _ = run([dataset, "--workers", "1", "--write-exclude", ex, "--exclude-tiny"], capsys)
    assert rc == 1
    exclude = scan.read_exclude_file(str(ex))
    assert exclude[f"{C}/tiny.JPEG"].startswith("tiny image")
    assert f"{B}/cmyk.JPEG" not in exclude and f"{C}/png.JPEG" not in exclude
    index = build_index(str(dataset / "train"), exclude=exclude, workers=1, warn=False)
    assert not set(exclude) & set(index.files)
    assert f"{B}/cmyk.JPEG" in index.files and f"{C}/png.JPEG" in index.files
    assert len(index) == 6 + 2  # good images plus the CMYK and the misnamed PNG


def test_clean_dataset_exits_0(dataset, tmp_path, capsys):
    ex = tmp_path / "exclude.txt"
    rc, cap = run([dataset / "val", "--workers", "2", "--write-exclude", ex], capsys)
    assert rc == 0, cap.err
    assert scan.read_exclude_file(str(ex)) == {}  # written anyway, so a recipe can point at it
    assert summary(cap.out) == {"val": {"classes": "3", "images": "6", "min/median/max": "2/2/2",
                                        "empty": "0", "bad": "0", "cmyk": "0", "misnamed": "0",
                                        "tiny": "0"}}


def test_split_option_and_min_size(dataset, capsys):
    rc, cap = run([dataset, "--split", "train", "--workers", "1", "--min-size", "5"], capsys)
    assert rc == 1
    table = summary(cap.out)
    assert list(table) == ["train"] and table["train"]["tiny"] == "0"
    assert f"{B}/random.JPEG\tnot an image" in cap.out  # listed by name before the table


def test_tiny_only_is_clean_unless_excluded(tmp_path, capsys):
    root = tmp_path / "ds"
    (root / A).mkdir(parents=True)
    (root / A / "big.JPEG").write_bytes(jpeg_bytes())
    (root / A / "tiny.jpg").write_bytes(jpeg_bytes(size=(12, 12)))
    assert run([root, "--workers", "1"], capsys)[0] == 0
    assert run([root, "--workers", "1", "--exclude-tiny"], capsys)[0] == 1


@pytest.mark.parametrize("args,expect", [
    (["missing"], "does not exist"),
    (["flat"], "expected train/<wnid>/, val/<wnid>/ or <wnid>/ folders"),
    (["empty_classes"], "no images found"),
    (["ok", "--split", "val"], "no val/ split here"),
    (["ok", "--workers", "0"], "--workers must be >= 1"),
])
def test_bad_input_exits_2(tmp_path, capsys, args, expect):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.JPEG").write_bytes(jpeg_bytes())
    (tmp_path / "empty_classes" / A).mkdir(parents=True)
    (tmp_path / "ok" / "train" / A).mkdir(parents=True)
    (tmp_path / "ok" / "train" / A / "x.JPEG").write_bytes(jpeg_bytes())
    rc, cap = run([tmp_path / args[0], *args[1:]], capsys)
    assert rc == 2
    errors = [ln for ln in cap.err.split("\n") if ln.startswith("error: ")]
    assert len(errors) == 1 and expect in errors[0], cap.err


def test_real_imagenet_sample_is_clean(sample_dir, capsys):
    rc, cap = run([sample_dir, "--workers", "2"], capsys)
    assert rc == 0, cap.err
    table = summary(cap.out)
    assert list(table) == ["val"] and table["val"]["images"] == "105"
    assert all(table["val"][c] == "0" for c in chk.CATEGORIES)
