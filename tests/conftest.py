"""Shared fixtures: the real ImageNet sample, per-test caches, and a CPU-only, quiet torch."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# $CSPX_SAMPLE_DIR moves it (scripts/gpu_check.sh points it at a generated stand-in when the
# sample is missing; a missing folder simulates a checkout copied alone)
SAMPLE = os.path.normpath(os.environ.get("CSPX_SAMPLE_DIR")
                          or os.path.join(ROOT, "..", "shared", "imagenet-sample"))


def pytest_configure(config):
    """Under pytest-xdist (the README runs `-n 2`: two worker processes, each given whole test
    files) every worker and the processes its tests start compute on one thread, so the two
    workers share 2 cores without 4 threads spinning for them; torch's default would be one
    thread per core in each. A command's own thread setting (run_main's `threads`, a test's
    OMP_NUM_THREADS) still applies."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA exists (scripts/gpu_check.sh runs `pytest -m gpu`)."""
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by scripts/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Index caches go to a per-session temp dir, never to ~/.cache."""
    monkeypatch.setenv("CSPX_CACHE", str(tmp_path_factory.getbasetemp() / "cspx-cache"))


@pytest.fixture(scope="session")
def sample_dir():
    """../shared/imagenet-sample: 105 real ImageNet JPEGs (5 grayscale) and synsets.txt."""
    if not os.path.isdir(os.path.join(SAMPLE, "val")):
        pytest.skip(f"ImageNet sample not found at {SAMPLE} (it ships beside the repository)")
    return SAMPLE


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The synthetic demo dataset, generated once per test session."""
    from cspx.data.synthetic import generate
    return generate(str(tmp_path_factory.getbasetemp() / "demo-data"))


@pytest.fixture(scope="session")
def small_imagenet(tmp_path_factory):
    """A user's ImageNet-layout folder, as small as a full batch of the documented recipe allows:
    3 classes x 44 = 132 train images (batch 128), 3 x 4 val images; 40 x 30 px JPEGs."""
    from PIL import Image
    root = tmp_path_factory.getbasetemp() / "small-imagenet"
    for split, per_class in (("train", 44), ("val", 4)):
        for k in range(3):
            folder = root / split / f"n{k:08d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40, 30), (k * 80, i * 5, 100)).save(folder / f"{i}.JPEG")
    return str(root)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, sample_dir):
    """A random cspresnext_tiny in timm's plain state_dict format whose predictions vary from
    image to image: BN statistics calibrated on the sample at 64 px, and a random classifier
    applied to centred features (a random model otherwise predicts one class for every image)."""
    import timm.data
    import torch
    from PIL import Image
    from torch import nn

    from cspx.models import create_model
    torch.manual_seed(1)
    m = create_model("cspresnext_tiny", num_classes=1000)
    tf = timm.data.create_transform(64, crop_pct=0.875, interpolation="bilinear")
    root = os.path.join(sample_dir, "val")
    x = torch.stack([tf(Image.open(os.path.join(root, d, f)).convert("RGB"))
                     for d in sorted(os.listdir(root)) for f in os.listdir(os.path.join(root, d))])
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None          # cumulative average: the statistics of this batch
    with torch.no_grad():
        m.train()(x)
        feats = m.eval().forward_head(m.forward_features(x), pre_logits=True)
        m.head.fc.weight.normal_(0, 1)
        m.head.fc.bias.copy_(-m.head.fc.weight @ feats.mean(0))
    path = tmp_path_factory.mktemp("w") / "tiny.pth"
    torch.save(m.state_dict(), path)
    return str(path), m


def make_shards(src, out, *extra):
    """scripts/make_shards.py SRC OUT, as a user runs it; returns OUT."""
    r = run_py(["scripts/make_shards.py", str(src), str(out), "--workers", "2", *map(str, extra)])
    assert r.returncode == 0, r.stderr[-2000:]
    return str(out)


@pytest.fixture(scope="session")
def demo_shards(demo_data, tmp_path_factory):
    """The demo dataset as shards of about 1 MB: 15 train shards (2,000 images in a seeded
    order), 3 val shards (300 images sorted by path). Made once per session."""
    return make_shards(demo_data, tmp_path_factory.getbasetemp() / "demo-shards", "--shard-size", 1)


@pytest.fixture(scope="session")
def sample_shards_root(sample_dir, tmp_path_factory):
    """The 105 real JPEGs of ../shared/imagenet-sample as val shards of about 2 MB (6 shards), in
    the folder's order (sorted by path): sample i is the folder index's file i."""
    return make_shards(sample_dir, tmp_path_factory.getbasetemp() / "sample-shards",
                       "--shard-size", 2)


def tree_digest(root):
    """{relative path: sha256} of every file under root (and the folders), to prove a command
    left a user's folder byte-for-byte as it was."""
    import hashlib
    out = {}
    for folder, _dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        out[rel + "/"] = "dir"
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.join(rel, name)] = hashlib.sha256(f.read()).hexdigest()
    return out


def run_py(args, cwd=ROOT, timeout=600, env=None, **kw):
    """Run `python <args>` in the repository; returns CompletedProcess with text output."""
    import subprocess
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=e, **kw)


def _entry(script):
    """The main(argv) -> exit code that `python <script>` runs."""
    import importlib
    import importlib.util
    if script in ("train.py", "validate.py", "predict.py"):
        return importlib.import_module(f"cspx.cli.{script[:-3]}").main
    from cspx.errors import run_cli as wrap
    name = "cspx_script_" + os.path.basename(script)[:-3]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return lambda argv: wrap(sys.modules[name].main, argv)


def run_main(args, cwd=ROOT, env=None, threads=None):
    """`python <args>` for train.py, validate.py or a scripts/*.py (args[0]), run in this process
    through its main, where the test is not about the process itself: a Python + torch start
    costs about 3 s. Returns a CompletedProcess with the command's returncode, stdout and
    stderr: output is captured at the file descriptors (data workers forked meanwhile write
    into it too), and an unexpected exception is a traceback and status 1, as in a process of
    its own. `env` is set for the call; `threads` is the torch thread count (a subprocess's
    OMP_NUM_THREADS). What a run changes in this process is put back afterwards: working
    folder, sys.argv, environment, torch threads and deterministic mode, the random generators,
    signal handlers and the 'cspx' logger's handlers (closed)."""
    import io
    import logging
    import random
    import signal
    import subprocess
    import tempfile
    import traceback

    import numpy as np
    import torch
    script, args = args[0], [str(a) for a in args[1:]]
    main = _entry(script)
    logger = logging.getLogger("cspx")
    saved = dict(cwd=os.getcwd(), argv=sys.argv, environ=dict(os.environ),
                 threads=torch.get_num_threads(),
                 deterministic=torch.are_deterministic_algorithms_enabled(),
                 rng=(random.getstate(), np.random.get_state(), torch.get_rng_state()),
                 signals={s: signal.getsignal(s)
                          for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)},
                 log=(list(logger.handlers), logger.level, logger.propagate),
                 streams=(sys.stdout, sys.stderr))
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush()
    sys.stderr.flush()
    fds = os.dup(1), os.dup(2)
    try:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = (io.TextIOWrapper(open(fd, "wb", closefd=False), encoding="utf-8",
                                                   line_buffering=True) for fd in (1, 2))
        os.chdir(cwd)
        sys.argv = [script, *args]
        os.environ.update(env or {})
        if threads:
            torch.set_num_threads(threads)
        try:
            code = main(args)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        os.close(fds[0])
        os.close(fds[1])
        sys.stdout, sys.stderr = saved["streams"]
        os.chdir(saved["cwd"])
        sys.argv = saved["argv"]
        os.environ.clear()
        os.environ.update(saved["environ"])
        torch.set_num_threads(saved["threads"])
        torch.use_deterministic_algorithms(saved["deterministic"])
        random.setstate(saved["rng"][0])
        np.random.set_state(saved["rng"][1])
        torch.set_rng_state(saved["rng"][2])
        for s, handler in saved["signals"].items():
            signal.signal(s, handler)
        for h in logger.handlers:
            if h not in saved["log"][0]:
                h.close()
        logger.handlers[:], logger.propagate = saved["log"][0], saved["log"][2]
        logger.setLevel(saved["log"][1])
    texts = []
    for f in (out, err):
        f.seek(0)
        text = f.read().decode("utf-8", "replace")  # newlines as subprocess's text mode reads
        texts.append(text.replace("\r\n", "\n").replace("\r", "\n"))
        f.close()
    return subprocess.CompletedProcess([sys.executable, script, *args], code, *texts)
