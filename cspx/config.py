"""The recipe schema, read before a run starts: one dataclass per YAML section, validated in
`__post_init__`.

Each key is documented in the recipe files (recipes/*.yaml) and in docs/recipes.md. An `auto` or
null value is resolved once, by cspx.resolve, and every stage reads the resolved config: no value
is derived from a key anywhere else. A key takes effect in one module (data.loader, data.format
and data.bad_shards in cspx.data.build; model.channels_last in cspx.placement and the loaders'
batch layout; ...); others may only report it (--dry-run's plan, the validate.py command a run
prints). `grep -rn "cfg.<section>.<key>" cspx` finds every reader.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Literal, Optional, Sequence, Tuple, TypeVar

from cspx import configio
from cspx.configio import ConfigValueError
from cspx.errors import CspxError

Interp = Literal["bilinear", "bicubic", "nearest"]


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigValueError(key, message)


@dataclass(frozen=True)
class RunConfig:
    dir: str = "runs/default"          # output folder: config.yaml, logs, checkpoints/
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: cuda:LOCAL_RANK if CUDA is usable
    log_every_steps: int = 100         # optimizer steps between loss reads (the only host syncs)
    tensorboard: bool = True
    # seconds without progress (a training step, an evaluation batch, a start-up phase's report)
    # after which the run writes every thread's stack to train.log and exits with status 3
    # (cspx.watchdog); 0 disables
    stall_timeout: float = 1800.0

    def __post_init__(self):
        _check(bool(self.dir), "dir", "must not be empty")
        _check(self.log_every_steps > 0, "log_every_steps",
               f"must be > 0, got {self.log_every_steps}")
        _check(self.stall_timeout == 0 or self.stall_timeout >= 1, "stall_timeout",
               f"must be 0 (off) or >= 1 second, got {self.stall_timeout}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cspresnext50"
    num_classes: Optional[int] = None  # None: the dataset's class count
    init_from: Optional[str] = None    # weights to start from (cspx or timm); not used on resume
    drop_path_rate: float = 0.0
    channels_last: bool = True
    compile: bool = False
    # torch.compile mode: "reduce-overhead" adds CUDA graphs (GPU), "max-autotune" searches kernels
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    sync_bn: bool = False

    def __post_init__(self):
        _check(self.num_classes is None or self.num_classes > 0, "num_classes", "must be > 0")
        _check(0.0 <= self.drop_path_rate < 1.0, "drop_path_rate", "must be in [0, 1)")


@dataclass(frozen=True)
class DataConfig:
    root: str = "/data/imagenet"       # train/<wnid>/ and val/<wnid>/, or shards (shards.json)
    # folder: ImageNet layout; shards: scripts/make_shards.py's output; auto: shards when root
    # holds a shards.json manifest, else folder (cspx.resolve writes the one it found)
    format: Literal["auto", "folder", "shards"] = "auto"
    # a shard failing the start-up check (truncated, corrupt): refuse (stop, naming it) or
    # exclude (leave its samples out, with a warning)
    bad_shards: Literal["refuse", "exclude"] = "refuse"
    classes: Optional[str] = None      # synset list fixing label indices
    exclude: Optional[str] = None      # exclusion list from scripts/check_dataset.py
    loader: Literal["torch", "dali", "auto"] = "auto"
    workers: int = 8                   # DataLoader workers / DALI CPU threads per process
    synthetic: bool = False            # generate the demo dataset into root if it is missing
    dali_hw_decoder_load: float = 0.65  # share of JPEGs sent to the A100/H100 hardware decoder
    # a dataset without a val split: hold out this share of each class of train/ (seeded by
    # `seed`; cspx.data.holdout); null: validate on val/
    val_split: Optional[float] = None

    def __post_init__(self):
        _check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        _check(self.val_split is None or 0.0 < self.val_split < 1.0, "val_split",
               f"must be in (0, 1) or null, got {self.val_split}")
        _check(0.0 <= self.dali_hw_decoder_load <= 1.0, "dali_hw_decoder_load", "must be in [0, 1]")


@dataclass(frozen=True)
class AugConfig:
    img_size: int = 224
    scale: Tuple[float, float] = (0.08, 1.0)     # random-resized-crop area fraction
    ratio: Tuple[float, float] = (0.75, 4 / 3)   # random-resized-crop aspect ratio
    interpolation: Interp = "bilinear"
    hflip: float = 0.5
    randaugment_ops: int = 0                     # 0 disables RandAugment
    randaugment_magnitude: float = 7.0           # timm's 0-10 scale
    # sampling of RandAugment's shear/rotate/translate: nearest is torchvision's default and
    # about 7x cheaper in DALI's CPU warps than bilinear
    randaugment_interpolation: Literal["nearest", "bilinear"] = "nearest"
    # the per-image augmentation policy (torchvision's ops on both paths): randaugment runs
    # randaugment_ops ops (0: none, so recipes written before this key keep their meaning);
    # trivialaugment is TrivialAugment Wide, autoaugment torchvision's ImageNet policy
    policy: Literal["randaugment", "trivialaugment", "autoaugment", "none"] = "randaugment"
    hue: float = 0.0        # darknet: shift hue by U(-hue, hue) of the colour circle
    saturation: float = 1.0  # darknet: scale saturation by s or 1/s, s ~ U(1, saturation)
    exposure: float = 1.0    # darknet: scale brightness the same way
    rotate: float = 0.0      # degrees, U(-rotate, rotate)
    # on the device after either loader, per micro-batch (cspx.data.batch_aug), as timm's Mixup:
    # lambda ~ Beta(alpha, alpha); an alpha of 0 turns that one off
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    # CutMix box sides drawn from [min, max] of the image sides instead of from lambda (CutMix is
    # then on, with alpha 1, as timm forces)
    cutmix_minmax: Optional[Tuple[float, float]] = None
    mix_prob: float = 1.0          # chance that a batch (or an image, per elem) is mixed at all
    mix_switch_prob: float = 0.5   # chance of CutMix rather than mixup when both are on
    mix_mode: Literal["batch", "elem"] = "batch"  # one lambda per micro-batch, or per image
    # random erasing (timm's RandomErasing) after normalization, on the device, per image
    erase_prob: float = 0.0
    erase_mode: Literal["const", "rand", "pixel"] = "pixel"  # 0 / N(0,1) per box / per pixel
    erase_count: int = 1           # boxes per erased image: uniform in 1..erase_count

    @property
    def mixing(self) -> bool:
        """Whether mixup or CutMix is on (then the loss takes soft targets)."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax is not None

    def __post_init__(self):
        _check(self.img_size >= 8, "img_size", f"must be >= 8, got {self.img_size}")
        lo, hi = self.scale
        _check(0.0 < lo <= hi <= 1.0, "scale",
               f"must satisfy 0 < min <= max <= 1, got {list(self.scale)}")
        lo, hi = self.ratio
        _check(0.0 < lo <= hi, "ratio", f"must satisfy 0 < min <= max, got {list(self.ratio)}")
        _check(0.0 <= self.hflip <= 1.0, "hflip", "must be in [0, 1]")
        _check(0 <= self.randaugment_ops <= 10, "randaugment_ops", "must be in [0, 10]")
        _check(0.0 <= self.randaugment_magnitude <= 10.0, "randaugment_magnitude",
               "must be in [0, 10] (timm's scale)")
        _check(0.0 <= self.hue <= 0.5, "hue", "must be in [0, 0.5]")
        _check(self.saturation > 0, "saturation", "must be > 0 (1 disables)")
        _check(self.exposure > 0, "exposure", "must be > 0 (1 disables)")
        _check(0.0 <= self.rotate <= 180.0, "rotate", "must be in [0, 180] degrees")
        _check(self.randaugment_ops == 0 or self.policy == "randaugment", "randaugment_ops",
               f"applies to aug.policy randaugment only, and aug.policy is {self.policy}; "
               f"set aug.randaugment_ops=0")
        _check(self.mixup_alpha >= 0, "mixup_alpha", "must be >= 0 (0 disables)")
        _check(self.cutmix_alpha >= 0, "cutmix_alpha", "must be >= 0 (0 disables)")
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            # timm draws each side from randint(int(side * min), int(side * max))
            _check(0.0 < lo < hi <= 1.0 and int(self.img_size * lo) < int(self.img_size * hi),
                   "cutmix_minmax", f"must satisfy 0 < min < max <= 1 with int(img_size * min) < "
                                    f"int(img_size * max), got {list(self.cutmix_minmax)}")
        _check(0.0 <= self.mix_prob <= 1.0, "mix_prob", "must be in [0, 1]")
        _check(0.0 <= self.mix_switch_prob <= 1.0, "mix_switch_prob", "must be in [0, 1]")
        _check(0.0 <= self.erase_prob <= 1.0, "erase_prob", "must be in [0, 1]")
        _check(1 <= self.erase_count <= 16, "erase_count", "must be in [1, 16]")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 8_000_000             # optimizer steps
    batch_size: int = 128              # images per optimizer step, over all ranks
    accum_steps: int = 1               # micro-batches per optimizer step (darknet subdivisions)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"
    label_smoothing: float = 0.1
    clip_grad_norm: Optional[float] = None
    deterministic: bool = False        # deterministic kernels (slower on GPU; CPU is already)
    # optimizer steps during which only the classifier trains (cspx.freeze); then everything
    freeze_backbone_steps: int = 0
    # a step whose loss or gradient norm is not finite (NaN, inf): stop the run (no checkpoint
    # holding one is written) or skip the step on the device as a GradScaler does (cspx.divergence)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # consecutive skipped steps (non-finite gradients under skip, and fp16 loss-scale skips)
    # that stop the run as a divergence
    max_skipped_steps: int = 50

    def __post_init__(self):
        _check(self.steps > 0, "steps", f"must be > 0, got {self.steps}")
        _check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.accum_steps > 0, "accum_steps", f"must be > 0, got {self.accum_steps}")
        _check(self.batch_size % self.accum_steps == 0, "batch_size",
               f"{self.batch_size} is not divisible by train.accum_steps={self.accum_steps}")
        _check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
        _check(self.clip_grad_norm is None or self.clip_grad_norm > 0, "clip_grad_norm",
               "must be > 0")
        _check(self.freeze_backbone_steps >= 0, "freeze_backbone_steps", "must be >= 0")
        _check(self.max_skipped_steps >= 1, "max_skipped_steps",
               f"must be >= 1, got {self.max_skipped_steps}")


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"  # torch.optim.SGD or torch.optim.AdamW (cspx.optim)
    lr: float = 0.1                    # peak LR for train.batch_size images per step
    momentum: float = 0.9              # sgd only
    nesterov: bool = False             # sgd only
    betas: Tuple[float, float] = (0.9, 0.999)  # adamw only: decay rates of the moment estimates
    eps: float = 1e-8                  # adamw only: added to the second moment's square root
    # sgd: L2 term added to the gradient; adamw: decoupled, w <- w - lr * wd * w. Conv and linear
    # weights only (darknet; torchvision's --norm-weight-decay 0)
    weight_decay: float = 0.005
    head_lr_mult: float = 1.0          # the classifier's LR as a multiple of the schedule's

    def __post_init__(self):
        _check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _check(0.0 <= self.momentum < 1.0, "momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(not self.nesterov or self.momentum > 0, "nesterov", "needs momentum > 0")
        _check(not self.nesterov or self.name == "sgd", "nesterov",
               f"is SGD's; optim.name is {self.name}")
        _check(all(0.0 <= b < 1.0 for b in self.betas), "betas",
               f"must both be in [0, 1), got {list(self.betas)}")
        _check(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _check(self.head_lr_mult > 0, "head_lr_mult", f"must be > 0, got {self.head_lr_mult}")


@dataclass(frozen=True)
class SchedConfig:
    """The LR curve over train.steps (cspx.schedule). Every kind may start with a linear warmup
    from warmup_lr (timm's); poly may instead start with darknet's burn-in, not both."""
    kind: Literal["poly", "cosine", "step"] = "poly"
    power: float = 4.0                 # poly: burn-in (i/burn_in)^p, decay (1 - i/steps)^p
    burn_in: int = 1000                # poly: optimizer steps of darknet's burn-in; 0: none
    warmup_steps: int = 0              # optimizer steps of linear warmup; 0: none
    warmup_lr: float = 0.0             # LR at step 0 of the warmup
    min_lr: float = 0.0                # poly and cosine: the LR the decay ends at
    decay_steps: int = 0               # step: the LR is multiplied by decay_rate every decay_steps
    decay_rate: float = 0.1            # step only

    def __post_init__(self):
        _check(self.power >= 0, "power", "must be >= 0")
        _check(self.burn_in >= 0, "burn_in", "must be >= 0")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(self.warmup_lr >= 0, "warmup_lr", "must be >= 0")
        _check(self.min_lr >= 0, "min_lr", "must be >= 0")
        _check(self.decay_steps >= 0, "decay_steps", "must be >= 0")
        _check(0.0 < self.decay_rate <= 1.0, "decay_rate",
               f"must be in (0, 1], got {self.decay_rate}")
        _check(self.kind == "poly" or self.burn_in == 0, "burn_in",
               f"darknet's burn-in belongs to sched.kind=poly; with {self.kind} set "
               f"sched.burn_in=0 and warm up with sched.warmup_steps")
        _check(self.burn_in == 0 or self.warmup_steps == 0, "warmup_steps",
               f"conflicts with sched.burn_in={self.burn_in} (darknet's burn-in); set one of "
               f"them to 0")
        _check(self.kind != "step" or self.decay_steps > 0, "decay_steps",
               "sched.kind=step needs decay_steps > 0")
        _check(self.kind == "step" or self.decay_steps == 0, "decay_steps",
               f"is used by sched.kind=step only; with {self.kind} set it to 0")
        _check(self.kind != "step" or self.min_lr == 0, "min_lr",
               "the step schedule has no floor (as timm's StepLRScheduler); set it to 0")


@dataclass(frozen=True)
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9998              # per optimizer step

    def __post_init__(self):
        _check(0.0 < self.decay < 1.0, "decay", f"must be in (0, 1), got {self.decay}")


@dataclass(frozen=True)
class EvalConfig:
    every_steps: int = 10_000          # 0: only at the end
    batch_size: int = 256              # per rank
    # null: the model's evaluation preset (cspx.models.eval_preset; cspresnext50: 224, 0.875,
    # bilinear), filled in by cspx.resolve
    img_size: Optional[int] = None
    crop_pct: Optional[float] = None   # shorter side resized to floor(img_size / crop_pct)
    interpolation: Optional[Interp] = None

    def __post_init__(self):
        _check(self.every_steps >= 0, "every_steps", "must be >= 0")
        _check(self.batch_size > 0, "batch_size", "must be > 0")
        _check(self.img_size is None or self.img_size >= 8, "img_size", "must be >= 8")
        _check(self.crop_pct is None or 0.0 < self.crop_pct <= 1.0, "crop_pct",
               f"must be in (0, 1], got {self.crop_pct}")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 5000            # 0: only at the end and on preemption
    keep_last: int = 3                 # step_*.pt files kept, besides best.pt and last.pt
    async_save: bool = True            # write in a background thread after a snapshot
    # consecutive failed saves (disk full, quota, file-size limit, I/O error) that stop the run;
    # a failed final or preemption save stops it at once
    max_failed_saves: int = 3

    def __post_init__(self):
        _check(self.every_steps >= 0, "every_steps", "must be >= 0")
        _check(self.keep_last >= 1, "keep_last", "must be >= 1")
        _check(self.max_failed_saves >= 1, "max_failed_saves",
               f"must be >= 1, got {self.max_failed_saves}")


@dataclass(frozen=True)
class Config:
    seed: int = 0
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        _check(self.seed >= 0, "seed", "must be >= 0")
        lr = self.optim.lr
        _check(self.sched.min_lr <= lr, "sched.min_lr",
               f"{self.sched.min_lr:g} is above optim.lr={lr:g}")
        _check(self.sched.warmup_lr <= lr, "sched.warmup_lr",
               f"{self.sched.warmup_lr:g} is above optim.lr={lr:g}")


# What a recipe must say itself: without them an empty or partial file would quietly train the
# defaults' model on the defaults' data path. The file or the command line may set them.
REQUIRED = ("run.dir", "model.name", "data.root", "train.steps", "train.batch_size", "optim.lr")


# A recipe value the command line must supply, as in Hydra/OmegaConf: `???`, optionally followed
# by what is needed (recipes/finetune.yaml: `init_from: "??? the weights to fine-tune ..."`).
MISSING = "???"


def load_config(path: str, overrides: Sequence[str] = (), check_paths: bool = True) -> Config:
    merged = configio.flatten(configio.merge(configio.read_yaml(path),
                                             configio.parse_overrides(overrides)))
    needed = {k: v[len(MISSING):].strip() for k, v in merged.items()
              if isinstance(v, str) and v.startswith(MISSING)}
    if needed:
        what = " and ".join(f"{k} ({v})" if v else k for k, v in needed.items())
        raise CspxError(f"{path}: this recipe needs {what}; add "
                        f"{' '.join(k + '=...' for k in needed)} to the command line")
    cfg = configio.load(Config, path, overrides)
    given = set(merged)
    missing = [k for k in REQUIRED if k not in given]
    if missing:
        raise CspxError(f"{path}: the recipe does not set {', '.join(missing)}; a recipe names at "
                        f"least {', '.join(REQUIRED)} (recipes/ has complete examples)")
    if check_paths:
        overridden = set(configio.flatten(configio.parse_overrides(overrides)))
        _check_paths(cfg, lambda key: "command line" if key in overridden else path)
    return cfg


def _check_paths(cfg: Config, source) -> None:
    """Paths must exist; `source(key)` names where the key was set (file or command line)."""
    d = cfg.data
    if not d.synthetic and not os.path.isdir(os.path.expanduser(d.root)):
        raise CspxError(f"{source('data.root')}: data.root: folder {d.root!r} does not exist")
    for key, p in (("data.classes", d.classes), ("data.exclude", d.exclude),
                   ("model.init_from", cfg.model.init_from)):
        if p is not None and not os.path.isfile(os.path.expanduser(p)):
            raise CspxError(f"{source(key)}: {key}: file {p!r} does not exist")


T = TypeVar("T")


def resolved(value: Optional[T], key: str) -> T:
    """A value cspx.resolve fills in (model.num_classes, eval.img_size, ...), read from a
    resolved config; a ValueError for one that is not resolved."""
    if value is None:
        raise ValueError(f"{key} is not resolved (see cspx.resolve)")
    return value


def micro_batch(cfg: Config, world_size: int) -> int:
    """Images per forward pass on one rank: batch_size / (world_size * accum_steps)."""
    t = cfg.train
    denom = world_size * t.accum_steps
    if t.batch_size % denom:
        raise CspxError(f"train.batch_size={t.batch_size} is not divisible by world_size "
                        f"({world_size}) x train.accum_steps ({t.accum_steps})")
    return t.batch_size // denom


def with_updates(cfg: Config, **sections) -> Config:
    """Config with some section fields replaced: with_updates(cfg, train={'precision': 'bf16'})."""
    return replace(cfg, **{k: replace(getattr(cfg, k), **v) for k, v in sections.items()})
