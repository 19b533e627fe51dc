"""Image files that would crash a decoder (empty, truncated, not an image), found at the start
of a run (quick scan) and by scripts/check_dataset.py (full decode).

Two depths share one report format, a dict {relative path: reason}:
- `quick_check` reads the first and last bytes of a file (no decode). It runs before every
  training run (results cached by the index) and is what keeps DALI, which cannot skip a file at
  run time, from dying on a bad JPEG days into a run.
- `deep_check` decodes the whole image with PIL. `scripts/check_dataset.py` runs it over a dataset
  with several processes and writes the exclusion list that the loaders read (`data.exclude`).
  `check_bytes` is the same check of an image held in memory (scripts/make_shards.py).
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from cspx.errors import CspxError
from cspx.files import atomic_write

JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
PNG_SIG = b"\x89PNG\r\n\x1a\n"
# A JPEG's EOI marker can be followed by padding or vendor bytes; a truncated file has no EOI near
# its end at all (inside entropy-coded data 0xFF is always byte-stuffed, so FF D9 is a real marker).
TAIL_BYTES = 4096

OTHER_SIGNATURES = (b"GIF87a", b"GIF89a", b"BM", b"RIFF")  # decodable by PIL, unusual in ImageNet


def sniff_format(head: bytes) -> Optional[str]:
    """'jpeg', 'png', 'other' (GIF/BMP/WebP) or None from a file's first bytes."""
    if head.startswith(JPEG_SOI):
        return "jpeg"
    if head.startswith(PNG_SIG):
        return "png"
    if any(head.startswith(s) for s in OTHER_SIGNATURES):
        return "other"
    return None


def _verdict(size: int, head: bytes, tail: bytes) -> Optional[str]:
    """quick_check's rule from a file's size, first 16 and last TAIL_BYTES bytes."""
    if size == 0:
        return "empty file"
    fmt = sniff_format(head)
    if fmt is None:
        return "not an image (unknown signature)"
    if fmt == "jpeg" and JPEG_EOI not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if fmt == "png" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def quick_check(path: str) -> Optional[str]:
    """None if the file looks like a complete image, else a short reason."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            head = f.read(16)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read(TAIL_BYTES)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return _verdict(size, head, tail)


def _decode(source, info: Dict[str, object]) -> Dict[str, object]:
    """Decode `source` (a path or a binary file object) fully with PIL, filling `info`."""
    from PIL import Image

    try:
        with Image.open(source) as im:
            info.update(format=im.format, mode=im.mode, width=im.width, height=im.height)
            im.load()  # raises on truncated or corrupt data (LOAD_TRUNCATED_IMAGES stays False)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        info["reason"] = f"decode failed ({type(e).__name__}: {e})"
    return info


def deep_check(path: str) -> Dict[str, object]:
    """Decode fully with PIL. Returns {'reason': str|None, 'format', 'mode', 'width', 'height'}."""
    info: Dict[str, object] = {"reason": quick_check(path), "format": None, "mode": None,
                               "width": 0, "height": 0}
    return info if info["reason"] is not None else _decode(path, info)


def check_bytes(data: bytes) -> Optional[str]:
    """deep_check of an image held in memory (a tar member, a shard sample): None if it is
    complete and decodes, else the reason, in the words quick_check and deep_check use."""
    reason = _verdict(len(data), data[:16], data[-TAIL_BYTES:])
    if reason is not None:
        return reason
    decoded = _decode(io.BytesIO(data), {"reason": None})["reason"]
    return None if decoded is None else str(decoded)


def _quick(args: Tuple[str, str]) -> Tuple[str, Optional[str]]:
    root, rel = args
    return rel, quick_check(os.path.join(root, rel))


def _deep(args: Tuple[str, str]) -> Tuple[str, Dict[str, object]]:
    root, rel = args
    return rel, deep_check(os.path.join(root, rel))


def scan_files(root: str, files: Sequence[str], deep: bool = False, workers: int = 8,
               progress: Optional[Callable[[int], object]] = None) -> Dict[str, Any]:
    """Check every file under `root`. Returns {rel: reason} (quick) or {rel: deep_check info}
    (deep).

    Quick checks are I/O bound and use threads; deep checks decode and use processes.
    `progress(n)` is called with the number of files finished since the last call.
    """
    jobs = [(root, rel) for rel in files]
    out: Dict[str, Any] = {}
    pool_cls = ProcessPoolExecutor if deep else ThreadPoolExecutor
    fn = _deep if deep else _quick
    workers = max(1, workers)
    if workers == 1:
        results: Iterable = map(fn, jobs)
        for rel, res in results:
            out[rel] = res
            if progress:
                progress(1)
        return out
    with pool_cls(max_workers=workers) as pool:
        for rel, res in pool.map(fn, jobs, chunksize=64):
            out[rel] = res
            if progress:
                progress(1)
    return out


def read_exclude_file(path: str) -> Dict[str, str]:
    """Read an exclusion list: one `relative/path<TAB>reason` per line, `#` starts a comment."""
    out: Dict[str, str] = {}
    try:
        with open(path, "r", encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                rel, _, reason = line.partition("\t")
                out[rel.strip()] = reason.strip() or "listed in exclusion file"
    except OSError as e:
        raise CspxError(f"{path}: cannot read exclusion list ({e.strerror or e})") from None
    return out


EXCLUDE_SIGNATURE = "# written by scripts/check_dataset.py"


def write_exclude_file(path: str, bad: Dict[str, str], header: str = "") -> None:
    """Write an exclusion list atomically. Its first line is EXCLUDE_SIGNATURE, by which a later
    run recognises a list it may replace (a hand-made list is never overwritten)."""
    lines = [EXCLUDE_SIGNATURE + "\n"] + [f"# {h}\n" for h in header.splitlines()]
    atomic_write(path, "".join(lines + [f"{rel}\t{bad[rel]}\n" for rel in sorted(bad)]))


def is_written_exclude_file(path: str) -> bool:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return f.readline().rstrip("\n") == EXCLUDE_SIGNATURE
    except (OSError, UnicodeDecodeError):
        return False


def summarize(bad: Dict[str, str], limit: int = 5) -> str:
    """'3 files: a.JPEG (empty file), b.JPEG (...), ...' for one-line warnings."""
    items: List[str] = [f"{rel} ({reason})" for rel, reason in sorted(bad.items())[:limit]]
    more = f", and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"{len(bad)} file{'s' if len(bad) != 1 else ''}: " + ", ".join(items) + more
