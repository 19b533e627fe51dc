"""predict.py's output: one row per image, as CSV (on stdout, or `--out FILE.csv`) or JSON
(`--out FILE.json`), and how a file predict.py wrote is recognised.

CSV columns, in this order: path, error, class_1..class_K, name_1..name_K, prob_1..prob_K.
`error` is empty for an image classified; for one that could not be, it holds the reason and the
class, name and probability columns are empty. class_k is the class id (a wnid, a class folder,
or the output index), name_k its human-readable name, prob_k its softmax probability (6
significant digits), best first.

JSON: {"format": "cspx-predictions", "version": 1, "settings": {...}, "images": N,
"failed": M, "predictions": [{the same fields per image}]}, with null where CSV is empty and
probabilities as floats.

`--out` replaces only a file predict.py wrote (a CSV with exactly this header, a JSON starting
with its format tag), or any file with `--force` (cspx.files.check_writable).
"""
from __future__ import annotations

import csv
import io
import json
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

from cspx.files import atomic_write

FORMAT = "cspx-predictions"
VERSION = 1
JSON_HEAD = re.compile(r'^\{\s*"format":\s*"' + FORMAT + '"')
FIRST_LINE_BYTES = 1 << 20   # header of up to about 40,000 classes


def header(k: int) -> List[str]:
    return (["path", "error"] + [f"class_{j}" for j in range(1, k + 1)]
            + [f"name_{j}" for j in range(1, k + 1)] + [f"prob_{j}" for j in range(1, k + 1)])


def records(rows: Sequence[tuple], ids: Sequence[str], names: Sequence[str],
            k: int) -> List[Dict[str, Any]]:
    """One dict per row (row, path, error, top indices, top probabilities), header(k)'s keys."""
    out = []
    for _, path, error, top, prob in rows:
        rec: Dict[str, Any] = {"path": path, "error": error or None}
        for j in range(k):
            rec[f"class_{j + 1}"] = ids[top[j]] if top else None
        for j in range(k):
            rec[f"name_{j + 1}"] = names[top[j]] if top else None
        for j in range(k):
            rec[f"prob_{j + 1}"] = float(prob[j]) if top else None
        out.append(rec)
    return out


def to_csv(recs: List[Dict[str, Any]], k: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header(k))
    for rec in recs:
        w.writerow(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v
                    for v in rec.values()])
    return buf.getvalue()


def to_json(recs: List[Dict[str, Any]], settings: Dict[str, Any]) -> str:
    failed = sum(1 for r in recs if r["error"])
    doc = {"format": FORMAT, "version": VERSION, "settings": settings, "images": len(recs),
           "failed": failed, "predictions": recs}
    return json.dumps(doc, indent=1) + "\n"


def write_predictions(out: Optional[str], rows: Sequence[tuple], ids: Sequence[str],
                      names: Sequence[str], k: int, settings: Dict[str, Any]) -> None:
    """The rows to `out` (.csv or .json, atomically), or as CSV on stdout when `out` is None."""
    recs = records(rows, ids, names, k)
    if out is None:
        sys.stdout.write(to_csv(recs, k))
        sys.stdout.flush()
        return
    atomic_write(out, to_json(recs, settings) if out.lower().endswith(".json")
                 else to_csv(recs, k))


def is_predictions_file(path: str) -> bool:
    """Whether predict.py wrote `path` (check_writable's `owned`): its JSON format tag, or a
    first line that is exactly predict.py's CSV header."""
    try:
        with open(path, "rb") as f:
            first = f.readline(FIRST_LINE_BYTES).decode("utf-8")
            if JSON_HEAD.match(first + f.read(256).decode("utf-8", "replace")):
                return True
    except (OSError, UnicodeDecodeError):
        return False
    cols = first.rstrip("\r\n").split(",")
    k = (len(cols) - 2) // 3
    return k >= 1 and cols == header(k)
