"""The model family against timm, the reference implementation: same module tree, state_dict keys,
init, and forward/backward numerics, so timm's released weights load and behave the same."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.cspnet import CspModelCfg, CspStagesCfg, CspStemCfg
from timm.models.cspnet import CspNet as TimmCspNet
from torch import nn

from cspx.errors import CspxError
from cspx.models import convert_sync_batchnorm, create_model, list_models, model_config

TIMM_MODELS = ["cspresnext50", "cspresnet50", "cspdarknet53"]

# Eval mode: BN is a fixed affine map, so both implementations do the same float ops and any
# difference is a bug; 1e-5 on logits of std ~0.5 leaves room only for rounding.
EVAL_ATOL = 1e-5
# Train mode: the models run the same ATen ops in the same order, and on one machine we measure
# bit-identical outputs, gradients and BN statistics (max diff 0.0). The tolerance only absorbs a
# legitimate change of summation order inside a kernel (another blocking or SIMD path): BN's
# batch mean/var and their backward reduce over N*H*W values (2*112*112 = 25k in the stem
# at 224 px), where reassociation moves a sum by up to ~sqrt(n)*eps ~ 1e-5 relative, and the
# division by the batch std in ~50 BN layers in a row can amplify that. So we allow 1e-4 of each
# tensor's largest magnitude. Real differences (another LeakyReLU slope, swapped split halves, a
# missing activation) are >= 1e-2 relative; test_tolerance_catches_a_real_difference checks one.
TRAIN_RTOL = 1e-4


def timm_tiny(**kw) -> nn.Module:
    """timm's CspNet built from cspresnext_tiny's numbers: an independent reference for it."""
    cfg = CspModelCfg(
        stem=CspStemCfg(out_chs=16, kernel_size=7, stride=4, pool="max"),
        stages=CspStagesCfg(depth=(1, 1, 2, 1), out_chs=(32, 64, 128, 256), stride=(1, 2),
                            groups=8, expand_ratio=1.0, bottle_ratio=1.0, block_ratio=0.5,
                            cross_linear=True))
    return TimmCspNet(cfg, **kw)


def timm_model(name: str, **kw) -> nn.Module:
    return timm_tiny(**kw) if name == "cspresnext_tiny" else timm.create_model(name, **kw)


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial weights: BN gammas away from 0 (zero-init would make every block an identity
    and hide bugs in it), random BN statistics, He-scaled convs. Logits come out with std ~0.5."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, t in model.state_dict().items():
            if k.endswith("num_batches_tracked"):
                continue
            if k.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif k.endswith("bn.weight"):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.5)
            elif k.endswith(("bias", "running_mean")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:  # conv / fc weights: std sqrt(2 / fan_in)
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)


def pair(name: str, **kw):
    """(ours, timm's) with the same random weights, copied with strict=True."""
    ours = create_model(name, **kw)
    randomize(ours)
    ref = timm_model(name, **kw)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def inputs(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    assert diff <= rtol * max(scale, 1e-12), f"{what}: max diff {diff:.3g}, scale {scale:.3g}"


# ---- registry ----------------------------------------------------------------------------------
def test_list_models_and_unknown_name():
    assert list_models() == ["cspdarknet53", "cspresnet50", "cspresnext50", "cspresnext_tiny",
                             "cspresnext_tiny_gn"]
    assert model_config("cspresnext50").groups == (32, 32, 32, 32)
    assert model_config("cspresnext50").stride == (1, 2, 2, 2)  # short tuples pad with the last
    with pytest.raises(CspxError, match=r"'resnet50'.*available: .*cspresnext50"):
        create_model("resnet50")
    with pytest.raises(CspxError, match="unknown option.*widht"):
        create_model("cspresnext_tiny", widht=2)
    with pytest.raises(CspxError, match="act must be one of"):
        create_model("cspresnext_tiny", act="gelu")
    with pytest.raises(CspxError, match="norm must be one of"):
        create_model("cspresnext_tiny", norm="layernorm")


def test_groupnorm_variant_is_batch_split_invariant():
    """cspresnext_tiny_gn: same layout as cspresnext_tiny, GroupNorm in place of every BN, so a
    training-mode forward of 8 images equals two forwards of 4 (BN's would differ by ~1e-1)."""
    from cspx.models.layers import GroupNormAct2d
    torch.manual_seed(0)
    gn = create_model("cspresnext_tiny_gn", num_classes=10)
    bn = create_model("cspresnext_tiny", num_classes=10)
    assert list(gn.state_dict().keys()) == [k for k in bn.state_dict() if "running" not in k
                                            and "num_batches" not in k]
    norms = [m for m in gn.modules() if isinstance(m, GroupNormAct2d)]
    assert norms and all(m.num_groups == 8 for m in norms)
    # zero-init last gammas kept
    assert any(float(m.weight.detach().abs().sum()) == 0 for m in norms)
    for p in gn.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(8, 3, 32, 32)
    gn.train()
    torch.testing.assert_close(gn(x), torch.cat([gn(x[:4]), gn(x[4:])]), rtol=0, atol=1e-6)


# ---- structure ---------------------------------------------------------------------------------
def test_cspresnext50_keys_and_params():
    sd = create_model("cspresnext50").state_dict()
    keys = list(sd)
    assert len(keys) == 332
    assert keys[0] == "stem.conv1.conv.weight" and keys[-1] == "head.fc.bias"
    assert sum(p.numel() for p in create_model("cspresnext50").parameters()) == 20_569_896


@pytest.mark.parametrize("name", TIMM_MODELS + ["cspresnext_tiny"])
def test_same_module_tree_keys_and_init_as_timm(name):
    """Seeded construction gives timm's weights bit for bit: same RNG draws in the same module
    order, He-normal fan_out convs, N(0, 0.01) fc, zero-init of each block's last BN."""
    torch.manual_seed(0)
    ours = create_model(name)
    torch.manual_seed(0)
    ref = timm_model(name)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in ref.named_modules()]
    for (n, a), (_, b) in zip(ours.named_modules(), ref.named_modules()):
        # hyper-parameters of every layer: kernel, stride, padding, groups, slope, inplace...
        assert a.extra_repr() == b.extra_repr(), n
        if not list(a.children()):
            assert type(a).__name__ == type(b).__name__, n
    sa, sb = ours.state_dict(), ref.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_activation_is_leaky_relu_001():
    acts = [m for m in create_model("cspresnext50").modules() if isinstance(m, nn.LeakyReLU)]
    # stem + 3 per block (13 blocks) + conv_down of stages 1-3 + 2 transitions per stage;
    # conv_exp is linear (cross_linear) and conv3 has its activation after the shortcut (act3)
    assert len(acts) == 1 + 3 * 13 + 3 + 2 * 4
    assert {m.negative_slope for m in acts} == {0.01}


@pytest.mark.parametrize("name,attr", [("cspresnext50", "conv3"), ("cspdarknet53", "conv2")])
def test_zero_init_last_bn(name, attr):
    model = create_model(name)
    blocks = [m for m in model.modules() if hasattr(m, "zero_init_last")]
    assert len(blocks) == sum(model_config(name).depth)
    last = {id(getattr(b, attr).bn) for b in blocks}
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == (0.0 if id(m) in last else 1.0))
            assert torch.all(m.bias == 0.0)
    plain = create_model(name, zero_init_last=False)
    assert all(torch.all(getattr(b, attr).bn.weight == 1.0)
               for b in plain.modules() if hasattr(b, "zero_init_last"))


# ---- numerics ----------------------------------------------------------------------------------
def test_cspresnext50_strict_load_both_ways():
    ours, ref = create_model("cspresnext50"), timm.create_model("cspresnext50")
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)


# cspresnext50 at its train (224) and test (256) resolutions; the others once, smaller.
@pytest.mark.parametrize("name,sizes,n", [("cspresnext50", (224, 256), 2),
                                          ("cspresnet50", (224,), 1),
                                          ("cspdarknet53", (128,), 1),
                                          ("cspresnext_tiny", (32, 64), 2)])
def test_eval_logits_match_timm(name, sizes, n):
    ours, ref = pair(name)
    ours.eval(), ref.eval()
    for size in sizes:
        x = inputs(n, size)
        with torch.no_grad():
            a, b = ours(x), ref(x)
        assert a.shape == (n, 1000)
        assert b.std() > 0.1  # the comparison means something
        assert (a - b).abs().max().item() <= EVAL_ATOL, size


def _train_step(model: nn.Module, x: torch.Tensor):
    model.train()
    out = model(x)
    (out.square().mean() + out[:, 0].sum()).backward()
    return out.detach(), {k: p.grad for k, p in model.named_parameters()}


# Batch 2; cspresnext50 at its 224 px train resolution, the others smaller to stay fast (their
# last stage still normalises over 2 * (size/32)^2 >= 8 values per channel).
@pytest.mark.parametrize("name,size", [("cspresnext50", 224), ("cspresnet50", 96),
                                       ("cspdarknet53", 64)])
def test_train_mode_outputs_grads_and_bn_stats_match_timm(name, size):
    ours, ref = pair(name)
    x = inputs(2, size)
    out_a, grads_a = _train_step(ours, x)
    out_b, grads_b = _train_step(ref, x)
    assert_close_rel(out_a, out_b, TRAIN_RTOL, "logits")
    assert list(grads_a) == list(grads_b)
    for k in grads_a:
        assert_close_rel(grads_a[k], grads_b[k], TRAIN_RTOL, f"grad {k}")
    sb = ref.state_dict()
    for k, v in ours.state_dict().items():  # BN running stats and step counters moved alike
        assert_close_rel(v.float(), sb[k].float(), TRAIN_RTOL, k)


def test_drop_path_matches_timm_with_same_seed():
    """Stochastic depth: same per-block rates (linear 0 -> rate) and the same Bernoulli draws."""
    ours, ref = pair("cspresnext_tiny", drop_path_rate=0.3)
    x = inputs(4, 64)
    torch.manual_seed(5)
    out_a, grads_a = _train_step(ours, x)
    torch.manual_seed(5)
    out_b, grads_b = _train_step(ref, x)
    assert_close_rel(out_a, out_b, TRAIN_RTOL, "logits")
    for k in grads_a:
        assert_close_rel(grads_a[k], grads_b[k], TRAIN_RTOL, f"grad {k}")
    rates = [m.p for m in ours.modules() if type(m).__name__ == "DropPath"]
    assert rates == pytest.approx([0.075, 0.15, 0.225, 0.3])  # block 0 has rate 0: Identity


def test_tolerance_catches_a_real_difference():
    """ReLU instead of LeakyReLU(0.01) is a small change; it must land far outside TRAIN_RTOL."""
    ours = create_model("cspresnext_tiny", act="relu")
    randomize(ours)
    ref = timm_tiny()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = inputs(2, 64)
    out_a, grads_a = _train_step(ours, x)
    out_b, grads_b = _train_step(ref, x)
    worst = max((grads_a[k] - grads_b[k]).abs().max() / grads_b[k].abs().max() for k in grads_a)
    assert worst > 100 * TRAIN_RTOL


# ---- API ---------------------------------------------------------------------------------------
def test_head_api_and_reset_classifier():
    model = create_model("cspresnext_tiny", num_classes=7).eval()
    x = inputs(2, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 256, 2, 2) and model.num_features == 256
    assert model.forward_head(feats, pre_logits=True).shape == (2, 256)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    model.reset_classifier(10)
    assert model(x).shape == (2, 10) and model.num_classes == 10
    assert model.get_classifier().weight.std().item() == pytest.approx(0.01, rel=0.3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 256)
    gray = create_model("cspresnext_tiny", in_chans=1).eval()
    assert gray(torch.randn(1, 1, 32, 32)).shape == (1, 1000)


def test_channels_last_and_compile():
    model = create_model("cspresnext_tiny").eval()
    randomize(model)
    x = inputs(2, 64)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        assert (cl - ref).abs().max().item() <= EVAL_ATOL
        # fullgraph: the whole forward traces as one graph (no graph breaks)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert (compiled(x) - ref).abs().max().item() <= EVAL_ATOL


def test_convert_sync_batchnorm_keeps_activations():
    """torch's converter drops the activation inside each BatchNormAct2d; ours must not."""
    model = create_model("cspresnext_tiny").eval()
    randomize(model)
    x = inputs(2, 64)
    with torch.no_grad():
        ref = model(x)
        converted = convert_sync_batchnorm(create_model("cspresnext_tiny").eval())
        converted.load_state_dict(model.state_dict(), strict=True)
        assert not any(type(m) is nn.BatchNorm2d or type(m).__name__ == "BatchNormAct2d"
                       for m in converted.modules())
        assert (converted(x) - ref).abs().max().item() <= EVAL_ATOL
        broken = nn.SyncBatchNorm.convert_sync_batchnorm(create_model("cspresnext_tiny").eval())
        broken.load_state_dict(model.state_dict(), strict=True)
        assert (broken(x) - ref).abs().max().item() > 1e-2
