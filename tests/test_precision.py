"""cspx.precision: what a loader hands the model for each precision and device."""
from __future__ import annotations

import os

import pytest
import torch

from cspx import precision

F16, F32 = torch.float16, torch.float32


@pytest.mark.parametrize("name,device,dtype", [
    ("fp32", "cpu", F32), ("bf16", "cpu", F32), ("fp16", "cpu", F16),
    ("fp32", "cuda", F32), ("bf16", "cuda", F16), ("fp16", "cuda", F16)])
def test_loader_dtype_table(name, device, dtype):
    """float16 out of the loader on a GPU for both half precisions (half the bytes; autocast
    casts to bfloat16 anyway); float32 on the CPU as before, and for fp32 everywhere."""
    assert precision.loader_dtype(name, torch.device(device)) == dtype


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_a_cpu_bf16_run_loads_float32(kind, small_imagenet, tmp_path):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    from cspx.config import load_config
    from cspx.data.build import build_train_loader
    from cspx.data.index import build_index
    from cspx.distributed import DistEnv
    from cspx.resolve import resolve
    cfg = load_config("recipes/demo.yaml", ["train.precision=bf16", f"data.loader={kind}",
                                             "train.batch_size=4", "data.workers=0",
                                             "aug.img_size=32"], check_paths=False)
    cpu = torch.device("cpu")
    cfg = resolve(cfg, DistEnv(device=cpu), num_classes=1000)
    assert cfg.train.precision == "bf16"
    loader = build_train_loader(cfg, build_index(os.path.join(small_imagenet, "train")),
                                DistEnv(device=cpu), str(tmp_path))
    x, y = next(loader)
    loader.close()
    assert x.dtype == F32 and x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
