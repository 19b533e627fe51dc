"""The DALI data path against the torch one, on real ImageNet JPEGs, with CPU-only DALI.

GPU-only checks (nvJPEG decoding, memory over epochs) are marked `gpu` and run by `pytest -m gpu`.
"""
from __future__ import annotations

import gc
import io
import logging
import os
import platform
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch

if not (sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")):
    # elsewhere the wheel does not exist; on Linux it is a dependency, and must import (in CI too)
    pytest.importorskip("nvidia.dali", reason="DALI wheels exist for Linux x86_64/aarch64 only")

from cspx.bench.evaldiff import Probe  # noqa: E402
from cspx.config import AugConfig  # noqa: E402
from cspx.data.dali_loader import DaliEvalLoader, DaliTrainLoader, dali_available  # noqa: E402
from cspx.data.index import FolderSplit, build_index, read_classes_file  # noqa: E402
from cspx.data.torch_loader import TorchEvalLoader  # noqa: E402
from cspx.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from cspx.errors import CspxError  # noqa: E402

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pytest -m gpu)")
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
GREY_LEVEL = 1.0 / (255 * max(IMAGENET_STD))  # smallest uint8 step, normalized: ~0.0171


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def to_uint8_scale(x: torch.Tensor) -> torch.Tensor:
    """Normalized (3, H, W) back to 0..255."""
    return (x.float() * STD + MEAN) * 255


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Module-wide cache and file-list folders (module fixtures run before conftest's per-test
    CSPX_CACHE patch, so set it here as well)."""
    base = tmp_path_factory.mktemp("dali")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CSPX_CACHE", str(base / "cache"))
        yield base


@pytest.fixture(scope="module")
def index(env, sample_dir):
    idx = build_index(os.path.join(sample_dir, "val"),
                      read_classes_file(os.path.join(sample_dir, "synsets.txt")))
    assert len(idx) == 105 and len(set(idx.labels.tolist())) == 105  # one image per class
    return idx


def collect(loader, n):
    """{index: image} and {index: label} over one pass, asserting each index comes once."""
    images, labels = {}, {}
    for x, y, i in loader:
        for a, b, k in zip(x, y.tolist(), i.tolist()):
            assert k not in images, f"index {k} counted twice"
            images[k], labels[k] = a, b
    assert sorted(images) == list(range(n))
    return images, labels


@pytest.fixture(scope="module")
def eval_pair(env, index):
    """Both eval paths at the standard 224 / 0.875 bilinear, one pass each."""
    t = TorchEvalLoader(split=index, img_size=224, crop_pct=0.875, interpolation="bilinear",
                        batch_size=35, rank=0, world=1, workers=0, device=CPU, channels_last=False)
    d = DaliEvalLoader(split=index, img_size=224, crop_pct=0.875, interpolation="bilinear",
                       batch_size=16, rank=0, world=1, workers=2, device=CPU, channels_last=False,
                       file_list_dir=str(env / "lists"))
    ref, ref_labels = collect(t, len(index))
    got, got_labels = collect(d, len(index))
    d.close()
    return ref, ref_labels, got, got_labels


# ----- availability and the GPU request -----------------------------------------------------------
def test_available_on_cpu_and_explicit_cuda_never_falls_back(env, index):
    assert dali_available(CPU) == (True, "")
    if torch.cuda.is_available():
        return
    ok, reason = dali_available(torch.device("cuda", 0))
    assert not ok and "CUDA" in reason
    with pytest.raises(CspxError, match="CUDA"):
        DaliTrainLoader(split=index, aug=AugConfig(img_size=32), seed=0, micro_batch=8, rank=0,
                        world=1, workers=1, device=torch.device("cuda", 0), channels_last=False,
                        file_list_dir=str(env / "lists"))
    with pytest.raises(CspxError, match="CUDA"):
        DaliEvalLoader(split=index, img_size=32, crop_pct=0.875, interpolation="bilinear",
                       batch_size=8, rank=0, world=1, workers=1, device=torch.device("cuda", 0),
                       channels_last=False)


# ----- evaluation: labels, parity with PIL, counts ------------------------------------------------
def test_eval_labels_match_torch_path(index, eval_pair):
    _, ref_labels, _, got_labels = eval_pair
    assert got_labels == ref_labels == dict(enumerate(index.labels.tolist()))


def test_eval_tensors_close_to_pil(index, eval_pair):
    """DALI's CPU decoder is the same libjpeg-turbo as Pillow's, and the eval pipeline reproduces
    torchvision's resize sizes and centre-crop offsets, so only the resampling arithmetic differs:
    measured mean |diff| 0.0028 (0.16 grey levels) and max 0.0175 (one grey level) per image.
    The bounds allow 4x that mean and two grey levels plus margin at any pixel."""
    ref, _, got, _ = eval_pair
    means, maxes = [], []
    for k in range(len(index)):
        assert got[k].shape == ref[k].shape == (3, 224, 224) and got[k].dtype == torch.float32
        d = (got[k] - ref[k]).abs()
        means.append(float(d.mean()))
        maxes.append(float(d.max()))
    print(f"\nDALI(cpu) vs PIL per image: mean|d| avg {np.mean(means):.4f} max {max(means):.4f}; "
          f"max|d| median {np.median(maxes):.4f} max {max(maxes):.4f}")
    assert np.mean(means) < 0.01
    assert max(means) < 0.02
    assert max(maxes) < 2.5 * GREY_LEVEL


def test_top1_agreement_with_pil(index, eval_pair):
    """The probe's top-2 margins are far smaller than a trained network's (median about 4x the
    largest logit change the DALI/PIL difference causes), so a few near-ties may flip: measured
    98-99% agreement over seeds; at least 95% (no more than 5 of 105 flips) is required."""
    ref, _, got, _ = eval_pair
    torch.manual_seed(0)
    model = Probe()
    x_ref = torch.stack([ref[k] for k in range(len(index))])
    x_got = torch.stack([got[k] for k in range(len(index))])
    model.calibrate(x_ref)
    with torch.no_grad():
        p_ref, p_got = model(x_ref).argmax(1), model(x_got).argmax(1)
    distinct = len(set(p_ref.tolist()))
    agree = float((p_ref == p_got).float().mean())
    print(f"\ntop-1 agreement DALI(cpu) vs PIL: {agree:.4f} ({distinct} distinct predictions)")
    assert distinct >= 30, "the probe must predict varied classes for the test to mean anything"
    assert agree >= 0.95


def test_eval_counts_exact_across_batches_shards_and_passes(env, index):
    n, lists = len(index), str(env / "lists")
    loader = DaliEvalLoader(split=index, img_size=32, crop_pct=0.875, interpolation="bilinear",
                            batch_size=16, rank=0, world=1, workers=1, device=CPU,
                            channels_last=True, file_list_dir=lists)
    assert (len(loader), loader.num_samples) == (7, 105)
    first = [i.tolist() for _, _, i in loader]
    assert [len(b) for b in first] == [16] * 6 + [9]
    assert sum(first, []) == list(range(n))
    x, _, _ = next(iter(loader))  # abandon a pass midway: the next one still starts at the top
    assert x.shape == (16, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert [i.tolist() for _, _, i in loader] == first
    assert [i.tolist() for _, _, i in loader] == first  # and the pass after a complete one
    loader.close()

    seen, sizes = [], []
    for rank in (0, 1):
        shard = DaliEvalLoader(split=index, img_size=32, crop_pct=0.875, interpolation="bilinear",
                               batch_size=16, rank=rank, world=2, workers=1, device=CPU,
                               channels_last=False, file_list_dir=lists)
        for _ in range(2):  # twice: the same shard each pass
            idx = [k for _, y, i in shard for k in i.tolist()]
            assert len(idx) == shard.num_samples == len(set(idx))
        seen += idx
        sizes.append((shard.num_samples, len(shard)))
        shard.close()
    assert sizes == [(52, 4), (53, 4)]
    assert sorted(seen) == list(range(n))

    big = DaliEvalLoader(split=index, img_size=32, crop_pct=0.875, interpolation="bilinear",
                         batch_size=128, rank=0, world=1, workers=1, device=CPU,
                         channels_last=False,
                         file_list_dir=lists)  # one batch larger than the whole set
    assert len(big) == 1 and [len(i) for _, _, i in big] == [105]
    big.close()


# ----- training batches ---------------------------------------------------------------------------
def train_loader(env, index, aug, mb=8, rank=0, world=1, channels_last=False, workers=2):
    return DaliTrainLoader(split=index, aug=aug, seed=0, micro_batch=mb, rank=rank, world=world,
                           workers=workers, device=CPU, channels_last=channels_last,
                           file_list_dir=str(env / "lists"))


@pytest.mark.parametrize("channels_last", [False, True])
def test_train_batch_layout_dtype_and_range(env, index, channels_last):
    loader = train_loader(env, index, AugConfig(img_size=64), channels_last=channels_last)
    x, y = next(loader)
    assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32 and x.device == CPU
    assert y.shape == (8,) and y.dtype == torch.int64
    if channels_last:
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    else:
        assert x.is_contiguous()
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert lo - 1e-4 <= float(x.min()) and float(x.max()) <= hi + 1e-4
    assert float(x.min()) < -1.5 and float(x.max()) > 1.5  # natural images span most of 0..255
    assert loader.kind == "dali" and loader.bad_files == 0 and loader.batches_per_epoch == 13
    loader.close()


def test_train_labels_are_disjoint_shards_of_each_epoch(env, index):
    """Two ranks of one run (built in one process): per epoch, each rank's labels are distinct
    files (one image per class here), the ranks are disjoint, and every label is the torch
    path's label of some file."""
    ranks = [train_loader(env, index, AugConfig(img_size=32), mb=8, rank=r, world=2, workers=1)
             for r in (0, 1)]
    assert [r.batches_per_epoch for r in ranks] == [6, 6]  # shards of 52 and 53 images
    valid = set(index.labels.tolist())
    for _epoch in range(2):
        per_rank = [[k for _ in range(6) for k in next(r)[1].tolist()] for r in ranks]
        for labels in per_rank:
            assert len(labels) == 48 == len(set(labels)) and set(labels) <= valid
        assert not set(per_rank[0]) & set(per_rank[1])
    assert ranks[0].epoch == 2.0
    for r in ranks:
        r.close()


@pytest.fixture(scope="module")
def one_image(env):
    """A square, left-right asymmetric PNG listed 64 times: each sample is one augmentation of
    the same picture."""
    from PIL import Image
    root = env / "one"
    (root / "c").mkdir(parents=True)
    rng = np.random.default_rng(0)
    a = np.zeros((96, 96, 3), np.uint8)
    a[:, :, 0] = np.linspace(0, 255, 96, dtype=np.uint8)[None, :]  # red ramp: left dark
    a[20:70, 10:40, 1] = 200
    a[..., 2] = rng.integers(0, 255, (96, 96), dtype=np.uint8) // 2
    Image.fromarray(a).save(root / "c" / "img.png")
    return FolderSplit(str(root), ["c"], ["c/img.png"] * 64, np.zeros(64, np.int64))


def test_flip_and_crop_vary(env, one_image):
    whole = dict(img_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = train_loader(env, one_image, AugConfig(**whole, hflip=0.0), mb=32)
    x0 = next(plain)[0]
    assert all(torch.equal(x, x0[0]) for x in x0)  # no flip, whole image: one result
    plain.close()
    flipped = train_loader(env, one_image, AugConfig(**whole, hflip=0.5), mb=32)
    n_flip = 0
    for _ in range(4):
        for x in next(flipped)[0]:
            is_flip = torch.equal(x, x0[0].flip(-1))
            assert is_flip or torch.equal(x, x0[0])
            n_flip += is_flip
    flipped.close()
    assert 0.3 < n_flip / 128 < 0.7  # hflip 0.5: 4.5 standard deviations either side

    crops = train_loader(env, one_image, AugConfig(img_size=32, hflip=0.0), mb=32)
    xs = next(crops)[0]
    crops.close()
    assert len({x.numpy().tobytes() for x in xs}) == 32  # random-resized-crop differs per sample


@pytest.mark.parametrize("magnitude", [7.0, 10.0])
def test_rebuilt_randaugment_ops_match_dali_and_pil(index, magnitude):
    """cspx rebuilds four of DALI's RandAugment ops (solarize as a lookup table, contrast as one
    fn.contrast pass, sharpness and equalize on their non-deprecated names): on the sample images,
    at the same magnitude and sign, each gives the pixels of DALI's own op; solarize also those of
    PIL's ImageOps.solarize at the bin's integer threshold."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment
    from nvidia.dali.auto_aug.core import signed_bin
    from PIL import Image, ImageOps

    from cspx.data.dali_policies import rand_augment_suite
    from cspx.data.transforms import RA_BINS, ra_magnitude_bin

    m = ra_magnitude_bin(magnitude)
    ours = {op.name: op for op in rand_augment_suite(m, on_gpu=False)}
    dalis = {op.name: op for op in rand_augment.get_rand_augment_suite(use_shape=True)}
    names = ["solarize", "contrast", "sharpness", "equalize"]
    assert all(ours[n] is not dalis[n] for n in names)

    @pipeline_def
    def pipe():
        jpegs, _ = fn.readers.file(files=[os.path.join(index.root, f) for f in index.files[:24]])
        x = fn.resize(fn.decoders.image(jpegs, output_type=types.RGB), size=[96, 128])
        mag = signed_bin(m, random_sign=fn.random.coin_flip(dtype=types.INT32))  # both signs
        outs = [x]
        for n in names:
            outs += [ours[n](x, magnitude_bin=mag, num_magnitude_bins=RA_BINS),
                     dalis[n](x, magnitude_bin=mag, num_magnitude_bins=RA_BINS)]
        return tuple(outs)

    # DALI's own suite uses deprecated operator aliases, and DALI resets warning filters before
    # it warns: keep those expected warnings out of the report by recording them here
    with warnings.catch_warnings(record=True):
        p = pipe(batch_size=24, num_threads=1, device_id=None, seed=3)
        p.build()
    out = [[np.array(t) for t in o] for o in p.run()]
    src, pairs = out[0], out[1:]
    threshold = int(np.ceil(np.linspace(256, 0, RA_BINS)[m]))  # bin 21 -> 76.8 -> 77
    for i, n in enumerate(names):
        ours_px, dali_px = pairs[2 * i], pairs[2 * i + 1]
        changed = 0
        for a, b, x in zip(ours_px, dali_px, src):
            diff = np.abs(a.astype(int) - b.astype(int)).max()
            assert diff == 0, f"{n}: max |cspx - DALI| = {diff}"
            changed += not np.array_equal(a, x)
        assert changed >= 20, f"{n} left {24 - changed} of 24 images unchanged"
    for a, x in zip(pairs[0], src):
        ref = np.array(ImageOps.solarize(Image.fromarray(x), threshold=threshold))
        assert np.array_equal(a, ref)


# ----- odd and bad files ----------------------------------------------------------------------
def test_grayscale_cmyk_png_decode_to_rgb(env, index, eval_pair, tmp_path):
    from PIL import Image
    _, _, got, _ = eval_pair
    gray = [k for k in range(len(index)) if Image.open(index.path(k)).mode == "L"]
    assert len(gray) >= 5
    for k in gray:  # the sample's grayscale JPEGs: three equal channels
        u = to_uint8_scale(got[k])
        assert (u[0] - u[1]).abs().max() < 0.01 and (u[0] - u[2]).abs().max() < 0.01

    src = Image.open(index.path(0)).convert("RGB")
    (tmp_path / "a").mkdir()
    src.convert("CMYK").save(tmp_path / "a" / "cmyk.JPEG", quality=95)
    src.save(tmp_path / "a" / "png.JPEG", format="PNG")  # a PNG under a JPEG name
    src.convert("L").save(tmp_path / "a" / "gray.JPEG", quality=95)
    odd = build_index(str(tmp_path))
    assert odd.files == ["a/cmyk.JPEG", "a/gray.JPEG", "a/png.JPEG"] and not odd.excluded
    ref, _ = collect(TorchEvalLoader(split=odd, img_size=64, crop_pct=0.875,
                                     interpolation="bilinear", batch_size=3, rank=0, world=1,
                                     workers=0, device=CPU, channels_last=False), 3)
    loader = DaliEvalLoader(split=odd, img_size=64, crop_pct=0.875, interpolation="bilinear",
                            batch_size=3, rank=0, world=1, workers=1, device=CPU,
                            channels_last=False, file_list_dir=str(env / "lists"))
    out, _ = collect(loader, 3)
    loader.close()
    for k in range(3):
        assert out[k].shape == (3, 64, 64)
        assert float((out[k] - ref[k]).abs().max()) < 2.5 * GREY_LEVEL, odd.files[k]


def test_truncated_and_empty_files_excluded_with_warning(env, index, tmp_path, caplog):
    cls = tmp_path / index.classes[index.labels[0]]
    cls.mkdir()
    for k in range(4):
        shutil.copy(index.path(k), cls / f"good{k}.JPEG")
    data = open(index.path(0), "rb").read()
    (cls / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    (cls / "empty.JPEG").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="cspx"):
        idx = build_index(str(tmp_path))
    assert set(idx.excluded) == {f"{cls.name}/truncated.JPEG", f"{cls.name}/empty.JPEG"}
    assert "truncated.JPEG" in caplog.text and "empty.JPEG" in caplog.text
    assert len(idx) == 4

    loader = train_loader(env, idx, AugConfig(img_size=32), mb=2, workers=1)
    assert [next(loader)[0].shape[0] for _ in range(5)] == [2] * 5  # across epochs, no crash
    assert loader.bad_files == 0
    loader.close()
    ev = DaliEvalLoader(split=idx, img_size=32, crop_pct=0.875, interpolation="bilinear",
                        batch_size=3, rank=0, world=1, workers=1, device=CPU, channels_last=False,
                        file_list_dir=str(env / "lists"))
    assert sum(len(i) for _, _, i in ev) == 4
    ev.close()

    # why the scan matters: DALI cannot skip a bad file, and says what to do about it
    forced = FolderSplit(idx.root, idx.classes, [idx.files[0], f"{cls.name}/truncated.JPEG"],
                          np.zeros(2, np.int64))
    bad = DaliEvalLoader(split=forced, img_size=32, crop_pct=0.875, interpolation="bilinear",
                         batch_size=2, rank=0, world=1, workers=1, device=CPU, channels_last=False,
                         file_list_dir=str(env / "lists"))
    with pytest.raises(CspxError, match="check_dataset.py"):
        list(bad)
    bad.close()


# ----- exact resume ---------------------------------------------------------------------------
def test_resume_is_exact_mid_epoch_and_at_epoch_boundary(env, index, caplog):
    """Full augmentation (RandAugment, rotate, colour jitter); 16 per batch -> 6 batches/epoch."""
    aug = AugConfig(img_size=48, randaugment_ops=2, randaugment_magnitude=9, hue=0.1,
                    saturation=0.75, exposure=0.75, rotate=7.0)
    n = 9
    first = train_loader(env, index, aug, mb=16)
    assert first.batches_per_epoch == 6
    fresh_state = first.state_dict()
    ref = [next(first) for _ in range(n)]
    first.close()
    for k in (4, 6):  # mid-epoch, and exactly at the end of epoch 0
        a = train_loader(env, index, aug, mb=16)
        for _ in range(k):
            next(a)
        buf = io.BytesIO()
        torch.save(a.state_dict(), buf)
        a.close()
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        b = train_loader(env, index, aug, mb=16)
        b.load_state_dict(state)
        assert b.epoch == k / 6
        for j in range(k, n):
            x, y = next(b)
            assert torch.equal(x, ref[j][0]) and torch.equal(y, ref[j][1]), f"k={k} batch {j}"
            if j == k:
                b.close()  # close() keeps the position: the next batch rebuilds and continues
        assert b.epoch == n / 6
        with pytest.raises(RuntimeError, match="before the first batch"):
            b.load_state_dict(state)
        b.close()
    assert fresh_state["consumed"] == 0 and fresh_state["checkpoint"] == ""
    assert all(isinstance(v, (str, int)) for v in state.values())
    # another world size: DALI's order cannot follow; the loader says so and starts afresh
    other = train_loader(env, index, aug, mb=16, rank=0, world=2)
    with caplog.at_level(logging.WARNING, logger="cspx"):
        other.load_state_dict(state)
    assert "cannot move to another world size" in caplog.text and other.consumed == 0
    with pytest.raises(CspxError, match="another dataset, batch size, seed, augmentation"):
        train_loader(env, index, AugConfig(img_size=48), mb=16).load_state_dict(state)
    with pytest.raises(CspxError, match="'torch' loader, this run uses 'dali'"):
        other.load_state_dict({"kind": "torch", "consumed": 3})


def test_pipelines_are_torn_down(env, index):
    gc.collect()
    before = threads()
    for _ in range(2):
        tr = train_loader(env, index, AugConfig(img_size=32), workers=2)
        next(tr)
        ev = DaliEvalLoader(split=index, img_size=32, crop_pct=0.875, interpolation="bilinear",
                            batch_size=32, rank=0, world=1, workers=2, device=CPU,
                            channels_last=False, file_list_dir=str(env / "lists"))
        list(ev)
        assert threads() > before
        tr.close()
        ev.close()
        gc.collect()
        assert threads() <= before


@pytest.mark.parametrize("channels_last", [False, True])
def test_output_copy_owns_its_memory_and_zero_copy_is_a_view(channels_last):
    """On a GPU the loaders copy DALI's output into torch-owned memory (own=True); the CPU path
    and the benchmark's zero-copy row use DALI's buffer as it is (own=False)."""
    from cspx.data.dali_loader import nchw_images
    x = torch.randn(4, 8, 6, 3) if channels_last else torch.randn(4, 3, 8, 6)
    owned = nchw_images(x, channels_last, own=True)
    view = nchw_images(x, channels_last, own=False)
    assert owned.shape == view.shape == (4, 3, 8, 6) and torch.equal(owned, view)
    assert owned.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    assert view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert owned.is_contiguous(memory_format=torch.channels_last if channels_last
                               else torch.contiguous_format)
    x.zero_()  # DALI reusing its buffer: the copy keeps the batch, the view follows the buffer
    assert not torch.equal(owned, view) and float(view.abs().sum()) == 0.0


def test_copy_out_defaults_to_the_device(env, index):
    cpu = train_loader(env, index, AugConfig(img_size=32))
    assert cpu.copy_out is False
    forced = DaliTrainLoader(split=index, aug=AugConfig(img_size=32), seed=0, micro_batch=8, rank=0,
                             world=1, workers=1, device=CPU, channels_last=False,
                             file_list_dir=str(env / "lists"), copy_out=True)
    x, _ = next(forced)
    assert forced.copy_out and x.shape == (8, 3, 32, 32)
    forced.close()


# ----- GPU (pytest -m gpu) ----------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype,channels_last", [(torch.float16, True), (torch.float32, False)])
def test_gpu_mixed_decode_train_batches(env, index, dtype, channels_last):
    dev = torch.device("cuda", 0)
    aug = AugConfig(img_size=224, randaugment_ops=2, hue=0.1, saturation=0.75, rotate=7.0)
    loader = DaliTrainLoader(split=index, aug=aug, seed=0, micro_batch=16, rank=0, world=1,
                             workers=4, device=dev, channels_last=channels_last, dtype=dtype,
                             file_list_dir=str(env / "lists"))
    for _ in range(8):  # into the second epoch
        x, y = next(loader)
        assert x.shape == (16, 3, 224, 224) and x.dtype == dtype and x.device == dev
        assert y.dtype == torch.int64 and y.device == dev
        assert (x.is_contiguous(memory_format=torch.channels_last) if channels_last
                else x.is_contiguous())
        assert torch.isfinite(x).all() and set(y.tolist()) <= set(index.labels.tolist())
    loader.close()


@pytest.mark.gpu
@needs_cuda
def test_gpu_eval_close_to_pil(env, index, eval_pair):
    """nvJPEG's IDCT differs from libjpeg's (fancy upsampling is on), so allow more than on CPU."""
    ref, _, _, _ = eval_pair
    loader = DaliEvalLoader(split=index, img_size=224, crop_pct=0.875, interpolation="bilinear",
                            batch_size=32, rank=0, world=1, workers=4,
                            device=torch.device("cuda", 0), channels_last=True,
                            file_list_dir=str(env / "lists"))
    got, labels = collect(loader, len(index))
    loader.close()
    means = [float((got[k].cpu() - ref[k]).abs().mean()) for k in range(len(index))]
    print(f"\nDALI(mixed) vs PIL: mean|d| avg {np.mean(means):.4f} max {max(means):.4f}")
    assert labels == dict(enumerate(index.labels.tolist()))
    assert np.mean(means) < 0.03


@pytest.mark.gpu
@needs_cuda
def test_gpu_eval_labels_and_positions_stay_on_the_device(env, index):
    """Positions come out of the pipeline on the GPU and labels are gathered there: no batch of
    the evaluation loader visits the host."""
    dev = torch.device("cuda", 0)
    loader = DaliEvalLoader(split=index, img_size=64, crop_pct=0.875, interpolation="bilinear",
                            batch_size=32, rank=0, world=1, workers=4, device=dev,
                            channels_last=True, file_list_dir=str(env / "lists"))
    assert loader.labels.device.type == "cuda"
    got = {}
    for x, y, i in loader:
        assert x.device.type == y.device.type == i.device.type == "cuda"
        assert i.dtype == y.dtype == torch.int64
        got.update(zip(i.tolist(), y.tolist()))
    loader.close()
    assert got == dict(enumerate(index.labels.tolist()))


@pytest.mark.gpu
@needs_cuda
def test_gpu_memory_does_not_grow_over_epochs(env, index):
    """Device memory (DALI's pools and torch's, both seen by cudaMemGetInfo) levels off: nvJPEG's
    buffers are preallocated and batches have fixed shapes; only DALI's buffers for the decoded
    random crops may still grow a little to the largest batch seen. A leak of one fp16 batch per
    step (4.8 MB) would add 200 MB over the last seven epochs."""
    dev = torch.device("cuda", 0)
    loader = DaliTrainLoader(split=index, aug=AugConfig(img_size=224), seed=0, micro_batch=16,
                             rank=0, world=1, workers=4, device=dev, channels_last=True,
                             dtype=torch.float16, file_list_dir=str(env / "lists"))
    used = []
    for _epoch in range(10):
        for _ in range(loader.batches_per_epoch):
            x, _ = next(loader)
            x.float().sum().item()  # consume the batch as training would
        torch.cuda.synchronize(dev)
        free, total = torch.cuda.mem_get_info(dev)
        used.append((total - free, torch.cuda.memory_reserved(dev)))
    loader.close()
    print("\nGPU used / torch reserved per epoch (MiB):",
          [(u >> 20, r >> 20) for u, r in used])
    assert used[-1][0] - used[2][0] < 96 << 20
    assert used[-1][1] == used[2][1]
