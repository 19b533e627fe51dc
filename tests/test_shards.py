"""Sharded datasets: scripts/make_shards.py writes them; cspx, DALI, tarfile and webdataset
read them."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import shutil
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_main
from cspx.data import shard_format as sh
from cspx.data.shard_reader import ShardSplit
from cspx.data.shard_writer import index_of_tar
from cspx.errors import CspxError, run_cli
from cspx.files import pid_alive

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import make_shards as ms  # noqa: E402

WNIDS = ["n01440764", "n01443537", "n02119789", "n02123045"]  # sorted: labels 0..3


def jpeg(seed: int, size=(24, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def make(argv, capsys=None):
    rc = run_cli(ms.main, [str(a) for a in argv])
    return (rc, capsys.readouterr()) if capsys else rc


def source_files(root: Path, split: str = "val") -> dict:
    """{relative path: bytes} of an ImageNet-layout split."""
    return {p.relative_to(root / split).as_posix(): p.read_bytes()
            for p in sorted((root / split).glob("*/*")) if p.is_file()}


def tree_hashes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample_shards(sample_dir, tmp_path_factory) -> Path:
    """The 105 real JPEGs of the sample as val shards of about 2 MB (6 shards), 2 workers."""
    out = tmp_path_factory.mktemp("shards") / "sample"
    assert make([sample_dir, out, "--shard-size", 2, "--workers", 2]) == 0
    return out


@pytest.fixture
def small(tmp_path) -> Path:
    """Generated ImageNet layout: 4 classes x 6 train images, 4 x 2 val images, tiny JPEGs."""
    src = tmp_path / "src"
    for split, n in (("train", 6), ("val", 2)):
        for k, w in enumerate(WNIDS):
            (src / split / w).mkdir(parents=True)
            for i in range(n):
                (src / split / w / f"{w}_{i}.JPEG").write_bytes(jpeg(100 * k + i + 50 * n))
    return src


SMALL = ["--shard-size", 0.02, "--workers", 1]  # 20 kB: about 4 tiny samples a shard


def test_round_trip_of_the_real_sample(sample_dir, sample_shards):
    split = ShardSplit(str(sample_shards), "val")
    synsets = [ln.split()[0] for ln in open(os.path.join(sample_dir, "synsets.txt"))]
    files = source_files(Path(sample_dir))
    assert len(split) == len(files) == 105 and split.classes == synsets
    assert split.paths() == sorted(files)  # val: sorted by path, every file exactly once
    for i in range(len(split)):
        rel = split.name(i)
        assert split.read(i) == files[rel]
        assert split.labels[i] == synsets.index(rel.split("/")[0])
    assert split.positions.tolist() == list(range(105)) and split.labels.dtype == np.int64
    assert len(split.shards) == 6 and split.excluded == {}
    synsets_txt = Path(sample_dir, "synsets.txt").read_text()
    assert (sample_shards / "synsets.txt").read_text() == synsets_txt  # names kept


def test_tars_are_plain_gnu_tars_for_python_tarfile(sample_shards, sample_dir):
    files = source_files(Path(sample_dir))
    table = np.load(sample_shards / "val" / sh.TABLE)
    pos = 0
    for tar_path in sorted((sample_shards / "val").glob("*.tar")):
        raw = tar_path.read_bytes()
        with tarfile.open(tar_path) as t:
            members = t.getmembers()
            assert len(members) % 4 == 0
            for j in range(0, len(members), 4):
                key = f"{pos:08d}"
                m = members[j:j + 4]
                assert [x.name for x in m] == [f"{key}.jpg", f"{key}.cls", f"{key}.lab",
                                               f"{key}.path.txt"]
                assert all(x.isreg() and x.mtime == 0 and " " not in x.name for x in m)
                path = t.extractfile(m[3]).read().decode()
                label, position = struct.unpack("<ii", t.extractfile(m[2]).read())
                assert t.extractfile(m[0]).read() == files[path]
                assert t.extractfile(m[1]).read() == str(label).encode()
                assert (label, position) == (table[pos]["label"], pos)
                assert m[0].offset_data == table[pos]["offset"]
                pos += 1
        # GNU headers only (no pax extended headers, whose offsets DALI's tools get wrong)
        magics = {raw[x.offset + 257:x.offset + 265] for x in members}
        assert magics == {b"ustar  \x00"}
        assert (tar_path.with_suffix(".idx")).read_text() == index_of_tar(str(tar_path))[0]
    assert pos == 105


def test_dali_webdataset_reader_gives_the_same_samples(sample_shards):
    pytest.importorskip("nvidia.dali", reason="DALI wheels exist for Linux x86_64/aarch64 only")
    from nvidia.dali import fn, pipeline_def, types

    split = ShardSplit(str(sample_shards), "val")

    @pipeline_def(batch_size=16, num_threads=1, device_id=None)
    def pipe():
        jpg, lab, path = fn.readers.webdataset(
            paths=split.tar_paths(), index_paths=split.index_paths(),
            ext=["jpg", "lab", "path.txt"], dtypes=[types.UINT8, types.INT32, types.UINT8],
            missing_component_behavior="error", dont_use_mmap=True, random_shuffle=False)
        return jpg, lab, path

    p = pipe()
    p.build()
    seen = {}
    for _ in range(-(-len(split) // 16)):
        jpg, lab, path = p.run()
        for k in range(len(jpg)):
            label, pos = np.array(lab[k]).tolist()
            seen[pos] = (np.array(jpg[k]).tobytes(), label, np.array(path[k]).tobytes().decode())
    assert sorted(seen) == list(range(len(split)))
    for i in range(len(split)):
        assert seen[i] == (split.read(i), split.labels[i], split.name(i))


def test_webdataset_library_reads_the_shards(sample_shards):
    wds = pytest.importorskip("webdataset", reason="webdataset is not installed (optional)")
    split = ShardSplit(str(sample_shards), "val")
    urls = [str(p) for p in split.tar_paths()]
    got = [(s["__key__"], s["jpg"], s["cls"], s["path.txt"])
           for s in wds.WebDataset(urls, shardshuffle=False).decode()]
    assert got == [(f"{i:08d}", split.read(i), int(split.labels[i]), split.name(i))
                   for i in range(len(split))]


def test_train_order_is_shuffled_across_classes_and_seeded(small, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert make([small, tmp_path / name, "--seed", seed, *SMALL]) == 0
        split = ShardSplit(str(tmp_path / name), "train")
        runs[name] = (split.paths(), [s.sha256 for s in split.shards])
        # every shard holds more than one class: no shard is one class
        for s in split.shards:
            labels = split.labels[s.first:s.first + s.samples]
            assert len(set(labels.tolist())) > 1, s.name
    paths = runs["a"][0]
    assert sorted(paths) == sorted(source_files(small, "train")) and len(paths) == 24
    assert paths != sorted(paths)
    assert runs["b"] == runs["a"]  # same seed: byte-identical shards
    assert runs["c"][0] != paths and sorted(runs["c"][0]) == sorted(paths)
    assert ShardSplit(str(tmp_path / "a"), "val").paths() == sorted(source_files(small, "val"))


def test_bad_files_are_left_out_and_listed(small, tmp_path, capsys):
    good = jpeg(7)
    d = small / "train" / WNIDS[1]
    (d / "empty.JPEG").write_bytes(b"")
    (d / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (d / "garbage_body.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9")
    rc, cap = make([small, tmp_path / "out", *SMALL], capsys)
    assert rc == 0, cap.err
    bad = {f"{WNIDS[1]}/{n}" for n in ("empty.JPEG", "truncated.JPEG", "garbage_body.JPEG")}
    split = ShardSplit(str(tmp_path / "out"), "train")
    assert set(split.excluded) == bad
    assert "empty file" in split.excluded[f"{WNIDS[1]}/empty.JPEG"]
    assert "decode failed" in split.excluded[f"{WNIDS[1]}/garbage_body.JPEG"]
    assert len(split) == 24 and not bad & set(split.paths())
    listed = (tmp_path / "out" / "train" / sh.EXCLUDED).read_text().splitlines()
    assert {ln.split("\t")[0] for ln in listed} == bad
    assert "left out 3 files" in cap.out


def _dead_pid() -> int:
    return next(p for p in range(4_194_000, 4_194_300) if not pid_alive(p))


def test_rerun_keeps_finished_shards_and_redoes_the_rest(small, tmp_path, capsys):
    out = tmp_path / "out"
    assert make([small, out, *SMALL], capsys)[0] == 0
    first = tree_hashes(out)
    tars = sorted((out / "train").glob("*.tar"))
    assert len(tars) >= 4
    stamps = {p: p.stat().st_mtime_ns for p in tars}
    # a finished shard lost, and the last shard as an interrupted run leaves it: no record, and
    # a partial temp file of a writer that is gone
    tars[1].unlink()
    last = tars[-1]
    (out / ms.STATE / f"{last.stem}.json").unlink()
    last.unlink()
    partial = out / "train" / f".{last.name}.tmp{_dead_pid()}"
    partial.write_bytes(b"\0" * 1000)
    (out / sh.MANIFEST).unlink()
    rc, cap = make([small, out, *SMALL], capsys)
    assert rc == 0, cap.err
    assert not partial.exists()
    assert [ln.split()[-1] for ln in cap.out.splitlines() if ln.startswith("train")] == ["2"]
    for p in tars[2:-1] + tars[:1]:
        assert p.stat().st_mtime_ns == stamps[p], p.name  # kept, not rewritten
    again = tree_hashes(out)
    assert {k: v for k, v in again.items() if k != sh.MANIFEST} == \
        {k: v for k, v in first.items() if k != sh.MANIFEST}
    # another plan over the same OUT is refused before anything changes
    rc, cap = make([small, out, "--seed", 1, *SMALL], capsys)
    assert rc == 2 and "--seed" in cap.err and "new folder" in cap.err
    assert tree_hashes(out) == again


def test_final_check_failure_is_reported_and_rewritten_by_a_rerun(small, tmp_path, capsys,
                                                                  monkeypatch):
    out = tmp_path / "out"
    real = ms.verify_shard
    flipped = []

    def damage_one(split_dir, s, rows):  # the disk returns other bytes than were written
        if s.name == "val-000001" and not flipped:
            flipped.append(s.name)
            tar = Path(split_dir, s.name + ".tar")
            raw = bytearray(tar.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            tar.write_bytes(bytes(raw))
        return real(split_dir, s, rows)

    monkeypatch.setattr(ms, "verify_shard", damage_one)
    rc, cap = make([small, out, *SMALL], capsys)
    assert rc == 2 and "val-000001.tar: sha256 differs" in cap.err and "run the same" in cap.err
    assert not (out / sh.MANIFEST).exists()  # no manifest over a failed check
    monkeypatch.setattr(ms, "verify_shard", real)
    rc, cap = make([small, out, *SMALL], capsys)
    assert rc == 0, cap.err
    assert [ln.split()[-1] for ln in cap.out.splitlines() if ln.startswith(("train", "val"))] \
        == ["0", "1"]  # only the damaged shard was written again
    assert len(ShardSplit(str(out), "val")) == 8


def test_refuses_a_non_empty_folder_it_did_not_create(small, tmp_path):
    out = tmp_path / "mine"
    (out / "train").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes\n")
    (out / "train" / "train-000000.tar").write_bytes(b"precious")
    before = tree_hashes(out)
    r = run_main(["scripts/make_shards.py", str(small), str(out), *map(str, SMALL)])
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: OUT: ") and "not empty" in err[0]
    assert "Traceback" not in r.stderr
    assert tree_hashes(out) == before
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == \
        ["notes.txt", "train", "train/train-000000.tar"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_start_check_finds_truncated_and_corrupt_shards(sample_shards, tmp_path, caplog):
    root = _copy(sample_shards, tmp_path / "copy")
    m = sh.read_manifest(str(root))
    shards = m.splits["val"].shards
    t1, t4 = root / "val" / f"{shards[1].name}.tar", root / "val" / f"{shards[4].name}.tar"
    with open(t1, "r+b") as f:
        f.truncate(shards[1].bytes - 5000)
    raw = bytearray(t4.read_bytes())
    raw[700] ^= 0xFF  # inside the first sample's JPEG, in the first 64 KiB
    t4.write_bytes(bytes(raw))
    with pytest.raises(CspxError, match=f"{shards[1].name}.tar is .* bytes.*truncated"):
        ShardSplit(str(root), "val")
    with pytest.raises(CspxError, match="and 1 more shards"):
        ShardSplit(str(root), "val", bad_shards="refuse")
    with caplog.at_level(logging.WARNING, logger="cspx"):
        split = ShardSplit(str(root), "val", bad_shards="exclude")
    assert shards[1].name in caplog.text and shards[4].name in caplog.text
    gone = set(range(shards[1].first, shards[1].first + shards[1].samples)) | \
        set(range(shards[4].first, shards[4].first + shards[4].samples))
    assert len(split) == 105 - len(gone)
    assert set(split.positions.tolist()) == set(range(105)) - gone
    assert set(split.excluded) == {f"val/{shards[1].name}.tar", f"val/{shards[4].name}.tar"}
    whole = ShardSplit(str(sample_shards), "val")
    assert split.fingerprint() != whole.fingerprint()
    for i in (0, len(split) - 1):
        p = int(split.positions[i])
        assert split.read(i) == whole.read(p) and split.name(i) == whole.name(p)


def test_damage_in_the_middle_passes_the_start_check_and_fails_verify(sample_shards, tmp_path,
                                                                      capsys):
    root = _copy(sample_shards, tmp_path / "copy")
    s = sh.read_manifest(str(root)).splits["val"].shards[2]
    tar = root / "val" / f"{s.name}.tar"
    assert s.bytes > 3 * sh.QUICK_BYTES
    raw = bytearray(tar.read_bytes())
    raw[s.bytes // 2] ^= 0xFF
    tar.write_bytes(bytes(raw))
    assert len(ShardSplit(str(root), "val")) == 105  # what the start check cannot see
    rc, cap = make([root, "--verify"], capsys)
    assert rc == 2 and f"{s.name}.tar: sha256 differs" in cap.err
    rc, cap = make([sample_shards, "--verify"], capsys)
    assert rc == 0 and "6 shards, 105 samples verified" in cap.out


def test_reads_in_forked_and_spawned_processes(sample_shards):
    import multiprocessing as mp
    split = ShardSplit(str(sample_shards), "val")
    want = [split.read(i) for i in range(0, 105, 10)]  # the parent has files open now
    with mp.get_context("fork").Pool(2) as pool:
        got = pool.map(_read_one, [(split, i) for i in range(0, 105, 10)])
    assert got == want
    clone = pickle.loads(pickle.dumps(split))  # what a spawned DataLoader worker receives
    split.close()  # the clone shares nothing open: it reads on after the original's files close
    assert clone.read(30) == want[3] and split.read(40) == want[4]


def _read_one(args):
    split, i = args
    return split.read(i)


# ---------------------------------------------------------------- from the official downloads
VAL = ["n02123045", "n01440764", "n02119789", "n01443537", "n01443537", "n02119789"]
ILSVRC_IDS = {"n02119789": 1, "n01440764": 2, "n02123045": 3, "n01443537": 4}


def _add(t: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    t.addfile(info, io.BytesIO(data))


@pytest.fixture
def downloads(tmp_path) -> Path:
    """ILSVRC2012_img_train.tar (class tars inside), a flat val tar, devkit, map and CSV."""
    d = tmp_path / "dl"
    data = d / "devkit" / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    with tarfile.open(d / "ILSVRC2012_img_train.tar", "w") as t:
        for k, w in enumerate(WNIDS):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as c:
                for i in range(3):
                    _add(c, f"{w}_{i}.JPEG", jpeg(10 * k + i))
            _add(t, f"{w}.tar", buf.getvalue())
    with tarfile.open(d / "ILSVRC2012_img_val.tar", "w") as t:
        for k in range(len(VAL)):
            _add(t, f"ILSVRC2012_val_{k + 1:08d}.JPEG", jpeg(500 + k))
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ILSVRC_IDS[w]}\n" for w in VAL))
    (d / "map.txt").write_text("".join(f"{i} {w}\n" for w, i in sorted(
        ILSVRC_IDS.items(), key=lambda x: x[1])))
    (d / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{k + 1:08d},{w} 1 2 3 4\n" for k, w in enumerate(VAL)))
    return d


@pytest.mark.parametrize("labels", ["devkit", "csv"])
def test_from_the_official_tars(downloads, tmp_path, labels):
    d = downloads
    lab = (["--devkit", d / "devkit", "--synset-map", d / "map.txt"] if labels == "devkit"
           else ["--val-csv", d / "LOC_val_solution.csv"])
    out = tmp_path / "out"
    assert make([out, "--train", d / "ILSVRC2012_img_train.tar",
                 "--val", d / "ILSVRC2012_img_val.tar", *lab, *SMALL]) == 0
    train, val = ShardSplit(str(out), "train"), ShardSplit(str(out), "val")
    assert train.classes == WNIDS and len(train) == 12 and len(val) == len(VAL)
    for i in range(len(train)):
        w, name = train.name(i).split("/")
        k, n = WNIDS.index(w), int(name.split("_")[1][0])
        assert name == f"{w}_{n}.JPEG" and train.labels[i] == k
        assert train.read(i) == jpeg(10 * k + n)
    for i in range(len(val)):
        w, name = val.name(i).split("/")
        k = int(name[15:23]) - 1
        assert w == VAL[k] and val.labels[i] == WNIDS.index(VAL[k])
        assert val.read(i) == jpeg(500 + k)
    assert (d / "ILSVRC2012_img_train.tar").stat().st_size > 0  # read by offset, never unpacked
    assert not list(d.rglob("*.JPEG"))
