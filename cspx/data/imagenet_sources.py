"""Reading the ILSVRC2012 downloads in place: class lists, val labels, and where each image is.

Shared by scripts/prepare_imagenet.py (which unpacks into train/<wnid>/ folders) and
scripts/make_shards.py (which streams into tar shards without unpacking). Nothing here writes.

Sources:
  train: ILSVRC2012_img_train.tar (one <wnid>.tar per class), or a folder of <wnid>.tar files
         or <wnid>/ folders.
  val:   ILSVRC2012_img_val.tar (50,000 flat ILSVRC2012_val_%08d.JPEG) or a folder of them, with
         labels from the devkit (ground truth as ILSVRC class IDs, mapped to wnids by meta.mat or
         a --synset-map file) or Kaggle's LOC_val_solution.csv.
"""
from __future__ import annotations

import csv
import os
import re
import tarfile
from typing import Dict, Iterable, List, Optional, Tuple

from cspx.data.index import IMG_EXTENSIONS
from cspx.errors import CspxError

WNID = re.compile(r"^n\d{8}$")
GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
NUM_CLASSES = 1000

# (wnid, class folder or <wnid>.tar or the train tar, TarInfo of <wnid>.tar inside it or None)
TrainJob = Tuple[str, str, Optional[tarfile.TarInfo]]


def list_images(folder: str) -> List[str]:
    """Sorted image file names directly in `folder` (the index's extensions, any case)."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_file() and not e.name.startswith(".")
                      and e.name.lower().endswith(IMG_EXTENSIONS))


def wnid_dirs(folder: str) -> List[str]:
    """Sorted <wnid>/ subfolder names of `folder` ([] when it does not exist)."""
    if not os.path.isdir(folder):
        return []
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and WNID.match(e.name))


def open_tar(path: str, what: str) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise CspxError(f"{path}: cannot read {what} as a tar ({e})") from None


def name_lines(path: str) -> Dict[str, str]:
    """{wnid: name} from 'wnid name...' lines (synsets.txt, LOC_synset_mapping.txt)."""
    with open(path, "r", encoding="utf-8") as f:
        return {p[0]: p[1].strip() for p in (ln.split(None, 1) for ln in f) if len(p) == 2}


def read_synset_map(path: str) -> Tuple[Dict[int, str], Dict[str, str]]:
    """'ID wnid [name]' lines, or 'wnid [name]' lines in ILSVRC class-ID order."""
    with open(path, "r", encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    id2wnid: Dict[int, str] = {}
    names: Dict[str, str] = {}
    for k, ln in enumerate(lines, 1):
        numbered = ln.split()[0].isdigit()
        parts = ln.split(None, 2) if numbered else ln.split(None, 1)
        wnid_name = parts[1:] if numbered else parts  # [wnid, name] or [wnid] (or [])
        wnid = wnid_name[0] if wnid_name else ""
        if not WNID.match(wnid):
            raise CspxError(f"{path}: line {k}: expected a wnid like n01440764, found {wnid!r}")
        id2wnid[int(parts[0]) if numbered else k] = wnid
        if len(wnid_name) > 1:
            names[wnid] = wnid_name[1].strip()
    order = [w for _, w in sorted(id2wnid.items())]
    unnumbered = bool(lines) and not lines[0].split()[0].isdigit()
    if unnumbered and len(order) == NUM_CLASSES and order == sorted(order):
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


def devkit_file(devkit: str, name: str) -> str:
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
    with open(devkit_file(devkit, GROUND_TRUTH), "r", encoding="utf-8") as f:
        gt = f.read().split()
    source = synset_map or devkit_file(devkit, "meta.mat")
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
    return labels, name_lines(mapping) if os.path.isfile(mapping) else {}


def train_jobs(src: str) -> List[TrainJob]:
    """One job per class, sorted by wnid: (wnid, class folder or <wnid>.tar or the train tar,
    TarInfo of <wnid>.tar inside the train tar or None)."""
    jobs: Dict[str, TrainJob] = {}
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
        with open_tar(src, "the train tar") as t:
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


# Where one image's bytes are: (file, byte offset, size in bytes); size -1 means the whole file.
Location = Tuple[str, int, int]


def plain_tar(path: str, what: str) -> tarfile.TarFile:
    """Member offsets are only file offsets in a plain tar: a compressed one is refused."""
    try:
        return tarfile.open(path, "r:")
    except tarfile.ReadError:
        raise CspxError(f"{path}: {what} is compressed or not a tar; reading images by offset "
                        f"needs a plain (uncompressed) tar such as the official download") from None
    except OSError as e:
        raise CspxError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def _tar_images(t: tarfile.TarFile, base: int, path: str) -> List[Tuple[str, Location]]:
    """(bare file name, location) of every image member; `base` is where `t` starts in `path`."""
    out = []
    for m in t:
        name = os.path.basename(m.name)  # a bare name: nothing can point outside its class
        if m.isreg() and not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS):
            out.append((name, (path, base + m.offset_data, m.size)))
    return out


def train_images(job: TrainJob) -> List[Tuple[str, Location]]:
    """Sorted (file name, location) of one class's images, without extracting anything: a
    <wnid>.tar inside the train tar is indexed in place (its member offsets plus its own)."""
    wnid, path, member = job
    if member is None and os.path.isdir(path):
        return [(n, (os.path.join(path, n), 0, -1)) for n in list_images(path)]
    if member is None:
        with plain_tar(path, "a class tar") as t:
            return sorted(_tar_images(t, 0, path))
    with plain_tar(path, "the train tar") as outer:
        try:
            with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                return sorted(_tar_images(inner, member.offset_data, path))
        except tarfile.TarError as e:
            raise CspxError(f"{path}: {wnid}: damaged tar ({e})") from None


def val_sources(src: str) -> Tuple[List[Tuple[str, object]], Optional[str]]:
    """([(file name, TarInfo or source path)], val tar or None) for a flat val tar or folder."""
    if os.path.isdir(src):
        return [(n, os.path.join(src, n)) for n in list_images(src)], None
    if not os.path.isfile(src):
        raise CspxError(f"{src}: val tar or folder does not exist")
    with open_tar(src, "the val tar") as t:
        members = [m for m in t.getmembers() if m.isfile()]
    for m in members:
        if "/" in m.name.strip("./") or not m.name.lower().endswith(IMG_EXTENSIONS):
            raise CspxError(f"{src}: expected flat ILSVRC2012_val_*.JPEG files "
                            f"(ILSVRC2012_img_val.tar), found {m.name!r}")
    return [(os.path.basename(m.name), m) for m in members], src


def val_wnids(items: Iterable[Tuple[str, object]], labels: Dict[str, str], known: Iterable[str],
              label_src: str) -> Dict[str, str]:
    """{file name: wnid}; a missing label, or one naming no train class, fails here, before
    anything is written."""
    known_set, where = set(known), {}
    for name, _ in items:
        wnid = labels.get(os.path.splitext(name)[0])
        if wnid is None:
            raise CspxError(f"{label_src}: no label for val image {name}")
        if known_set and wnid not in known_set:
            raise CspxError(f"{label_src}: labels {name} as {wnid}, which is not a train class")
        where[name] = wnid
    return where


def plan_val(src: str, labels: Dict[str, str], known: Iterable[str], label_src: str) -> Tuple:
    """([(file name, TarInfo or source path)], val tar or None, {file name: wnid})."""
    items, tar_path = val_sources(src)
    return items, tar_path, val_wnids(items, labels, known, label_src)


def location(item: object, tar_path: Optional[str]) -> Location:
    """Where a val_sources item's bytes are."""
    if tar_path is None:
        return str(item), 0, -1
    assert isinstance(item, tarfile.TarInfo)  # from a val tar, val_sources lists its members
    return tar_path, item.offset_data, item.size
