"""Checkpoint files: atomic writes, links, pruning, failures, and weights_only loading."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cspx import checkpoint
from cspx.checkpoint import Checkpointer, storage
from cspx.config import CheckpointConfig
from cspx.distributed import DistEnv
from cspx.errors import CspxError
from conftest import ROOT


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


def test_failed_save_is_one_clear_error_and_keeps_old(tmp_path, monkeypatch):
    m = CheckpointManager(str(tmp_path), keep_last=3, async_save=False, is_main=True)
    m.write(state(1), 1)

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CspxError, match=r"step_00000002.pt: saving the checkpoint failed \(No space "
                                        r"left on device\); earlier checkpoints .* are intact"):
        m.write(state(2), 2)
    monkeypatch.undo()
    assert listing(tmp_path / "checkpoints") == ["last.pt", "step_00000001.pt"]
    assert checkpoint.load(str(tmp_path / "checkpoints" / "last.pt"))["step"] == 1


def test_async_failure_surfaces_in_training_thread(tmp_path, monkeypatch):
    m = CheckpointManager(str(tmp_path), keep_last=3, async_save=True, is_main=True)
    monkeypatch.setattr(storage, "atomic_save",
                        lambda obj, path: (_ for _ in ()).throw(OSError(13, "Permission denied")))
    m.write(state(1), 1)
    with pytest.raises(CspxError, match="Permission denied"):
        m.close()


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
    while time.time() < deadline and not any(n.endswith(".tmp" + str(proc.pid)) for n in os.listdir(ck)):
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
    for name, msg in [("missing.pt", "checkpoint not found"), ("text.pt", "not a readable checkpoint"),
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
