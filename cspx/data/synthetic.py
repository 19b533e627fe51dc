"""A small, learnable, synthetic dataset of real JPEG files in ImageNet layout, for the demo.

Class k is a shape (circle, square, triangle, ...) in a hue band of its own, drawn at a random
position, size and rotation over a noisy background of random colour, with JPEG artefacts. Shape
and colour both identify the class, so a small CSP model learns it to > 90% top-1 in minutes on a
CPU, yet random crops, flips and the JPEG round trip still make it a real training problem.
"""
from __future__ import annotations

import colorsys
import math
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star", "hexagon",
          "chevron", "dots", "stripes")
MARKER = ".cspx-synthetic-v1"


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, star: bool = False):
    pts = []
    for i in range(n * (2 if star else 1)):
        rad = r if not star or i % 2 == 0 else r * 0.45
        a = rot + i * math.pi * 2 / (n * (2 if star else 1))
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rot: float, fill) -> None:
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
        d.polygon([(cx - r, cy - r / 4), (cx + r, cy - r / 4), (cx + r, cy + r / 4), (cx - r, cy + r / 4)],
                  fill=fill)
    elif shape == "chevron":
        d.line([(cx - r, cy - r / 2), (cx, cy + r / 2), (cx + r, cy - r / 2)], fill=fill,
               width=max(2, int(r / 3)))
    elif shape == "dots":
        for dx in (-r / 2, r / 2):
            for dy in (-r / 2, r / 2):
                d.ellipse([cx + dx - r / 4, cy + dy - r / 4, cx + dx + r / 4, cy + dy + r / 4], fill=fill)
    elif shape == "stripes":
        for k in range(-2, 3):
            d.line([(cx - r, cy + k * r / 2.5), (cx + r, cy + k * r / 2.5)], fill=fill, width=max(2, int(r / 6)))


def make_image(label: int, num_classes: int, rng: np.random.Generator) -> Image.Image:
    w, h = (int(v) for v in rng.integers(72, 112, size=2))
    bg = tuple(int(v) for v in rng.integers(0, 256, size=3))
    noise = rng.normal(0, 18, size=(h, w, 3))
    arr = np.clip(np.array(bg, dtype=np.float64)[None, None] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(img)
    hue = (label / num_classes + rng.uniform(-0.25, 0.25) / num_classes) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    fill = tuple(int(255 * c) for c in rgb)
    r = rng.uniform(0.25, 0.4) * min(w, h)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    _draw(d, SHAPES[label % len(SHAPES)], cx, cy, r, rng.uniform(0, 2 * math.pi), fill)
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 0.8))))


def generate(root: str, num_classes: int = 10, train_per_class: int = 200, val_per_class: int = 30,
             seed: int = 0) -> str:
    """Write root/{train,val}/<class>/*.JPEG and root/synsets.txt once; returns root.

    The folder is built under a temporary name and renamed, so an interrupted generation is
    simply redone.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if os.path.exists(os.path.join(root, MARKER)):
        return root
    if num_classes > len(SHAPES):
        raise ValueError(f"at most {len(SHAPES)} synthetic classes")
    tmp = f"{root}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    names = [f"s{k:02d}_{SHAPES[k]}" for k in range(num_classes)]
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for k, name in enumerate(names):
            folder = os.path.join(tmp, split, name)
            os.makedirs(folder)
            for i in range(per_class):
                img = make_image(k, num_classes, rng)
                img.save(os.path.join(folder, f"{name}_{i:05d}.JPEG"), quality=int(rng.integers(75, 95)))
    with open(os.path.join(tmp, "synsets.txt"), "w") as f:
        f.writelines(f"{n} synthetic {n.split('_', 1)[1]}\n" for n in names)
    open(os.path.join(tmp, MARKER), "w").close()
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    os.replace(tmp, root)
    return root
