"""After training, scripts/export.py's work: a trained model exported to ONNX, TorchScript or
torch.export, each file checked against PyTorch,
and describe the preprocessing the exported model expects.

Exporters, chosen to behave the same on torch 2.4 through 2.14:
  * onnx: `torch.onnx.export` with the TorchScript-based exporter (`dynamo=False` where the
    argument exists; before torch 2.5 it is the only exporter), opset 17, batch axis dynamic.
    It needs the `onnx` package but not `onnxscript`, which torch 2.9+'s default dynamo-based
    exporter requires. torch 2.9+ marks this exporter as deprecated; it is still present in 2.14.
  * torchscript: `torch.jit.trace` (the forward has no data-dependent control flow), saved with
    `torch.jit.save`; any batch size runs. torch 2.14 marks TorchScript as deprecated.
  * export: `torch.export.export` with a dynamic batch `Dim` (min 1), saved with
    `torch.export.save` as a .pt2 file.

Each file is read back by its own loader (onnxruntime, torch.jit.load, torch.export.load) and run
on batches of 3 and 1 (the trace used 2, so both prove the batch axis is free), plus any given
images; the largest difference from the PyTorch model must be at most TOLERANCE.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from cspx.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERP,
    eval_resize_size,
    eval_transform,
    load_rgb,
    mean_std,
    normalize_,
)
from cspx.errors import CspxError
from cspx.placement import place_model
from cspx.weights import build_model_from_checkpoint

FORMATS = ("onnx", "torchscript", "export")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "export": ".pt2"}
ONNX_OPSET = 17           # every exporter torch 2.4-2.14 ships supports it, as does onnxruntime
TOLERANCE = 1e-4          # max abs difference of the logits from the PyTorch model
INPUT, OUTPUT = "input", "logits"
TRACE_BATCH = 2           # not 0/1, which torch.export would specialise to a constant
CHECK_BATCHES = (3, 1)    # differ from TRACE_BATCH: a fixed batch axis fails here
INSTALL_HINT = "pip install 'cspx[export]'"


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def out_prefix(out: str) -> str:
    """`--out runs/m.onnx` means the prefix `runs/m`; the suffixes are added per format."""
    for suffix in sorted(list(SUFFIX.values()) + [".json", ".pt"], key=len, reverse=True):
        if out.endswith(suffix) and len(out) > len(suffix):
            return out[:-len(suffix)]
    return out


def load_model(checkpoint: str, model_name: Optional[str], ema: bool
               ) -> Tuple[nn.Module, str, Dict[str, Any]]:
    """(model in eval mode on the CPU in NCHW, the layout the exported files take; architecture
    name; details for the JSON)."""
    model, info = build_model_from_checkpoint(checkpoint, model_name, ema)
    place_model(model, device=torch.device("cpu"), channels_last=False)
    model.requires_grad_(False)
    return model, info["model_name"], {
        "num_classes": info["num_classes"] or 1000, "classes": info["classes"],
        "weights": "EMA" if info["ema"] else "model", "source": info["kind"]}


def preprocessing(img_size: int, crop_pct: float, interpolation: str) -> Dict[str, Any]:
    resize = eval_resize_size(img_size, crop_pct)
    return {
        "img_size": img_size, "crop_pct": crop_pct, "resize_shorter_side": resize,
        "interpolation": interpolation, "center_crop": [img_size, img_size],
        "channel_order": "RGB", "scale": "pixel / 255 -> [0, 1]",
        "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "steps": ["decode to RGB (grayscale, CMYK and palette images converted)",
                  f"resize the shorter side to {resize} px ({interpolation}, PIL), keeping the "
                  f"aspect ratio; {resize} = floor({img_size} / {crop_pct})",
                  f"center-crop {img_size} x {img_size}",
                  "divide by 255, subtract mean and divide by std, per channel (RGB)",
                  f"stack as float32 NCHW [batch, 3, {img_size}, {img_size}]"],
        "torchvision": (f"Resize({resize}, InterpolationMode.{interpolation.upper()}), "
                        f"CenterCrop({img_size}), ToTensor(), Normalize(mean, std)"),
    }


def _report(fmt: str, caught: Sequence[warnings.WarningMessage]) -> None:
    """An exporter's warnings as one-line notes: torch's first deprecation notice for the path
    used, and every other warning (a TracerWarning, say, can mean a shape was baked in)."""
    seen = set()
    deprecated = False
    for w in caught:
        first = str(w.message).strip().split("\n")[0]
        if issubclass(w.category, (DeprecationWarning, FutureWarning)):
            if not deprecated:
                note(f"note: {fmt}: torch {torch.__version__} says: {first.split('. ')[0]}")
            deprecated = True
        elif first not in seen:
            seen.add(first)
            note(f"warning: {fmt}: {w.category.__name__}: {first}")


def _onnx(model: nn.Module, x: torch.Tensor, path: str) -> Dict[str, Any]:
    if not has_module("onnx"):
        raise CspxError(f"ONNX export needs the onnx package; {INSTALL_HINT}")
    kw: Dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kw["dynamo"] = False  # torch 2.9+ defaults to the dynamo exporter (needs onnxscript)
    axes = {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}
    torch.onnx.export(model, (x,), path, input_names=[INPUT], output_names=[OUTPUT],
                      dynamic_axes=axes, opset_version=ONNX_OPSET, **kw)
    return {"opset": ONNX_OPSET, "exporter": "torch.onnx.export (TorchScript-based)"}


def _torchscript(model: nn.Module, x: torch.Tensor, path: str) -> Dict[str, Any]:
    # check_trace re-runs the model to compare; verify() below does that on other batch sizes
    traced = torch.jit.trace(model, (x,), check_trace=False)
    torch.jit.save(traced, path)
    return {"exporter": "torch.jit.trace"}


def _program(model: nn.Module, x: torch.Tensor, path: str) -> Dict[str, Any]:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return {"exporter": "torch.export.export"}


EXPORTERS = {"onnx": _onnx, "torchscript": _torchscript, "export": _program}


def export(fmt: str, model: nn.Module, img_size: int, path: str) -> Dict[str, Any]:
    x = torch.randn(TRACE_BATCH, 3, img_size, img_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            details = EXPORTERS[fmt](model, x, path)
        except CspxError:
            raise
        except Exception as e:  # noqa: BLE001 - an exporter bug, reported on one line
            raise RuntimeError(f"{fmt} export failed on torch {torch.__version__}: "
                               f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}") from e
    _report(fmt, caught)
    return {"file": os.path.basename(path), **details}


def runner(fmt: str, path: str):
    """A function tensor -> tensor running the file through its own loader, or None when the
    loader is missing (onnxruntime is optional)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14: torch.jit.load deprecated
        if fmt == "onnx":
            if not has_module("onnxruntime"):
                return None
            import onnxruntime as ort
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            return lambda x: torch.from_numpy(session.run(None, {INPUT: x.numpy()})[0])
        if fmt == "torchscript":
            module = torch.jit.load(path, map_location="cpu")
        else:
            module = torch.export.load(path).module()
    return lambda x: module(x)


def check_inputs(img_size: int, crop_pct: float, interpolation: str,
                 images: Sequence[str]) -> List[torch.Tensor]:
    """Seeded random batches of CHECK_BATCHES sizes, then the given images as one batch."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, img_size, img_size, generator=gen) for n in CHECK_BATCHES]
    if images:
        tf = eval_transform(img_size, crop_pct, interpolation)
        mean, std = mean_std(torch.device("cpu"))
        raw = []
        for p in images:
            try:
                raw.append(tf(load_rgb(p)))
            except (OSError, ValueError) as e:
                raise CspxError(f"{p}: cannot read image ({e})") from None
        batches.append(normalize_(torch.stack(raw), mean, std))
    return batches


def verify(fmt: str, path: str, model: nn.Module, inputs: Sequence[torch.Tensor]
           ) -> Dict[str, Any]:
    run = runner(fmt, path)
    if run is None:
        return {"skipped": f"onnxruntime is not installed ({INSTALL_HINT})"}
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            ref, got = model(x), run(x)
            if tuple(got.shape) != tuple(ref.shape):
                return {"ok": False, "error": f"output shape {list(got.shape)} for input "
                                              f"{list(x.shape)}, expected {list(ref.shape)}"}
            worst = max(worst, (got.float() - ref).abs().max().item())
    return {"ok": worst <= TOLERANCE, "max_abs_diff": worst, "tolerance": TOLERANCE,
            "batches": [int(x.shape[0]) for x in inputs]}


def describe(name: str, details: Dict[str, Any], img_size: int, crop_pct: float,
             interpolation: str, checkpoint: str) -> Dict[str, Any]:
    """The sidecar JSON: what goes in, what comes out, and how an image becomes the input."""
    n = details["num_classes"]
    return {
        "model": name, "checkpoint": os.path.abspath(checkpoint),
        "weights": details["weights"], "torch": torch.__version__,
        "input": {"name": INPUT, "shape": ["batch", 3, img_size, img_size], "dtype": "float32",
                  "layout": "NCHW", "channel_order": "RGB"},
        "output": {"name": OUTPUT, "shape": ["batch", n], "dtype": "float32",
                   "meaning": "class logits; softmax over dim 1 gives probabilities"},
        "preprocessing": preprocessing(img_size, crop_pct, interpolation),
        "num_classes": n, "classes": details["classes"],
        "artefacts": {}, "verification": {},
    }


def validate_args(fmt: str, img_size: Optional[int], crop_pct: Optional[float],
                  interpolation: Optional[str]) -> List[str]:
    """The formats to write; bad values are CspxErrors (one line, exit 2). None: the model's."""
    if fmt not in FORMATS + ("all",):
        raise CspxError(f"--format: unknown format {fmt!r}; choose from "
                        f"{', '.join(FORMATS + ('all',))}")
    if img_size is not None and img_size < 32:
        raise CspxError(f"--img-size: {img_size} px is below the model's minimum of 32")
    if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
        raise CspxError(f"--crop-pct: {crop_pct} is not in (0, 1]")
    if interpolation is not None and interpolation not in INTERP:
        raise CspxError(f"--interpolation: unknown {interpolation!r}; choose from "
                        f"{', '.join(INTERP)}")
    if fmt != "all":
        return [fmt]
    if has_module("onnx"):
        return list(FORMATS)
    note(f"note: onnx: skipped, the onnx package is not installed ({INSTALL_HINT})")
    return [f for f in FORMATS if f != "onnx"]
