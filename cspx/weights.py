"""Weights files, at setup (model.init_from) and in validate.py and export: read any file the
project meets, safely, and load it into a model.

Accepted files (all read with `torch.load(weights_only=True)`, which refuses pickled code):
  * cspx training checkpoints: {"format": "cspx-checkpoint", "model": ..., "ema": ... or None}
  * plain state_dicts, e.g. timm's released `cspresnext50_ra_224-648b4713.pth`
  * dicts holding the weights under "state_dict", "model", "state_dict_ema" or "model_ema"
    (timm and most training scripts)

Keys lose any leading `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) prefixes.
Every file's checksums are verified before it is read (cspx.checkpoint.integrity: the CRC32 of
every zip member), so a corrupted file is refused instead of loaded. Every failure (missing,
unreadable, truncated or corrupted file; weights of another architecture) is a CspxError whose
one-line message starts with the file name.
"""
from __future__ import annotations

import logging
import os
import re
import zipfile
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from cspx.checkpoint import FORMAT, FORMAT_VERSION, verify
from cspx.errors import CspxError

if TYPE_CHECKING:
    from cspx.models import CspNet

log = logging.getLogger("cspx")

PREFIXES = ("module.", "_orig_mod.")
CLASSIFIER = "head.fc."       # the classifier's key prefix in every cspx model
WRAPPER_KEYS = ("state_dict", "model")
EMA_KEYS = ("state_dict_ema", "model_ema")
SHOW = 3                      # keys named per category in a mismatch message


class LoadInfo(dict):
    """Where the weights came from. Keys:
    path; kind: "cspx" (training checkpoint), "plain" (a bare state_dict) or the dict key the
    weights were under ("state_dict", "model", "state_dict_ema", "model_ema"); ema: EMA weights
    were used; model_name: architecture recorded in a cspx checkpoint (else None); num_classes:
    rows of the checkpoint's classifier (else None); classes: the class list (label k -> wnid) a
    cspx checkpoint records (else None); seed: its run's seed (else None); val_split: the split
    its run held out of the training images, {fraction, seed, images, fingerprint} (else None);
    dropped: checkpoint keys not loaded;
    missing / unexpected: keys tolerated by a non-strict load; notes: human-readable remarks."""

    def __str__(self) -> str:
        parts = [f"{self['kind']}{' EMA' if self['ema'] else ''} weights"]
        return "; ".join(parts + list(self.get("notes", [])))


def _diagnose(path: str, head: bytes, err: Exception) -> str:
    """Turn torch.load's exception into what is wrong with the file."""
    msg = str(err)
    first = msg.strip().splitlines()[0][:120] if msg.strip() else ""
    if head.startswith(b"PK\x03\x04"):          # zip: torch's format since 1.6
        if not zipfile.is_zipfile(path):        # the central directory sits at the end
            return "truncated or corrupt checkpoint (incomplete zip archive)"
    elif head[:1] == b"\x80":                   # pickle protocol byte: torch's legacy format
        if isinstance(err, EOFError) or "EOF" in msg or "truncated" in msg:
            return "truncated or corrupt checkpoint (data ends early)"
    else:
        return "not a PyTorch checkpoint (neither a zip archive nor a pickle)"
    if "Weights only load failed" in msg:
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        what = f"a Python object ({found.group(1)})" if found else "pickled Python objects"
        return (f"holds {what} that a weights-only load refuses; save the state_dict "
                "(tensors only) instead")
    return f"unreadable checkpoint ({type(err).__name__}: {first})"


def _read(path: str) -> Any:
    if not os.path.exists(path):
        raise CspxError(f"{path}: weights file not found")
    if os.path.isdir(path):
        raise CspxError(f"{path}: is a directory, not a weights file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CspxError(f"{path}: cannot read ({e.strerror or e})") from None
    if not head:
        raise CspxError(f"{path}: empty file, not a checkpoint")
    note = verify(path)  # every member's CRC32; a corrupted file stops here, named
    if note:
        log.info(f"{path}: {note}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line naming the file
        raise CspxError(f"{path}: {_diagnose(path, head, e)}") from None


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _as_state_dict(path: str, obj: Any, where: str) -> Dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj:
        raise CspxError(f"{path}: {where} holds no weights ({type(obj).__name__}"
                        f"{', empty' if isinstance(obj, dict) else ''})")
    out: Dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CspxError(f"{path}: {where} is not a state_dict ({k!r} holds a "
                            f"{type(v).__name__}, not a tensor)")
        key = _strip(k)
        if key in out:
            raise CspxError(f"{path}: {where} has {key!r} twice once prefixes are removed")
        out[key] = v
    return out


def _is_weights(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor)
                                                       for v in obj.values())


def load_weights(path: str, prefer_ema: bool = False) -> Tuple[Dict[str, torch.Tensor], LoadInfo]:
    """(state_dict on the CPU with prefixes removed, LoadInfo). With `prefer_ema`, EMA weights
    are used when the file has them; otherwise the model weights, with a note and a warning."""
    path = os.fspath(path)
    obj = _read(path)
    if not isinstance(obj, dict):
        raise CspxError(f"{path}: holds a {type(obj).__name__}, not model weights")
    info = LoadInfo(path=path, kind="plain", ema=False, model_name=None, num_classes=None,
                    classes=None, seed=None, val_split=None, dropped=[], missing=[],
                    unexpected=[], notes=[])
    if obj.get("format") == FORMAT:
        if obj.get("format_version", 0) > FORMAT_VERSION:
            raise CspxError(f"{path}: written by a newer cspx (format {obj['format_version']})")
        classes = obj.get("classes")
        if not (isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes)):
            classes = None
        config, held = obj.get("config"), obj.get("val_split")
        seed = config.get("seed") if isinstance(config, dict) else None
        info.update(kind="cspx", model_name=obj.get("model_name"),
                    classes=list(classes) if classes else None,
                    seed=seed if isinstance(seed, int) else None,
                    val_split=held if isinstance(held, dict) else None)
        use_ema = prefer_ema and obj.get("ema") is not None
        key = "ema" if use_ema else "model"
        if prefer_ema and not use_ema:
            info["notes"].append("no EMA weights in the checkpoint, used the model weights")
        state = _as_state_dict(path, obj.get(key), f"checkpoint[{key!r}]")
        info["ema"] = use_ema
    elif _is_weights(obj):
        state = _as_state_dict(path, obj, "file")
    else:
        regular = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)]
        ema = [k for k in EMA_KEYS if isinstance(obj.get(k), dict)]
        if not regular and not ema:
            shown = ", ".join(map(str, list(obj)[:8]))
            raise CspxError(f"{path}: no model weights found (top-level keys: {shown})")
        if prefer_ema and not ema:
            info["notes"].append("no EMA weights in the checkpoint, used the model weights")
        key = ema[0] if ema and (prefer_ema or not regular) else regular[0]
        state = _as_state_dict(path, obj[key], f"checkpoint[{key!r}]")
        info.update(kind=key, ema=key in EMA_KEYS)
    fc = state.get(CLASSIFIER + "weight")
    if fc is not None and fc.ndim == 2:
        info["num_classes"] = int(fc.shape[0])
    for note in info["notes"]:
        log.warning(f"{path}: {note}")
    return state, info


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (`_orig_mod`) and DDP/DataParallel (`module`)."""
    while True:
        orig = getattr(model, "_orig_mod", None)
        if isinstance(orig, nn.Module):
            model = orig
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _listing(keys: List[str]) -> str:
    return ", ".join(keys[:SHOW]) + (", ..." if len(keys) > SHOW else "")


def load_into(model: nn.Module, path: str, prefer_ema: bool = False, strict: bool = True,
              drop_classifier_if_mismatch: bool = False,
              loaded: Optional[Tuple[Dict[str, torch.Tensor], LoadInfo]] = None) -> LoadInfo:
    """Load the weights in `path` into `model` (see load_weights for accepted files).

    strict: missing or unexpected keys are an error (shape mismatches always are).
    drop_classifier_if_mismatch: for fine-tuning with another class count, skip the checkpoint's
    `head.fc.*` when its shape differs from the model's and keep the model's own classifier.
    loaded: the result of load_weights(path, ...) when the caller has read the file already.
    """
    state, info = loaded if loaded is not None else load_weights(path, prefer_ema)
    target = _unwrap(model)
    own = target.state_dict()
    name = getattr(target, "model_name", "") or type(target).__name__
    if drop_classifier_if_mismatch:
        cls = [k for k in state if k.startswith(CLASSIFIER)]
        if any(k not in own or own[k].shape != state[k].shape for k in cls):
            own_fc = own.get(CLASSIFIER + "weight")
            model_n = int(own_fc.shape[0]) if own_fc is not None else 0
            info["dropped"] = sorted(cls)
            info["notes"].append(f"dropped classifier: checkpoint has {info['num_classes']} "
                                 f"classes, model has {model_n}")
            state = {k: v for k, v in state.items() if k not in cls}
    kept_own = {k for k in own if k.startswith(CLASSIFIER)} if info["dropped"] else set()
    # torch fills a missing BN step counter itself (checkpoints from before PyTorch 0.4.1)
    missing = [k for k in own if k not in state and k not in kept_own
               and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_listing(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_listing(unexpected)})")
        if mismatched:
            shown = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
                     for k in mismatched[:SHOW]]
            parts.append(f"{len(mismatched)} shape mismatches ({', '.join(shown)}"
                         f"{', ...' if len(mismatched) > SHOW else ''})")
        recorded = info.get("model_name")
        other = f" (checkpoint is {recorded})" if recorded and recorded != name else ""
        raise CspxError(f"{path}: does not match {name}{other}: {', '.join(parts)}")
    target.load_state_dict(state, strict=False)
    info.update(missing=missing, unexpected=unexpected)
    if missing or unexpected:
        info["notes"].append(f"non-strict load: {len(missing)} missing, "
                             f"{len(unexpected)} unexpected keys")
    return info


def build_model_from_checkpoint(path: str, model_name: Optional[str] = None, ema: bool = False,
                                flag: str = "--model") -> Tuple[CspNet, LoadInfo]:
    """The model a checkpoint describes, with its weights, in eval mode on the CPU.

    The architecture is `model_name`, else the one a cspx checkpoint records, else cspresnext50;
    the class count is the checkpoint classifier's. `info` gains "model_name" (resolved). An
    unknown name fails before a large file is read."""
    from cspx.models import create_model, model_config
    if model_name:
        try:
            model_config(model_name)
        except CspxError as e:
            raise CspxError(f"{flag}: {e}") from None
    loaded = load_weights(path, prefer_ema=ema)
    info = loaded[1]
    if ema and not info["ema"]:
        raise CspxError(f"{path}: --ema given but the checkpoint holds no EMA weights")
    name = model_name or info.get("model_name") or "cspresnext50"
    model = create_model(name, num_classes=info.get("num_classes") or 1000)
    load_into(model, path, prefer_ema=ema, loaded=loaded)
    info["model_name"] = name
    return model.eval(), info
