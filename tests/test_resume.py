"""Exact resume: runs killed at random steps (SIGKILL) and resumed must end bit-identical to an
uninterrupted run; plus SIGTERM, fall-back past a truncated checkpoint, pruning, atomic saves and
the recipe-mismatch refusal."""
from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_main, tree_digest

TINY = ["train.steps=24", "sched.burn_in=4", "train.batch_size=16", "train.accum_steps=2",
        "aug.img_size=32", "eval.img_size=32", "eval.every_steps=12", "eval.batch_size=100",
        "checkpoint.every_steps=3", "checkpoint.keep_last=3", "run.log_every_steps=2",
        "run.tensorboard=true"]


def recipe_args(run_dir, data, *extra):
    return ["train.py", "--recipe", "recipes/demo.yaml", f"run.dir={run_dir}", f"data.root={data}",
            *TINY, *extra]


def start(args):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def steps_saved(run_dir):
    return sorted(int(os.path.basename(p)[5:13])
                  for p in glob.glob(f"{run_dir}/checkpoints/step_*.pt"))


def kill_after_checkpoint(proc, run_dir, min_step, timeout=240):
    """SIGKILL once a checkpoint at >= min_step exists, after a random extra delay (so the kill
    lands mid-step, mid-accumulation or mid-save)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(s >= min_step for s in steps_saved(run_dir)):
            time.sleep(random.uniform(0.0, 0.3))
            break
        time.sleep(0.02)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    out = proc.communicate(timeout=60)[0]
    return out


def wait_first_checkpoint(proc, run_dir, timeout=240):
    deadline = time.time() + timeout
    while not steps_saved(run_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None and steps_saved(run_dir), "the run ended before its first checkpoint"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), \
            f"{where} differs (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def metrics(run_dir, kind="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Every run of this module trains in the same folder, `<workdir>/run`, and an uninterrupted
    reference is moved aside when it is done: the runs compared then have the same run.dir in
    their recipes, so their checkpoints can be compared whole, every key and value."""
    return tmp_path_factory.mktemp("resume")


def fresh_run_dir(workdir):
    run_dir = workdir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return str(run_dir)


@pytest.fixture(scope="module")
def reference(demo_data, workdir):
    """One uninterrupted run per loader setting, shared by the tests of this module (in this
    process: the runs compared with it are processes of their own, killed and resumed)."""
    cache = {}

    def get(*extra):
        if extra not in cache:
            run_dir = fresh_run_dir(workdir)
            r = run_main(recipe_args(run_dir, demo_data, *extra))
            assert r.returncode == 0, r.stdout + r.stderr
            cache[extra] = str(workdir / f"ref-{len(cache)}")
            os.rename(run_dir, cache[extra])
        return cache[extra]
    return get


def check_equal_runs(ref_dir, run_dir):
    """The final checkpoints are equal in every tensor and value (RNG states, loader states,
    progress, config...); the logs continue with no duplicated or missing steps."""
    a, b = load(f"{ref_dir}/checkpoints/last.pt"), load(f"{run_dir}/checkpoints/last.pt")
    # run_id names the run folder (a random id made when the folder was first claimed), like a
    # time stamp; every other key is state and must be equal
    assert a.pop("run_id") and b.pop("run_id")
    assert_same_tensors(a, b, "checkpoint")
    ra, rb = metrics(ref_dir), metrics(run_dir)
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == list(range(2, 25, 2))
    assert [r["loss"] for r in rb] == [r["loss"] for r in ra]
    assert ([r["top1"] for r in metrics(run_dir, "eval")] ==
            [r["top1"] for r in metrics(ref_dir, "eval")])


def tb_steps(run_dir, tag="train/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tb"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.parametrize("loader, workers, fmt", [
    ("torch", 0, "folder"), ("torch", 2, "folder"), ("dali", 2, "folder"),
    ("torch", 0, "shards"), ("dali", 2, "shards")])
def test_sigkill_at_random_steps_resumes_exactly(demo_data, reference, workdir, request, loader,
                                                 workers, fmt):
    extra = (f"data.workers={workers}",) + ((f"data.loader={loader}",) if loader != "torch" else ())
    if fmt == "shards":  # the demo set as shards (conftest): data.format auto finds them
        extra += (f"data.root={request.getfixturevalue('demo_shards')}", "data.synthetic=false")
    ref = reference(*extra)
    run_dir = fresh_run_dir(workdir)
    rng = random.Random()
    targets = sorted(rng.sample(range(1, 13), 2))
    print("killing after checkpoints at steps >=", targets)
    for k, target in enumerate(targets):
        proc = start(recipe_args(run_dir, demo_data, *extra) + (["--resume", "auto"] if k else []))
        out = kill_after_checkpoint(proc, run_dir, target)
        # the kill landed mid-run: the process died of it, before the run's last step
        assert proc.returncode == -signal.SIGKILL, out[-2000:]
        assert max(steps_saved(run_dir)) < 24
    # the last leg, which only reads what the killed processes left, runs in this process. It
    # starts in a later second than the last killed process made its TensorBoard file, as any
    # process (seconds of start-up) would: TensorBoard reads a run's event files in the order
    # of their names, the second each was made, then the pid (this process's is lower)
    time.sleep(1 - time.time() % 1)
    r = run_main(recipe_args(run_dir, demo_data, *extra) + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    check_equal_runs(ref, run_dir)
    assert tb_steps(run_dir) == tb_steps(ref) == list(range(2, 25, 2))
    config = load(f"{run_dir}/checkpoints/last.pt")["config"]["data"]
    assert (config["format"], config["loader"]) == (fmt, loader)  # as resolved
    if fmt == "shards" and loader == "torch":
        # the validate.py command the run prints reads the shards and reproduces its evaluation
        line = r.stderr.split("evaluate the result with:")[1].strip().splitlines()[0]
        assert "--bad-shards refuse" in line
        v = subprocess.run(line, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert v.returncode == 0, v.stderr[-2000:]
        last = metrics(run_dir, "eval")[-1]
        assert f"top-1 {last['top1']:.3f}%" in v.stdout and f"images {last['count']} " in v.stdout


def test_sigterm_saves_and_exits_0_then_resumes_exactly(demo_data, reference, workdir):
    ref = reference("data.workers=0")
    run_dir = fresh_run_dir(workdir)
    proc = start(recipe_args(run_dir, demo_data, "data.workers=0"))
    wait_first_checkpoint(proc, run_dir)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out and "resume with:" in out and "--resume auto" in out
    stopped = load(f"{run_dir}/checkpoints/last.pt")["progress"]["step"]
    assert 0 < stopped < 24 and stopped in steps_saved(run_dir)
    r = run_main(recipe_args(run_dir, demo_data, "data.workers=0") + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert f"(step {stopped})" in r.stderr
    check_equal_runs(ref, run_dir)


def test_second_job_on_a_live_run_dir_is_refused(demo_data, reference, workdir):
    """A job resubmitted while the first still runs stops at once, naming the holder; the first
    job goes on undisturbed and ends with the checkpoint of a run alone."""
    ref = reference("data.workers=0")
    run_dir = fresh_run_dir(workdir)
    first = start(recipe_args(run_dir, demo_data, "data.workers=0"))
    wait_first_checkpoint(first, run_dir)
    first.send_signal(signal.SIGSTOP)  # paused, so it surely still holds run.dir meanwhile
    try:
        second = run_main(recipe_args(run_dir, demo_data, "data.workers=0") + ["--resume", "auto"])
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr
    line = second.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: run.dir: {re.escape(run_dir)} is in use by another cspx job "
                        rf"\(host \S+, pid {first.pid}, started .+\); wait for it to finish, or "
                        rf"set run.dir to another folder", line), line
    assert "Traceback" not in second.stderr
    out = first.communicate(timeout=240)[0]
    assert first.returncode == 0, out[-3000:]
    check_equal_runs(ref, run_dir)


def copy_of(ref, workdir):
    """The reference run folder, copied to <workdir>/run (so its run.dir is the recipe's)."""
    run_dir = fresh_run_dir(workdir)
    shutil.copytree(ref, run_dir)
    return run_dir


def test_truncated_last_falls_back_and_pruning(demo_data, reference, workdir):
    ref = reference("data.workers=0")
    run_dir = copy_of(ref, workdir)
    ck = os.path.join(run_dir, "checkpoints")
    # keep_last=3 step files, plus last.pt and best.pt as links
    assert steps_saved(run_dir) == [18, 21, 24]
    assert sorted(n for n in os.listdir(ck) if n[0] != ".") == [
        "best.pt", "last.pt", "step_00000018.pt", "step_00000021.pt", "step_00000024.pt"]
    assert os.path.samefile(f"{ref}/checkpoints/last.pt", f"{ref}/checkpoints/step_00000024.pt")
    size = os.path.getsize(os.path.join(ck, "last.pt"))
    for name in ("last.pt", "step_00000024.pt"):  # one file under two names in a real run dir
        with open(os.path.join(ck, name), "r+b") as f:
            f.truncate(size // 2)
    r = run_main(recipe_args(run_dir, demo_data, "data.workers=0") + ["--resume", "auto"])
    assert r.returncode == 0, r.stderr
    assert "skipping invalid checkpoint" in r.stderr and "last.pt" in r.stderr
    assert "step_00000021.pt (step 21)" in r.stderr
    check_equal_runs(ref, run_dir)


def test_recipe_mismatch_is_refused_unless_forced(demo_data, reference, workdir):
    run_dir = copy_of(reference("data.workers=0"), workdir)
    base = recipe_args(run_dir, demo_data, "data.workers=0")
    r = run_main(base + ["optim.lr=0.2", "train.steps=30", "--resume", "auto"])
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot resume exactly") and "optim.lr (0.1 -> 0.2)" in line
    assert "train.steps (24 -> 30)" in line and "--resume-force" in line
    # logging and eval keys may change freely; more steps with --resume-force continue the run
    r = run_main(base + ["train.steps=30", "run.log_every_steps=3", "eval.every_steps=0",
                         "--resume", "auto", "--resume-force"])
    assert r.returncode == 0, r.stderr
    assert load(f"{run_dir}/checkpoints/last.pt")["progress"]["step"] == 30


def test_fresh_start_never_overwrites_a_run(demo_data, reference, workdir):
    run_dir = copy_of(reference("data.workers=0"), workdir)
    before = tree_digest(run_dir)
    r = run_main(recipe_args(run_dir, demo_data, "data.workers=0"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: run.dir: {run_dir} already holds checkpoints (newest: step 24); pass --resume "
        f"auto to continue that run, or set run.dir to a new folder")
    after = tree_digest(run_dir)
    # every file as it was; the lock file names its newest holder, the refused job
    assert after.pop("./.cspx-lock") and before.pop("./.cspx-lock")
    assert after == before
    # resuming a finished run is a no-op that reports the result again
    r = run_main(recipe_args(run_dir, demo_data, "data.workers=0") + ["--resume", "auto"])
    assert r.returncode == 0 and "done: 24 steps" in r.stderr, r.stderr[-2000:]
    assert [m["step"] for m in metrics(run_dir)] == list(range(2, 25, 2))


def test_checkpoint_of_cspx_0_1_0_resumes_and_evaluates(demo_data, tmp_path):
    """tests/data holds a step-4 checkpoint of an 8-step tiny demo run written by cspx 0.1.0
    (before the run-folder marker, run ids, eval presets and compile modes). Its run folder, as
    0.1.0 left it, resumes with the recipe the run saved, and validate.py evaluates it."""
    old = os.path.join(ROOT, "tests", "data", "demo_tiny_step4_v0.1.0.pt")
    state = load(old)
    assert state["cspx_version"] == "0.1.0" and state["progress"]["step"] == 4
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(old, run_dir / "checkpoints" / "step_00000004.pt")
    os.link(run_dir / "checkpoints" / "step_00000004.pt", run_dir / "checkpoints" / "last.pt")
    import yaml
    (run_dir / "config.yaml").write_text(yaml.safe_dump(state["config"], sort_keys=False))
    (run_dir / "provenance.json").write_text(json.dumps({"cspx": "0.1.0"}))
    # the recipe: what the old run saved, at this machine's paths
    r = run_main(["train.py", "--recipe", str(run_dir / "config.yaml"), f"run.dir={run_dir}",
                 f"data.root={demo_data}", "--resume", "auto"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr and "(step 4)" in r.stderr
    new = load(run_dir / "checkpoints" / "last.pt")
    assert new["progress"]["step"] == 8 and new["progress"]["images"] == 8 * 16
    old_train = state["config"]["train"]
    assert {k: new["config"]["train"][k] for k in old_train} == old_train
    # keys cspx 0.1.0 did not have take their defaults: its SGD, darknet poly, no freeze
    assert new["config"]["train"]["freeze_backbone_steps"] == 0
    assert (new["config"]["optim"]["name"], new["config"]["sched"]["kind"]) == ("sgd", "poly")
    assert [g["name"] for g in new["optimizer"]["param_groups"]] == ["decay", "no_decay"]
    assert [m["step"] for m in metrics(str(run_dir))] == [6, 8]
    # the old file itself evaluates with validate.py (its model name and classes are recorded)
    v = run_main(["validate.py", "--checkpoint", old, "--data-dir", demo_data, "--img-size", "32",
                 "--classes", os.path.join(demo_data, "synsets.txt"), "--workers", "0"])
    assert v.returncode == 0, v.stderr[-2000:]
    assert re.search(r"top-1 \d+\.\d+%  top-5 \d+\.\d+% .* images 300", v.stdout), v.stdout


EVERY_AUG = ["aug.mixup_alpha=0.8", "aug.cutmix_alpha=1.0", "aug.mix_prob=0.9",
             "aug.erase_prob=0.5", "aug.erase_count=2"]


@pytest.mark.parametrize("loader, extra", [
    ("torch", ["aug.policy=trivialaugment", "aug.mix_mode=elem", "aug.erase_mode=pixel"]),
    ("dali", ["aug.policy=autoaugment", "aug.mix_mode=batch", "aug.erase_mode=rand"])])
def test_every_augmentation_resumes_exactly(demo_data, tmp_path, loader, extra, capsys):
    """Every augmentation on (a policy, random erasing, mixup and CutMix): a run resumed from
    its step-2 checkpoint ends with every tensor of an uninterrupted 3-step run's final
    checkpoint, the batch stage's generators included, and logs the same losses. Two
    micro-batches per step, so the stage draws between checkpoints and within a step. In this
    process, through train.py's main (the kill -9 cycles above cover the process side)."""
    from cspx.cli.train import main
    run_dir = tmp_path / "run"
    argv = ["--recipe", "recipes/demo.yaml", f"run.dir={run_dir}", f"data.root={demo_data}",
            "train.steps=3", "sched.burn_in=2", "train.batch_size=8", "train.accum_steps=2",
            "aug.img_size=32", "eval.img_size=32", "eval.every_steps=0", "eval.batch_size=300",
            "checkpoint.every_steps=2", "checkpoint.keep_last=2", "run.log_every_steps=1",
            "run.tensorboard=false", "data.workers=0", "ema.enabled=false",
            f"data.loader={loader}", *EVERY_AUG, *extra]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        assert main(argv) == 0, capsys.readouterr().err[-3000:]
        ref = tmp_path / "ref"
        os.rename(run_dir, ref)
        shutil.copytree(ref, run_dir)
        ck = run_dir / "checkpoints"
        for name in ("last.pt", "best.pt", "step_00000003.pt"):
            os.remove(ck / name)
        os.link(ck / "step_00000002.pt", ck / "last.pt")
        assert main(argv + ["--resume", "auto"]) == 0, capsys.readouterr().err[-3000:]
    finally:
        os.chdir(cwd)
    assert "(step 2)" in capsys.readouterr().err
    a, b = load(f"{ref}/checkpoints/last.pt"), load(f"{run_dir}/checkpoints/last.pt")
    assert a["progress"]["step"] == 3
    from cspx.config import AugConfig
    from cspx.data.batch_aug import BatchAugment
    seeded = BatchAugment(aug=AugConfig(), num_classes=10, label_smoothing=0.1,
                          device=torch.device("cpu"), seed=0, rank=0).state_dict()
    drawn = a["ranks"][0]["batch_aug"]
    assert not torch.equal(drawn["numpy"][1], seeded["numpy"][1])  # the stage drew
    assert not torch.equal(drawn["device"], seeded["device"])
    assert_same_tensors(a, b, "checkpoint")
    losses = [r["loss"] for r in metrics(str(ref))]
    assert len(losses) == 3 and [r["loss"] for r in metrics(str(run_dir))] == losses
