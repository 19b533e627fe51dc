"""The demo's dataset, generated at the start of its first run: a small, learnable, synthetic
set of real JPEG files in ImageNet layout.

Class k is a shape (circle, square, triangle, ...) in a hue band of its own, drawn at a random
position, size and rotation over a noisy background of random colour, with JPEG artefacts. Shape
and colour both identify the class, so a small CSP model learns it to > 90% top-1 in minutes on a
CPU, yet random crops, flips and the JPEG round trip still make it a real training problem.

Other tasks come from the same generator (`scripts/benchmark.py finetune` fine-tunes the demo's
model on one): `first_shape` picks the shapes (the demo uses the first ten; the rest of SHAPES
are never in it), and `colour_by_class=False` draws every shape in a random hue, so that only the
shape tells the class. The demo set's files do not depend on either option.
"""
from __future__ import annotations

import colorsys
import math
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cspx import watchdog
from cspx.errors import CspxError
from cspx.files import pid_alive

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star", "hexagon",
          "chevron", "dots", "stripes", "pentagon", "octagon", "arrow", "horseshoe", "ellipse",
          "hourglass")
MARKER = ".cspx-synthetic-v1"   # written last: the folder is a complete demo set
PARTIAL = ".cspx-synthetic-partial"  # in a build folder until it is complete
TMP_INFIX = ".cspx-tmp-"


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, star: bool = False):
    pts = []
    for i in range(n * (2 if star else 1)):
        rad = r if not star or i % 2 == 0 else r * 0.45
        a = rot + i * math.pi * 2 / (n * (2 if star else 1))
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float,
          fill) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r / 3)))
    elif shape == "square":
        d.polygon(_polygon(cx, cy, r, 4, math.pi / 4), fill=fill)   # axis-aligned
    elif shape == "diamond":
        d.polygon(_polygon(cx, cy, r, 4, 0.0), fill=fill)           # square on its corner
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, r, 3, rot), fill=fill)
    elif shape == "hexagon":
        d.polygon(_polygon(cx, cy, r, 6, rot), fill=fill)
    elif shape == "star":
        d.polygon(_polygon(cx, cy, r, 5, rot, star=True), fill=fill)
    elif shape == "cross":
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "bar":
        d.polygon([(cx - r, cy - r / 4), (cx + r, cy - r / 4), (cx + r, cy + r / 4),
                   (cx - r, cy + r / 4)], fill=fill)
    elif shape == "chevron":
        d.line([(cx - r, cy - r / 2), (cx, cy + r / 2), (cx + r, cy - r / 2)], fill=fill,
               width=max(2, int(r / 3)))
    elif shape == "dots":
        for dx in (-r / 2, r / 2):
            for dy in (-r / 2, r / 2):
                d.ellipse([cx + dx - r / 4, cy + dy - r / 4, cx + dx + r / 4, cy + dy + r / 4],
                          fill=fill)
    elif shape == "stripes":
        for k in range(-2, 3):
            d.line([(cx - r, cy + k * r / 2.5), (cx + r, cy + k * r / 2.5)], fill=fill,
                   width=max(2, int(r / 6)))
    elif shape == "pentagon":
        d.polygon(_polygon(cx, cy, r, 5, rot), fill=fill)
    elif shape == "octagon":
        d.polygon(_polygon(cx, cy, r, 8, rot), fill=fill)
    elif shape == "arrow":  # a shaft and a head, pointing in direction rot
        c, s = math.cos(rot), math.sin(rot)
        pts = [(-r, -r / 5), (0, -r / 5), (0, -r / 1.5), (r, 0), (0, r / 1.5), (0, r / 5),
               (-r, r / 5)]
        d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=fill)
    elif shape == "horseshoe":  # a thick ring open towards rot
        start = math.degrees(rot) + 40
        d.arc([cx - r, cy - r, cx + r, cy + r], start, start + 280, fill=fill,
              width=max(2, int(r / 2.5)))
    elif shape == "ellipse":
        d.ellipse([cx - r, cy - r / 2.5, cx + r, cy + r / 2.5], fill=fill)
    elif shape == "hourglass":
        d.polygon([(cx - r, cy - r), (cx + r, cy - r), (cx - r, cy + r), (cx + r, cy + r)],
                  fill=fill)


def make_image(label: int, num_classes: int, rng: np.random.Generator, first_shape: int = 0,
               colour_by_class: bool = True) -> Image.Image:
    w, h = (int(v) for v in rng.integers(72, 112, size=2))
    bg = tuple(int(v) for v in rng.integers(0, 256, size=3))
    noise = rng.normal(0, 18, size=(h, w, 3))
    arr = np.clip(np.array(bg, dtype=np.float64)[None, None] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    hue = ((label / num_classes + rng.uniform(-0.25, 0.25) / num_classes) % 1.0
           if colour_by_class else rng.uniform(0.0, 1.0))
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    fill = tuple(int(255 * c) for c in rgb)
    r = rng.uniform(0.25, 0.4) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    _draw(d, SHAPES[first_shape + label], cx, cy, r, rng.uniform(0, 2 * math.pi), fill)
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 0.8))))


def generate(root: str, num_classes: int = 10, train_per_class: int = 200, val_per_class: int = 30,
             seed: int = 0, *, first_shape: int = 0, colour_by_class: bool = True) -> str:
    """Write root/{train,val}/<class>/*.JPEG and root/synsets.txt once; returns root.

    Only a folder cspx generated is used or touched: `root` must either not exist yet, or hold a
    complete demo set (its MARKER is written last). Any other folder, even an empty one, is
    refused with one line and left exactly as it was. The set is built in a sibling folder named
    `<root>.cspx-tmp-<pid>` (holding PARTIAL while it is built) and renamed into place, so an
    interrupted generation is simply redone; a stale sibling of a dead process is removed.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if os.path.isfile(os.path.join(root, MARKER)):
        return root
    if os.path.lexists(root):
        raise CspxError(
            f"data.root: {root} exists and is not a cspx demo dataset (no {MARKER} in it); "
            f"nothing in it was touched. With data.synthetic=true, data.root must be a folder "
            f"that does not exist yet (the demo set is generated there); to train on your own "
            f"images set data.synthetic=false")
    if not 0 < num_classes <= len(SHAPES) - first_shape:
        raise CspxError(f"synthetic dataset: {num_classes} classes asked for; it has 1 to "
                        f"{len(SHAPES) - first_shape} (one per shape)")
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_builds(root)
    tmp = f"{root}{TMP_INFIX}{os.getpid()}"
    os.mkdir(tmp)  # fails if it exists: never writes into a folder it did not make
    try:
        open(os.path.join(tmp, PARTIAL), "w").close()
        _write_set(tmp, num_classes, train_per_class, val_per_class, seed, first_shape,
                   colour_by_class)
        open(os.path.join(tmp, MARKER), "w").close()
        os.remove(os.path.join(tmp, PARTIAL))
        if os.path.lexists(root):  # made meanwhile by another process
            if not os.path.isfile(os.path.join(root, MARKER)):
                raise CspxError(f"data.root: {root} appeared while the demo set was generated "
                                f"and is not a cspx demo dataset; nothing in it was touched")
            shutil.rmtree(tmp)
            return root
        os.rename(tmp, root)
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)  # our own build folder (made above)
        raise
    return root


def _remove_stale_builds(root: str) -> None:
    """Remove `<root>.cspx-tmp-<pid>` build folders left by dead processes; each must still hold
    PARTIAL, the proof that a generation made it."""
    folder, name = os.path.split(root)
    for e in os.scandir(folder):
        if not e.name.startswith(name + TMP_INFIX) or not e.is_dir(follow_symlinks=False):
            continue
        pid = e.name[len(name + TMP_INFIX):]
        if (pid.isdigit() and not pid_alive(int(pid))
                and os.path.isfile(os.path.join(e.path, PARTIAL))):
            shutil.rmtree(e.path, ignore_errors=True)


def _write_set(folder: str, num_classes: int, train_per_class: int, val_per_class: int,
               seed: int, first_shape: int = 0, colour_by_class: bool = True) -> None:
    rng = np.random.default_rng(seed)
    names = [f"s{first_shape + k:02d}_{SHAPES[first_shape + k]}" for k in range(num_classes)]
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for k, name in enumerate(names):
            watchdog.progress("generating the synthetic dataset")
            sub = os.path.join(folder, split, name)
            os.makedirs(sub)
            for i in range(per_class):
                img = make_image(k, num_classes, rng, first_shape, colour_by_class)
                img.save(os.path.join(sub, f"{name}_{i:05d}.JPEG"),
                         quality=int(rng.integers(75, 95)))
    with open(os.path.join(folder, "synsets.txt"), "w") as f:
        f.writelines(f"{n} synthetic {n.split('_', 1)[1]}\n" for n in names)
