"""The Python side of scripts/gpu_check.sh: installing wheels offline, the DALI check, the sample
stand-in, and the test summary. Each subcommand prints what it found in one line or a few, and
exits non-zero when the check fails; the script runs every later step either way.

  python -m cspx.bench.check claim OUT            make OUT gpu_check's folder, or refuse (exit 2)
  python -m cspx.bench.check data DIR N [SAMPLE]  N generated JPEGs in DIR; the ImageNet sample's
                                                  stand-in in SAMPLE when given
  python -m cspx.bench.check wheels DIR TARGET    install DIR's wheels that are not installed
  python -m cspx.bench.check probe-wheel DIR      write a one-module wheel (for --rehearse)
  python -m cspx.bench.check preflight DEVICE ENV_FILE MODULE...
                                                  versions appended to ENV_FILE; each MODULE
                                                  imported (where from); then DALI imports, sees
                                                  DEVICE and decodes a JPEG there
  python -m cspx.bench.check junit XML MODE       pytest's results; MODE gpu: a skip is a failure,
                                                  rehearse: a skip is listed as GPU only
  python -m cspx.bench.check digest JSON...       one line per measured row, for summary.txt
"""
from __future__ import annotations

import base64
import glob
import hashlib
import importlib
import io
import os
import subprocess
import sys
import zipfile
from typing import List, Sequence

MARKER = ".cspx-gpu-check"  # in OUT: gpu_check made this folder and may write into it again
PROBE = "nvidia.cspx_rehearsal_probe"  # in the `nvidia` namespace, as DALI's wheel installs
NAMESPACE_INIT = "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"


def _installed(dist: str) -> bool:
    from importlib import metadata
    try:
        metadata.distribution(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def install_wheels(src: str, target: str) -> List[str]:
    """Install every wheel in `src` whose distribution is not installed yet into `target`, with
    pip (offline, no dependency resolution) or, without pip, by unpacking it (a wheel is a zip
    whose purelib/platlib files go to the target as they are). Returns the lines to print."""
    wheels = sorted(glob.glob(os.path.join(src, "*.whl")))
    if not wheels:
        raise SystemExit(f"install: no .whl files in {src}")
    todo = [w for w in wheels if not _installed(os.path.basename(w).split("-")[0])]
    lines = [f"install: {len(todo)} of {len(wheels)} wheels into {target} "
             f"({len(wheels) - len(todo)} already installed)"]
    if todo:
        os.makedirs(target, exist_ok=True)
        try:
            import pip  # noqa: F401
            subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                            "--no-cache-dir", "--disable-pip-version-check", "--no-compile",
                            "--upgrade", "--target", target, *todo], check=True)
        except ImportError:
            lines.append("install: pip is missing; unpacking the wheels")
            for w in todo:
                unpack_wheel(w, target)
    # `nvidia` is a namespace shared with the system's CUDA wheels, several of which ship an
    # __init__.py: a folder of it without one would be hidden by such a package unless that
    # one extends its path; this one extends ours (pkgutil), so both are found either way
    ns = os.path.join(target, "nvidia")
    if os.path.isdir(ns) and not os.path.isfile(os.path.join(ns, "__init__.py")):
        with open(os.path.join(ns, "__init__.py"), "w") as f:
            f.write(NAMESPACE_INIT)
    return lines + [f"  {os.path.basename(w)}" for w in todo]


def unpack_wheel(wheel: str, target: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: not needed to import
                parts = parts[2:]
            dest = os.path.join(target, *parts)
            if info.is_dir():
                os.makedirs(dest, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(info) as fi, open(dest, "wb") as fo:
                fo.write(fi.read())
            mode = info.external_attr >> 16
            if mode:
                os.chmod(dest, mode & 0o777)


def probe_wheel(folder: str) -> str:
    """A minimal valid wheel holding one module, PROBE, to rehearse the offline install."""
    name, version = "cspx_rehearsal_probe", "1.0"
    info = f"{name}-{version}.dist-info"
    files = {f"{PROBE.replace('.', '/')}/__init__.py": "WHO = 'cspx rehearsal probe'\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: cspx\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for p, text in files.items():
            z.writestr(p, text)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def imports(modules: Sequence[str]) -> List[str]:
    out = []
    for m in modules:
        mod = importlib.import_module(m)
        ver = getattr(mod, "__version__", None)
        # a namespace package has no __file__: its folders are its __path__
        where = (os.path.dirname(mod.__file__) if mod.__file__ else
                 ", ".join(getattr(mod, "__path__", [])))
        out.append(f"import {m}{' ' + ver if ver else ''}: from {where}")
    return out


def check_dali(device_name: str) -> str:
    """DALI imports (with its PyTorch plugin), can use `device_name` (cspx's own availability
    check, as the loaders run it), and decodes one generated JPEG there: nvJPEG on a GPU."""
    import numpy as np
    import torch
    from PIL import Image

    from cspx.data.dali_loader import dali_available
    device = torch.device(device_name)
    ok, why = dali_available(device)
    if not ok:
        raise SystemExit(f"DALI unavailable: {why}")
    import nvidia.dali as dali
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.types import DALIImageType
    buf = io.BytesIO()
    Image.new("RGB", (500, 375), (200, 120, 40)).save(buf, format="JPEG", quality=90)
    data = np.frombuffer(buf.getvalue(), dtype=np.uint8)
    gpu = device.type == "cuda"

    # device_id None: a CPU-only pipeline (DALI's documented value; its stub says int)
    @pipeline_def(batch_size=1, num_threads=1,
                  device_id=(device.index or 0) if gpu else None)  # type: ignore[arg-type]
    def pipe():
        jpegs = fn.external_source(source=lambda: [data], batch=True)
        return fn.decoders.image(jpegs, device="mixed" if gpu else "cpu",
                                 output_type=DALIImageType.RGB)

    p = pipe()
    p.build()
    out = p.run()[0]
    shape = tuple(out.as_cpu()[0].shape() if gpu else out[0].shape())
    if shape != (375, 500, 3):
        raise SystemExit(f"DALI unavailable: decoded shape {shape}, expected (375, 500, 3)")
    how = f"nvJPEG on {device}" if gpu else "the CPU decoder"
    return (f"DALI ok: nvidia-dali {dali.__version__} from {os.path.dirname(dali.__file__)}; "
            f"decoded a 500x375 JPEG with {how}")


def junit(path: str, mode: str) -> int:
    """Print pytest's results from its JUnit XML; returns 1 if anything failed (on a GPU
    machine, a skip under -m gpu is a failure: the test did not check what it is for)."""
    import xml.etree.ElementTree as ET
    cases = ET.parse(path).getroot().iter("testcase")
    passed, failed, skipped = [], [], []
    for c in cases:
        name = f"{c.get('classname', '').replace('.', '/')}.py::{c.get('name')}"
        bad = c.find("failure") if c.find("failure") is not None else c.find("error")
        skip = c.find("skipped")
        if bad is not None:
            failed.append(f"  FAILED: {name}: {(bad.get('message') or '').splitlines()[0][:200]}"
                          if bad.get("message") else f"  FAILED: {name}")
        elif skip is not None:
            why = (skip.get("message") or "").splitlines()[0][:200] if skip.get("message") else ""
            skipped.append((name, why))
        else:
            passed.append(name)
    gpu = mode == "gpu"
    print(f"tests: {len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped"
          + (" (a skip is a failure here)" if gpu else " (GPU only in a rehearsal)"))
    for line in failed:
        print(line)
    for name, why in skipped:
        print(f"  {'FAILED (skipped)' if gpu else 'GPU only'}: {name}: {why}")
    none = not (passed or failed or skipped)
    if none:
        print("  FAILED: no tests were collected")
    return int(bool(failed) or none or (gpu and bool(skipped)))


DIGEST_KEYS = ("img/s", "img/s (median)", "TFLOP/s", "peak MiB", "warm-up s", "vs synthetic",
               "vs baseline", "seconds (median)", "s/step (median)", "error")


def digest(paths: Sequence[str]) -> List[str]:
    """Each benchmark row in a line: what it is, then its figures (img/s, TFLOP/s, peak memory,
    warm-up or compile seconds, ratios, errors). A file still marked incomplete says so."""
    import json
    out = []
    for path in paths:
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            d = json.load(f)
        name = os.path.basename(path)[:-len(".json")]
        out.append(f"{name}{'' if d.get('complete') else ' (incomplete: stopped early)'}:")
        for row in d.get("rows", []):
            what = " ".join(str(v) for k, v in row.items() if k not in DIGEST_KEYS
                            and k != "rounds" and not isinstance(v, float))
            figs = [f"{k} {v:,.4g}" if isinstance(v, float) else f"{k}: {v}"
                    for k, v in row.items() if k in DIGEST_KEYS]
            out.append(f"  {what}: {', '.join(figs) or 'not measured'}")
    return out or ["no benchmark ran"]


def main(argv: Sequence[str]) -> int:
    cmd, rest = argv[0], list(argv[1:])
    if cmd == "wheels":
        print("\n".join(install_wheels(rest[0], rest[1])))
    elif cmd == "probe-wheel":
        print(probe_wheel(rest[0]))
    elif cmd == "preflight":
        import json

        from cspx.runlog import versions
        with open(rest[1], "a") as f:
            f.write(json.dumps(versions(), indent=1) + "\n")
        print("\n".join(imports(rest[2:])))
        print(check_dali(rest[0]))
    elif cmd == "claim":
        from cspx.errors import CspxError
        from cspx.files import claim_folder
        try:
            claim_folder(rest[0], MARKER, "gpu_check output folder", "gpu_check OUT",
                         "Give gpu_check a new or empty folder")
        except CspxError as e:
            print(f"gpu_check: {e}", file=sys.stderr)
            return 2
    elif cmd == "data":
        from cspx.bench.common import make_jpegs, make_sample
        n = int(rest[1])
        print(f"data: {n} generated ImageNet-sized JPEGs in {make_jpegs(rest[0], n)}")
        if len(rest) > 2:
            print(f"sample: the ImageNet sample is missing; stand-in (105 generated JPEGs, "
                  f"synsets.txt) in {make_sample(rest[2])}")
    elif cmd == "junit":
        return junit(rest[0], rest[1])
    elif cmd == "digest":
        print("\n".join(digest(rest)))
    else:
        raise SystemExit(f"unknown subcommand {cmd!r}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except SystemExit:
        raise
    except Exception as e:  # one line, as every check here reports
        raise SystemExit(f"{sys.argv[1] if len(sys.argv) > 1 else 'check'} failed: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                         ) from None  # the line replaces the traceback
