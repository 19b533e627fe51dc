"""cspx's training step against timm's train.py, bit for bit: the real Trainer (optimizer, loss,
LR schedule, the loop around them) and the step timm's train.py composes from timm's own parts,
on the same weights and the same batches, must end with equal tensors after 20 steps on the
CPU. Any change around the step that alters a rounding (the optimizer's kernel, the loss, the
LR's arithmetic) breaks it."""
from __future__ import annotations

import os
from argparse import Namespace

import pytest
import torch

from conftest import ROOT

STEPS, BATCH, CLASSES = 20, 8, 10


@pytest.fixture
def one_thread():
    """Both sides on one thread: the same kernels, and no wait on a busy machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_twenty_trainer_steps_equal_timms_train_py_bit_for_bit(tmp_path, one_thread):
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from cspx.bench.fixed import FixedBatchLoader
    from cspx.bench.steps import SYNTHETIC_ONLY, bench_config, make_trainer
    from test_model import timm_tiny

    cpu = torch.device("cpu")
    args = Namespace(model="cspresnext_tiny", batch=BATCH, img_size=32, precision="auto",
                     channels_last=False, workers=0, set=[], device="cpu",
                     recipe=os.path.join(ROOT, "recipes", "cspresnext50_ra.yaml"))
    # the recipe's SGD (momentum 0.9, decay 0.005 on conv and linear weights), smoothing 0.1
    # and poly decay of power 4 over the run, without the burn-in timm has no equivalent of
    cfg = bench_config(args, SYNTHETIC_ONLY, f"train.steps={STEPS}",
                       f"model.num_classes={CLASSES}")
    assert (cfg.train.precision, cfg.sched.burn_in, cfg.optim.nesterov) == ("fp32", 0, False)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(BATCH, 3, 32, 32, generator=g),
                torch.randint(0, CLASSES, (BATCH,), generator=g)) for _ in range(STEPS)]

    class Batches(FixedBatchLoader):
        def __next__(self):
            self.consumed += 1
            return batches[self.consumed - 1]

    trainer = make_trainer(cfg, cpu, Batches(images=batches[0][0], labels=batches[0][1]),
                           str(tmp_path))
    ref = timm_tiny(num_classes=CLASSES).train()
    ref.load_state_dict(trainer.model.state_dict())
    # train.py with --opt momentum --lr 0.1 --momentum 0.9 --weight-decay 0.005 --smoothing 0.1
    # --sched poly --decay-rate 4 --sched-on-updates --warmup-epochs 0 --min-lr 0
    opt = create_optimizer_v2(ref, opt="momentum", lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                              weight_decay=cfg.optim.weight_decay)
    sched, _ = create_scheduler_v2(opt, sched="poly", num_epochs=1, decay_rate=cfg.sched.power,
                                   warmup_epochs=0, min_lr=0.0, step_on_epochs=False,
                                   updates_per_epoch=STEPS)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=cfg.train.label_smoothing)

    trainer.fit(until=STEPS)
    for update, (x, y) in enumerate(batches, 1):  # train_one_epoch, one update per batch
        opt.zero_grad()
        loss_fn(ref(x), y).backward()
        opt.step()
        sched.step_update(num_updates=update)

    assert trainer.progress.step == STEPS
    ours, theirs = trainer.model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not differ, differ
    # and the optimizer state the next step would use
    for p, q in zip(trainer.model.parameters(), ref.parameters()):
        assert torch.equal(trainer.optimizer.state[p]["momentum_buffer"],
                           opt.state[q]["momentum_buffer"])
