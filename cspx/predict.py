"""What predict.py runs: a checkpoint (cspx's or timm's) classifying images that have no labels,
with one output row per image: its top-k classes, their names and probabilities.

The model is set up as validate.py sets it up: its evaluation protocol from
cspx.models.eval_protocol (the model's preset, with --img-size, --crop-pct and --interpolation in
its place), its device and memory format from cspx.placement. The images go through the
evaluation loaders validate.py uses (cspx.data.build's build_eval_loader, torch or DALI), so
preprocessing and throughput are validate.py's. Under torchrun each rank classifies its share
of every source (cspx.data.inputs) by the evaluation loaders' rule (loader.contiguous_share), and
rank 0 gathers and writes the rows, in the order of the arguments: every image is classified
once.

Files that cannot be classified get a row with the reason in `error` and never stop the run:
missing, empty, truncated or not images (the index's quick scan, before loading), or failing to
decode (the torch loader skips them). DALI cannot skip an image: when it stops at one, the images
not yet classified are decoded with PIL to find the undecodable ones, and DALI starts again
without them; if PIL decodes all of them, the rest go through the torch loader, with a warning.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

import numpy as np
import torch
from tqdm import tqdm

from cspx import distributed, precision
from cspx.data import scan
from cspx.data.build import build_eval_loader
from cspx.data.class_names import class_names
from cspx.data.index import FolderSplit
from cspx.data.inputs import Source, collect, rank_share
from cspx.distributed import DistEnv
from cspx.errors import CspxError
from cspx.files import check_writable
from cspx.models import CspNet, EvalPreset, eval_protocol
from cspx.placement import place_model
from cspx.predict_output import is_predictions_file, write_predictions
from cspx.resolve import resolve_loader
from cspx.runlog import setup_console
from cspx.weights import LoadInfo, build_model_from_checkpoint

log = logging.getLogger("cspx")
Row = Tuple[int, str, str, List[int], List[float]]  # (row, path, error, top indices, top probs)


def run(args: Namespace) -> int:
    """Exit status: 0 when every image was classified, 1 when some could not be."""
    env = distributed.init(args.device)
    try:
        return _run(args, env)
    finally:
        distributed.destroy()


def _run(args: Namespace, env: DistEnv) -> int:
    setup_console(env.is_main, args.verbose)
    if args.out:  # before any work; every rank checks, so all stop together
        check_writable(args.out, "--out", args.force, is_predictions_file)
    precision.configure_backends(env.device, tf32=False)
    sources = collect(args.paths)
    model, info, protocol = placed_model(args, env)
    num_outputs = int(model.num_classes)
    ids, names = class_names(num_outputs, info.get("classes"), args.classes)
    k = min(args.topk, num_outputs)
    kind = resolve_loader(args.loader, env.device)
    mine = [rank_share(s, env.rank, env.world) for s in sources]
    bar = tqdm(total=sum(len(s.split) for s in mine), unit="img", disable=not env.is_main,
               dynamic_ncols=True)
    rows: List[Row] = []
    seconds = 0.0
    classify = Classifier(model, protocol, args, k, bar, dataclasses.replace(env, rank=0, world=1))
    for src in mine:
        if len(src.split):
            got, t = classify(src, kind)
            rows += got
            seconds += t
    bar.close()
    parts = distributed.all_gather_objects((rows, seconds), env)
    rows = sorted(r for part, _ in parts for r in part)
    seconds = max(t for _, t in parts)
    failed = sum(1 for r in rows if r[2])
    done = len(rows) - failed
    settings = {"checkpoint": args.checkpoint, "model": info["model_name"],
                "img_size": protocol.img_size, "crop_pct": protocol.crop_pct,
                "interpolation": protocol.interpolation, "loader": kind,
                "precision": args.precision, "tta": args.tta, "topk": k,
                "batch_size": args.batch_size, "device": str(env.device), "world_size": env.world}
    if env.is_main:
        write_predictions(args.out, rows, ids, names, k, settings)
        log.info(f"{done} images classified, {failed} failed, {done / max(seconds, 1e-9):.1f} "
                 f"img/s" + (f"; rows written to {args.out}" if args.out else ""))
    # under torchrun only rank 0 reports the failures (torchrun's status is then rank 0's): a
    # rank exiting 1 first would make torchrun stop the others before rank 0 has written
    return 1 if failed and env.is_main else 0


def placed_model(args: Namespace, env: DistEnv) -> Tuple[CspNet, LoadInfo, EvalPreset]:
    """(model on its device in eval mode, LoadInfo, evaluation protocol): the checkpoint's
    model and its protocol with the flags' overrides, through the helpers validate.py uses."""
    model, info = build_model_from_checkpoint(args.checkpoint, args.model, args.ema)
    protocol = eval_protocol(info["model_name"], img_size=args.img_size, crop_pct=args.crop_pct,
                             interpolation=args.interpolation)
    place_model(model, device=env.device, channels_last=args.channels_last)
    return model.eval(), info, protocol


class Classifier:
    """Classifies a source on this rank alone: rows and the seconds its loader passes took."""

    def __init__(self, model: torch.nn.Module, protocol: EvalPreset, args: Namespace,
                 k: int, bar, local: DistEnv):
        self.model, self.protocol, self.args, self.k, self.bar = model, protocol, args, k, bar
        self.local = local  # one rank: the source is this rank's share already
        self.workers = max(4, args.workers)

    def __call__(self, src: Source, kind: str) -> Tuple[List[Row], float]:
        rows: List[Row] = []
        todo = np.arange(len(src.split))
        if isinstance(src.split, FolderSplit):  # missing, empty, truncated: not worth loading
            bad = self._quick_scan(src, src.split)
            rows += [(int(src.rows[i]), src.path(i), reason, [], []) for i, reason in bad]
            self.bar.update(len(bad))
            todo = np.setdiff1d(todo, [i for i, _ in bad])
        seconds = 0.0
        while len(todo):
            part = src.select(todo)
            done, top, prob, ok, t, stopped = self._pass(part.split, kind)
            seconds += t
            for j, good, ti, tp in zip(done.tolist(), ok.tolist(), top.tolist(), prob.tolist()):
                error = "" if good else _reason(part.split, j) or "decode failed in the loader"
                rows.append((int(part.rows[j]), part.path(j), error, ti if good else [],
                             tp if good else []))
            if not stopped:
                break
            todo = np.setdiff1d(todo, todo[done])
            bad = self._deep_scan(src, todo)
            rows += [(int(src.rows[i]), src.path(i), reason, [], []) for i, reason in bad]
            self.bar.update(len(bad))
            todo = np.setdiff1d(todo, [i for i, _ in bad])
            if not bad:
                log.warning(f"DALI failed to decode an image among {len(todo)} that PIL decodes; "
                            f"they are classified with the torch loader (PIL)")
                kind = "torch"
        return rows, seconds

    def _quick_scan(self, src: Source, split: FolderSplit) -> List[Tuple[int, str]]:
        verdicts = scan.scan_files(split.root, split.files, workers=self.workers)
        bad = [(i, verdicts[f]) for i, f in enumerate(split.files) if verdicts[f] is not None]
        if bad:
            log.warning(f"skipping {scan.summarize({src.path(i): r for i, r in bad})}")
        return bad

    def _deep_scan(self, src: Source, todo: np.ndarray) -> List[Tuple[int, str]]:
        """Which of `todo` PIL cannot decode either (after DALI stopped at one of them)."""
        with ThreadPoolExecutor(self.workers) as pool:
            reasons = list(pool.map(lambda i: _reason(src.split, int(i)), todo.tolist()))
        bad = [(int(i), r) for i, r in zip(todo.tolist(), reasons) if r]
        if bad:
            log.warning(f"DALI cannot skip an image; skipping "
                        f"{scan.summarize({src.path(i): r for i, r in bad})}")
        return bad

    @torch.no_grad()
    def _pass(self, split, kind: str):
        """One loader pass over `split`: (indices classified, top-k indices, top-k
        probabilities, decoded (bool), seconds, whether DALI stopped at an undecodable
        image). The results stay on the device until the pass ends: no host sync per batch."""
        a, dev = self.args, self.local.device
        p = self.protocol
        loader = build_eval_loader(kind=kind, split=split, img_size=p.img_size,
                                   crop_pct=p.crop_pct, interpolation=p.interpolation,
                                   batch_size=a.batch_size, env=self.local, workers=a.workers,
                                   channels_last=a.channels_last)
        out: Dict[str, List[torch.Tensor]] = {"idx": [], "top": [], "prob": [], "ok": []}
        stopped = False
        start = time.perf_counter()
        try:
            for images, labels, indices in loader:
                probs = self._probs(images, dev)
                top = probs.topk(self.k, dim=1)
                for key, v in zip(out, (indices, top.indices, top.values, labels >= 0)):
                    out[key].append(v)
                self.bar.update(int(images.shape[0]))
        except CspxError:
            if kind != "dali":
                raise
            stopped = True  # DALI met an image it cannot decode (module docstring)
        finally:
            loader.close()
        seconds = time.perf_counter() - start
        cat = {key: (torch.cat([t.cpu() for t in v]).numpy() if v else np.zeros((0,)))
               for key, v in out.items()}
        return (cat["idx"].astype(np.int64), cat["top"].reshape(-1, self.k),
                cat["prob"].reshape(-1, self.k), cat["ok"].astype(bool), seconds, stopped)

    def _probs(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Softmax of the model's logits (N, classes), float32; with --tta flip, the mean of
        the softmax of the image and of its horizontal mirror."""
        with precision.autocast(self.args.precision, device):
            probs = self.model(images).float().softmax(dim=1)
            if self.args.tta == "flip":
                probs = (probs + self.model(images.flip(3)).float().softmax(dim=1)) / 2
        return probs


def _reason(split, i: int) -> str:
    """Why sample i cannot be classified ('' when PIL decodes it after all)."""
    try:
        data = split.read(i)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return scan.check_bytes(data) or ""
