"""README.md's journeys run as printed: every code block after a `<!-- ci:journey -->` marker,
in the README's order, with bash, in one fresh folder holding the checkout's entry points. Two
blocks that only read what earlier blocks made run side by side (`WAVES`): a process's start-up,
single-threaded, overlaps the other's on the second core.

Nothing in a block is rewritten. The environment is a user's after the README's two commands:
`python` on the PATH is this interpreter, and `~/.cache/cspx/demo-data-v1` (the demo recipe's
data.root) holds the demo dataset, through HOME pointing at a temporary home where it links to
the session's generated copy. The two CI blocks (`ci:demo`, `ci:test`) stay as .ci/run reads
them."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from conftest import ROOT

MARKER = "<!-- ci:journey -->"
ENTRY_POINTS = ("train.py", "validate.py", "predict.py", "recipes", "scripts")
# block indices, a wave after the one before it: train, resume, then evaluate beside fine-tune
# (both read runs/first), then predict beside export (both read runs/finetuned)
WAVES = ((0,), (1,), (2, 3), (4, 5))


def blocks(text: str, marker: str):
    """The bash code block right after each `marker` line."""
    return re.findall(re.escape(marker) + r"\n```bash\n(.*?)\n```", text, flags=re.S)


def test_ci_blocks_are_intact():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    (demo,) = blocks(text, "<!-- ci:demo -->")
    (tests,) = blocks(text, "<!-- ci:test -->")
    assert demo.endswith("train.py --recipe recipes/demo.yaml --resume auto")
    assert tests.endswith("-m pytest -q -n 2 --dist loadfile")
    # .ci/run's own extraction finds the same test command
    awk = subprocess.run(["awk", "/<!-- ci:test -->/{m=1; next} m && /^```/{if (inblock) exit; "
                          "inblock=1; next} m && inblock {print}", "README.md"], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert awk.stdout.strip() == tests


def test_every_journey_runs_as_printed(demo_data, tmp_path):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    journeys = blocks(text, MARKER)
    assert len(journeys) == text.splitlines().count(MARKER) == 6    # no marker without a block
    home = tmp_path / "home"
    (home / ".cache" / "cspx").mkdir(parents=True)
    os.symlink(demo_data, home / ".cache" / "cspx" / "demo-data-v1")
    work = tmp_path / "clone"
    work.mkdir()
    for name in ENTRY_POINTS:
        os.symlink(os.path.join(ROOT, name), work / name)
    env = dict(os.environ, HOME=str(home), PYTHONPATH=ROOT, PYTHONUNBUFFERED="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    assert sorted(i for wave in WAVES for i in wave) == list(range(len(journeys)))
    for i in (2, 3):
        assert "runs/first/" in journeys[i] and "run.dir=runs/first" not in journeys[i]
    for i in (4, 5):
        assert "runs/finetuned/" in journeys[i] and "run.dir=" not in journeys[i]
    for wave in WAVES:
        procs = [(journeys[i], subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", journeys[i]], cwd=work, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
            for i in wave]
        try:
            done = [(block, *p.communicate(timeout=300), p.returncode) for block, p in procs]
        finally:  # a block that failed or hung does not outlive the test
            for _, p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        for block, out, err, code in done:
            assert code == 0, (block, out[-2000:], err[-3000:])
    # what the journeys made: two runs, an evaluation, predictions, an exported model
    assert (work / "runs/first/checkpoints/last.pt").exists()
    assert (work / "runs/finetuned/checkpoints/best.pt").exists()
    rows = open(work / "predictions.csv").read().splitlines()
    assert rows[0].startswith("path,error,class_1,") and len(rows) == 31   # 30 val triangles
    assert (work / "exported/finetuned.torchscript.pt").exists()
