"""Export a checkpoint to ONNX, TorchScript or torch.export, and check each file against PyTorch.

Takes a cspx training checkpoint or a timm-format state_dict. Writes, for --out PREFIX:
  PREFIX.onnx             ONNX, opset 17, dynamic batch axis; input "input", output "logits"
  PREFIX.torchscript.pt   TorchScript (torch.jit.load)
  PREFIX.pt2              torch.export program (torch.export.load)
  PREFIX.json             the preprocessing the model expects, class count and class list, and
                          each file's verification result (also printed)

Every file is loaded back with its own runtime and run on random batches of 3 and 1 (and on
--image files); outputs must match the PyTorch model within 1e-4 or the exit code is 1. ONNX
export needs `onnx` and its check `onnxruntime`: pip install 'cspx[export]'. Without
onnxruntime the ONNX file is written and its check skipped, with a note.

Files the export would replace are refused unless they were written by an earlier export to the
same PREFIX (PREFIX.json lists them), or --force is given.

Examples:
  python scripts/export.py --checkpoint runs/cspresnext50_ra/checkpoints/best.pt --ema \\
      --out exported/cspresnext50
  python scripts/export.py --checkpoint cspresnext50_ra_224-648b4713.pth --format onnx \\
      --out cspresnext50
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from cspx.errors import CspxError, run_cli


def parse(argv):
    p = argparse.ArgumentParser(prog="export.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="cspx checkpoint or timm state_dict")
    p.add_argument("--model", help="architecture (default: the checkpoint's, else cspresnext50)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--format", default="all", metavar="{onnx,torchscript,export,all}",
                   help="default: all (ONNX only when the onnx package is installed)")
    p.add_argument("--img-size", type=int,
                   help="input height and width (default: the model's, 224 for cspresnext50)")
    p.add_argument("--crop-pct", type=float, help="center-crop fraction: resize to "
                   "floor(img-size / crop-pct) first (default: the model's, 0.875)")
    p.add_argument("--interpolation", help="bilinear, bicubic or nearest (default: the model's)")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="also compare outputs on this image (repeatable); prints its top-5")
    p.add_argument("--out", required=True, metavar="PREFIX", help="path prefix of the files")
    p.add_argument("--force", action="store_true",
                   help="replace existing files at PREFIX.* that an earlier export did not write")
    p.add_argument("--verbose", action="store_true", help="tracebacks for errors")
    return p.parse_args(argv)


def _summary(meta):
    """The JSON as printed: one line per value, the class list shortened (the file has it all)."""
    lines = []
    for key, value in meta.items():
        if key == "classes" and value and len(value) > 5:
            value = value[:3] + [f"... {len(value) - 3} more in the JSON file"]
        if isinstance(value, dict) and value:
            lines.append(f"{key}:")
            lines += [f"  {k}: {json.dumps(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines)


def _top5(model, x, classes):
    import torch
    with torch.no_grad():
        prob = model(x).softmax(1)
    top = prob.topk(min(5, prob.shape[1]), dim=1)
    for row_p, row_i in zip(top.values.tolist(), top.indices.tolist()):
        names = [classes[i] if classes and i < len(classes) else str(i) for i in row_i]
        yield ", ".join(f"{n} {p:.3f}" for n, p in zip(names, row_p))


def _written_by_export(json_path):
    """`owned(path)` for check_writable: the files an earlier export listed in PREFIX.json."""
    def owned(path):
        try:
            with open(json_path, "r", encoding="utf-8") as f:
                meta = json.load(f)
            listed = {a.get("file") for a in meta["artefacts"].values()}
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            return False
        return path == json_path or os.path.basename(path) in listed
    return owned


def main(argv):
    args = parse(argv)
    from cspx import export as ex
    from cspx.files import atomic_write, check_writable
    from cspx.models import eval_protocol
    formats = ex.validate_args(args.format, args.img_size, args.crop_pct, args.interpolation)
    for p in args.image:
        if not os.path.isfile(p):
            raise CspxError(f"{p}: image not found")
    prefix = ex.out_prefix(args.out)
    json_path = prefix + ".json"
    for path in [prefix + ex.SUFFIX[f] for f in formats] + [json_path]:
        check_writable(path, "--out", args.force, _written_by_export(json_path))
    model, name, details = ex.load_model(args.checkpoint, args.model, args.ema)
    protocol = eval_protocol(name, img_size=args.img_size, crop_pct=args.crop_pct,
                             interpolation=args.interpolation)
    args.img_size, args.crop_pct, args.interpolation = (protocol.img_size, protocol.crop_pct,
                                                        protocol.interpolation)
    folder = os.path.dirname(os.path.abspath(prefix))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise CspxError(f"--out: cannot create {folder} ({e.strerror or e})") from None
    meta = ex.describe(name, details, args.img_size, args.crop_pct, args.interpolation,
                       args.checkpoint)
    inputs = ex.check_inputs(args.img_size, args.crop_pct, args.interpolation, args.image)
    failed = []
    for fmt in formats:
        path = prefix + ex.SUFFIX[fmt]
        t = time.time()
        meta["artefacts"][fmt] = ex.export(fmt, model, args.img_size, path)
        result = ex.verify(fmt, path, model, inputs)
        meta["verification"][fmt] = result
        took = time.time() - t
        if "skipped" in result:
            ex.note(f"{fmt}: wrote {path} ({took:.1f} s); verification skipped: "
                    f"{result['skipped']}")
        elif result["ok"]:
            ex.note(f"{fmt}: wrote {path} ({took:.1f} s); matches PyTorch, max abs diff "
                    f"{result['max_abs_diff']:.2e} on batches {result['batches']}")
        else:
            failed.append(fmt)
            why = result.get("error") or (f"max abs diff {result['max_abs_diff']:.2e} > "
                                          f"{ex.TOLERANCE:g}")
            ex.note(f"{fmt}: wrote {path}, but it does not match PyTorch: {why}")
    atomic_write(json_path, json.dumps(meta, indent=2) + "\n")
    print(_summary(meta))
    if args.image:
        for p, line in zip(args.image, _top5(model, inputs[-1], details["classes"])):
            print(f"{p}: {line}")
    ex.note(f"preprocessing and verification written to {json_path}")
    if failed:
        print(f"error: {', '.join(failed)} output differs from PyTorch by more than "
              f"{ex.TOLERANCE:g}; the files are kept for inspection", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
