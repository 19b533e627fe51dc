"""The model, built at setup and by the tools: the CSPNet family as data, a table of frozen
configs (with each model's evaluation preset) and one builder.

Cross Stage Partial networks (Wang et al., 2019, arXiv:1911.11929) split each stage's feature map
in two along channels: one half runs through the stage's residual blocks, the other skips them,
and a 1x1 "transition" conv merges the two. The ImageNet models here follow timm's layout
(timm/models/cspnet.py) key for key, so timm's released weights load with `strict=True`:

  stem        conv kxk (+ BN + act) [+ 3x3/2 max-pool]
  stages.i    conv_down 3x3/s (identity when the stage keeps the resolution)
              conv_exp 1x1 -> split -> blocks on the second half
              conv_transition_b 1x1 on the blocks' output, concat with the first half,
              conv_transition 1x1
  head        global average pool -> dropout -> fc

Every conv is bias-free and followed by a BatchNorm that also applies the activation (timm's
BatchNormAct2d), which is why the activation modules live at `<conv>.bn.act`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Dict, List, Optional, Tuple, TypeVar, Union

import torch
from torch import nn

from cspx.errors import CspxError
from cspx.models.layers import ACTIVATIONS, ConvNormAct, convert_groupnorm, drop_path_or_identity

N = TypeVar("N", int, float)
PerStage = Union[N, Tuple[N, ...]]  # one value for every stage, or one per stage


def _at(v: PerStage[N], i: int) -> N:
    """Stage i's value of a per-stage field: a tuple with one value per stage once
    CspConfig.__post_init__ has run."""
    assert isinstance(v, tuple), v
    return v[i]


@dataclass(frozen=True)
class EvalPreset:
    """How a model is evaluated by default: the shorter side is resized to
    floor(img_size / crop_pct) with `interpolation`, then centre-cropped to img_size (px).
    Recipes and validate.py flags that are null / not given take these values.

    Source: the model card, not timm's current pretrained config. For cspresnext50 the card's
    protocol is 224 px, crop 0.875, bilinear: the one its published 80.05 / 94.94 top-1 / top-5
    were measured with, and the resolution in its weights file's own name
    (cspresnext50_ra_224-648b4713.pth). timm's pretrained config for `cspresnext50.ra_in1k`
    (timm 1.0.31, `default_cfgs` in timm/models/cspnet.py, through its `_cfg` defaults) says
    input_size (3, 256, 256) and crop_pct 0.887, bilinear: another protocol, which does not give
    the card's numbers. cspx follows the card so that validate.py's defaults reproduce them;
    models with no entry of their own take these defaults."""
    img_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"


@dataclass(frozen=True)
class CspConfig:
    """One architecture. Per-stage fields take a tuple (one value per stage) or a scalar; a
    shorter tuple is padded with its last value, as in timm, so `stride=(1, 2)` means 1, 2, 2, 2."""
    stem_chs: int                 # stem conv output channels
    stem_kernel: int              # stem conv kernel size (px)
    stem_stride: int              # stem conv stride (px)
    stem_pool: bool               # 3x3 stride-2 max-pool after the stem conv
    depth: Tuple[int, ...]        # residual blocks per stage
    out_chs: Tuple[int, ...]      # stage output channels
    stride: PerStage[int] = 2     # stage downsampling stride (px), applied by conv_down
    groups: PerStage[int] = 1     # groups of every 3x3 conv in the stage (ResNeXt cardinality)
    expand_ratio: PerStage[float] = 1.0  # conv_exp channels / out_chs; its output is split in two
    bottle_ratio: PerStage[float] = 1.0  # block inner channels / block output channels
    block_ratio: PerStage[float] = 1.0   # block output channels / out_chs
    block: str = "bottle"         # "bottle": 1x1-3x3-1x1 +x, act; "dark": 1x1-3x3 +x (no act)
    cross_linear: bool = False    # conv_exp without activation
    down_growth: bool = False     # conv_down widens to out_chs (else keeps the input width)
    act: str = "leaky_relu"
    norm: str = "batchnorm"       # "groupnorm": per-sample normalisation (batch-split invariant)
    zero_init_last: bool = True   # last BN gamma of every block = 0: blocks start as identity
    note: str = ""                # one-line description of the table entry
    # evaluation protocol; 224 px, crop 0.875, bilinear is cspresnext50's model card (80.05 top-1)
    eval_preset: EvalPreset = EvalPreset()

    def __post_init__(self):
        for name in ("depth", "out_chs"):  # lists (e.g. from YAML) become tuples: hashable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.depth)
        if n == 0 or len(self.out_chs) != n:
            raise CspxError(f"model config: depth {self.depth} and out_chs {self.out_chs} "
                            "must name the same, non-zero number of stages")
        for name in ("stride", "groups", "expand_ratio", "bottle_ratio", "block_ratio"):
            v = getattr(self, name)
            v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
            if not v or len(v) > n:
                raise CspxError(f"model config: {name} {v} needs 1 to {n} values (one per stage)")
            object.__setattr__(self, name, v + (v[-1],) * (n - len(v)))
        for name, allowed in (("block", ("bottle", "dark")), ("act", tuple(ACTIVATIONS)),
                              ("norm", ("batchnorm", "groupnorm"))):
            if getattr(self, name) not in allowed:
                raise CspxError(f"model config: {name} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, name)!r}")


MODELS: Dict[str, CspConfig] = {
    # 20.57M params, 3.07 GMACs at 224 px; the model this project reproduces.
    "cspresnext50": CspConfig(
        stem_chs=64, stem_kernel=7, stem_stride=2, stem_pool=True,
        depth=(3, 3, 5, 2), out_chs=(256, 512, 1024, 2048), stride=(1, 2), groups=32,
        expand_ratio=1.0, bottle_ratio=1.0, block_ratio=0.5, cross_linear=True,
        note="CSPResNeXt-50 (timm cspresnext50)"),
    # 21.62M params, 3.46 GMACs at 224 px.
    "cspresnet50": CspConfig(
        stem_chs=64, stem_kernel=7, stem_stride=2, stem_pool=True,
        depth=(3, 3, 5, 2), out_chs=(128, 256, 512, 1024), stride=(1, 2),
        expand_ratio=2.0, bottle_ratio=0.5, block_ratio=1.0, cross_linear=True,
        note="CSPResNet-50 (timm cspresnet50)"),
    # 27.64M params, 5.00 GMACs at 224 px (full-resolution stem: no stride before stage 0).
    "cspdarknet53": CspConfig(
        stem_chs=32, stem_kernel=3, stem_stride=1, stem_pool=False,
        depth=(1, 2, 8, 8, 4), out_chs=(64, 128, 256, 512, 1024), stride=2,
        expand_ratio=(2.0, 1.0), bottle_ratio=(0.5, 1.0), block_ratio=(1.0, 0.5),
        block="dark", down_growth=True,
        note="CSPDarknet-53 (timm cspdarknet53)"),
    # Not a timm model: cspresnext50's layout (7x7/2 stem + max-pool, grouped bottlenecks,
    # linear conv_exp, half-width blocks) at 1/8 of its width and 1-2 blocks per stage, for CPU
    # tests and the demo. 0.52M params (0.26M of them in the 1000-class fc), 5.7 MMACs at
    # 64 px; total stride 32, so 32 px inputs reach the head as 1x1 maps.
    "cspresnext_tiny": CspConfig(
        stem_chs=16, stem_kernel=7, stem_stride=2, stem_pool=True,
        depth=(1, 1, 2, 1), out_chs=(32, 64, 128, 256), stride=(1, 2), groups=8,
        expand_ratio=1.0, bottle_ratio=1.0, block_ratio=0.5, cross_linear=True,
        note="narrow, shallow cspresnext50 for tests and the CPU demo (not a timm model)",
        eval_preset=EvalPreset(img_size=64)),  # the demo's resolution
    # cspresnext_tiny with GroupNorm(8) in place of BatchNorm: no statistics shared across the
    # samples of a batch, so 2 ranks x 4 images, 4 micro-batches x 2 and 1 x 8 compute the same
    # step (up to summation order). Used to test distributed training and accumulation.
}
MODELS["cspresnext_tiny_gn"] = replace(
    MODELS["cspresnext_tiny"], norm="groupnorm",
    note="cspresnext_tiny with GroupNorm: batch-split invariant (not a timm model)")


class BottleneckBlock(nn.Module):
    """ResNe(X)t bottleneck: 1x1 -> 3x3 (grouped) -> 1x1 (no act), + shortcut, then act.
    attn2/attn3 are Identity (timm's attention slots; no CSP ImageNet model uses them)."""

    def __init__(self, in_chs: int, out_chs: int, bottle_ratio: float, groups: int, act: str,
                 drop_path: float = 0.0):
        super().__init__()
        mid = int(round(out_chs * bottle_ratio))
        self.conv1 = ConvNormAct(in_chs, mid, 1, act=act)
        self.conv2 = ConvNormAct(mid, mid, 3, groups=groups, act=act)
        self.attn2 = nn.Identity()
        self.conv3 = ConvNormAct(mid, out_chs, 1, act=act, apply_act=False)
        self.attn3 = nn.Identity()
        self.drop_path = drop_path_or_identity(drop_path)
        self.act3 = ACTIVATIONS[act](False)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn3(self.conv3(self.attn2(self.conv2(self.conv1(x)))))
        return self.act3(self.drop_path(y) + x)


class DarkBlock(nn.Module):
    """Darknet residual block: 1x1 -> 3x3 (both activated), + shortcut, no activation after."""

    def __init__(self, in_chs: int, out_chs: int, bottle_ratio: float, groups: int, act: str,
                 drop_path: float = 0.0):
        super().__init__()
        mid = int(round(out_chs * bottle_ratio))
        self.conv1 = ConvNormAct(in_chs, mid, 1, act=act)
        self.attn = nn.Identity()
        self.conv2 = ConvNormAct(mid, out_chs, 3, groups=groups, act=act)
        self.drop_path = drop_path_or_identity(drop_path)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path(self.conv2(self.attn(self.conv1(x)))) + x


BLOCKS = {"bottle": BottleneckBlock, "dark": DarkBlock}


class CrossStage(nn.Module):
    def __init__(self, cfg: CspConfig, i: int, in_chs: int, drop_paths: List[float]):
        super().__init__()
        out_chs, stride, groups, act = (cfg.out_chs[i], _at(cfg.stride, i), _at(cfg.groups, i),
                                        cfg.act)
        self.expand_chs = exp = int(round(out_chs * _at(cfg.expand_ratio, i)))
        block_chs = int(round(out_chs * _at(cfg.block_ratio, i)))
        self.conv_down: nn.Module
        if stride != 1:
            down = out_chs if cfg.down_growth else in_chs
            self.conv_down = ConvNormAct(in_chs, down, 3, stride, groups=groups, act=act)
            in_chs = down
        else:
            self.conv_down = nn.Identity()
        self.conv_exp = ConvNormAct(in_chs, exp, 1, act=act, apply_act=not cfg.cross_linear)
        self.blocks = nn.Sequential()
        prev = exp // 2
        for j, p in enumerate(drop_paths):
            self.blocks.add_module(str(j), BLOCKS[cfg.block](
                prev, block_chs, _at(cfg.bottle_ratio, i), groups, act, drop_path=p))
            prev = block_chs
        self.conv_transition_b = ConvNormAct(prev, exp // 2, 1, act=act)
        self.conv_transition = ConvNormAct(exp, out_chs, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_exp(self.conv_down(x))               # [N, exp, H, W]
        cross, part = x.split(self.expand_chs // 2, dim=1)  # first half skips the blocks
        part = self.conv_transition_b(self.blocks(part))
        return self.conv_transition(torch.cat([cross, part], dim=1))


class ClassifierHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        # [N, C, H, W] -> [N, C]; child names as in timm's SelectAdaptivePool2d
        self.global_pool = nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1),
                                                     flatten=nn.Flatten(1)))
        self.drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = (nn.Linear(in_features, num_classes) if num_classes > 0
                              else nn.Identity())
        self.flatten = nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))  # [N, C]
        return x if pre_logits else self.flatten(self.fc(x))


def _init_weights(module: nn.Module, zero_init_last: bool) -> None:
    """timm's init: He-normal (fan_out) convs, N(0, 0.01) fc, zero biases, BN gamma 1 / beta 0,
    and gamma 0 in each block's last BN. Convs are visited in construction order, so with the same
    seed the weights equal timm's bit for bit."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            nn.init.zeros_(m.bias)
        elif zero_init_last and isinstance(m, (BottleneckBlock, DarkBlock)):
            m.zero_init_last()


class CspNet(nn.Module):
    """Input [N, in_chans, H, W] (any H, W >= 32 px) -> logits [N, num_classes]."""

    def __init__(self, cfg: CspConfig, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, name: str = ""):
        super().__init__()
        self.model_name, self.cfg = name, cfg
        self.num_classes, self.in_chans = num_classes, in_chans
        self.stem = nn.Sequential()
        self.stem.add_module("conv1", ConvNormAct(in_chans, cfg.stem_chs, cfg.stem_kernel,
                                                  cfg.stem_stride, act=cfg.act))
        if cfg.stem_pool:
            self.stem.add_module("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        # drop-path rate rises linearly from 0 at the first block to drop_path_rate at the last;
        # on the CPU so it stays readable inside a `with torch.device("meta"/"cuda")` block
        rates = torch.linspace(0, drop_path_rate, sum(cfg.depth), device="cpu")
        rates = rates.split(list(cfg.depth))
        self.stages = nn.Sequential()
        prev = cfg.stem_chs
        for i, r in enumerate(rates):
            self.stages.add_module(str(i), CrossStage(cfg, i, prev, r.tolist()))
            prev = cfg.out_chs[i]
        self.num_features = prev
        self.head = ClassifierHead(prev, num_classes, drop_rate)
        _init_weights(self, cfg.zero_init_last)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new fc for `num_classes` (0: none, forward returns pooled features), N(0, 0.01)."""
        ref = next(self.parameters())
        self.num_classes = num_classes
        fc: nn.Module
        if num_classes > 0:
            fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            _init_weights(fc, False)
        else:
            fc = nn.Identity()
        self.head.fc = fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # [N, num_features, H/32, W/32]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def list_models() -> List[str]:
    return sorted(MODELS)


def model_config(name: str) -> CspConfig:
    if name not in MODELS:
        raise CspxError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return MODELS[name]


def eval_preset(name: str) -> EvalPreset:
    """The default evaluation protocol of model `name`."""
    return model_config(name).eval_preset


def eval_protocol(model_name: str, *, img_size: Optional[int] = None,
                  crop_pct: Optional[float] = None,
                  interpolation: Optional[str] = None) -> EvalPreset:
    """How a model, or a checkpoint of it, is evaluated: `model_name`'s preset (eval_preset),
    with each value given (not None) in its place. For a checkpoint, `model_name` is the
    architecture it records (weights.build_model_from_checkpoint's info["model_name"]).

    The one place an evaluation protocol is filled in: cspx.resolve (a recipe's eval.*),
    validate.py and export.py (their flags), predict, and the benchmarks. Values are not checked
    here: the recipe schema and the command lines check what they accept."""
    preset = eval_preset(model_name)
    return EvalPreset(img_size=preset.img_size if img_size is None else img_size,
                      crop_pct=preset.crop_pct if crop_pct is None else crop_pct,
                      interpolation=preset.interpolation if interpolation is None
                      else interpolation)


_MODEL_ARGS = ("in_chans", "drop_rate")


def create_model(name: str, num_classes: int = 1000, drop_path_rate: float = 0.0,
                 **overrides) -> CspNet:
    """Build `name` from the table. `overrides` replace CspConfig fields (e.g. act="relu",
    zero_init_last=False) or set `in_chans` / `drop_rate` (dropout before the fc)."""
    cfg = model_config(name)
    known = {f.name for f in fields(CspConfig)} | set(_MODEL_ARGS)
    bad = sorted(set(overrides) - known)
    if bad:
        raise CspxError(f"create_model({name!r}): unknown option(s) {', '.join(bad)}; "
                        f"valid: {', '.join(sorted(known))}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise CspxError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    model_args = {k: overrides.pop(k) for k in _MODEL_ARGS if k in overrides}
    if overrides:
        values = {f.name: getattr(cfg, f.name) for f in fields(CspConfig)}
        cfg = CspConfig(**{**values, **overrides})
    model = CspNet(cfg, num_classes=num_classes, drop_path_rate=drop_path_rate, name=name,
                   **model_args)
    if cfg.norm == "groupnorm":
        convert_groupnorm(model)  # in place below the top module: it replaces model's children
    return model
