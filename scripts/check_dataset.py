#!/usr/bin/env python3
"""Decode every image of a dataset and report the files the loaders should know about.

ROOT is an ImageNet layout (ROOT/train/<wnid>/, ROOT/val/<wnid>/) or one split folder of <wnid>/
class folders. Every image the loaders would list (*.jpg, *.jpeg, *.png, any case) is decoded in
full by --workers processes and sorted into:
  bad        empty, truncated, or failing to decode. These go into the exclusion list: DALI
             cannot skip a file at run time, so one bad JPEG can end a run days in.
  cmyk       CMYK JPEGs. The loaders convert them to RGB; reported only.
  misnamed   data of another format behind the extension, e.g. a PNG named .JPEG. Decoders go
             by content, so they load; reported only.
  tiny       shorter side under --min-size pixels; excluded only with --exclude-tiny.
Per split it also counts classes and images per class (min / median / max) and names class
folders without images.

--write-exclude FILE writes the exclusion list: one 'wnid/file<TAB>reason' per line, the path
relative to the split folder, so one list serves train and val. Point a recipe at it with
data.exclude. It replaces a list this script wrote earlier; any other existing FILE (a list made
by hand, say) is refused unless --force is given. --json FILE writes the whole report (an
existing FILE is overwritten: that is the flag's job).

exit status: 0 clean; 1 some files belong in the exclusion list; 2 bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Sequence

from tqdm import tqdm

from cspx.data import scan
from cspx.data.index import IMG_EXTENSIONS
from cspx.errors import CspxError, run_cli
from cspx.files import atomic_write, check_writable

CATEGORIES = ("bad", "cmyk", "misnamed", "tiny")
# what each extension promises, as PIL names formats
EXT_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def _class_dirs(folder: str) -> List[str]:
    """Class folders as the index sees them: every folder not starting with '.'."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def find_splits(root: str, only: str = "") -> Dict[str, str]:
    """{split name: folder}: ROOT/train and ROOT/val when they hold class folders, else ROOT."""
    if not os.path.isdir(root):
        raise CspxError(f"{root}: dataset folder does not exist")
    splits = {s: os.path.join(root, s) for s in ("train", "val")
              if os.path.isdir(os.path.join(root, s)) and _class_dirs(os.path.join(root, s))}
    if not splits:
        if not _class_dirs(root):
            raise CspxError(f"{root}: expected train/<wnid>/, val/<wnid>/ or <wnid>/ folders in it")
        splits = {os.path.basename(os.path.normpath(root)) or root: root}
    if only:
        if only not in splits:
            raise CspxError(f"{root}: no {only}/ split here (found {', '.join(splits)})")
        splits = {only: splits[only]}
    return splits


def list_images(split_dir: str) -> Dict[str, List[str]]:
    """{class: [relative paths]} with the index's rule for which files are images."""
    out: Dict[str, List[str]] = {}
    for c in _class_dirs(split_dir):
        with os.scandir(os.path.join(split_dir, c)) as it:
            out[c] = sorted(f"{c}/{e.name}" for e in it
                            if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
    return out


def classify(results: Dict[str, dict], min_size: int) -> Dict[str, Dict[str, str]]:
    """{category: {relative path: detail}} from scan.deep_check results."""
    found: Dict[str, Dict[str, str]] = {c: {} for c in CATEGORIES}
    for rel, info in sorted(results.items()):
        if info["reason"] is not None:
            found["bad"][rel] = str(info["reason"])
            continue
        fmt, ext = info["format"], os.path.splitext(rel)[1]
        if fmt == "JPEG" and info["mode"] == "CMYK":
            found["cmyk"][rel] = "CMYK JPEG"
        if fmt != EXT_FORMAT.get(ext.lower(), fmt):
            found["misnamed"][rel] = f"{fmt} data in a {ext} file"
        w, h = int(info["width"]), int(info["height"])
        if min(w, h) < min_size:
            found["tiny"][rel] = f"tiny image ({w}x{h} px, under --min-size {min_size})"
    return found


def check_split(name: str, split_dir: str, workers: int, min_size: int) -> dict:
    per_class = list_images(split_dir)
    files = [rel for rels in per_class.values() for rel in rels]
    with tqdm(total=len(files), unit="img", desc=f"decoding {name}") as bar:
        results = scan.scan_files(split_dir, files, deep=True, workers=workers,
                                  progress=bar.update)
    counts = {c: len(rels) for c, rels in per_class.items()}
    modes: Dict[str, int] = {}
    for info in results.values():
        if info["reason"] is None:  # modes of the images the loaders will decode
            modes[str(info["mode"])] = modes.get(str(info["mode"]), 0) + 1
    sizes = sorted(counts.values())
    return {"path": split_dir, "classes": len(counts), "images": len(files),
            "per_class": {"min": sizes[0], "median": statistics.median(sizes), "max": sizes[-1]},
            "empty_classes": [c for c, n in counts.items() if n == 0],
            "modes": dict(sorted(modes.items())), "class_counts": counts,
            **classify(results, min_size)}


def excluded(report: dict, exclude_tiny: bool) -> Dict[str, str]:
    """{path relative to its split folder: reason} of the files no decoder should see."""
    out: Dict[str, str] = {}
    for split in report["splits"].values():
        out.update(split["bad"])
        if exclude_tiny:
            out.update(split["tiny"])
    return out


def print_report(report: dict, show: int) -> None:
    titles = {"bad": "bad files (excluded)", "cmyk": "CMYK JPEGs (loaded as RGB, kept)",
              "misnamed": "format differs from extension (loaded by content, kept)",
              "tiny": "tiny images" + (" (excluded)" if report["exclude_tiny"] else " (kept)")}
    for cat in CATEGORIES:
        items = [(f"{s}/{rel}" if len(report["splits"]) > 1 else rel, detail)
                 for s, r in report["splits"].items() for rel, detail in r[cat].items()]
        if items:
            print(f"{titles[cat]}: {len(items)}")
            for rel, detail in items[:show]:
                print(f"  {rel}\t{detail}")
            if len(items) > show:
                print(f"  ... and {len(items) - show} more (all of them in --json)")
    for s, r in report["splits"].items():
        if r["empty_classes"]:
            print(f"{s}: {len(r['empty_classes'])} class folders hold no images: "
                  + ", ".join(r["empty_classes"][:show]))
    if report.get("exclude_file"):
        print(f"exclusion list: {report['exclude_file']} ({report['excluded']} files)")
    head = ("split", "classes", "images", "min/median/max", "empty", *CATEGORIES)
    rows = [(s, r["classes"], r["images"], "{min}/{median:g}/{max}".format(**r["per_class"]),
             len(r["empty_classes"]), *(len(r[c]) for c in CATEGORIES))
            for s, r in report["splits"].items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print()
    for row in (head, *rows):
        print("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                        for i, (x, w) in enumerate(zip(row, widths))))


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="check_dataset.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", metavar="ROOT", help="dataset root (train/, val/) or one split folder")
    p.add_argument("--split", choices=("train", "val"), help="check only this split of ROOT")
    p.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                   help="decoding processes (default: the CPU count, %(default)s)")
    p.add_argument("--min-size", type=int, default=32, metavar="PX",
                   help="report images whose shorter side is below PX (default: %(default)s)")
    p.add_argument("--exclude-tiny", action="store_true",
                   help="also put tiny images into the exclusion list")
    p.add_argument("--write-exclude", metavar="FILE", help="write the exclusion list here "
                   "(replaces only a list this script wrote; see --force)")
    p.add_argument("--force", action="store_true",
                   help="let --write-exclude replace a file this script did not write")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON here (an "
                   "existing file is overwritten)")
    p.add_argument("--show", type=int, default=20, metavar="N",
                   help="files listed per category (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="show tracebacks of errors")
    a = p.parse_args(argv)
    if a.workers < 1 or a.min_size < 0:
        raise CspxError("--workers must be >= 1 and --min-size >= 0")
    root = os.path.abspath(os.path.expanduser(a.root))
    if a.write_exclude:  # before the long decode pass: refuse early, touch nothing
        check_writable(a.write_exclude, "--write-exclude", a.force, scan.is_written_exclude_file)
    splits = find_splits(root, a.split or "")
    report = {"root": root, "min_size": a.min_size, "exclude_tiny": a.exclude_tiny, "splits": {}}
    for name, folder in splits.items():
        report["splits"][name] = check_split(name, folder, a.workers, a.min_size)
    if not any(r["images"] for r in report["splits"].values()):
        raise CspxError(f"{root}: no images found (looked for {', '.join(IMG_EXTENSIONS)})")
    bad = excluded(report, a.exclude_tiny)
    report["excluded"] = len(bad)
    try:
        if a.write_exclude:
            scan.write_exclude_file(a.write_exclude, bad, header=(
                f"files under {root} that no decoder should see, from scripts/check_dataset.py\n"
                f"paths are relative to the split folder ({', '.join(splits)}); "
                f"recipes point here with data.exclude"))
            report["exclude_file"] = os.path.abspath(a.write_exclude)
        if a.json:
            atomic_write(a.json, json.dumps(report, indent=1))
    except OSError as e:
        raise CspxError(f"{e.filename}: cannot write ({e.strerror or e})") from e
    print_report(report, a.show)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
