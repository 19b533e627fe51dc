"""Class names of a model's outputs, for predict.py: output k -> (class id, human-readable name).

Where the classes come from, first match wins:
  --classes FILE      line k: 'id [name ...]' (a synset list such as synsets.txt; the name is the
                      rest of the line, else as below)
  a cspx checkpoint   its training set's class list (the class folders, e.g. wnids)
  1000 outputs        ImageNet-1k (ILSVRC2012) in the standard order: timm's released weights
  anything else       the output index

A class id that is an ImageNet-1k wnid is named by its WordNet lemmas ('tench, Tinca tinca'),
from imagenet_classes.txt beside this module: 'wnid<TAB>lemmas', line k = class k. That file was
built from timm's timm/data/_info/imagenet_synsets.txt (the order) and
imagenet_synset_to_lemma.txt (the names), the descriptions timm's inference.py prints, and
checked against ILSVRC2012's synset order (tests/test_predict.py); read_classes_file reads it as
a synset list, so `--classes` of validate.py takes it too. Other ids name themselves.
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

from cspx.data.index import read_classes_file
from cspx.errors import CspxError

log = logging.getLogger("cspx")
IMAGENET_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.txt")
IMAGENET_CLASSES = 1000


@lru_cache(maxsize=1)
def imagenet_classes() -> Tuple[Tuple[str, ...], Dict[str, str]]:
    """(the 1000 wnids in class-index order, {wnid: lemmas})."""
    wnids, names = [], {}
    with open(IMAGENET_FILE, "r", encoding="utf-8") as f:
        for line in f:
            wnid, lemmas = line.rstrip("\n").split("\t", 1)
            wnids.append(wnid)
            names[wnid] = lemmas
    return tuple(wnids), names


def _named(ids: Sequence[str], given: Optional[Sequence[str]] = None) -> List[str]:
    lemmas = imagenet_classes()[1]
    given = given or [""] * len(ids)
    return [g or lemmas.get(i, i) for i, g in zip(ids, given)]


def _read_named_list(path: str) -> Tuple[List[str], List[str]]:
    """(ids, names given on their lines, '' where none) of a class list file."""
    ids = read_classes_file(path)  # its checks: readable, not empty, no repeats
    with open(path, "r", encoding="utf-8") as f:
        rest = [ln.split(None, 1)[1].strip() if len(ln.split(None, 1)) > 1 else ""
                for ln in f if ln.strip()]
    return ids, rest


def class_names(num_outputs: int, checkpoint_classes: Optional[Sequence[str]] = None,
                classes_file: Optional[str] = None,
                flag: str = "--classes") -> Tuple[List[str], List[str]]:
    """(ids, names), one per model output (module docstring)."""
    if classes_file:
        ids, given = _read_named_list(classes_file)
        if len(ids) != num_outputs:
            raise CspxError(f"{flag}: {classes_file} lists {len(ids)} classes, the model has "
                            f"{num_outputs} outputs")
        return ids, _named(ids, given)
    if checkpoint_classes:
        ids = list(checkpoint_classes)[:num_outputs]
        ids += [str(k) for k in range(len(ids), num_outputs)]  # outputs beyond the data's
        return ids, _named(ids)
    if num_outputs == IMAGENET_CLASSES:
        ids = list(imagenet_classes()[0])
        return ids, _named(ids)
    log.warning(f"the checkpoint names no classes and has {num_outputs} outputs (not "
                f"ImageNet's 1000): classes are output indices; {flag} FILE names them")
    ids = [str(k) for k in range(num_outputs)]
    return ids, list(ids)
