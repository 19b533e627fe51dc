"""cspx deletes or overwrites only what it created itself: every command pointed at a folder of a
user's own files leaves each file there byte for byte (sha256 before and after).

Other places of the same rule are tested beside their code: checkpoint pruning and last.pt in
test_checkpoint.py, a refused fresh start over a run in test_resume.py, make_shards.py's OUT in
test_shards.py, gpu_check.sh's OUT in test_gpu_check.py."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import run_main, tree_digest


@pytest.fixture
def users_folder(tmp_path):
    """An ImageNet-layout folder of a user's, with a few other files of theirs."""
    from PIL import Image
    root = tmp_path / "my_images"
    for split in ("train", "val"):
        for k in range(2):
            d = root / split / f"n{k:08d}"
            d.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), (60 * k, 20 * i, 90)).save(d / f"{i}.JPEG")
    (root / "notes.txt").write_text("my notes\n")
    (root / "config.yaml").write_text("mine: true\n")
    return root


def one_error_line(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return lines[-1]


@pytest.mark.parametrize("empty", [False, True])
def test_demo_recipe_never_touches_a_users_data_root(users_folder, tmp_path, empty):
    """The demo recipe (data.synthetic: true) pointed at the user's own folder, full or empty:
    refused with one line, nothing deleted, renamed or added, no run folder made."""
    root = tmp_path / "empty" if empty else users_folder
    root.mkdir(exist_ok=True)
    before = tree_digest(root)
    siblings = sorted(os.listdir(root.parent))
    r = run_main(["train.py", "--recipe", "recipes/demo.yaml", f"data.root={root}",
                 f"run.dir={tmp_path / 'run'}"])
    line = one_error_line(r)
    assert line.startswith(f"error: data.root: {root} exists and is not a cspx demo dataset")
    assert "nothing in it was touched" in line and "data.synthetic=false" in line
    assert tree_digest(root) == before
    assert sorted(os.listdir(root.parent)) == siblings     # no build folder left beside it
    assert not (tmp_path / "run").exists()


def test_run_dir_that_is_a_users_folder_is_refused(users_folder, demo_data, tmp_path):
    before = tree_digest(users_folder)
    r = run_main(["train.py", "--recipe", "recipes/demo.yaml", f"data.root={demo_data}",
                 f"run.dir={users_folder}", "train.steps=2", "data.workers=0"])
    line = one_error_line(r)
    assert line.startswith(f"error: run.dir: {users_folder} is not empty and was not made by cspx")
    assert tree_digest(users_folder) == before


def test_prepare_imagenet_refuses_a_users_out(users_folder, tmp_path):
    src = tmp_path / "src"
    (src / "n00000001").mkdir(parents=True)
    (src / "n00000001" / "a.JPEG").write_bytes(b"\xff\xd8\xff" + b"0" * 100 + b"\xff\xd9")
    before = tree_digest(users_folder)
    r = run_main(["scripts/prepare_imagenet.py", "--train", str(src), "--out", str(users_folder),
                 "--no-verify"])
    line = one_error_line(r)
    assert line.startswith(f"error: --out: {users_folder} is not empty and was not made by cspx")
    assert tree_digest(users_folder) == before


def test_check_dataset_replaces_only_its_own_exclusion_list(users_folder, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    mine = lists / "exclude.txt"
    mine.write_text("n00000000/0.JPEG\thand-picked\n")
    before = tree_digest(lists)
    args = ["scripts/check_dataset.py", str(users_folder), "--workers", "1", "--write-exclude",
            str(mine)]
    line = one_error_line(run_main(args))
    assert line.startswith(f"error: --write-exclude: {mine} already exists and was not written "
                           f"by this tool") and "--force" in line
    assert tree_digest(lists) == before
    # a list the script wrote itself is its own to replace; --force replaces any file
    ours = lists / "ours.txt"
    assert run_main(args[:-1] + [str(ours)]).returncode == 0
    assert run_main(args[:-1] + [str(ours)]).returncode == 0
    assert run_main(args + ["--force"]).returncode == 0
    assert mine.read_text().startswith("# written by scripts/check_dataset.py")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from cspx.models import create_model
    path = tmp_path_factory.mktemp("w") / "tiny.pth"
    torch.manual_seed(0)
    torch.save(create_model("cspresnext_tiny", num_classes=10).state_dict(), path)
    return str(path)


def test_export_replaces_only_its_own_files(tiny_weights, tmp_path):
    from test_export import cli  # scripts/export.py's main, in this process
    out = tmp_path / "exported"
    out.mkdir()
    (out / "model.torchscript.pt").write_bytes(b"someone else's model")
    (out / "keep.txt").write_text("keep me")
    before = tree_digest(out)
    args = ["--checkpoint", tiny_weights, "--model", "cspresnext_tiny", "--format", "torchscript",
            "--out", str(out / "model")]
    rc, _, err = cli(args)
    assert rc == 2 and err.strip() == (f"error: --out: {out / 'model.torchscript.pt'} already "
                                       f"exists and was not written by this tool; nothing was "
                                       f"written. Choose another path, or pass --force to "
                                       f"replace it"), err
    assert tree_digest(out) == before
    # a fresh prefix, exported twice: the second export replaces the first one's files
    again = args[:-1] + [str(out / "fresh")]
    assert cli(again)[0] == 0
    rc, _, err = cli(again)
    assert rc == 0, err[-1500:]
    assert cli(args + ["--force"])[0] == 0
    assert (out / "keep.txt").read_text() == "keep me"


def test_validate_outputs_overwrite_only_the_named_files(tiny_weights, users_folder, tmp_path):
    """--json and --predictions are output flags: replacing the named file is their documented
    job (see --help); nothing else in the folder changes."""
    help_text = run_main(["validate.py", "--help"]).stdout
    assert help_text.count("overwritten") == 2
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("keep me")
    (out / "r.json").write_text("old")
    before = tree_digest(out)
    r = run_main(["validate.py", "--checkpoint", tiny_weights, "--model", "cspresnext_tiny",
                 "--data-dir", str(users_folder), "--workers", "0", "--json", str(out / "r.json"),
                 "--predictions", str(out / "p.csv")])
    assert r.returncode == 0, r.stderr[-1500:]
    after = tree_digest(out)
    assert (out / "r.json").read_text().startswith("{")
    for name in ("./r.json", "./p.csv"):
        before.pop(name, None), after.pop(name)
    assert after == before


def test_benchmark_scratch_folders_hold_only_what_the_benchmark_made(users_folder, tmp_path):
    """checkpoint --out-dir writes and removes a folder of its own inside the user's; --make-data
    only ever fills a folder that is new or its own (a user's folder is refused)."""
    before = tree_digest(users_folder)
    r = run_main(["scripts/benchmark.py", "checkpoint", "--model", "cspresnext_tiny", "--device",
                 "cpu", "--rounds", "1", "--out-dir", str(users_folder)])
    assert r.returncode == 0, r.stderr[-1500:]
    assert tree_digest(users_folder) == before
    from cspx.bench.common import make_jpegs
    from cspx.errors import CspxError
    with pytest.raises(CspxError, match="is not empty and was not made by cspx"):
        make_jpegs(str(users_folder), 4)
    assert tree_digest(users_folder) == before
    ours = make_jpegs(str(tmp_path / "jpegs"), 4)
    assert make_jpegs(ours, 6) == ours and len(list((tmp_path / "jpegs").rglob("*.JPEG"))) == 6
