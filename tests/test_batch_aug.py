"""Batch augmentation after either loader (cspx.data.batch_aug): mixup and CutMix against timm's
Mixup bit for bit, the soft-target loss against timm's SoftTargetCrossEntropy, random erasing's
statistics against timm's RandomErasing, and the stage's checkpointed random state."""
from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
import torch
from scipy import stats

from cspx.config import AugConfig
from cspx.data.batch_aug import BatchAugment
from cspx.data.erasing import RandomErasing
from cspx.data.mixup import Mixup
from cspx.train_loop import training_loss

MIXES = {  # timm's Mixup keyword arguments
    "both": dict(mixup_alpha=0.8, cutmix_alpha=1.0),
    "mixup": dict(mixup_alpha=0.2, cutmix_alpha=0.0),
    "cutmix": dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    "minmax": dict(mixup_alpha=0.0, cutmix_alpha=0.0, cutmix_minmax=(0.2, 0.8)),
    "mixup+minmax": dict(mixup_alpha=0.5, cutmix_alpha=0.0, cutmix_minmax=(0.3, 0.9)),
}


@pytest.mark.parametrize("mode", ["batch", "elem"])
@pytest.mark.parametrize("mix", list(MIXES))
def test_mixup_and_cutmix_equal_timm(mode, mix):
    """From the same generator state, timm's Mixup (numpy's global generator) and cspx's (its
    own RandomState) draw the same lambdas and boxes and give the same images and targets, bit
    for bit, label smoothing included, and leave their generators in the same state. 40 draws
    per case cover mixed and unmixed batches, mixup and CutMix, clipped boxes and the corrected
    lambda."""
    from timm.data.mixup import Mixup as TimmMixup
    kw = MIXES[mix]
    cut_boxes = 0
    for seed in range(40):
        prob = 1.0 if seed % 2 else 0.7
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 3, 20, 24, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        np.random.seed(seed)
        timm = TimmMixup(**kw, prob=prob, switch_prob=0.5, mode=mode, label_smoothing=0.1,
                         num_classes=10)
        ref_x, ref_y = timm(x.clone(), y)
        ours = Mixup(mixup_alpha=kw["mixup_alpha"], cutmix_alpha=kw["cutmix_alpha"],
                     cutmix_minmax=kw.get("cutmix_minmax"), prob=prob, switch_prob=0.5,
                     mode=mode, label_smoothing=0.1, num_classes=10,
                     rng=np.random.RandomState(seed))
        before = x.clone()
        out_x, out_y = ours(x, y)
        assert torch.equal(x, before), "the loader's batch is left as it was"
        assert torch.equal(out_x, ref_x), f"seed {seed}: images differ"
        assert torch.equal(out_y, ref_y), f"seed {seed}: targets differ"
        assert out_y.dtype == torch.float32 and torch.allclose(out_y.sum(1), torch.ones(8))
        assert np.array_equal(np.random.get_state()[1], ours.rng.get_state()[1])
        cut_boxes += int(((out_x == x.flip(0)) & (out_x != x)).all(1).any())
    if mix != "mixup":
        assert cut_boxes >= 10  # CutMix boxes were drawn and pasted


def test_mixup_keeps_the_loaders_layout():
    """A channels_last batch (the DALI and torch loaders' layout with model.channels_last)
    comes out channels_last, with timm's values."""
    from timm.data.mixup import Mixup as TimmMixup
    x = torch.randn(6, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.arange(6)
    for mode in ("batch", "elem"):
        np.random.seed(3)
        ref, _ = TimmMixup(mixup_alpha=0.4, cutmix_alpha=1.0, mode=mode, num_classes=6)(
            x.clone().contiguous(), y)
        out, _ = Mixup(mixup_alpha=0.4, cutmix_alpha=1.0, cutmix_minmax=None, prob=1.0,
                       switch_prob=0.5, mode=mode, label_smoothing=0.1, num_classes=6,
                       rng=np.random.RandomState(3))(x, y)
        assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, ref)


def test_soft_target_loss_equals_timm_and_hard_labels_keep_smoothing():
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 10, generator=g, requires_grad=True)
    soft = torch.softmax(torch.randn(16, 10, generator=g), 1)
    ours = training_loss(logits, soft, 0.1)  # smoothing is already inside soft targets
    ref = SoftTargetCrossEntropy()(logits, soft)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6)
    labels = torch.randint(0, 10, (16,), generator=g)
    assert torch.allclose(training_loss(logits, labels, 0.1),
                          LabelSmoothingCrossEntropy(0.1)(logits, labels), atol=1e-6)


# ----- random erasing -----------------------------------------------------------------------------
N, C, H, W = 10000, 1, 32, 40


def erased_boxes(x):
    """Per image: erased height and width (the bounding box of the zeros; one box per image),
    and the fraction of pixels erased."""
    z = x[:, 0] == 0
    return (z.any(2).sum(1).numpy(), z.any(1).sum(1).numpy(),
            z.float().mean((1, 2)).numpy())


def test_random_erasing_statistics_match_timm():
    """10,000 images through timm's RandomErasing and cspx's: the share of images erased, the
    box area and aspect-ratio distributions (one box per image) and the erased fraction with up
    to 3 boxes agree (two-sample Kolmogorov-Smirnov tests at the 0.1% level; a box rule off by
    a rounding, an attempt or an area factor fails them)."""
    from timm.data.random_erasing import RandomErasing as TimmErasing
    for count in (1, 3):
        random.seed(count)
        ref = torch.ones(N, C, H, W)
        TimmErasing(probability=0.6, mode="const", max_count=count, device="cpu")(ref)
        ours = RandomErasing(prob=0.6, mode="const", max_count=count,
                             rng=np.random.RandomState(count),
                             generator=torch.Generator().manual_seed(0))(torch.ones(N, C, H, W))
        (rh, rw, rf), (oh, ow, of) = erased_boxes(ref), erased_boxes(ours)
        # images erased: binomial(10,000, 0.6), standard deviation 49
        assert abs((rf > 0).sum() - (of > 0).sum()) < 4 * 49 * 2 ** 0.5
        assert stats.ks_2samp(rf[rf > 0], of[of > 0]).pvalue > 1e-3, count
        if count == 1:
            assert stats.ks_2samp((rh * rw)[rh > 0], (oh * ow)[oh > 0]).pvalue > 1e-3
            assert stats.ks_2samp(np.log(rh[rh > 0] / rw[rh > 0]),
                                  np.log(oh[oh > 0] / ow[oh > 0])).pvalue > 1e-3
            assert np.array_equal((of > 0), (oh * ow > 0))  # one rectangle per erased image
            assert ((oh * ow)[oh > 0] == np.round(of * H * W)[oh > 0]).all()


@pytest.mark.parametrize("mode", ["rand", "pixel"])
def test_random_erasing_fills_normal_values_per_box_or_pixel(mode):
    """rand: one N(0, 1) colour per box and channel; pixel: N(0, 1) per pixel; the rest of the
    image is untouched; the same generator states give the same result."""
    x = torch.full((400, 3, 24, 24), 7.0)

    def erase():
        return RandomErasing(prob=1.0, mode=mode, max_count=1, rng=np.random.RandomState(0),
                             generator=torch.Generator().manual_seed(1))(x)
    out = erase()
    assert torch.equal(out, erase()) and torch.equal(x, torch.full_like(x, 7.0))
    inside = out != 7.0
    assert inside.all(1).eq(inside.any(1)).all()  # every channel of a box is filled
    values = out[inside]
    assert abs(float(values.mean())) < 0.05 and abs(float(values.std()) - 1) < 0.05
    per_box = [out[i][inside[i]].view(3, -1) for i in range(50)]
    spread = [float(v.std(1).max()) for v in per_box if v.shape[1] > 1]
    if mode == "rand":
        assert max(spread) == 0  # one colour per box and channel
    else:
        assert min(spread) > 0.3


# ----- the stage ----------------------------------------------------------------------------------
def every_option(**kw):
    return AugConfig(img_size=16, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.9,
                     mix_mode="elem", erase_prob=0.5, erase_mode="pixel", erase_count=2, **kw)


def test_state_round_trip_continues_the_same_draws():
    """state_dict() saved with torch.save and read with weights_only=True: a new stage (another
    seed even) continues with exactly the draws the first one makes next."""
    x = torch.randn(8, 3, 16, 16)
    y = torch.arange(8)
    a = BatchAugment(aug=every_option(), num_classes=8, label_smoothing=0.1,
                     device=torch.device("cpu"), seed=0, rank=0)
    for _ in range(3):
        a(x, y)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = BatchAugment(aug=every_option(), num_classes=8, label_smoothing=0.1,
                     device=torch.device("cpu"), seed=5, rank=1)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(4):
        (xa, ya), (xb, yb) = a(x, y), b(x, y)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # ranks draw differently
    c = BatchAugment(aug=every_option(), num_classes=8, label_smoothing=0.1,
                     device=torch.device("cpu"), seed=0, rank=1)
    d = BatchAugment(aug=every_option(), num_classes=8, label_smoothing=0.1,
                     device=torch.device("cpu"), seed=0, rank=0)
    assert not torch.equal(c(x, y)[0], d(x, y)[0])


def test_stage_is_a_per_rank_checkpoint_part(tmp_path):
    """The stage registers as the per-rank part `batch_aug` of the checkpoint layout. Restored
    on the same world size it continues the draws; on another world size, and from a checkpoint
    written before the part existed (cspx 0.1.0's, tests/data), it starts from its per-rank
    seed, as a fresh run's stage does, while the other parts are restored."""
    from cspx.bench.fixed import FixedBatchLoader
    from cspx.checkpoint import SHARED, Parts, load
    from cspx.distributed import DistEnv
    from cspx.rng import RngState
    old = load(os.path.join(os.path.dirname(__file__), "data", "demo_tiny_step4_v0.1.0.pt"))
    assert old["ranks"][0].keys() == {"rng", "loader"}  # as cspx 0.1.0 wrote them
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    env = DistEnv()

    def run():
        stage = BatchAugment(aug=every_option(), num_classes=8, label_smoothing=0.1,
                             device=torch.device("cpu"), seed=0, rank=0)
        loader = FixedBatchLoader(images=x, labels=y)
        return stage, loader, Parts(shared={k: None for k in SHARED},
                                    per_rank={"rng": RngState(env.device), "loader": loader,
                                              "batch_aug": stage})
    global_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        a, loader_a, parts = run()
        for _ in range(3):
            a(*next(loader_a))
        state = parts.snapshot(env, {})
        following = a(x, y)[0]
        seeded = run()[0](x, y)[0]
        assert not torch.equal(following, seeded)
        for same_world, drop, expect in ((True, False, following), (False, False, seeded),
                                         (True, True, seeded)):
            ranks = [{k: v for k, v in r.items() if not (drop and k == "batch_aug")}
                     for r in state["ranks"]]
            b, loader_b, parts = run()
            assert parts.restore({**state, "ranks": ranks}, env, same_world=same_world) == []
            assert loader_b.consumed == 3  # the loader is restored in every case
            assert torch.equal(b(x, y)[0], expect), (same_world, drop)
    finally:
        torch.set_rng_state(global_rng[0])
        np.random.set_state(global_rng[1])
        random.setstate(global_rng[2])


def test_stage_off_passes_the_batch_through_and_spares_the_global_generators():
    x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
    off = BatchAugment(aug=AugConfig(img_size=8), num_classes=4, label_smoothing=0.1,
                       device=torch.device("cpu"), seed=0, rank=0)
    assert not off.active and off(x, y)[0] is x and off(x, y)[1] is y
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    on = BatchAugment(aug=every_option(), num_classes=4, label_smoothing=0.1,
                      device=torch.device("cpu"), seed=0, rank=0)
    for _ in range(3):
        on(torch.randn(4, 3, 16, 16, generator=torch.Generator()), y)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)


@pytest.mark.gpu
def test_gpu_stage_makes_no_host_sync():
    """On a GPU, with every option on, channels_last float16 as the loaders hand it out: no
    operation synchronizes with the host (torch's sync debug mode raises on one)."""
    dev = torch.device("cuda")
    x = torch.randn(32, 3, 64, 64, device=dev).half().contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device=dev)
    for mode in ("batch", "elem"):
        aug = AugConfig(img_size=64, mixup_alpha=0.8, cutmix_alpha=1.0, mix_mode=mode,
                        erase_prob=1.0, erase_mode="rand", erase_count=3)
        stage = BatchAugment(aug=aug, num_classes=10, label_smoothing=0.1, device=dev, seed=0,
                             rank=0)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                out, t = stage(x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert out.dtype == torch.float16 and out.is_contiguous(memory_format=torch.channels_last)
        assert t.shape == (32, 10) and torch.allclose(t.sum(1), torch.ones(32, device=dev))
