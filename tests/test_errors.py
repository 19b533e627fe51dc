"""Every error that user input can reach is a CspxError: one line naming the file, key or value,
exit code 2, no traceback unless --verbose (cspx/errors.py); a run that cannot go on (diverged,
its checkpoints cannot be written) is a RunFailure: one line, exit code 1. The raise sites are
walked here."""
from __future__ import annotations

import ast
import glob
import os

import numpy as np
import pytest
import torch

from conftest import ROOT, run_main
from cspx.data.index import FolderSplit
from cspx.errors import CspxError

# Every `raise` in cspx/ and scripts/ of an exception other than CspxError, with why user input
# cannot reach it (or where it becomes a CspxError). A new raise site must be added here, with
# its reason, or raise CspxError: the walk below fails on anything unlisted.
INTERNAL = {
    ("cspx/config.py", "ConfigValueError"): "turned into a CspxError naming file and key by "
                                            "configio.build",
    ("cspx/configio.py", "TypeError"): "a config dataclass field of a type the schema code does "
                                       "not know: a programming error",
    ("cspx/precision.py", "ValueError"): "an unresolved config reached a consumer: a programming "
                                         "error (cspx.resolve runs first)",
    ("cspx/config.py", "ValueError"): "config.resolved read a value resolve had not filled in: a "
                                      "programming error (cspx.resolve runs first)",
    ("cspx/resolve.py", "ValueError"): "resolve called with neither the data nor a class count: "
                                       "a programming error",
    ("cspx/export.py", "RuntimeError"): "torch's exporter itself failed: a bug to report, with "
                                        "its traceback",
    ("cspx/data/loader.py", "RuntimeError"): "load_state_dict after the first batch: a "
                                             "programming error",
    ("cspx/checkpoint/checkpointer.py", "RuntimeError"): "a save before the run's parts "
                                                         "registered: a programming error",
    ("cspx/checkpoint/layout.py", "ValueError"): "parts registered under names the layout does "
                                                 "not have: a programming error",
    ("cspx/data/dali_loader.py", "ValueError"): "a dtype other than precision.loader_dtype's: a "
                                                "programming error",
    ("cspx/data/mixup.py", "ValueError"): "a mixing mode or alphas that AugConfig refuses "
                                          "first: a programming error",
    ("cspx/data/erasing.py", "ValueError"): "an erasing mode AugConfig refuses first: a "
                                            "programming error",
    ("cspx/data/shard_writer.py", "ValueError"): "samples added out of order by make_shards: a "
                                           "programming error",
    ("cspx/data/shard_reader.py", "OSError"): "a shard shorter than its checked size: the torch "
                                              "path replaces and counts the sample, as any read "
                                              "or decode failure",
    ("cspx/train_loop.py", "ValueError"): "train.on_nonfinite=skip with an optimizer that cannot "
                                          "skip (not build_optimizer(skips=True)), or run_eval on "
                                          "a Trainer built without an eval loader (the "
                                          "benchmarks'): programming errors",
}
# one-line errors besides CspxError: RunFailure (exit 1) and its kinds, CspxError's kinds
ONE_LINE = ("CspxError", "CorruptCheckpoint", "RunFailure", "SaveFailed", "NonfiniteState")


def raise_sites():
    """{(file, exception name)} of every `raise Name(...)` that is not a CspxError."""
    found = set()
    files = glob.glob(os.path.join(ROOT, "cspx", "**", "*.py"), recursive=True) + \
        glob.glob(os.path.join(ROOT, "scripts", "*.py"))
    for path in files:
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                # SystemExit: a command's exit code; ArgumentTypeError: argparse reports a bad
                # flag value itself, in one line with exit code 2
                if name not in (*ONE_LINE, "SystemExit", "ArgumentTypeError"):
                    found.add((os.path.relpath(path, ROOT), name))
    return found


def test_every_other_raise_is_an_internal_invariant():
    assert raise_sites() == set(INTERNAL)


def tiny_index(n, root="/nonexistent"):
    return FolderSplit(root, ["a", "b"], [f"a/{i}.JPEG" for i in range(n)],
                        np.zeros(n, dtype=np.int64))


@pytest.mark.parametrize("world", [1, 2])
def test_too_small_datasets_are_one_line_for_both_loaders(world):
    """Checked once, where a run is set up (cspx.resolve), whichever loader it uses."""
    from cspx.config import Config, with_updates
    from cspx.distributed import DistEnv
    from cspx.resolve import resolve
    env = DistEnv(rank=0, world=world, device=torch.device("cpu"))
    need = 8 * world
    for kind in ("torch", "dali"):
        cfg = with_updates(Config(), data={"loader": kind},
                           train={"batch_size": need}, eval={"batch_size": 16})
        with pytest.raises(CspxError, match=rf"the training set has {need - 1} images, but one "
                                            rf"batch needs 8 images per rank x {world} rank"):
            resolve(cfg, env, (tiny_index(need - 1), tiny_index(need)))
        with pytest.raises(CspxError, match=rf"the validation set has {world - 1} image"):
            resolve(cfg, env, (tiny_index(need), tiny_index(world - 1)))


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_dry_run_finds_a_dataset_smaller_than_one_batch(sample_dir, tmp_path, loader):
    """The documented recipe (batch 128) on the 105 sample images: one line, exit 2, found by
    --dry-run before any model step."""
    data = tmp_path / "data"
    os.makedirs(data)
    os.symlink(os.path.join(sample_dir, "val"), data / "train")
    os.symlink(os.path.join(sample_dir, "val"), data / "val")
    r = run_main(["train.py", "--recipe", "recipes/cspresnext50_ra.yaml", f"data.root={data}",
                 f"data.loader={loader}", f"data.classes={sample_dir}/synsets.txt", "--dry-run"])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: data.root: the training set has 105 images, but one batch needs 128 images per "
        "rank x 1 rank(s) = 128; lower train.batch_size (or raise train.accum_steps), "
        "or add images")


def test_synthetic_class_limit_is_one_line(tmp_path):
    from cspx.data.synthetic import SHAPES, generate
    n = len(SHAPES) + 1
    with pytest.raises(CspxError, match=rf"{n} classes asked for; it has 1 to {len(SHAPES)}"):
        generate(str(tmp_path / "demo"), num_classes=n)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "seed: 3\n",
                                  "train: {steps: 10}\n"])
def test_empty_or_partial_recipe_is_refused(tmp_path, text):
    """It does not quietly train the defaults' model on the defaults' data path."""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    r = run_main(["train.py", "--recipe", str(path)])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip()
    assert line.startswith(f"error: {path}: the recipe does not set ") and "\n" not in line
    assert "model.name" in line and "data.root" in line


def test_out_of_memory_in_evaluation_names_eval_batch_size(demo_data, tmp_path, capsys,
                                                          monkeypatch):
    """An OOM while evaluating advises eval.batch_size, not train.accum_steps (simulated)."""
    from cspx import train_loop
    from cspx.cli.train import main
    real = train_loop.evaluate

    def oom(*a, **kw):
        raise train_loop.OOM("CUDA out of memory. Tried to allocate 8.00 GiB")
    monkeypatch.setattr(train_loop, "evaluate", oom)
    code = main(["--recipe", "recipes/demo.yaml", f"run.dir={tmp_path / 'run'}",
                 f"data.root={demo_data}", "train.steps=2", "eval.every_steps=1", "data.workers=0",
                 "aug.img_size=32", "eval.img_size=32", "train.batch_size=8",
                 "run.tensorboard=false", "eval.batch_size=150"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and real is not oom
    assert err == ("error: out of memory during evaluation on cpu with eval.batch_size=150 images "
                   "per rank; lower it (e.g. eval.batch_size=75)")
