"""CUDA paths (run by scripts/gpu_check.sh with `pytest -m gpu`; skipped without a GPU). Tests
marked `compile` run in gpu_check's own compile step, after the others."""
from __future__ import annotations

import importlib.util
import tempfile

import pytest
import torch

from conftest import run_py

pytestmark = pytest.mark.gpu


def make(recipe_over, loader=None, steps=4, batch=32):
    """A trainer on a fixed batch shaped and typed as the run's loader would hand it over."""
    from cspx.bench.steps import make_trainer, synthetic
    from cspx.config import load_config
    from cspx.distributed import DistEnv
    from cspx.resolve import resolve
    cfg = load_config("recipes/cspresnext50_ra.yaml",
                      ["run.device=cuda", f"train.steps={steps}", "sched.burn_in=1",
                       f"train.batch_size={batch}", "eval.every_steps=0", "run.tensorboard=false",
                       *recipe_over], check_paths=False)
    dev = torch.device("cuda", 0)
    cfg = resolve(cfg, DistEnv(device=dev), num_classes=1000)
    torch.manual_seed(0)
    loader = loader or synthetic(cfg, dev)
    return make_trainer(cfg, dev, loader, tempfile.mkdtemp()), cfg


def test_no_host_sync_inside_training_steps():
    """Between log intervals a step never waits for the GPU: CUDA's sync debug mode turns any
    synchronising call (.item(), .cpu(), nonzero, ...) into an error."""
    t, _ = make(["train.precision=bf16", "run.log_every_steps=1000", "ema.enabled=true"])
    t.train_step()                      # first step: allocations, cudnn autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            t.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_fp16_gradscaler_step_and_state():
    t, _ = make(["train.precision=fp16"])
    for _ in range(3):
        t.train_step()
    state = t.ckpt.state_dict()
    assert state["scaler"]["scale"] > 0 and state["scaler"]["_growth_tracker"] >= 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.compile
def test_compile_channels_last_checkpoint_has_plain_keys():
    # batch 128, as gpu_check's compile benchmark before it: the compiled graph is in its cache
    t, _ = make(["train.precision=bf16", "model.compile=true", "model.channels_last=true"],
                batch=128)
    for _ in range(2):
        t.train_step()
    keys = list(t.ckpt.state_dict()["model"])
    assert keys[0] == "stem.conv1.conv.weight"
    assert not any("_orig_mod" in k or "module." in k for k in keys)
    w = t.model.stem.conv1.conv.weight
    assert w.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.compile
def test_cuda_graphs_train_as_eager_does():
    """mode reduce-overhead (CUDA graphs replaying forward and backward, outside them the fused
    SGD step) computes what eager mode computes: the same losses from the same weights and
    batch, up to bf16 rounding of differently fused kernels."""
    losses = {}
    for mode in ("eager", "reduce-overhead"):
        over = ["train.precision=bf16", "model.channels_last=true", "run.log_every_steps=1"]
        if mode != "eager":
            over += ["model.compile=true", f"model.compile_mode={mode}"]
        t, _ = make(over, steps=6, batch=128)
        got = []
        for _ in range(5):
            t.progress.loss_sum.zero_()
            t.train_step()
            got.append(float(t.progress.loss_sum))
        losses[mode] = got
        torch.compiler.reset()
    print("\nlosses eager / reduce-overhead:", losses)
    for a, b in zip(losses["eager"], losses["reduce-overhead"]):
        assert abs(a - b) <= 0.02 * abs(a)


def test_auto_precision_is_bf16_or_fp16_on_gpu():
    from cspx.precision import resolve
    p = resolve("auto", torch.device("cuda", 0))
    assert p == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


def test_demo_trains_on_gpu_with_dali(demo_data, tmp_path):
    # TensorBoard (its image grid holds a DALI batch) where the machine has it
    tb = importlib.util.find_spec("tensorboard") is not None
    r = run_py(["train.py", "--recipe", "recipes/demo.yaml", f"run.dir={tmp_path}",
                f"data.root={demo_data}", "run.device=cuda", "data.loader=dali",
                "train.precision=auto", "train.steps=60", "sched.burn_in=5", "eval.every_steps=60",
                "model.channels_last=true",
                f"run.tensorboard={str(tb).lower()}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dali loader" in r.stderr and "cuda" in r.stderr


@pytest.mark.compile
def test_fused_adamw_compiled_across_the_unfreeze():
    """AdamW's fused CUDA kernel with a classifier LR, compiled, the backbone frozen for 2
    steps: the frozen steps leave the backbone exactly as it was, the model is recompiled once
    at the unfreeze, and from then on the backbone trains."""
    # the tiny model at 64 px: two small graphs to compile (frozen, then whole)
    t, _ = make(["train.precision=bf16", "model.compile=true", "optim.name=adamw",
                 "optim.lr=1e-3", "optim.head_lr_mult=10", "train.freeze_backbone_steps=2",
                 "model.name=cspresnext_tiny", "aug.img_size=64"], steps=4, batch=64)
    assert all(g["fused"] for g in t.optimizer.param_groups)
    w = t.model.stem.conv1.conv.weight
    before = w.detach().clone()
    t.train_step()
    t.train_step()
    assert torch.equal(w, before) and not w.requires_grad
    t.train_step()                      # step 2: unfrozen, wrapped and compiled again
    t.train_step()
    assert w.requires_grad and not torch.equal(w, before)
    state = t.state_dict()
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
