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

OUT must be a new or empty folder, or one this script made earlier (it holds OUT/.prepare/):
anything else is refused untouched. Interrupted? Run the same command again: files are written
under a temp name and renamed, and a train class is marked done (OUT/.prepare/<wnid>.done) only
once all its files are in place.
Counts are checked at the end (1,281,167 train, 50,000 val, 1000 classes, 50 val images per class;
--expect-* for a subset, --no-verify to skip). OUT/synsets.txt lists the wnids sorted, which is the
ILSVRC2012 class-index order timm and torchvision use (line k is label k), with names when known.
exit status: 0 done and verified; 2 bad input or a count mismatch (one line on stderr).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import shutil
import sys
import tarfile
from typing import Dict, List, Sequence, Tuple

from tqdm import tqdm

# the readers of the downloads, shared with scripts/make_shards.py (GROUND_TRUTH and
# read_synset_map are used by the tests through this module)
from cspx.data.imagenet_sources import (  # noqa: F401
    GROUND_TRUTH,
    csv_labels,
    devkit_labels,
    name_lines,
    plan_val,
    read_synset_map,
    train_jobs,
)
from cspx.data.imagenet_sources import list_images as _images
from cspx.data.imagenet_sources import open_tar as _open_tar
from cspx.data.imagenet_sources import wnid_dirs as _class_dirs
from cspx.errors import CspxError, run_cli
from cspx.files import claim_folder

FULL = {"train": 1281167, "val": 50000, "classes": 1000, "val_per_class": 50}
STATE = ".prepare"
MARKER = ".cspx-prepare"  # OUT was made by this script (older runs: STATE is there)


def part_path(dst: str) -> str:
    """Where dst is written before its atomic rename: a hidden `.NAME.part` beside it."""
    return os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.part")


def write_stream(src, dst: str) -> None:
    """Copy a file object to dst through part_path(dst): dst is complete or absent."""
    with open(part_path(dst), "wb") as f:
        shutil.copyfileobj(src, f, 1 << 20)
    os.replace(part_path(dst), dst)


def _place(src: str, dst: str, mode: str) -> None:
    """Put an existing file at dst: a rename, or link/copy to a temp name and rename."""
    if mode == "move":
        return os.replace(src, dst)  # atomic; fails with EXDEV across filesystems
    tmp = part_path(dst)
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
                        write_stream(t.extractfile(m), dst)
                        added += 1
            except tarfile.TarError as e:
                raise CspxError(f"{path}: {wnid}: damaged tar ({e})") from None
    marker = os.path.join(out, STATE, wnid + ".done")
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker + ".part", "w", encoding="utf-8") as f:
        f.write(f"{len(_images(dst_dir))}\n")
    os.replace(marker + ".part", marker)
    return added


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
                    write_stream(tar.extractfile(item), dst)
                else:
                    _place(str(item), dst, mode)
                added += 1
    return added


def write_synsets(out: str, names: Dict[str, str]) -> str:
    """OUT/synsets.txt in sorted-wnid order; names from an earlier run stay when none are given."""
    path = os.path.join(out, "synsets.txt")
    names = {**(name_lines(path) if os.path.isfile(path) else {}), **names}
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
        claim_folder(out, MARKER, "prepared ImageNet folder", "--out",
                     "Choose a new or empty folder for --out.",
                     adopt=lambda path: os.path.isdir(os.path.join(path, STATE)))
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
