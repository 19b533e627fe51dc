#!/usr/bin/env python3
"""Turn the ILSVRC2012 downloads into OUT/train/<wnid>/*.JPEG and OUT/val/<wnid>/*.JPEG.

inputs (--train / --val): the official tar or a folder where it was already extracted.
  train: ILSVRC2012_img_train.tar (one <wnid>.tar per class), or a folder of <wnid>.tar files
         or <wnid>/ folders.  val: ILSVRC2012_img_val.tar, or a folder of its 50,000 flat
         ILSVRC2012_val_%08d.JPEG.  Either may be left out.
val labels (one of):
  --devkit   the unpacked ILSVRC2012_devkit_t12.tar.gz: ground truth as ILSVRC class
             IDs, mapped to wnids by meta.mat (needs scipy). Without scipy add --synset-map FILE:
             'ILSVRC_ID wnid [name]' lines, or 'wnid [name]' lines in class-ID order.
  --val-csv  Kaggle's LOC_val_solution.csv (names from LOC_synset_mapping.txt beside it).
--mode, for images that already exist as files (a tar's images are always written out):
  copy      copy; the source is left as it was (default)
  move      rename into OUT, emptying the source folder (no data copied on the same disk)
  hardlink  a second name for the same data: no extra space, same filesystem only
  symlink   a link to the absolute source path, which must then stay where it is

Interrupted? Run the same command again: files are written under a temp name and renamed, and a
train class is marked done (OUT/.prepare/<wnid>.done) only once all its files are in place.
Counts are checked at the end (1,281,167 train, 50,000 val, 1000 classes, 50 val images per class;
--expect-* for a subset, --no-verify to skip). OUT/synsets.txt lists the wnids sorted, which is the
ILSVRC2012 class-index order timm and torchvision use (line k is label k), with names when known.
exit status: 0 done and verified; 2 bad input or a count mismatch (one line on stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import os
import re
import shutil
import sys
import tarfile
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

from cspx.data.index import IMG_EXTENSIONS  # noqa: E402
from cspx.errors import CspxError, run_cli  # noqa: E402

WNID = re.compile(r"^n\d{8}$")
FULL = {"train": 1281167, "val": 50000, "classes": 1000, "val_per_class": 50}
STATE = ".prepare"
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"


def _images(folder: str) -> List[str]:
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and not e.name.startswith(".")
                      and e.name.lower().endswith(IMG_EXTENSIONS))


def _class_dirs(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        return []
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and WNID.match(e.name))


def _open_tar(path: str, what: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise CspxError(f"{path}: cannot read {what} as a tar ({e})") from None


def _name_lines(path: str) -> Dict[str, str]:
    """{wnid: name} from 'wnid name...' lines (synsets.txt, LOC_synset_mapping.txt)."""
    with open(path, "r", encoding="utf-8") as f:
        return {p[0]: p[1].strip() for p in (ln.split(None, 1) for ln in f) if len(p) == 2}


def read_synset_map(path: str) -> Tuple[Dict[int, str], Dict[str, str]]:
    """'ID wnid [name]' lines, or 'wnid [name]' lines in ILSVRC class-ID order."""
    with open(path, "r", encoding="utf-8") as f:
        rows = [ln.split(None, 2) if ln.split()[0].isdigit() else [None] + ln.split(None, 1)
                for ln in f if ln.strip()]
    id2wnid, names = {}, {}
    for k, row in enumerate(rows, 1):
        wnid = row[1] if len(row) > 1 else ""
        if not WNID.match(wnid):
            raise CspxError(f"{path}: line {k}: expected a wnid like n01440764, found {wnid!r}")
        id2wnid[k if row[0] is None else int(row[0])] = wnid
        if len(row) > 2:
            names[wnid] = row[2].strip()
    order = [w for _, w in sorted(id2wnid.items())]
    if rows and rows[0][0] is None and len(order) == FULL["classes"] and order == sorted(order):
        # The real class-ID order is not alphabetical (ID 1 is n02119789); a sorted list such as
        # LOC_synset_mapping.txt would silently give most val images the wrong label.
        raise CspxError(f"{path}: wnids are in sorted order, not ILSVRC class-ID order; give "
                        f"'ILSVRC_ID wnid' lines")
    return id2wnid, names


def read_meta_mat(path: str) -> Tuple[Dict[int, str], Dict[str, str]]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise CspxError(f"{path}: reading meta.mat needs scipy (pip install scipy); or pass "
                        f"--synset-map FILE ('ILSVRC_ID wnid' lines)") from None
    try:
        import numpy as np
        synsets = np.atleast_1d(loadmat(path, squeeze_me=True)["synsets"])
        leaves = [s for s in synsets if int(s["num_children"]) == 0]  # the 1000 classes
        return ({int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves},
                {str(s["WNID"]): str(s["words"]) for s in leaves})
    except Exception as e:  # loadmat raises several types on a damaged or foreign file
        raise CspxError(f"{path}: not an ILSVRC2012 meta.mat ({type(e).__name__}: {e})") from None


def _devkit_file(devkit: str, name: str) -> str:
    """The file anywhere under the devkit folder (its data/ holds both, however it was unpacked)."""
    if not os.path.isdir(devkit):
        raise CspxError(f"{devkit}: devkit folder does not exist (unpack the devkit tar first)")
    for d, _, files in os.walk(devkit):
        if name in files:
            return os.path.join(d, name)
    raise CspxError(f"{devkit}: no {name} in the devkit"
                    + ("; or pass --synset-map FILE" if name == "meta.mat" else ""))


def devkit_labels(devkit: str, synset_map: Optional[str]) -> Tuple[Dict[str, str], Dict[str, str]]:
    """({'ILSVRC2012_val_00000001': wnid, ...}, {wnid: name})."""
    with open(_devkit_file(devkit, GROUND_TRUTH), "r", encoding="utf-8") as f:
        gt = f.read().split()
    source = synset_map or _devkit_file(devkit, "meta.mat")
    id2wnid, names = read_synset_map(source) if synset_map else read_meta_mat(source)
    labels = {}
    for k, tok in enumerate(gt, 1):
        if not tok.isdigit() or int(tok) not in id2wnid:
            raise CspxError(f"{GROUND_TRUTH}: line {k}: class ID {tok!r} is not in {source}")
        labels[f"ILSVRC2012_val_{k:08d}"] = id2wnid[int(tok)]
    return labels, names


def csv_labels(path: str) -> Tuple[Dict[str, str], Dict[str, str]]:
    """Kaggle LOC_val_solution.csv: 'ImageId,PredictionString' (the string starts with the wnid)."""
    labels: Dict[str, str] = {}
    with open(path, "r", encoding="utf-8", newline="") as f:
        for k, row in enumerate(csv.reader(f), 1):
            if not row or (k == 1 and row[0] == "ImageId"):
                continue
            wnid = row[1].split()[0] if len(row) > 1 and row[1].split() else ""
            if not WNID.match(wnid):
                raise CspxError(f"{path}: line {k}: expected 'ImageId,wnid ...', found "
                                f"{','.join(row)[:60]!r}")
            labels[row[0].strip()] = wnid
    mapping = os.path.join(os.path.dirname(os.path.abspath(path)), "LOC_synset_mapping.txt")
    return labels, _name_lines(mapping) if os.path.isfile(mapping) else {}


def _tmp(dst: str) -> str:
    return os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.part")


def _write_stream(src, dst: str) -> None:
    with open(_tmp(dst), "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)
    os.replace(_tmp(dst), dst)


def _place(src: str, dst: str, mode: str) -> None:
    """Put an existing file at dst: a rename, or link/copy to a temp name and rename."""
    if mode == "move":
        return os.replace(src, dst)  # atomic; fails with EXDEV across filesystems
    tmp = _tmp(dst)
    if os.path.lexists(tmp):
        os.remove(tmp)
    if mode == "hardlink":
        os.link(src, tmp)
    elif mode == "symlink":
        os.symlink(os.path.abspath(src), tmp)
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _do_class(job: Tuple, out: str, mode: str) -> int:
    """Fill OUT/train/<wnid>/, then mark it done; returns the number of images added now."""
    wnid, path, member = job
    dst_dir, added = os.path.join(out, "train", wnid), 0
    os.makedirs(dst_dir, exist_ok=True)
    if member is None and os.path.isdir(path):
        for name in _images(path):
            if not os.path.lexists(os.path.join(dst_dir, name)):
                _place(os.path.join(path, name), os.path.join(dst_dir, name), mode)
                added += 1
    else:
        with _open_tar(path, "a class tar") as outer:
            # a <wnid>.tar inside the train tar is read in place, without unpacking it first
            try:
                t = tarfile.open(fileobj=outer.extractfile(member), mode="r:") if member else outer
                for m in t:
                    name = os.path.basename(m.name)  # a bare name: nothing lands outside dst_dir
                    dst = os.path.join(dst_dir, name)
                    if m.isfile() and not name.startswith(".") and not os.path.exists(dst):
                        _write_stream(t.extractfile(m), dst)
                        added += 1
            except tarfile.TarError as e:
                raise CspxError(f"{path}: {wnid}: damaged tar ({e})") from None
    marker = os.path.join(out, STATE, wnid + ".done")
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker + ".part", "w", encoding="utf-8") as f:
        f.write(f"{len(_images(dst_dir))}\n")
    os.replace(marker + ".part", marker)
    return added


def train_jobs(src: str) -> List[Tuple]:
    """(wnid, class folder or <wnid>.tar or the train tar, TarInfo of <wnid>.tar in it or None)."""
    jobs: Dict[str, Tuple] = {}
    if os.path.isdir(src):
        for e in sorted(os.scandir(src), key=lambda e: e.name):
            is_tar = e.name.endswith(".tar") and e.is_file()
            stem = e.name[:-4] if is_tar else e.name
            # a class tar wins over a folder of the same class: the tar is complete by design
            if WNID.match(stem) and (is_tar or (e.is_dir() and stem not in jobs)):
                jobs[stem] = (stem, e.path, None)
        if not jobs:
            raise CspxError(f"{src}: expected <wnid>.tar files or <wnid>/ folders in it")
    elif os.path.isfile(src):
        with _open_tar(src, "the train tar") as t:
            for m in (m for m in t.getmembers() if m.isfile()):
                name = os.path.basename(m.name)
                if not (name.endswith(".tar") and WNID.match(name[:-4])):
                    raise CspxError(f"{src}: expected one <wnid>.tar per class "
                                    f"(ILSVRC2012_img_train.tar), found {m.name!r}")
                jobs[name[:-4]] = (name[:-4], src, m)
        if not jobs:
            raise CspxError(f"{src}: the train tar holds no <wnid>.tar members")
    else:
        raise CspxError(f"{src}: train tar or folder does not exist")
    return [jobs[w] for w in sorted(jobs)]


def prepare_train(jobs: List[Tuple], out: str, mode: str) -> int:
    def done(w: str) -> bool:  # marked done, and no image removed since
        try:
            with open(os.path.join(out, STATE, w + ".done"), "r", encoding="utf-8") as f:
                return int(f.read()) == len(_images(os.path.join(out, "train", w)))
        except (OSError, ValueError):
            return False

    todo, added = [j for j in jobs if not done(j[0])], 0
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="class", desc="train") as bar:
        for job in todo:
            added += _do_class(job, out, mode)
            bar.update(1)
            bar.set_postfix(images=added)
    return added


def plan_val(src: str, labels: Dict[str, str], known: Iterable[str], label_src: str) -> Tuple:
    """([(file name, TarInfo or source path)], val tar or None, {file name: wnid}); a missing or
    unknown label fails here, before anything is written."""
    tar_path: Optional[str] = None
    if os.path.isdir(src):
        items: List[Tuple[str, object]] = [(n, os.path.join(src, n)) for n in _images(src)]
    elif os.path.isfile(src):
        with _open_tar(src, "the val tar") as t:
            members = [m for m in t.getmembers() if m.isfile()]
        for m in members:
            if "/" in m.name.strip("./") or not m.name.lower().endswith(IMG_EXTENSIONS):
                raise CspxError(f"{src}: expected flat ILSVRC2012_val_*.JPEG files "
                                f"(ILSVRC2012_img_val.tar), found {m.name!r}")
        items, tar_path = [(os.path.basename(m.name), m) for m in members], src
    else:
        raise CspxError(f"{src}: val tar or folder does not exist")
    known_set, where = set(known), {}
    for name, _ in items:
        wnid = labels.get(os.path.splitext(name)[0])
        if wnid is None:
            raise CspxError(f"{label_src}: no label for val image {name}")
        if known_set and wnid not in known_set:
            raise CspxError(f"{label_src}: labels {name} as {wnid}, which is not a train class")
        where[name] = wnid
    return items, tar_path, where


def prepare_val(plan: Tuple, out: str, mode: str) -> int:
    """No done-marker: a name appears only complete, and 50,000 existence checks are quick."""
    items, tar_path, where = plan
    for w in sorted(set(where.values())):
        os.makedirs(os.path.join(out, "val", w), exist_ok=True)
    added = 0
    with _open_tar(tar_path, "the val tar") if tar_path else contextlib.nullcontext() as tar:
        for name, item in tqdm(items, unit="img", desc="val"):
            dst = os.path.join(out, "val", where[name], name)
            if not os.path.lexists(dst):
                if tar is not None:
                    _write_stream(tar.extractfile(item), dst)
                else:
                    _place(str(item), dst, mode)
                added += 1
    return added


def write_synsets(out: str, names: Dict[str, str]) -> str:
    """OUT/synsets.txt in sorted-wnid order; names from an earlier run stay when none are given."""
    path = os.path.join(out, "synsets.txt")
    names = {**(_name_lines(path) if os.path.isfile(path) else {}), **names}
    wnids = sorted(set(_class_dirs(os.path.join(out, "train"))) |
                   set(_class_dirs(os.path.join(out, "val"))))
    with open(path + ".part", "w", encoding="utf-8") as f:
        f.write("".join(f"{w} {names[w]}\n" if names.get(w) else f"{w}\n" for w in wnids))
    os.replace(path + ".part", path)
    return path


def verify(counts: Dict[str, Dict[str, int]], expect: Dict[str, int]) -> None:
    problems: List[str] = []
    for split, c in counts.items():
        if sum(c.values()) != expect[split]:
            problems.append(f"{split}: expected {expect[split]} images, found {sum(c.values())}")
        if len(c) != expect["classes"]:
            problems.append(f"{split}: expected {expect['classes']} classes, found {len(c)}")
    off = {w: n for w, n in counts.get("val", {}).items() if n != expect["val_per_class"]}
    if off:
        problems.append(f"val: expected {expect['val_per_class']} images per class, found "
                        + ", ".join(f"{n} in {w}" for w, n in sorted(off.items())[:3])
                        + (f" (and {len(off) - 3} more classes)" if len(off) > 3 else ""))
    if problems:
        raise CspxError("count check failed: " + "; ".join(problems) +
                        " (--expect-* sets the expected counts, --no-verify skips the check)")


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="prepare_imagenet.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--train", "--train-tar", metavar="TAR|DIR", help="ILSVRC2012_img_train.tar")
    p.add_argument("--val", "--val-tar", metavar="TAR|DIR", help="ILSVRC2012_img_val.tar")
    lab = p.add_mutually_exclusive_group()
    lab.add_argument("--devkit", metavar="DIR", help="ILSVRC2012 devkit (val labels)")
    lab.add_argument("--val-csv", metavar="FILE", help="Kaggle LOC_val_solution.csv (val labels)")
    p.add_argument("--synset-map", metavar="FILE", help="class ID -> wnid instead of meta.mat")
    p.add_argument("--mode", choices=("copy", "move", "hardlink", "symlink"), default="copy",
                   help="how already-extracted images get into OUT (default: copy)")
    chk = p.add_argument_group("count check")
    for key in FULL:
        chk.add_argument(f"--expect-{key.replace('_', '-')}", type=int, default=FULL[key],
                         metavar="N", help=f"default: {FULL[key]}")
    chk.add_argument("--no-verify", action="store_true", help="skip the count check")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    a = p.parse_args(argv)
    out = os.path.abspath(os.path.expanduser(a.out))
    if not (a.train or a.val):
        raise CspxError("nothing to do: give --train and/or --val")
    if a.val and not (a.devkit or a.val_csv):
        raise CspxError("--val needs labels: --devkit DIR or --val-csv LOC_val_solution.csv")
    labels, names, added = {}, {}, {}  # type: Dict[str, str], Dict[str, str], Dict[str, int]
    try:
        if a.val:
            labels, names = (devkit_labels(a.devkit, a.synset_map) if a.devkit
                             else csv_labels(a.val_csv))
        if a.synset_map and not (a.val and a.devkit):
            names.update(read_synset_map(a.synset_map)[1])
        jobs = train_jobs(a.train) if a.train else []
        known = {j[0] for j in jobs} | set(_class_dirs(os.path.join(out, "train")))
        plan = plan_val(a.val, labels, known, a.devkit or a.val_csv) if a.val else None
        os.makedirs(out, exist_ok=True)
        if jobs:
            added["train"] = prepare_train(jobs, out, a.mode)
        if plan is not None:
            added["val"] = prepare_val(plan, out, a.mode)
        synsets = write_synsets(out, names)
    except OSError as e:  # a missing file, an unwritable OUT, a full disk: about the user's paths
        hint = ("; --mode move and hardlink need OUT on the source's filesystem"
                if e.errno == errno.EXDEV else "")
        raise CspxError(f"{e.filename or out}: {e.strerror or e}{hint}") from e
    counts = {s: {w: len(_images(os.path.join(out, s, w))) for w in _class_dirs(
        os.path.join(out, s))} for s in ("train", "val") if getattr(a, s)}
    print(f"{'split':<6} {'classes':>8} {'images':>10} {'added now':>10}")
    for s in counts:
        print(f"{s:<6} {len(counts[s]):>8} {sum(counts[s].values()):>10} {added.get(s, 0):>10}")
    print(f"class list: {synsets}")
    if not a.no_verify:
        verify(counts, {k: getattr(a, f"expect_{k}") for k in FULL})
        print("counts verified")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
