"""aug.policy: TrivialAugment Wide and AutoAugment's ImageNet policy on both paths. The torch path
runs torchvision's transforms; the DALI path (cspx.data.dali_policies) is measured against them op
by op on the sample images: pixel for pixel where cspx rebuilt the op to match, otherwise within
the tolerance each op's row states."""
from __future__ import annotations

import inspect
import io
import os
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from torchvision.transforms import autoaugment as A

from cspx.config import AugConfig
from cspx.data import dali_policies as dp
from cspx.data.index import build_index
from cspx.data.transforms import TrainTransform, policy_transform
from cspx.errors import CspxError

CPU = torch.device("cpu")
TV_NAME = {"identity": "Identity", "shear_x": "ShearX", "shear_y": "ShearY",
           "translate_x": "TranslateX", "translate_y": "TranslateY", "rotate": "Rotate",
           "brightness": "Brightness", "color": "Color", "contrast": "Contrast",
           "sharpness": "Sharpness", "posterize": "Posterize", "solarize": "Solarize",
           "auto_contrast": "AutoContrast", "equalize": "Equalize", "invert": "Invert"}


def tolerance(name, diff):
    """The stated tolerance of each op, DALI against torchvision on PIL (uint8 grey levels),
    nearest sampling for the geometric ops. None where the op passes."""
    d = np.abs(diff)
    if name in ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "posterize",
                "solarize", "invert"):
        ok = d.max() == 0      # rebuilt or equal: the same pixels
    elif name == "rotate":     # the nearest source pixel differs on ties: < 1.5% of pixels
        ok = (d > 0).mean() < 0.015
    elif name in ("brightness", "contrast", "auto_contrast"):
        ok = d.max() <= 1      # DALI rounds where PIL truncates
    elif name == "color":      # PIL also rounds its grey image to integers
        ok = d.max() <= 2
    elif name == "sharpness":  # PIL leaves the 1 px border as it was, DALI filters it too
        ok = d[1:-1, 1:-1].max() <= 1
    elif name == "equalize":   # DALI follows OpenCV's lookup table, PIL its own (measured on
        ok = d.mean() <= 8     # these images: 2.5 on average, 6.6 at worst)
    else:
        raise KeyError(name)
    return None if ok else f"max {d.max()}, mean {d.mean():.3f}, differ {(d > 0).mean():.4f}"


@pytest.fixture(scope="module")
def images(sample_dir):
    """16 sample JPEGs decoded and resized to 64 x 80 (uint8 HWC): not square, so a height and
    width mix-up shows."""
    from PIL import Image
    index = build_index(os.path.join(sample_dir, "val"), warn=False)
    out = []
    for rel in index.files[:16]:
        with Image.open(os.path.join(index.root, rel)) as im:
            small = im.convert("RGB").resize((80, 64), Image.Resampling.BILINEAR)
            out.append(np.asarray(small).copy())
    return out


def run_ops(images, suite, bins_of, num_bins):
    """Every op of `suite` at each of its bins_of(op) bins with both signs, in one DALI CPU
    pipeline: {(name, bin, sign): list of output images}."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug.core import signed_bin
    cases = [(op, b, s) for op in suite for b in bins_of(op) for s in (0, 1)]

    @pipeline_def
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        outs = []
        for op, b, s in cases:
            kw = dict(magnitude_bin=signed_bin(b, random_sign=fn.random.coin_flip(
                probability=float(s), dtype=types.INT32)), num_magnitude_bins=num_bins)
            params = inspect.signature(op.op).parameters
            if "fill_value" in params:
                kw.update(fill_value=0, interp_type=types.INTERP_NN)
            outs.append(op(x, **kw))
        return tuple(outs)

    with warnings.catch_warnings(record=True):
        p = pipe(batch_size=len(images), num_threads=1, device_id=None, seed=0)
        p.build()
    out = p.run()
    return {(op.name, b, s): [np.array(t) for t in o] for (op, b, s), o in zip(cases, out)}


def compare(images, outputs, space):
    """Each DALI op against torchvision's own at the same magnitude. torchvision has no public
    per-op interface: `_apply_op` (one op) and `_augmentation_space` (the op table) are what its
    policies call, so the reference is read there."""
    from PIL import Image
    failures = []
    for (name, b, sign), got in outputs.items():
        mags, signed = space[TV_NAME[name]]
        mag = float(mags[b]) if mags.ndim > 0 else 0.0
        mag = -mag if signed and sign else mag
        for k, (src, ours) in enumerate(zip(images, got)):
            ref = np.asarray(A._apply_op(Image.fromarray(src), TV_NAME[name], mag,
                                         interpolation=T.InterpolationMode.NEAREST, fill=None))
            why = tolerance(name, ref.astype(int) - ours.astype(int))
            if why:
                failures.append(f"{name} bin {b} sign {sign} image {k}: {why}")
    assert not failures, "\n".join(failures[:20])


def test_trivialaugment_ops_match_torchvision(images):
    suite = dp.trivial_augment_suite(on_gpu=False)
    assert len(suite) == len(T.TrivialAugmentWide()._augmentation_space(31)) == 14
    outputs = run_ops(images, suite, lambda op: [0, 7, 19, 30] if op.mag_range is not None
                      else [0], dp.TA_BINS)
    compare(images, outputs, T.TrivialAugmentWide()._augmentation_space(31))


def test_autoaugment_ops_and_table_match_torchvision(images):
    policy = dp.auto_augment_policy(on_gpu=False)
    table = T.AutoAugment(T.AutoAugmentPolicy.IMAGENET).policies
    assert [tuple(sub) for sub in dp.AA_IMAGENET] == [tuple(sub) for sub in table]
    assert policy.num_magnitude_bins == dp.AA_BINS == 10 and len(policy.sub_policies) == 25
    # the bins the policy uses, each op at each of them
    used = {}
    for sub in policy.sub_policies:
        for op, _, m in sub:
            used.setdefault(op.name, (op, set()))[1].add(m or 0)
    suite = [op for op, _ in used.values()]
    outputs = run_ops(images, suite, lambda op: sorted(used[op.name][1]), dp.AA_BINS)
    compare(images, outputs, T.AutoAugment()._augmentation_space(10, (64, 80)))


def test_torch_path_runs_torchvisions_policies():
    ta = policy_transform(AugConfig(policy="trivialaugment"))
    assert isinstance(ta, T.TrivialAugmentWide) and ta.num_magnitude_bins == 31
    assert ta.interpolation == T.InterpolationMode.NEAREST and ta.fill is None
    aa = policy_transform(AugConfig(policy="autoaugment",
                                    randaugment_interpolation="bilinear"))
    assert isinstance(aa, T.AutoAugment) and aa.policy == T.AutoAugmentPolicy.IMAGENET
    assert aa.interpolation == T.InterpolationMode.BILINEAR
    ra = policy_transform(AugConfig(randaugment_ops=2))
    assert isinstance(ra, T.RandAugment) and (ra.num_ops, ra.magnitude) == (2, 21)
    assert policy_transform(AugConfig()) is None
    assert policy_transform(AugConfig(policy="none")) is None
    assert TrainTransform(AugConfig(policy="autoaugment")).policy is not None


def test_policy_and_randaugment_keys_together():
    """randaugment_ops > 0 needs policy randaugment; the shipped recipes' policy (randaugment,
    the default) with 0 ops is no policy, as before aug.policy existed."""
    from cspx import configio
    from cspx.config import Config
    with pytest.raises(CspxError, match=r"aug.randaugment_ops: applies to aug.policy "
                                        r"randaugment only, and aug.policy is trivialaugment"):
        configio.build(Config, {"aug": {"policy": "trivialaugment", "randaugment_ops": 2}}, "r")
    with pytest.raises(CspxError, match="aug.policy: expected 'randaugment' or"):
        configio.build(Config, {"aug": {"policy": "rand"}}, "r")
    with pytest.raises(CspxError, match="aug.cutmix_minmax: must satisfy"):
        configio.build(Config, {"aug": {"cutmix_minmax": [0.5, 0.4]}}, "r")
    with pytest.raises(CspxError, match="aug.erase_count: must be in"):
        configio.build(Config, {"aug": {"erase_count": 0}}, "r")


@pytest.mark.parametrize("policy", ["trivialaugment", "autoaugment"])
def test_dali_policy_batches_resume_exactly(sample_dir, tmp_path, policy):
    """The DALI training graph with each policy: its checkpoint taken mid-epoch resumes with
    the same batches, bit for bit (the policy's random choices are in DALI's checkpoint)."""
    from cspx.data.dali_loader import DaliTrainLoader
    index = build_index(os.path.join(sample_dir, "val"), warn=False)
    aug = AugConfig(img_size=40, policy=policy)

    def loader():
        return DaliTrainLoader(split=index, aug=aug, seed=0, micro_batch=8, rank=0, world=1,
                               workers=1, device=CPU, channels_last=False,
                               file_list_dir=str(tmp_path))
    a = loader()
    ref = [next(a) for _ in range(3)]
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # the position after batch 3, prefetching notwithstanding
    ref += [next(a) for _ in range(2)]
    a.close()
    buf.seek(0)
    c = loader()
    c.load_state_dict(torch.load(buf, weights_only=True))
    for j in (3, 4):
        x, y = next(c)
        assert torch.equal(x, ref[j][0]) and torch.equal(y, ref[j][1])
    c.close()
    plain = DaliTrainLoader(split=index, aug=AugConfig(img_size=40), seed=0, micro_batch=8,
                            rank=0, world=1, workers=1, device=CPU, channels_last=False,
                            file_list_dir=str(tmp_path))
    assert plain.signature != c.signature  # a checkpoint of one graph never resumes the other
    plain.close()


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["trivialaugment", "autoaugment"])
def test_gpu_dali_policies_run_on_the_device(sample_dir, tmp_path, policy):
    """The GPU graph (nvJPEG decode, policy on the device; DALI's contrast there) hands out
    float16 channels_last batches."""
    from cspx.data.dali_loader import DaliTrainLoader
    index = build_index(os.path.join(sample_dir, "val"), warn=False)
    dev = torch.device("cuda", 0)
    loader = DaliTrainLoader(split=index, aug=AugConfig(img_size=64, policy=policy), seed=0,
                             micro_batch=16, rank=0, world=1, workers=2, device=dev,
                             channels_last=True, dtype=torch.float16,
                             file_list_dir=str(tmp_path))
    for _ in range(3):
        x, y = next(loader)
    loader.close()
    assert x.shape == (16, 3, 64, 64) and x.dtype == torch.float16 and x.is_cuda
    assert x.is_contiguous(memory_format=torch.channels_last) and y.is_cuda
