"""Checkpoint files: atomic writes, links, pruning, failures, and weights_only loading."""
from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from conftest import ROOT
from cspx import checkpoint
from cspx.checkpoint import Checkpointer
from cspx.config import CheckpointConfig
from cspx.distributed import DistEnv
from cspx.errors import CspxError, RunFailure


def CheckpointManager(run_dir, keep_last, async_save, is_main=True):
    return Checkpointer(run_dir=run_dir, env=DistEnv(),
                        cfg=CheckpointConfig(every_steps=0, keep_last=keep_last,
                                             async_save=async_save))


def listing(folder):
    return sorted(n for n in os.listdir(folder) if n != checkpoint.RECORD)


def state(step, n=10):
    return {"format": checkpoint.FORMAT, "format_version": 1, "step": step,
            "model": {"w": torch.full((n,), float(step))}, "progress": {"step": step}}


@pytest.mark.parametrize("async_save", [False, True])
def test_links_pruning_and_best(tmp_path, async_save):
    m = CheckpointManager(str(tmp_path), keep_last=2, async_save=async_save, is_main=True)
    for step in (1, 2, 3, 4):
        m.write(state(step), step, best=step == 2)
    m.close()
    ck = tmp_path / "checkpoints"
    assert listing(ck) == ["best.pt", "last.pt", "step_00000003.pt", "step_00000004.pt"]
    assert checkpoint.load(str(ck / "last.pt"))["step"] == 4
    assert checkpoint.load(str(ck / "best.pt"))["step"] == 2      # survives pruning of step 2
    path, s = m.latest_valid()
    assert s["step"] == 4


def test_async_snapshot_is_taken_at_save_time(tmp_path):
    m = CheckpointManager(str(tmp_path), keep_last=3, async_save=True, is_main=True)
    live = state(1)
    m.write(live, 1)
    live["model"]["w"].add_(100)   # training continues and changes the live tensors
    m.close()
    assert torch.equal(checkpoint.load(m.path_for(1))["model"]["w"], torch.full((10,), 1.0))


@contextlib.contextmanager
def file_size_limit(nbytes):
    """A real RLIMIT_FSIZE on this process: a write past `nbytes` fails with EFBIG (Python
    ignores SIGXFSZ), as on a full disk or quota."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def failing_manager(tmp_path, async_save, max_failed):
    return Checkpointer(run_dir=str(tmp_path), env=DistEnv(),
                        cfg=CheckpointConfig(every_steps=0, keep_last=3, async_save=async_save,
                                             max_failed_saves=max_failed))


def test_failed_save_warns_keeps_old_and_stops_at_the_limit(tmp_path, caplog):
    """A write past the file-size limit: one warning naming the file and the error, no temp
    file, the earlier checkpoint and last.pt as they were; the next save retries (and resets
    the count); max_failed_saves failures in a row, or a failed final save, end the run."""
    m = failing_manager(tmp_path, async_save=False, max_failed=2)
    ck = tmp_path / "checkpoints"
    m.write(state(1), 1)
    with file_size_limit(200_000):
        m.write(state(2, n=100_000), 2)                       # 400 kB of tensor: EFBIG
        assert listing(ck) == ["last.pt", "step_00000001.pt"]  # no temp file either
        m.write(state(3), 3)                                  # small: written
        m.write(state(4, n=100_000), 4)
        with pytest.raises(RunFailure) as e:
            m.write(state(5, n=100_000), 5)
        with pytest.raises(RunFailure, match=r"^the final save failed: \S+step_00000006.pt: "
                                             r"saving the checkpoint failed \(File too large, "
                                             r"EFBIG\)"):
            m.write(state(6, n=100_000), 6, final="the final save")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and all("saving the checkpoint failed (File too large, EFBIG)" in w
                                    for w in warned)
    assert "step_00000002.pt" in warned[0] and "(1 failed in a row;" in warned[0]
    assert str(e.value).startswith(f"2 checkpoint saves in a row failed (checkpoint.max_failed_"
                                   f"saves=2), the last: {ck / 'step_00000005.pt'}: saving the "
                                   f"checkpoint failed (File too large, EFBIG)")
    assert f"the newest checkpoint is {ck / 'step_00000003.pt'}" in str(e.value)
    assert listing(ck) == ["last.pt", "step_00000001.pt", "step_00000003.pt"]
    assert checkpoint.load(str(ck / "last.pt"))["step"] == 3


def test_async_failure_is_taken_in_the_training_thread(tmp_path, caplog):
    """A background write that fails is counted by the training thread at its next step
    boundary (maybe_save) or wait; at the limit it ends the run there."""
    m = failing_manager(tmp_path, async_save=True, max_failed=1)
    with file_size_limit(200_000):
        m.write(state(1, n=100_000), 1)
        for t in threading.enumerate():  # the write fails in its thread; nothing is raised there
            if t.name == "cspx-checkpoint":
                t.join()
        with pytest.raises(RunFailure, match=r"1 checkpoint saves in a row failed .*step_00000001"
                                             r".pt: saving the checkpoint failed \(File too "
                                             r"large, EFBIG\)"):
            m.maybe_save(2, last_step=10)
    assert listing(tmp_path / "checkpoints") == []


def test_save_killed_mid_write_leaves_previous_valid(tmp_path):
    """SIGKILL a process while it writes a large checkpoint: the older one stays loadable."""
    code = textwrap.dedent(f"""
        import torch, sys
        sys.path.insert(0, {ROOT!r})
        from cspx.checkpoint import Checkpointer, FORMAT
        from cspx.config import CheckpointConfig
        from cspx.distributed import DistEnv
        m = Checkpointer(run_dir={str(tmp_path)!r}, cfg=CheckpointConfig(0, 3, False),
                         env=DistEnv())
        m.write({{"format": FORMAT, "step": 1, "w": torch.ones(4)}}, 1)
        print("saved 1", flush=True)
        m.write({{"format": FORMAT, "step": 2, "w": torch.randn(400_000_000 // 4)}}, 2)
        print("saved 2", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved 1"
    ck = tmp_path / "checkpoints"
    deadline = time.time() + 60
    tmp = ".tmp" + str(proc.pid)
    while time.time() < deadline and not any(n.endswith(tmp) for n in os.listdir(ck)):
        time.sleep(0.005)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = os.listdir(ck)
    assert "step_00000002.pt" not in names            # never visible half-written
    assert checkpoint.load(str(ck / "last.pt"))["step"] == 1
    path, s = CheckpointManager(str(tmp_path), 3, False, True).latest_valid()
    assert s["step"] == 1
    # the next save cleans the stray temp file
    CheckpointManager(str(tmp_path), 3, False, True).write(state(3), 3)
    assert not [n for n in os.listdir(ck) if ".tmp" in n]


def test_load_rejects_non_checkpoints(tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    for name, msg in [("missing.pt", "checkpoint not found"),
                      ("text.pt", "not a readable checkpoint"),
                      ("plain.pt", "not a cspx training checkpoint")]:
        with pytest.raises(CspxError, match=msg) as e:
            checkpoint.load(str(tmp_path / name))
        assert str(e.value).startswith(str(tmp_path / name))


def test_pruning_and_links_touch_only_files_this_run_wrote(tmp_path):
    """A step file or last.pt that someone else put into checkpoints/ is never deleted or
    replaced: pruning skips it, and a save that would replace it stops with one line."""
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    foreign = ck / "step_00000000.pt"             # older than anything the run writes
    foreign.write_bytes(b"a user's own file")
    before = foreign.read_bytes()
    m = CheckpointManager(str(tmp_path), keep_last=1, async_save=False)
    for step in (1, 2, 3):
        m.write(state(step), step)
    assert listing(ck) == ["last.pt", "step_00000000.pt", "step_00000003.pt"]
    assert foreign.read_bytes() == before
    # last.pt replaced by another run's checkpoint: the next save refuses to overwrite it
    (ck / "last.pt").unlink()
    torch.save({**state(9), "run_id": "another-run"}, ck / "last.pt")
    theirs = (ck / "last.pt").read_bytes()
    with pytest.raises(CspxError, match=r"last.pt: exists and was not written by this run"):
        m.write(state(4), 4)
    assert (ck / "last.pt").read_bytes() == theirs and foreign.read_bytes() == before


def test_checkpoints_of_cspx_0_1_and_of_other_runs(tmp_path):
    """cspx 0.1.0 recorded no run id: its checkpoints in a run folder are the run's (pruning
    continues); a checkpoint of another run, or any other file, stays untouched."""
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for step in (1, 2):
        torch.save(state(step), ck / f"step_{step:08d}.pt")
    os.link(ck / "step_00000002.pt", ck / "last.pt")
    (ck / "step_00000005.pt").write_bytes(b"not a checkpoint")
    torch.save({**state(3), "run_id": "another-run"}, ck / "step_00000003.pt")
    m = Checkpointer(run_dir=str(tmp_path),
                     cfg=CheckpointConfig(every_steps=0, keep_last=2, async_save=False),
                     env=DistEnv(), meta={"run_id": "this-run"})
    m.write(state(6), 6)
    assert listing(ck) == ["last.pt", "step_00000002.pt", "step_00000003.pt", "step_00000005.pt",
                           "step_00000006.pt"]
    assert (ck / "step_00000005.pt").read_bytes() == b"not a checkpoint"
    assert checkpoint.load(str(ck / "step_00000003.pt"))["run_id"] == "another-run"


def _flip(path, at):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ 0x01]))


def _data_offset(path, member):
    import struct
    import zipfile
    info = zipfile.ZipFile(path).getinfo(member)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    return info.header_offset + 30 + name_len + extra_len, info


def test_verify_checks_every_member(tmp_path, caplog):
    """verify reads every zip member's CRC32 (torch.load reads none): a cspx checkpoint and a
    timm-style state_dict verify; one flipped bit in any member's data, or in a member's
    header, is named; weights loading refuses such a file; a legacy pickle carries no checksum
    and says so; a truncated file is left to the loader's own message."""
    import zipfile

    from cspx.checkpoint.integrity import LEGACY, CorruptCheckpoint
    from cspx.models import create_model
    from cspx.weights import load_weights
    m = CheckpointManager(str(tmp_path), keep_last=3, async_save=False)
    m.write(state(1, n=1000), 1)
    assert checkpoint.verify(m.path_for(1)) is None
    plain = tmp_path / "timm_style.pth"
    torch.save(create_model("cspresnext_tiny", num_classes=10).state_dict(), plain)
    assert checkpoint.verify(str(plain)) is None
    members = zipfile.ZipFile(plain).namelist()
    for member in (members[0], members[len(members) // 2], members[-1]):  # pickle, data, id
        bad = tmp_path / "bad.pth"
        bad.write_bytes(plain.read_bytes())
        start, info = _data_offset(bad, member)
        _flip(bad, start + info.compress_size - 1)
        with pytest.raises(CorruptCheckpoint, match=rf"^{bad}: corrupted: member "
                                                    rf"'{member}' fails its CRC32 check"):
            checkpoint.verify(str(bad))
    with pytest.raises(CspxError, match=rf"^{bad}: corrupted: member '{member}'"):
        load_weights(str(bad))
    header = tmp_path / "header.pth"
    header.write_bytes(plain.read_bytes())
    _flip(header, zipfile.ZipFile(header).getinfo(members[1]).header_offset + 31)  # its name
    with pytest.raises(CorruptCheckpoint, match=rf"the header of member '{members[1]}' is "
                                                r"damaged"):
        checkpoint.verify(str(header))
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert checkpoint.verify(str(legacy)) == LEGACY
    with caplog.at_level("INFO", logger="cspx"):
        assert torch.equal(load_weights(str(legacy))[0]["w"], torch.ones(3))
    assert LEGACY in caplog.text
    deflated = tmp_path / "deflated.zip"  # another writer's compressed member
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("a/data.pkl", b"x" * 10000 + bytes(range(256)) * 40)
    assert checkpoint.verify(str(deflated)) is None
    start, info = _data_offset(deflated, "a/data.pkl")
    _flip(deflated, start + info.compress_size // 2)
    with pytest.raises(CorruptCheckpoint, match="member 'a/data.pkl'"):
        checkpoint.verify(str(deflated))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(open(m.path_for(1), "rb").read()[:2000])
    assert checkpoint.verify(str(cut)) is None
    with pytest.raises(CspxError, match="not a readable checkpoint"):
        checkpoint.load(str(cut))
