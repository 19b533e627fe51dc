"""Numeric precision, used by every stage: the names a recipe or flag uses, their autocast dtypes,
loss scaling, and the dtype a loader hands to the model.

This module is the only reader of `train.precision`; the trainer, the loaders and validate.py ask
it instead of keeping their own tables. Names: fp32 (no autocast), bf16 (autocast to bfloat16),
fp16 (autocast to float16 with a GradScaler); `auto` is resolved once, by `resolve`.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

NAMES = ("fp32", "bf16", "fp16")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(name: str, device: torch.device) -> str:
    """'auto': bf16 on GPUs that have it, fp16 (with loss scaling) on older GPUs, fp32 on CPU
    (bf16 autocast is slower than fp32 on most CPUs)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(name: str, device: torch.device) -> ContextManager:
    """The autocast context of a precision: a no-op for fp32."""
    dtype = AMP_DTYPES[name]
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def uses_loss_scaling(name: str) -> bool:
    """fp16 gradients underflow without a GradScaler; bf16 has fp32's exponent range."""
    return name == "fp16"


def loader_dtype(name: str, device: torch.device) -> torch.dtype:
    """What a loader hands the model (normalized images, about -2.1..2.6).

    fp16 runs get float16. bf16 runs on a GPU get float16 too: half the bytes of float32 out of
    the loader and into the first convolution, which autocast casts to bfloat16 anyway (float16
    holds these values with 3 more mantissa bits than bfloat16, so nothing is lost). fp32 runs,
    and everything on the CPU, get float32, unchanged from earlier versions."""
    if name == "fp16" or (name == "bf16" and device.type == "cuda"):
        return torch.float16
    return torch.float32


def configure_backends(device: torch.device, deterministic: bool = False,
                       tf32: bool = True) -> None:
    """Kernel choices: deterministic algorithms (and no cuDNN autotuning) when asked; on a GPU,
    cuDNN autotuning for the fixed input shapes and, with `tf32`, TF32 tensor cores for fp32
    matmuls and convolutions (training). Without `tf32` torch's defaults stay (validation).
    On the CPU, host memory freed by one step serves the next (cspx.hostmem)."""
    import os
    if device.type == "cpu":
        from cspx import hostmem
        hostmem.retain_freed_memory()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True


def of(cfg) -> str:
    """A resolved config's precision name."""
    name = cfg.train.precision
    if name not in NAMES:
        raise ValueError(f"train.precision {name!r} is not resolved (see cspx.resolve)")
    return name
