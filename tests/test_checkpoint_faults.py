"""Checkpoint faults injected for real into real training runs (in-process, CPU): saves that fail
on a real RLIMIT_FSIZE (EFBIG, as a full disk or quota fails them), and a real byte flipped in a
real checkpoint (its zip CRC32 no longer matches)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pathlib
import re
import resource
import signal
import struct
import threading
import zipfile

import torch

from cspx import checkpoint
from test_divergence import STATE, last_line, one_thread, train  # noqa: F401 (autouse)
from test_export import script
from test_resume import assert_same_tensors, load

LIMIT = 1_000_000  # bytes: below a tiny model's checkpoint (3.4 MB), far above the logs


def set_limit(nbytes):
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))


@contextlib.contextmanager
def faults(monkeypatch, limit_at=(), lift_at=(), signal_at=None):
    """During a run: RLIMIT_FSIZE drops to LIMIT when the loader hands out a micro-batch in
    `limit_at` (counted over the run), and is lifted again (space freed) at one in `lift_at`;
    SIGTERM arrives at micro-batch `signal_at`. The limit is restored afterwards, whatever
    happens."""
    from cspx import train_setup
    real, unlimited = train_setup.build_train_loader, resource.getrlimit(resource.RLIMIT_FSIZE)

    def build(*a, **kw):
        loader = real(*a, **kw)
        base = type(loader)

        def __next__(self):
            batch = base.__next__(self)
            if self.consumed in limit_at:
                for t in threading.enumerate():  # a save in flight ends first, as it would
                    if t.name == "cspx-checkpoint":  # have on a disk that filled up later
                        t.join()
                set_limit(LIMIT)
            if self.consumed in lift_at:
                resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)
            if self.consumed == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return batch
        loader.__class__ = type("Faulty", (base,), {"__next__": __next__})
        return loader
    with monkeypatch.context() as patch:
        patch.setattr(train_setup, "build_train_loader", build)
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)


def own_files(ck):
    return sorted(n for n in os.listdir(ck) if n != checkpoint.RECORD)


def test_failed_saves_warn_retry_and_stop_after_max_failed_saves(small_imagenet, tmp_path,
                                                                 capsys, monkeypatch):
    """The file-size limit drops before step 2's save and again before step 4's: step 2's save
    fails (one warning naming the file and EFBIG), the space comes back, step 3's is written;
    steps 4 and 5 fail in a row and the run stops there (max_failed_saves=2) with exit 1 and one
    line. No temp file is left, last.pt is step 3's, every file verifies."""
    run_dir = tmp_path / "run"
    ck = run_dir / "checkpoints"
    with faults(monkeypatch, limit_at={2, 4}, lift_at={3}):
        code, err = train(capsys, run_dir, small_imagenet, "train.steps=8",
                          "checkpoint.every_steps=1", "checkpoint.async_save=false",
                          "checkpoint.max_failed_saves=2", "run.log_every_steps=4")
    assert code == 1 and "Traceback" not in err, err[-3000:]
    warned = [ln for ln in err.splitlines() if "saving the checkpoint failed" in ln
              and not ln.startswith("error:")]
    assert [re.search(r"step_(\d+)\.pt: saving the checkpoint failed \(File too large, EFBIG\); "
                      r"earlier checkpoints in \S+ are intact; training goes on and the next "
                      r"checkpoint tries again \((\d) failed in a row", w).groups()
            for w in warned] == [("00000002", "1"), ("00000004", "1")]
    assert last_line(err) == (
        f"error: 2 checkpoint saves in a row failed (checkpoint.max_failed_saves=2), the last: "
        f"{ck / 'step_00000005.pt'}: saving the checkpoint failed (File too large, EFBIG); "
        f"earlier checkpoints in {ck} are intact; the newest checkpoint is "
        f"{ck / 'step_00000003.pt'}; free space (or raise the quota or file-size limit), then "
        f"run the same command with --resume auto")
    assert own_files(ck) == ["last.pt", "step_00000001.pt", "step_00000003.pt"]  # no temp file
    assert os.path.samefile(ck / "last.pt", ck / "step_00000003.pt")
    for name in own_files(ck):
        assert checkpoint.verify(str(ck / name)) is None
    assert load(ck / "last.pt")["progress"]["step"] == 3


def test_a_failed_preemption_save_ends_the_run(small_imagenet, tmp_path, capsys, monkeypatch):
    """async saves (the default): step 2's background write fails and is reported at a later
    step; SIGTERM then asks for a save, which fails too: a failed preemption save ends the run
    at once (exit 1), naming the newest checkpoint, which --resume auto then continues from."""
    run_dir = tmp_path / "run"
    ck = run_dir / "checkpoints"
    common = ["train.steps=6", "checkpoint.every_steps=1", "run.log_every_steps=2"]
    with faults(monkeypatch, limit_at={3}, signal_at=4):
        code, err = train(capsys, run_dir, small_imagenet, *common)
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert re.search(r"step_00000003\.pt: saving the checkpoint failed \(File too large, EFBIG\);"
                     r".* training goes on", err), err[-3000:]
    assert last_line(err).startswith(
        f"error: the save on stopping failed: {ck / 'step_00000004.pt'}: saving the checkpoint "
        f"failed (File too large, EFBIG); earlier checkpoints in {ck} are intact; the newest "
        f"checkpoint is {ck / 'step_00000002.pt'}; ")
    assert own_files(ck) == ["last.pt", "step_00000001.pt", "step_00000002.pt"]
    code, err = train(capsys, run_dir, small_imagenet, *common, "checkpoint.every_steps=0",
                      "--resume", "auto")  # checkpoint.* may change on resume
    assert code == 0 and f"resuming from {ck / 'step_00000002.pt'} (step 2)" in err, err[-3000:]


# ----- integrity ------------------------------------------------------------------------------
def flip_a_byte(path):
    """Flip one bit in the middle of the largest tensor's bytes, in place (every link of the
    file sees it); returns the member's name."""
    z = zipfile.ZipFile(path)
    big = max(z.infolist(), key=lambda i: i.compress_size)
    with open(path, "r+b") as f:
        f.seek(big.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = big.header_offset + 30 + name_len + extra_len + big.compress_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))
    return big.filename


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def test_a_flipped_byte_is_caught_everywhere(small_imagenet, tmp_path, capsys):
    """One bit flipped in the newest checkpoint (step_4, also last.pt and best.pt), which
    torch.load reads without a word: --resume auto warns naming it, keeps it as
    step_00000004.pt.corrupted, resumes from step 2 and ends with every tensor of the run
    before the flip; validate.py, predict.py, export.py and model.init_from refuse it in one
    line (exit 2)."""
    run_dir = tmp_path / "run"
    ck = run_dir / "checkpoints"
    common = ["train.steps=4", "checkpoint.every_steps=2", "run.log_every_steps=2"]
    code, err = train(capsys, run_dir, small_imagenet, *common)
    assert code == 0, err[-3000:]
    before = load(ck / "step_00000004.pt")
    member = flip_a_byte(ck / "step_00000004.pt")
    corrupted = hashlib.sha256((ck / "last.pt").read_bytes()).hexdigest()
    silently = load(ck / "best.pt")  # what torch.load makes of it: no error, other values
    assert any(not torch.equal(a, b) for a, b in zip(tensors(before), tensors(silently)))
    code, err = train(capsys, run_dir, small_imagenet, *common, "--resume", "auto")
    assert code == 0, err[-3000:]
    kept = ck / "step_00000004.pt.corrupted"
    assert (f"skipping corrupted checkpoint (also named last.pt and best.pt): "
            f"{ck / 'step_00000004.pt'}: corrupted: member '{member}' fails its CRC32 check"
            ) in err, err[-3000:]
    assert f"kept as {kept} (cspx never deletes it)" in err
    assert f"resuming from {ck / 'step_00000002.pt'} (step 2)" in err
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == corrupted
    after = load(ck / "last.pt")
    for k in STATE:
        assert_same_tensors(before[k], after[k], k)
    # the tools refuse the corrupted file, each in one line
    from cspx.cli.predict import main as predict
    from cspx.cli.validate import main as validate
    from cspx.errors import run_cli
    code = validate(["--checkpoint", str(kept), "--data-dir", small_imagenet, "--workers", "0"])
    assert code == 2 and capsys.readouterr().err.strip() == (
        f"error: {kept}: corrupted: member '{member}' fails its CRC32 check "
        + re.search(r"\(recorded \w+, found \w+\)[^\n]*be trusted", err).group(0))
    image = next(pathlib.Path(small_imagenet).glob("val/*/*.JPEG"))
    code = predict(["--checkpoint", str(kept), "--workers", "0", str(image)])
    assert code == 2 and capsys.readouterr().err.startswith(f"error: {kept}: corrupted: member")
    with contextlib.redirect_stderr(io.StringIO()) as out:
        code = run_cli(script.main, ["--checkpoint", str(kept), "--out", str(tmp_path / "x")])
    assert code == 2 and out.getvalue().startswith(f"error: {kept}: corrupted: member")
    assert out.getvalue().count("\n") == 1
    code, err = train(capsys, tmp_path / "fine-tune", small_imagenet, *common,
                      f"model.init_from={kept}")
    assert code == 2 and last_line(err).startswith(f"error: {kept}: corrupted: member")
    assert not list(tmp_path.glob("x.*")) and not list(tmp_path.glob("fine-tune/checkpoints/*.pt"))
